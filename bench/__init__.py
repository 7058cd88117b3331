"""
Measurements, each run from the repository root as `python -m bench.NAME`; NOTES.md
says what each speed-up was expected to give and what it gave.
"""

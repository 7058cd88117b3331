"""
The commands around training and sampling, each run from the repository root as
`python -m tools.NAME`: export (a model to a Hugging Face directory or a GGUF file),
prepare (a corpus of any size to token files), plot (a run's loss curves),
build_tokenizer (tokenizer.json, offline).
"""

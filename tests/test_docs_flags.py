"""docs/flags.md against the commands' own parsers, read in-process (each command's
build_parser(), no subprocess): for every command (a section "## train.py", "## python -m
tools.export", ...), the flags of its section's tables are
exactly the flags its parser has (hidden ones, help=argparse.SUPPRESS, left out; a
positional by its metavar, as `SOURCE`), and each documented default is the parser's.

How the page shows a default (`documented`, one default cell):
- `required`: a required flag or positional;
- `off` or `none`, bare words: nothing: the parser's default is False (store_true), None or
  [] (append);
- a number, maybe with words after it ("0 (3 when fine-tuning ...)", "16 on CUDA, 4 on
  CPU"): that number, equal to the parser's rounded to as many significant digits as the
  page shows (0.0417 for 1/sqrt(576) = 0.041666...; 100000 has six);
- one backquoted literal, maybe with a remark in parentheses after it (`auto`, `out`):
  that string;
- anything else is prose for a default decided at run time ("the folder's name", "a
  quarter of the memory free at start, 64 to 4096", "`$SMOL_API_KEY`, else none"): the
  parser's default is None and its --help names no number for it.

How the parser's default is read (`shown`): as --help shows it, never what it resolves to
at run time (`auto` stays "auto"). A default of None that the help text names as "default
N", N a number, is N, the usual value (sample.py --max_new_tokens, bench.py --steps).
train.py's parser holds no defaults (argparse.SUPPRESS: on resume they come from the
checkpoint); the help of each of its flags is "default X", from TrainConfig or SmolConfig,
and X is the default.

A row that names several flags ("`--beta1`, `--beta2`") gives each its part of a
comma-separated default ("0.9, 0.95") when there are as many parts, else the whole cell.

Beyond the tables, every `--flag` in a command line of the README and docs/ must be a flag
of the command it follows (`train.py ...`, `python -m server ...`).
"""
import argparse
import importlib
import os
import re

import pytest

from conftest import need_module
from smolkit.common import ROOT

# each command as the docs name it -> the module that holds its build_parser()
SCRIPTS = {"train": "train", "sample": "sample", "server": "server.app", "tools.export": "tools.export",
           "tools.prepare": "tools.prepare", "tools.plot": "tools.plot", "tools.build_tokenizer": "tools.build_tokenizer",
           "bench.bench": "bench.bench", "bench.bench_llama_cpp": "bench.bench_llama_cpp"}
REQUIRED, NOTHING = "required", None  # the two defaults that are not values
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def parser_of(script, monkeypatch):
    if script == "server":  # imports fastapi at module level, and exits without it
        for name in ("fastapi", "uvicorn", "pydantic"):
            need_module(name, "pip install -r requirements-serve.txt")
        monkeypatch.delenv("SMOL_API_KEY", raising=False)  # --api_key's default is read from it
    return importlib.import_module(SCRIPTS[script]).build_parser()


def number(text):
    """(value, significant digits shown) of a number as written, or None."""
    if not re.fullmatch(NUMBER, text):
        return None
    mantissa = text.split("e")[0].replace("-", "").replace(".", "").lstrip("0")
    return float(text), max(len(mantissa), 1)


def documented(cell):
    """A default cell of the page as a value: REQUIRED, NOTHING, (number, digits) or a string."""
    cell = cell.strip()
    if cell == "required":
        return REQUIRED
    if cell in ("off", "none"):
        return NOTHING
    lead = re.match(NUMBER + r"(?=$|[\s,;])", cell)
    if lead:
        return number(lead.group(0))
    literal = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", cell)
    if literal:
        return literal.group(1)
    return NOTHING  # prose: decided at run time


def shown(action):
    """The parser's default of one flag as --help shows it: REQUIRED, NOTHING, a number or a string."""
    if action.required:
        return REQUIRED
    default = action.default
    if default == argparse.SUPPRESS:  # train.py: help is "default X"
        text = re.fullmatch(r"default (.*)", action.help).group(1)
        return float(text) if number(text) else text
    if default is None:
        named = re.search(r"\bdefault:? (" + NUMBER + r")\b", action.help or "")
        return float(named.group(1)) if named else NOTHING
    if default is False or default == []:
        return NOTHING
    return float(default) if isinstance(default, (int, float)) else default


def same(doc, parser):
    if isinstance(doc, tuple):  # a number, as precise as the page writes it
        value, digits = doc
        return isinstance(parser, float) and float(f"{parser:.{digits}g}") == value
    return doc == parser


def page_sections():
    """{script: [(flag, default cell), ...]} from the tables of docs/flags.md."""
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        text = f.read()
    sections = {}
    for match in re.finditer(r"^## (?:python -m )?([\w.]+?)(?:\.py)?\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        rows, in_table = [], False
        for line in match.group(2).splitlines():
            if not line.startswith("|"):
                in_table = False
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if cells == ["flag", "default", "meaning"]:
                in_table = True
            elif in_table and not set(cells[0]) <= set("-"):  # not the |---| line
                flags = [quoted.split()[0] for quoted in re.findall(r"`([^`]+)`", cells[0])]
                assert flags, f"a row of {match.group(1)}'s table names no flag: {line}"
                parts = [p.strip() for p in cells[1].split(",")]
                for i, flag in enumerate(flags):
                    rows.append((flag, parts[i] if len(flags) > 1 and len(parts) == len(flags) else cells[1]))
        sections[match.group(1)] = rows
    return sections


@pytest.fixture(scope="module")
def sections():
    return page_sections()


def test_every_script_has_a_section(sections):
    assert sorted(sections) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_and_defaults_as_documented(script, sections, monkeypatch):
    parser = parser_of(script, monkeypatch)
    actions = {(a.option_strings[0] if a.option_strings else a.metavar or a.dest): a for a in parser._actions
               if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)}
    rows = sections.get(script)
    assert rows, f"docs/flags.md has no '## {script}' section with a flag table"
    names = [flag for flag, _ in rows]
    assert len(names) == len(set(names)), f"docs/flags.md lists a {script} flag twice: {names}"
    assert set(names) == set(actions), (
        f"{script}: in its parser, not in docs/flags.md: {sorted(set(actions) - set(names))}; "
        f"in docs/flags.md, not in its parser: {sorted(set(names) - set(actions))}")
    wrong = [f"{flag}: docs/flags.md says {cell!r}, the parser {shown(actions[flag])!r}" for flag, cell in rows
             if not same(documented(cell), shown(actions[flag]))]
    assert not wrong, f"{script}'s defaults in docs/flags.md: " + "; ".join(wrong)


def test_command_lines_in_the_docs_name_real_flags(monkeypatch):
    """Every `--flag` in a command line of the README and the docs ("python -m tools.prepare
    shard.jsonl --text_column content") is a flag of the script it follows."""
    parsers = {script: parser_of(script, monkeypatch) for script in SCRIPTS}
    modules = "|".join(re.escape(name) for name in SCRIPTS if name not in ("train", "sample"))
    command = re.compile(r"(?:(?<![\w/.-])(train|sample)\.py|(?<!\S)-m (" + modules + r"))(?![\w.])"
                         r"((?:[ \t]+(?:\\\n\s*)?[^\s`#|;&)]+)*)")
    wrong, seen = [], 0
    for name in ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                  if f.endswith(".md")]:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        for match in command.finditer(text):
            script = match.group(1) or match.group(2)
            known = {flag for action in parsers[script]._actions for flag in action.option_strings}
            for flag in re.findall(r"(?<!\S)(--\w+)", match.group(3)):
                seen += 1
                if flag not in known:
                    wrong.append(f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {script} {flag}")
    assert seen > 50, f"only {seen} flags found in the docs' command lines: is the pattern still right?"
    assert not wrong, "flags the scripts do not have: " + "; ".join(wrong)


@pytest.mark.parametrize("cell, value", [
    ("required", REQUIRED), ("off", NOTHING), ("none", NOTHING), ("`none`", "none"), ("`auto`", "auto"),
    ("`Once upon a time`", "Once upon a time"), ("6e-5", (6e-5, 1)), ("0.0417", (0.0417, 3)),
    ("100000", (100000.0, 6)), ("0 (3 when fine-tuning on conversations)", (0.0, 1)),
    ("16 on CUDA, 4 on CPU", (16.0, 2)), ("`$SMOL_API_KEY`, else none", NOTHING), ("the model's", NOTHING),
    ("a quarter of the memory free at start, 64 to 4096", NOTHING), ("`loss.png` in `--out_dir`", NOTHING)])
def test_how_a_default_cell_reads(cell, value):
    assert documented(cell) == value


def test_rounding_is_to_the_digits_shown():
    assert same((0.0417, 3), 0.041666666666666664)
    assert not same((0.0417, 3), 0.0416)
    assert not same((100000.0, 6), 123456.0)  # a shown zero is a digit
    assert not same((16.0, 2), NOTHING) and not same("16", 16.0)

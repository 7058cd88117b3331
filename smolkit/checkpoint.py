"""
Training checkpoints (out_dir/ckpt.pt): written atomically, read as data only, checked
against the config stored with them, and turned into a model.

A checkpoint is the dict train.py saves with torch.save:
    model          the unwrapped model's state dict (no "_orig_mod." or "module." prefixes)
    optimizer      AdamW's state dict (both moments of every parameter, the step counts)
    config         the SmolConfig as a dict;  train_config  the TrainConfig as a dict
    iter_num       steps done;  best_val_loss  the lowest validation loss seen so far
    rng            {"data": the batch sampler's state before the next step's draw (for
                    conversations: how many rows were drawn; for preference pairs, that
                    and the reference's log-probabilities of every reply),
                    "torch": the global one}
    scaler         the fp16 GradScaler's state (scale, growth tracker); {} when not in use
    eos_token_ids  the ids where sampling and serving stop ([0], <|endoftext|>, for models
                   trained here)
"""
import errno
import os
import pickle
from dataclasses import asdict

import torch

from smol import EOT_ID, PRESETS, SmolConfig, SmolLM
from smolkit.common import UserError


def ckpt_path(out_dir):
    """Where a run's checkpoint lives: out_dir/ckpt.pt."""
    return os.path.join(out_dir, "ckpt.pt")


def load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint is data, never code."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one with `python train.py` (or a tiny one in seconds: "
                        f"`python train.py --n_layer 2 --n_embd 64 --n_head 4 --n_kv_head 2 --intermediate_size 128 "
                        f"--block_size 64 --max_iters 100`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled Python objects, and loading them could run code; refused "
                        f"(weights_only=True). Only load checkpoints written by this train.py") from None
    except Exception:  # truncated, corrupt, or not a torch file at all
        raise UserError(f"{path} is truncated or corrupt and cannot be read; restore a copy or train afresh "
                        f"in another --out_dir") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "iter_num"} <= ckpt.keys():
        raise UserError(f"{path} is not a smol training checkpoint (expected 'model', 'config' and 'iter_num')")
    try:
        config = SmolConfig(**ckpt["config"]).validate()
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} holds a config that is not a SmolConfig ({e}); it was not written by this "
                        f"train.py") from None
    check_state(ckpt["model"], config, path)
    try:
        eos_ids(ckpt.get("eos_token_ids", [EOT_ID]), config.vocab_size, want_list=True)
    except ValueError as e:
        raise UserError(f"{path}: eos_token_ids {e}") from None
    return ckpt


def model_from_checkpoint(ckpt):
    """The model a checkpoint (from load_checkpoint) holds, on the CPU in fp32, with the
    ids where its text ends (files from before they were saved: <|endoftext|>)."""
    model = SmolLM(SmolConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eos_token_ids = tuple(ckpt.get("eos_token_ids", [EOT_ID]))
    return model


def eos_ids(declared, vocab_size=None, want_list=False):
    """The end-of-sequence ids a checkpoint declares, as a sorted tuple: a token id or a
    list of them (Hugging Face files say either; ckpt.pt a list); <|endoftext|> when none
    is declared. ValueError, completing "eos_token_ids ...", for anything else."""
    ids = declared if isinstance(declared, list) else [] if declared is None else [declared]
    valid = all(type(i) is int and i >= 0 and (vocab_size is None or i < vocab_size) for i in ids)
    if not valid or (want_list and not (isinstance(declared, list) and declared)):
        what = "a non-empty list of token ids" if want_list else "a token id or a list of them"
        raise ValueError(f"must be {what}{f' below {vocab_size}' if vocab_size else ''}, got {declared!r}")
    return tuple(sorted(set(ids))) or (EOT_ID,)


def state_problems(state, config):
    """What is wrong with a state dict for a model of this config: a list of phrases
    ("2 misshaped (...)", "1 missing (...)", "3 unexpected (...)"), empty when it fits.
    The one check of tensors against a config, for training checkpoints and Hugging
    Face files alike; load_state_dict would print pages instead."""
    with torch.device("meta"):  # the shapes the config implies, without allocating anything
        expected = {k: tuple(v.shape) for k, v in SmolLM(config).state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [k for k in expected if k in got and got[k] != expected[k]]

    def some(names, show=str):
        return ", ".join(map(show, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    def misshaped(k):
        return f"{k} is {got[k]} not {expected[k]}"
    problems = [f"{len(wrong)} misshaped ({some(wrong, misshaped)})"] if wrong else []
    problems += [f"{len(missing)} missing ({some(missing)})"] if missing else []
    problems += [f"{len(extra)} unexpected ({some(extra)})"] if extra else []
    return problems


def shapes_look_like(state):
    """What model the tensors of a state dict describe, read from their shapes alone."""
    emb, up = state.get("model.embed_tokens.weight"), state.get("model.layers.0.mlp.up_proj.weight")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not isinstance(up, torch.Tensor):
        return "no SmolLM at all (no model.embed_tokens.weight or model.layers.0.mlp.up_proj.weight)"
    layers = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    size = dict(n_layer=max(layers) + 1, n_embd=emb.shape[1], intermediate_size=up.shape[0], vocab_size=emb.shape[0])
    preset = [name for name, c in PRESETS.items() if all(getattr(c, k) == v for k, v in size.items())]
    return (", ".join(f"{k} {v}" for k, v in size.items())
            + (f", the shapes of {preset[0]}" if preset else ", none of the SmolLM2 presets"))


def check_state(state, config, path):
    """Refuse, in one line, a checkpoint whose tensors do not fit the config stored with
    it (a file from another model size, or one edited or assembled by hand), naming the
    wrong tensors and the model its shapes describe."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'model' is a {type(state).__name__}, not a dict of tensors")
    problems = state_problems(state, config)
    if not problems:
        return
    size = ", ".join(f"{k} {getattr(config, k)}" for k in ("n_layer", "n_embd", "intermediate_size", "vocab_size"))
    raise UserError(f"{path}: the tensors do not match the config stored with them ({size}): "
                    f"{'; '.join(problems)}. The tensors look like {shapes_look_like(state)}. Restore the file "
                    f"train.py wrote, or train afresh in another --out_dir")


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


# how Ceph, FUSE and virtiofs, among others, refuse to fsync a folder: they cannot, which
# is not a failure of the save (the file itself was fsynced before the rename)
FOLDER_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power cut, where the filesystem
    can; any other OSError (EIO: the disk failed) is raised."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in FOLDER_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def save_checkpoint(ckpt, path):
    """Write a temporary file in the same folder, fsync it, then rename it over the old
    checkpoint and fsync the folder: a crash mid-write leaves the previous checkpoint
    intact. A failed write (disk full, out_dir gone) removes the partial file and raises
    OSError."""
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
        os.replace(tmp, path)
        sync_folder(os.path.dirname(os.path.abspath(path)))
    except OSError:
        try:
            os.remove(tmp)  # a partial file would only take the space a retry needs
        except OSError:
            pass
        raise


# ---- a training run: what is saved and how it is restored ----


def load_resumable(path):
    """A checkpoint that train.py can continue exactly: besides what load_checkpoint
    checks, the AdamW moments, the RNG states and the best validation loss, which
    sampling and exporting do without."""
    ckpt = load_checkpoint(path)
    lacking = [k for k in ("optimizer", "rng", "best_val_loss") if k not in ckpt]
    if lacking:
        raise UserError(f"{path} has no {', '.join(lacking)}, so it cannot be resumed exactly; sample or export "
                        f"it, or train afresh in another --out_dir")
    return ckpt


def training_checkpoint(model, optimizer, scaler, train_config, iter_num, best_val_loss, data_state, wandb_id=None):
    """Everything the next step depends on. model: the unwrapped one (no "_orig_mod."
    or "module." prefixes); data_state: BatchSampler.resume_state(); wandb_id: the W&B
    run a resume continues (smolkit/tracking.py), None without one."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": asdict(model.config),
        "eos_token_ids": list(model.eos_token_ids),  # where sampling and serving stop
        "train_config": asdict(train_config),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "rng": {"data": data_state, "torch": torch.get_rng_state()},
        "scaler": scaler.state_dict(),
        "wandb_id": wandb_id,
    }


def restore_training(ckpt, optimizer, scaler, sampler, path):
    """Put the AdamW moments, the fp16 loss scale, the batch sampler and the global RNG
    back where the saved run stood (the weights: model_from_checkpoint). Returns
    (iter_num, best_val_loss)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the AdamW state does not fit the model ({e}); the file cannot be resumed "
                        f"exactly: train afresh in another --out_dir") from None
    if scaler.is_enabled() and ckpt.get("scaler"):  # else a fresh scale (a run that was not fp16)
        scaler.load_state_dict(ckpt["scaler"])
    sampler.restore(ckpt["rng"]["data"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["iter_num"], ckpt["best_val_loss"]

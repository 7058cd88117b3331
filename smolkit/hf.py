"""
Hugging Face interchange: the official SmolLM2 checkpoints in, this project's models
out, with no renaming table (smol.py names its parameters as the official files do).

    from smolkit.hf import from_pretrained, save_pretrained
    model = from_pretrained("path/to/SmolLM2-135M")   # a directory, or a hub id when online
    save_pretrained(model, "smol-hf")                 # transformers' AutoModelForCausalLM reads it

Also: config.json <-> SmolConfig, and the eos ids a directory declares.
"""
import json
import os
import shutil

import torch

from smol import EOT_ID, SmolConfig, SmolLM, rope_tables
from smolkit.chat import CHAT_TEMPLATE
from smolkit.checkpoint import eos_ids, state_problems
from smolkit.common import ROOT


def config_from_hf(hf):
    """SmolConfig from a config.json dict; ValueError for what SmolLM cannot represent."""
    arch = hf.get("architectures") or [hf.get("model_type")]
    if "LlamaForCausalLM" not in arch:
        raise ValueError(f"architecture {arch} is not supported: smol implements LlamaForCausalLM only")
    # transformers 5 moved rope_theta into "rope_parameters"; older files keep it at the top
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {hf.get('rope_scaling') or rope} is not supported: smol uses plain RoPE")
    if hf.get("rope_interleaved"):
        raise ValueError("interleaved RoPE is not supported: smol uses the rotate_half layout")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention or MLP biases are not supported: SmolLM has none")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported: SmolLM uses silu")
    if not hf.get("tie_word_embeddings", False):
        raise ValueError("untied input and output embeddings are not supported: SmolLM ties them")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    max_pos = hf.get("max_position_embeddings", 2048)
    return SmolConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                      n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                      intermediate_size=hf["intermediate_size"], block_size=min(2048, max_pos),
                      max_position_embeddings=max_pos,
                      rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                      norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02)).validate()


def config_to_hf(c, dtype="float32"):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
            "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": True,
            "attention_bias": False, "mlp_bias": False, "initializer_range": c.init_std,
            "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "torch_dtype": dtype}


def eos_ids_from_hf(path):
    """The end-of-sequence ids a checkpoint directory declares: eos_token_id of config.json
    and of generation_config.json, each an int or a list (SmolLM2-135M says 0,
    SmolLM2-135M-Instruct 2); <|endoftext|> when neither names one."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                eos = json.load(f).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    try:
        return eos_ids(ids)
    except ValueError as e:
        raise ValueError(f"{path}: eos_token_id {e}") from None


def from_pretrained(name_or_dir, dtype=torch.float32):
    """Load a Hugging Face checkpoint: a directory with config.json and
    model.safetensors (or shards plus model.safetensors.index.json), or a hub id
    such as "HuggingFaceTB/SmolLM2-135M" when huggingface_hub can download it.
    ValueError, in one line, for anything it cannot load."""
    path = _local_checkpoint_dir(name_or_dir)
    with open(os.path.join(path, "config.json")) as f:
        config = config_from_hf(json.load(f))
    state = {k: v.to(dtype) for k, v in _load_safetensors(path).items()
             if not k.endswith("rotary_emb.inv_freq")}  # old files stored the RoPE frequencies
    state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))  # tied: stored once
    state = {k: v for k, v in state.items() if v is not None}
    problems = state_problems(state, config)
    if problems:
        raise ValueError(f"{path}: the tensors do not match config.json ({'; '.join(problems)})")
    with torch.device("meta"):  # shapes only: no memory, no random init to throw away
        model = SmolLM(config)
    model.load_state_dict(state, assign=True)  # adopt the loaded tensors as the parameters
    model.lm_head.weight = model.model.embed_tokens.weight  # assign made two parameters: tie again
    cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin  # real tables in place of the meta placeholders
    model.eos_token_ids = eos_ids_from_hf(path)
    return model


def save_pretrained(model, out_dir):
    """Write a Hugging Face checkpoint directory (config.json, generation_config.json,
    model.safetensors, tokenizer files) that transformers' AutoModelForCausalLM loads
    as is, and that stops where this project's sampling stops (model.eos_token_ids)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    # lm_head.weight is the embedding: left out, as in the official files
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    eos = list(model.eos_token_ids) if len(model.eos_token_ids) > 1 else model.eos_token_ids[0]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config_to_hf(model.config, dtype), "eos_token_id": eos}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:  # where generate() looks
        json.dump({"bos_token_id": EOT_ID, "eos_token_id": eos}, f, indent=2)
    shutil.copy(os.path.join(ROOT, "tokenizer.json"), out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(model.config), f, indent=2)


def tokenizer_config(config):
    """tokenizer_config.json of an exported directory, and what the server's /tokenizer_info
    says, so that an evaluator sees the same special tokens and chat template through either
    (transformers' apply_chat_template, TRL and vLLM read the template from here): cosmo2
    adds no bos, and <|endoftext|> (id 0) is its bos, eos and unk."""
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "add_bos_token": False, "add_prefix_space": False,
            "model_max_length": config.max_position_embeddings, "chat_template": CHAT_TEMPLATE}


def _local_checkpoint_dir(name):
    if os.path.isdir(name):
        return name
    hint = "pass a local directory holding config.json and model.safetensors"
    if os.path.exists(name) or name.count("/") != 1:
        raise ValueError(f"{name} is not a checkpoint directory nor a hub id like HuggingFaceTB/SmolLM2-135M; {hint}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{name} is not a local directory and huggingface_hub is not installed; "
                         f"pip install huggingface_hub, or {hint}") from None
    try:
        return snapshot_download(name, allow_patterns=["config.json", "generation_config.json", "*.safetensors",
                                                       "*.safetensors.index.json"])
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ValueError(f"could not download {name} ({type(e).__name__}); {hint}") from None


def _load_safetensors(path):
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded: the index maps each tensor to its file
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
    state = {}
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{os.path.join(path, name)} is missing")
        try:
            state.update(load_file(os.path.join(path, name)))
        except Exception as e:  # safetensors' own error type: a file cut short, or not safetensors at all
            raise ValueError(f"{os.path.join(path, name)} is truncated or corrupt ({e})") from None
    return state

"""Parity with the reference implementation (transformers' LlamaForCausalLM) and
moving weights both ways. transformers is a test-only dependency; nothing here
touches the network."""
import dataclasses
import json
import os

import pytest
import torch

from conftest import need_module
from smol import PRESETS, SmolConfig, SmolLM
from smolkit.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained

transformers = need_module("transformers", "pip install transformers")

SMALL = dict(vocab_size=1000, n_layer=3, n_head=6, n_kv_head=2, n_embd=96, intermediate_size=160, block_size=64)


def random_smol(config, seed=0):
    """SmolLM with random weights everywhere, norm gains included (they start at
    ones, which would hide a norm applied in the wrong place)."""
    torch.manual_seed(seed)
    model = SmolLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def as_transformers(model):
    hf_config = {k: v for k, v in config_to_hf(model.config).items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config, attn_implementation="eager")).eval()
    hf.load_state_dict(model.state_dict())
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied
    hf.generation_config.eos_token_id = None  # never stop early: compare all the tokens
    hf.generation_config.pad_token_id = 0
    return hf


@pytest.mark.parametrize("config", [SmolConfig(), SmolConfig(**SMALL), SmolConfig(**{**SMALL, "n_kv_head": 6}),
                                    SmolConfig(**{**SMALL, "n_kv_head": 1, "rope_theta": 10000.0})],
                         ids=["135M", "6q-2kv", "mha", "mqa-theta1e4"])
def test_same_logits_as_transformers(config):
    model = random_smol(config)
    hf = as_transformers(model)
    idx = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config", [SmolConfig(), SmolConfig(**SMALL), SmolConfig(**{**SMALL, "n_kv_head": 6})],
                         ids=["135M", "6q-2kv", "mha"])
def test_the_cached_path_with_rows_at_different_positions_gives_transformers_logits(config):
    # what a server's batch does: each prompt read alone into its row of one cache, then one
    # pass over all rows, each at its own positions: a chunk of 4 tokens, then one token.
    # Each row's logits are transformers' for that row's whole sequence, read in one go
    from smol import KVCache
    model = random_smol(config)
    hf = as_transformers(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (1, n), generator=g) for n in (3, 9, 5)]
    chunk, last = torch.randint(0, config.vocab_size, (3, 4), generator=g), torch.randint(0, config.vocab_size, (3, 1),
                                                                                        generator=g)
    cache = KVCache.zeros(config, 3, 16, "cpu", torch.float32)
    with torch.no_grad():
        for row, p in enumerate(prompts):
            model(p, kv_cache=KVCache([t[row:row + 1] for t in cache.k], [t[row:row + 1] for t in cache.v]))
        starts = torch.tensor([[3], [9], [5]])
        ours_chunk = model(chunk, kv_cache=cache, input_pos=starts + torch.arange(4))[0]  # (3, 4, V)
        ours_last = model(last, kv_cache=cache, input_pos=starts + 4)[0]  # (3, 1, V)
        for row, p in enumerate(prompts):
            theirs = hf(torch.cat([p, chunk[row:row + 1], last[row:row + 1]], dim=1)).logits[0]  # (T, V)
            n = p.size(1)
            assert (ours_chunk[row] - theirs[n:n + 4]).abs().max().item() <= 1e-4, row
            assert (ours_last[row, 0] - theirs[n + 4]).abs().max().item() <= 1e-4, row


@pytest.mark.parametrize("config", [SmolConfig(), SmolConfig(**SMALL)], ids=["135M", "6q-2kv"])
def test_same_greedy_generation_as_transformers(config):
    model = random_smol(config)
    hf = as_transformers(model)
    prompt = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, 32, temperature=0)  # with our KV cache
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(ours, theirs)


def test_training_loss_equals_transformers_loss():
    model = random_smol(SmolConfig(**SMALL))
    hf = as_transformers(model)
    window = torch.randint(0, 1000, (4, 65), generator=torch.Generator().manual_seed(3))
    x, y = window[:, :-1], window[:, 1:]  # how train.py builds a batch
    with torch.no_grad():
        ours = model(x, y)[1]
        theirs = hf(window, labels=window).loss  # transformers shifts the labels itself
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_export_round_trip(tmp_path):
    model = random_smol(SmolConfig(**SMALL))
    save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = from_pretrained(tmp_path)
    idx = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        ours = model(idx)[0]
        assert (hf(idx).logits - ours).abs().max().item() <= 1e-5
        assert torch.equal(back(idx)[0], ours)
    assert back.lm_head.weight is back.model.embed_tokens.weight and back.num_params() == model.num_params()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("Hello world!").input_ids == [19556, 905, 17]


def test_export_py_command_line_round_trip(chat_model):
    # train.py then `python -m tools.export --out_dir OUT --to DIR` (the chat_model fixture runs
    # both command lines): transformers loads DIR and gives the checkpoint's logits, and
    # from_pretrained reads back the same tensors
    from smolkit.checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(chat_model["out_dir"] / "ckpt.pt")).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(chat_model["hf"]).eval()
    back = from_pretrained(str(chat_model["hf"]))
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0]
        assert (hf(idx).logits - ours).abs().max().item() <= 1e-4
        assert torch.equal(back(idx)[0], ours)


def test_loads_sharded_bf16_checkpoint_with_rope_parameters(tmp_path):
    # the layout of files saved by transformers 5: rope_theta inside "rope_parameters",
    # weights in bf16, split across shards with an index
    from safetensors.torch import save_file
    model = random_smol(SmolConfig(**SMALL))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    json.dump({"weight_map": {k: f for f, keys in shards.items() for k in keys}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    hf = config_to_hf(model.config, "bfloat16")
    hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta"), "rope_type": "default"}
    json.dump(hf, open(tmp_path / "config.json", "w"))
    loaded = from_pretrained(tmp_path)
    assert loaded.config == dataclasses.replace(model.config, block_size=2048)  # block_size: not in config.json
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, model.state_dict()[k].to(torch.bfloat16).float()), k


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "LlamaForCausalLM only"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"rope_interleaved": True}, "interleaved RoPE"),
    ({"attention_bias": True}, "biases"),
    ({"tie_word_embeddings": False}, "untied"),
    ({"hidden_act": "gelu"}, "silu"),
])
def test_refuses_what_it_cannot_represent(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**config_to_hf(SmolConfig()), **change})


def test_missing_directory_or_offline_hub_id_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        from_pretrained(str(tmp_path / "nowhere" / "deeper" / "still"))
    with pytest.raises(ValueError, match="no model.safetensors"):
        json.dump(config_to_hf(SmolConfig(**SMALL)), open(tmp_path / "config.json", "w"))
        from_pretrained(str(tmp_path))
    # offline mode makes the hub client fail at once instead of reaching the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="pass a local directory"):
        from_pretrained("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("name, count", [("SmolLM2-135M", 134_515_008), ("SmolLM2-360M", 361_821_120),
                                         ("SmolLM2-1.7B", 1_711_376_384)])
def test_presets_have_the_official_parameter_counts(name, count):
    with torch.device("meta"):
        assert SmolLM(PRESETS[name]).num_params() == count
    hf = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(PRESETS[name]).items()
                                     if k not in ("architectures", "model_type")})
    assert config_from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}) == PRESETS[name]

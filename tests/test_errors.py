"""Every mistake a user can make gets one clear line, a non-zero exit, no
traceback, and never costs a good checkpoint. Plus: interruption, crashes in the
middle of a save, and divergence all leave a checkpoint that resumes exactly."""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import command, need_module, wait_for
from smol import PRESETS, SmolLM
from smolkit.common import ROOT

TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "32", "--batch_size", "2", "--eval_iters", "1", "--sample_tokens", "2",
        "--max_position_embeddings", "128", "--log_interval", "1", "--data", os.path.join(ROOT, "input.txt"),
        "--device", "cpu"]


def run(script, *args, cwd, env=None, limits=()):
    # limits: (resource, bytes) pairs set in the child only, to make the OS itself refuse memory or disk
    def set_limits():
        for limit, size in limits:
            resource.setrlimit(limit, (size, size))
    return subprocess.run(command(script, *args), capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, **(env or {})}, preexec_fn=set_limits if limits else None)


# the script, run after capping the address space at its own size once torch is imported
# plus a headroom: the cap is the same for every torch build (a CUDA wheel maps gigabytes
# more than the CPU one at import, so an absolute cap would refuse it before any step)
CAPPED = """import os, resource, runpy, sys, torch
size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
headroom = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')"""


def run_capped(script, *args, cwd, headroom):
    return subprocess.run([sys.executable, "-c", CAPPED, str(headroom), os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a good checkpoint (step 6) in good/, and data files of every bad kind."""
    root = tmp_path_factory.mktemp("errors")
    proc = run("train.py", *TINY, "--max_iters", 6, "--eval_interval", 3, "--out_dir", root / "good", cwd=root)
    assert proc.returncode == 0, proc.stderr
    (root / "empty.txt").write_text("  \n<|endoftext|>\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "short.txt").write_text("Just a few words, far fewer than one block of tokens.")
    (root / "a_file").write_text("not a folder")
    good_chat = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    (root / "not_json.jsonl").write_text(good_chat + "{oops\n")
    (root / "bad_role.jsonl").write_text(good_chat + '{"messages": [{"role": "bot", "content": "hi"}]}\n')
    (root / "no_reply.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    good = torch.load(root / "good" / "ckpt.pt", weights_only=True)
    os.makedirs(root / "truncated")
    data = open(root / "good" / "ckpt.pt", "rb").read()
    open(root / "truncated" / "ckpt.pt", "wb").write(data[: len(data) // 2])
    os.makedirs(root / "pickled")
    torch.save({**good, "config": argparse_namespace()}, root / "pickled" / "ckpt.pt")
    (root / "long_prompt.txt").write_text(" ".join(["word"] * 300))  # 300 tokens
    make_bad_prepared_folders(root)
    make_mismatched_checkpoints(root, good)
    return root


def make_bad_prepared_folders(root):
    """Folders shaped like prepare.py's output, each wrong in one way."""
    ids = (np.arange(2000) % 1000).astype(np.uint16)
    for name in ("odd_size", "empty_val", "id_too_big", "no_val"):
        os.makedirs(root / name)
        ids.tofile(root / name / "train.bin")
        ids.tofile(root / name / "val.bin")
    with open(root / "odd_size" / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: a file cut short mid-write
    open(root / "empty_val" / "val.bin", "wb").close()
    big = ids.copy()
    big[1234] = 60000  # the model has 49,152 embeddings
    big.tofile(root / "id_too_big" / "val.bin")
    os.remove(root / "no_val" / "val.bin")


def make_mismatched_checkpoints(root, good):
    def save(name, model):
        os.makedirs(root / name)
        torch.save({**good, "model": model}, root / name / "ckpt.pt")
    state = good["model"]
    save("missing_tensor", {k: v for k, v in state.items() if k != "model.norm.weight"})
    save("misshaped_tensor", {**state, "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)})
    # the tensors of SmolLM2-135M under a tiny model's config; expand() keeps the file a few KB
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SmolLM(PRESETS["SmolLM2-135M"]).state_dict().items()}
    save("preset_tensors", {k: torch.zeros(1).expand(shape) for k, shape in shapes.items()})


def argparse_namespace():
    import argparse
    return argparse.Namespace(n_layer=2)  # an arbitrary Python object: unpickling it would import code


RESUME = ["--init_from", "resume", "--out_dir", "good", "--max_iters", 20]
CASES = [
    # (script, args, exit status, words the message must contain)
    ("train.py", [*RESUME, "--data", "missing.txt"], 1, "missing.txt not found"),
    ("train.py", [*RESUME, "--data", "empty.txt"], 1, "is empty"),
    ("train.py", [*RESUME, "--data", "latin1.txt"], 1, "not UTF-8"),
    ("train.py", [*RESUME, "--data", "short.txt"], 1, "smaller --block_size"),
    ("train.py", [*RESUME, "--data", "not_json.jsonl"], 1, "not_json.jsonl line 2 is not JSON"),
    ("train.py", [*RESUME, "--data", "bad_role.jsonl"], 1, "bad_role.jsonl line 2, message 1: unknown role 'bot'"),
    ("train.py", [*RESUME, "--data", "no_reply.jsonl"], 1, "no_reply.jsonl has no assistant turn"),
    ("train.py", [*RESUME, "--epochs", 2], 1, "pass --epochs or --max_iters, not both"),
    ("train.py", ["--init_from", "resume", "--out_dir", "nothing_here"], 1, "no checkpoint at"),
    ("train.py", ["--init_from", "resume", "--out_dir", "truncated", "--max_iters", 20], 1, "truncated or corrupt"),
    ("train.py", ["--init_from", "resume", "--out_dir", "pickled", "--max_iters", 20], 1, "pickled Python objects"),
    ("train.py", [*RESUME, "--n_layer", 3], 1, "--n_layer 3 conflicts with"),
    ("train.py", ["--init_from", "resume", "--out_dir", "good", "--max_iters", 6], 1, "not above the checkpoint's step 6"),
    ("train.py", [*TINY, "--out_dir", "good"], 1, "already exists"),
    ("train.py", ["--n_layr", 3], 2, "did you mean --n_layer"),
    ("train.py", ["--batch_size", "abc"], 2, "invalid int value"),
    ("train.py", ["--init_from", "resume", "--out_dir", "good", "--max_iters", 20, "--batch_size", 0], 1,
     "--batch_size must be positive"),
    ("train.py", [*TINY, "--n_embd", -64, "--out_dir", "fresh"], 1, "n_embd must be positive"),
    ("train.py", [*TINY, "--block_size", 256, "--out_dir", "fresh"], 1, "exceeds max_position_embeddings"),
    ("train.py", [*TINY, "--n_kv_head", 3, "--out_dir", "fresh"], 1, "divisible by n_kv_head"),
    ("train.py", [*TINY, "--n_head", 5, "--n_kv_head", 1, "--out_dir", "fresh"], 1, "divisible by n_head"),
    ("train.py", [*TINY, "--learning_rate", -1, "--out_dir", "fresh"], 1, "--learning_rate must be positive"),
    ("train.py", [*TINY, "--out_dir", "a_file/run"], 1, "cannot write to out_dir"),
    ("train.py", [*RESUME, "--device", "cuda"], 1, "CUDA is not available"),
    ("train.py", [*RESUME, "--init_from", "no/such-model"], 1, "pass a local directory"),
    ("sample.py", ["--out_dir", "nothing_here"], 1, "python train.py"),
    ("sample.py", ["--out_dir", "good", "--start", "FILE:missing_prompt.txt"], 1, "prompt file missing_prompt.txt"),
    ("sample.py", ["--out_dir", "good", "--top_p", 1.5], 1, "--top_p must be in (0, 1]"),
    ("sample.py", ["--out_dir", "good", "--top_p", 0], 1, "--top_p must be in (0, 1]"),
    ("sample.py", ["--out_dir", "good", "--temperature", -1], 1, "--temperature must be"),
    ("sample.py", ["--out_dir", "truncated"], 1, "truncated or corrupt"),
    ("sample.py", ["--out_dir", "good", "--tempreature", 1], 2, "did you mean --temperature"),
    ("tools.export", ["--out_dir", "nothing_here", "--to", "exported"], 1, "no checkpoint at"),
    # prepared data prepare.py cannot have written: the file is named, with how to rebuild it
    ("train.py", [*RESUME, "--data", "odd_size"], 1, "odd_size/train.bin has 4,001 bytes, not a whole number"),
    ("train.py", [*RESUME, "--data", "empty_val"], 1, "empty_val/val.bin is empty"),
    ("train.py", [*RESUME, "--data", "id_too_big"], 1, "id_too_big/val.bin holds token id 60000"),
    ("train.py", [*RESUME, "--data", "no_val"], 1, "`python -m tools.prepare SOURCE --out no_val`"),
    # flags that parse but make no sense
    ("train.py", [*RESUME, "--learning_rate", "nan"], 2, "--learning_rate: must be a finite number, got 'nan'"),
    ("sample.py", ["--out_dir", "good", "--temperature", "inf"], 2, "--temperature: must be a finite number"),
    ("train.py", [*TINY, "--n_embd", 65536, "--n_head", 1024, "--n_kv_head", 1024, "--out_dir", "fresh"], 1,
     "GiB (37,631,623,168 parameters"),
    # what the first evaluation needs is checked before the first step
    ("train.py", [*TINY, "--sample_tokens", 200, "--out_dir", "fresh"], 1, "exceed max_position_embeddings 128"),
    # tensors that do not fit their config: which ones, and what the file looks like
    ("train.py", ["--init_from", "resume", "--out_dir", "missing_tensor", "--max_iters", 20], 1,
     "1 missing (model.norm.weight)"),
    ("tools.export", ["--out_dir", "misshaped_tensor", "--to", "exported"], 1,
     "model.layers.1.self_attn.k_proj.weight is (64, 64) not (32, 64)"),
    ("sample.py", ["--out_dir", "preset_tensors"], 1, "the shapes of SmolLM2-135M"),
]


@pytest.mark.parametrize("script, args, status, message", CASES,
                         ids=[f"{c[0]}:{c[3][:30]}" for c in CASES])
def test_mistake_is_explained(work, script, args, status, message):
    before = digest(work / "good" / "ckpt.pt")
    # CUDA hidden from the child: --device cuda is then the mistake it is on a machine without a GPU
    proc = run(script, *args, cwd=work, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert digest(work / "good" / "ckpt.pt") == before  # nothing overwritten
    assert not os.path.exists(work / "fresh" / "ckpt.pt")


def test_long_prompt_keeps_the_last_tokens_with_a_warning(work):
    proc = run("sample.py", "--out_dir", "good", "--start", "FILE:long_prompt.txt", "--max_new_tokens", 8,
               "--num_samples", 1, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "warning: prompt has 300 tokens; keeping the last 120" in proc.stderr


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_matches_uninterrupted_run(tmp_path, sig):
    steps = [*TINY, "--max_iters", 40, "--eval_interval", 100]
    assert run("train.py", *steps, "--out_dir", "straight", cwd=tmp_path).returncode == 0
    proc = subprocess.Popen(command("train.py", *steps, "--out_dir", "stopped"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped" / "metrics.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, "five lines were never logged", 120)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    assert f"{signal.Signals(sig).name}: stopped after step" in err and "--init_from resume" in err
    stopped_at = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["iter_num"]
    assert 5 <= stopped_at < 40
    resumed = run("train.py", "--init_from", "resume", "--out_dir", "stopped", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_killed_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    # the save at step 4 succeeds; the one at step 8 pauses after its first bytes
    # (tests/faults.py slow_save), and the writer is SIGKILLed there, in the middle of the file
    assert run("train.py", *TINY, "--max_iters", 4, "--eval_interval", 4, "--out_dir", "run",
               cwd=tmp_path).returncode == 0
    first, size = digest(tmp_path / "run" / "ckpt.pt"), os.path.getsize(tmp_path / "run" / "ckpt.pt")
    tmp = tmp_path / "run" / "ckpt.pt.tmp"
    proc = subprocess.Popen(command("tests/faults.py", "slow_save=120", "--", "--init_from", "resume", "--out_dir",
                                    "run", "--max_iters", 12),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, "the save never began writing", 120)
    proc.kill()
    proc.wait()
    assert 0 < tmp.stat().st_size < size  # the kill landed while the file was being written
    assert digest(tmp_path / "run" / "ckpt.pt") == first  # untouched by the interrupted save
    resumed = run("train.py", "--init_from", "resume", "--out_dir", "run", "--max_iters", 12, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "at step 4" in resumed.stdout
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 12


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    assert run("train.py", *TINY, "--max_iters", 4, "--eval_interval", 4, "--out_dir", "run",
               cwd=tmp_path).returncode == 0
    good = digest(tmp_path / "run" / "ckpt.pt")
    # a learning rate of 1e30 sends the weights to infinity within a step or two
    proc = run("train.py", "--init_from", "resume", "--out_dir", "run", "--max_iters", 50,
               "--learning_rate", 1e30, "--min_lr", 1e30, "--grad_clip", 0, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "at step" in proc.stderr and "last good checkpoint" in proc.stderr, proc.stderr
    assert digest(tmp_path / "run" / "ckpt.pt") == good


def test_divergence_on_an_evaluation_step_never_reaches_the_checkpoint(tmp_path):
    # the loss is checked before each update, so an update that breaks the weights is
    # first seen by the evaluation right after it: that evaluation's save must refuse
    assert run("train.py", *TINY, "--max_iters", 4, "--eval_interval", 4, "--out_dir", "run",
               cwd=tmp_path).returncode == 0
    shutil.copytree(tmp_path / "run", tmp_path / "twin")
    wild = ["--learning_rate", 1e30, "--min_lr", 1e30, "--warmup_iters", 0, "--grad_clip", 0, "--eval_interval", 1]
    proc = run("train.py", "--init_from", "resume", "--out_dir", "run", "--max_iters", 50, *wild, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: the weights diverged at step 6 (the train loss is nan); stopping without "
                                  "saving. The last good checkpoint run/ckpt.pt (step 5) is untouched"), proc.stderr
    assert "eval step 6 | train nan | val nan" in proc.stdout
    # what is on disk is exactly the state of step 5: the same run stopped there by itself
    assert run("train.py", "--init_from", "resume", "--out_dir", "twin", "--max_iters", 5, *wild,
               cwd=tmp_path).returncode == 0
    kept, twin = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("run", "twin"))
    assert kept["iter_num"] == twin["iter_num"] == 5
    for k, v in twin["model"].items():
        assert torch.equal(kept["model"][k], v) and v.isfinite().all(), k


def test_a_learning_rate_beyond_float32_is_one_line(tmp_path):
    proc = run("train.py", *TINY, "--max_iters", 2, "--learning_rate", 1e39, "--warmup_iters", 0, "--out_dir", "run",
               cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith(
        "error: --learning_rate 1e+39 overflows float32 in AdamW's update at step 1; use a smaller one."), proc.stderr


def test_out_of_memory_at_the_first_step_is_one_line(work):
    # a real allocator failure, not a simulated one: the address space is capped at
    # 1.9 GB above what importing torch took (plenty for the tiny model at batch 2, as
    # the second run shows) and a batch of 50,000 rows asks for far more
    proc = run_capped("train.py", *TINY, "--batch_size", 50000, "--max_iters", 1, "--out_dir", "oom_step", cwd=work,
                      headroom=1900 << 20)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "error: out of memory on cpu at step 1 with batch_size 50000 x block_size 32" in line
    assert "lower --batch_size or --block_size" in line and "--gradient_accumulation_steps" in line
    assert not os.path.exists(work / "oom_step" / "ckpt.pt")
    proc = run_capped("train.py", *TINY, "--max_iters", 2, "--eval_interval", 2, "--out_dir", "capped_ok", cwd=work,
                      headroom=1900 << 20)
    assert proc.returncode == 0, proc.stderr  # the cap itself leaves room for a normal run


def test_out_of_memory_at_the_first_evaluation_keeps_the_checkpoint(work, tmp_path):
    # simulated: tests/faults.py oom_at_eval makes evaluate() raise the CPU allocator's
    # own error. A real one cannot be provoked here: an evaluation (no gradients) needs
    # less memory than the training step before it, so any cap that lets the step run
    # lets the evaluation run too
    shutil.copytree(work / "good", tmp_path / "run")
    before = digest(tmp_path / "run" / "ckpt.pt")
    proc = run("tests/faults.py", "oom_at_eval=123456789", "--", "--init_from", "resume", "--out_dir", "run",
               "--max_iters", 9, "--data", os.path.join(ROOT, "input.txt"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "out of memory on cpu at the evaluation of step 9 with batch_size 2 x block_size 32" in line
    assert "The checkpoint of step 6" in line and "is intact" in line
    assert digest(tmp_path / "run" / "ckpt.pt") == before


def test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(work, tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse every write past 1 MB (EFBIG, as a full
    # disk refuses with ENOSPC): metrics.jsonl still fits, a 38 MB checkpoint does not
    shutil.copytree(work / "good", tmp_path / "run")
    before = digest(tmp_path / "run" / "ckpt.pt")
    proc = run("train.py", "--init_from", "resume", "--out_dir", "run", "--max_iters", 30, "--data",
               os.path.join(ROOT, "input.txt"), cwd=tmp_path, limits=[(resource.RLIMIT_FSIZE, 1 << 20)])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "error: could not save run/ckpt.pt at step 9 (File too large); stopped" in line
    assert "The checkpoint of step 6, run/ckpt.pt, is intact" in line
    assert "step 10 " not in proc.stdout  # no training past the failed save
    assert digest(tmp_path / "run" / "ckpt.pt") == before
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "metrics.jsonl", "train.lock"]  # no .tmp left


def test_second_run_refuses_and_a_killed_run_leaves_neither_lock_nor_torn_log(work, tmp_path):
    need_module("matplotlib", "pip install matplotlib")
    shutil.copytree(work / "good", tmp_path / "run")
    resume = ["--init_from", "resume", "--out_dir", "run", "--data", os.path.join(ROOT, "input.txt")]
    # the first run saves at step 9, slowly (tests/faults.py slow_save): it holds the lock, idle
    first = subprocess.Popen(command("tests/faults.py", "slow_save=60", "--", *resume, "--max_iters", 10 ** 6),
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: (tmp_path / "run" / "ckpt.pt.tmp").exists(), "the slow save never began", 120)
        second = run("train.py", *resume, "--max_iters", 20, cwd=tmp_path)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"run is in use by another train.py (pid {first.pid} on" in second.stderr
    finally:
        first.kill()  # SIGKILL: no handler runs, train.py never releases the lock itself
        first.wait()
    # as if it died in the middle of writing a line
    with open(log, "a") as f:
        f.write('{"step": 99, "lo')
    third = run("train.py", *resume, "--max_iters", 7, "--sample_prompt", "", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "sample: " in third.stdout  # an empty sample prompt is a fresh document, not a crash
    lines = log.read_text().splitlines()
    torn = lines.index('{"step": 99, "lo')  # left alone, on a line of its own
    # the resume row (from the step-6 checkpoint), then step 7's step and evaluation rows
    assert [json.loads(line)["step"] for line in lines[torn + 1:]] == [6, 7, 7]
    plot = run("tools.plot", "--out_dir", "run", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert f"warning: skipped unreadable line {torn + 1} of run/metrics.jsonl" in plot.stderr
    assert os.path.getsize(tmp_path / "run" / "loss.png") > 0


def test_empty_prompt_samples(work):
    # (a whitespace-only prompt encodes to ordinary tokens; the empty one to none at all)
    proc = run("sample.py", "--out_dir", "good", "--start", "", "--max_new_tokens", 3, "--num_samples", 1, cwd=work)
    assert proc.returncode == 0, proc.stderr
    # stderr: only the sample's speed, as llama.cpp's tools report it (the prompt: <|endoftext|>)
    assert re.fullmatch(r"\[1 prompt tokens, [123] new tokens in \d+\.\d\d s: \d+\.\d tokens/s\]\n", proc.stderr), proc.stderr


def test_a_model_that_overflows_fp16_is_one_line(tmp_path):
    from conftest import fp16_overflowing_model
    from smolkit.hf import save_pretrained
    save_pretrained(fp16_overflowing_model(), tmp_path)
    args = ["--init_from", tmp_path, "--max_new_tokens", 3, "--start", "Hello", "--device", "cpu"]
    fp16 = run("sample.py", *args, "--dtype", "float16", cwd=tmp_path)
    assert fp16.returncode == 1 and "Traceback" not in fp16.stderr
    assert fp16.stderr.strip().splitlines() == [
        "error: the model's activations overflowed float16 (its logits are inf or NaN); run it with --dtype float32, "
        "or bfloat16 where the hardware computes it"]
    assert run("sample.py", *args, "--dtype", "float32", cwd=tmp_path).returncode == 0  # fp32 holds it

"""train.py and sample.py end to end, through their real command lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import command, need_module
from smolkit.common import ROOT

ROOT = ROOT
TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "64", "--batch_size", "4", "--eval_iters", "2", "--sample_tokens", "4",
        "--learning_rate", "3e-3", "--warmup_iters", "4", "--lr_decay_iters", "30", "--min_lr", "3e-4",
        "--device", "cpu"]  # the claims checked here (dtype, no compile, bit-exact resume) are a CPU's


def run(script, *args, check=True):
    proc = subprocess.run(command(script, *args),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_until(args, first_words, sig):
    """Start train.py with args, read its log until a line starts with first_words, send sig and
    wait for the end. Returns (the lines read, the exit code)."""
    proc = subprocess.Popen(command("train.py", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(first_words):
                break
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return lines, proc.returncode


def train_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r["lr"]) for r in rows if "loss" in r}


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


# fp32, the bf16 autocast of CUDA and capable CPUs, and the fp16 autocast with a GradScaler
# of older CUDA cards (fewer steps: on CPUs without native bf16 or fp16 they are emulated and slow)
@pytest.mark.parametrize("dtype, total, split_at, every", [("float32", 24, 14, 7), ("bfloat16", 8, 5, 3),
                                                           ("float16", 4, 2, 2)])
def test_resume_is_exact(tmp_path, dtype, total, split_at, every):
    one, split = tmp_path / "one", tmp_path / "split"
    # `total` steps in one go, versus split_at + a resume to total; evaluation every few steps,
    # so the split run also evaluates (and samples) mid-way without disturbing anything
    first = run("train.py", *TINY, "--max_iters", total, "--eval_interval", every, "--log_interval", 1,
                "--out_dir", one, "--dtype", dtype)
    assert f", {dtype} (--dtype{', GradScaler' if dtype == 'float16' else ''}), compile False" in first.stdout
    run("train.py", *TINY, "--max_iters", split_at, "--eval_interval", every, "--log_interval", 1, "--out_dir", split,
        "--dtype", dtype)
    resumed = run("train.py", "--init_from", "resume", "--max_iters", total, "--out_dir", split)
    assert f", {dtype} (--dtype" in resumed.stdout  # the checkpoint's dtype carries over
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith(f"step {split_at + 1} ") and lines[-1].startswith(f"step {total} ")
    assert train_losses(one) == train_losses(split)  # every step's loss and lr, bit for bit
    a, b = load(one), load(split)
    assert a["iter_num"] == b["iter_num"] == total
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # fp16: the loss scale and the count of steps since it last changed carry over too
    assert a["scaler"] == b["scaler"] and (a["scaler"]["_growth_tracker"] == total if dtype == "float16" else 1)


def test_checkpoint_contents(tmp_path):
    out = run("train.py", *TINY, "--max_iters", 6, "--eval_interval", 3, "--out_dir", tmp_path)
    ckpt = load(tmp_path)  # weights_only=True: plain data
    assert {"model", "optimizer", "config", "train_config", "iter_num", "best_val_loss", "rng", "scaler"} <= ckpt.keys()
    assert ckpt["scaler"] == {}  # no fp16 here: no GradScaler state
    assert ckpt["iter_num"] == 6 and ckpt["config"]["n_layer"] == 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    vals = [json.loads(x)["val_loss"] for x in open(tmp_path / "metrics.jsonl") if "val_loss" in x]
    assert ckpt["best_val_loss"] == min(vals)
    assert "parameters: embedding 3,145,728" in out.stdout


def test_resume_past_decay_horizon_holds_final_lr(tmp_path):
    run("train.py", *TINY, "--max_iters", 30, "--eval_interval", 30, "--log_interval", 1, "--out_dir", tmp_path)
    # the decay horizon (30) comes from the checkpoint; steps 31.. stay at min_lr
    run("train.py", "--init_from", "resume", "--max_iters", 33, "--log_interval", 1, "--out_dir", tmp_path)
    lrs = {step: lr for step, (_, lr) in train_losses(tmp_path).items()}
    assert lrs[31] == lrs[32] == lrs[33] == 3e-4
    assert lrs[5] == 3e-3  # the end of warmup reaches the peak


def test_train_then_sample(tmp_path):
    out = run("train.py", *TINY, "--max_iters", 40, "--eval_interval", 20, "--log_interval", 10, "--out_dir", tmp_path)
    losses = train_losses(tmp_path)
    assert losses[40][0] < losses[10][0]  # it learns
    assert "eval step 20" in out.stdout and "sample: 'Once upon a time" in out.stdout
    assert "mfu" not in out.stdout  # no MFU on a CPU
    s = run("sample.py", "--out_dir", tmp_path, "--num_samples", 2, "--max_new_tokens", 20, "--start", "The river")
    assert s.stdout.count("The river") == 2
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A lighthouse keeper")
    s = run("sample.py", "--out_dir", tmp_path, "--num_samples", 1, "--start", f"FILE:{prompt}", "--temperature", 0)
    assert s.stdout.startswith("A lighthouse keeper")
    # the compiled decode step writes the same greedy text as the eager one
    compiled = run("sample.py", "--out_dir", tmp_path, "--num_samples", 1, "--start", f"FILE:{prompt}",
                   "--temperature", 0, "--compile", "true")
    assert compiled.stdout == s.stdout


def test_sample_without_checkpoint_says_how_to_make_one(tmp_path):
    s = run("sample.py", "--out_dir", tmp_path, check=False)
    assert s.returncode == 1 and "python train.py" in s.stderr and "Traceback" not in s.stderr


def test_unknown_flag_suggests_the_closest(tmp_path):
    s = run("train.py", "--learning_rat", "1e-3", check=False)
    assert s.returncode == 2 and "did you mean --learning_rate" in s.stderr and "Traceback" not in s.stderr


def test_plot_turns_metrics_into_a_png(tmp_path):
    need_module("matplotlib", "pip install matplotlib")
    run("train.py", *TINY, "--max_iters", 6, "--eval_interval", 3, "--log_interval", 1, "--out_dir", tmp_path)
    run("train.py", "--init_from", "resume", "--max_iters", 9, "--out_dir", tmp_path)  # the curve continues
    run("tools.plot", "--out_dir", tmp_path, "--to", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 10))
    assert {"step": 6, "resumed": True} in [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # the resume point is drawn: the same metrics without their resume row give another picture
    kept = [line for line in open(tmp_path / "metrics.jsonl") if '"resumed"' not in line]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text("".join(kept))
    run("tools.plot", "--out_dir", tmp_path / "plain", "--to", tmp_path / "plain.png", "--title", "t")
    run("tools.plot", "--out_dir", tmp_path, "--to", tmp_path / "marked.png", "--title", "t")
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "marked.png").read_bytes()
    missing = run("tools.plot", "--out_dir", tmp_path / "nothing", check=False)
    assert missing.returncode == 1 and "no metrics at" in missing.stderr


def test_sampling_and_exporting_never_import_the_training_loop():
    # each command imports only what its job needs: the shared helpers live in smolkit/
    code = ("import sys, sample, server.app; from tools import export, plot, prepare; "
            "assert 'train' not in sys.modules, 'train imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_first_step_is_logged_at_once_with_an_eta(tmp_path):
    out = run("train.py", *TINY, "--max_iters", 12, "--eval_interval", 12, "--log_interval", 10, "--out_dir", tmp_path)
    steps = [line.split(" |")[0] for line in out.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 1", "step 10", "step 12"]
    from smolkit.common import cpu_has_native_bf16  # --dtype auto: bf16 autocast exactly where the CPU computes it
    dtype = "bfloat16 (native bf16 on this CPU)" if cpu_has_native_bf16() else "float32 (no native bf16 on this CPU)"
    # 4 x 64 tokens' logits (50 MB at 16 bytes each) fit any machine: the loss in one piece
    assert f"device cpu, {dtype}, compile False, the loss in one piece;" in out.stdout
    first = next(line for line in out.stdout.splitlines() if line.startswith("step 1 |"))
    assert " ms | " in first and "| eta " in first
    resumed = run("train.py", "--init_from", "resume", "--max_iters", 30, "--out_dir", tmp_path)
    steps = [line.split(" |")[0] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 13", "step 20", "step 30"]  # the first step after a resume too


def test_a_run_of_hours_on_a_cpu_says_so_and_offers_the_small_model(tmp_path):
    # a run whose ETA is hours: after its first step, one line gives the duration and
    # the small configuration; then Ctrl-C stops it cleanly with a checkpoint
    import signal
    lines, code = run_until([*TINY, "--max_iters", "10000000", "--out_dir", tmp_path], "note:", signal.SIGINT)
    assert lines[-1].startswith("note:"), lines
    assert lines[-2].startswith("step 1 |")
    note = lines[-1]
    assert "on this CPU" in note and "python train.py --config configs/laptop-cpu.toml" in note
    assert code == 130 and (tmp_path / "ckpt.pt").exists()


def test_doc_mask_trains_and_says_so(tmp_path):
    out = run("train.py", *TINY, "--max_iters", 2, "--eval_interval", 2, "--doc_mask", "true", "--out_dir", tmp_path)
    assert " val tokens, each document kept to itself; " in out.stdout
    plain = run("train.py", *TINY, "--max_iters", 2, "--eval_interval", 2, "--out_dir", tmp_path / "plain")
    assert "kept to itself" not in plain.stdout

"""DistributedDataParallel under torchrun, on CPU with the gloo backend."""
import json
import os
import subprocess
import sys

import torch

from conftest import command
from smolkit.common import ROOT

TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "32", "--batch_size", "2", "--eval_iters", "1", "--sample_tokens", "2", "--log_interval", "1",
        "--learning_rate", "3e-3", "--warmup_iters", "2", "--lr_decay_iters", "12", "--min_lr", "3e-4",
        "--dtype", "float32",  # bf16 autocast (auto on CPUs with native bf16) rounds each process apart
        "--device", "cpu",  # gloo on CPU processes, also on a machine with GPUs
        "--data", os.path.join(ROOT, "input.txt")]


def train(*args, procs=1, cwd):
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    proc = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_two_processes_with_the_defaults_equal_one_process(tmp_path):
    # --gradient_accumulation_steps 1 (the default) on 2 processes: each takes half the rows
    # of every micro step, so the step's rows, loss and update are those of one process
    one = train(*TINY, "--max_iters", 12, "--eval_interval", 6, "--out_dir", "one", cwd=tmp_path)
    two = train(*TINY, "--max_iters", 12, "--eval_interval", 6, "--out_dir", "two", procs=2, cwd=tmp_path)
    assert "device cpu x 2 processes (gloo), each 1 micro step(s) x 1 rows" in two.stdout
    assert "; 64 tokens per step" in two.stdout  # 2 rows x 32, as one process
    assert "device cpu, float32" in one.stdout
    assert sum(line.startswith("step 12 |") for line in two.stdout.splitlines()) == 1  # rank 0 logs
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * abs(la)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert not any(k.startswith("module.") for k in wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_resume_under_torchrun_is_exact(tmp_path):
    common = [*TINY, "--eval_interval", 5, "--gradient_accumulation_steps", 2]
    train(*common, "--max_iters", 12, "--out_dir", "straight", procs=2, cwd=tmp_path)
    train(*common, "--max_iters", 7, "--out_dir", "split", procs=2, cwd=tmp_path)
    resumed = train("--init_from", "resume", "--max_iters", 12, "--out_dir", "split", procs=2, cwd=tmp_path)
    assert "step 8 |" in resumed.stdout and "step 7 |" not in resumed.stdout
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_step_the_processes_cannot_share_equally_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *TINY, "--gradient_accumulation_steps", "3",
                           "--batch_size", "3", "--out_dir", "x"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode != 0
    assert ("error: 2 processes cannot share a step of --gradient_accumulation_steps 3 x --batch_size 3 rows "
            "equally: make one of the two a multiple of 2") in proc.stderr
    assert proc.stderr.count("error: ") == 1  # one copy, from rank 0


def test_prepared_corpus_trains_and_resumes_exactly(tmp_path):
    # prepare.py's memory-mapped train.bin / val.bin instead of a text file
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(ROOT, "input.txt"), encoding="utf-8").read()[:60000])
    subprocess.run([*command("tools.prepare"), str(corpus), "--out", "prepared",
                    "--val_fraction", "0.2"], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    common = [a if a != os.path.join(ROOT, "input.txt") else "prepared" for a in TINY]
    first = train(*common, "--eval_interval", 4, "--max_iters", 10, "--out_dir", "straight", cwd=tmp_path)
    train_tokens = os.path.getsize(tmp_path / "prepared" / "train.bin") // 2
    assert f"{train_tokens:,} train" in first.stdout
    train(*common, "--eval_interval", 4, "--max_iters", 6, "--out_dir", "split", cwd=tmp_path)
    train("--init_from", "resume", "--max_iters", 10, "--out_dir", "split", cwd=tmp_path)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")

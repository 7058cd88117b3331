"""DistributedDataParallel under torchrun, on CPU with the gloo backend."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import command, need_module
from smolkit.common import ROOT

TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "32", "--batch_size", "2", "--eval_iters", "1", "--sample_tokens", "2", "--log_interval", "1",
        "--learning_rate", "3e-3", "--warmup_iters", "2", "--lr_decay_iters", "12", "--min_lr", "3e-4",
        "--dtype", "float32",  # bf16 autocast (auto on CPUs with native bf16) rounds each process apart
        "--device", "cpu",  # gloo on CPU processes, also on a machine with GPUs
        "--data", os.path.join(ROOT, "input.txt")]


def launch(*args, procs=1, script="train.py"):
    """The argv of train.py (or of tests/faults.py, args then starting with its changes
    and "--"), alone or under torchrun."""
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    return [*launcher, os.path.join(ROOT, script), *map(str, args)]


def train(*args, procs=1, cwd, script="train.py", timeout=300):
    proc = subprocess.run(launch(*args, procs=procs, script=script), capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
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
    need_module("tensorboard", "pip install tensorboard")
    two = train(*TINY, "--max_iters", 12, "--eval_interval", 6, "--out_dir", "two", "--log_to", "tensorboard", procs=2,
                cwd=tmp_path)
    assert "device cpu x 2 processes (gloo), each 1 micro step(s) x 1 rows" in two.stdout
    assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1  # one event file: only rank 0 logs to trackers
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


def events(folder, rank):
    return json.load(open(os.path.join(folder, f"events{rank}.json")))


def test_one_collective_per_step_carries_the_loss_and_the_stop_votes(tmp_path):
    # besides DDP's gradient buckets (its C++ reducer), each step makes one all-reduce: the
    # loss and a vote per stop signal (SIGINT, SIGTERM), 3 numbers; none between the steps,
    # where the stop flag used to take an all-reduce and a wait of its own
    (tmp_path / "rec").mkdir()
    train("record=rec", "--", *TINY, "--max_iters", 5, "--eval_interval", 3, "--gradient_accumulation_steps", 2,
          "--out_dir", "run", procs=2, cwd=tmp_path, script="tests/faults.py")
    for rank in (0, 1):
        assert events(tmp_path / "rec", rank) == ["step", "all_reduce of 3", "end"] * 5 + ["barrier"]


@pytest.mark.timeout(900)
def test_compiled_ddp_trains_as_uncompiled(tmp_path):
    # the DDP module compiled (DDPOptimizer splits its graph at the gradient buckets), with a
    # process's share of the rows at a step (1) and all of them at an evaluation (2): shapes
    # that once failed to compile at the first evaluation. Compiled kernels may round apart
    args = [*TINY, "--max_iters", 4, "--eval_interval", 2]
    train(*args, "--out_dir", "eager", procs=2, cwd=tmp_path)
    compiled = train(*args, "--compile", "true", "--out_dir", "compiled", procs=2, cwd=tmp_path, timeout=800)
    assert "device cpu x 2 processes (gloo), each 1 micro step(s) x 1 rows" in compiled.stdout
    assert "compile True" in compiled.stdout
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * la
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights(tmp_path / "compiled"))


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    # a scheduler may signal one process only: its vote reaches the others in the step's
    # all-reduce, and all of them stop after that step, the checkpoint saved, each with 128 + 15
    (tmp_path / "rec").mkdir()
    steps = [*TINY, "--eval_interval", 1000]
    proc = subprocess.Popen(launch("record=rec", "--", *steps, "--max_iters", 1000, "--out_dir", "stopped",
                                   procs=2, script="tests/faults.py"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, pid = tmp_path / "stopped" / "metrics.jsonl", tmp_path / "rec" / "pid1"
    deadline = time.time() + 120
    while not (pid.exists() and log.exists() and len(log.read_text().splitlines()) >= 5):
        assert time.time() < deadline and proc.poll() is None, "five steps were never logged"
        time.sleep(0.05)
    os.kill(int(pid.read_text()), signal.SIGTERM)  # rank 1; rank 0 saves and logs
    _, err = proc.communicate(timeout=120)
    # torchrun fails: the first process to exit did so with 143, and it stopped the other
    assert proc.returncode != 0 and "exitcode  : 143" in err, err
    assert "SIGTERM: stopped after step" in err and "--init_from resume --out_dir stopped" in err
    stopped_at = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["iter_num"]
    assert 5 <= stopped_at < 1000
    for rank in (0, 1):  # every step of both, and no more
        assert events(tmp_path / "rec", rank).count("end") == stopped_at
    # and the run goes on as if nothing had happened
    train("--init_from", "resume", "--max_iters", stopped_at + 2, "--out_dir", "stopped", procs=2, cwd=tmp_path)
    train(*steps, "--max_iters", stopped_at + 2, "--out_dir", "straight", procs=2, cwd=tmp_path)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


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


def test_preference_tuning_on_two_processes_equals_one_process(tmp_path):
    # each process scores its share of the pairs for the reference and the sum fills the
    # table; each takes half the pairs of every step, so the step is one process's
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Is {i} even?"}],
                                "chosen": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
                                "rejected": [{"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]}) + "\n")
    train(*TINY, "--max_iters", 2, "--eval_interval", 2, "--out_dir", "base", cwd=tmp_path)
    tune = ["--init_from", "base/ckpt.pt", "--data", "prefs.jsonl", "--batch_size", 4, "--max_iters", 4,
            "--learning_rate", "1e-3", "--block_size", 64, "--eval_iters", 1, "--sample_tokens", 2,
            "--dtype", "float32", "--device", "cpu"]
    train(*tune, "--out_dir", "one", cwd=tmp_path)
    two = train(*tune, "--out_dir", "two", procs=2, cwd=tmp_path)
    assert "23 train / 1 val preference pairs" in two.stdout and "each 1 micro step(s) x 2 pairs" in two.stdout
    ref = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["rng"]["data"]["reference"] for d in ("one", "two")]
    torch.testing.assert_close(ref[0], ref[1], atol=1e-5, rtol=1e-5)
    assert (ref[0] != 0).all()  # every pair scored, by one process or the other
    evals = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if "val_loss" in line]
             for d in ("one", "two")]
    for a, b in zip(*evals):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-4), k

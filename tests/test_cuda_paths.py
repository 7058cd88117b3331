"""What a GPU run goes through and a CPU run by default does not, run on a CPU: a checkpoint
saved on a filesystem that cannot fsync a folder (the clusters' Ceph, FUSE, virtiofs),
--quantize int8 asked for on CUDA, the compiled training step (auto on CUDA) with the loss
in pieces (the default on the 24 GB cards), and attention with its k/v heads repeated (T4,
V100). train.py's choices are forced from outside through tests/faults.py."""
import errno
import json
import os
import stat
import subprocess

import pytest
import torch

from conftest import command
from smolkit.checkpoint import save_checkpoint
from smolkit.common import ROOT
from smolkit.quantize import check

TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "32", "--batch_size", "4", "--eval_iters", "1", "--sample_tokens", "2", "--log_interval", "1",
        "--learning_rate", "3e-3", "--warmup_iters", "2", "--lr_decay_iters", "12", "--min_lr", "3e-4",
        "--dtype", "float32",  # what a compiled kernel may round differently is compared below, not bf16's rounding
        "--device", "cpu", "--data", os.path.join(ROOT, "input.txt")]


def run(*args, cwd):
    proc = subprocess.run(command("tests/faults.py", *args), capture_output=True, text=True, cwd=cwd,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {(r["step"], key): r[key] for r in rows for key in ("loss", "val_loss") if key in r}


# ---- the folder's fsync after the rename ----

def fsync_refused_for_folders(monkeypatch, code):
    """os.fsync as on a filesystem that refuses it for a folder with `code`; files sync as usual."""
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF])
def test_a_folder_that_cannot_be_fsynced_still_saves(tmp_path, monkeypatch, code):
    # the checkpoint was fsynced before the rename: the save succeeded, whole
    fsync_refused_for_folders(monkeypatch, code)
    ckpt = {"model": {"w": torch.arange(1000.0)}, "iter_num": 7}
    save_checkpoint(ckpt, str(tmp_path / "ckpt.pt"))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 7 and torch.equal(saved["model"]["w"], ckpt["model"]["w"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left behind


def test_a_folder_fsync_that_fails_otherwise_still_fails(tmp_path, monkeypatch):
    fsync_refused_for_folders(monkeypatch, errno.EIO)  # the disk, not the filesystem's abilities
    with pytest.raises(OSError) as raised:
        save_checkpoint({"iter_num": 7}, str(tmp_path / "ckpt.pt"))
    assert raised.value.errno == errno.EIO


# ---- --quantize int8 on CUDA ----

def test_int8_on_cuda_is_refused_by_the_device_name_alone(monkeypatch):
    # refused before anything is put on a GPU: the probe's tensors would be the first CUDA
    # allocation of sample.py or the server
    ones = torch.ones

    def cpu_only(*args, **kwargs):
        assert "cuda" not in str(kwargs.get("device", "")), "check() allocated on CUDA"
        return ones(*args, **kwargs)
    monkeypatch.setattr(torch, "ones", cpu_only)
    for device in ("cuda", "cuda:1"):
        assert check("int8", device, torch.bfloat16) == (
            f"int8 on CUDA (aten._weight_int8pack_mm, a plain kernel) has not been measured faster than 16-bit "
            f"weights; leave --quantize off on {device}")
    assert check("int8", "cpu", torch.bfloat16) is None  # the CPU's kernel, measured (docs/performance.md)


# ---- the compiled training step, the loss in pieces ----

@pytest.mark.timeout(900)
def test_compiled_step_with_the_loss_in_pieces_trains_as_eager_and_resumes(tmp_path):
    # 4 rows x 32 tokens a step in pieces of 48 rows: 48 + 48 + 32, each recomputed in backward.
    # Compiled kernels may round differently from eager ones, so the losses are close, not equal:
    # within 1e-4 relative over 6 steps of lr 3e-3, where a lost or doubled gradient moves
    # the loss by a hundredth and more
    pieces = ["loss_pieces=48", "--"]
    run(*pieces, *TINY, "--max_iters", 6, "--eval_interval", 4, "--compile", "false", "--out_dir", "eager",
        cwd=tmp_path)
    first = run(*pieces, *TINY, "--max_iters", 4, "--eval_interval", 4, "--compile", "true", "--out_dir", "compiled",
                cwd=tmp_path)
    assert "compile True, the loss in pieces of 48 rows" in first.stdout
    resumed = run(*pieces, "--init_from", "resume", "--max_iters", 6, "--out_dir", "compiled", cwd=tmp_path)
    assert "resuming from" in resumed.stdout and "compile True, the loss in pieces of 48 rows" in resumed.stdout
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 6 + 2
    for key, loss in eager.items():
        assert abs(compiled[key] - loss) <= 1e-4 * loss, (key, loss, compiled[key])
    saved = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 6 and not any(k.startswith(("_orig_mod.", "module.")) for k in saved["model"])


# ---- attention with the k/v heads repeated (train.py on a T4 or a V100) ----

def test_repeated_kv_heads_train_as_grouped_ones(tmp_path):
    # the same sums as SDPA's grouped heads, in another order: close, not bit-equal
    run("--", *TINY, "--max_iters", 4, "--eval_interval", 4, "--out_dir", "grouped", cwd=tmp_path)
    run("expand_kv=1", "--", *TINY, "--max_iters", 4, "--eval_interval", 4, "--out_dir", "repeated", cwd=tmp_path)
    grouped, repeated = losses(tmp_path / "grouped"), losses(tmp_path / "repeated")
    assert grouped.keys() == repeated.keys()
    for key, loss in grouped.items():
        assert abs(repeated[key] - loss) <= 1e-5 * loss, (key, loss, repeated[key])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("grouped", "repeated"))
    assert a.keys() == b.keys()

"""bench.py runs end to end on a CPU (figures themselves are not asserted: speed is
measured by running the benchmark, never by a timed test)."""
import json
import os
import subprocess
import sys

import torch

from smol import HERE, SmolConfig, SmolLM


def test_bench_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--steps", "1", "--warmup", "0",
                           "--batch_size", "1", "--block_size", "32", "--new_tokens", "4", "--gen_batches", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.load(open(out))
    assert {"device", "torch", "train_shape"} <= report["info"].keys()
    rows = {r["what"] for r in report["results"]}
    assert "train smol" in rows and any(r.startswith("generate smol") for r in rows)
    if "transformers" in report["info"]:
        assert "train transformers (eager)" in rows and "ratios" in proc.stdout
    assert all(r["tok_s"] > 0 for r in report["results"])


def test_bf16_paths_match_fp32_to_bf16_tolerance():
    torch.manual_seed(0)
    model = SmolLM(SmolConfig(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=256,
                              vocab_size=2000, block_size=64)).eval()
    x = torch.randint(0, 2000, (2, 64))
    y = torch.randint(0, 2000, (2, 64))
    with torch.no_grad():
        ref = model(x, y)[1].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py's bf16 autocast path
            amp = model(x, y)[1].item()
        bf16 = model.to(torch.bfloat16)(x, y)[1].item()  # sample.py's bf16 weights
    assert abs(amp - ref) / ref < 1e-2 and abs(bf16 - ref) / ref < 1e-2, (ref, amp, bf16)

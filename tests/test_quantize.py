"""Weight-only int8 (quantize.py): its loss against fp32 on a trained model, that no
float copy of a matrix is left, and sample.py and serve.py --quantize int8 end to end."""
import os
import subprocess
import sys

import httpx
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import HERE
from conftest import Server, trained_tiny_model
from engine import Decoder
from quantize import Int8Embedding, Int8Linear, check_int8, quantize_int8, quantize_rows


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int8_says_in_one_line_where_its_kernel_does_not_run():
    assert check_int8("cpu", torch.float32) is None
    reason = check_int8("cpu", torch.float64)  # the kernel takes 16- and 32-bit floats only
    assert reason.startswith("the int8 weight-only matmul does not run on cpu in torch.float64 (")
    assert "\n" not in reason


def test_int8_loss_within_one_percent_of_fp32_and_no_float_matrix_left():
    model, x, y = trained_tiny_model()

    def held_out_loss():  # through the logits, as decoding sees them (the training loss reads lm_head.weight)
        return F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    with torch.no_grad():
        ref = held_out_loss()
        quantize_int8(model)
        int8 = held_out_loss()
    assert abs(int8 - ref) / ref < 1e-2, (ref, int8)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    floats = [(n, t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.is_floating_point() and t.dim() > 1 and not n.startswith("rope_")]
    assert floats == [], floats  # norms and scales are 1-D; the RoPE tables are not weights
    assert model.lm_head.q is model.model.embed_tokens.q  # the tied matrix: one int8 copy
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    # decoding runs through it: the fast decoder and smol.py's plain loop agree
    prompt = x[:2, :8]
    assert torch.equal(Decoder(model).generate(prompt, 12, temperature=0), model.generate(prompt, 12, temperature=0))


def test_sample_py_quantize_int8(chat_model):
    args = ["--init_from", str(chat_model["hf"]), "--dtype", "float32", "--temperature", "0", "--chat"]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args, "--quantize", "int8"],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Paris.\n"  # the tiny chat model's answer survives int8


def test_serve_py_quantize_int8(chat_model):
    server = Server("--init_from", chat_model["hf"], "--dtype", "float32", "--quantize", "int8")
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris."
    finally:
        server.stop()

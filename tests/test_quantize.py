"""Weight-only int8 and int4 (quantize.py): their loss against fp32 on a trained model,
that no float copy of a matrix is left, and sample.py and serve.py --quantize end to end."""
import subprocess

import httpx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import Server, command, on_cpu, trained_tiny_model
from smolkit.common import ROOT
from smolkit.decoding import Decoder
from smolkit.quantize import (GROUP, Int4Linear, Int8Embedding, Int8Linear, check, quantize, quantize_groups,
                              quantize_rows)


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_groups_round_trip_within_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None] + torch.linspace(-1, 1, 64)  # ranges and offsets
    codes, scales_and_zeros = quantize_groups(w)
    assert codes.dtype == torch.int32 and 0 <= codes.min() and codes.max() <= 15
    assert scales_and_zeros.shape == (64 // GROUP, 48, 2)
    scale, zero = (scales_and_zeros[..., i].t().repeat_interleave(GROUP, dim=1) for i in (0, 1))  # (48, 64) each
    assert ((codes - 8) * scale + zero - w).abs().le(scale / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_multiplies_by_its_dequantised_matrix(dtype):
    w, x = torch.randn(48, 64), torch.randn(2, 3, 64)
    codes, scales_and_zeros = quantize_groups(w)
    scale, zero = (scales_and_zeros[..., i].t().repeat_interleave(GROUP, dim=1) for i in (0, 1))
    dequantised = (codes - 8) * scale + zero  # (48, 64)
    layer = Int4Linear(w, dtype)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == w.numel() // 2  # two codes a byte
    y = layer(x.to(dtype))
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(y.float(), x.to(dtype).float() @ dequantised.t(), atol=tolerance, rtol=tolerance)


def test_quantize_says_in_one_line_where_its_kernel_does_not_run():
    assert check("int8", "cpu", torch.float32) is None and check("int4", "cpu", torch.bfloat16) is None
    for kind in ("int8", "int4"):
        reason = check(kind, "cpu", torch.float64)  # the kernels take 16- and 32-bit floats only
        assert reason.startswith(f"the {kind} weight-only matmul does not run on cpu in torch.float64 ("), reason
        assert "\n" not in reason
    assert check("int4", "cuda", torch.bfloat16) == \
        "int4 runs on a CPU only (aten._weight_int4pack_mm_for_cpu), not on cuda"
    with pytest.raises(ValueError, match="int4 needs every matrix's inputs divisible by 32 and outputs by 16; "
                                         "this model has a 24 x 48 one"):
        Int4Linear(torch.randn(24, 48), torch.float32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_loss_within_one_percent_of_fp32_and_no_float_matrix_left(kind):
    model, x, y = trained_tiny_model()
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())

    def held_out_loss():  # through the logits, as decoding sees them (the training loss reads lm_head.weight)
        return F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    with torch.no_grad():
        ref = held_out_loss()
        quantize(model, kind)
        quantized = held_out_loss()
    assert abs(quantized - ref) / ref < 1e-2, (ref, quantized)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    floats = [(n, t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.is_floating_point() and t.dim() > 1 and not n.startswith("rope_")
              and not n.endswith("scales_and_zeros")]  # int4's (in/32, out, 2): two numbers per 32 weights
    assert floats == [], floats  # norms and scales are 1-D; the RoPE tables are not weights
    stored = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if not n.startswith("rope_"))
    assert stored < fp32_bytes / 3, (stored, fp32_bytes)  # int8 a quarter of fp32 (int4 less), plus scales
    # the tied matrix: one int8 copy, the embedding's and the head's (a 4-bit head loses too much)
    assert model.lm_head.q is model.model.embed_tokens.q
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    linear = Int8Linear if kind == "int8" else Int4Linear
    for b in model.model.layers:  # the layers that read one input are one matrix; the others their own
        assert b.self_attn.q_proj.shared is b.self_attn.v_proj.shared and b.mlp.gate_proj.shared is b.mlp.up_proj.shared
        assert isinstance(b.self_attn.q_proj.shared.layer, linear) and isinstance(b.mlp.down_proj, linear)
    # decoding runs through it: the fast decoder and smol.py's plain loop agree
    prompt = x[:2, :8]
    assert torch.equal(Decoder(model).generate(prompt, 12, temperature=0), model.generate(prompt, 12, temperature=0))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_one_matrix_for_the_layers_that_share_an_input_gives_the_same_logits(monkeypatch, kind):
    import copy

    from smolkit import quantize as q
    model, x, _ = trained_tiny_model()
    fused = q.quantize(copy.deepcopy(model), kind)
    monkeypatch.setattr(q, "GROUPS", [(p, (name,)) for p, names in q.GROUPS for name in names])  # one matrix each
    apart = q.quantize(model, kind)
    assert isinstance(apart.model.layers[0].self_attn.k_proj, (Int8Linear, Int4Linear))
    with torch.no_grad():
        torch.testing.assert_close(fused(x[:4])[0], apart(x[:4])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sample_py_quantize(chat_model, kind):
    args = ["--init_from", str(chat_model["hf"]), "--dtype", "float32", "--temperature", "0", "--chat"]
    proc = subprocess.run([*command("sample.py"), *on_cpu(args), "--quantize", kind],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Paris.\n"  # the tiny chat model's answer survives quantisation


def test_a_model_int4_cannot_pack_is_one_line(tmp_path):
    from smol import SmolConfig, SmolLM
    from smolkit.hf import save_pretrained
    save_pretrained(SmolLM(SmolConfig(n_layer=1, n_embd=48, n_head=4, n_kv_head=2, intermediate_size=96)), tmp_path)
    proc = subprocess.run([*command("sample.py"), "--init_from", str(tmp_path),
                           "--quantize", "int4", "--max_new_tokens", "2", "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --quantize int4: int4 needs every matrix's inputs divisible by 32 and outputs by 16; "
        "this model has a 48 x 48 one"], proc.stderr


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_serve_py_quantize(chat_model, kind):
    server = Server("--init_from", chat_model["hf"], "--dtype", "float32", "--quantize", kind)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris."
    finally:
        out = server.stop()
    # the banner counts the model's parameters, not the few float ones quantisation leaves
    from smolkit.hf import from_pretrained

    # and says the device and the activations' dtype, and why that dtype
    assert f", {from_pretrained(str(chat_model['hf'])).num_params():,} parameters, cpu, float32: --dtype)" in out, out

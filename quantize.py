"""
Weight-only int8 for decoding: every linear layer's weight, and the tied embedding /
output head, stored as int8 with one scale per output channel (per row), and multiplied
through PyTorch's int8 weight-only kernel (aten._weight_int8pack_mm), which reads a
quarter of fp32's bytes. Decoding at batch 1 reads every weight once per token, so
bytes are its pace. Activations, norms, the KV cache and the softmax stay in the
model's dtype. smol.py's classes are untouched: quantize_int8 swaps modules in place,
as gpt-fast's quantize.py does.

    model = quantize_int8(model.eval())   # then generate / Decoder / Batcher as usual
    python sample.py --init_from DIR --quantize int8
"""
import torch
import torch.nn as nn


def quantize_rows(w):
    """(out, in) float -> (int8 (out, in), scale (out,)): symmetric, w ~= q * scale[:, None]."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T, never materialising the float weight."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the activations' dtype

    def forward(self, x):
        shape = x.shape  # (..., in)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.q, self.scale)
        return y.view(*shape[:-1], -1)


class Int8Embedding(nn.Module):
    """The tied (V, C) matrix as an embedding: rows looked up in int8, then scaled."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, idx):
        return self.q[idx].to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)  # (..., C)


def check_int8(device, dtype):
    """A one-line reason why int8 decoding cannot run here, or None."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"this torch ({torch.__version__}) has no int8 weight-only matmul (aten._weight_int8pack_mm)"
    try:
        x, q = torch.ones(1, 32, device=device, dtype=dtype), torch.ones(8, 32, device=device, dtype=torch.int8)
        torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as e:
        return f"the int8 weight-only matmul does not run on {device} in {dtype} ({str(e).splitlines()[0]})"
    return None


@torch.no_grad()
def quantize_int8(model):
    """Swap model's linear layers and tied embedding for int8 ones, in place; returns
    model. The float weights are dropped, not kept beside the int8 ones."""
    for block in model.model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, Int8Linear(*quantize_rows(getattr(parent, name).weight)))
    q, scale = quantize_rows(model.model.embed_tokens.weight)  # per row: per output channel of the tied head
    model.model.embed_tokens, model.lm_head = Int8Embedding(q, scale), Int8Linear(q, scale)  # one int8 copy, shared
    return model

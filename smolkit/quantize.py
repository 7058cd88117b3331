"""
Weight-only quantisation for decoding. Decoding at batch 1 reads every weight once per
token, so bytes are its pace; activations, norms, the KV cache and the softmax stay in
the model's dtype. smol.py's classes are untouched: quantize() swaps modules in place,
as gpt-fast's quantize.py does.

int8: every linear layer's weight, and the tied embedding / output head, as int8 with
one scale per output channel (per row), multiplied through PyTorch's int8 weight-only
kernel (aten._weight_int8pack_mm): a quarter of fp32's bytes. Not on CUDA (check()):
there the kernel is a plain one, not measured faster than 16-bit weights.

int4 (CPU): each group of 32 inputs of a row as 4-bit codes with its own scale and
offset (the layout of llama.cpp's Q4_1), multiplied through aten._weight_int4pack_mm_for_cpu:
an eighth of fp32's bytes, plus two scales per group. The tied embedding / head stays
int8 (a 4-bit head costs the instruct model its right answers; docs/performance.md).

    model = quantize(model.eval(), "int8")   # then generate / Decoder / Batcher as usual
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
        self.in_features = q.size(1)  # as nn.Linear's

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


GROUP = 32  # int4: inputs per scale and offset, as llama.cpp's Q4_0/Q4_1 blocks


def quantize_groups(w, group=GROUP):
    """(out, in) float -> (codes (out, in) int32 in 0..15, scales_and_zeros (in/group, out, 2)):
    each group's range [lo, hi] in 16 even steps, w ~= (code - 8) * scale + zero with
    zero = lo + 8 * scale (the convention of PyTorch's int4 kernel)."""
    out, inp = w.shape
    wg = w.float().reshape(out, inp // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)  # (out, in/group, 1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).reshape(out, inp)
    return codes, torch.cat((scale, lo + 8 * scale), dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """y = x @ W.T with W in packed 4-bit codes, two to a byte, and a scale and zero per group."""

    def __init__(self, w, dtype):
        super().__init__()
        self.check_shape(w)
        codes, scales_and_zeros = quantize_groups(w)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))  # (out, in/2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype))  # (in/32, out, 2)
        self.in_features = w.size(1)  # as nn.Linear's

    @staticmethod
    def check_shape(w):
        if w.size(1) % GROUP or w.size(0) % 16:  # the packed kernel's tiles
            raise ValueError(f"int4 needs every matrix's inputs divisible by {GROUP} and outputs by 16; "
                             f"this model has a {w.size(0)} x {w.size(1)} one")

    def forward(self, x):
        shape = x.shape  # (..., in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.packed, GROUP,
                                                       self.scales_and_zeros)
        return y.view(*shape[:-1], -1)


def check(kind, device, dtype):
    """A one-line reason why `kind` ("int8" or "int4") decoding cannot run here, or None."""
    op = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[kind]
    if not hasattr(torch.ops.aten, op):
        return f"this torch ({torch.__version__}) has no {kind} weight-only matmul (aten.{op})"
    if kind == "int4" and torch.device(device).type != "cpu":
        return f"int4 runs on a CPU only (aten.{op}), not on {device}"
    # by the device's name, before the probe below puts anything on the GPU: on CUDA the int8
    # matmul is a plain kernel, and no GPU has measured it against 16-bit weights yet
    if kind == "int8" and torch.device(device).type == "cuda":
        return (f"int8 on CUDA (aten.{op}, a plain kernel) has not been measured faster than 16-bit weights; "
                f"leave --quantize off on {device}")
    try:
        x = torch.ones(1, 64, device=device, dtype=dtype)
        if kind == "int8":
            torch.ops.aten._weight_int8pack_mm(x, torch.ones(16, 64, device=device, dtype=torch.int8),
                                               torch.ones(16, device=device, dtype=dtype))
        else:
            Int4Linear(torch.ones(16, 64), dtype)(x)
    except (RuntimeError, NotImplementedError) as e:
        return f"the {kind} weight-only matmul does not run on {device} in {dtype} ({str(e).splitlines()[0]})"
    return None


class SharedInput(nn.Module):
    """Linear layers that read the same input (q, k and v; gate and up) as one quantised
    matrix: one product per step instead of two or three, which streams the weights better
    and makes fewer calls (bench/NOTES.md, entry 19). A Part stands in each layer's place.
    smol.py calls them one after another on the same input: the first computes the whole
    product, each returns its own columns, the last lets it go, so nothing is kept
    between steps (a part called on another input computes the product again)."""

    def __init__(self, layer, sizes):
        super().__init__()
        self.layer, self.sizes = layer, sizes
        self.input = self.outputs = None

    def part(self, i, x):
        if self.outputs is None or self.input is not x:
            self.input, self.outputs = x, self.layer(x).split(self.sizes, dim=-1)
        y = self.outputs[i]
        if i == len(self.sizes) - 1:
            self.input = self.outputs = None
        return y


class Part(nn.Module):
    def __init__(self, shared, i):
        super().__init__()
        self.shared, self.i = shared, i

    def forward(self, x):
        return self.shared.part(self.i, x)


# the linear layers of a block, by the input they read: a group of several becomes one matrix
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


@torch.no_grad()
def quantize(model, kind):
    """Swap model's linear layers and tied embedding for `kind` ones ("int8" or "int4"), in
    place; returns model. The layers that share an input become one matrix (SharedInput).
    The float weights are dropped, not kept beside the quantised ones. ValueError for a
    shape int4 cannot pack."""
    dtype = model.model.norm.weight.dtype  # the activations'
    for block in model.model.layers:
        for parent_name, names in GROUPS:
            parent = getattr(block, parent_name)
            weights = [getattr(parent, name).weight for name in names]
            for w in weights if kind == "int4" else ():
                Int4Linear.check_shape(w)  # each matrix of the model, as the user knows them
            w = torch.cat(weights)  # (sum of outputs, in)
            layer = Int8Linear(*quantize_rows(w)) if kind == "int8" else Int4Linear(w, dtype)
            if len(names) == 1:
                setattr(parent, names[0], layer)
                continue
            shared = SharedInput(layer, [w.size(0) for w in weights])
            for i, name in enumerate(names):
                setattr(parent, name, Part(shared, i))
    # the tied matrix stays int8 under int4 too: as a 4-bit head it turned the instruct
    # model's "Paris." into "L'Étoile (The Lion) is the capital of France."
    q, scale = quantize_rows(model.model.embed_tokens.weight)  # per row: per output channel of the head
    model.model.embed_tokens, model.lm_head = Int8Embedding(q, scale), Int8Linear(q, scale)  # one copy, shared
    return model

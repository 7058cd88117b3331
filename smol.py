"""
SmolLM2 in one file: a Llama-style decoder-only transformer, rebuilt from the
public config.json and weights of HuggingFaceTB/SmolLM2-135M.

What config.json says, and where it lands in this file:
    architectures LlamaForCausalLM -> pre-norm decoder blocks, no biases, no dropout
    rms_norm_eps 1e-5              -> RMSNorm (no mean subtraction, no bias)
    rope_theta 100000              -> rotary position embeddings, HF "rotate_half" layout
    num_key_value_heads 3 of 9     -> grouped-query attention: 3 query heads share each k/v head
    hidden_act silu, 1536          -> SwiGLU MLP: down(silu(gate(x)) * up(x))
    tie_word_embeddings true       -> the output head reuses the token embedding matrix

References:
    Llama: https://arxiv.org/abs/2302.13971   GQA: https://arxiv.org/abs/2305.13245
    RoPE: https://arxiv.org/abs/2104.09864     SwiGLU: https://arxiv.org/abs/2002.05202
    SmolLM2: https://arxiv.org/abs/2502.02737
Shape letters: B batch, T time (sequence), C channels (n_embd), V vocab,
nh query heads, nkv key/value heads, hd head_dim.

This file is the model and nothing else: train.py trains it, smolkit/decoding.py
decodes it fast, smolkit/hf.py moves its weights to and from the official checkpoints.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

EOT_ID = 0  # <|endoftext|>: separates documents; where base models stop
IM_END_ID = 2  # <|im_end|>: ends a turn of a ChatML conversation; where instruct models stop


@dataclass
class SmolConfig:
    # defaults are SmolLM2-135M's config.json
    vocab_size: int = 49152
    n_layer: int = 30                 # num_hidden_layers
    n_head: int = 9                   # num_attention_heads
    n_kv_head: int = 3                # num_key_value_heads
    n_embd: int = 576                 # hidden_size
    intermediate_size: int = 1536     # width of the SwiGLU MLP
    block_size: int = 2048            # context used in training (pretraining ran at 2048)
    max_position_embeddings: int = 8192  # longest sequence the RoPE tables cover
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    init_std: float = 0.041666666666666664  # 1/sqrt(576), the official recipe

    @property
    def head_dim(self):
        return self.n_embd // self.n_head  # 64 for every SmolLM2 size

    def validate(self):
        """Raise ValueError with a one-line reason if the shapes cannot work."""
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "intermediate_size", "block_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd / n_head = {self.head_dim} must be even for RoPE")
        if self.block_size > self.max_position_embeddings:
            raise ValueError(f"block_size ({self.block_size}) exceeds max_position_embeddings "
                             f"({self.max_position_embeddings})")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be positive")
        return self


PRESETS = {  # the three SmolLM2 sizes, from their config.json files
    "SmolLM2-135M": SmolConfig(),
    "SmolLM2-360M": SmolConfig(n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
                               init_std=0.02),
    "SmolLM2-1.7B": SmolConfig(n_layer=24, n_head=32, n_kv_head=32, n_embd=2048, intermediate_size=8192,
                               rope_theta=130000.0, init_std=0.02),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Computed in fp32 and cast back, so bf16 activations
    do not lose precision in the mean of squares (as the reference does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# -----------------------------------------------------------------------------
# Rotary position embeddings. Each head's 64 channels are split into two halves
# (x1 = first 32, x2 = last 32) that rotate as pairs (x1[i], x2[i]) by the angle
# pos * theta^(-2i/hd). This "rotate_half" layout is what the official weights
# were trained with; the interleaved-pairs layout of the Llama paper would give
# different logits on the same weights.

def rope_tables(head_dim, max_len, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (max_len, hd): same angle for both halves
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, n, T, hd); cos, sin: (T, hd) for positions 0..T-1, or (B, 1, T, hd), each row its own
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # "rotate_half"
    return x * cos + rotated * sin


class KVCache:
    """The keys and values of the positions seen so far: a pair of tensors per layer, each
    (B, nkv, max_len, hd), allocated once and written at the positions the forward pass is
    given. Kept apart from the model; may be a view of a bigger cache's first slots."""

    def __init__(self, k, v):
        self.k, self.v = k, v  # n_layer tensors each, (B, nkv, max_len, hd)

    @classmethod
    def zeros(cls, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        return cls(*([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)] for _ in "kv"))

    @property
    def max_len(self):
        return self.k[0].size(2)

    def update(self, layer, input_pos, k, v):
        # k, v: (B, nkv, T, hd) of the tokens at positions input_pos (B, T): row b's token t goes
        # to slot input_pos[b, t]. Returns the layer's whole cache, (B, nkv, max_len, hd)
        k_all, v_all = self.k[layer], self.v[layer]
        rows = torch.arange(k.size(0), device=k.device).view(-1, 1)  # (B, 1), broadcast against (B, T)
        k_all[rows, :, input_pos] = k.transpose(1, 2).to(k_all.dtype)  # (B, T, nkv, hd); autocast may give bf16
        v_all[rows, :, input_pos] = v.transpose(1, 2).to(v_all.dtype)
        return k_all, v_all


class Attention(nn.Module):
    expand_kv = False  # SmolLM.expand_kv sets it for every layer

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, hd = config.n_embd, config.head_dim
        self.q_proj = nn.Linear(C, config.n_head * hd, bias=False)
        # grouped-query attention: fewer key/value heads than query heads (3 vs 9),
        # which shrinks the KV cache threefold at almost no cost in quality
        self.k_proj = nn.Linear(C, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(C, config.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, C, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, input_pos=None, mask=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:
            # training, scoring: the plain causal triangle, or packed_mask's for packed rows (a
            # tensor for SDPA, or flex attention's BlockMask). enable_gqa lets SDPA broadcast each
            # k/v head over its group of query heads without materialising repeated copies; only
            # its flash kernel takes grouped heads, and that needs a GPU of compute capability 8.0,
            # so for older ones (expand_kv) the k/v heads are repeated, (B, nh, T, hd), for the
            # memory-efficient kernel rather than leaving the math kernel its fp32 (T, T) scores
            if self.expand_kv:
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            gqa = k.size(1) != self.n_head
            if isinstance(mask, BlockMask):
                y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        else:
            # generating: the new keys and values go into the cache at their positions, and the
            # queries attend over all of its slots under the mask, which lets each see the slots
            # up to its own position, never later ones (empty, or stale from an earlier use).
            # The query heads of a group read the same k/v head, so they go in as the rows of
            # one head, (B, nkv, g*T, hd): the same sums as enable_gqa, but each k/v head is
            # read once, not g times (a CPU's bf16 kernel ran 6x faster so, bench/NOTES.md)
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v)  # (B, nkv, max_len, hd)
            q = q.reshape(B, self.n_kv_head, -1, self.head_dim)  # (B, nkv, g*T, hd), row i*T + t: head i of the group
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, g*T, max_len)
        y = y.reshape(B, self.n_head, T, self.head_dim)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated linear unit. gate and up both widen C -> 1536, their
    product is projected back down."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: normalise, transform, add back."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, input_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, input_pos, mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class SmolLM(nn.Module):
    """
    Parameters are named exactly as in the official checkpoints, so their
    state dicts load with no renaming table:
        model.embed_tokens.weight                      (V, C)     normal(0, init_std)
        model.layers.{i}.input_layernorm.weight        (C,)       ones
        model.layers.{i}.self_attn.q_proj.weight       (nh*hd, C) normal(0, init_std)
        model.layers.{i}.self_attn.{k,v}_proj.weight   (nkv*hd, C) normal(0, init_std)
        model.layers.{i}.self_attn.o_proj.weight       (C, nh*hd) normal(0, init_std)
        model.layers.{i}.post_attention_layernorm.weight (C,)     ones
        model.layers.{i}.mlp.{gate,up}_proj.weight     (I, C)     normal(0, init_std)
        model.layers.{i}.mlp.down_proj.weight          (C, I)     normal(0, init_std)
        model.norm.weight                              (C,)       ones
        lm_head.weight                                 = model.embed_tokens.weight (tied)
    One std for every matrix is the official recipe (nanotron, std 1/sqrt(576));
    we keep it rather than GPT-2's scaled-down output projections.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        self.model = nn.Module()  # a plain container, only so names read "model.layers.0..."
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.model.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: one (V, C) matrix, counted once
        # fp32 tables, not saved in checkpoints (persistent=False): they are a pure
        # function of the config and would only bloat the files
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # the ids that end a generation: <|endoftext|> for models trained here; a Hugging Face
        # checkpoint names its own (the instruct models end their turn with <|im_end|>)
        self.eos_token_ids = (EOT_ID,)
        # the training loss in pieces of this many rows (None: the plain loss, all the logits
        # at once); train.py sets it where a device could not hold all the logits
        self.loss_rows_per_piece = None
        # packed rows through flex attention (no T x T mask; CUDA, compiled) or a dense mask
        self.flex_attention = False

    @property
    def expand_kv(self):
        return self.model.layers[0].self_attn.expand_kv

    @expand_kv.setter
    def expand_kv(self, value):
        # attention without a cache repeats the k/v heads instead of grouping them (see
        # Attention); train.py sets it for GPUs older than compute capability 8.0
        for block in self.model.layers:
            block.self_attn.expand_kv = value

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied matrix once

    def forward(self, idx, targets=None, kv_cache=None, input_pos=None, last_only=False):
        # idx: (B, T) token ids; targets: (B, T) next-token ids, -1 = ignore.
        # Returns (logits (B, T, V), None), or with targets (None, loss): training
        # never needs all the logits at once, and they are the largest tensors of a step.
        # kv_cache: generating. input_pos (B, T) is where each token stands, each row its own
        # (default 0..T-1: a prompt into an empty cache); the same call reads a prompt and,
        # one token per row at a time, decodes after it; without a cache, packed rows (packed_mask).
        # last_only: logits (B, 1, V) of the last position, all a prompt needs (an 8,190-token
        # prompt's would be 1.6 GB in fp32)
        B, T = idx.size()
        packed = kv_cache is None and input_pos is not None
        if input_pos is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                                 f"({self.config.max_position_embeddings})")
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd)
        else:
            cos, sin = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)  # (B, 1, T, hd)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # in the activations' dtype, as the reference
        mask = None
        if kv_cache is not None:  # query (b, t) sees the cache slots 0..input_pos[b, t]
            mask = torch.arange(kv_cache.max_len, device=idx.device) <= input_pos.unsqueeze(-1)  # (B, T, max_len)
            g = self.config.n_head // self.config.n_kv_head  # query heads per k/v head (see Attention)
            mask = mask.unsqueeze(1).repeat(1, 1, g, 1)  # (B, 1, g*T, max_len)
        elif packed:
            mask = packed_mask(input_pos, self.flex_attention)
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache, input_pos, mask)
        x = self.model.norm(x)
        if targets is not None:
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                               self.loss_rows_per_piece)
        return self.lm_head(x[:, -1:] if last_only else x), None  # (B, T, V) or (B, 1, V)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the 2-D matrices (embedding and projections), never the norm gains
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        assert len(decay) + len(no_decay) == len(params), "every parameter must be in exactly one group"
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel does the whole update in a few launches on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8,
                                 fused=device_type == "cuda")

    def flops_per_token(self, T):
        # PaLM appendix B: 6 FLOPs per parameter per token (forward + backward)
        # plus attention's 12 * n_layer * C * T (score and value matmuls)
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    @torch.inference_mode()  # like no_grad, and also skips autograd's version bookkeeping
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """Return idx (B, T) extended by sampled tokens: (B, T + new), new <= max_new_tokens.
        The plain loop, to read: the prompt goes through once into a KV cache (prefill),
        then each new token alone at the next position, attending to the cached keys and
        values. A row that samples one of stop_ids is finished and is padded with that id
        while the other rows go on; the loop ends early when every row is done.
        temperature 0 is greedy. smolkit/decoding.py runs the same loop faster."""
        B, T = idx.size()
        if T + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        # the activations' dtype: the final norm's weight has it even when smolkit/quantize.py made the matrices int8
        cache = KVCache.zeros(self.config, B, T + max_new_tokens, idx.device, self.model.norm.weight.dtype)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=idx.device)  # (S,)
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)  # rows that have stopped
        logits = self(idx, kv_cache=cache, last_only=True)[0][:, -1]  # (B, V): the prompt's last position
        for pos in range(T, T + max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            token = torch.where(done, idx[:, -1:], token)  # a finished row repeats its stop id
            done = done | torch.isin(token, stop)
            idx = torch.cat([idx, token], dim=1)
            if pos == T + max_new_tokens - 1 or bool(done.all()):
                break  # the last token needs no logits of its own
            input_pos = torch.full((B, 1), pos, device=idx.device)  # (B, 1): every row at the same place
            logits = self(token, kv_cache=cache, input_pos=input_pos)[0][:, -1]  # (B, V)
        return idx


def packed_mask(input_pos, flex=False):
    """The mask of packed rows (drawn in docs/training.md), input_pos (B, T) counting from 0 at
    each sequence's start: query t sees key s when s <= t within the same sequence. flex False:
    (B, 1, T, T) booleans for SDPA; True: flex attention's BlockMask, which keeps only which
    128 x 128 tiles are empty, full or partial, never a T x T tensor."""
    seq = (input_pos == 0).cumsum(1)  # (B, T): which sequence of its row each token is in

    def same_sequence_causal(b, h, q, k):
        return (seq[b, q] == seq[b, k]) & (k <= q)
    B, T = input_pos.shape
    if flex:
        return create_block_mask(same_sequence_causal, B, None, T, T, device=input_pos.device)
    t = torch.arange(T, device=input_pos.device)
    return same_sequence_causal(torch.arange(B, device=t.device).view(B, 1, 1), None, t.view(1, T, 1),
                                t.view(1, 1, T)).unsqueeze(1)


def chunked_cross_entropy(x, weight, targets, rows=None):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1 = ignore).
    rows None: the plain loss, all (N, V) logits at once. Else the rows go through in
    pieces of `rows`, and each piece's logits are recomputed in the backward pass instead
    of kept (activation checkpointing): one piece's logits exist at a time, for one extra
    matmul of the head. At 16 x 2048 tokens the logits are (32768, 49152), 6.4 GB in fp32
    and as much again for their gradient: train.py takes pieces where they would not fit.
    x: (N, C) final features, weight: (V, C) the tied head, targets: (N,)"""
    if rows is None or x.size(0) <= rows:  # one piece: nothing to save, so no recompute either
        total = _cross_entropy_sum(x, weight, targets)
    else:
        total = sum(checkpoint(_cross_entropy_sum, x_part, weight, t_part, use_reentrant=False)
                    for x_part, t_part in zip(x.split(rows), targets.split(rows)))
    return total / (targets != -1).sum().clamp(min=1)  # a batch without targets: 0, not 0/0


def _cross_entropy_sum(x, weight, targets):
    logits = F.linear(x, weight).float()  # (n, V): the loss in fp32 even under bf16 autocast
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, uniform=None):
    """Token ids (B, 1) drawn from logits (B, V) at `temperature` (0: greedy), among the
    top_k likeliest tokens, then among the fewest of those whose probability reaches top_p
    (the nucleus). Each setting is one number for every row, or a (B,) CPU tensor with each
    row's own (server/batcher.py samples a whole batch in one call); top_k 0 or None and
    top_p 1 or None filter nothing. The settings size the work on the host and reach the
    device in one copy (with a host `uniform`): the draw's only one.

    The draw is an inverse CDF: one number u per row, uniform in [0, 1) (`uniform` (B, 1),
    else drawn from generator), picks the first token whose cumulative probability passes
    u. So a row's token depends on its own logits, settings and u only, whatever else is
    in the batch, and a draw costs one random number, not one per vocabulary entry.
    A row whose logits hold inf or NaN (activations that overflowed fp16) gets the id -1."""
    B, V = logits.shape
    logits = logits.float()  # the draw in fp32 (and argmax over bf16 ran 5x slower on a CPU)
    overflowed = ~logits.isfinite().all(dim=-1, keepdim=True)  # (B, 1)
    greedy = logits.argmax(dim=-1, keepdim=True).masked_fill(overflowed, -1)  # (B, 1)
    t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)  # (B or 1, 1), on the host
    if not t.any():
        return greedy
    k = torch.as_tensor(0 if top_k is None else top_k, dtype=torch.float32).reshape(-1, 1)
    k = k.where((k > 0) & (k < V), V)  # V: every token
    p = torch.as_tensor(1.0 if top_p is None else top_p, dtype=torch.float32).reshape(-1, 1)
    host = [t, k, p] + ([uniform.float()] if uniform is not None and uniform.device.type == "cpu" else [])
    on_device = torch.cat([x.expand(B, 1) for x in host], dim=1).to(logits.device)  # (B, 3 or 4): the one copy
    temperature, top_k, top_p = on_device[:, :3].split(1, dim=1)  # (B, 1) each
    u = on_device[:, 3:] if len(host) == 4 else uniform if uniform is not None else \
        torch.rand(B, 1, generator=generator, device=logits.device)
    logits = logits / temperature.clamp(min=1e-6)  # greedy rows are picked at the end
    filtered = (k < V) | (p < 1)  # (B or 1, 1), host: the rows that drop tokens
    if filtered.any():
        # sort the likeliest tokens (all of them if a row has top_p but no top_k), drop the
        # ranks each row does not keep, and mask in the logits what is less likely than the
        # last one kept. The host's copy of the settings sizes the sort: no device sync
        n = V if (filtered & (k == V)).any() else int(k[k < V].max())
        values = torch.topk(logits, n).values  # (B, n), descending
        values = values.masked_fill(torch.arange(n, device=logits.device) >= top_k, float("-inf"))
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the likelier tokens
        values = values.masked_fill((before >= top_p) & (top_p < 1), float("-inf"))
        kept = values.isfinite().sum(dim=-1, keepdim=True)  # (B, 1), 0 only in a row that overflowed
        floor = values.gather(-1, (kept - 1).clamp(min=0))  # (B, 1); the top token stays
        logits = logits.masked_fill((logits < floor) & ((top_k < V) | (top_p < 1)), float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V), in vocabulary order
    total = cdf[:, -1:]  # 1 up to rounding; u stays below it, so the token found has a probability above 0
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)  # (B, 1)
    # a parallel cumsum (a GPU's) may dip by a few ulps, so the search could land on a token
    # the filters removed (probability 0): such a row takes its likeliest token instead
    token = torch.where(logits.gather(-1, token).isfinite(), token, greedy).masked_fill(overflowed, -1)
    return torch.where(temperature == 0, greedy, token)

"""
Inference for sample.py and serve.py: the model a user names (a training checkpoint or
a Hugging Face one), and fast decoding of it.

smol.py's generate is the plain loop, written to be read: a forward pass per token over
a KV cache that grows. Decoder runs the same loop with a step whose shapes never change
(smol.py's decode_step: one token, every slot of a pre-allocated cache, a mask for the
filled ones), so torch.compile compiles it once and, on CUDA, replays it as a CUDA graph
(one launch per token instead of about 400). It also picks the faster CPU kernel for
bf16 at batch 1. Same tokens as generate, given the same seed.

    decoder = Decoder(model, compile=True)
    for token in decoder.stream(idx, 200, temperature=0.8, stop_ids={0}):  # (B, 1) each
        ...
"""
import os

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError, inference_dtype, pick_device
from hf import from_pretrained
from smol import KVCache, sample_next


def load_model(init_from, out_dir):
    """The model to sample from or serve, on the CPU in fp32: "resume" reads
    out_dir/ckpt.pt, anything else is a Hugging Face checkpoint directory or hub id."""
    if init_from == "resume":
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path}; train one with `python train.py` "
                            f"(or a tiny one in seconds: `python train.py --n_layer 2 --n_embd 64 --n_head 4 "
                            f"--n_kv_head 2 --intermediate_size 128 --block_size 64 --max_iters 100`)")
        return model_from_checkpoint(load_checkpoint(ckpt_path))
    try:
        return from_pretrained(init_from)
    except ValueError as e:
        raise UserError(f"--init_from {init_from}: {e}")


def load_from_flags(args):
    """(model, device) for common.add_model_flags' flags: the model on its device, in the
    dtype --dtype asks for (auto: bf16 where the hardware computes it), in eval mode. The
    device is checked before the model is read."""
    device = pick_device(args.device)
    model = load_model(args.init_from, args.out_dir)
    return model.to(device, inference_dtype(device, args.dtype)).eval(), device


class Decoder:
    """Fast decoding of one model. compile=True: one torch.compile of decode_step (with
    CUDA graphs on CUDA) and one cache kept for the next call, because a CUDA graph
    replays fixed addresses; so one compiled stream at a time per Decoder. Eager: a
    fresh cache each call."""

    def __init__(self, model, compile=False):
        self.model, self.compile = model, compile
        self.compiled_step, self.cache = None, None

    def _step_and_cache(self, B, slots, device, dtype):
        if not self.compile:
            return self.model.decode_step, KVCache(self.model.config, B, slots, device, dtype)
        if self.compiled_step is None:
            mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
            self.compiled_step = torch.compile(self.model.decode_step, mode=mode, fullgraph=True, dynamic=False)
        cache = self.cache
        if cache is None or cache.k.shape[1::2] != (B, slots) or cache.k.dtype != dtype or \
                cache.k.device != torch.device(device):
            self.cache = cache = None  # free the old one first
            self.cache = cache = KVCache(self.model.config, B, slots, device, dtype)
            if cache.k.is_cuda:  # a CUDA graph replays fixed addresses: tell the compiler these never move
                for t in (cache.k, cache.v, cache.pos_t):
                    torch._dynamo.mark_static_address(t)
        cache.pos = 0
        cache.pos_t.zero_()
        return self.compiled_step, cache

    @torch.inference_mode()  # like no_grad, and also skips autograd's version bookkeeping: faster small ops
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """Yield (B, 1) new tokens one at a time. The prompt idx (B, T) is processed once
        into a KV cache (prefill, eager); each later step feeds one token through
        decode_step. A row that samples one of stop_ids is finished: it yields that id,
        then repeats it while other rows go on; the stream ends when all rows are done."""
        model = self.model
        B, T = idx.size()
        total = T + max_new_tokens
        if total > model.config.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({model.config.max_position_embeddings})")
        # cache slots: a power of two, at least 256, so that prompts of different lengths
        # share one cache shape and one compiled step (unused slots are masked out)
        slots = min(max(256, 1 << (total - 1).bit_length()), model.config.max_position_embeddings)
        step, cache = self._step_and_cache(B, slots, idx.device, model.model.embed_tokens.weight.dtype)
        # bf16 on a CPU at batch 1: each step is a matrix-vector product per weight, where
        # PyTorch's own kernel reads the weights about twice as fast as oneDNN's; the prompt
        # and bigger batches are matrix products, faster in oneDNN (bench/NOTES.md)
        own_gemv = B == 1 and idx.device.type == "cpu" and cache.k.dtype == torch.bfloat16
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=idx.device)  # (S,)
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)  # rows that have stopped
        logits = model(idx, kv_cache=cache)[0][:, -1]  # (B, V)
        for i in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if len(stop_ids):
                next_token = torch.where(done, prev_token, next_token) if i else next_token
                done = done | torch.isin(next_token, stop)
            yield next_token
            if i == max_new_tokens - 1 or (len(stop_ids) and bool(done.all())):
                break  # the last token needs no logits of its own
            prev_token = next_token
            onednn = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = onednn and not own_gemv
            try:
                if self.compile and idx.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
                logits = step(next_token, cache)
            finally:
                torch.backends.mkldnn.enabled = onednn
            cache.advance(1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """As smol.py's generate: idx (B, T) extended to (B, T + new), new <= max_new_tokens
        (fewer when every row stopped early; finished rows are padded with their stop id)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids))
        return torch.cat([idx] + new, dim=1)

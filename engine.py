"""
Inference for sample.py and serve.py: the model a user names (a training checkpoint or
a Hugging Face one), and fast decoding of it.

smol.py's generate is the plain loop, written to be read: a forward pass per token over
a KV cache that grows. Decoder runs the same loop through smol.py's decode_step (one
token, a pre-allocated cache, a mask for the filled slots). Compiled, the step runs over
every slot, so its shapes never change: torch.compile compiles it once and, on CUDA,
replays it as a CUDA graph (one launch per token instead of about 400). Eager, it runs
over the filled slots only. It also picks the faster CPU kernel for bf16 at batch 1.
Same tokens as generate, given the same seed. Batcher (below) does the same for many
requests at once, for serve.py.

    decoder = Decoder(model, compile=True)
    for token in decoder.stream(idx, 200, temperature=0.8, stop_ids={0}):  # (B, 1) each
        ...
"""
import os
import sys
import threading
import traceback
from collections import deque
from contextlib import contextmanager

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError, inference_dtype, pick_device
from hf import from_pretrained
from quantize import check, quantize
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
    dtype --dtype asks for (auto: bf16 where the hardware computes it), in eval mode, its
    matrices int8 or int4 with --quantize. The device is checked before the model is read."""
    device = pick_device(args.device)
    dtype = inference_dtype(device, args.dtype)
    if args.quantize != "none" and (reason := check(args.quantize, device, dtype)):
        raise UserError(f"--quantize {args.quantize}: {reason}")
    model = load_model(args.init_from, args.out_dir).to(device, dtype).eval()
    if args.quantize == "none":
        return model, device
    try:
        return quantize(model, args.quantize), device
    except ValueError as e:
        raise UserError(f"--quantize {args.quantize}: {e}")


@contextmanager
def step_kernels(batch_size, cache):
    """bf16 on a CPU at batch 1: each step is a matrix-vector product per weight, where
    PyTorch's own kernel reads the weights about twice as fast as oneDNN's; the prompt
    and bigger batches are matrix products, faster in oneDNN (bench/NOTES.md)."""
    onednn = torch.backends.mkldnn.enabled
    own_gemv = batch_size == 1 and cache.k[0].device.type == "cpu" and cache.k[0].dtype == torch.bfloat16
    torch.backends.mkldnn.enabled = onednn and not own_gemv
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = onednn


class Decoder:
    """Fast decoding of one model. compile=True: one torch.compile of decode_step (with
    CUDA graphs on CUDA) and one cache kept for the next call, because a CUDA graph
    replays fixed addresses; so one compiled stream at a time per Decoder. Eager: a
    fresh cache each call, and each step attends over the filled slots only."""

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
        if cache is None or cache.k[0].shape[0::2] != (B, slots) or cache.k[0].dtype != dtype or \
                cache.k[0].device != torch.device(device):
            self.cache = cache = None  # free the old one first
            self.cache = cache = KVCache(self.model.config, B, slots, device, dtype)
            if cache.k[0].is_cuda:  # a CUDA graph replays fixed addresses: tell the compiler these never move
                for t in (*cache.k, *cache.v, cache.pos_t):
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
        # compiled, the cache slots are a power of two, at least 256, so that prompts of
        # different lengths share one cache shape and one compiled step (unused slots are
        # masked out); eager, exactly what this call can fill
        slots = min(max(256, 1 << (total - 1).bit_length()), model.config.max_position_embeddings) \
            if self.compile else total
        step, cache = self._step_and_cache(B, slots, idx.device, model.model.norm.weight.dtype)  # activations' dtype
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=idx.device)  # (S,)
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)  # rows that have stopped
        logits = model(idx, kv_cache=cache, last_only=True)[0][:, -1]  # (B, V)
        for i in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if len(stop_ids):
                next_token = torch.where(done, prev_token, next_token) if i else next_token
                done = done | torch.isin(next_token, stop)
            yield next_token
            if i == max_new_tokens - 1 or (len(stop_ids) and bool(done.all())):
                break  # the last token needs no logits of its own
            prev_token = next_token
            with step_kernels(B, cache):
                if not self.compile:  # eager: attend over the filled slots only, not every slot
                    logits = step(next_token, cache.view(slice(None), cache.pos + 1, cache.pos))
                else:
                    if idx.is_cuda:
                        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
                    logits = step(next_token, cache)
            cache.advance(1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """As smol.py's generate: idx (B, T) extended to (B, T + new), new <= max_new_tokens
        (fewer when every row stopped early; finished rows are padded with their stop id)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids))
        return torch.cat([idx] + new, dim=1)


class Busy(Exception):
    """Every row of the batch and every place in the waiting line is taken: try again later."""


class Sequence:
    """One request's generation inside a Batcher: prompt ids, at most max_new_tokens
    new ones, its own sampling settings and seed. The worker thread calls
    on_token(id) for each new token and on_token(None) once at the end (or an
    Exception, if the model failed). Set `cancelled` (a client went away, a stop
    string was seen) and it leaves the batch before the next step."""

    def __init__(self, prompt_ids, max_new_tokens, on_token, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_ids=()):
        self.prompt, self.max_new_tokens, self.on_token = list(prompt_ids), max_new_tokens, on_token
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed, self.stop_ids = seed, frozenset(stop_ids)
        self.slots = len(self.prompt) + max_new_tokens  # the cache positions it can ever fill
        self.cancelled = self.finished = False
        self.pos = self.made = 0  # positions in its cache row; tokens made
        self.last, self.generator = None, None


def _pow2(n):
    return 1 << max(0, n - 1).bit_length()


class Batcher:
    """Continuous batching: every request being generated is one row of a shared KV
    cache, and one worker thread advances all rows together, one batched decode_step
    per token, each row at its own position. A new request joins at the next step,
    after its prompt is read into its row (prefill, the last position's logits only);
    one that finishes or is cancelled leaves at once and its row is reused.

    Memory is bounded by design. The cache is one (rows, slots) block: rows a power of
    two up to max_batch, slots a power of two covering the longest request's prompt +
    max_new_tokens. A request is admitted only if the block it needs, plus the current
    one while it is copied over, fits in cache_bytes; otherwise it waits in line (in
    order), and past max_waiting waiting requests, submit raises Busy. The block is
    freed whenever the batch empties. Eager, each step attends over the filled slots
    of the longest row only.

    compile=True: one fixed block instead, max_batch rows of as many slots as the
    budget allows (at most the context), kept for the server's life; each step runs
    over all of it (free rows masked, their tokens ignored), so the step has one
    shape and torch.compile compiles it once, on CUDA as one CUDA graph. A request
    longer than a row is refused."""

    def __init__(self, model, max_batch=16, cache_bytes=1 << 30, max_waiting=64, compile=False):
        cfg, weight = model.config, model.model.norm.weight  # the activations' dtype, even with int8 matrices
        self.model, self.max_batch, self.cache_bytes, self.max_waiting = model, max_batch, cache_bytes, max_waiting
        self.device, self.dtype, self.context = weight.device, weight.dtype, cfg.max_position_embeddings
        self.slot_bytes = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * weight.element_size()  # k and v
        self.cache, self.rows, self.waiting = None, [], deque()  # rows[i] decodes in cache row i
        self.lock = threading.Condition()
        self.steps = self.generated = self.last_batch = 0  # counters for /health and the tests
        self.fixed, self.compiled_step = None, None
        if compile:
            slots = self.context
            while slots > 64 and max_batch * slots * self.slot_bytes > cache_bytes:
                slots = _pow2(slots) // 2
            if max_batch * slots * self.slot_bytes > cache_bytes:
                raise ValueError(f"a cache budget of {cache_bytes / 2**20:.0f} MiB cannot hold {max_batch} rows of "
                                 f"{slots} positions; raise it or lower max_batch")
            self.fixed = (max_batch, slots)
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.compiled_step = torch.compile(model.decode_step, mode=mode, fullgraph=True, dynamic=False)
        threading.Thread(target=self._run, name="batcher", daemon=True).start()

    def _shape(self, n_rows, slots):
        if self.fixed:
            return self.fixed
        return min(_pow2(n_rows), self.max_batch), min(max(64, _pow2(slots)), self.context)

    def block(self):
        """(rows, slots) of the cache block now, (0, 0) when there is none."""
        return tuple(self.cache.k[0].shape[0::2]) if self.cache is not None else (0, 0)

    def cache_size(self, shape=None):
        rows, slots = shape or self.block()
        return rows * slots * self.slot_bytes

    def submit(self, seq):
        """Queue seq; ValueError if it could never fit in the cache budget, Busy if the line is full."""
        if self.fixed and seq.slots > self.fixed[1]:
            raise ValueError(f"{seq.slots} tokens (prompt + max_tokens) do not fit in a row of {self.fixed[1]} "
                             f"positions (the cache budget over {self.max_batch} rows)")
        alone = self.cache_size(self._shape(1, seq.slots))
        if alone > self.cache_bytes:
            most = self.cache_bytes // self.slot_bytes
            raise ValueError(f"{seq.slots} tokens (prompt + max_tokens) need {alone / 2**20:.0f} MiB of KV cache; "
                             f"this server's cache budget is {self.cache_bytes / 2**20:.0f} MiB (at most about "
                             f"{most} tokens in one request)")
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.rows)} requests are generating and {len(self.waiting)} are waiting")
            self.waiting.append(seq)
            self.lock.notify()

    @property
    def active(self):
        return len(self.rows) + len(self.waiting)

    def _run(self):
        while True:
            with self.lock:
                while not self.rows and not self.waiting:
                    if not self.fixed:
                        self.cache = None  # idle: give the memory back (a compiled step keeps its block)
                    self.lock.wait()
            try:
                with torch.inference_mode():
                    while (seq := self._admit()) is not None:
                        self._prefill(seq)
                    self._leave()
                    if self.rows:
                        self._step()
                        self._leave()
            except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
                print(f"error: the model failed while generating: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc()
                for seq in self.rows:
                    seq.on_token(e)
                self.rows, self.cache = [], None

    def _admit(self):
        """The next waiting request that fits, its row reserved (the block grown if it
        must be); None if none can join now."""
        with self.lock:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft().on_token(None)
            if not self.waiting or len(self.rows) >= self.max_batch:
                return None
            seq = self.waiting[0]
            wanted = self._shape(len(self.rows) + 1, max([seq.slots] + [r.slots for r in self.rows]))
            shape = tuple(max(a, b) for a, b in zip(wanted, self.block()))  # the block never shrinks while in use
            grow = shape != self.block()
            if grow and self.cache_size() + self.cache_size(shape) > self.cache_bytes:
                return None  # waits for rows to leave (when the batch empties, the block goes)
            self.waiting.popleft()
        if grow:
            old, self.cache = self.cache, KVCache(self.model.config, *shape, self.device, self.dtype)
            if self.fixed and self.device.type == "cuda":  # a CUDA graph replays fixed addresses
                for t in (*self.cache.k, *self.cache.v, self.cache.pos_t):
                    torch._dynamo.mark_static_address(t)
            if old is not None:
                n, slots = len(self.rows), old.max_len
                for new, kept in zip(self.cache.k + self.cache.v, old.k + old.v):  # per layer
                    new[:n, :, :slots] = kept[:n]
                self.cache.pos_t[:n] = old.pos_t[:n]
                del old
        return seq

    def _prefill(self, seq):
        row = len(self.rows)
        self.rows.append(seq)
        seq.generator = torch.Generator(self.device)
        seq.generator.manual_seed(seq.seed) if seq.seed is not None else seq.generator.seed()
        idx = torch.tensor([seq.prompt], device=self.device)  # (1, T)
        view = self.cache.view(slice(row, row + 1), self.cache.max_len)
        logits = self.model(idx, kv_cache=view, last_only=True)[0][:, -1]  # (1, V)
        seq.pos = len(seq.prompt)
        self._emit(seq, logits)

    def _step(self):
        n = len(self.rows)
        self.steps, self.last_batch = self.steps + 1, n
        tokens = torch.tensor([[seq.last] for seq in self.rows], device=self.device)  # (n, 1)
        if self.fixed:  # every row of the block, the free ones fed a token that is never read
            tokens = torch.cat([tokens, tokens.new_zeros(self.fixed[0] - n, 1)])  # (max_batch, 1)
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are done with
            logits = self.compiled_step(tokens, self.cache)[:n]  # (n, V)
        else:
            view = self.cache.view(slice(0, n), max(seq.pos for seq in self.rows) + 1)  # the filled slots only
            with step_kernels(n, view):
                logits = self.model.decode_step(tokens, view)  # (n, V)
        self.cache.pos_t[:n] += 1
        for i, seq in enumerate(self.rows):
            seq.pos += 1
            self._emit(seq, logits[i:i + 1])

    def _emit(self, seq, logits):
        token = sample_next(logits, generator=seq.generator, **seq.sampling).item()
        seq.last, seq.made = token, seq.made + 1
        self.generated += 1
        seq.finished = token in seq.stop_ids or seq.made == seq.max_new_tokens
        seq.on_token(token)

    def _leave(self):
        """Drop finished and cancelled rows; the others move down to fill the gaps
        (only their filled slots are copied)."""
        if not any(seq.finished or seq.cancelled for seq in self.rows):
            return
        kept = []
        for old_row, seq in enumerate(self.rows):
            if seq.finished or seq.cancelled:
                seq.on_token(None)
                continue
            row = len(kept)
            if row != old_row:
                for t in self.cache.k + self.cache.v:  # per layer
                    t[row, :, :seq.pos] = t[old_row, :, :seq.pos]
                self.cache.pos_t[row] = seq.pos
            kept.append(seq)
        with self.lock:
            self.rows = kept

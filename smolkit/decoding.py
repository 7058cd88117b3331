"""
Inference for sample.py and serve.py: the model a user names (a training checkpoint or
a Hugging Face one), and fast decoding of it.

smol.py's generate is the plain loop, written to be read. The same forward pass, the
same cache and the same sampler run here faster, three ways:
- the cache is allocated once and kept, and each step attends over its filled slots
  only, rounded up to a power of two (a bucket: 256, 512, ... up to the context), so a
  step's shapes change only when the longest row crosses into the next bucket;
- compile=True: torch.compile compiles the step once per bucket (and batch shape), on
  CUDA as a CUDA graph (one launch per token instead of about 400). A row that grows
  past its bucket mid-stream takes the next bucket's step from then on, compiled the
  first time it is needed (so that step waits for the compiler once per process);
- every row of a batch is sampled in one call (smol.sample_next), and the tokens come to
  the host in one copy per step.
Decoder runs one prompt (or a batch of prompts of one length) for sample.py: the same
tokens as smol.py's generate from the same generator. Batcher (below) decodes many
requests at once, each at its own position, for serve.py.

    decoder = Decoder(model, compile=True)
    for token in decoder.stream(idx, 200, temperature=0.8, stop_ids={0}):  # (B, 1) each
        ...
"""
import os
import secrets
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

MIN_SLOTS = 256  # the smallest bucket: a step reads at most this many slots more than it needs


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


def bucket(n, context):
    """The cache slots a step over n filled positions attends over: the next power of
    two, at least MIN_SLOTS, at most the context."""
    return min(max(MIN_SLOTS, 1 << (n - 1).bit_length()), context)


class Block:
    """One KVCache allocated for (rows, slots), and views of its rows and first slots.
    keep=True (compiled steps, whose shapes are a few buckets): each view a step runs over
    is made once and kept; static=True (CUDA graphs, which replay fixed addresses) also
    marks its tensors static."""

    def __init__(self, config, rows, slots, device, dtype, keep=False, static=False):
        self.cache = KVCache.zeros(config, rows, slots, device, dtype)
        self.rows, self.slots, self.keep, self.static, self.views = rows, slots, keep or static, static, {}

    def view(self, rows, length, first_row=0):
        """Rows first_row..first_row+rows-1 and slots 0..length-1, sharing this block's memory."""
        cut = slice(first_row, first_row + rows)
        return KVCache([t[cut, :, :length] for t in self.cache.k], [t[cut, :, :length] for t in self.cache.v])

    def step_view(self, rows, length):
        """view(rows, length) for a step: kept (and marked static) as the Block was asked."""
        if not self.keep:
            return self.view(rows, length)
        if (rows, length) not in self.views:
            self.views[rows, length] = view = self.view(rows, length)
            for t in (view.k + view.v) if self.static else ():
                torch._dynamo.mark_static_address(t)
        return self.views[rows, length]


class Step:
    """One decoding step: the logits (B, V) after each row's token (B, 1) at its position
    input_pos (B, 1), through smol's forward over the first B rows of a Block and the
    slots up to the longest row's position (`filled` of them). Eager, exactly those
    slots. compile=True: through torch.compile, over the filled slots rounded up to a
    bucket, so that it compiles once per shape (batch rows, bucket): on CUDA as a CUDA
    graph ("reduce-overhead"), on a CPU with a C++ wrapper around the generated kernels
    (cpp_wrapper: no Python between them; bench/NOTES.md, entry 19)."""

    def __init__(self, model, compile=False):
        self.model, self.compile = model, compile
        self.cuda_graphs = compile and model.model.norm.weight.is_cuda
        self.run = self.forward
        if compile:
            # every bucket and batch shape is a compilation of this one function: let dynamo keep them all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            how = dict(mode="reduce-overhead") if self.cuda_graphs else dict(options={"cpp_wrapper": True})
            self.run = torch.compile(self.forward, fullgraph=True, dynamic=False, **how)

    def forward(self, token, cache, input_pos):
        return self.model(token, kv_cache=cache, input_pos=input_pos)[0][:, -1]  # (B, V)

    def __call__(self, token, block, input_pos, filled):
        shape = (token.size(0), bucket(filled, block.slots) if self.compile else filled)
        view = block.step_view(*shape)
        with step_kernels(token.size(0), view):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are done with
            return self.run(token, view, input_pos)


class Decoder:
    """Fast decoding of one model for sample.py: one cache, kept from call to call (grown
    when a call needs more), so one stream at a time per Decoder."""

    def __init__(self, model, compile=False):
        self.model, self.step, self.block = model, Step(model, compile), None

    def _block(self, B, slots, device, dtype):
        b = self.block
        if b is None or b.rows != B or b.slots < slots or b.cache.k[0].dtype != dtype or \
                b.cache.k[0].device != torch.device(device):
            self.block = None  # free the old one first
            self.block = Block(self.model.config, B, slots, device, dtype, keep=self.step.compile,
                               static=self.step.cuda_graphs)
        return self.block

    @torch.inference_mode()  # like no_grad, and also skips autograd's version bookkeeping: faster small ops
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """Yield (B, 1) new tokens one at a time. The prompt idx (B, T) is read once into
        the cache (prefill, eager); each later step feeds one token per row. A row that
        samples one of stop_ids is finished: it yields that id, then repeats it while other
        rows go on; the stream ends when all rows are done."""
        model, context = self.model, self.model.config.max_position_embeddings
        B, T = idx.size()
        if T + max_new_tokens > context:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({context})")
        # compiled, the block holds the whole context: its strides are part of every compiled
        # step's shape, so it must never change (as it would when a chat's prompt grows)
        slots = context if self.step.compile else bucket(T + max_new_tokens, context)
        block = self._block(B, slots, idx.device, model.model.norm.weight.dtype)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=idx.device)  # (S,)
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)  # rows that have stopped
        logits = model(idx, kv_cache=block.view(B, T), last_only=True)[0][:, -1]  # (B, V)
        for pos in range(T, T + max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if len(stop_ids):
                token = torch.where(done, prev, token) if pos > T else token
                done = done | torch.isin(token, stop)
            yield token
            if pos == T + max_new_tokens - 1 or (len(stop_ids) and bool(done.all())):
                break  # the last token needs no logits of its own
            prev, input_pos = token, torch.full((B, 1), pos, device=idx.device)
            logits = self.step(token, block, input_pos, filled=pos + 1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """As smol.py's generate: idx (B, T) extended to (B, T + new), new <= max_new_tokens
        (fewer when every row stopped early; finished rows are padded with their stop id)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids))
        return torch.cat([idx] + new, dim=1)


class ModelOverflow(Exception):
    """The model's activations overflowed its dtype (fp16's largest number is 65,504): the
    logits are inf or NaN, and sample_next gave the id -1."""

    def __init__(self, dtype):
        name = str(dtype).removeprefix("torch.")
        super().__init__(f"the model's activations overflowed {name} (its logits are inf or NaN); run it with "
                         f"--dtype float32, or bfloat16 where the hardware computes it")


class Busy(Exception):
    """Every row of the batch and every place in the waiting line is taken: try again later."""


class Sequence:
    """One request's generation inside a Batcher: prompt ids, at most max_new_tokens
    new ones, its own sampling settings and seed. The worker thread calls
    on_token(id) for each new token and on_token(None) once at the end (or an
    Exception, if the model failed). Set `cancelled` (a client went away, a stop
    string was seen) and it leaves the batch before the next step."""

    def __init__(self, prompt_ids, max_new_tokens, on_token, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_ids=(), logprobs=None, score_prompt=False):
        self.prompt, self.max_new_tokens, self.on_token = list(prompt_ids), max_new_tokens, on_token
        # as sample_next takes them per row: top_k 0 and top_p 1 filter nothing
        self.temperature, self.top_k, self.top_p = temperature, top_k or 0, 1.0 if top_p is None else top_p
        self.seed = secrets.randbits(64) if seed is None else seed
        self.stop_ids = frozenset(stop_ids)
        self.slots = len(self.prompt) + max_new_tokens  # the cache positions it can ever fill
        self.cancelled = self.finished = False
        self.pos = self.made = 0  # positions in its cache row; tokens made
        self.last = None
        # log-probabilities, for evaluators: logprobs=N scores each new token and keeps the N
        # likeliest beside it; score_prompt also scores every prompt token after the first.
        # scores gets one (logprob, [(id, logprob)] * N) per scored token, the prompt's first,
        # each appended before on_token hands over its token
        self.logprobs, self.score_prompt, self.scores = logprobs, score_prompt, []


MASK64 = (1 << 64) - 1


def uniform(seed, n):
    """The n-th random number in [0, 1) of a request with this seed: splitmix64 of (seed, n),
    a counter-based generator, so it depends on the two numbers only, not on what else is
    drawn or which other requests share the batch. 24 bits: exact in float32."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return ((z ^ (z >> 31)) >> 40) / (1 << 24)


def token_scores(logits, next_ids, top_n):
    """[(logprob of next_ids[i], [(id, logprob)] of the top_n likeliest)] for logits (n, V):
    one fp32 log-softmax, from which both are read, so that a token that is the likeliest
    has a log-probability equal to the first of the top ones, bit for bit (evaluators test
    "was it greedy?" by comparing the two)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = lp.gather(1, next_ids.view(-1, 1)).view(-1).tolist()  # (n,)
    if not top_n:
        return [(c, []) for c in chosen]
    values, ids = lp.topk(top_n, dim=-1)  # (n, top_n) each
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _pow2(n):
    return 1 << max(0, n - 1).bit_length()


class Batcher:
    """Continuous batching: every request being generated is one row of a shared KV
    cache, and one worker thread advances all rows together, one batched step per
    token, each row at its own position (smol's forward takes the positions as data).
    A new request joins at the next step, after its prompt is read into its row
    (prefill, the last position's logits only); one that finishes or is cancelled
    leaves at once and its row is reused. All rows are sampled in one call, each with
    its own settings and its own random numbers (uniform(seed, n)), so a request's seed
    gives the same text alone or in any batch; the tokens reach the host in one copy.

    Memory is bounded by design. The cache is one (rows, slots) block: rows a power of
    two up to max_batch, slots a power of two covering the longest request's prompt +
    max_new_tokens. A request is admitted only if the block it needs, plus the current
    one while it is copied over, fits in cache_bytes; otherwise it waits in line (in
    order), and past max_waiting waiting requests, submit raises Busy. The block is
    freed whenever the batch empties. Each step attends over the filled slots of the
    longest row, rounded up to a bucket.

    compile=True: one fixed block instead, max_batch rows of as many slots as the budget
    allows (at most the context), kept for the server's life; each step runs over all
    max_batch rows (free rows are fed a token that is never read) and the bucket of
    slots the longest row needs, so the step compiles once per bucket, on CUDA as one
    CUDA graph per bucket. A request longer than a row is refused."""

    def __init__(self, model, max_batch=16, cache_bytes=1 << 30, max_waiting=64, compile=False, thread=True):
        cfg, weight = model.config, model.model.norm.weight  # the activations' dtype, even with int8 matrices
        self.model, self.max_batch, self.cache_bytes, self.max_waiting = model, max_batch, cache_bytes, max_waiting
        self.device, self.dtype, self.context = weight.device, weight.dtype, cfg.max_position_embeddings
        self.slot_bytes = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * weight.element_size()  # k and v
        # scoring a prompt (score_prompt) holds score_rows positions' logits at a time in three
        # copies (the model's, fp32, log-softmax): an eighth of the budget (compiled: what the
        # fixed block leaves), counted against it when such a request is admitted
        self.score_row_bytes = 3 * 4 * cfg.vocab_size
        self.score_rows = min(512, cache_bytes // 8 // self.score_row_bytes)
        self.block, self.rows, self.waiting = None, [], deque()  # rows[i] decodes in cache row i
        self.lock = threading.Condition()
        self.steps = self.generated = self.last_batch = 0  # counters for /health and the tests
        self.step, self.fixed = Step(model, compile), None
        if compile:
            slots = self.context
            while slots > 64 and max_batch * slots * self.slot_bytes > cache_bytes:
                slots = _pow2(slots) // 2
            if max_batch * slots * self.slot_bytes > cache_bytes:
                raise ValueError(f"a cache budget of {cache_bytes / 2**20:.0f} MiB cannot hold {max_batch} rows of "
                                 f"{slots} positions; raise it or lower max_batch")
            self.fixed = (max_batch, slots)
            self.score_rows = min(512, (cache_bytes - max_batch * slots * self.slot_bytes) // self.score_row_bytes)
        self.score_bytes = self.score_rows * self.score_row_bytes
        if thread:  # else the caller runs run() in a thread of its own (serve.py: the one that loaded the model)
            threading.Thread(target=self.run, name="batcher", daemon=True).start()

    def _shape(self, n_rows, slots):
        if self.fixed:
            return self.fixed
        return min(_pow2(n_rows), self.max_batch), min(max(64, _pow2(slots)), self.context)

    def block_shape(self):
        """(rows, slots) of the cache block now, (0, 0) when there is none."""
        return (self.block.rows, self.block.slots) if self.block is not None else (0, 0)

    def cache_size(self, shape=None):
        rows, slots = shape or self.block_shape()
        return rows * slots * self.slot_bytes

    def scratch(self, seq):
        """Bytes seq needs beyond its cache slots while its prompt is read: the scoring pieces."""
        return self.score_bytes if seq.score_prompt else 0

    def submit(self, *seqs):
        """Queue the seqs, all or none; ValueError if one could never fit in the cache
        budget, Busy if the line has no room for them all."""
        for seq in seqs:
            if seq.score_prompt and not self.score_rows:
                raise ValueError(f"scoring a prompt needs {self.score_row_bytes / 2**20:.1f} MiB beside the KV cache, "
                                 f"and this server's cache budget leaves none")
            if self.fixed and seq.slots > self.fixed[1]:
                raise ValueError(f"{seq.slots} tokens (prompt + max_tokens) do not fit in a row of {self.fixed[1]} "
                                 f"positions (the cache budget over {self.max_batch} rows)")
            alone = self.cache_size(self._shape(1, seq.slots)) + self.scratch(seq)
            if alone > self.cache_bytes:
                most = self.cache_bytes // self.slot_bytes
                raise ValueError(f"{seq.slots} tokens (prompt + max_tokens) need {alone / 2**20:.0f} MiB of KV cache"
                                 f"{' and scoring' if seq.score_prompt else ''}; "
                                 f"this server's cache budget is {self.cache_bytes / 2**20:.0f} MiB (at most about "
                                 f"{most} tokens in one request)")
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise Busy(f"{len(self.rows)} requests are generating and {len(self.waiting)} are waiting")
            self.waiting.extend(seqs)
            self.lock.notify()

    def ahead(self, seq, for_a_row=False):
        """How many requests wait in line before seq; None once it has a row (or has left).
        for_a_row: None also while a row is free for it at the next step."""
        with self.lock:
            if seq not in self.waiting:
                return None
            ahead = self.waiting.index(seq)
            return None if for_a_row and len(self.rows) + ahead < self.max_batch else ahead

    @property
    def active(self):
        return len(self.rows) + len(self.waiting)

    def run(self):
        """The worker: admit, prefill, step, forever. Every torch operation of a server runs
        in this one thread: a second thread that has run parallel torch operations on a
        CPU (loading the model, say) halves the speed of this one (bench/NOTES.md, entry 17)."""
        while True:
            with self.lock:
                while not self.rows and not self.waiting:
                    if not self.fixed:
                        self.block = None  # idle: give the memory back (a compiled step keeps its block)
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
                self.rows, self.block = [], None

    def _admit(self):
        """The next waiting request that fits, its row reserved (the block grown if it
        must be); None if none can join now."""
        with self.lock:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft().on_token(None)
            if not self.waiting or len(self.rows) >= self.max_batch:
                return None
            seq = self.waiting[0]
            if not self.rows and not self.fixed:
                self.block = None  # an empty batch gives its block back: the next one is sized afresh
            wanted = self._shape(len(self.rows) + 1, max([seq.slots] + [r.slots for r in self.rows]))
            shape = tuple(max(a, b) for a, b in zip(wanted, self.block_shape()))  # never shrinks while in use
            grow = shape != self.block_shape()
            # while a block grows, the old and the new one are both held (the rows are copied over)
            if (self.cache_size() if grow else 0) + self.cache_size(shape) + self.scratch(seq) > self.cache_bytes:
                return None  # waits for rows to leave (when the batch empties, the block goes)
            self.waiting.popleft()
        if grow:
            old = self.block
            self.block = Block(self.model.config, *shape, self.device, self.dtype, keep=self.step.compile,
                               static=self.step.cuda_graphs)
            if old is not None:
                n, slots = len(self.rows), old.slots
                for new, kept in zip(self.block.cache.k + self.block.cache.v, old.cache.k + old.cache.v):  # per layer
                    new[:n, :, :slots] = kept[:n]
                del old
        return seq

    def _prefill(self, seq):
        row, T = len(self.rows), len(seq.prompt)
        self.rows.append(seq)
        idx = torch.tensor([seq.prompt], device=self.device)  # (1, T)
        if not seq.score_prompt:  # the last position's logits only
            logits = self.model(idx, kv_cache=self.block.view(1, T, first_row=row), last_only=True)[0][:, -1]
        else:  # every position's, score_rows at a time: never all T x V logits at once
            for start in range(0, T, self.score_rows):
                end = min(T, start + self.score_rows)
                pos = torch.arange(start, end, device=self.device).view(1, -1)  # (1, p)
                logits = self.model(idx[:, start:end], kv_cache=self.block.view(1, end, first_row=row),
                                    input_pos=pos)[0][0]  # (p, V)
                scored = min(end, T - 1) - start  # position i scores prompt token i + 1
                seq.scores += token_scores(logits[:scored], idx[0, start + 1:start + 1 + scored], seq.logprobs)
            logits = logits[-1:]  # (1, V)
        seq.pos = T
        if seq.max_new_tokens == 0:  # scored, nothing to generate
            seq.finished = True
            return
        self._emit([seq], logits)

    def _step(self):
        n = len(self.rows)
        self.steps, self.last_batch = self.steps + 1, n
        width = self.fixed[0] if self.fixed else n  # compiled: every row of the block, the free ones idle
        tokens = [seq.last for seq in self.rows] + [0] * (width - n)
        positions = [seq.pos for seq in self.rows] + [0] * (width - n)
        logits = self.step(torch.tensor(tokens, device=self.device).view(width, 1), self.block,
                           torch.tensor(positions, device=self.device).view(width, 1), filled=max(positions) + 1)[:n]
        for seq in self.rows:
            seq.pos += 1
        self._emit(self.rows, logits)

    def _emit(self, rows, logits):
        """Sample the next token of every row in one call, each with its own settings and
        random number, and hand each to its request."""
        settings = torch.tensor([[seq.temperature, seq.top_k, seq.top_p] for seq in rows], dtype=torch.float64)
        u = torch.tensor([[uniform(seq.seed, seq.made)] for seq in rows], device=self.device)  # (n, 1)
        tokens = sample_next(logits, settings[:, 0].float(), settings[:, 1].long(), settings[:, 2].float(), uniform=u)
        if scored := [i for i, seq in enumerate(rows) if seq.logprobs is not None]:  # (an evaluator's rows)
            top = max(rows[i].logprobs for i in scored)
            for i, (lp, best) in zip(scored, token_scores(logits[scored], tokens[scored].clamp(min=0), top)):
                rows[i].scores.append((lp, best[:rows[i].logprobs]))
        for seq, token in zip(rows, tokens.view(-1).tolist()):  # the one copy to the host of this step
            if token < 0:  # this row's logits overflowed: the request fails, the others go on
                seq.finished = True
                seq.on_token(ModelOverflow(logits.dtype))
                continue
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
                for t in self.block.cache.k + self.block.cache.v:  # per layer
                    t[row, :, :seq.pos] = t[old_row, :, :seq.pos]
            kept.append(seq)
        with self.lock:
            self.rows = kept

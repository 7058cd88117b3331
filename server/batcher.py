"""
Continuous batching for the server: every request being generated is one row of a shared
KV cache, and one worker thread advances all rows together, one batched decoding step per
token (smolkit.decoding's Step over a cache block), each row at its own position, with its
own sampling settings and seed.
"""
import secrets
import sys
import threading
import traceback
from collections import deque

import torch

from smol import sample_next
from smolkit.decoding import CacheBlock, ModelOverflow, Step, slots_for
from smolkit.grammar import masked_logits


class Busy(Exception):
    """Every row of the batch and every place in the waiting line is taken: try again later."""


class Sequence:
    """One request's generation inside a Batcher: prompt ids, at most max_new_tokens
    new ones, its own sampling settings and seed. The worker thread calls
    on_token(id) for each new token and on_token(None) once at the end (or an
    Exception, if the model failed). Set `cancelled` (a client went away, a stop
    string was seen) and it leaves the batch before the next step."""

    def __init__(self, prompt_ids, max_new_tokens, on_token, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_ids=(), logprobs=None, score_prompt=False, constraint=None):
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
        self.constraint = constraint  # a grammar.Constraint: the tokens each step may draw (None: any)


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
    two up to max_batch, slots covering the longest request's prompt + max_new_tokens as
    decoding.slots_for rounds them. A request is admitted only if the block it needs, plus
    the current one while it is copied over, fits in cache_bytes; otherwise it waits in
    line (in order), and past max_waiting waiting requests, submit raises Busy. The block
    is freed whenever the batch empties. Each step attends over the filled slots of the
    longest row.

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
        # a step's inputs on the device, (rows, 1) tokens and positions, and the rows' version they
        # are for: the next step's are this step's tokens at the next positions, made there without
        # a copy; rebuilt from the host only when rows join or leave (each change bumps the version)
        self.inputs, self.version = None, 0
        self.lock = threading.Condition()
        self.steps = self.generated = self.last_batch = 0  # counters for /health and the tests
        # forward passes that read prompts: one a prompt, or one per piece of score_rows positions
        # when its every position is scored (the pieces an evaluator's long prompt costs)
        self.prefill_passes = 0
        self.step, self.fixed = Step(model, compile), None
        if compile:
            slots = slots_for(self.context, self.context)
            while slots > slots_for(1, self.context) and max_batch * slots * self.slot_bytes > cache_bytes:
                slots = slots_for(slots // 2, self.context)
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
        return min(1 << max(0, n_rows - 1).bit_length(), self.max_batch), slots_for(slots, self.context)

    def compile_buckets(self):
        """compile=True: compile the step for every bucket of the fixed block now, before the
        server takes requests, rather than inside the first requests that reach each bucket
        (tens of seconds each). Returns how many were compiled (0 when not compiled)."""
        if not self.fixed:
            return 0
        rows, slots = self.fixed
        self.block = CacheBlock(self.model.config, rows, slots, self.device, self.dtype, keep=True,
                                static=self.step.cuda_graphs)
        buckets = sorted({slots_for(n, slots) for n in range(1, slots + 1)})
        with torch.inference_mode():  # inputs made as run() makes them: inference tensors, one (2, rows, 1) copy
            tokens, positions = torch.zeros(2, rows, 1, dtype=torch.long, device=self.device)  # token 0 at 0
            for bucket in buckets:
                self.step(tokens, self.block, positions, filled=bucket)
        return len(buckets)

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
                self.rows, self.inputs = [], None
                if not self.fixed:  # a compiled step's block stays: its views are static, a new one would leak
                    self.block = None

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
            self.block = CacheBlock(self.model.config, *shape, self.device, self.dtype, keep=self.step.compile,
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
        self.version += 1
        idx = torch.tensor([seq.prompt], device=self.device)  # (1, T)
        if not seq.score_prompt:  # the last position's logits only
            self.prefill_passes += 1
            logits = self.model(idx, kv_cache=self.block.view(1, T, first_row=row), last_only=True)[0][:, -1]
        else:  # every position's, score_rows at a time: never all T x V logits at once
            for start in range(0, T, self.score_rows):
                end = min(T, start + self.score_rows)
                pos = torch.arange(start, end, device=self.device).view(1, -1)  # (1, p)
                self.prefill_passes += 1
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
        if self.inputs is None or self.inputs[2] != self.version:  # rows joined or left
            host = [[seq.last, seq.pos] for seq in self.rows] + [[0, 0]] * (width - n)  # free rows: token 0 at 0
            tokens, positions = torch.tensor(host, device=self.device).T.contiguous().view(2, width, 1)  # one copy
            self.inputs = [tokens, positions, self.version]
        tokens, positions, _ = self.inputs
        logits = self.step(tokens, self.block, positions, filled=max(seq.pos for seq in self.rows) + 1)[:n]
        for seq in self.rows:
            seq.pos += 1
        drawn = self._emit(self.rows, logits)  # (n, 1), on the device
        self.inputs[0] = torch.cat([drawn.clamp(min=0), tokens[n:]])  # (width, 1): -1 marks an overflow, which leaves
        self.inputs[1] = torch.cat([positions[:n] + 1, positions[n:]])

    def _emit(self, rows, logits):
        """Sample the next token of every row in one call, each with its own settings and
        random number (a constrained row among the tokens its grammar allows), and hand each
        to its request. Log-probabilities are the model's own, before any grammar's mask."""
        settings = torch.tensor([[seq.temperature, seq.top_k, seq.top_p] for seq in rows], dtype=torch.float64)
        u = torch.tensor([[uniform(seq.seed, seq.made)] for seq in rows])  # (n, 1), on the host: sample_next
        # takes it to the device with the settings, the step's one copy there
        allowed = masked_logits(logits, [seq.constraint for seq in rows])  # logits itself if none is constrained
        tokens = sample_next(allowed, settings[:, 0].float(), settings[:, 1].long(), settings[:, 2].float(), uniform=u)
        if scored := [i for i, seq in enumerate(rows) if seq.logprobs is not None]:  # (an evaluator's rows)
            top = max(rows[i].logprobs for i in scored)
            for i, (lp, best) in zip(scored, token_scores(logits[scored], tokens[scored].clamp(min=0), top)):
                rows[i].scores.append((lp, best[:rows[i].logprobs]))
        for seq, token in zip(rows, tokens.view(-1).tolist()):  # the one copy to the host of this step
            if token < 0:  # this row's logits overflowed: the request fails, the others go on
                seq.finished = True
                seq.on_token(ModelOverflow(logits.dtype))
                continue
            if seq.constraint is not None:
                try:
                    seq.constraint.advance(token)
                except RuntimeError as e:  # a bug in the grammar's mask: this request fails, the others go on
                    seq.finished = True
                    seq.on_token(e)
                    continue
            seq.last, seq.made = token, seq.made + 1
            self.generated += 1
            seq.finished = token in seq.stop_ids or seq.made == seq.max_new_tokens
            seq.on_token(token)
        return tokens

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
        self.version += 1
        with self.lock:
            self.rows = kept

"""server.batcher.Batcher, in this process: continuous batching of many requests over one
model. Every observation is an order or a counter (the batch size of each step, the
cache's size whenever a block is made), never a clock."""
import os
import threading
import weakref

import pytest
import torch

from conftest import fp16_overflowing_model, wait_for
from server import batcher as batcher_module
from server.batcher import Batcher, Busy, Sequence
from smol import SmolConfig, SmolLM
from smolkit import decoding
from smolkit.decoding import ModelOverflow

CONFIG = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, block_size=64,
              max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmolLM(SmolConfig(**CONFIG)).eval()


class Run:
    """Requests submitted to a batcher; what each received, and a log of (name, token)
    in the order the worker delivered them. on_each(batcher) runs at every token. A request
    ends with None, or with an Exception if it failed: wait() fails on such an end, unless
    the test names the request in wait(..., failing=...) and then checks the exception
    (errors[name])."""

    def __init__(self, batcher, on_each=None):
        self.batcher, self.on_each = batcher, on_each
        self.log, self.tokens, self.ended, self.errors = [], {}, {}, {}

    def submit(self, name, prompt, n, **sampling):
        self.tokens[name], self.ended[name] = [], threading.Event()

        def on_token(token):
            if isinstance(token, Exception):
                self.errors[name] = token
            if token is None or isinstance(token, Exception):
                self.ended[name].set()
                return
            self.tokens[name].append(token)
            self.log.append((name, token))
            if self.on_each:
                self.on_each(self.batcher)
        seq = Sequence(prompt, n, on_token, **sampling)
        self.batcher.submit(seq)
        return seq

    def wait(self, *names, failing=()):
        for name in names or list(self.ended):
            assert self.ended[name].wait(120), f"{name} never ended"
            if name in failing:
                assert name in self.errors, f"{name} ended without the failure the test expects"
            else:
                assert name not in self.errors, f"{name} failed: {self.errors[name]!r}"


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


SAMPLING = [dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=20, seed=8),
            dict(temperature=1.2, top_p=0.9, seed=9)]


def test_sixteen_requests_together_give_what_each_gives_alone(model):
    requests = [(p, 40, SAMPLING[i % 4]) for i, p in enumerate(prompts(16))]
    alone = []
    for p, n, sampling in requests:
        run = Run(Batcher(model, max_batch=16))
        run.submit("a", p, n, **sampling)
        run.wait()
        alone.append(run.tokens["a"])
    batcher = Batcher(model, max_batch=16, thread=False)  # the worker starts once all 16 are in line
    sizes = []  # the batch size of the step that made each token after the prefills
    together = Run(batcher, on_each=lambda b: sizes.append(b.last_batch) if b.steps else None)
    for i, (p, n, sampling) in enumerate(requests):
        together.submit(i, p, n, **sampling)
    threading.Thread(target=batcher.run, daemon=True).start()
    together.wait()
    assert [together.tokens[i] for i in range(16)] == alone
    # they shared every step: 39 steps of 16 rows (each request's first token is its prefill's)
    assert batcher.steps == 39 and sizes == [16] * (16 * 39)
    # and the plain loop of smol.py agrees for the greedy ones
    for i in range(0, 16, 4):
        p = requests[i][0]
        assert model.generate(torch.tensor([p]), 40, temperature=0)[0, len(p):].tolist() == alone[i]


def test_a_request_joins_a_running_batch_and_gets_its_own_text(model):
    first, joiner = prompts(2, seed=3)
    alone = Run(Batcher(model))
    alone.submit("joiner", joiner, 30, temperature=1.0, seed=5)
    alone.wait()
    batcher = Batcher(model)
    joined = {}

    def join_at_tenth(b):  # runs in the worker, at each token: the joiner comes mid-stream
        if len(run.tokens["first"]) == 10 and not joined:
            joined["seq"] = run.submit("joiner", joiner, 30, temperature=1.0, seed=5)
    run = Run(batcher, on_each=join_at_tenth)
    run.submit("first", first, 60, temperature=0)
    run.wait()
    assert run.tokens["joiner"] == alone.tokens["joiner"]
    names = [name for name, _ in run.log]
    assert names[:10] == ["first"] * 10 and names.index("joiner") >= 10
    assert names[-1] == "first"  # the first one went on while the joiner ran, and after


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(model):
    batcher = Batcher(model, max_batch=4)
    sizes = []  # the batch size of the step that made each token of "stays" (its first: the prefill)
    seqs = {}

    def watch(b):
        if run.log[-1][0] == "stays":
            sizes.append(b.last_batch)
        if len(run.tokens["goes"]) == 5:
            seqs["goes"].cancelled = True  # as serve.py does when a client goes away
    run = Run(batcher, on_each=watch)
    seqs["goes"] = run.submit("goes", prompts(1)[0], 500, temperature=0)
    run.submit("stays", prompts(1, seed=2)[0], 30, temperature=0)
    run.wait()
    assert len(run.tokens["goes"]) < 10  # it stopped long before its 500 tokens
    steps = sizes[1:]
    assert steps[0] == 2 and steps[-1] == 1 and steps == sorted(steps, reverse=True)


def test_the_cache_stays_in_its_budget_and_the_line_is_bounded(model, monkeypatch):
    slot = Batcher(model, max_batch=1).slot_bytes  # k and v of one position, all layers
    # a request that could never fit is refused at once, with the reason
    with pytest.raises(ValueError, match="need .* MiB of KV cache; this server's cache budget is"):
        Batcher(model, cache_bytes=100 * slot).submit(Sequence([1] * 50, 974, lambda t: None))
    # each request below needs 1000 + 24 = 1024 slots (a long prompt: one prefill, few steps). Growing the block from 2 to 4 rows
    # needs both blocks at once for the copy: 6 x 1024 slots. A budget of 5 x 1024 holds
    # 4 rows alone but not the copy: the batch stays at 2 rows
    budget = 5 * 1024 * slot
    batcher = Batcher(model, max_batch=16, cache_bytes=budget, max_waiting=6)
    # the cache's bytes at the moment a block is made, the old one (being copied from) still
    # held: every block alive then, counted by their own shapes
    live, held = weakref.WeakSet(), []

    class WatchedBlock(decoding.CacheBlock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)
            held.append(sum(batcher.cache_size((b.rows, b.slots)) for b in live))
    monkeypatch.setattr(batcher_module, "CacheBlock", WatchedBlock)
    gate, rows = threading.Event(), []

    def watch(b):  # at every token: the batch's rows; the worker waits at the gate once 2 run
        rows.append(b.last_batch)
        if not gate.is_set() and all(run.tokens[i] for i in range(2)):
            gate.wait(60)
    run = Run(batcher, on_each=watch)
    for i in range(4):
        run.submit(i, [1 + i] * 1000, 24, temperature=0)
    while not all(run.tokens[i] for i in range(2)):  # the worker is now held at the gate
        run.ended[0].wait(0.01)
    for i in range(4, 8):
        run.submit(i, [1 + i] * 1000, 24, temperature=0)  # in line: 2 rows are all the budget allows
    with pytest.raises(Busy, match="2 requests are generating and 6 are waiting"):
        run.submit(8, [1] * 1000, 24, temperature=0)
    gate.set()
    run.wait(*range(8))
    assert all(len(run.tokens[i]) == 24 for i in range(8))  # every accepted request completes
    assert held and max(held) <= budget  # also while a block grows (1 row to 2: 3 x 1024 slots held)
    assert max(rows) == 2


def test_a_long_prompt_holds_the_batch_up_for_its_prefill_and_no_longer(model):
    """A stream runs; a whole-context prompt comes: its prefill makes its first token,
    the next step serves both rows, and the stream goes on after the long one ends."""
    batcher = Batcher(model)
    joined = {}

    def join_at_tenth(b):
        if len(run.tokens["steady"]) == 10 and not joined:
            joined["seq"] = run.submit("long", [7] * 1020, 3, temperature=0)  # 1,020 + 3 of 1,024 positions
    run = Run(batcher, on_each=join_at_tenth)
    run.submit("steady", [1, 2, 3], 40, temperature=0)
    run.wait()
    names = [name for name, _ in run.log]
    first = names.index("long")
    assert first == 10 and names.count("long") == 3
    # prefill: "long" alone; then each step one token for each row, in row order
    assert names[first:first + 5] == ["long", "steady", "long", "steady", "long"]
    assert names[first + 5:] == ["steady"] * (40 - 12)


def test_the_compiled_batch_step_reads_only_its_bucket_and_compiles_once_per_bucket(model, monkeypatch):
    # compile=True: one fixed block of 4 rows x 256 slots, kept for the batcher's life; each
    # step runs over all 4 rows and the bucket of slots its longest row needs (16, 32, ...),
    # never the whole row: compiled once per bucket, then never again, eager's tokens throughout
    import torch._dynamo
    from torch._dynamo.utils import counters

    from smolkit import decoding
    monkeypatch.setattr(decoding, "MIN_SLOTS", 16)
    requests = [(p, 24, dict(temperature=0)) for p in prompts(6, seed=4)]
    eager = Run(Batcher(model, max_batch=4))
    for i, (p, n, sampling) in enumerate(requests):
        eager.submit(i, p, n, **sampling)
    eager.wait()
    torch._dynamo.reset()
    counters.clear()
    slot = Batcher(model, max_batch=1).slot_bytes
    batcher = Batcher(model, max_batch=4, cache_bytes=4 * 256 * slot, compile=True)  # rows of 256 positions
    assert batcher.fixed == (4, 256)
    assert batcher.score_rows == 0  # the fixed block takes the whole budget: none left to score a prompt
    seen, run_step = [], batcher.step.run  # the compiled function: record the shapes it is called with
    batcher.step.run = lambda token, cache, at: (seen.append((token.size(0), cache.max_len)),
                                                 run_step(token, cache, at))[1]
    for attempt in range(2):  # the second time, every bucket is compiled already: a recompilation raises
        with torch._dynamo.config.patch(error_on_recompile=attempt == 1):
            run = Run(batcher)
            for i, (p, n, sampling) in enumerate(requests):  # 6 requests over 4 rows: joins and leaves
                run.submit(i, p, n, **sampling)
            run.wait()
        assert [run.tokens[i] for i in range(6)] == [eager.tokens[i] for i in range(6)]
        if attempt == 0:
            graphs = counters["stats"]["unique_graphs"]
    buckets = {length for _, length in seen}
    longest = max(len(p) for p, _, _ in requests) + 24
    assert {rows for rows, _ in seen} == {4} and max(buckets) == decoding.slots_for(longest, 256) < 256
    assert graphs == len(buckets) == counters["stats"]["unique_graphs"] and len(buckets) >= 2
    with pytest.raises(ValueError, match="do not fit in a row of 256 positions"):
        batcher.submit(Sequence([1] * 200, 100, lambda t: None))


def test_a_compiled_server_compiles_every_bucket_before_its_first_request(model, monkeypatch):
    # the server calls compile_buckets before it listens: afterwards no request compiles anything
    import torch._dynamo
    from torch._dynamo.utils import counters

    from smolkit import decoding
    monkeypatch.setattr(decoding, "MIN_SLOTS", 16)
    torch._dynamo.reset()
    counters.clear()
    slot = Batcher(model, max_batch=1).slot_bytes
    batcher = Batcher(model, max_batch=4, cache_bytes=4 * 64 * slot, compile=True)  # rows of 64 positions
    assert batcher.fixed == (4, 64) and batcher.compile_buckets() == 3  # 16, 32 and 64 slots
    assert counters["stats"]["unique_graphs"] == 3
    with torch._dynamo.config.patch(error_on_recompile=True):  # a compilation now would raise
        run = Run(batcher)
        for i in range(5):  # prompts of 3 to 19 tokens, 40 new each: through every bucket
            run.submit(i, [i + 1] * (3 + 4 * i), 40, temperature=0)
        run.wait()
    assert all(len(run.tokens[i]) == 40 for i in range(5)) and counters["stats"]["unique_graphs"] == 3


def test_a_request_whose_logits_overflow_fails_with_the_reason():
    # fp16 activations past 65,504: the logits are inf or NaN, and the request ends with the
    # reason instead of tokens drawn from garbage
    got, done = [], threading.Event()

    def on_token(token):
        got.append(token)
        if token is None:
            done.set()
    Batcher(fp16_overflowing_model().to(torch.float16)).submit(Sequence([1, 2, 3], 5, on_token))
    assert done.wait(120)
    assert isinstance(got[0], ModelOverflow) and got[1:] == [None]
    assert str(got[0]).startswith("the model's activations overflowed float16 (its logits are inf or NaN)")


def test_a_prompt_is_scored_in_pieces_of_score_rows_positions(model, monkeypatch):
    """score_prompt: every prompt token after the first gets its log-probability and top
    ones, computed score_rows positions at a time (never all T x V logits at once), equal
    to the plain forward pass's log-softmax; then generation goes on as usual."""
    batcher = Batcher(model, cache_bytes=1 << 20)  # 1 MiB: an eighth for scoring, 12 B per logit of 512
    assert batcher.score_rows == (1 << 20) // 8 // (12 * 512) == 21
    assert Batcher(model, cache_bytes=1 << 30).score_rows == 512  # at most 512 positions a piece
    widths, forward = [], SmolLM.forward

    def counting(self, idx, *args, **kw):
        widths.append(idx.size(1))
        return forward(self, idx, *args, **kw)
    monkeypatch.setattr(SmolLM, "forward", counting)
    prompt = prompts(1, seed=3)[0] * 3  # 100 tokens or so
    run = Run(batcher)
    seq = run.submit("scored", prompt, 4, temperature=0, logprobs=2, score_prompt=True)
    run.wait()
    T = len(prompt)
    assert widths[:-3] == [min(21, T - s) for s in range(0, T, 21)]  # the pieces, then 3 one-token steps
    assert len(seq.scores) == T - 1 + 4
    monkeypatch.setattr(SmolLM, "forward", forward)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + run.tokens["scored"]]))[0][0], dim=-1)  # (T + 4, V)
    ids = prompt + run.tokens["scored"]
    for i, (logprob, top) in enumerate(seq.scores):  # score i: token i + 1 given the ones before
        assert abs(logprob - lp[i, ids[i + 1]].item()) < 1e-5
        assert [j for j, _ in top] == lp[i].topk(2).indices.tolist()
    # the generated tokens are greedy: each one's log-probability is its first top one, exactly
    assert all(logprob == top[0][1] for logprob, top in seq.scores[T - 1:])


def test_scoring_counts_against_the_budget_and_max_tokens_0_only_scores(model):
    slot = Batcher(model, max_batch=1).slot_bytes
    assert slot == 512 and Batcher(model).score_row_bytes == 12 * 512
    batcher = Batcher(model, cache_bytes=135_000)  # 263 slots; an eighth is two scoring rows' logits
    assert batcher.score_rows == 2
    with pytest.raises(ValueError, match="of KV cache and scoring"):  # 256 slots + the rows: 143,360 bytes
        batcher.submit(Sequence([1] * 100, 4, lambda t: None, score_prompt=True, logprobs=0))
    batcher.submit(Sequence([1] * 100, 4, lambda t: None))  # the same without scoring fits
    with pytest.raises(ValueError, match="leaves none"):
        Batcher(model, cache_bytes=6000).submit(Sequence([1], 1, lambda t: None, score_prompt=True, logprobs=0))
    run = Run(Batcher(model))
    seq = run.submit("score only", [5, 6, 7, 8], 0, score_prompt=True, logprobs=0)
    run.wait()
    assert run.tokens["score only"] == [] and [top for _, top in seq.scores] == [[], [], []]


def test_a_list_of_requests_is_queued_all_together_or_refused_together(model):
    batcher = Batcher(model, max_batch=1, max_waiting=3, thread=False)  # no worker: the line only fills
    batcher.submit(Sequence([1], 4, lambda t: None))
    with pytest.raises(Busy):
        batcher.submit(*(Sequence([1], 4, lambda t: None) for _ in range(3)))
    assert len(batcher.waiting) == 1  # none of the three went in
    batcher.submit(*(Sequence([1], 4, lambda t: None) for _ in range(2)))
    assert len(batcher.waiting) == 3


def copies_per_step(monkeypatch, clock, watched):
    """What a decoding loop of this project does that would copy between host and GPU, by
    step: clock[0]() gives the step it is in; only the thread watched[0] counts (other tests'
    batchers may still be winding down in theirs). A host-to-device copy is a Tensor.to or torch.tensor
    with a device; a device-to-host copy, a read of values (tolist, item, bool ...), except
    sample_next's reads of its host-side settings (a test on the meta device shows it reads
    no device value)."""
    import sys
    from smolkit.common import ROOT
    events = []

    def project_caller(kind):
        frame = sys._getframe(2)
        name = os.path.abspath(frame.f_code.co_filename)
        return name.startswith(ROOT + os.sep) and os.sep + "tests" + os.sep not in name and \
            not (kind == "to host" and frame.f_code.co_name == "sample_next")

    def spy(kind, original):
        def call(*args, **kwargs):
            if threading.current_thread() is watched[0] and project_caller(kind) and (
                    kind != "to device" or kwargs.get("device") is not None or
                    any(isinstance(a, (str, torch.device)) for a in args[1:])):
                events.append((clock[0](), kind))
            return original(*args, **kwargs)
        return call
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy("to host", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "to", spy("to device", torch.Tensor.to))
    monkeypatch.setattr(torch, "tensor", spy("to device", torch.tensor))
    return events


def test_a_decoding_step_copies_once_each_way(model, monkeypatch):
    # on a GPU each such copy waits for the device (or it for the host): a steady step of
    # sample.py's Decoder and of the server's batch makes one each way, the sampling settings
    # there and the drawn tokens back. The batch copies its inputs once more when rows join or leave
    from collections import Counter
    steps, clock, watched = [0], [lambda: steps[0]], [threading.current_thread()]
    events = copies_per_step(monkeypatch, clock, watched)
    decoder = decoding.Decoder(model)
    for i, _ in enumerate(decoder.stream(torch.tensor([[5, 6, 7]]), 6, temperature=0.8, top_k=20)):
        steps[0] = i + 1
    per_step = Counter(events)
    assert all(per_step[(s, "to device")] == 1 and per_step[(s, "to host")] == 1 for s in range(1, 5)), per_step

    batcher = Batcher(model, max_batch=4, thread=False)
    ended = []
    for seed in (1, 2):  # both admitted before the first step; 8 tokens each
        batcher.submit(Sequence([5, 6, 7], 8, lambda t: ended.append(t) if t is None else None, temperature=0.9,
                                seed=seed))
    events.clear()
    clock[0] = lambda: batcher.steps
    worker = watched[0] = threading.Thread(target=batcher.run, daemon=True)
    worker.start()
    wait_for(lambda: len(ended) == 2, "the two requests did not end")
    per_step = Counter(events)
    assert per_step[(1, "to device")] == 2  # the first step: the rows' inputs, then the settings
    assert all(per_step[(s, "to device")] == 1 and per_step[(s, "to host")] == 1 for s in range(2, 8)), per_step


def test_a_compiled_decoder_keeps_one_block_per_batch_size_and_compiles_each_once(model, monkeypatch):
    # a compiled step's views are marked static (as for CUDA graphs, forced here on the CPU),
    # which keeps them alive: alternating batch sizes (bench.bench runs 1, 16, 1, 16 ...) must
    # reuse each size's block and compilation, not leak a block and compile again every time
    import torch._dynamo
    monkeypatch.setattr(decoding, "MIN_SLOTS", 16)
    made = []

    class CountedBlock(decoding.CacheBlock):
        def __init__(self, *args, **kwargs):
            made.append((args[1], kwargs["static"]))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(decoding, "CacheBlock", CountedBlock)
    torch._dynamo.reset()
    decoder = decoding.Decoder(model, compile=True)
    decoder.step.cuda_graphs = True  # static views, as on CUDA
    prompt = torch.tensor([[5, 6, 7, 8]])
    first = [decoder.generate(prompt.repeat(rows, 1), 6, temperature=0) for rows in (1, 2)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a compilation now would raise
        again = [decoder.generate(prompt.repeat(rows, 1), 6, temperature=0) for rows in (1, 2, 1, 2)]
    assert made == [(1, True), (2, True)]  # one block per batch size, ever
    assert all(torch.equal(a, b) for a, b in zip(again, first * 2))


def test_a_compiled_batch_keeps_its_block_after_a_failed_step(model):
    # the fixed block's views are marked static (kept alive by the compiler): dropping the block
    # after an error and making a new one would leak one a failure, and soon run out of memory
    slot = Batcher(model, max_batch=1).slot_bytes
    batcher = Batcher(model, max_batch=2, cache_bytes=2 * 256 * slot, compile=True)
    failures = [RuntimeError("out of memory, planted")]

    def step(token, cache, input_pos):  # eager (no compile time here), failing once
        if failures:
            raise failures.pop()
        return batcher.step.forward(token, cache, input_pos)
    batcher.step.run = step
    planted = failures[0]
    run = Run(batcher)
    run.submit("failed", [5, 6, 7], 4, temperature=0)
    run.wait(failing=("failed",))
    block = batcher.block
    assert run.errors["failed"] is planted and not failures  # the request ended with the step's failure
    assert block is not None and len(run.tokens["failed"]) == 1  # the prefill's token, then the step failed
    run = Run(batcher)
    run.submit("served", [5, 6, 7], 4, temperature=0)
    run.wait()
    assert batcher.block is block and len(run.tokens["served"]) == 4


def test_the_compile_limit_is_raised_on_every_supported_torch():
    # torch 2.7 renamed dynamo's cache_size_limit to recompile_limit; requirements.txt admits 2.5
    import types
    new, old = types.SimpleNamespace(recompile_limit=8), types.SimpleNamespace(cache_size_limit=8)
    decoding.allow_recompiles(64, new), decoding.allow_recompiles(64, old)
    assert (new.recompile_limit, old.cache_size_limit) == (64, 64)
    decoding.allow_recompiles(16, new)
    assert new.recompile_limit == 64  # never lowered

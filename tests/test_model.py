"""The model: sizes, names, the pieces against their textbook definitions, the KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import smol
from smol import KVCache, SmolConfig, SmolLM, apply_rope, rope_tables, sample_next
from smolkit import decoding
from smolkit.decoding import Decoder
from smolkit.metrics import param_breakdown

TINY = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, block_size=64)


def tiny(**overrides):
    torch.manual_seed(0)
    return SmolLM(SmolConfig(**{**TINY, **overrides})).eval()


def test_parameter_count_of_smollm2_135m():
    with torch.device("meta"):  # shapes only, no memory, no init time
        model = SmolLM(SmolConfig())
    assert model.num_params() == 134_515_008
    assert model.model.embed_tokens.weight.numel() == 28_311_552
    layer = model.model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == 3_540_096
    sizes = {n: p.numel() for n, p in layer.named_parameters()}
    assert sizes["self_attn.q_proj.weight"] == sizes["self_attn.o_proj.weight"] == 331_776
    assert sizes["self_attn.k_proj.weight"] == sizes["self_attn.v_proj.weight"] == 110_592
    assert sizes["mlp.gate_proj.weight"] == sizes["mlp.up_proj.weight"] == sizes["mlp.down_proj.weight"] == 884_736
    assert "134,515,008" in param_breakdown(model) and "3,540,096" in param_breakdown(model)


def test_state_dict_names_match_official_checkpoints():
    keys = set(tiny().state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    assert keys == expected  # no rope tables, no extra buffers


def test_lm_head_is_tied_to_embedding():
    m = tiny()
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_forward_shapes_and_initial_loss():
    m = tiny()
    idx = torch.randint(0, 512, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 512) and loss is None
    _, loss = m(idx, torch.randint(0, 512, (3, 16)))
    # the final norm gives unit-RMS features, so logits ~ N(0, s2) with s2 = C * init_std^2,
    # and the expected loss of random targets is about ln(V) + s2 / 2
    s2 = m.config.n_embd * m.config.init_std ** 2
    assert abs(loss.item() - (math.log(512) + s2 / 2)) < 0.15
    # the loss alone is ln(V) give or take 0.15 at any small std (0.02 instead of init_std passed it):
    # the logits' variance is s2 itself (0.108 here for 0.111), and every matrix is drawn at init_std
    assert abs(logits.var().item() / s2 - 1) < 0.1, (logits.var().item(), s2)
    for n, p in m.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() / m.config.init_std - 1) < 0.05, (n, p.std().item())


def test_rope_matches_complex_rotation():
    # rotate_half layout: channel i pairs with channel i + hd/2, and the pair turns by
    # pos * theta^(-2i/hd), i.e. multiplication by e^{i angle} of x[i] + j x[i + hd/2]
    hd, theta = 8, 10000.0
    cos, sin = rope_tables(hd, 16, theta)
    x = torch.randn(1, 1, 16, hd)
    got = apply_rope(x, cos, sin)
    pos = torch.arange(16.0)[:, None]
    freq = theta ** (-torch.arange(0, hd, 2).float() / hd)
    z = torch.complex(x[..., :hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones(16, hd // 2), pos * freq)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), atol=1e-5, rtol=1e-5)


def test_attention_equals_explicit_grouped_query_attention():
    m = tiny()
    attn, cfg = m.model.layers[0].self_attn, m.config
    B, T, hd = 2, 10, cfg.head_dim
    x = torch.randn(B, T, cfg.n_embd)
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    q = apply_rope(attn.q_proj(x).view(B, T, 4, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, 2, hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, 2, hd).transpose(1, 2)
    # query heads 0,1 share kv head 0; heads 2,3 share kv head 1
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(y), atol=1e-5, rtol=1e-5)


def test_rmsnorm_and_swiglu_definitions():
    m = tiny()
    block = m.model.layers[0]
    x = torch.randn(2, 5, 64)
    block.input_layernorm.weight.data.uniform_(0.5, 1.5)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * block.input_layernorm.weight
    torch.testing.assert_close(block.input_layernorm(x), expected)
    mlp = block.mlp
    expected = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_kv_cache_greedy_equals_recompute(heads):
    m = tiny(n_head=heads[0], n_kv_head=heads[1])
    prompt = torch.randint(0, 512, (2, 7))
    with_cache = m.generate(prompt, 24, temperature=0)
    seq = prompt
    for _ in range(24):  # no cache: run the whole sequence every step
        logits, _ = m(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(with_cache, seq)


def test_each_row_stops_at_its_own_stop_id():
    m = tiny()
    prompt = torch.randint(0, 512, (2, 5))
    free = m.generate(prompt, 12, temperature=0)[:, 5:]  # no stop ids: the full 12 tokens
    # a stop id that row 0 writes later than row 1 does (or row 1 never does), so the rows end apart
    stop = next(t for t in free[0].tolist()[1:] if t not in free[0].tolist()[:1])
    got = m.generate(prompt, 12, temperature=0, stop_ids={stop})[:, 5:]
    ends = []
    for row in range(2):
        hits = (free[row] == stop).nonzero()
        end = hits[0].item() + 1 if len(hits) else 12
        assert torch.equal(got[row, :end], free[row, :end])  # same tokens up to and including the stop
        assert (got[row, end:] == stop).all()  # then padded with the stop id
        ends.append(end)
    assert ends[0] != ends[1] and got.size(1) == max(ends)  # rows end apart; the stream ends with the last
    tokens = list(Decoder(m).stream(prompt[:1], 12, temperature=0, stop_ids=[stop]))
    assert len(tokens) == ends[0] and tokens[-1] == [stop]  # batch 1: the stop id is the last token


def positions(B, start, stop):
    return torch.arange(start, stop).expand(B, -1)  # (B, stop - start): every row at the same place


def test_chunks_after_a_cached_prefix_give_the_logits_of_one_pass():
    # one forward for all of it: a prompt, one token, a chunk, another, each at its positions
    m = tiny()
    seq = torch.randint(0, 512, (2, 30))
    full, _ = m(seq)
    cache = KVCache.zeros(m.config, 2, 32, "cpu", torch.float32)  # two slots never written: masked
    parts = [m(seq[:, a:b], kv_cache=cache, input_pos=positions(2, a, b))[0]
             for a, b in ((0, 11), (11, 12), (12, 25), (25, 30))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_decode_in_one_pass_as_if_alone():
    # continuous batching: one forward over rows that stand at different positions (each its
    # own RoPE angle, mask and cache slot) gives each row the logits it has alone
    m = tiny()
    prompts = [torch.randint(0, 512, (1, n)) for n in (3, 9, 5)]
    nxt = torch.randint(0, 512, (3, 1))
    batch = KVCache.zeros(m.config, 3, 16, "cpu", torch.float32)
    for row, p in enumerate(prompts):  # each prompt read on its own, into its row of the batch
        m(p, kv_cache=KVCache([t[row:row + 1] for t in batch.k], [t[row:row + 1] for t in batch.v]))
    at = torch.tensor([[3], [9], [5]])  # (3, 1): each row's next position
    alone = torch.cat([m(torch.cat([p, nxt[row:row + 1]], 1))[0][:, -1] for row, p in enumerate(prompts)])
    stepped = m(nxt, kv_cache=batch, input_pos=at)[0][:, -1]  # (3, V): over all 16 slots, each row masked
    torch.testing.assert_close(stepped, alone, atol=1e-5, rtol=1e-5)
    # the same over a view of the first 10 slots only, which writes into the same memory
    again = m(nxt, kv_cache=KVCache([t[:, :, :10] for t in batch.k], [t[:, :, :10] for t in batch.v]),
              input_pos=at)[0][:, -1]
    torch.testing.assert_close(again, alone, atol=1e-5, rtol=1e-5)
    assert not torch.equal(stepped, m(nxt.flip(0), kv_cache=batch, input_pos=at)[0][:, -1])  # each row reads its own


def test_prefill_can_return_the_last_position_only():
    m = tiny()
    seq = torch.randint(0, 512, (2, 12))
    full, _ = m(seq)
    last, _ = m(seq, kv_cache=KVCache.zeros(m.config, 2, 12, "cpu", torch.float32), last_only=True)
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_eager_decoding_attends_over_the_filled_slots_only():
    # the cache holds the whole call (or more), but each eager step reads the filled slots
    # only: a short prompt does not pay for the context's 1,024 slots
    m = tiny(max_position_embeddings=1024)
    seen = []
    forward = m.forward

    def recording(idx, kv_cache=None, **kw):
        seen.append(kv_cache.max_len)
        return forward(idx, kv_cache=kv_cache, **kw)
    m.forward = recording
    prompt = torch.randint(0, 512, (2, 5))
    out = Decoder(m).generate(prompt, 7, temperature=0)
    assert seen == [5, 6, 7, 8, 9, 10, 11]  # the prompt's 5, then one more at each step (the last token needs none)
    del m.forward
    assert torch.equal(out, m.generate(prompt, 7, temperature=0))


def test_greedy_tokens_are_those_of_the_two_paths_before_them():
    # tests/data/greedy-987d79e.json: what generate gave before prompt and decode became one
    # forward (a batch of two prompts, and three prompts of 3, 9 and 5 tokens alone). The
    # plain loop, the fast decoder and a server's batch (rows at different positions) agree
    import json
    import os
    import threading

    from server.batcher import Batcher, Sequence
    with open(os.path.join(os.path.dirname(__file__), "data", "greedy-987d79e.json")) as f:
        known = json.load(f)
    m = tiny(init_std=0.3)  # large weights: every token is clear-cut, none repeats for long
    prompt = torch.tensor(known["batch"]["prompt"])
    for decode in (m.generate, Decoder(m).generate):
        assert decode(prompt, 40, temperature=0)[:, 7:].tolist() == known["batch"]["greedy"]
    batcher, got, ended = Batcher(m, max_batch=4), [[], [], []], [threading.Event() for _ in range(3)]
    for i, row in enumerate(known["rows"]):
        batcher.submit(Sequence(row["prompt"], 24, lambda t, i=i: ended[i].set() if t is None else got[i].append(t),
                                temperature=0))
    assert all(e.wait(120) for e in ended)
    assert got == [row["greedy"] for row in known["rows"]]
    assert batcher.steps < 3 * 23  # they shared steps


def test_sampling_filters_and_seed():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    assert sample_next(logits, top_k=1).item() == 1
    assert sample_next(logits, top_p=1e-6).item() == 1  # the nucleus holds just the top token
    # top_p keeps tokens until their mass reaches p: here the top two (0.66 + 0.24)
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    m = tiny()
    prompt = torch.randint(0, 512, (1, 4))
    a = m.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    b = m.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8),
                                      dict(temperature=1.5, top_k=4, top_p=0.9)], ids=["T", "top_k", "top_p", "all"])
def test_sampled_tokens_follow_the_filtered_distribution(settings):
    # 20,000 draws from one seed (so the test is deterministic) against the textbook distribution:
    # softmax(logits / T), cut to the top_k likeliest, then to the fewest whose mass reaches top_p
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 1.5, 0.0]])
    T, k, p = settings.get("temperature", 1.0), settings.get("top_k", 6), settings.get("top_p", 1.0)
    probs = (logits[0] / T).softmax(-1)
    order = probs.argsort(descending=True)[:k]
    kept, mass = [], 0.0
    for i in order.tolist():
        if mass >= p:
            break
        kept.append(i)
        mass += probs[i].item() / probs[order].sum().item()
    expected = torch.zeros(6)
    expected[kept] = probs[kept] / probs[kept].sum()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, 6), generator=g, **settings).view(-1)
    seen = torch.bincount(draws, minlength=6) / 20000
    assert (seen - expected).abs().max() < 0.015, (seen, expected)  # 4 standard deviations at most
    assert (seen[expected == 0] == 0).all()  # a token cut away is never drawn


def test_each_row_of_a_batch_samples_with_its_own_settings_as_if_alone():
    # a server samples its whole batch in one call: row b's token depends on its own logits,
    # settings and random number only, never on the other rows (or how many there are)
    g = torch.Generator().manual_seed(0)
    logits, u = torch.randn(5, 512, generator=g) * 3, torch.rand(5, 1, generator=g)
    rows = [dict(temperature=0.0, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=0, top_p=1.0),
            dict(temperature=0.8, top_k=20, top_p=1.0), dict(temperature=1.2, top_k=0, top_p=0.5),
            dict(temperature=0.9, top_k=50, top_p=0.9)]
    per_row = {name: torch.tensor([r[name] for r in rows]) for name in ("temperature", "top_k", "top_p")}
    together = sample_next(logits, uniform=u, **per_row)
    alone = torch.cat([sample_next(logits[b:b + 1], uniform=u[b:b + 1], **rows[b]) for b in range(5)])
    assert torch.equal(together, alone)
    assert together[0].item() == logits[0].argmax().item()  # temperature 0: greedy
    last_two = sample_next(logits[3:], uniform=u[3:], **{n: t[3:] for n, t in per_row.items()})
    assert torch.equal(last_two, together[3:])


def test_too_long_generation_is_refused():
    m = tiny(max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Decoder(m).generate(torch.zeros(1, 60, dtype=torch.long), 10)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=50, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_plain_generate_and_the_fast_decoder_give_the_same_tokens(sampling):
    # smol.py's generate (a forward pass per token over a growing cache) and engine.py's
    # Decoder (a fixed-shape step over a pre-allocated, masked cache) are one algorithm:
    # same tokens, same stops, from the same seed
    m = tiny()
    prompt = torch.randint(0, 512, (2, 6))
    free = m.generate(prompt, 20, generator=torch.Generator().manual_seed(5), **sampling)
    stop = free[0, 10].item()  # a token row 0 writes, so at least one row stops early
    for stop_ids in ((), {stop}):
        plain = m.generate(prompt, 20, generator=torch.Generator().manual_seed(5), stop_ids=stop_ids, **sampling)
        fast = Decoder(m).generate(prompt, 20, generator=torch.Generator().manual_seed(5), stop_ids=stop_ids,
                                   **sampling)
        assert torch.equal(plain, fast), stop_ids
    first = (plain[0, 6:] == stop).nonzero()[0].item()  # row 0 stopped, and was padded from there
    assert (plain[0, 6 + first:] == stop).all()


@pytest.mark.parametrize("bad, msg", [(dict(n_head=5), "divisible by n_head"), (dict(n_kv_head=3), "n_kv_head"),
                                      (dict(block_size=10_000), "max_position_embeddings"),
                                      (dict(n_layer=0), "n_layer must be positive")])
def test_config_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SmolConfig(**{**TINY, **bad}).validate()


def test_overfits_one_batch():
    # the real vocabulary, a tiny body: memorising one batch must drive the loss
    # from about ln(49152) = 10.8 to almost nothing
    torch.manual_seed(0)
    m = SmolLM(SmolConfig(**{**TINY, "vocab_size": 49152}))
    x = torch.randint(0, 49152, (2, 33))
    opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    first = None
    for _ in range(80):
        _, loss = m(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 10.5 and loss.item() < 0.5, (first, loss.item())


def test_compiled_decoding_equals_eager_and_compiles_once_per_bucket(monkeypatch):
    # a step's shapes change only when the longest row crosses into the next bucket of
    # slots, so torch.compile compiles once per bucket: 64 steps from a 5-token prompt
    # cross buckets 16, 32, 64 and 128 (four compilations), and a second prompt of another
    # length must give eager's greedy tokens without compiling anything again
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(decoding, "MIN_SLOTS", 16)
    m = tiny(max_position_embeddings=256)
    prompts = [torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 17))]
    eager = [Decoder(m).generate(p, 64, temperature=0) for p in prompts]
    torch._dynamo.reset()
    counters.clear()
    compiled = Decoder(m, compile=True)
    assert torch.equal(compiled.generate(prompts[0], 64, temperature=0), eager[0])
    assert counters["stats"]["unique_graphs"] == 4
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation now raises
        for p, e in zip(prompts, eager):
            assert torch.equal(compiled.generate(p, 64, temperature=0), e)
    assert counters["stats"]["unique_graphs"] == 4


def test_the_compiled_step_writes_the_cache_in_place():
    # written through one big (layers, B, nkv, slots, hd) tensor, the compiled step
    # copied each layer's whole cache at every token: 2.6x slower than eager at batch 16
    # on the full model (bench/NOTES.md). Its C++ then has loops as long as a layer's
    # cache (2 rows x 2 heads x 1,024 slots x 16 = 65,536); written in place, no loop is
    # longer than the mask over the slots
    import re

    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    m = tiny()  # 2 key/value heads of 16 channels
    cache = KVCache.zeros(m.config, 2, 1024, "cpu", torch.float32)
    step = decoding.Step(m)
    token, at = torch.tensor([[1], [2]]), torch.tensor([[5], [5]])
    with torch.inference_mode():
        m(torch.randint(0, 512, (2, 5)), kv_cache=cache)
        eager = step.forward(token, cache, at)
        compiled, code = run_and_get_code(torch.compile(step.forward, fullgraph=True, dynamic=False),
                                          token, cache, at)
    bounds = [int(b) for b in re.findall(r"<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
    assert bounds and max(bounds) <= 1024, sorted(set(bounds))  # loop bounds found, none over a layer's cache
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("rows, pieces", [(None, 0), (60, 0), (8, 8), (7, 9), (1, 60)])
def test_chunked_loss_equals_plain_cross_entropy_with_its_gradients(monkeypatch, rows, pieces):
    # 60 rows x 512 classes: one piece (no checkpointing) for None or when they fit, else pieces of `rows`
    calls = []
    monkeypatch.setattr(smol, "checkpoint", lambda f, x, *a, **kw: calls.append(x.size(0)) or checkpoint(f, x, *a, **kw))
    m = tiny()
    m.loss_rows_per_piece = rows
    x, y = torch.randint(0, 512, (3, 20)), torch.randint(0, 512, (3, 20))
    y[0, :4] = -1  # ignored positions count in neither loss
    _, loss = m(x, y)
    loss.backward()
    assert len(calls) == pieces and sum(calls) == (60 if pieces else 0)
    assert all(n <= rows for n in calls)
    chunked = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # the textbook path: all the logits at once
    logits = m(x)[0]
    plain = F.cross_entropy(logits.view(-1, 512), y.view(-1), ignore_index=-1)
    plain.backward()
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_a_search_that_lands_on_a_removed_token_takes_the_likeliest(monkeypatch):
    # on a GPU a parallel cumsum may dip by a few ulps, so the inverse-CDF search can land on a
    # token top_k removed; stand in for that by a search that lands on the least likely token
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 2.5, 0.2]])
    monkeypatch.setattr(torch, "searchsorted", lambda cdf, u, right: torch.full_like(u, 3, dtype=torch.long))
    assert sample_next(logits, top_k=2, uniform=torch.rand(2, 1)).view(-1).tolist() == [1, 2]
    assert sample_next(logits, uniform=torch.rand(2, 1)).view(-1).tolist() == [3, 3]  # nothing removed: kept


def moves_to_another_device(monkeypatch):
    """Record every Tensor.to that moves a tensor to another device: on a GPU, a copy."""
    moves, to = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if out.device != self.device:
            moves.append((self.device.type, out.device.type))
        return out
    monkeypatch.setattr(torch.Tensor, "to", spy)
    return moves


def test_a_draw_copies_its_settings_to_the_device_once_and_never_waits_for_it(monkeypatch):
    # logits on the meta device stand in for a GPU's: any read of a device value (.item(), a
    # bool, .tolist(), .cpu()) would raise there, so a draw that ends asked the device nothing;
    # and the settings (with a host uniform) reach it in one copy, per row or not
    moves = moves_to_another_device(monkeypatch)
    logits = torch.randn(3, 512).to("meta")
    moves.clear()
    per_row = sample_next(logits, torch.tensor([0.0, 0.8, 1.2]), torch.tensor([0, 20, 0]),
                          torch.tensor([1.0, 1.0, 0.5]), uniform=torch.rand(3, 1))
    assert per_row.shape == (3, 1) and moves == [("cpu", "meta")]
    u = torch.rand(3, 1).to("meta")  # drawn on the device, as Decoder's generator does there
    moves.clear()
    one = sample_next(logits, 0.7, 50, 0.9, uniform=u)
    assert one.shape == (3, 1) and moves == [("cpu", "meta")]

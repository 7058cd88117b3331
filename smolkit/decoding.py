"""
Inference for sample.py and the server: the model a user names, on its device and in its
dtype, and fast decoding of it.

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
tokens as smol.py's generate from the same generator. The server's Batcher
(server/batcher.py) decodes many requests at once, each at its own position, with the
same Step over a CacheBlock.

    decoder = Decoder(model, compile=True)
    for ids in decoder.stream(idx, 200, temperature=0.8, stop_ids={0}):  # B ids a step
        ...
"""
from contextlib import contextmanager

import torch

from smol import KVCache, sample_next
from smolkit.common import UserError, inference_dtype, pick_device
from smolkit.grammar import masked_logits
from smolkit.models import load_model
from smolkit.quantize import check, quantize

MIN_SLOTS = 256  # the fewest cache slots a block holds or a step reads: at most this many more than it needs


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


def slots_for(n, context):
    """The one rounding rule for cache slots, of a block and of a step alike: n positions
    round up to the next power of two (a bucket), at least MIN_SLOTS, at most the context."""
    return min(max(MIN_SLOTS, 1 << max(0, n - 1).bit_length()), context)


class CacheBlock:
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
        """view(rows, length) for a step: kept (and marked static) as the CacheBlock was asked."""
        if not self.keep:
            return self.view(rows, length)
        if (rows, length) not in self.views:
            self.views[rows, length] = view = self.view(rows, length)
            for t in (view.k + view.v) if self.static else ():
                torch._dynamo.mark_static_address(t)
        return self.views[rows, length]


def allow_recompiles(n, config=torch._dynamo.config):
    """Let dynamo keep at least n compilations of one function: recompile_limit from torch 2.7,
    cache_size_limit before it (requirements.txt admits torch 2.5)."""
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), n))


class Step:
    """One decoding step: the logits (B, V) after each row's token (B, 1) at its position
    input_pos (B, 1), through smol's forward over the first B rows of a CacheBlock and the
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
            allow_recompiles(64)  # every bucket and batch shape is a compilation of this one function
            how = dict(mode="reduce-overhead") if self.cuda_graphs else dict(options={"cpp_wrapper": True})
            self.run = torch.compile(self.forward, fullgraph=True, dynamic=False, **how)

    def forward(self, token, cache, input_pos):
        return self.model(token, kv_cache=cache, input_pos=input_pos)[0][:, -1]  # (B, V)

    def __call__(self, token, block, input_pos, filled):
        shape = (token.size(0), slots_for(filled, block.slots) if self.compile else filled)
        view = block.step_view(*shape)
        with step_kernels(token.size(0), view):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are done with
            return self.run(token, view, input_pos)


class Decoder:
    """Fast decoding of one model for sample.py, one stream at a time: a cache block per batch
    size, kept from call to call (grown when an eager call needs more). Kept, never replaced
    by a block of the same shape: a compiled step's views are marked static, which keeps them
    alive until torch._dynamo.reset(), so a new block per call would leak one each time (and
    compile the step again); a batch size seen again reuses its block and its compilation."""

    def __init__(self, model, compile=False):
        self.model, self.step, self.blocks = model, Step(model, compile), {}

    def _block(self, B, slots, device, dtype):
        key = (B, torch.device(device), dtype)
        if key not in self.blocks or self.blocks[key].slots < slots:
            self.blocks.pop(key, None)  # free the old one first
            self.blocks[key] = CacheBlock(self.model.config, B, slots, device, dtype, keep=self.step.compile,
                                          static=self.step.cuda_graphs)
        return self.blocks[key]

    @torch.inference_mode()  # like no_grad, and also skips autograd's version bookkeeping: faster small ops
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=(),
               constraints=None):
        """Yield each step's new tokens as a list of B ids. The prompt idx (B, T) is read once
        into the cache (prefill, eager); each later step feeds one token per row. A row that
        samples one of stop_ids is finished: it yields that id, then repeats it while other
        rows go on; the stream ends when all rows are done. A step copies to the device once
        (the sampling settings) and back once (these ids): on a GPU each copy waits.
        constraints: a grammar.Constraint per row (None: free), whose mask each draw obeys."""
        constraints = constraints or [None] * idx.size(0)
        model, context = self.model, self.model.config.max_position_embeddings
        B, T = idx.size()
        if T + max_new_tokens > context:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({context})")
        # compiled, the block holds the whole context: its strides are part of every compiled
        # step's shape, so it must never change (as it would when a chat's prompt grows)
        slots = context if self.step.compile else slots_for(T + max_new_tokens, context)
        block = self._block(B, slots, idx.device, model.model.norm.weight.dtype)
        stop, ended = set(stop_ids), [None] * B  # ended[b]: the stop id row b finished with
        logits = model(idx, kv_cache=block.view(B, T), last_only=True)[0][:, -1]  # (B, V)
        for pos in range(T, T + max_new_tokens):
            token = sample_next(masked_logits(logits, constraints), temperature, top_k, top_p, generator)  # (B, 1)
            ids = [i if e is None else e for i, e in zip(token.view(-1).tolist(), ended)]  # the copy to the host
            for c, i, e in zip(constraints, ids, ended):
                if c is not None and e is None:
                    c.advance(i)
            ended = [i if e is None and i in stop else e for i, e in zip(ids, ended)]
            yield ids
            if pos == T + max_new_tokens - 1 or (stop and None not in ended):
                break  # the last token needs no logits of its own
            # a finished row goes on with whatever it drew: its tokens are never read
            logits = self.step(token, block, torch.full((B, 1), pos, device=idx.device), filled=pos + 1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stop_ids=()):
        """As smol.py's generate: idx (B, T) extended to (B, T + new), new <= max_new_tokens
        (fewer when every row stopped early; finished rows are padded with their stop id)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids))  # (new, B)
        return torch.cat([idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).view(-1, idx.size(0)).T], dim=1)


class ModelOverflow(Exception):
    """The model's activations overflowed its dtype (fp16's largest number is 65,504): the
    logits are inf or NaN, and sample_next gave the id -1."""

    def __init__(self, dtype):
        name = str(dtype).removeprefix("torch.")
        super().__init__(f"the model's activations overflowed {name} (its logits are inf or NaN); run it with "
                         f"--dtype float32, or bfloat16 where the hardware computes it")

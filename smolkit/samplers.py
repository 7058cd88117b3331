"""
The batches a training step reads, from the arrays smolkit/data.py and
smolkit/conversations.py make, and how the processes of a torchrun job share them:

    BatchSampler         random windows of block_size + 1 tokens of a text corpus
    ConversationSampler  whole conversations, packed several to a row or one a row, padded
    PairSampler          preference pairs for DPO, each two rows (the prompt + either reply)
    open_data            the sampler for --data, and the settings the data decides

Conversations are packed (pack()): several to a row, each with positions from 0, which
smol.py reads as a block-diagonal mask (packed_mask), so that no token sees another
conversation; or, with --packing false, one to a row. Rows are padded at the end to the
longest of the micro batch (rounded up to PAD_TO), not to block_size.
"""
import math

import numpy as np
import torch

from smol import EOT_ID, IM_END_ID
from smolkit.common import UserError
from smolkit.conversations import data_kind, load_conversations
from smolkit.data import load_splits
from smolkit.preferences import load_pairs, reply_logps

PAD_TO = 64  # conversation rows are padded to a multiple of this: few distinct shapes for torch.compile


def to_device(t, device):
    if device.startswith("cuda"):  # pinned: the copy runs while the device computes
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def document_positions(x):
    """(B, T) positions for windows x (B, T) of a corpus, counting from 0 at each row's start and
    again after every <|endoftext|>: smol.py's packed_mask then keeps each document to itself
    (--doc_mask, SmolLM3's intra-document masking)."""
    t = torch.arange(x.size(1)).expand_as(x)
    starts = torch.cat([torch.ones_like(x[:, :1], dtype=torch.bool), x[:, :-1] == EOT_ID], 1)
    return t - torch.cummax(torch.where(starts, t, 0), dim=1).values


def shard(batch_size, accum, world):
    """How `world` processes share an optimizer step of `accum` micro steps of `batch_size`
    rows, so that the tokens of a step, and with the same seed its rows, are those of one
    process: (micro steps, rows per micro step) of each. Whole micro steps where they divide
    (fewer, bigger matmuls); else a share of every micro step's rows (the defaults, 1 x 16,
    on 2, 4 or 8 GPUs)."""
    if accum % world == 0:
        return accum // world, batch_size
    if batch_size % world == 0:
        return accum, batch_size // world
    raise UserError(f"{world} processes cannot share a step of --gradient_accumulation_steps {accum} x --batch_size "
                    f"{batch_size} rows equally: make one of the two a multiple of {world}")


class BatchSampler:
    """Random windows of block_size + 1 tokens from a split: x is the first block_size
    tokens of each, y the same shifted by one. Every process draws the offsets of the
    whole global step (micro_steps x batch_size) from identically seeded generators and
    keeps its own share (see shard()): the rows of a step are the same for 1 process as
    for N, and resuming needs only one generator state whatever the number of processes.

    Training batches come one ahead: prefetch() builds the next micro batch and starts its
    copy to the device while the device still works on the current one."""

    KIND = "text"  # what --data holds (conversations.data_kind)

    def __init__(self, splits, block_size, batch_size, device, seed, share=(0, 1, 1), doc_mask=False):
        self.splits, self.block_size, self.batch_size = splits, block_size, batch_size
        self.device, self.seed, self.doc_mask = device, seed, doc_mask
        self.rank, self.world, self.micro_steps = share  # (this process, processes, micro steps of a step)
        self.accum, self.rows = shard(batch_size, self.micro_steps, self.world)  # this process's share
        # the training draws come from this generator alone, and the checkpoint saves its
        # state, so a resumed run draws exactly the batches the uninterrupted run would have
        self.generator = torch.Generator().manual_seed(seed)
        self.todo = iter(())  # the offsets of this step's micro batches not built yet
        self.ahead = None  # the next micro batch, built: (x, y, the generator's state before its
                           # step was drawn if it is a step's first, else None)

    def lengths(self):
        """(a row's tokens, its own tokens on average): block_size both, windows have no padding."""
        return self.block_size, self.block_size

    def offsets(self, split, generator, micro_steps):
        # (micro_steps, B) window starts
        return torch.randint(len(self.splits[split]) - self.block_size, (micro_steps, self.batch_size),
                             generator=generator)

    def batch(self, split, offsets):
        # offsets: (B,) window starts -> x, y: (B, T) int64, y shifted by one token
        data = self.splits[split]
        xy = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in offsets.tolist()]).astype(np.int64))
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if self.doc_mask:  # each document kept to itself: x comes with positions that restart at each
            return (to_device(x, self.device), to_device(document_positions(x), self.device)), to_device(y, self.device)
        return to_device(x, self.device), to_device(y, self.device)

    def my_offsets(self):
        """This process's share of a new step's offsets: (micro steps, rows) of shard()."""
        steps = self.offsets("train", self.generator, self.micro_steps)  # (micro_steps, B), every process alike
        if self.rows == self.batch_size:  # whole micro steps
            return steps[self.rank * self.accum:(self.rank + 1) * self.accum]
        return steps[:, self.rank * self.rows:(self.rank + 1) * self.rows]

    def prefetch(self):
        """Build the next training micro batch now (a no-op if it is built)."""
        if self.ahead is not None:
            return
        offsets, starts = next(self.todo, None), False
        if offsets is None:  # the step is read: draw the next one
            state = self.generator.get_state()
            self.todo, starts = iter(self.my_offsets()), True
            offsets = next(self.todo)
        self.ahead = (*self.batch("train", offsets), state if starts else None)

    def next(self):
        """The next training micro batch (x, y) on the device, and its weight in the step's
        loss: every micro batch holds as many targets, so 1 / this process's micro steps."""
        self.prefetch()
        (x, y, _), self.ahead = self.ahead, None
        return x, y, 1 / self.accum

    def resume_state(self):
        """The generator state a resumed run starts from: the one before the draw of the
        first step not yet trained (that step's first batch may already be built ahead)."""
        if self.ahead is not None and self.ahead[2] is not None:
            return self.ahead[2]
        return self.generator.get_state()

    def restore(self, state):
        self.generator.set_state(state)

    def eval_batches(self, split, n):
        # a fresh generator with the run's seed: the same n batches at every evaluation,
        # so the losses are comparable from one evaluation to the next
        generator = torch.Generator().manual_seed(self.seed)
        return (self.batch(split, offsets) for offsets in self.offsets(split, generator, n))


def fit(ids, targets, bounds, length):
    """[(start, end)] of the conversations that fit rows of `length` tokens: one longer than
    that loses its trailing turns (it ends after the last assistant <|im_end|> that fits);
    one whose first assistant turn does not fit is dropped. Returns (spans, cut, dropped)."""
    spans, cut, dropped = [], 0, 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b - a <= length:
            spans.append((a, b))
            continue
        window = slice(a, a + length)
        ends = np.flatnonzero((ids[window] == IM_END_ID) & targets[window])
        if len(ends):
            spans.append((a, a + int(ends[-1]) + 1))
            cut += 1
        else:
            dropped += 1
    return spans, cut, dropped


def pack(lengths, room):
    """Rows for sequences of these lengths: lists of their indices, each row summing to at most
    `room` tokens (a longer sequence alone in its row), filled best-fit in decreasing length:
    each sequence goes where it leaves the least room. A pure function of the lengths."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(room - lengths[i])
    return rows


def split(n):
    """(train, val) conversation numbers: every 20th (5%) held out from 20 conversations on;
    fewer are all for training, and the validation loss is on them too."""
    if n < 20:
        return list(range(n)), list(range(n))
    return [i for i in range(n) if i % 20 != 19], [i for i in range(n) if i % 20 == 19]


class ConversationSampler:
    """Batches of whole conversations, packed or one a row (batch()), for train.py: the
    interface of BatchSampler (next, prefetch, lengths, resume_state, restore, eval_batches).
    Each pass over the training conversations takes them in an order shuffled from (seed,
    pass): the k-th conversation ever drawn is a function of k alone, so resuming needs only
    how many were drawn."""

    def __init__(self, data, block_size, batch_size, device, seed, share=(0, 1, 1), pack_len=None):
        ids, targets, bounds = data
        self.ids, self.targets, self.pack_len = ids, targets, pack_len  # pack_len None: one conversation a row
        spans, self.cut, self.dropped = self.fit(bounds, block_size + 1)  # x and y: one more token
        if not spans:
            raise UserError(self.NOTHING_FITS.format(block_size))
        train, val = split(len(spans))
        self.held_out = val != train
        self.splits = {"train": [spans[i] for i in train], "val": [spans[i] for i in val]}
        self.batch_size, self.device, self.seed = batch_size, device, seed
        rank, world, micro_steps = share
        self.accum, self.rows = shard(batch_size, micro_steps, world)
        self.rank, self.world, self.micro_steps = rank, world, micro_steps
        self.drawn = 0  # training rows drawn so far, every process's
        self.todo, self.ahead = [], None
        self.order = (None, None)  # (pass, its shuffled order)

    KIND, WHAT, DROPPED = "conversations", "conversations", "their first reply does not fit"
    NOTHING_FITS = "no conversation's first assistant turn fits in block_size {}; raise --block_size"

    def fit(self, bounds, length):
        """(what is drawn, here each conversation's (start, end), cut, dropped): fit()."""
        return fit(self.ids, self.targets, bounds, length)

    def lengths(self):
        """(the longest row's tokens, padded; the mean row's own tokens) of the training split."""
        n = [b - a - 1 for a, b in self.splits["train"]]
        return math.ceil(max(n) / PAD_TO) * PAD_TO, sum(n) / len(n)

    def eval_size(self):
        """Batches that hold every validation conversation once."""
        return max(1, math.ceil(len(self.splits["val"]) / self.batch_size))

    def describe(self):
        n = {k: len(v) for k, v in self.splits.items()}
        return (f"{n['train']:,} train / {n['val'] if self.held_out else 0:,} val {self.WHAT}"
                + ("" if self.held_out else " (under 20: the val figures are on the training ones)")
                + (f", {self.cut:,} cut to the context" if self.cut else "")
                + (f", {self.dropped:,} dropped ({self.DROPPED})" if self.dropped else "")
                + (f", packed into rows of up to {self.pack_len:,} tokens" if self.pack_len else ""))

    def row(self, k):
        # the k-th training conversation drawn: pass k // n, in that pass's shuffled order
        n = len(self.splits["train"])
        if self.order[0] != k // n:
            self.order = (k // n, torch.randperm(n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + k // n)).tolist())
        return self.splits["train"][self.order[1][k % n]]

    def batch(self, spans):
        """x, y (B, T) on the device, T the longest row rounded up to PAD_TO, y = -1 where
        nothing is to be learned (the prompt's turns, the padding). One conversation a row,
        or packed (pack_len): x is then (ids, input_pos), the rows as pack() fills them, each
        conversation's positions from 0, so that smol.py keeps it to itself (packed_mask)."""
        rows = pack([b - a - 1 for a, b in spans], self.pack_len) if self.pack_len else [[i] for i in range(len(spans))]
        lengths = [sum(spans[i][1] - spans[i][0] - 1 for i in row) for row in rows]
        T = math.ceil(max(lengths) / PAD_TO) * PAD_TO
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        pos = np.zeros((len(rows), T), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for a, b in (spans[i] for i in row):
                ids, n = self.ids[a:b].astype(np.int64), b - a - 1
                x[r, at:at + n] = ids[:-1]
                y[r, at:at + n] = np.where(self.targets[a + 1:b], ids[1:], -1)
                pos[r, at:at + n] = np.arange(n)
                at += n
            pos[r, at:] = np.arange(T - at)  # the padding: a sequence of its own, never a target
        x, y, pos = (to_device(torch.from_numpy(t), self.device) for t in (x, y, pos))
        return ((x, pos) if self.pack_len else x), y

    def weight_of(self, spans):
        """What these rows weigh in a step's loss: how many tokens of them the model learns to
        say (each target token weighs the same)."""
        return sum(int(self.targets[a + 1:b].sum()) for a, b in spans)

    def prefetch(self):
        """Build the next micro batch now: (x, y, its weight, the rows drawn before its step
        if it is a step's first); a step's rows are drawn whole, in every process alike."""
        if self.ahead is not None:
            return
        if not self.todo:  # a new step: every process draws its rows alike
            per_step = self.batch_size * self.micro_steps
            rows = [self.row(self.drawn + j) for j in range(per_step)]
            self.step_weight = self.weight_of(rows)
            micro = [rows[m * self.batch_size:(m + 1) * self.batch_size] for m in range(self.micro_steps)]
            if self.rows == self.batch_size:  # whole micro steps
                mine = micro[self.rank * self.accum:(self.rank + 1) * self.accum]
            else:
                mine = [m[self.rank * self.rows:(self.rank + 1) * self.rows] for m in micro]
            self.todo, self.step_start = list(mine), self.drawn
            self.drawn += per_step
        spans = self.todo.pop(0)
        # each target token (pair) weighs the same in the step's loss, whichever micro batch (and
        # process: DDP averages over them) it falls in
        weight = self.world * self.weight_of(spans) / max(1, self.step_weight)
        self.ahead = (*self.batch(spans), weight, self.step_start if len(self.todo) == self.accum - 1 else None)

    def next(self):
        self.prefetch()
        (x, y, weight, _), self.ahead = self.ahead, None
        return x, y, weight

    def resume_state(self):
        """How many rows were drawn before the first step not yet trained."""
        if self.ahead is not None and self.ahead[3] is not None:
            return torch.tensor(self.ahead[3])
        return torch.tensor(self.drawn)

    def restore(self, state):
        if isinstance(state, dict):
            raise UserError("the checkpoint was saved by a run on preference pairs; resume it with its own --data")
        self.drawn, self.todo, self.ahead = int(state), [], None

    def eval_batches(self, split, n):
        # the same n batches at every evaluation: the split's conversations in order, cycled
        convs = self.splits[split]
        for i in range(n):
            yield self.batch([convs[(i * self.batch_size + j) % len(convs)] for j in range(self.batch_size)])


class PairSampler(ConversationSampler):
    """Preference pairs for DPO (smolkit/preferences.py), the interface of ConversationSampler:
    what is drawn is a pair, and a micro batch of P pairs is 2P rows, the P prompts + chosen
    replies then the P prompts + rejected replies, so that both go through one forward. Its y
    is (targets (2P, T), the reference's log-probabilities of the rows (2P,)). The reference
    (score_reference: the starting model's log-probabilities of every reply, (pairs, 2)) is
    computed once and travels in the checkpoint with the rows drawn, so resuming is exact."""

    KIND, WHAT, DROPPED = "preferences", "preference pairs", "no reply token fits"
    NOTHING_FITS = "no preference pair keeps a reply token within block_size {}; raise --block_size"

    def __init__(self, data, block_size, batch_size, device, seed, share=(0, 1, 1)):
        self.n_pairs = (len(data[2]) - 1) // 2
        super().__init__(data, block_size, batch_size, device, seed, share)
        self.reference = None  # (pairs, 2) float32: log ref(chosen), log ref(rejected) of each pair

    def fit(self, bounds, length):
        """((chosen span, rejected span, pair number) of each pair kept, cut, dropped): each
        sequence cut as TRL cuts (keep_start) to its first `length` tokens; a pair is kept
        while both replies keep a target token."""
        kept, cut, dropped = [], 0, 0
        for i in range(self.n_pairs):
            starts, ends = bounds[2 * i:2 * i + 2].tolist(), bounds[2 * i + 1:2 * i + 3].tolist()
            rows = [(a, min(b, a + length)) for a, b in zip(starts, ends)]
            if not all(self.targets[a + 1:b].any() for a, b in rows):
                dropped += 1
                continue
            cut += any(b < end for (_, b), end in zip(rows, ends))
            kept.append((*rows, i))
        return kept, cut, dropped

    def lengths(self):
        """(the longest row's tokens, padded; a pair's own tokens, both rows, on average)."""
        n = [(b1 - a1 - 1, b2 - a2 - 1) for (a1, b1), (a2, b2), _ in self.splits["train"]]
        return math.ceil(max(map(max, n)) / PAD_TO) * PAD_TO, sum(map(sum, n)) / len(n)

    def weight_of(self, pairs):
        return len(pairs)  # each pair weighs the same, whatever its length

    def batch(self, pairs):
        x, targets = super().batch([p[0] for p in pairs] + [p[1] for p in pairs])
        if self.reference is None:  # scoring the reference itself
            return x, (targets, None)
        ref_logps = self.reference[[p[2] for p in pairs]].T.flatten()  # (2P,): chosen, then rejected
        return x, (targets, ref_logps.to(self.device))

    def eval_pairs(self, split, n):
        """The pairs an evaluation scores: every validation pair once, and as many training
        pairs as n batches hold."""
        pairs = self.splits[split]
        return pairs if split == "val" else pairs[:n * self.batch_size]

    def eval_batches(self, split, n):
        pairs = self.eval_pairs(split, n)
        return (self.batch(pairs[i:i + self.batch_size]) for i in range(0, len(pairs), self.batch_size))

    @torch.no_grad()
    def score_reference(self, model, ctx):
        """The reference's log-probabilities of every reply: the model as it is now, frozen
        by being computed once. Under torchrun each process scores its share of the pairs and
        the sum over processes fills the table."""
        device = model.model.norm.weight.device
        reference = torch.zeros(self.n_pairs, 2, device=device)
        mine = [p for p in self.splits["train"] + (self.splits["val"] if self.held_out else [])
                if p[2] % self.world == self.rank]
        was_training, self.reference = model.training, None
        model.eval()
        for at in range(0, len(mine), self.batch_size):
            pairs = mine[at:at + self.batch_size]
            x, (targets, _) = self.batch(pairs)
            with ctx:
                reference[[p[2] for p in pairs]] = reply_logps(model, x, targets).view(2, -1).T
        model.train(was_training)
        if self.world > 1:
            torch.distributed.all_reduce(reference)
        self.reference = reference.cpu()

    def resume_state(self):
        return {"drawn": super().resume_state(), "reference": self.reference}

    def restore(self, state):
        if not isinstance(state, dict) or "reference" not in state:
            raise UserError("the checkpoint was not saved by a run on preference pairs; resume it with its own "
                            "--data, or start preference tuning from it with --init_from PATH/ckpt.pt")
        if len(state["reference"]) != self.n_pairs:
            raise UserError(f"the checkpoint's reference scores {len(state['reference']):,} pairs, --data holds "
                            f"{self.n_pairs:,}: resume with the data the run started with")
        super().restore(state["drawn"])
        self.reference = state["reference"].float()


def open_data(cfg, mcfg, tokenizer, device, share):
    """(sampler, its log line) for cfg.data: text windows of block_size, conversations (a
    .jsonl file or a folder tools.prepare made of one) packed or one a row, or
    preference pairs likewise. share: (rank, world, micro steps of a step), as shard() splits them."""
    kind = data_kind(cfg.data)
    if kind == "text":
        splits = load_splits(cfg.data, mcfg.block_size, mcfg.vocab_size)
        sampler = BatchSampler(splits, mcfg.block_size, cfg.batch_size, device, cfg.seed, share, cfg.doc_mask == "true")
        return sampler, f"{len(splits['train']):,} train / {len(splits['val']):,} val tokens" + (
            ", each document kept to itself" if cfg.doc_mask == "true" else "")
    if kind == "preferences":
        sampler = PairSampler(load_pairs(cfg.data, tokenizer), mcfg.block_size, cfg.batch_size, device, cfg.seed,
                              share)
    else:
        sampler = ConversationSampler(load_conversations(cfg.data, tokenizer), mcfg.block_size, cfg.batch_size,
                                      device, cfg.seed, share, cfg.pack_len if cfg.packing == "true" else None)
    return sampler, sampler.describe()


def settings_from_data(cfg, sampler):
    """The settings the data decides, for dataclasses.replace(cfg, ...): with --epochs N,
    max_iters (and the cosine decay over them) is N passes over the training conversations;
    eval_iters is at most the batches that hold every validation conversation once."""
    if not isinstance(sampler, ConversationSampler):
        return {}
    changes = {"eval_iters": min(cfg.eval_iters, sampler.eval_size())}
    if cfg.epochs > 0:
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        changes["max_iters"] = changes["lr_decay_iters"] = max(1, math.ceil(
            cfg.epochs * len(sampler.splits["train"]) / per_step))
    return {k: v for k, v in changes.items() if v != getattr(cfg, k)}

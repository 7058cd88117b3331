"""
The data side of training: the cosmo2 tokenizer, a text corpus or prepare.py's token
files as arrays of token ids, the train / validation split, and the batch sampler.
"""
import os

import numpy as np
import torch

from common import HERE, UserError
from smol import EOT_ID

DOC_SEPARATOR = "<|endoftext|>"  # a line of its own between documents in a text corpus
PREPARE_HINT = "rebuild it with `python prepare.py SOURCE --out {}`"


def load_tokenizer(path=os.path.join(HERE, "tokenizer.json")):
    """The cosmo2 tokenizer (49,152 byte-level BPE tokens) as a tokenizers.Tokenizer.
    tokenizer.json is committed; build_tokenizer.py rebuilds it offline."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def token_bytes(tokenizer):
    """The bytes each token id stands for (a list by id), exact even for the tokens that
    hold part of a character. Byte-level BPE spells every byte as one printable character:
    the 188 printable bytes (33-126, 161-172, 174-255) as themselves, the other 68 as
    chr(256), chr(257), ... in byte order (GPT-2's table). Special tokens are their text."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out = [b""] * tokenizer.get_vocab_size()
    for text, i in tokenizer.get_vocab().items():
        out[i] = text.encode() if text in specials else bytes(byte_of[c] for c in text)
    return out


def load_tokens(path, tokenizer):
    """The text file as one long (N,) array of token ids, each document followed by EOT."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found; pass --data PATH to a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start}); convert it first")
    docs = [d.strip() for d in text.split(DOC_SEPARATOR)]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"data file {path} is empty")
    ids = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(EOT_ID)  # marks the end of each document
    return np.array(ids, dtype=np.uint16)  # 49,152 ids fit in 16 bits, as in prepare.py's .bin files


def largest_id(data, chunk=1 << 24):
    # in 32 MB pieces: a memory-mapped corpus is read once and never held whole
    return max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)


def load_splits(path, block_size, vocab_size):
    """{"train": ids, "val": ids} as uint16 arrays. A folder made by prepare.py is
    memory-mapped, so the corpus never has to fit in memory; a text file is
    tokenised here and split 90% / 10% by position. Files that prepare.py cannot
    have written (a torn size, no tokens, ids the model has no embedding for) are
    refused here, before any training, rather than as an IndexError mid-run."""
    if os.path.isdir(path):
        files = {split: os.path.join(path, f"{split}.bin") for split in ("train", "val")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if len(missing) == 2:
            raise UserError(f"{path} holds no train.bin and val.bin; make them with `python prepare.py SOURCE "
                            f"--out {path}`, or pass a text file as --data")
        if missing:
            raise UserError(f"{missing[0]} is missing (the folder has only one of train.bin and val.bin); "
                            + PREPARE_HINT.format(path))
        splits = {}
        for split, f in files.items():
            size = os.path.getsize(f)
            if size % 2:
                raise UserError(f"{f} has {size:,} bytes, not a whole number of 2-byte token ids: it was cut "
                                f"short or is not from prepare.py; " + PREPARE_HINT.format(path))
            if size == 0:  # np.memmap cannot map an empty file
                raise UserError(f"{f} is empty (0 tokens); " + PREPARE_HINT.format(path)
                                + (" and a --val_fraction above 0" if split == "val" else ""))
            splits[split] = np.memmap(f, dtype=np.uint16, mode="r")
            top = largest_id(splits[split])
            if top >= vocab_size:
                raise UserError(f"{f} holds token id {top}, not below vocab_size {vocab_size}: it was made with "
                                f"another tokenizer or is damaged; " + PREPARE_HINT.format(path))
    else:
        tokens = load_tokens(path, load_tokenizer())
        top = largest_id(tokens)
        if top >= vocab_size:
            raise UserError(f"--vocab_size {vocab_size} is too small for the tokenizer: {path} encodes to id {top}; "
                            f"use at least --vocab_size {top + 1}")
        n_train = int(0.9 * len(tokens))
        splits = {"train": tokens[:n_train], "val": tokens[n_train:]}
    for split, data in splits.items():
        if len(data) <= block_size:
            raise UserError(f"--data {path}: the {split} split has {len(data):,} tokens, not more than block_size = "
                            f"{block_size}; use more text or a smaller --block_size")
    return splits


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

    def __init__(self, splits, block_size, batch_size, device, seed, share=(0, 1, 1)):
        self.splits, self.block_size, self.batch_size = splits, block_size, batch_size
        self.device, self.seed = device, seed
        self.rank, self.world, self.micro_steps = share  # (this process, processes, micro steps of a step)
        self.accum, self.rows = shard(batch_size, self.micro_steps, self.world)  # this process's share
        # the training draws come from this generator alone, and the checkpoint saves its
        # state, so a resumed run draws exactly the batches the uninterrupted run would have
        self.generator = torch.Generator().manual_seed(seed)
        self.todo = iter(())  # the offsets of this step's micro batches not built yet
        self.ahead = None  # the next micro batch, built: (x, y, the generator's state before its
                           # step was drawn if it is a step's first, else None)

    def offsets(self, split, generator, micro_steps):
        # (micro_steps, B) window starts
        return torch.randint(len(self.splits[split]) - self.block_size, (micro_steps, self.batch_size),
                             generator=generator)

    def batch(self, split, offsets):
        # offsets: (B,) window starts -> x, y: (B, T) int64, y shifted by one token
        data = self.splits[split]
        xy = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in offsets.tolist()]).astype(np.int64))
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if self.device.startswith("cuda"):  # pinned: the copy runs while the device computes
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

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

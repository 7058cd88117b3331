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


class BatchSampler:
    """Random windows of block_size + 1 tokens from a split: x is the first block_size
    tokens of each, y the same shifted by one. Every process draws the offsets of the
    whole global step from identically seeded generators and keeps its own rows: the
    data of a step is the same for 1 process x 2a micro steps as for 2 processes x a,
    and resuming needs only one generator state whatever the number of processes."""

    def __init__(self, splits, block_size, batch_size, device, seed):
        self.splits, self.block_size, self.batch_size = splits, block_size, batch_size
        self.device, self.seed = device, seed
        # the training draws come from this generator alone, and the checkpoint saves its
        # state, so a resumed run draws exactly the batches the uninterrupted run would have
        self.generator = torch.Generator().manual_seed(seed)

    def offsets(self, split, generator, micro_steps):
        # (micro_steps, B) window starts
        return torch.randint(len(self.splits[split]) - self.block_size, (micro_steps, self.batch_size),
                             generator=generator)

    def batch(self, split, offsets):
        # offsets: (B,) window starts -> x, y: (B, T) int64, y shifted by one token
        data = self.splits[split]
        xy = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in offsets.tolist()]).astype(np.int64))
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train_batches(self, micro_steps, rank, accum):
        """The (x, y) micro batches of this process (rows rank*accum ... of the
        micro_steps the global step has), drawn now and built as they are used."""
        mine = self.offsets("train", self.generator, micro_steps)[rank * accum:(rank + 1) * accum]
        return (self.batch("train", offsets) for offsets in mine)

    def eval_batches(self, split, n):
        # a fresh generator with the run's seed: the same n batches at every evaluation,
        # so the losses are comparable from one evaluation to the next
        generator = torch.Generator().manual_seed(self.seed)
        return (self.batch(split, offsets) for offsets in self.offsets(split, generator, n))

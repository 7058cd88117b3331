"""
Files to token ids: the cosmo2 tokenizer, a text corpus or tools.prepare's token files as
arrays of ids with their train / validation split, and the one reader of .jsonl files.
(smolkit/samplers.py turns the arrays into batches.)
"""
import codecs
import json
import os

import numpy as np

from smol import EOT_ID
from smolkit.common import ROOT, UserError

DOC_SEPARATOR = "<|endoftext|>"  # a line of its own between documents in a text corpus
PREPARE_HINT = "rebuild it with `python -m tools.prepare SOURCE --out {}`"


def load_tokenizer(path=os.path.join(ROOT, "tokenizer.json")):
    """The cosmo2 tokenizer (49,152 byte-level BPE tokens) as a tokenizers.Tokenizer.
    tokenizer.json is committed; tools.build_tokenizer rebuilds it offline."""
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
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, if the editor wrote one, is no text
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
    return np.array(ids, dtype=np.uint16)  # 49,152 ids fit in 16 bits, as in tools.prepare's .bin files


def largest_id(data, chunk=1 << 24):
    # in 32 MB pieces: a memory-mapped corpus is read once and never held whole
    return max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)


def load_splits(path, block_size, vocab_size):
    """{"train": ids, "val": ids} as uint16 arrays. A folder made by tools.prepare is
    memory-mapped, so the corpus never has to fit in memory; a text file is
    tokenised here and split 90% / 10% by position. Files that tools.prepare cannot
    have written (a torn size, no tokens, ids the model has no embedding for) are
    refused here, before any training, rather than as an IndexError mid-run."""
    if os.path.isdir(path):
        files = {split: os.path.join(path, f"{split}.bin") for split in ("train", "val")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if len(missing) == 2:
            raise UserError(f"{path} holds no train.bin and val.bin; make them with `python -m tools.prepare SOURCE "
                            f"--out {path}`, or pass a text file as --data")
        if missing:
            raise UserError(f"{missing[0]} is missing (the folder has only one of train.bin and val.bin); "
                            + PREPARE_HINT.format(path))
        splits = {}
        for split, f in files.items():
            size = os.path.getsize(f)
            if size % 2:
                raise UserError(f"{f} has {size:,} bytes, not a whole number of 2-byte token ids: it was cut "
                                f"short or is not from tools.prepare; " + PREPARE_HINT.format(path))
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


def jsonl_records(path):
    """(record, "PATH line N") for each non-blank line of a .jsonl file: the one reader of
    .jsonl, for fine-tuning data and tools.prepare alike. Lines are read as editors write
    them: UTF-8 with or without a byte-order mark, \\n or \\r\\n line ends, blank lines
    skipped. UserError naming the line that is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n} is not UTF-8 text (byte {e.start + 1} of the line); "
                                f"convert it first") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON; a .jsonl file holds one JSON object per line") from None
            yield record, f"{path} line {n}"

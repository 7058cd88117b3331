"""
Conversations for fine-tuning. A .jsonl file with one {"messages": [{"role", "content"},
...]} per line (the OpenAI API's format, as Hugging Face chat datasets and smoltalk store
them) is checked line by line, rendered with chat.py's ChatML template exactly as
`sample.py --chat` and serve.py will show it to the model (the default system prompt
included), and tokenised with targets on the assistant's words only: each assistant
turn's content and its closing <|im_end|>, never the system or user turns nor the
`<|im_start|>assistant\\n` header.

One conversation is one row of a batch, padded at the end, so that the loss never reads
across two of them (smol.py's attention has no block-diagonal mask; packing several
conversations into a row would need one). Rows are padded to the longest conversation of
the micro batch, not to block_size, so short conversations cost little.
"""
import json
import math
import os

import numpy as np
import torch

from chat import ROLES, render_chat
from common import UserError
from data import shard
from smol import IM_END_ID

PAD_TO = 64  # rows are padded to a multiple of this: few distinct shapes for torch.compile


def check_messages(record, where):
    """The messages of one record, checked, each content one string (a list of text
    parts is joined, as serve.py joins them). UserError naming `where` otherwise."""
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where} has no \"messages\"; each line must be {{\"messages\": [{{\"role\": ..., "
                        f"\"content\": ...}}, ...]}}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list")
    checked = []
    for i, m in enumerate(messages, 1):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise UserError(f"{where}, message {i}: unknown role {role!r}; use system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") if isinstance(p, dict) else None for p in content]
            content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}, message {i} ({role}): content must be a non-empty string")
        checked.append({"role": role, "content": content})
    return checked


def read_jsonl(path):
    """Every conversation of a .jsonl file, checked. Blank lines are skipped."""
    conversations = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {n} is not JSON; a conversations file holds one "
                                    f"{{\"messages\": [...]}} object per line") from None
                conversations.append(check_messages(record, f"{path} line {n}"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    if not any(m["role"] == "assistant" for c in conversations for m in c):
        raise UserError(f"{path} has no assistant turn: there is nothing to learn to say")
    return conversations


def encode(messages, tokenizer):
    """(ids, targets): the conversation as chat.py renders it, token for token, and for each
    token whether the model should learn to say it (uint16 and bool arrays)."""
    text = render_chat(messages, add_generation_prompt=False)
    if messages[0]["role"] != "system":  # render_chat put the default system prompt first
        messages = [{"role": "system", "content": text[len("<|im_start|>system\n"):text.index("<|im_end|>")]},
                    *messages]
    # the characters the model must say: each assistant content and its <|im_end|>
    spans, at = [], 0
    for m in messages:
        start = at + len(f"<|im_start|>{m['role']}\n")
        at = start + len(m["content"]) + len("<|im_end|>\n")
        if m["role"] == "assistant":
            spans.append((start, at - 1))  # up to the <|im_end|>, not the newline after it
    assert at == len(text), "the spans must follow chat.render_chat"
    enc = tokenizer.encode(text)
    starts = np.array([s for s, _ in enc.offsets])
    ends = np.array([e for _, e in enc.offsets])
    targets = np.zeros(len(enc.ids), dtype=bool)
    for a, b in spans:
        targets |= (starts >= a) & (ends <= b) & (ends > starts)
    return np.array(enc.ids, dtype=np.uint16), targets


def encode_all(conversations, tokenizer):
    """(ids, targets, bounds): every conversation end to end, and bounds (n + 1,) int64,
    conversation i being ids[bounds[i]:bounds[i + 1]]. The layout prepare.py writes."""
    pairs = [encode(c, tokenizer) for c in conversations]
    bounds = np.cumsum([0] + [len(ids) for ids, _ in pairs], dtype=np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]), bounds


def is_conversations(path):
    """--data names conversations: a .jsonl file, or a folder prepare.py made from them."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "targets.bin"))
    return path.lower().endswith(".jsonl")


def load_conversations(path, tokenizer):
    """(ids, targets, bounds) of a .jsonl file (read and encoded now) or of prepare.py's
    folder (memory-mapped: ids.bin uint16, targets.bin uint8, bounds.bin int64)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise UserError(f"data file {path} not found; pass --data PATH to a .jsonl of conversations")
        return encode_all(read_jsonl(path), tokenizer)
    files = [os.path.join(path, f"{name}.bin") for name in ("ids", "targets", "bounds")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"{missing[0]} is missing; rebuild the folder with `python prepare.py SOURCE --out {path}`")
    ids, targets = (np.memmap(f, dtype=t, mode="r") for f, t in zip(files, (np.uint16, np.uint8)))
    bounds = np.fromfile(files[2], dtype=np.int64)
    if len(ids) != len(targets) or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != len(ids):
        raise UserError(f"{path}: ids.bin, targets.bin and bounds.bin do not agree (cut short?); rebuild it "
                        f"with `python prepare.py SOURCE --out {path}`")
    return ids, targets.view(bool), bounds


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


def split(n):
    """(train, val) conversation numbers: every 20th (5%) held out from 20 conversations on;
    fewer are all for training, and the validation loss is on them too."""
    if n < 20:
        return list(range(n)), list(range(n))
    return [i for i in range(n) if i % 20 != 19], [i for i in range(n) if i % 20 == 19]


class ConversationSampler:
    """Batches of whole conversations, one a row, for train.py: the interface of
    data.BatchSampler (next, prefetch, resume_state, restore, eval_batches). Each pass over
    the training conversations takes them in an order shuffled from (seed, pass): the k-th
    row ever drawn is a function of k alone, so resuming needs only how many were drawn."""

    def __init__(self, data, block_size, batch_size, device, seed, share=(0, 1, 1)):
        ids, targets, bounds = data
        self.ids, self.targets = ids, targets
        spans, self.cut, self.dropped = fit(ids, targets, bounds, block_size + 1)  # x and y: one more token
        if not spans:
            raise UserError(f"no conversation's first assistant turn fits in block_size {block_size}; "
                            f"raise --block_size")
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

    def lengths(self):
        """(the longest row's tokens, padded; the mean row's own tokens) of the training split."""
        n = [b - a - 1 for a, b in self.splits["train"]]
        return math.ceil(max(n) / PAD_TO) * PAD_TO, sum(n) / len(n)

    def eval_size(self):
        """Batches that hold every validation conversation once."""
        return max(1, math.ceil(len(self.splits["val"]) / self.batch_size))

    def describe(self):
        n = {k: len(v) for k, v in self.splits.items()}
        return (f"{n['train']:,} train / {n['val'] if self.held_out else 0:,} val conversations"
                + ("" if self.held_out else " (under 20: the val loss is on the training ones)")
                + (f", {self.cut:,} cut to the context" if self.cut else "")
                + (f", {self.dropped:,} dropped (their first reply does not fit)" if self.dropped else ""))

    def row(self, k):
        # the k-th training conversation drawn: pass k // n, in that pass's shuffled order
        n = len(self.splits["train"])
        if self.order[0] != k // n:
            self.order = (k // n, torch.randperm(n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + k // n)).tolist())
        return self.splits["train"][self.order[1][k % n]]

    def batch(self, spans):
        """x, y (B, T) on the device, T the longest row rounded up to PAD_TO, y = -1 where
        nothing is to be learned (the prompt's turns, the padding)."""
        T = math.ceil((max(b - a for a, b in spans) - 1) / PAD_TO) * PAD_TO
        x = np.zeros((len(spans), T), dtype=np.int64)
        y = np.full((len(spans), T), -1, dtype=np.int64)
        for r, (a, b) in enumerate(spans):
            ids = self.ids[a:b].astype(np.int64)
            x[r, :b - a - 1] = ids[:-1]
            y[r, :b - a - 1] = np.where(self.targets[a + 1:b], ids[1:], -1)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.startswith("cuda"):
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        else:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def targets_of(self, spans):
        """How many tokens of these rows the model learns to say."""
        return sum(int(self.targets[a + 1:b].sum()) for a, b in spans)

    def prefetch(self):
        """Build the next micro batch now: (x, y, its weight, the rows drawn before its step
        if it is a step's first); a step's rows are drawn whole, in every process alike."""
        if self.ahead is not None:
            return
        if not self.todo:  # a new step: every process draws its rows alike
            per_step = self.batch_size * self.micro_steps
            rows = [self.row(self.drawn + j) for j in range(per_step)]
            self.step_targets = self.targets_of(rows)
            micro = [rows[m * self.batch_size:(m + 1) * self.batch_size] for m in range(self.micro_steps)]
            if self.rows == self.batch_size:  # whole micro steps
                mine = micro[self.rank * self.accum:(self.rank + 1) * self.accum]
            else:
                mine = [m[self.rank * self.rows:(self.rank + 1) * self.rows] for m in micro]
            self.todo, self.step_start = list(mine), self.drawn
            self.drawn += per_step
        spans = self.todo.pop(0)
        # each target token weighs the same in the step's loss, whichever micro batch (and
        # process: DDP averages over them) it falls in
        weight = self.world * self.targets_of(spans) / max(1, self.step_targets)
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
        self.drawn, self.todo, self.ahead = int(state), [], None

    def eval_batches(self, split, n):
        # the same n batches at every evaluation: the split's conversations in order, cycled
        convs = self.splits[split]
        for i in range(n):
            yield self.batch([convs[(i * self.batch_size + j) % len(convs)] for j in range(self.batch_size)])

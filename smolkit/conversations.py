"""
Conversations for fine-tuning. A .jsonl file with one {"messages": [{"role", "content"},
...]} per line (the OpenAI API's format, as Hugging Face chat datasets and smoltalk store
them) is checked line by line, rendered with chat.py's ChatML template exactly as
`sample.py --chat` and the server will show it to the model (the default system prompt
included), and tokenised with targets on the assistant's words only: each assistant
turn's content and its closing <|im_end|>, never the system or user turns nor the
`<|im_start|>assistant\\n` header.

The batches these make: smolkit/samplers.py (ConversationSampler).
"""
import json
import os

import numpy as np

from smolkit.chat import ROLES, render_chat
from smolkit.common import UserError
from smolkit.data import jsonl_records


def check_messages(record, where):
    """The messages of one conversation record, checked. UserError naming `where` otherwise."""
    if isinstance(record, dict) and "messages" not in record and {"chosen", "rejected"} & record.keys():
        raise UserError(f"{where} is a preference pair, but the file's first record is a conversation; "
                        f"a file holds one kind")
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where} has no \"messages\"; each line must be {{\"messages\": [{{\"role\": ..., "
                        f"\"content\": ...}}, ...]}}")
    return check_turns(record["messages"], where, "messages")


def check_turns(messages, where, field):
    """A list of {"role", "content"} messages (a record's `field`), checked, each content one
    string (a list of text parts is joined, as the server joins them). `where` names the
    record (and, in a preference pair, its part) in the errors."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"{field}\" must be a non-empty list")
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


def read_conversations(path):
    """Every conversation of a .jsonl file, checked."""
    conversations = [check_messages(record, where) for record, where in jsonl_records(path)]
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


def require_replies(targets, source):
    """Refuse data with nothing to learn: no token of any assistant turn among the targets."""
    if not targets:
        raise UserError(f"{source} has no assistant turn: there is nothing to learn to say")


def encode(messages, tokenizer, first_reply=0):
    """(ids, targets): the conversation as chat.py renders it, token for token, and for each
    token whether the model should learn to say it (uint16 and bool arrays): the assistant
    turns from messages[first_reply] on (a preference pair's prompt may hold earlier ones)."""
    text = render_chat(messages, add_generation_prompt=False)
    learn = [m["role"] == "assistant" and i >= first_reply for i, m in enumerate(messages)]
    if messages[0]["role"] != "system":  # render_chat put the default system prompt first
        messages = [{"role": "system", "content": text[len("<|im_start|>system\n"):text.index("<|im_end|>")]},
                    *messages]
        learn = [False, *learn]
    # the characters the model must say: each assistant content and its <|im_end|>
    spans, at = [], 0
    for m, learned in zip(messages, learn):
        start = at + len(f"<|im_start|>{m['role']}\n")
        at = start + len(m["content"]) + len("<|im_end|>\n")
        if learned:
            spans.append((start, at - 1))  # up to the <|im_end|>, not the newline after it
    assert at == len(text), "the spans must follow chat.render_chat"
    enc = tokenizer.encode(text)
    starts = np.array([s for s, _ in enc.offsets])
    ends = np.array([e for _, e in enc.offsets])
    targets = np.zeros(len(enc.ids), dtype=bool)
    for a, b in spans:
        targets |= (starts >= a) & (ends <= b) & (ends > starts)
    return np.array(enc.ids, dtype=np.uint16), targets


def lay_out(encoded):
    """(ids, targets, bounds) of [(ids, targets)] end to end, bounds (n + 1,) int64, sequence
    i being ids[bounds[i]:bounds[i + 1]]. The layout tools.prepare writes."""
    bounds = np.cumsum([0] + [len(ids) for ids, _ in encoded], dtype=np.int64)
    return np.concatenate([e[0] for e in encoded]), np.concatenate([e[1] for e in encoded]), bounds


def encode_all(conversations, tokenizer):
    """(ids, targets, bounds) of every conversation, as lay_out lays them out."""
    return lay_out([encode(c, tokenizer) for c in conversations])


def record_kind(keys):
    """What a record with these keys is: "conversations" ("messages"), "preferences"
    ("chosen" or "rejected") or "text" (neither)."""
    if "messages" in keys:
        return "conversations"
    return "preferences" if {"chosen", "rejected"} & set(keys) else "text"


def data_kind(path):
    """What --data holds: "text", "conversations" or "preferences" (pairs of replies,
    smolkit/preferences.py). A .jsonl file is what its first record is ({"messages": ...} or
    {"chosen": ..., "rejected": ...}); a folder tools.prepare made says so in meta.json."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "targets.bin")):
            return "text"
        try:
            with open(os.path.join(path, "meta.json")) as f:
                return json.load(f).get("kind", "conversations")
        except (OSError, ValueError, AttributeError):
            return "conversations"  # load_conversations says what is missing
    if not path.lower().endswith(".jsonl"):
        return "text"
    first = next(jsonl_records(path), (None, None))[0] if os.path.isfile(path) else None
    # a .jsonl of neither kind is read as conversations, whose reader names what is missing
    return "preferences" if isinstance(first, dict) and record_kind(first) == "preferences" else "conversations"


def load_conversations(path, tokenizer):
    """(ids, targets, bounds) of a .jsonl file (read and encoded now) or of tools.prepare's
    folder (memory-mapped: ids.bin uint16, targets.bin uint8, bounds.bin int64)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise UserError(f"data file {path} not found; pass --data PATH to a .jsonl of conversations")
        ids, targets, bounds = encode_all(read_conversations(path), tokenizer)
        require_replies(targets.any(), path)
        return ids, targets, bounds
    files = [os.path.join(path, f"{name}.bin") for name in ("ids", "targets", "bounds")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"{missing[0]} is missing; rebuild the folder with "
                        f"`python -m tools.prepare SOURCE --out {path}`")
    ids, targets = (np.memmap(f, dtype=t, mode="r") for f, t in zip(files, (np.uint16, np.uint8)))
    bounds = np.fromfile(files[2], dtype=np.int64)
    if len(ids) != len(targets) or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != len(ids):
        raise UserError(f"{path}: ids.bin, targets.bin and bounds.bin do not agree (cut short?); rebuild it "
                        f"with `python -m tools.prepare SOURCE --out {path}`")
    return ids, targets.view(bool), bounds

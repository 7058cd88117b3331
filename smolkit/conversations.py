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
import os

import numpy as np

from smolkit.chat import ROLES, render_chat
from smolkit.common import UserError
from smolkit.data import jsonl_records


def check_messages(record, where):
    """The messages of one record, checked, each content one string (a list of text
    parts is joined, as the server joins them). UserError naming `where` otherwise."""
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
    conversation i being ids[bounds[i]:bounds[i + 1]]. The layout tools.prepare writes."""
    pairs = [encode(c, tokenizer) for c in conversations]
    bounds = np.cumsum([0] + [len(ids) for ids, _ in pairs], dtype=np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]), bounds


def is_conversations(path):
    """--data names conversations: a .jsonl file, or a folder tools.prepare made from them."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "targets.bin"))
    return path.lower().endswith(".jsonl")


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

"""
A slow, independent byte-level BPE encoder in plain Python, used only to check
tokenizer.json: it shares the vocabulary and merges with the tokenizers package
but none of its code. The algorithm is the GPT-2 one (bytes -> printable
characters, regex pre-split, repeatedly merge the best-ranked adjacent pair),
with cosmo2's extra first step of isolating every digit.
"""
import json

import regex

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_chars():
    # GPT-2's reversible map from the 256 bytes to printable unicode characters:
    # printable bytes map to themselves, the rest to 256, 257, ... in byte order
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self.vocab = spec["model"]["vocab"]
        merges = spec["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.specials = [t["content"] for t in spec["added_tokens"]]
        self.byte_char = bytes_to_chars()

    def _bpe(self, word):
        symbols = list(word)
        while len(symbols) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            best, _ = min(pairs)
            if best == float("inf"):
                break
            a, b = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # a symbol with no vocabulary entry is a byte the vocabulary lacks: dropped
        return [self.vocab[s] for s in symbols if s in self.vocab]

    def _encode_plain(self, text):
        ids = []
        pieces = regex.split(r"(\p{N})", text)  # every digit its own piece (Digits, individual)
        for piece in pieces:
            if not piece:
                continue
            for chunk in GPT2_SPLIT.findall(piece):
                word = "".join(self.byte_char[b] for b in chunk.encode("utf-8"))
                ids.extend(self._bpe(word))
        return ids

    def encode(self, text):
        pattern = "(" + "|".join(regex.escape(s) for s in self.specials) + ")"
        ids = []
        for part in regex.split(pattern, text):
            if part in self.specials:
                ids.append(self.vocab[part] if part in self.vocab else self.specials.index(part))
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

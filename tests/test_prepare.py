"""prepare.py: the token files hold exactly the stream train.py's load_tokens would build,
whatever the source format, split as documented; mistakes give one line and exit 1."""
import json
import os
import re
import subprocess
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

from conftest import command, need_module
from smol import EOT_ID
from smolkit.common import UserError
from smolkit.data import load_tokenizer, load_tokens
from tools import prepare
from tools.prepare import is_val

# documents with what tends to break tokenization: digits, code, accents, CJK, emoji,
# inner blank lines, and leading/trailing whitespace that the text format strips
DOCS = [
    "Once upon a time, in 2024, a cat named Dewey sat on the returns desk.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))",
    "Café crème brûlée — naïve façade. 日本語のテキスト。 😀🚀",
    "First paragraph.\n\nSecond paragraph, after a blank line.\n\n\nThird.",
    "   Indented start and trailing spaces   ",
] + [f"Document number {i}: the {i * 7 % 13}th value is {i ** 3}." for i in range(240)]
STRIPPED = [d.strip() for d in DOCS]  # what a text file gives back


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_text(path, docs, newline="\n"):
    # a separator on a line of its own, as in input.txt, plus empty documents that must vanish
    text = f"\n{prepare.DOC_SEPARATOR}\n".join(docs) + f"\n{prepare.DOC_SEPARATOR}\n  \n{prepare.DOC_SEPARATOR}\n"
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)


def write_jsonl(path, docs, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, column: doc}) + "\n")


def expected(tok, docs, fraction=0.01):
    """train and val token lists for these documents, by the documented split rule."""
    frac = Fraction(fraction).limit_denominator(1_000_000)
    split = {"train": [], "val": []}
    for i, enc in enumerate(tok.encode_batch(docs)):
        split["val" if is_val(i, frac) else "train"] += enc.ids + [EOT_ID]
    return split


def read(out):
    # np.memmap as train.py reads them; it refuses an empty file, so an empty val.bin is []
    paths = {s: os.path.join(out, f"{s}.bin") for s in ("train", "val")}
    return {s: np.memmap(p, dtype=np.uint16, mode="r").tolist() if os.path.getsize(p) else [] for s, p in paths.items()}


def run_prepare(*args):
    return prepare.main([str(a) for a in args])


def test_text_file_is_load_tokens(tmp_path, tok, monkeypatch):
    path = tmp_path / "corpus.txt"
    write_text(path, DOCS, newline="\r\n")  # CRLF reads as LF, as in train.py
    with open(path, "a", encoding="utf-8") as f:  # a separator inside a line splits too
        f.write("tail one<|endoftext|>tail two")
    reference = load_tokens(str(path), tok).tolist()
    run_prepare(path, "--out", tmp_path / "all", "--val_fraction", 0)
    assert read(tmp_path / "all") == {"train": reference, "val": []}
    # tiny read chunks put separators across chunk boundaries: the same stream
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 5)
    meta = run_prepare(path, "--out", tmp_path / "split", "--batch_docs", 7)
    docs = STRIPPED + ["tail one", "tail two"]
    assert read(tmp_path / "split") == expected(tok, docs)
    assert meta["val_tokens"] > 0 and meta["train_tokens"] + meta["val_tokens"] == len(reference)


def test_jsonl(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, DOCS)
    with open(path, "a") as f:  # blank lines, empty and null texts are skipped
        f.write('\n{"text": ""}\n{"text": null}\n')
    run_prepare(path, "--out", tmp_path / "out", "--batch_docs", 16)
    assert read(tmp_path / "out") == expected(tok, DOCS)
    write_jsonl(tmp_path / "other.jsonl", DOCS, column="content")
    run_prepare(tmp_path / "other.jsonl", "--out", tmp_path / "out2", "--text_column", "content")
    assert read(tmp_path / "out2") == expected(tok, DOCS)


def test_parquet(tmp_path, tok):
    pa = need_module("pyarrow", "pip install pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path, row_group_size=50)
    run_prepare(path, "--out", tmp_path / "out", "--batch_docs", 33)
    assert read(tmp_path / "out") == expected(tok, DOCS)
    with pytest.raises(UserError, match="no 'body' field"):
        run_prepare(path, "--out", tmp_path / "bad", "--text_column", "body")


def test_folder(tmp_path, tok):
    src = tmp_path / "corpus"
    (src / "b" / "deeper").mkdir(parents=True)
    write_text(src / "a.txt", DOCS[:50])
    write_jsonl(src / "b" / "c.jsonl", DOCS[50:120])
    write_text(src / "b" / "deeper" / "d.txt", DOCS[120:])
    (src / "notes.md").write_text("not read: a folder gives only .txt, .jsonl and .parquet files")
    docs = STRIPPED[:50] + DOCS[50:120] + STRIPPED[120:]  # sorted: a.txt, b/c.jsonl, b/deeper/d.txt
    pyarrow = need_module("pyarrow", "pip install pyarrow")  # and b/e.parquet last
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.table({"text": DOCS[:20]}), src / "b" / "e.parquet")
    docs += DOCS[:20]
    run_prepare(src, "--out", tmp_path / "out", "--val_fraction", 0.05)
    assert read(tmp_path / "out") == expected(tok, docs, 0.05)


def test_meta_and_split_rule(tmp_path, tok):
    path = tmp_path / "c.txt"
    write_text(path, DOCS)
    meta = run_prepare(path, "--out", tmp_path / "out")
    on_disk = json.load(open(tmp_path / "out" / "meta.json"))
    assert on_disk == meta
    split = expected(tok, STRIPPED)
    assert meta == {"vocab_size": 49152, "dtype": "uint16", "eot_id": 0, "documents": len(DOCS),
                    "train_tokens": len(split["train"]), "val_tokens": len(split["val"]),
                    "source": str(path), "val_fraction": 0.01}
    assert [i for i in range(len(DOCS)) if is_val(i, Fraction(1, 100))] == [99, 199]
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 2 * meta["train_tokens"]
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]  # no .tmp left
    # the rule gives exactly floor(n * F) documents, evenly spread
    for f in (0.01, 0.1, 0.3, 0.5):
        picked = [i for i in range(1000) if is_val(i, Fraction(f).limit_denominator(1_000_000))]
        assert len(picked) == int(1000 * f) and max(np.diff(picked)) - min(np.diff(picked)) <= 1


def test_few_documents_put_the_last_in_val(tmp_path, tok, capsys):
    path = tmp_path / "few.txt"
    write_text(path, DOCS[:3])
    meta = run_prepare(path, "--out", tmp_path / "out")
    assert "the last one is val" in capsys.readouterr().out
    ids = [enc.ids + [EOT_ID] for enc in tok.encode_batch(DOCS[:3])]
    assert read(tmp_path / "out") == {"train": ids[0] + ids[1], "val": ids[2]}
    assert (meta["documents"], meta["val_tokens"]) == (3, len(ids[2]))
    write_text(path, DOCS[:1])  # one document: it stays in train, val.bin is empty
    run_prepare(path, "--out", tmp_path / "one")
    assert read(tmp_path / "one") == {"train": ids[0], "val": []}


def test_failure_keeps_previous_output(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, DOCS)
    run_prepare(good, "--out", tmp_path / "out")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, DOCS * 20)
    with open(bad, "a") as f:
        f.write('{"txt": "a typo in the last record"}\n')
    with pytest.raises(UserError, match=r"line 4901 has no 'text' field \(it has: txt\)"):
        run_prepare(bad, "--out", tmp_path / "out", "--batch_docs", 64)  # fails after writing batches
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("make, args, message", [
    (lambda d: (d / "x.json").write_text("{}"), ["x.json"], ".json files are not read"),
    (lambda d: (d / "x.txt").write_bytes(b"caf\xe9"), ["x.txt"], "not UTF-8"),
    (lambda d: (d / "x.jsonl").write_text("[1, 2]\n"), ["x.jsonl"], "has no 'text' field"),
    (lambda d: (d / "x.jsonl").write_text('{"text": 1}\n'), ["x.jsonl"], "holds a int, not text"),
    (lambda d: (d / "x.jsonl").write_text("not json\n"), ["x.jsonl"], "line 1 is not JSON"),
    (lambda d: (d / "empty").mkdir(), ["empty"], "holds no .txt, .jsonl or .parquet"),
    (lambda d: (d / "x.txt").write_text("hi"), ["x.txt", "--subset", "a"], "--subset is for Hugging Face"),
    (lambda d: (d / "x.txt").write_text("hi"), ["x.txt", "--out", "x.txt/sub"], "cannot write to --out"),
    (lambda d: (d / "x.txt").write_text("hi"), ["x.txt", "--val_fraction", "1"], "must be in [0, 1)"),
    (lambda d: (d / "x.txt").write_text("hi"), ["x.txt", "--batch_docs", "0"], "must be positive"),
    (lambda d: None, ["data/missing.txt"], "data/missing.txt not found"),
])
def test_user_errors(tmp_path, monkeypatch, make, args, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        run_prepare(*args, "--out", "out") if "--out" not in args else run_prepare(*args)


def test_hub_dataset(tmp_path, tok, monkeypatch, capsys):
    """Never the network: a stand-in `datasets` module, then none at all, then one that is offline."""
    calls = []

    def load_dataset(name, subset, split, streaming):
        calls.append((name, subset, split, streaming))
        return iter([{"text": doc, "meta": {}} for doc in DOCS])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    run_prepare("HuggingFaceTB/smollm-corpus", "--subset", "cosmopedia-v2", "--out", tmp_path / "out")
    # streamed twice: its first record says whether it is conversations, then it is read
    assert calls == [("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", True)] * 2
    assert read(tmp_path / "out") == expected(tok, DOCS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the import fails
    with pytest.raises(UserError, match="pip install datasets"):
        run_prepare("HuggingFaceTB/smollm-corpus", "--out", tmp_path / "out2")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\n(more lines)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match=r"cannot stream .* \(ConnectionError: Couldn't reach the Hub\); download it"):
        run_prepare("HuggingFaceTB/smollm-corpus", "--out", tmp_path / "out3")


def test_a_hub_dataset_of_conversations_is_prepared_as_conversations(tmp_path, monkeypatch):
    # smoltalk's records hold "messages" (and other fields), not "text"
    from smolkit.conversations import encode_all, load_conversations
    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(5)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, subset, split, streaming: iter([{"messages": c, "source": "x"} for c in chats])))
    meta = run_prepare("HuggingFaceTB/smoltalk", "--subset", "all", "--out", tmp_path / "chats")
    assert meta["conversations"] == 5
    tokenizer = load_tokenizer()
    for got, want in zip(load_conversations(str(tmp_path / "chats"), tokenizer), encode_all(chats, tokenizer)):
        assert np.array_equal(got, want)


def test_cli_syntax_and_summary(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_prepare()
    assert e.value.code == 2
    assert capsys.readouterr().err == "python -m tools.prepare: error: the following arguments are required: SOURCE\n"
    write_text(tmp_path / "good.txt", DOCS)
    run_prepare(tmp_path / "good.txt", "--out", tmp_path / "out")
    out = capsys.readouterr().out
    assert out.startswith(f"{len(DOCS)} documents: ") and "MB/s" in out and "tokens/s" in out and out.count("\n") == 1


# the real command line: all cases started at once, as each one spends a second importing torch
CLI_CASES = {
    "missing source": (["nope.txt"], "error: nope.txt not found"),
    "empty corpus": (["empty.txt"], "error: empty.txt holds no documents"),
    "missing column": (["rows.jsonl"], "error: rows.jsonl line 1 has no 'text' field (it has: body)"),
    # whether or not `datasets` is installed here, offline: one line either way
    "hub, offline": (["HuggingFaceTB/smollm-corpus", "--subset", "cosmopedia-v2"], "error: "),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty.txt").write_text("\n<|endoftext|>\n   \n")
    (root / "rows.jsonl").write_text('{"body": "text under another name"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # never the network
    procs = {name: subprocess.Popen([*command("tools.prepare"), *args, "--out", "out"],
                                    cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in CLI_CASES.items()}
    results = {name: (p, *p.communicate(timeout=120)) for name, p in procs.items()}
    return root, results


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_errors(cli, name):
    root, results = cli
    proc, out, err = results[name]
    assert proc.returncode == 1, err
    assert err.startswith(CLI_CASES[name][1]) and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == ""
    assert not os.path.exists(root / "out" / "train.bin")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="needs pyarrow: pip install pyarrow"):
        run_prepare(tmp_path / "data.parquet", "--out", tmp_path / "out")

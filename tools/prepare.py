"""
Tokenize a corpus once into flat files of token ids, for data too big for train.py's
in-memory --data file.

    python -m tools.prepare input.txt                            # -> data/train.bin, data/val.bin, data/meta.json
    python -m tools.prepare corpus/ --out data/mine              # every .txt, .jsonl, .parquet under corpus/
    python -m tools.prepare shard.jsonl --text_column content    # one JSON object per line
    python -m tools.prepare HuggingFaceTB/smollm-corpus --subset cosmopedia-v2   # streamed; pip install datasets

Sources: a text file (any extension) is split into documents at <|endoftext|> exactly as
smolkit/data.py's load_tokens splits train.py's --data (pieces stripped, empty ones dropped); a
.jsonl or .parquet file gives one document per record, the text in --text_column taken as
is (empty ones dropped); a folder gives all of those under it, in sorted path order; any
other owner/name is streamed from the Hugging Face hub with the `datasets` package.

Conversations: when the first .jsonl, .parquet or hub record has a "messages" field, the source
is conversations for fine-tuning (docs/training.md): ids.bin (uint16), targets.bin (uint8, 1
where the assistant speaks) and bounds.bin (int64, where each conversation starts, then the
end), as conversations.encode_all lays them out; train.py holds every 20th out for
validation itself, so --val_fraction does not apply. Preference pairs (a first record with
"chosen" and "rejected") are laid out alike, two sequences a pair (prompt + chosen, prompt +
rejected, as smolkit/preferences.py encodes them), and meta.json says "kind": "preferences".

Output: train.bin and val.bin are uint16 token ids (49,152 < 65,536), every document
followed by <|endoftext|> (id 0): the token stream of load_tokens. Read them with
np.memmap(path, dtype=np.uint16, mode="r"). meta.json holds the counts.

Split: documents are numbered i = 0, 1, 2, ... in reading order, and document i goes to
val.bin when (i + 1) * F passes a whole number, F = --val_fraction: floor(n * F) of n
documents, evenly spread (F = 0.01: i = 99, 199, 299, ...). If that picks none of two or
more documents, the last document goes to val.bin. With F = 0, or a single document,
val.bin is empty (0 bytes, which np.memmap refuses: check the size or meta.json first).
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m tools.prepare")

import json
import os
import re
import sys
import time
from fractions import Fraction

import numpy as np

from smol import EOT_ID
from smolkit.common import Parser, UserError, fail
from smolkit.conversations import check_messages, encode, record_kind, require_replies
from smolkit.preferences import check_pair, encode_pair
from smolkit.data import DOC_SEPARATOR, jsonl_records, load_tokenizer

EXTENSIONS = (".txt", ".jsonl", ".parquet")  # what a folder is searched for
NOT_TEXT = (".json", ".csv", ".tsv", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar", ".arrow", ".bin", ".npy", ".pt")
CHUNK_CHARS = 1 << 22  # text files are read 4M characters at a time, never whole
BATCH_BYTES = 4 << 20  # a batch also ends at 4 MB of text, which bounds the memory of its encodings


def is_val(i, frac):
    """Does document i (counting from 0) go to val.bin? frac is a Fraction, so this is exact."""
    return (i + 1) * frac.numerator // frac.denominator > i * frac.numerator // frac.denominator


def text_documents(path):
    carry = ""
    with open(path, encoding="utf-8-sig") as f:  # as smolkit/data.py reads it: \r\n as \n, no BOM
        while chunk := f.read(CHUNK_CHARS):
            # the separator cannot overlap itself, so splitting chunk by chunk finds the same
            # separators as splitting the whole text; the last piece may be cut short (even
            # in the middle of a separator) and waits for the next chunk
            pieces = (carry + chunk).split(DOC_SEPARATOR)
            carry = pieces.pop()
            yield from map(str.strip, pieces)
    yield carry.strip()


def record_text(record, column, where):
    """The text in a record's column ('' for a null); a wrong column is the user's mistake."""
    if not isinstance(record, dict) or column not in record:
        has = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise UserError(f"{where} has no {column!r} field (it has: {has}); pass --text_column NAME")
    text = record[column]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: {column!r} holds a {type(text).__name__}, not text; pass --text_column NAME")
    return text or ""


def jsonl_documents(path, column):
    for record, where in jsonl_records(path):
        yield record_text(record, column, where)


def parquet_documents(path, column):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})")
    record_text(dict.fromkeys(pf.schema_arrow.names), column, path)  # is the column there?
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):  # a record batch at a time
        for text in batch.column(0).to_pylist():
            yield record_text({column: text}, column, path)


def hub_records(name, subset):
    """(record, where) for each record of a hub dataset's train split, streamed."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"{name} is not a local file or folder, and streaming it from the Hugging Face hub needs "
                        f"`pip install datasets`; or pass local .txt, .jsonl or .parquet files or a folder")
    try:
        for n, record in enumerate(load_dataset(name, subset, split="train", streaming=True)):
            yield record, f"{name} record {n}"
    except UserError:
        raise
    except Exception as e:  # offline, no such dataset, gated, connection lost midway...
        why = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"cannot stream {name} from the Hugging Face hub ({type(e).__name__}: {why}); "
                        f"download it and pass its local .parquet or .jsonl files or their folder instead")


def hub_documents(name, subset, column):
    for record, where in hub_records(name, subset):
        yield record_text(record, column, where)


def find_sources(args):
    """The files to read in order, or None for a hub dataset; checked before any output."""
    src = args.source
    if os.path.isdir(src):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(src)
                       for name in names if name.lower().endswith(EXTENSIONS))
        if not paths:
            raise UserError(f"folder {src} holds no .txt, .jsonl or .parquet files")
    elif os.path.isfile(src):
        if src.lower().endswith(NOT_TEXT):
            raise UserError(f"{src}: {os.path.splitext(src)[1]} files are not read; pass a text file, "
                            f".jsonl or .parquet files, or a folder of them")
        paths = [src]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.lower().endswith(EXTENSIONS + NOT_TEXT):
        paths = None  # owner/name of a dataset on the hub
    else:
        raise UserError(f"{src} not found; pass a text file, .jsonl or .parquet files, a folder of them, "
                        f"or a Hugging Face dataset name")
    if args.subset and paths is not None:
        raise UserError("--subset is for Hugging Face datasets only; drop it for local files")
    return paths


def read_documents(path, args):
    """The documents of one file, or of the hub dataset for path None."""
    if path is None:
        return hub_documents(args.source, args.subset, args.text_column)
    reader = {".jsonl": jsonl_documents, ".parquet": parquet_documents}.get(os.path.splitext(path)[1].lower())
    return reader(path, args.text_column) if reader else text_documents(path)  # any other extension is text


def documents(paths, args):
    """Every non-empty document of the source, in order."""
    for path in [None] if paths is None else paths:
        try:
            yield from (doc for doc in read_documents(path, args) if doc and not doc.isspace())
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason}); convert it first")


def batches(docs, max_docs, max_bytes):
    """Lists of documents and their size in bytes, up to max_docs documents or max_bytes."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.encode("utf-8"))
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def message_records(path, args, columns=("messages",)):
    """(record, where) for each record of a .jsonl or .parquet file of conversations (or pairs:
    their columns), or of the hub dataset for path None."""
    if path is None:
        yield from hub_records(args.source, args.subset)
    elif path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1024, columns=present):
            yield from ((dict(zip(present, row)), path) for row in zip(*(c.to_pylist() for c in batch.columns)))
    else:
        yield from jsonl_records(path)


def source_kind(paths, args):
    """What the source holds, from its first .jsonl, .parquet or hub record."""
    if paths is None:
        first = next(message_records(None, args), (None, None))[0]
        return record_kind(first.keys()) if isinstance(first, dict) else "text"
    for path in paths:
        if path.lower().endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
                return record_kind(pq.ParquetFile(path).schema_arrow.names)
            except Exception:
                return "text"  # read_documents says what is wrong with it
        if path.lower().endswith(".jsonl"):
            first = next(message_records(path, args), (None, None))[0]
            return record_kind(first.keys()) if isinstance(first, dict) else "text"
    return "text"


def prepare_conversations(args, paths, kind):
    """Conversations into ids.bin (uint16), targets.bin (uint8: 1 where the model learns to
    say the token) and bounds.bin (int64, n + 1: conversation i is ids[bounds[i]:bounds[i + 1]]),
    as conversations.encode_all lays them out; preference pairs likewise, two sequences each;
    train.py --data FOLDER reads them."""
    text = [p for p in paths or [] if not p.lower().endswith((".jsonl", ".parquet"))]
    if text:
        raise UserError(f"{text[0]} is text, but {args.source} holds {kind}; prepare them apart")
    tokenizer = load_tokenizer()
    pairs = kind == "preferences"
    names = ("ids.bin", "targets.bin", "bounds.bin", "meta.json")
    outputs = [os.path.join(args.out, name) for name in names]
    files = [open(path + ".tmp", "wb") for path in outputs[:3]]
    n, total, learned, t0 = 0, 0, 0, time.time()
    try:
        np.zeros(1, dtype=np.int64).tofile(files[2])
        for path in [None] if paths is None else paths:
            columns = ("prompt", "chosen", "rejected") if pairs else ("messages",)
            for record, where in message_records(path, args, columns):
                if pairs:
                    encoded = encode_pair(*check_pair(record, where), tokenizer)
                else:
                    encoded = [encode(check_messages(record, where), tokenizer)]
                for ids, targets in encoded:
                    ids.tofile(files[0])
                    targets.astype(np.uint8).tofile(files[1])
                    total, learned = total + len(ids), learned + int(targets.sum())
                    np.array([total], dtype=np.int64).tofile(files[2])
                n += 1
        require_replies(learned, args.source)
        with open(outputs[3] + ".tmp", "w") as f:
            f.write(json.dumps({"kind": kind, "pairs" if pairs else "conversations": n, "tokens": total,
                                "targets": learned, "dtype": "uint16", "source": args.source}, indent=2) + "\n")
        for f in files:
            f.flush()
            os.fsync(f.fileno())
        for path in outputs:  # meta.json last
            os.replace(path + ".tmp", path)
    finally:
        for f in files:
            f.close()
        for path in outputs:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    print(f"{n:,} {'preference pairs' if pairs else 'conversations'}: {total:,} tokens, {learned:,} of them the "
          f"assistant's, in {args.out} | {time.time() - t0:.2f}s")
    return {"pairs" if pairs else "conversations": n, "tokens": total, "targets": learned}


def prepare(args):
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.batch_docs < 1:
        raise UserError(f"--batch_docs must be positive, got {args.batch_docs}")
    frac = Fraction(args.val_fraction).limit_denominator(1_000_000)  # 0.01 -> exactly 1/100
    paths = find_sources(args)
    try:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "train.bin.tmp"), "wb").close()
        os.remove(os.path.join(args.out, "train.bin.tmp"))
    except OSError as e:
        raise UserError(f"cannot write to --out {args.out} ({e.strerror}); pass a writable folder")
    kind = source_kind(paths, args)
    if kind != "text":
        return prepare_conversations(args, paths, kind)
    tokenizer = load_tokenizer()
    # encode_batch_fast (tokenizers >= 0.20) gives the same ids as encode_batch without
    # computing character offsets, about 10% sooner; both spread a batch over all cores
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    eot = np.array([EOT_ID], dtype=np.uint16)
    # write to .tmp files and rename them at the end: a failure or Ctrl-C midway leaves
    # the previous train.bin and val.bin as they were
    outputs = [os.path.join(args.out, name) for name in ("train.bin", "val.bin", "meta.json")]
    files = {"train": open(outputs[0] + ".tmp", "wb"), "val": open(outputs[1] + ".tmp", "wb")}
    counts, ndocs, nbytes, last = {"train": 0, "val": 0}, 0, 0, None
    t0 = t_shown = time.time()
    tty = sys.stderr.isatty()
    try:
        for batch, size in batches(documents(paths, args), args.batch_docs, BATCH_BYTES):
            parts = {"train": [], "val": []}
            for enc in encode(batch):
                last = np.array(enc.ids, dtype=np.uint16)  # one conversion per document, no loop over ids
                parts["val" if is_val(ndocs, frac) else "train"] += [last, eot]
                ndocs += 1
            for split, arrays in parts.items():
                if arrays:
                    ids = np.concatenate(arrays)
                    ids.tofile(files[split])
                    counts[split] += len(ids)
            nbytes += size
            if time.time() - t_shown > (0.25 if tty else 10):  # redrawn in place on a terminal
                t_shown = time.time()
                line = (f"{nbytes / 1e6:,.1f} MB | {nbytes / 1e6 / (t_shown - t0):.2f} MB/s | "
                        f"{sum(counts.values()):,} tokens | {ndocs:,} documents")
                print("\r" + line if tty else line, end=" " if tty else "\n", file=sys.stderr, flush=True)
        if ndocs == 0:
            raise UserError(f"{args.source} holds no documents (empty, or only whitespace and separators)")
        note = ""
        if counts["val"] == 0 and frac > 0 and ndocs > 1:
            # the rule picked no document: move the last one, the end of train.bin, to val.bin
            counts["train"] -= len(last) + 1
            files["train"].flush()
            files["train"].truncate(counts["train"] * 2)  # 2 bytes a token
            np.concatenate([last, eot]).tofile(files["val"])
            counts["val"] = len(last) + 1
            note = f" (the split rule picked none of the {ndocs:,} documents, so the last one is val)"
        elif counts["val"] == 0 and frac > 0:
            note = " (a single document, so val.bin is empty)"
        meta = {"vocab_size": tokenizer.get_vocab_size(), "dtype": "uint16", "eot_id": EOT_ID,
                "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": ndocs,
                "source": args.source, "val_fraction": args.val_fraction}
        with open(outputs[2] + ".tmp", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        for f in files.values():  # on disk before the renames make them the real thing
            f.flush()
            os.fsync(f.fileno())
        for path in outputs:  # meta.json last: it describes the .bin files beside it
            os.replace(path + ".tmp", path)
    finally:
        if tty and t_shown > t0:
            print(file=sys.stderr)  # keep the last progress line; what follows goes below it
        for f in files.values():
            f.close()
        for path in outputs:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    dt = time.time() - t0
    print(f"{ndocs:,} documents: {counts['train']:,} train + {counts['val']:,} val tokens{note} in {args.out} | "
          f"{nbytes / 1e6:,.1f} MB in {dt:.2f}s: {nbytes / 1e6 / dt:.2f} MB/s, "
          f"{sum(counts.values()) / dt:,.0f} tokens/s")
    return meta


def build_parser():
    parser = Parser(prog="python -m tools.prepare", description="Tokenize a corpus into train.bin and val.bin (uint16 ids).")
    parser.add_argument("source", metavar="SOURCE", help="text file, .jsonl, .parquet, folder, or hub dataset name")
    parser.add_argument("--out", default="data", help="folder for train.bin, val.bin, meta.json (default data)")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents for val.bin")
    parser.add_argument("--text_column", default="text", help="the text field of .jsonl, .parquet and hub records")
    parser.add_argument("--subset", default=None, help="Hugging Face dataset configuration, e.g. cosmopedia-v2")
    parser.add_argument("--batch_docs", type=int, default=1024, help="documents per encode_batch call")
    return parser


def main(argv=None):
    return prepare(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))
    except OSError as e:  # a source that cannot be read, a full disk...
        fail(f"{e.filename or 'I/O error'}: {e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted; nothing was written (any earlier train.bin and val.bin are as they were)", file=sys.stderr)
        sys.exit(130)

"""
How close does tools.prepare come to the tokenizer's own speed, and does its memory stay flat?

    python -m bench.bench_prepare                 # 25 MB and 50 MB corpora
    python -m bench.bench_prepare --sizes 50 200 --repeat 3

For each corpus size it measures, in one run:
  (a)  bare tokenizer.encode_batch over the same documents in the same batches as tools.prepare
       (documents already in memory, nothing written): the ceiling;
  (a') the same with encode_batch_fast, which tools.prepare uses where tokenizers has it;
  (b)  tools.prepare end to end: reading, splitting, encoding, converting, writing, fsync.
       "wall" includes starting Python and importing torch (smol.py and train.py import it),
       shown alone on the "startup" line; "work" is tools.prepare's own timing, from loading
       the tokenizer to the renamed files.
Every measurement runs in a fresh child process (a fresh tokenizer, whose word cache warms
up within a run), and peak memory is that child's maximum resident set from os.wait4. This
parent imports nothing heavy: a child's ru_maxrss also counts the parent's pages at fork.
Figures are the best of --repeat runs, interleaved. The corpora are documents of shuffled
paragraphs of input.txt (fixed seed), written once to a temporary folder and reused.
"""

if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m bench.bench_prepare")

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEPARATOR = "<|endoftext|>"  # train.DOC_SEPARATOR (not imported: it would pull in torch here)

BARE = """
import sys, time
from tools.prepare import BATCH_BYTES, batches, text_documents
from smolkit.data import load_tokenizer
corpus, method, batch_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = [doc for doc in text_documents(corpus) if doc]  # as tools.prepare: empty pieces dropped
groups = [batch for batch, _ in batches(iter(docs), batch_docs, BATCH_BYTES)]
encode = getattr(load_tokenizer(), method)
t0, ntokens = time.perf_counter(), 0
for batch in groups:
    ntokens += sum(len(enc) for enc in encode(batch)) + len(batch)  # and one EOT each, as tools.prepare
print(time.perf_counter() - t0, ntokens, sum(len(doc.encode()) for doc in docs))
"""


def make_corpus(path, megabytes, seed=1337):
    """Documents of 3 to 12 paragraphs drawn from input.txt in random order, until megabytes."""
    if os.path.exists(path):
        return
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        text = f.read().replace(SEPARATOR, "")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    rng, size = random.Random(seed), 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            doc = "\n\n".join(rng.sample(paragraphs, rng.randint(3, 12)))
            f.write(f"{doc}\n{SEPARATOR}\n")
            size += len(doc.encode("utf-8")) + len(SEPARATOR) + 2
    os.replace(path + ".tmp", path)


def run(*args):
    """Wall seconds, stdout and peak RSS (MB) of one Python child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves, to get its own rusage
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"python {' '.join(args)[:80]} failed: {err.read().strip()}")
        return wall, out.read(), usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50], help="corpus sizes in MB")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs per figure")
    parser.add_argument("--batch_docs", type=int, default=1024)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "smol_bench_prepare"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; corpora in {args.dir}")
    # what every tools.prepare run pays before its first document
    startup, _, base_rss = min(run("-c", "from tools import prepare; prepare.load_tokenizer()") for _ in range(args.repeat))
    rows = [("", "startup: imports + tokenizer", f"{startup:.2f}", "", "", "", f"{base_rss:,.0f}")]
    for mb in args.sizes:
        corpus = os.path.join(args.dir, f"corpus_{mb}mb.txt")
        make_corpus(corpus, mb)
        times, tokens, peak = {}, {}, {}
        for _ in range(args.repeat):  # interleaved, so a busy spell on the machine hits all alike
            for method in ("encode_batch", "encode_batch_fast"):
                _, out, rss = run("-c", BARE, corpus, method, str(args.batch_docs))
                dt, tokens[method], nbytes = float(out.split()[0]), int(out.split()[1]), int(out.split()[2])
                times[method], peak[method] = min(times.get(method, dt), dt), max(peak.get(method, 0), rss)
            wall, out, rss = run("-m", "tools.prepare", corpus, "--out", os.path.join(args.dir, f"out_{mb}mb"),
                                 "--batch_docs", str(args.batch_docs))
            work = float(re.search(r" in ([\d.]+)s: ", out).group(1))
            n = sum(int(s.replace(",", "")) for s in re.search(r"([\d,]+) train \+ ([\d,]+) val tokens", out).groups())
            for name, dt in (("wall", wall), ("work", work)):
                times[name], tokens[name], peak[name] = min(times.get(name, dt), dt), n, max(peak.get(name, 0), rss)
        assert len(set(tokens.values())) == 1, tokens  # all of them made the same number of tokens
        for name, label in (("encode_batch", "(a)  bare encode_batch"),
                            ("encode_batch_fast", "(a') bare encode_batch_fast"),
                            ("wall", "(b)  tools.prepare, wall"), ("work", "(b)  tools.prepare, work")):
            dt = times[name]
            rows.append((f"{nbytes / 1e6:.1f}", label, f"{dt:.2f}", f"{nbytes / 1e6 / dt:.2f}",
                         f"{tokens[name] / dt / 1e6:.2f}", f"{times['encode_batch'] / dt:.2f}",
                         "" if name == "work" else f"{peak[name]:,.0f}"))
    header = ("text MB", "what", "seconds", "MB/s", "Mtok/s", "x (a)", "peak RSS MB")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"x (a): throughput relative to (a). Peak RSS of (a) holds every document in memory; (b) streams. "
          f"Load average {os.getloadavg()[0]:.2f} at the end: on a busy machine the timings are noisy.")


if __name__ == "__main__":
    main()

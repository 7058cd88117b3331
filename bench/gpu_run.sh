#!/usr/bin/env bash
# The GPU run, prepared: the README's main job and a trimmed bench on one CUDA card, every
# log, the metrics and a bundle of them written into one folder, OUT_DIR.
#
#   bash bench/gpu_run.sh [main|bench|all|dry] [OUT_DIR]
#
#   main   the machine (nvidia-smi, python, torch, CUDA, the driver, the card's name), then the
#          README's three commands as users run them, each under its own timeout:
#            python train.py --max_iters 5000
#            python train.py --init_from resume --max_iters 5050
#            python sample.py
#          all on --out_dir out-gpu-CARD (never out/); then metrics.jsonl, each run's pace
#          (ms/step, tok/s, MFU) and one gpu-run-CARD-DATE.tar.gz of the logs, metrics.jsonl
#          and the sample
#   bench  python -m bench.bench in three parts, trimmed to fit BENCH_S (see bench_job)
#   all    main, then bench
#   dry    both on the CPU in a minute or two, through the same functions: a tiny model, a few
#          steps, tiny bench shapes, no nvidia-smi, its training folder OUT_DIR/train, so nothing
#          in the repository is touched (tests/test_gpu_run.py runs it); dry-main and dry-bench
#          run one half
#
# OUT_DIR: default $OUT if set (the device tool's folder that comes back), else ./out-gpu-run.
# Timeouts in seconds (0: none) from the environment: TRAIN_S, RESUME_S, SAMPLE_S, and BENCH_S
# for the whole bench phase; PYTHON names the interpreter (default: python, else python3).
#
# The budget. On the device tool (/work/.library/device/README.md) a command runs at most 600 s
# and a session has about 15 minutes of device time, the machine's start included, so `main`
# must end inside one call and `bench` gets what is left, in a second call. main, at worst:
#   ~20 s the machine's description and reading the checkpoint's step twice
#   370 s (+15 s grace) the 5,000 steps, 80 s (+15 s grace) the resume, 40 s the sample
#   = about 545 s, under the call's 600 s with room for the bundle.
# How long the 5,000 steps take on an H100 is unmeasured. A step of 16 x 512 tokens is
# 7.5 TFLOP (SmolLM.flops_per_token: 913M a token), so 5,000 steps are 37 PFLOP: at least
# 38 s at the H100's bf16 peak of 989 TFLOP/s (47 s at the 798 that a large matrix product
# reached on the device tool's H100); the real pace, torch.compile's first compilation and
# 20 evaluations, each with a sample and a 1.6 GB checkpoint, come on top. If TRAIN_S cuts the
# run, `timeout` sends SIGTERM: train.py finishes its step, saves out-gpu-CARD/ckpt.pt, exits,
# and its log shows how far it got (a cut during the first compilation saves nothing). A cut
# run still resumes exactly: `main` again continues it to 5,000 (CARD-train-5000-continued.log),
# then runs the resume to 5,050 and the sample. On the device tool that works only on the same
# machine, a call within the 30 s it stays warm (out-gpu-*/ is git-ignored, so it stays there
# between calls); a fresh machine starts over.
#
# The loss curves are drawn afterwards, on any machine with matplotlib, from metrics.jsonl:
#   python -m tools.plot --out_dir OUT_DIR        (or the folder the tar.gz unpacks to)
# so the GPU machine needs no matplotlib.

set -uo pipefail

PHASE=${1:-main}
case "$PHASE" in
    main | bench | all) SCALE=gpu ;;
    dry) SCALE=dry PHASE=all ;;
    dry-main | dry-bench) SCALE=dry PHASE=${PHASE#dry-} ;;  # one half of the dry run (a test continues a cut run)
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash bench/gpu_run.sh [main|bench|all|dry|dry-main|dry-bench] [OUT_DIR]" >&2; exit 2 ;;
esac
OUT_DIR=${2:-${OUT:-./out-gpu-run}}  # out-*/ is git-ignored
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1  # absolute: we move to the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

export PYTHONUNBUFFERED=1  # the logs fill as the run goes, and a cut run's log is complete to its cut
TRAIN_S=${TRAIN_S:-370}    # the 5,000 steps (see the budget above)
RESUME_S=${RESUME_S:-80}   # the 50 steps after the resume: a fresh process traces and compiles again (inductor's
                           # cache helps), evaluates, samples and saves
SAMPLE_S=${SAMPLE_S:-40}   # sample.py's two samples of 200 tokens, eager
BENCH_S=${BENCH_S:-240}    # the bench phase, all its parts: what the device time leaves after main
GRACE_S=15                 # after the timeout's SIGTERM, time to finish a step and save; then SIGKILL
DATE=$(date +%Y-%m-%d)
STATUS=0                   # the first failing command's exit status, the script's own at the end
CARD=unknown               # set by describe_machine: the card's name as a file name (h100-80gb-hbm3), or cpu
MAIN_LOG=/dev/null         # OUT_DIR/CARD-run.log once the card is known: the description and every command

note() {  # a line of the script's own, on the screen and in the main log
    echo "gpu_run: $*" | tee -a "$MAIN_LOG"
}

pick_python() {  # the first of $PYTHON, python, python3 that imports torch (the device has python3)
    local p
    for p in ${PYTHON:-} python python3; do
        if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then PY=$p; return 0; fi
    done
    echo "gpu_run: no python with torch found (set PYTHON)" >&2
    exit 1
}

describe_machine() {  # DEVICE (cuda or cpu): nvidia-smi, the versions, the card; sets CARD and MAIN_LOG
    local device=$1 text
    text=$(
        if [[ $device == cuda ]]; then nvidia-smi 2>&1 || echo "nvidia-smi failed"
        else echo "nvidia-smi: skipped (dry run on the CPU)"; fi
        "$PY" - "$device" <<'EOF' 2>&1
import platform, re, subprocess, sys
import torch
device = sys.argv[1]
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import transformers
    print(f"transformers {transformers.__version__}")
except ImportError:
    print("transformers: not installed (the bench then measures smol only)")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device; `bash bench/gpu_run.sh dry` is the CPU check")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        driver = "unknown"
    name = torch.cuda.get_device_name(0)
    p = torch.cuda.get_device_properties(0)
    print(f"driver {driver}; card {name}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} multiprocessors")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "").replace("geforce", "")).strip("-")
else:
    slug = "cpu"
print(f"card slug: {slug or 'cuda'}")
EOF
    ) || { echo "$text" >&2; exit 1; }
    CARD=$(sed -n 's/^card slug: //p' <<<"$text")
    MAIN_LOG="$OUT_DIR/$CARD-run.log"
    echo "$text" | tee -a "$MAIN_LOG"
}

run_step() {  # NAME LOG TIMEOUT_S COMMAND...: run it under `timeout`, its output appended to LOG and shown
    local name=$1 log=$2 limit=$3 t0=$SECONDS rc
    shift 3
    note "$name: $* (timeout ${limit} s, log ${log##*/})"
    timeout -k "$GRACE_S" "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    note "$name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ', cut by its timeout')"
    [[ $rc == 0 || $STATUS != 0 ]] || STATUS=$rc
    return "$rc"
}

ckpt_step() {  # DIR: the steps DIR/ckpt.pt holds, -1 without one (memory-mapped: only the number is read)
    [[ -f $1/ckpt.pt ]] || { echo -1; return; }
    "$PY" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', mmap=True, weights_only=True)['iter_num'])" \
        "$1/ckpt.pt" 2>/dev/null || echo -1
}

summarize() {  # LOG...: each training log's pace (median of its step lines but the first) and last evaluation
    "$PY" - "$@" <<'EOF'
import re, statistics, sys
for path in sys.argv[1:]:
    lines = open(path, errors="replace").read().splitlines()
    steps = [l for l in lines if re.match(r"step \d+ \|", l)]
    if not steps:
        print(f"{path.rsplit('/', 1)[-1]}: no step logged"); continue
    def median(pattern):
        vals = [float(m.group(1).replace(",", "")) for l in steps[1:] for m in [re.search(pattern, l)] if m]
        return statistics.median(vals) if vals else None
    first, last = (int(l.split()[1]) for l in (steps[0], steps[-1]))
    ms, tok, mfu = median(r"\| ([\d.]+) ms"), median(r"\| ([\d,]+) tok/s"), median(r"\| mfu ([\d.]+)%")
    pace = (f"median {ms:.1f} ms/step, {tok:,.0f} tok/s" + (f", mfu {mfu:.1f}%" if mfu else "")) if ms else "one step"
    evals = [l for l in lines if l.startswith("eval step")]
    print(f"{path.rsplit('/', 1)[-1]}: steps {first}..{last}, {pace}; " + (evals[-1] if evals else "no evaluation"))
EOF
}

bundle() {  # the logs, metrics.jsonl and the sample as one CARD-DATE tar.gz in OUT_DIR
    local name="gpu-run-$CARD-$DATE" files=() f
    for f in "$OUT_DIR/$CARD"-*.log "$OUT_DIR/metrics.jsonl"; do [[ -f $f ]] && files+=("${f##*/}"); done
    tar -czf "$OUT_DIR/$name.tar.gz" -C "$OUT_DIR" --transform "s,^,$name/," "${files[@]}" &&
        note "bundled ${files[*]} as $OUT_DIR/$name.tar.gz (unpacks to $name/)"
}

main_job() {  # DIR ITERS MORE: the README's three commands on --out_dir DIR
    # FIRST_FLAGS go to the first run only (a resume takes its settings from the checkpoint);
    # RUN_FLAGS to every train.py, SAMPLE_FLAGS to sample.py. All three are empty on a GPU.
    local dir=$1 iters=$2 more=$3 step log train_logs=()
    step=$(ckpt_step "$dir")
    if ((step < 0)); then  # the first run, as the README writes it
        log="$OUT_DIR/$CARD-train-$iters.log"
        run_step "train $iters" "$log" "$TRAIN_S" \
            "$PY" train.py --max_iters "$iters" --out_dir "$dir" "${FIRST_FLAGS[@]}" "${RUN_FLAGS[@]}"
        train_logs+=("$log")
    elif ((step < iters)); then  # an earlier call's run, cut by its timeout: continue it exactly
        note "$dir/ckpt.pt holds $step steps: continuing that run to $iters"
        log="$OUT_DIR/$CARD-train-$iters-continued.log"
        run_step "train $iters, continued" "$log" "$TRAIN_S" \
            "$PY" train.py --init_from resume --max_iters "$iters" --out_dir "$dir" "${RUN_FLAGS[@]}"
        train_logs+=("$log")
    else
        note "$dir/ckpt.pt holds $step steps: the first $iters are done (remove $dir to start over)"
    fi
    step=$(ckpt_step "$dir")
    if ((step >= iters && step < iters + more)); then  # the resume the README promises: its log starts at iters + 1
        log="$OUT_DIR/$CARD-resume-$((iters + more)).log"
        run_step "resume to $((iters + more))" "$log" "$RESUME_S" \
            "$PY" train.py --init_from resume --max_iters "$((iters + more))" --out_dir "$dir" "${RUN_FLAGS[@]}"
        train_logs+=("$log")
    elif ((step < iters)); then
        note "the run stopped at step $step of $iters, so no resume to $((iters + more)) in this call:" \
            "run main again on the same machine to continue it"
    fi
    if [[ -f $dir/ckpt.pt ]]; then  # a sample also from a cut run: what the weights say so far
        run_step sample "$OUT_DIR/$CARD-sample.log" "$SAMPLE_S" "$PY" sample.py --out_dir "$dir" "${SAMPLE_FLAGS[@]}"
    fi
    [[ -f $dir/metrics.jsonl ]] && cp "$dir/metrics.jsonl" "$OUT_DIR/metrics.jsonl"
    if ((${#train_logs[@]})); then summarize "${train_logs[@]}" | tee -a "$MAIN_LOG"; fi
    bundle
}

bench_job() {  # FLAG...: python -m bench.bench in parts, cheapest first, within BENCH_S in all
    # bench.bench prints a section's rows only once all of its cases ran and writes --json only at
    # its end, so a cut invocation leaves nothing: each part is a whole invocation with its own
    # JSON, run against one deadline, and a part with under 30 s left is not started. The FLAGs
    # come last, so they win over a part's own (dry: --compile_decode false everywhere).
    local base="$OUT_DIR/bench-$CARD-$DATE" deadline=$((SECONDS + BENCH_S)) part left parts=() rcs=()
    local -A flags=(
        # decoding at batch 1 and 16, eager: ours (as sample.py) and smol.py's plain loop, bf16 and
        # fp32, against transformers' eager generate; and the server's step, eager: no compilation
        [generate-eager]="--skip_train --compile_decode false --hf_compile false"
        # training, each case in a fresh process: smol compiled (train.py's default) and eager, the
        # loss in one piece and in pieces, against transformers eager (transformers compiled is
        # left out: one more compilation; the untrimmed `python -m bench.bench` has it)
        [train]="--skip_generate --hf_compile false"
        # decoding with smol's compiled step (CUDA graphs) against transformers' static cache +
        # compile, and the server's compiled step; the eager rows again beside them
        [generate-compiled]="--skip_train --compile_decode true"
    )
    : >"$base.txt"
    cat "$MAIN_LOG" >>"$base.txt"
    for part in generate-eager train generate-compiled; do
        left=$((deadline - SECONDS))
        if ((BENCH_S > 0 && left < 30)); then
            note "bench $part: not started, ${left} s left of BENCH_S=$BENCH_S" | tee -a "$base.txt"
            parts+=("$part"); rcs+=(skipped); continue
        fi
        ((BENCH_S > 0)) || left=0
        # shellcheck disable=SC2086  # a part's flags are words
        run_step "bench $part" "$base.txt" "$left" "$PY" -m bench.bench ${flags[$part]} "$@" --json "$base-$part.json"
        rcs+=($?); parts+=("$part")
    done
    # one JSON: every part's results, its info, and how each part ended (0, 124 = cut, skipped)
    "$PY" - "$base" "${parts[*]}" "${rcs[*]}" <<'EOF' && rm -f "$base"-*.json && note "bench results: $base.json, $base.txt"
import json, os, sys
base, parts, rcs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
merged = {"info": {}, "results": [], "parts": {}}
for part, rc in zip(parts, rcs):
    path = f"{base}-{part}.json"
    got = json.load(open(path)) if os.path.exists(path) else {"info": {}, "results": []}
    merged["info"].update(got["info"])
    merged["results"] += got["results"]
    merged["parts"][part] = {"exit": int(rc) if rc.isdigit() else rc, "rows": len(got["results"])}
json.dump(merged, open(base + ".json", "w"), indent=2)
EOF
}

# The same steps in both scales; only the sizes differ.
pick_python
if [[ $SCALE == dry ]]; then
    describe_machine cpu
    # a 3M-parameter model, 4 steps then 2 more, 8 tokens of sample, in OUT_DIR/train
    TRAIN_DIR=$OUT_DIR/train ITERS=4 MORE=2
    FIRST_FLAGS=(--n_layer 2 --n_embd 64 --n_head 4 --n_kv_head 2 --intermediate_size 128 --block_size 64
        --batch_size 4 --eval_interval 2 --eval_iters 1 --log_interval 1 --sample_tokens 4)
    RUN_FLAGS=(--device cpu)
    SAMPLE_FLAGS=(--device cpu --num_samples 1 --max_new_tokens 8)
    # the bench at toy shapes, ours only, never compiling (a CPU compilation takes minutes)
    BENCH_FLAGS=(--device cpu --n_layer 2 --steps 1 --warmup 0 --batch_size 1 --block_size 32 --new_tokens 4
        --gen_batches 1 --repeat 1 --serve_steps 1 --skip_hf --compile_decode false --llama_cpp skip)
else
    describe_machine cuda
    # the README's commands as they are: train.py's defaults (the 135M model, 16 x 512 tokens a
    # step, bf16 autocast, torch.compile), in a folder named for the card
    TRAIN_DIR=out-gpu-$CARD ITERS=5000 MORE=50
    FIRST_FLAGS=() RUN_FLAGS=() SAMPLE_FLAGS=()
    # the bench's CUDA shapes (16 x 2048 training, 256 new tokens at batch 1 and 16), fewer steps and rounds
    BENCH_FLAGS=(--steps 10 --warmup 3 --repeat 1 --serve_steps 10)
fi
if [[ $PHASE == main || $PHASE == all ]]; then main_job "$TRAIN_DIR" "$ITERS" "$MORE"; fi
if [[ $PHASE == bench || $PHASE == all ]]; then bench_job "${BENCH_FLAGS[@]}"; fi
note "done, exit $STATUS; files in $OUT_DIR"
note "the loss curves: python -m tools.plot --out_dir DIR, where DIR holds metrics.jsonl ($OUT_DIR, or the" \
    "folder gpu-run-$CARD-$DATE.tar.gz unpacks to), on any machine with matplotlib"
exit "$STATUS"

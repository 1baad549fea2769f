#!/usr/bin/env bash
# Side-by-side speed of Cardinal and llama.cpp on the same GGUF, same machine,
# same threads, alternating runs so both see the same machine state.
#
#   bash bench/compare.sh [--threads 2] [--runs 3] [--prompt 512] [--gen 128] \
#        [--llama-python /path/to/venv/bin/python] [--llama-bench /path/to/llama-bench]
#
# Without --llama-python or --llama-bench only Cardinal runs. Get llama.cpp with
#   python3 -m venv V && V/bin/pip install 'llama-cpp-python==0.3.36'
# (it builds llama.cpp from source: several minutes on 2 cores), or build
# llama.cpp's own llama-bench from the same PyPI source tarball (see
# PERFORMANCE.md, "How to reproduce"). llama-bench's decode (tg) starts from an
# empty context, ours after the prompt. Measure on a quiet machine (`uptime`
# load < 0.5): llama.cpp's threads busy-wait and collapse when another process
# shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=2 RUNS=3 PROMPT=512 GEN=128 LLAMA_PY="" LLAMA_BENCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS=$2; shift 2;;
    --runs) RUNS=$2; shift 2;;
    --prompt) PROMPT=$2; shift 2;;
    --gen) GEN=$2; shift 2;;
    --llama-python) LLAMA_PY=$2; shift 2;;
    --llama-bench) LLAMA_BENCH=$2; shift 2;;
    *) echo "unknown flag $1" >&2; exit 2;;
  esac
done
cargo build --release -q -p cardinal-server
MODEL="${CARDINAL_HOME:-$HOME/.cache/cardinal}/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$MODEL" ] || ./target/release/cardinal tokenize "warm up the model cache" >/dev/null
OUT=$(mktemp -d)
for i in $(seq 1 "$RUNS"); do
  ./target/release/cardinal bench --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --reps 1 --json 2>/dev/null >>"$OUT/cardinal.jsonl"
  if [ -n "$LLAMA_PY" ]; then
    "$LLAMA_PY" bench/llama_cpp_bench.py "$MODEL" "$THREADS" "$PROMPT" "$GEN" >>"$OUT/llama.jsonl"
  fi
  if [ -n "$LLAMA_BENCH" ]; then
    "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r 1 -o jsonl 2>/dev/null | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
pp = [r["avg_ts"] for r in rows if r["n_gen"] == 0]
tg = [r["avg_ts"] for r in rows if r["n_prompt"] == 0]
print(json.dumps({"prefill_tokens_per_second": pp[0], "decode_tokens_per_second": tg[0]}))
' >>"$OUT/llama-bench.jsonl"
  fi
done
python3 - "$OUT" "$THREADS" "$PROMPT" "$GEN" <<'PY'
import json, os, statistics, sys
out, threads, prompt, gen = sys.argv[1:5]
def med(f, k):
    p = os.path.join(out, f)
    if not os.path.exists(p): return None
    return statistics.median(json.loads(l)[k] for l in open(p) if l.strip())
print(f"threads {threads}, prompt {prompt} tokens, decode {gen} tokens; medians")
print(f"{'':10} {'cardinal':>10} {'llama-cpp-python':>17} {'ratio':>7} {'llama-bench':>12} {'ratio':>7}")
for k, name in [("prefill_tokens_per_second", "prefill"), ("decode_tokens_per_second", "decode")]:
    c, l, b = med("cardinal.jsonl", k), med("llama.jsonl", k), med("llama-bench.jsonl", k)
    ratio = lambda x: f"{c / x:.2f}x" if x else "n/a"
    print(f"{name:10} {c:10.1f} {(l or float('nan')):17.1f} {ratio(l):>7} {(b or float('nan')):12.1f} {ratio(b):>7}")
PY

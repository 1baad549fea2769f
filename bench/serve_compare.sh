#!/usr/bin/env bash
# Server-level side-by-side: `cardinal serve` and llama.cpp's server
# (llama-cpp-python's OpenAI server) on the same GGUF, both driven by
# cardinal-loadtest at concurrency 1, 4 and 16 with 128-token outputs at
# temperature 0 (as llama.cpp's published server figures).
#
#   bash bench/serve_compare.sh [--llama-python /path/to/venv/bin/python]
#        [--llama-server /path/to/llama-server] [--requests 48]
#        [--concurrency 1,4,16] [--shared-prefix N]
#
# With --shared-prefix N every request of a level starts with the same
# system prompt of about N tokens (cardinal-loadtest --shared-prefix-tokens),
# Cardinal runs a second time with --no-prefix-cache for comparison
# (target/serve_compare/cardinal-no-prefix-cache/), and llama-server gets a
# context of 16 × (N + 512) tokens so its slots hold the longer prompts (its
# prompt cache, on by default, reuses a slot's previous prompt).
#
# Reports land in target/serve_compare/{cardinal,llama}/ (report.json, CSV, SVGs).
# llama-cpp-python's server is started with --interrupt_requests False (its
# default cuts running streams when a new request arrives) and 2 threads.
# llama.cpp's own llama-server is run as the issue's anchor was:
# `-np 16 --cont-batching -t 2` (16 slots of 512 tokens each).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_PY="" LLAMA_SERVER="" REQUESTS=48 OUT=target/serve_compare LEVELS=1,4,16 PREFIX=0
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-python) LLAMA_PY=$2; shift 2;;
    --llama-server) LLAMA_SERVER=$2; shift 2;;
    --requests) REQUESTS=$2; shift 2;;
    --concurrency) LEVELS=$2; shift 2;;
    --shared-prefix) PREFIX=$2; shift 2;;
    *) echo "unknown flag $1" >&2; exit 2;;
  esac
done
cargo build --release -q -p cardinal-server -p cardinal-loadtest
MODEL="${CARDINAL_HOME:-$HOME/.cache/cardinal}/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$OUT"
wait_ready() { for _ in $(seq 1 120); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
LOAD=(--concurrency "$LEVELS" --requests "$REQUESTS" --output-tokens 128 --temperature 0 --shared-prefix-tokens "$PREFIX")

cardinal_run() { # name, extra serve flags...
  local name=$1; shift
  ./target/release/cardinal serve --model "$MODEL" --port 18501 --threads 2 --max-num-seqs 16 "$@" >"$OUT/$name-server.log" 2>&1 &
  PID=$!
  wait_ready http://127.0.0.1:18501/ready
  ./target/release/cardinal-loadtest --url http://127.0.0.1:18501 "${LOAD[@]}" --out "$OUT/$name" | tee "$OUT/$name.txt"
  kill -TERM "$PID"; wait "$PID" || true
}
cardinal_run cardinal
if [ "$PREFIX" -gt 0 ]; then
  cardinal_run cardinal-no-prefix-cache --no-prefix-cache
fi

if [ -n "$LLAMA_PY" ]; then
  "$LLAMA_PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port 18502 --n_threads 2 \
    --n_ctx 8192 --interrupt_requests False >"$OUT/llama-server.log" 2>&1 &
  LPID=$!
  wait_ready http://127.0.0.1:18502/v1/models
  ./target/release/cardinal-loadtest --url http://127.0.0.1:18502 "${LOAD[@]}" --out "$OUT/llama" | tee "$OUT/llama.txt"
  kill "$LPID"; wait "$LPID" || true
fi

if [ -n "$LLAMA_SERVER" ]; then
  "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 18503 -t 2 -np 16 --cont-batching -c $((8192 + 16 * PREFIX)) \
    >"$OUT/llama-cpp-server.log" 2>&1 &
  SPID=$!
  wait_ready http://127.0.0.1:18503/v1/models
  # --no-keep-alive: llama-server drops idle keep-alive connections without
  # `Connection: close`, which fails requests sent on them as connect errors.
  ./target/release/cardinal-loadtest --url http://127.0.0.1:18503 "${LOAD[@]}" --no-keep-alive \
    --out "$OUT/llama-server" | tee "$OUT/llama-server.txt"
  kill "$SPID"; wait "$SPID" || true
fi

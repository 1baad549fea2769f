#!/usr/bin/env bash
# End-to-end run on 127.0.0.1: start `cardinal serve` with the default model,
# drive it with the official openai Python SDK and curl, check /metrics with
# promtool, run a short load test, then SIGTERM and expect exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${CARDINAL_E2E_PORT:-18431}"
PY="${CARDINAL_E2E_PYTHON:-.venv-ci/bin/python}"
OUT="${CARDINAL_E2E_OUT:-target/e2e}"
mkdir -p "$OUT"

cargo build --release -p cardinal-server -p cardinal-loadtest
./target/release/cardinal serve --host 127.0.0.1 --port "$PORT" --max-num-seqs 16 --max-queue 64 >"$OUT/server.log" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited early:"; cat "$OUT/server.log"; exit 1; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null

echo "-- openai SDK"
"$PY" scripts/e2e_openai.py "http://127.0.0.1:$PORT/v1" | tee "$OUT/openai_sdk.txt"

echo "-- curl -N streaming"
curl -sS -N "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Name a color."}],"max_tokens":12,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}' \
  | tee "$OUT/curl_stream.txt"
grep -q 'data: \[DONE\]' "$OUT/curl_stream.txt"

echo "-- load test"
./target/release/cardinal-loadtest --url "http://127.0.0.1:$PORT" --concurrency 4 --requests 20 --output-tokens 32 --out "$OUT/loadtest" | tee "$OUT/loadtest.txt"
"$PY" - "$OUT/loadtest/report.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
levels = r["levels"]
assert levels, "no levels in the report"
for lv in levels:
    errors = lv["errors"]["total"] if isinstance(lv["errors"], dict) else lv["errors"]
    assert errors == 0, f"load test errors: {lv['errors']}"
    assert lv["output_tok_s"] > 0, lv
    srv = lv["server"]
    assert srv["joules_per_token_cards"] and srv["joules_per_token_cards"] > 0, srv
    assert srv["joules_per_token_host"] and srv["joules_per_token_host"] > 0, srv
print("load test report OK:", [round(lv["output_tok_s"], 1) for lv in levels], "output tok/s")
PYEOF

echo "-- promtool"
curl -fsS "http://127.0.0.1:$PORT/metrics" >"$OUT/metrics.txt"
promtool check metrics <"$OUT/metrics.txt" | tee "$OUT/promtool.txt"

echo "-- graceful shutdown"
kill -TERM "$SERVER"
wait "$SERVER"
echo "server exited with $?"
trap - EXIT

#!/usr/bin/env bash
# Goal 3 of issue 6 (and the speed check of issue 3): aggregate decode at 16
# concurrent sequences against our own single stream, in alternating pairs so
# both see the same machine state, then the medians and their ratio.
#
#   bash bench/batch_ratio.sh [--pairs 8] [--threads 2] [--cards 3] [--concurrency 16]
#
# Each pair runs `cardinal bench` for one stream (128-token prompt, 128
# tokens decoded, median of 3) and for `--concurrency` streams (the same
# shape, rate while all of them decode). 16 streams at the default 2048-token
# context need 3 cards of 192 MiB, hence `--cards 3` for both.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=8 THREADS=2 CARDS=3 CONC=16
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) PAIRS=$2; shift 2;;
    --threads) THREADS=$2; shift 2;;
    --cards) CARDS=$2; shift 2;;
    --concurrency) CONC=$2; shift 2;;
    *) echo "unknown flag $1" >&2; exit 2;;
  esac
done
cargo build --release -q -p cardinal-server
C=./target/release/cardinal
rate() {
  "$C" bench --threads "$THREADS" --cards "$CARDS" --prompt-tokens 128 --gen-tokens 128 --json "$@" 2>/dev/null |
    python3 -c 'import json, sys; print(round(json.load(sys.stdin)["decode_tokens_per_second"], 1))'
}
OUT=$(mktemp)
echo "pair  time      single  x${CONC}     ratio"
for i in $(seq 1 "$PAIRS"); do
  s=$(rate)
  b=$(rate --concurrency "$CONC" --reps 1)
  r=$(python3 -c "print(round($b / $s, 2))")
  printf '%4d  %s  %6.1f  %7.1f  %5.2fx\n' "$i" "$(date +%H:%M:%S)" "$s" "$b" "$r"
  echo "$s $b" >>"$OUT"
done
python3 - "$OUT" "$CONC" <<'EOF'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
s = statistics.median(r[0] for r in rows)
b = statistics.median(r[1] for r in rows)
ratios = sorted(r[1] / r[0] for r in rows)
print(f"medians: single {s:.1f} tok/s, x{sys.argv[2]} {b:.1f} tok/s, ratio {b / s:.2f}x "
      f"(pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x, median pair {statistics.median(ratios):.2f}x)")
EOF
rm -f "$OUT"

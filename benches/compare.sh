#!/usr/bin/env bash
# Side-by-side relay benchmark on one machine: B0 (direct), B1 (ideal forwarder), Ferry, coturn and
# turn-rs, driven by `ferry load` with the same traffic. The relay under test is pinned to core 0,
# the generator to core 1; targets alternate within each round. Results land in $OUT (JSON lines,
# a markdown report and SVG charts); `benches/report.py` turns them into BENCHMARKS.md's tables.
#
#   benches/compare.sh                                  # everything (about 12 minutes on 2 cores)
#   PHASES="max latency" TARGETS="b1 ferry" benches/compare.sh
# Phases: max (maximum rate, ROUNDS rounds), game (the game-like shape at maximum rate: GAME_SESSIONS
# sessions interleaved over shared sockets, mixed 58–300-byte RELAYs; ROUNDS rounds), lossfree
# (bisection), latency (fixed loads, ROUNDS rounds), control (binds/s, allocations/s). GEN_GSO=1 makes the generator send with UDP GSO (fair:
# no target enables UDP_GRO, so every relay still receives ordinary datagrams). MAX_RATE paces the
# "max" phase at a fixed offered rate above every relay's capacity (0: as fast as possible); a
# GSO generator needs pacing, or its sender starves its own receiver.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/turn-servers.sh
OUT="${OUT:-target/compare}"
ROUNDS="${ROUNDS:-3}"
SESSIONS="${SESSIONS:-1}"
DUR="${DUR:-3s}"
SIZES="${SIZES:-64 1200}"
TARGETS="${TARGETS:-direct b1 ferry ferry-gso ferry-uring ferry-uring-gso coturn turnrs}"
PHASES="${PHASES:-max lossfree latency control}"
has() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
RELAY_CORE="${RELAY_CORE:-0}"
GEN_CORE="${GEN_CORE:-1}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
# A TURN session is its own socket pair: the game shape opens thousands.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
: > "$RESULTS"

cargo build --release --quiet
FERRY=./target/release/ferry
if ! command -v turnserver >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn) >/dev/null 2>&1 || true
fi
if ! command -v turn-server >/dev/null; then
  # The default `api` feature needs protoc; the relay itself needs only UDP.
  cargo install turn-server --locked --no-default-features --features udp --quiet >/dev/null 2>&1 || true
fi

PID=""
# Stops the relay under test and waits until it is gone, so the next one can bind its port.
cleanup() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=""
}
trap cleanup EXIT

# start TARGET: runs the relay pinned to RELAY_CORE; sets PID and LOAD_ARGS.
start() {
  case "$1" in
    direct) PID=""; LOAD_ARGS="--target direct" ;;
    b1)
      taskset -c "$RELAY_CORE" "$FERRY" bench-b1 --listen 127.0.0.1:19000 2>/dev/null &
      PID=$!; LOAD_ARGS="--target b1 --relay 127.0.0.1:19000 --relay-pid $PID" ;;
    ferry|ferry-gso|ferry-uring|ferry-uring-gso)
      local io=batch gso=false
      case "$1" in ferry-uring*) io=uring ;; esac
      case "$1" in *-gso) gso=true ;; esac
      taskset -c "$RELAY_CORE" "$FERRY" serve --shards 1 --pin-shards false --io "$io" --gso "$gso" --relay-listen 127.0.0.1:17777 \
        --api-listen 127.0.0.1:17880 --api-rate-limit 1000000 --drain-timeout 0s --log-format json 2>>"$OUT/relay-$1.log" &
      PID=$!; LOAD_ARGS="--target ferry --api http://127.0.0.1:17880 --relay-pid $PID" ;;
    coturn)
      start_coturn 127.0.0.1 "$RELAY_CORE" "$OUT" || return 1
      LOAD_ARGS="--target turn --relay 127.0.0.1:13478 --relay-pid $PID" ;;
    turnrs)
      start_turnrs 127.0.0.1 "$RELAY_CORE" "$OUT" || return 1
      LOAD_ARGS="--target turn --relay 127.0.0.1:13479 --relay-pid $PID" ;;
  esac
  sleep 1
}

# load NAME KIND [args…]: one generator run pinned to GEN_CORE, tagged and appended to RESULTS.
load() {
  local name=$1 kind=$2; shift 2
  local line
  local gen_gso=""
  [ "${GEN_GSO:-0}" = 1 ] && gen_gso="--gso"
  if line=$(taskset -c "$GEN_CORE" "$FERRY" load $LOAD_ARGS $gen_gso --json "$@" 2>>"$OUT/errors.log"); then
    echo "{\"name\":\"$name\",\"kind\":\"$kind\",\"round\":${ROUND:-0},\"result\":$line}" >> "$RESULTS"
    echo "$line"
  else
    echo "{\"name\":\"$name\",\"kind\":\"$kind\",\"error\":true}" >> "$RESULTS"
    echo "  ($name $kind failed)" >&2
    return 1
  fi
}

delivered() { python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["delivered_pps"]))' "$1"; }
loss() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["loss_pct"])' "$1"; }

for round in $(seq "$ROUNDS"); do
  has max || break
  ROUND=$round
  # Alternate the order of targets between rounds.
  order=$TARGETS
  [ $((round % 2)) -eq 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for t in $order; do
    start "$t" || { echo "skip $t (not installed)"; continue; }
    for size in $SIZES; do
      echo "round $round: $t max rate, $size B"
      load "$t" "max-$size" --size "$size" --sessions "$SESSIONS" --rate "${MAX_RATE:-0}" --duration "$DUR" >/dev/null || true
    done
    cleanup
  done
done

for round in $(seq "$ROUNDS"); do
  has game || break
  ROUND=$round
  order=$TARGETS
  [ $((round % 2)) -eq 1 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for t in $order; do
    start "$t" || { echo "skip $t (not installed)"; continue; }
    echo "round $round: $t game-like shape, ${GAME_SESSIONS:-1000} sessions"
    load "$t" "game-max" --shape game --sessions "${GAME_SESSIONS:-1000}" --rate "${MAX_RATE:-0}" --duration "$DUR" >/dev/null || true
    cleanup
  done
done

ROUND=0
# Highest loss-free (<= 0.1 %) rate: bisection below each target's measured maximum.
for t in $TARGETS; do
  has lossfree || break
  start "$t" || continue
  for size in $SIZES; do
    hi=$(python3 - "$RESULTS" "$t" "$size" <<'PY'
import json, sys, statistics
rs = [json.loads(l) for l in open(sys.argv[1])]
v = [r["result"]["delivered_pps"] for r in rs if r["name"] == sys.argv[2] and r["kind"] == f"max-{sys.argv[3]}" and "result" in r]
print(int(statistics.median(v) * 1.05) if v else 0)
PY
)
    lo=0
    for _ in 1 2 3 4 5 6; do
      mid=$(( (lo + hi) / 2 ))
      [ "$mid" -le 1000 ] && break
      r=$(load "$t" "probe-$size" --size "$size" --rate "$mid" --duration 2s) || break
      if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= 0.1 else 1)' "$(loss "$r")"; then lo=$mid; else hi=$mid; fi
    done
    echo "{\"name\":\"$t\",\"kind\":\"lossfree-$size\",\"result\":{\"rate\":$lo}}" >> "$RESULTS"
    echo "$t $size B: loss-free up to $lo pps"
  done
  cleanup
done

# Latency at fixed offered loads, targets alternating within each round.
for round in $(seq "$ROUNDS"); do
  has latency || break
  ROUND=$round
  for t in $TARGETS; do
    start "$t" || continue
    for rate in 5000 20000; do
      load "$t" "latency-$rate" --size 64 --rate "$rate" --duration "$DUR" >/dev/null || true
    done
    cleanup
  done
done
ROUND=0

for t in $TARGETS; do
  has control || break
  case "$t" in ferry*|b1) ;; *) continue ;; esac
  start "$t" || continue
  load "$t" binds --mode binds --allocations 2000 --duration 3s >/dev/null || true
  if [ "$t" = ferry ]; then
    load "$t" allocations --mode allocations --clients 4 --duration 3s >/dev/null || true
  fi
  cleanup
done

python3 benches/report.py "$RESULTS" "$OUT"
echo "report: $OUT/report.md"

#!/usr/bin/env bash
# The kernel fast path against Ferry's userspace path and B1 (the ideal userspace forwarder), in
# network namespaces joined by a veth pair: the relay in one namespace with native XDP on its
# veth, `ferry load` in the other. Needs root.
#
# Where the work runs: the relay namespace's receive path runs in the veth's NAPI, threaded and
# pinned to RELAY_CPU together with the relay process; the generator and the clients' veth NAPI
# are pinned to GEN_CPU. So RELAY_CPU carries everything the relay costs — the kernel's receive
# path, XDP or the UDP stack, the relay's own work and its sends — and its busy time over the
# measured window divided by the datagrams delivered is the CPU per datagram; its inverse is the
# rate one core sustains. Delivered datagrams are counted where they arrive, by an XDP sink on
# the clients' veth that drops them (so the generator's core only sends, as a hardware traffic
# generator would, and every path is counted at the same point).
#
#   sudo benches/xdp.sh                       # 3 rounds, 64 and 1200 B, b1 ferry ferry-xdp
#   ROUNDS=1 SIZES=64 TARGETS="ferry-xdp" sudo benches/xdp.sh
# SHAPE=game runs the game-like shape (SESSIONS interleaved sessions, mixed 40-300 B sizes).
# GEN=live sends the burst shape's RELAYs as raw frames from the kernel's page pool
# (`ferry bench-xdp-gen`) instead of from sockets, so they reach the relay's veth as a NIC's driver
# delivers them; Ferry's paths only (B1 and the TURN relays need socket clients).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/turn-servers.sh
OUT="${OUT:-target/xdp-bench}"
ROUNDS="${ROUNDS:-3}"
SIZES="${SIZES:-64 1200}"
TARGETS="${TARGETS:-b1 ferry ferry-xdp}"
SHAPE="${SHAPE:-burst}"
# The game shape mixes its own sizes.
[ "$SHAPE" = game ] && SIZES=0
SESSIONS="${SESSIONS:-4}"
DUR="${DUR:-4}"
RELAY_CPU="${RELAY_CPU:-0}"
GEN_CPU="${GEN_CPU:-1}"
TOKEN=xdp-bench-token-0123456789
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
[ "$(id -u)" = 0 ] || { echo "benches/xdp.sh builds network namespaces: run it as root" >&2; exit 1; }

cargo build --release --quiet
FERRY=$PWD/target/release/ferry
case " $TARGETS " in *" coturn "*)
  command -v turnserver >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn) >/dev/null 2>&1 || true ;;
esac
case " $TARGETS " in *" turnrs "*)
  command -v turn-server >/dev/null || cargo install turn-server --locked --no-default-features --features udp --quiet >/dev/null 2>&1 || true ;;
esac
TAG="fyb$$"
R="${TAG}r"
C="${TAG}c"
PID=""

cleanup() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=""
}
teardown() {
  cleanup
  [ -z "${PROG_STATS:-}" ] || sysctl -qw kernel.bpf_stats_enabled=0
  ip netns del "$R" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
}
trap teardown EXIT

ip netns add "$R"
ip netns add "$C"
ip -n "$R" link set lo up
ip -n "$C" link set lo up
ip link add r0 netns "$R" type veth peer name c0 netns "$C"
ip -n "$R" addr add 10.78.0.1/24 dev r0
ip -n "$C" addr add 10.78.0.2/24 dev c0
ip -n "$R" link set r0 up
ip -n "$C" link set c0 up
ip netns exec "$R" sysctl -qw net.ipv4.conf.r0.forwarding=1
ip netns exec "$C" ethtool -K c0 tx off >/dev/null
# GRO on gives each veth its own NAPI instance (without it a veth's receive work runs on the
# sending CPU), which can then run as a thread pinned where it belongs. Sockets that did not ask
# for UDP GRO still receive every datagram on its own.
for ns_dev in "$R r0" "$C c0"; do
  set -- $ns_dev
  ip netns exec "$1" ethtool -K "$2" gro on >/dev/null
  ip netns exec "$1" sh -c "echo 1 > /sys/class/net/$2/threaded"
done
# The sink: counts and drops RELAYs at the clients' veth (which also lets it take XDP_TX frames).
SINK="$OUT/sink.txt"
rm -f "$SINK"
ip netns exec "$C" "$FERRY" bench-xdp-pass --interface c0 --sink "$SINK" &
PASS_PID=$!
trap 'kill $PASS_PID 2>/dev/null || true; teardown' EXIT
sleep 0.5
# Pin the NAPI threads (named napi/<dev>-<id>).
pin_napi() {
  local n=0
  for p in $(pgrep "^napi/$1-" || true); do taskset -pc "$2" "$p" >/dev/null; n=$((n + 1)); done
  [ "$n" -gt 0 ] || { echo "no NAPI thread for $1" >&2; exit 1; }
}
pin_napi r0 "$RELAY_CPU"
pin_napi c0 "$GEN_CPU"

start() {
  case "$1" in
    b1)
      ip netns exec "$R" taskset -c "$RELAY_CPU" "$FERRY" bench-b1 --listen 10.78.0.1:19000 2>/dev/null &
      PID=$!; LOAD_ARGS="--target b1 --relay 10.78.0.1:19000" ;;
    ferry|ferry-gso|ferry-xdp)
      local xdp=off gso=false
      [ "$1" = ferry-xdp ] && xdp=native
      [ "$1" = ferry-gso ] && gso=true
      ip netns exec "$R" taskset -c "$RELAY_CPU" "$FERRY" serve --shards 1 --pin-shards false --gso "$gso" \
        --relay-listen 10.78.0.1:17777 --api-listen 10.78.0.1:17880 --api-token "$TOKEN" --api-rate-limit 1000000 \
        --xdp "$xdp" --xdp-interface r0 --drain-timeout 0s --log-format json --log-lifecycle off 2>>"$OUT/relay-$1.log" &
      PID=$!; LOAD_ARGS="--target ferry --api http://10.78.0.1:17880 --token $TOKEN --relay 10.78.0.1:17777"
      GEN_ARGS="--api http://10.78.0.1:17880 --token $TOKEN --relay 10.78.0.1:17777" ;;
    coturn)
      start_coturn 10.78.0.1 "$RELAY_CPU" "$OUT" ip netns exec "$R" || return 1
      LOAD_ARGS="--target turn --relay 10.78.0.1:13478" ;;
    turnrs)
      start_turnrs 10.78.0.1 "$RELAY_CPU" "$OUT" ip netns exec "$R" || return 1
      LOAD_ARGS="--target turn --relay 10.78.0.1:13479" ;;
  esac
  sleep 1.5
}

# The fast path program's own time, from the kernel's accounting (PROG_STATS=1 turns it on for
# the run; it adds two clock reads per datagram): "run_time_ns run_cnt" of ferry_xdp.
prog_stats() {
  if [ -z "${PROG_STATS:-}" ] || [ "$1" != ferry-xdp ]; then echo "0 0"; return; fi
  bpftool prog show name ferry_xdp -j 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d if isinstance(d, dict) else (d[0] if d else {})
print(d.get("run_time_ns", 0), d.get("run_cnt", 0))'
}
[ -n "${PROG_STATS:-}" ] && sysctl -qw kernel.bpf_stats_enabled=1

# busy CPU: user+nice+system+irq+softirq+steal jiffies of one CPU.
busy() { awk -v c="cpu$1" '$1==c {print $2+$3+$4+$7+$8+$9}' /proc/stat; }

run_load() {
  local name=$1 size=$2 round=$3 rate=$4
  local shape_args=(--size "$size")
  [ "$SHAPE" = game ] && shape_args=(--shape game --sockets 8)
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  if [ "${GEN:-}" = live ]; then
    ip netns exec "$C" taskset -c "$GEN_CPU" "$FERRY" bench-xdp-gen $GEN_ARGS --bind-ip 10.78.0.2 --interface c0 \
      --sessions "$SESSIONS" --size "$size" --rate "$rate" --warmup 1s --duration "${DUR}s" > "$OUT/load.json" 2>>"$OUT/errors.log" &
  else
    ip netns exec "$C" taskset -c "$GEN_CPU" "$FERRY" load $LOAD_ARGS --bind-ip 10.78.0.2 --sessions "$SESSIONS" \
      "${shape_args[@]}" ${GEN_GSO:+--gso} --rate "$rate" --warmup 1s --duration "${DUR}s" --json > "$OUT/load.json" 2>>"$OUT/errors.log" &
  fi
  local lp=$!
  # Sample the relay CPU inside the measured window: wait for traffic to reach the sink (set-up
  # of a thousand sessions takes a few seconds), then for the 1 s warm-up.
  local base
  base=$(cut -d' ' -f1 "$SINK")
  for _ in $(seq 1200); do
    [ "$(cut -d' ' -f1 "$SINK")" -gt "$((base + 1000))" ] && break
    kill -0 "$lp" 2>/dev/null || break
    sleep 0.05
  done
  sleep 1.3
  local t0 b0 s0 t1 b1 s1 p0 p1
  t0=$(date +%s%N); b0=$(busy "$RELAY_CPU"); s0=$(cut -d' ' -f1 "$SINK"); p0=$(prog_stats "$name")
  sleep "$((DUR - 2))"
  t1=$(date +%s%N); b1=$(busy "$RELAY_CPU"); s1=$(cut -d' ' -f1 "$SINK"); p1=$(prog_stats "$name")
  wait "$lp" || { echo "  ($name $size failed)" >&2; return 0; }
  python3 - "$name" "$size" "$round" "$SHAPE" "$t0" "$t1" "$b0" "$b1" "$(getconf CLK_TCK)" "$s0" "$s1" "$OUT/load.json" "$rate" "$p0" "$p1" >> "$RESULTS" <<'PY'
import json, sys
name, size, rnd, shape, t0, t1, b0, b1, hz, s0, s1, path, _rate, p0, p1 = sys.argv[1:]
(pt0, pc0), (pt1, pc1) = (map(int, p0.split()), map(int, p1.split()))
r = json.load(open(path))
secs = (int(t1) - int(t0)) / 1e9
busy = (int(b1) - int(b0)) / int(hz) / secs
pps = (int(s1) - int(s0)) / secs
offered = r["sent"] / r["duration_secs"]
print(json.dumps({"name": name, "size": int(size), "round": int(rnd), "shape": shape, "offered_pps": offered,
                  "rate": int(sys.argv[13]),
                  "delivered_pps": pps, "relay_cpu_busy": busy,
                  "ns_per_datagram": busy * 1e9 / pps if pps else None,
                  "per_core_pps": pps / busy if busy > 0 else None,
                  "prog_ns_per_run": (pt1 - pt0) / (pc1 - pc0) if pc1 > pc0 else None}))
PY
  tail -n 1 "$RESULTS"
}

for round in $(seq "$ROUNDS"); do
  order=$TARGETS
  [ $((round % 2)) -eq 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for t in $order; do
    for size in $SIZES; do
      # As fast as the generator can, then paced at and above what that delivered: a userspace
      # relay overloaded past its capacity delivers less (its core also runs the receive path
      # that fills its socket), so each path is credited with its best delivered rate.
      d0=""
      for mult in ${MULTS:-0 1.0 1.3 1.6}; do
        rate=0
        if [ "$mult" != 0 ]; then
          rate=$(python3 -c "print(int(float('$d0') * $mult))")
        fi
        start "$t" || { echo "skip $t (not installed)"; continue 3; }
        echo "round $round: $t, $size B ($SHAPE), offered ${rate/#0/max}"
        line=$(run_load "$t" "$size" "$round" "$rate")
        echo "$line"
        [ "$mult" = 0 ] && d0=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['delivered_pps'])" "$line")
        if [ "$t" = ferry-xdp ]; then
          ip netns exec "$C" curl -s -H "Authorization: Bearer $TOKEN" http://10.78.0.1:17880/metrics 2>/dev/null \
            | grep '^ferry_xdp_packets_total' > "$OUT/xdp-metrics-$size.txt" || true
        fi
        cleanup
      done
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = {}
for r in rows:
    k = (r["name"], r["size"], r["round"])
    if k not in best or r["delivered_pps"] > best[k]["delivered_pps"]:
        best[k] = r
by = {}
for (n, s, _), r in best.items():
    by.setdefault((n, s), []).append(r)
def med(rs, k):
    v = [x[k] for x in rs if x.get(k) is not None]
    return statistics.median(v) if v else float("nan")
print("| path | size | offered pps | delivered pps | relay CPU busy | ns per datagram | datagrams/s per core |")
print("|---|---:|---:|---:|---:|---:|---:|")
for (n, s), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"| {n} | {f'{s} B' if s else 'mixed'} | {med(rs,'offered_pps'):,.0f} | {med(rs,'delivered_pps'):,.0f} | {100*med(rs,'relay_cpu_busy'):.1f} % | "
          f"{med(rs,'ns_per_datagram'):,.0f} | {med(rs,'per_core_pps'):,.0f} |")
for (n, s), rs in sorted(by.items()):
    if any(x.get("prog_ns_per_run") for x in rs):
        print(f"\n{n} {s} B: the program itself {med(rs, 'prog_ns_per_run'):,.0f} ns per run (kernel bpf_stats)")
for s in sorted({k[1] for k in by}):
    u, x = by.get(("ferry", s)), by.get(("ferry-xdp", s))
    b = by.get(("b1", s))
    if u and x:
        print(f"\n{f'{s} B' if s else 'game shape'}: fast path per core = {med(x,'per_core_pps')/med(u,'per_core_pps'):.1f}x Ferry's userspace path"
              + (f", {med(x,'per_core_pps')/med(b,'per_core_pps'):.1f}x B1" if b else ""))
PY

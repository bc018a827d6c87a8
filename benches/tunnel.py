#!/usr/bin/env python3
"""What `ferry tunnel` adds, side by side with the bare relay path, in one run.

For each round and payload size it measures, with `ferry load`:
  * bare: generator -> relay -> generator (one RELAY session, as `ferry load --target ferry`);
  * tunnel: generator -> join tunnel -> relay -> host tunnel -> generator (one game flow).
Phases: one-way latency at 5k and 20k datagrams/s, and the most datagrams/s (as fast as the
generator sends). CPU-us per delivered datagram of the relay and of each tunnel process come
from /proc/PID/stat over the run. The relay is pinned to core 0, tunnels and generator to core 1
(a 2-core machine cannot give every process its own core: quote ratios).

    benches/tunnel.py                 # ROUNDS=3 DUR=3 SIZES="64 1200" by default
Writes JSON lines to target/tunnel-bench/results.jsonl and a markdown table to stdout.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
OUT = os.path.join(ROOT, "target", "tunnel-bench")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DUR = os.environ.get("DUR", "3")
SIZES = [int(s) for s in os.environ.get("SIZES", "64 1200").split()]
RATES = [int(r) for r in os.environ.get("RATES", "5000 20000 0").split()]
API = "http://127.0.0.1:17880"
GAME = "127.0.0.1:17000"
OFFSET = 1000
LISTEN = "127.0.0.1:18000"
HZ = os.sysconf("SC_CLK_TCK")


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / HZ


def spawn(core, *args):
    return subprocess.Popen(["taskset", "-c", str(core), FERRY, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def load(core, *args):
    cmd = ["taskset", "-c", str(core), FERRY, "load", "--json", "--duration", f"{DUR}s", "--warmup", "500ms", "--api", API, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"ferry load failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    results = open(os.path.join(OUT, "results.jsonl"), "w")
    relay = spawn(0, "serve", "--api-listen", API[7:], "--relay-listen", "127.0.0.1:17777", "--shards", "1",
                  "--api-rate-limit", "100000", "--log-lifecycle", "off")
    time.sleep(1)
    # `--path relay`: this measures the tunnels through the relay (on loopback `auto` would go
    # direct at once and bypass it).
    host = spawn(1, "tunnel", "host", "--api", API, "--forward", GAME, "--json", "--path", "relay")
    code = json.loads(host.stdout.readline())["join_code"]
    join = spawn(1, "tunnel", "join", code, "--api", API, "--port-offset", str(OFFSET), "--json", "--path", "relay")
    join.stdout.readline()
    procs = {"relay": relay.pid, "host_tunnel": host.pid, "join_tunnel": join.pid}
    rows = []
    try:
        for rnd in range(ROUNDS):
            for size in SIZES:
                for rate in RATES:
                    for path in ("bare", "tunnel"):
                        args = ["--size", str(size), "--rate", str(rate), "--pin-sender", "1", "--pin-receiver", "1"]
                        if path == "bare":
                            args += ["--target", "ferry"]
                        else:
                            args += ["--target", "tunnel", "--tunnel-listen", LISTEN, "--tunnel-server", GAME]
                        before = {k: cpu_secs(p) for k, p in procs.items()}
                        s = load(1, *args)
                        after = {k: cpu_secs(p) for k, p in procs.items()}
                        dur = s["duration_secs"]
                        delivered = s["delivered_pps"] * dur
                        scale = dur / (dur + 0.5 + 0.05)
                        row = {"round": rnd, "size": size, "rate": rate, "path": path,
                               "delivered_pps": s["delivered_pps"], "loss_pct": s["loss_pct"],
                               "p50_us": s["latency"]["p50_us"], "p99_us": s["latency"]["p99_us"]}
                        for k in procs:
                            if path == "bare" and k != "relay":
                                continue
                            row[f"{k}_cpu_us"] = (after[k] - before[k]) * scale * 1e6 / delivered if delivered else None
                        rows.append(row)
                        results.write(json.dumps(row) + "\n")
                        results.flush()
                        print(json.dumps(row), file=sys.stderr)
    finally:
        for p in (join, host, relay):
            p.send_signal(2)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    report(rows)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else float("nan")


def report(rows):
    print("| size | offered/s | path | delivered/s | loss % | p50 µs | p99 µs | relay CPU-µs/dgram | join tunnel CPU-µs/dgram | host tunnel CPU-µs/dgram |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        for rate in RATES:
            for path in ("bare", "tunnel"):
                rs = [r for r in rows if r["size"] == size and r["rate"] == rate and r["path"] == path]
                if not rs:
                    continue
                m = lambda k: median([r.get(k) for r in rs])
                cells = [str(size), str(rate or "max"), path, f"{m('delivered_pps'):.0f}", f"{m('loss_pct'):.2f}",
                         f"{m('p50_us'):.0f}", f"{m('p99_us'):.0f}", f"{m('relay_cpu_us'):.2f}"]
                cells += [f"{m('join_tunnel_cpu_us'):.2f}", f"{m('host_tunnel_cpu_us'):.2f}"] if path == "tunnel" else ["", ""]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

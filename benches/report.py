#!/usr/bin/env python3
"""Turns benches/compare.sh's results.jsonl into report.md and bars.svg (medians over rounds)."""
import json
import statistics
import sys
from collections import defaultdict

results_path, out = sys.argv[1], sys.argv[2]
runs = defaultdict(list)
by_round = defaultdict(dict)
for line in open(results_path):
    r = json.loads(line)
    if "result" in r:
        runs[(r["name"], r["kind"])].append(r["result"])
        if r.get("round"):
            by_round[(r["name"], r["kind"])][r["round"]] = r["result"]


def paired(name, kind, base="b1", key="delivered_pps"):
    """Median over rounds of name/base measured in the same round (robust to machine drift)."""
    get = (lambda r: r["latency"][key]) if key.endswith("_us") else (lambda r: r[key])
    a, b = by_round.get((name, kind), {}), by_round.get((base, kind), {})
    v = [get(a[k]) / get(b[k]) for k in a if k in b and get(b[k])]
    return f"{statistics.median(v):.2f}× ({len(v)})" if v else "–"

NAMES = {"direct": "B0 direct", "b1": "B1 ideal forwarder", "ferry": "Ferry (epoll, 1 shard)", "ferry-gso": "Ferry (epoll + GSO, 1 shard)", "ferry-uring": "Ferry (io_uring, 1 shard)", "ferry-uring-gso": "Ferry (io_uring + GSO, 1 shard)", "coturn": "coturn", "turnrs": "turn-rs"}
order = [n for n in NAMES if any(k[0] == n for k in runs)]
# "Ferry" in comparisons with the peers means Ferry as configured by default (epoll + GSO) when
# that target was measured.
REF = "ferry-gso" if "ferry-gso" in order else "ferry"


def med(name, kind, key):
    v = [r[key] for r in runs.get((name, kind), []) if r.get(key) is not None]
    return statistics.median(v) if v else None


def fmt(v, d=0):
    return "–" if v is None else f"{v:,.{d}f}"


def ratio(a, b):
    return "–" if not a or not b else f"{a / b:.2f}×"


lines = []
sizes = sorted({int(k[1].split("-")[1]) for k in runs if k[1].startswith("max-")})
shapes = [(f"max-{s}", f"{s}-byte payload") for s in sizes]
if any(k[1] == "game-max" for k in runs):
    shapes.append(("game-max", "game-like shape (sessions interleaved, 58–300-byte RELAYs)"))
for kind, title in shapes:
    lines.append(f"\n### Maximum delivered rate, {title}\n")
    lines.append(f"| target | delivered packets/s | loss | relay CPU µs/packet | vs B1 (medians) | vs B1 (paired by round) | {NAMES[REF]} vs it | rounds |")
    lines.append("|---|---|---|---|---|---|---|---|")
    b1 = med("b1", kind, "delivered_pps")
    fe = med(REF, kind, "delivered_pps")
    for n in order:
        pps = med(n, kind, "delivered_pps")
        if pps is None:
            continue
        lines.append(
            f"| {NAMES[n]} | {fmt(pps)} | {fmt(med(n, kind, 'loss_pct'), 2)} % | {fmt(med(n, kind, 'relay_cpu_us_per_packet'), 3)} "
            f"| {ratio(pps, b1)} | {paired(n, kind)} | {ratio(fe, pps) if not n.startswith('ferry') and n != 'direct' else '–'} | {len(runs[(n, kind)])} |"
        )
    b0 = med("direct", kind, "delivered_pps")
    top = max((med(n, kind, "delivered_pps") or 0) for n in order if n != "direct")
    if b0:
        verdict = "the generator was not the bottleneck" if b0 > top * 1.02 else "WARNING: the generator may be the bottleneck"
        lines.append(f"\nB0 (generator to itself) reached {fmt(b0)} packets/s, {b0 / top:.2f}× the fastest relay: {verdict}.")

lines.append("\n### Highest loss-free rate (≤ 0.1 % loss)\n")
lines.append("| target | " + " | ".join(f"{s} B packets/s | vs B1" for s in sizes) + " |")
lines.append("|---|" + "---|---|" * len(sizes))
for n in order:
    row = []
    for s in sizes:
        v = med(n, f"lossfree-{s}", "rate")
        row += [fmt(v), ratio(v, med("b1", f"lossfree-{s}", "rate"))]
    lines.append(f"| {NAMES[n]} | " + " | ".join(row) + " |")
fe = [med(REF, f"lossfree-{s}", "rate") for s in sizes]
for peer in ("coturn", "turnrs"):
    pv = [med(peer, f"lossfree-{s}", "rate") for s in sizes]
    if any(pv):
        lines.append(f"\n{NAMES[REF]}'s loss-free rate vs {NAMES[peer]}: " + ", ".join(f"{s} B {ratio(f, p)}" for s, f, p in zip(sizes, fe, pv)) + ".")

for rate in (5000, 20000):
    kind = f"latency-{rate}"
    if not any(k[1] == kind for k in runs):
        continue
    lines.append(f"\n### One-way latency at {rate:,} packets/s offered (64 B)\n")
    lines.append("| target | p50 µs | p99 µs | p99.9 µs | loss | p99 vs B1 (medians) | p99 vs B1 (paired by round) | rounds |")
    lines.append("|---|---|---|---|---|---|---|---|")
    b1p99 = None
    v = [r["latency"]["p99_us"] for r in runs.get(("b1", kind), [])]
    if v:
        b1p99 = statistics.median(v)
    for n in order:
        rs = runs.get((n, kind), [])
        if not rs:
            continue
        p = lambda q: statistics.median(r["latency"][q] for r in rs)
        lines.append(
            f"| {NAMES[n]} | {p('p50_us'):.1f} | {p('p99_us'):.1f} | {p('p999_us'):.1f} | {statistics.median(r['loss_pct'] for r in rs):.2f} % "
            f"| {ratio(p('p99_us'), b1p99)} | {paired(n, kind, key='p99_us')} | {len(rs)} |"
        )

lines.append("\n### Control plane\n")
lines.append("| measure | target | value |")
lines.append("|---|---|---|")
for n in ("ferry", "ferry-gso", "ferry-uring", "ferry-uring-gso", "b1"):
    v = med(n, "binds", "binds_per_sec")
    if v:
        lines.append(f"| BINDs answered per second (one relay core) | {NAMES[n]} | {fmt(v)} |")
v = med("ferry", "allocations", "allocations_per_sec")
if v:
    lines.append(f"| allocations per second through the HTTP API (4 clients) | {NAMES['ferry']} | {fmt(v)} |")

import os
os.makedirs(out, exist_ok=True)
open(f"{out}/report.md", "w").write("\n".join(lines) + "\n")

# Bar chart: max delivered packets/s per target and size.
bars = [(NAMES[n], s, med(n, f"max-{s}", "delivered_pps") or 0) for s in sizes for n in order]
top = max((b[2] for b in bars), default=1) or 1
w, row = 760, 26
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{row * len(bars) + 50}" font-family="sans-serif" font-size="12">',
       '<text x="10" y="20" font-size="14">Maximum delivered packets/s, relay pinned to one core</text>']
for i, (name, s, v) in enumerate(bars):
    y = 35 + i * row
    bw = int((w - 330) * v / top)
    color = "#d9534f" if name.startswith("Ferry") else "#5b7fbf"
    svg.append(f'<text x="10" y="{y + 15}">{name}, {s} B</text>')
    svg.append(f'<rect x="230" y="{y}" width="{bw}" height="{row - 6}" fill="{color}"/>')
    svg.append(f'<text x="{236 + bw}" y="{y + 15}">{v:,.0f}</text>')
svg.append("</svg>")
open(f"{out}/bars.svg", "w").write("\n".join(svg))
print("\n".join(lines))

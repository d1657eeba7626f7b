#!/usr/bin/env bash
# TCP benchmarks of issue "core parameter server" (docs/perf.md):
#  1. push_pull of a 64 MiB tensor, 1 worker, 1 server, over loopback, as a ratio to the raw
#     TCP stream between two processes measured in the same run (3 runs, each its own baseline);
#  2. server peak RSS for the same model (4 x 16 MiB tensors) with 1 and with 8 workers;
#  3. the cost of replication (issue "fault tolerance", docs/fault-tolerance.md): push_pull of a
#     64 MiB tensor (16 chunks), 1 worker, 2 servers, with one backup of every chunk against
#     without, in the same run (3 runs of each, alternating).
# Raw reports land in perf/results/. Usage: perf/tcp.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-build}/bin/shardps"
OUT=perf/results
mkdir -p "$OUT"
for i in 1 2 3; do
  "$BIN" --log-level warn bench --servers 1 --workers 1 --op pushpull --size 64MiB --iters 20 \
    --warmup 3 --report "$OUT/tcp-pushpull-64MiB-run$i.json" | grep 'bench:'
done
for w in 1 8; do
  "$BIN" --log-level warn bench --servers 1 --workers "$w" --op pushpull --size 16MiB \
    --tensors 4 --iters 10 --warmup 2 --report "$OUT/tcp-memory-${w}workers.json" | grep 'worker 0'
done
for i in 1 2 3; do
  for r in 0 1; do
    "$BIN" --log-level warn bench --servers 2 --workers 1 --replicas "$r" --op pushpull \
      --size 64MiB --iters 10 --warmup 2 --report "$OUT/tcp-replicas$r-run$i.json" | grep 'bench:'
  done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
ratios = []
for i in (1, 2, 3):
    r = json.load(open(f"{out}/tcp-pushpull-64MiB-run{i}.json"))
    s = r["scenarios"][0]
    ratios.append(s["ratio_to_baseline"])
    print(f"run {i}: push_pull 64 MiB {s['gbps']:.2f} Gbit/s (bytes both ways), baseline "
          f"{r['baseline']['gbps']:.2f} Gbit/s, ratio {s['ratio_to_baseline']:.2f}, "
          f"p50 {s['p50_us']:.0f} us, p99 {s['p99_us']:.0f} us")
print(f"median ratio {statistics.median(ratios):.2f} (goal >= 0.70)")
m1 = json.load(open(f"{out}/tcp-memory-1workers.json"))["scenarios"][0]["server_peak_rss_bytes"]
m8 = json.load(open(f"{out}/tcp-memory-8workers.json"))["scenarios"][0]["server_peak_rss_bytes"]
print(f"server peak RSS: 1 worker {m1/2**20:.1f} MiB, 8 workers {m8/2**20:.1f} MiB, "
      f"ratio {m8/m1:.3f} (goal <= 1.10)")
with_backup, without = [], []
for i in (1, 2, 3):
    without.append(json.load(open(f"{out}/tcp-replicas0-run{i}.json"))["scenarios"][0]["gbps"])
    with_backup.append(json.load(open(f"{out}/tcp-replicas1-run{i}.json"))["scenarios"][0]["gbps"])
print(f"replication: push_pull 64 MiB over 2 servers {statistics.median(without):.2f} Gbit/s "
      f"without backups, {statistics.median(with_backup):.2f} with one (runs: {without} / "
      f"{with_backup}), ratio {statistics.median(with_backup) / statistics.median(without):.2f} "
      f"(goal >= 0.70)")
PY

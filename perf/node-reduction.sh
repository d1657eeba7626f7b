#!/usr/bin/env bash
# Node-level reduction (docs/node-reduction.md, docs/perf.md): 4 workers and 1 server over tcp,
# each scenario run as 4 independent workers and as one node of 4 (--workers-per-node 4), side
# by side: the bytes the servers received per step (from the servers' statistics) and worker 0's
# step time (push_pull of every tensor, p50 over 20 steps). Writes
# perf/results/node-reduction.json. Usage: perf/node-reduction.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-build}/bin/shardps"
OUT=perf/results
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
i=0
for scenario in "16MiB 1" "4MiB 4" "64KiB 64"; do
  read -r size tensors <<<"$scenario"
  for k in 1 4; do
    i=$((i + 1))
    "$BIN" --log-level warn bench --servers 1 --workers 4 --workers-per-node "$k" --op pushpull \
      --size "$size" --tensors "$tensors" --iters 20 --warmup 2 --no-baseline \
      --report "$TMP/$i.json" | grep -E 'servers received|worker 0 op'
  done
done
python3 - "$TMP" "$OUT/node-reduction.json" <<'PY'
import json, sys, glob, os
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=lambda p: int(os.path.basename(p)[:-5])):
    s = json.load(open(f))["scenarios"][0]
    rows.append({k: s[k] for k in ("size_bytes", "tensors", "workers", "workers_per_node",
                                    "server_push_bytes_per_step", "p50_us", "p99_us", "gbps")})
json.dump(rows, open(sys.argv[2], "w"), indent=2)
print("| tensors | workers per node | bytes the servers received per step | step p50 (us) | step p99 (us) |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['tensors']} x {r['size_bytes'] >> 10} KiB | {r['workers_per_node']} | "
          f"{r['server_push_bytes_per_step']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} |")
PY

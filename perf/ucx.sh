#!/usr/bin/env bash
# UCX benchmarks of issue "RDMA data path" (docs/perf.md), over shared memory on this host:
# push and pull of 4 MiB chunks against ucx_perftest's ucp_put_bw / ucp_get measured in the same
# run (shardps bench runs ucx_perftest itself), and the 4 KiB push_pull round trip against
# 2 x (ucp_put_lat + ucp_get latency). Raw reports land in perf/results/. APPLY_THREADS (default
# 2) is the server's --apply-threads: with 2, a 4 MiB update is split over both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-build}/bin/shardps"
OUT=perf/results
mkdir -p "$OUT"
export UCX_TLS="${UCX_TLS:-shm,self}"
AT="${APPLY_THREADS:-2}"
for op in push pull pushpull; do
  "$BIN" --log-level warn bench --transport ucx --servers 1 --workers 1 --apply-threads "$AT" \
    --op "$op" --size 4MiB \
    --iters 100 --warmup 5 --report "$OUT/ucx-$op-4MiB.json" | grep 'bench:'
done
"$BIN" --log-level warn bench --transport ucx --servers 1 --workers 1 --apply-threads "$AT" \
  --op pushpull --size 4KiB \
  --iters 5000 --warmup 100 --report "$OUT/ucx-pushpull-4KiB.json" | grep 'bench:'
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for op in ("push", "pull", "pushpull"):
    r = json.load(open(f"{out}/ucx-{op}-4MiB.json")); s = r["scenarios"][0]; b = r["baseline"]
    print(f"{op:8s} 4 MiB: {s['gbps']:.1f} Gbit/s, ratio {s['ratio_to_baseline']:.2f} "
          f"(ucp_put_bw {b['ucp_put_bw_gbps']:.1f}, ucp_get {b['ucp_get_bw_gbps']:.1f} Gbit/s; goal >= 0.80)")
r = json.load(open(f"{out}/ucx-pushpull-4KiB.json")); s = r["scenarios"][0]; b = r["baseline"]
print(f"pushpull 4 KiB: p50 {s['p50_us']:.1f} us, p99 {s['p99_us']:.1f} us; budget 2 x "
      f"({b['ucp_put_lat_us']:.2f} + {b['ucp_get_lat_us']:.2f}) = {s['latency_budget_us']:.2f} us")
PY

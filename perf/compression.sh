#!/usr/bin/env bash
# Benchmarks of issue "Compressed gradients" (docs/perf.md): the server's decode + accumulate +
# Adam per codec against memcpy in the same run, then `shardps train` (the demo's settings,
# sync) once per codec, with the report's accuracy and bytes per step. Reports in perf/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
B="${1:-build}/bin"
OUT=perf/results
mkdir -p "$OUT"
"$B/codec_bench" $((1 << 20)) 30 "$OUT/codec-bench-4MiB.json"    # the default chunk size
"$B/codec_bench" $((16 << 20)) 10 "$OUT/codec-bench-64MiB.json"  # beyond the caches
run() {  # name, then train's flags
  local name="$1"; shift
  "$B/shardps" --log-level warn train --dataset fashion-mnist --servers 2 --workers 4 --replicas 0 "$@" \
    --report "$OUT/train-compression-$name.json" | grep 'train: done\|train: compression'
}
for c in none fp16 bf16 int8 onebit topk:1%; do run "${c%%:*}" --compression "$c"; done
run pull-fp16 --pull-compression fp16
run int8-pull-bf16 --compression int8 --pull-compression bf16
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open(f"{out}/train-compression-none.json"))
print(f"{'run':15s} {'accuracy':>9s} {'vs none':>8s} {'pushed/step':>12s} {'factor':>7s} "
      f"{'pulled/step':>12s} {'factor':>7s} {'seconds':>8s}")
for n in ("none", "fp16", "bf16", "int8", "onebit", "topk", "pull-fp16", "int8-pull-bf16"):
    r = json.load(open(f"{out}/train-compression-{n}.json"))
    print(f"{n:15s} {r['test_accuracy']:9.4f} {(r['test_accuracy'] - base['test_accuracy']) * 100:+8.2f} "
          f"{r['bytes_pushed']:12d} {base['bytes_pushed'] / max(r['bytes_pushed'], 1):7.2f} "
          f"{r['bytes_pulled']:12d} {base['bytes_pulled'] / max(r['bytes_pulled'], 1):7.2f} "
          f"{r['wall_seconds']:8.1f}")
PY

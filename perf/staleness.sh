#!/usr/bin/env bash
# Benchmark of issue "Bounded staleness, stragglers and per-worker weights" (docs/perf.md,
# "Consistency with a straggler"): `shardps train` (2 servers, 4 workers, Adam) with worker 3
# slowed by SLOW_MS per step, in sync, ssp:2, ssp:8, async and sync with a quorum of 3 of 4
# (backup worker). Each report gives the training time at which rank 0's test accuracy first
# reached 0.87 (measured after every epoch) and the final accuracy; a plot of test accuracy
# against training time goes to perf/results/staleness.png. Usage: perf/staleness.sh [build]
# (EPOCHS, SLOW_MS; REUSE=1 only redraws from the reports there).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${1:-build}/bin"
OUT=perf/results
EPOCHS="${EPOCHS:-8}"
SLOW_MS="${SLOW_MS:-20}"
mkdir -p "$OUT"
run() {  # name, then train's flags; REUSE=1 keeps a report already there
  local name="$1"; shift
  if [ "${REUSE:-0}" = 1 ] && [ -f "$OUT/train-staleness-$name.json" ]; then return 0; fi
  "$B/shardps" --log-level warn train --dataset fashion-mnist --servers 2 --workers 4 --replicas 0 \
    --epochs "$EPOCHS" --slow-worker "3:$SLOW_MS" --target-accuracy 0.87 "$@" \
    --report "$OUT/train-staleness-$name.json" | grep 'train: done\|reached'
}
run sync --mode sync
run ssp2 --mode ssp:2
run ssp8 --mode ssp:8
run async --mode async
run quorum3 --mode sync --sync-quorum 3
python3 - "$OUT" "$SLOW_MS" <<'PY'
import json, sys
out, slow = sys.argv[1], sys.argv[2]
names = ("sync", "ssp2", "ssp8", "async", "quorum3")
print(f"worker 3 slowed by {slow} ms per step")
print(f"{'run':8s} {'time to 0.87':>13s} {'final accuracy':>15s} {'wall':>7s} {'rank 0 late steps':>18s}")
with open(f"{out}/staleness.dat", "w") as dat:
    for n in names:
        r = json.load(open(f"{out}/train-staleness-{n}.json"))
        tt = r["time_to_target_seconds"]
        print(f"{n:8s} {('%.1f s' % tt) if tt is not None else 'never':>13s} "
              f"{r['test_accuracy']:15.4f} {r['wall_seconds']:6.1f}s {r['late_steps']:18d}")
        dat.write(f"# {n}\n")
        for e in r["epochs_detail"]:
            dat.write(f"{e['elapsed_seconds']:.3f} {e['test_accuracy']:.4f}\n")
        dat.write("\n\n")
PY
gnuplot <<GP
set terminal pngcairo size 900,560 noenhanced
set output "$OUT/staleness.png"
set title "Fashion-MNIST MLP, 4 workers (worker 3 slowed by $SLOW_MS ms per step), 2 servers"
set xlabel "training time (s)"
set ylabel "test accuracy (rank 0, after each epoch)"
set yrange [0.78:0.9]
set key bottom right
set grid
set arrow from graph 0, first 0.87 to graph 1, first 0.87 nohead dt 2
plot "$OUT/staleness.dat" index 0 using 1:2 with linespoints title "sync", \
     "" index 1 using 1:2 with linespoints title "ssp:2", \
     "" index 2 using 1:2 with linespoints title "ssp:8", \
     "" index 3 using 1:2 with linespoints title "async", \
     "" index 4 using 1:2 with linespoints title "sync, quorum 3 of 4"
GP
echo "plot: $OUT/staleness.png"

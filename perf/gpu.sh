#!/usr/bin/env bash
# GPU servers (docs/gpu.md, docs/perf.md), one command: builds with CUDA, runs the GPU tests (the
# kernels against the CPU rule before any speed), benchmarks the fused update kernels for every
# optimizer and codec at 4 to 256 MiB chunks against the device's own copy bandwidth, and times
# push_pull over tcp to a server on the GPU against one on the CPU. Writes perf/results/gpu.json
# and perf/results/gpu-e2e.json.
# Usage: perf/gpu.sh [cuda:N]      (default cuda:0; BUILD=dir for another build directory;
#                                  PREBUILT=dir: no build, the binaries in dir, as
#                                  perf/gpu-carry.sh carries them to a machine without the
#                                  build's dependencies)
#        perf/gpu.sh twin          the same on the host twin, small sizes: checks the script where
#                                  there is no GPU (its figures say nothing of a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda:0}"
BUILD="${BUILD:-build}"
RESULTS=perf/results
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$RESULTS"
if [[ "$DEVICE" == twin* ]]; then
  SIZES=1 ITERS=3 E2E=1MiB CUDA=AUTO
else
  SIZES=4,16,64,256 ITERS=20 E2E=64MiB CUDA=ON
fi
GPU_TESTS="fused_update_test gpu_server_test gpu_worker_test"
echo "== GPU tests: the kernels and the GPU server against the CPU reference =="
if [[ -n "${PREBUILT:-}" ]]; then
  BIN="$PREBUILT"
  for t in $GPU_TESTS; do
    timeout 600 "$BIN/$t" 2>&1 | tee -a "$TMP/ctest.log"
  done
else
  BIN="$BUILD/bin"
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDPS_CUDA="$CUDA" >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$BUILD" -j "$(nproc)" --target shardps gpu_bench $GPU_TESTS
  ctest --test-dir "$BUILD" -L gpu --output-on-failure --timeout 600 | tee "$TMP/ctest.log"
fi
if [[ "$DEVICE" == cuda* ]] && grep -qE "\*\*\*Skipped|SKIPPED \] [A-Z]" "$TMP/ctest.log"; then
  # On a GPU machine a skipped GPU test is a failure to look at, not a pass (NCCL needs 2 GPUs;
  # the test that wants CUDA refused says a GPU is present).
  grep -E "\*\*\*Skipped|SKIPPED \] [A-Z]" "$TMP/ctest.log" | grep -v -e "Nccl" -e "Refused" &&
    { echo "GPU tests skipped on a GPU"; exit 1; }
fi

echo "== fused update kernels against the device-to-device copy =="
"$BIN/gpu_bench" --device "$DEVICE" --sizes "$SIZES" --iters "$ITERS" --report "$RESULTS/gpu.json"

echo "== push_pull of $E2E over tcp, 2 workers: server on the CPU, then on $DEVICE =="
for dev in cpu "$DEVICE"; do
  "$BIN/shardps" --log-level warn bench --servers 1 --workers 2 --op pushpull --size "$E2E" \
    --tensors 1 --iters 20 --warmup 2 --no-baseline --device "$dev" --report "$TMP/e2e-$dev.json" |
    grep -E 'worker 0 op' || true
done
python3 - "$TMP/e2e-cpu.json" "$TMP/e2e-$DEVICE.json" "$DEVICE" "$RESULTS/gpu-e2e.json" <<'PY'
import json, sys
cpu, dev = (json.load(open(p))["scenarios"][0] for p in sys.argv[1:3])
row = {"device": sys.argv[3], "size_bytes": cpu["size_bytes"],
       "cpu_server_p50_us": cpu["p50_us"], "device_server_p50_us": dev["p50_us"],
       "cpu_server_gbps": cpu["gbps"], "device_server_gbps": dev["gbps"],
       "device_over_cpu_time": dev["p50_us"] / cpu["p50_us"]}
json.dump(row, open(sys.argv[4], "w"), indent=2)
print(f"push_pull p50: server on cpu {cpu['p50_us']:.0f} us, on {sys.argv[3]} {dev['p50_us']:.0f} us"
      f" ({row['device_over_cpu_time']:.2f} of the cpu server's time; goal: at most 1)")
PY
python3 - "$RESULTS/gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
for x in r:
    if x["optimizer"] == "adam" and x["codec"] == "int8":
        print(f"adam + int8 at {x['chunk_mib']} MiB: {x['fraction_of_copy']:.2f} of the copy "
              f"bandwidth ({x['gbps']:.0f} of {x['copy_gbps']:.0f} GB/s; goal: 0.80)")
PY

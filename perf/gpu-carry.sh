#!/usr/bin/env bash
# perf/gpu.sh on a lent GPU machine that has CUDA but not ShardPS's build dependencies (this
# workplace's device machine: docs/perf.md, "GPU figures"). Two steps:
#   perf/gpu-carry.sh pack   here: builds (Release, CUDA) and puts the binaries perf/gpu.sh runs,
#                            and the shared libraries they load (UCX's modules too), into
#                            .gpucarry/ (git-ignored; carry it to the GPU machine)
#   perf/gpu-carry.sh run    there, from the repository root: points the loader at .gpucarry/,
#                            runs perf/gpu.sh on those binaries, then the kernels' tests under
#                            compute-sanitizer (memcheck, racecheck), and copies the reports and
#                            the log to $OUT (or perf/results/carry when OUT is not set)
#   perf/gpu-carry.sh failover   there: replication with GPU servers, two servers killed one
#                            after the other with new backups made in between, sync and async,
#                            every value verified (docs/fault-tolerance.md)
# glibc is not carried: the binaries need the GPU machine's to be at least as new as the build's.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpucarry
BINARIES="shardps gpu_bench fused_update_test gpu_server_test gpu_worker_test"

pack() {
  local build=${BUILD:-build-gpu}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDPS_CUDA=ON >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$(nproc)" --target $BINARIES
  rm -rf "$CARRY"
  mkdir -p "$CARRY/bin" "$CARRY/lib" "$CARRY/ucx"
  local b
  for b in $BINARIES; do
    strip -o "$CARRY/bin/$b" "$build/bin/$b"
  done
  local ucxdir
  ucxdir=$(pkg-config --variable=libdir ucx)/ucx
  cp "$ucxdir"/*.so* "$CARRY/ucx/"
  # Every library the binaries and UCX's modules load, but glibc's own (the loader's).
  ldd "$CARRY"/bin/* "$CARRY"/ucx/*.so* 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' |
    sort -u | grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$CARRY/lib/"; done
  du -sh "$CARRY"
}

# The loader pointed at what `pack` carried, and at the CUDA runtime of the machine.
carry_env() {
  export LD_LIBRARY_PATH="$PWD/$CARRY/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export UCX_MODULE_DIR="$PWD/$CARRY/ucx"
  # The CUDA runtime and NCCL are the machine's own (loaded by dlopen, src/gpu/cuda.cc): where
  # they are not in the loader's path, the Python wheels that carry them.
  local py
  for py in nvidia.cuda_runtime nvidia.nccl nvidia.cu13; do
    local d
    d=$(python3 -c "import $py, os; print(list($py.__path__)[0])" 2>/dev/null || true)
    if [[ -n "$d" ]]; then
      for lib in "$d/lib" "$d/lib64"; do
        [[ -d "$lib" ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$lib"
      done
    fi
  done
}

failover() {
  local out=${OUT:-perf/results/carry} dev=${1:-cuda:0} rc=0 mode
  mkdir -p "$out"
  carry_env
  for mode in sync async; do
    echo "== $mode: 3 servers on $dev with --replicas 1; server 0 killed, new backups, server 1 killed =="
    timeout 180 "$CARRY/bin/shardps" bench --servers 3 --workers 2 --replicas 1 --device "$dev" \
      --mode "$mode" --aggregate sum --op pushpull --size 4MiB --tensors 2 --chunk-size 256KiB \
      --iters 30 --warmup 0 --no-baseline --verify --kill-server-at 5 --kill-second-server-at 15 \
      >"$out/failover-$mode.log" 2>&1 || rc=$((rc == 0 ? 6 : rc))
    grep -E "worker 0:|every chunk has|declared dead|verified|rror" "$out/failover-$mode.log" |
      grep -v "no cluster secret" | cut -c1-200
  done
  return "$rc"
}

run() {
  local out=${OUT:-perf/results/carry}
  mkdir -p "$out"
  carry_env
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv ||
    echo "no nvidia-smi"; } | tee "$out/device.txt"
  local rc=0
  PREBUILT="$CARRY/bin" bash perf/gpu.sh "${1:-cuda:0}" 2>&1 | tee "$out/gpu.log" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "perf/gpu.sh failed ($rc): the kernels' figures alone, not checked by the tests above"
    "$CARRY/bin/gpu_bench" --device "${1:-cuda:0}" --sizes 16,256 --iters 10 \
      --report "$out/gpu-unchecked.json" 2>&1 | tail -40 || true
  fi
  cp perf/results/gpu.json perf/results/gpu-e2e.json "$out/" 2>/dev/null || true
  local dev=${1:-cuda:0}
  echo "== push_pull of 64MiB over ucx (shared memory), 2 workers: server on the CPU, then on $dev =="
  local d
  for d in cpu "$dev"; do
    timeout 120 "$CARRY/bin/shardps" --log-level warn bench --servers 1 --workers 2 --op pushpull \
      --transport ucx --size 64MiB --tensors 1 --iters 20 --warmup 2 --no-baseline --device "$d" \
      2>&1 | grep -E 'worker 0 op' || true
  done
  echo "== a user's checks: doctor, a verified job on $dev, a device index that does not exist =="
  timeout 60 "$CARRY/bin/shardps" doctor 2>&1 | tee "$out/doctor.txt" | grep -i -E "cuda|gpu" || true
  timeout 120 "$CARRY/bin/shardps" --log-level warn bench --servers 2 --workers 2 --device "$dev" \
    --op pushpull --size 16MiB --tensors 2 --iters 10 --warmup 1 --no-baseline --verify 2>&1 |
    tee "$out/verify.txt" | tail -3 || rc=$((rc == 0 ? 5 : rc))
  timeout 60 "$CARRY/bin/shardps" --log-level warn bench --servers 1 --workers 1 --device cuda:7 \
    --iters 1 --no-baseline 2>&1 | grep -v "info config" | tail -4 || true
  if command -v compute-sanitizer >/dev/null; then
    local tool
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool: the kernels' tests =="
      timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$CARRY/bin/fused_update_test" --gtest_filter='FusedUpdateGpu.Kernels*:DeviceRule.*' \
        >"$out/sanitizer-$tool.log" 2>&1 || rc=$((rc == 0 ? 4 : rc))
      tail -5 "$out/sanitizer-$tool.log"
    done
  fi
  return "$rc"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  failover) shift; failover "$@" ;;
  *) echo "usage: perf/gpu-carry.sh pack | run [cuda:N] | failover [cuda:N]" >&2; exit 2 ;;
esac

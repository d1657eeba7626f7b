#!/usr/bin/env bash
# Failover time (issue "fault tolerance", docs/fault-tolerance.md, docs/perf.md): the time from a
# server's death to the first step completed after it, as `shardps bench --kill-server-at`
# measures it on worker 0 (from the signal to the completion of that iteration). 3 servers,
# 2 workers, sync push_pull of 2 x 1 MiB, one backup of every chunk, exact values checked:
#  1. SIGKILL: the coordinator sees the server's connection close;
#  2. SIGSTOP (a hung host): the coordinator waits for the failover timeout, 500 ms and the
#     default (2000 ms), then the backups take over; the server is resumed afterwards (fenced).
# 3 runs each. Usage: perf/failover.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-build}/bin/shardps"
run() {  # how timeout_ms
  local extra=()
  [ "$2" != default ] && extra=(--heartbeat-interval-ms 100 --failover-timeout-ms "$2")
  "$BIN" --log-level warn bench --servers 3 --workers 2 --replicas 1 --mode sync --op pushpull \
    --size 1MiB --tensors 2 --iters 30 --warmup 0 --verify --kill-server-at 10 \
    --kill-server-how "$1" "${extra[@]}" 2>&1 |
    sed -n 's/.*iteration 10 completed \([0-9]*\) ms after.*/\1/p'
}
for how in kill:default stop:500 stop:default; do
  times=()
  for i in 1 2 3; do times+=("$(run "${how%%:*}" "${how##*:}")"); done
  echo "failover, ${how%%:*}, failover timeout ${how##*:}: first step after the death completed in ${times[*]} ms"
done

#!/usr/bin/env bash
# The verbs backend against the raw verbs of the same device, in the soft-RoCE virtual machine
# (scripts/rdma-vm.sh; docs/perf.md, "verbs on soft-RoCE"): 4 MiB pushes and pulls through
# `shardps bench --transport verbs` against perftest's ib_write_bw and ib_read_bw on rxe0,
# measured in the same guest one after the other. Under emulation (TCG) the figures say
# nothing of a NIC; the ratio says how much of the device's own bandwidth the parameter
# server's path keeps. Output: perf/results/rdma.txt. About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/rdma-vm.sh
why=$(shardps_vm_prepare)
[ -z "$why" ] || { echo "perf/rdma.sh: cannot run the virtual machine: $why" >&2; exit 1; }
dpkg-query -W -f='${Status}' perftest 2>/dev/null | grep -q "install ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends perftest >&2
mkdir -p perf/results
SHARDPS_VM_TIMEOUT=900 shardps_vm_run '
out="$SHARDPS_VM_OUT"
hostname localhost
raw() {  # ib_write_bw / ib_read_bw, 4 MiB messages; prints MB/s
  (timeout 120 $1 -d rxe0 -x 1 -s 4194304 -n 40 -F >/dev/null 2>&1 &)
  sleep 1
  timeout 120 $1 -d rxe0 -x 1 -s 4194304 -n 40 -F 10.77.0.1 2>/dev/null |
    awk "/^ *4194304/ {print \$4}"
}
w=$(raw ib_write_bw); r=$(raw ib_read_bw)
echo "raw_write_MBps=$w raw_read_MBps=$r" > "$out/raw.txt"
for op in push pull; do
  SHARDPS_SERVER_LISTEN=10.77.0.1:0 timeout 300 build/bin/shardps --log-level warn bench \
    --transport verbs --op $op --size 4MiB --iters 30 --warmup 3 --report "$out/$op.json" |
    grep "bench:"
done
'
out="$SHARDPS_VM_DIR/out"
python3 - "$out" <<'PY' | tee perf/results/rdma.txt
import json, re, sys
out = sys.argv[1]
raw = dict(kv.split("=") for kv in open(f"{out}/raw.txt").read().split())
for op, key in (("push", "raw_write_MBps"), ("pull", "raw_read_MBps")):
    s = json.load(open(f"{out}/{op}.json"))["scenarios"][0]
    base = float(raw[key]) * 8 / 1000  # MB/s -> Gbit/s
    print(f"verbs {op} 4 MiB on soft-RoCE (TCG): {s['gbps']:.3f} Gbit/s, p50 {s['p50_us']:.0f} us; "
          f"{'ib_write_bw' if op == 'push' else 'ib_read_bw'} {base:.3f} Gbit/s; "
          f"ratio {s['gbps'] / base:.2f}")
PY

#!/usr/bin/env python3
"""The cost of --timeline (docs/perf.md): shardps bench with and without it, alternated.

Usage: perf/timeline_overhead.py [SHARDPS_BINARY] [ROUNDS]
Prints, per workload, each mode's median throughput and median p50 over every worker of every
run, so that runs of both modes share the machine's state.
"""
import re
import statistics
import subprocess
import sys

shardps = sys.argv[1] if len(sys.argv) > 1 else "build/bin/shardps"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
workloads = {
    "8 x 4 KiB": ["--size", "4096", "--tensors", "8", "--iters", "3000", "--warmup", "200"],
    "1 x 4 MiB": ["--size", "4194304", "--tensors", "1", "--iters", "300", "--warmup", "20"],
}
for name, args in workloads.items():
    res = {"plain": [], "timeline": []}
    for _ in range(rounds):
        for mode in res:
            cmd = [shardps, "bench", "--servers", "1", "--workers", "2"] + args
            if mode == "timeline":
                cmd += ["--timeline", "/tmp/shardps-timeline-overhead.json"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            for g, p50 in re.findall(r"iters: ([\d.]+) Gbit/s, p50 (\d+) us", out.stdout + out.stderr):
                res[mode].append((float(g), int(p50)))
    for mode, v in res.items():
        p50s = sorted(x[1] for x in v)
        print(f"{name} {mode}: {len(v)} workers, median {statistics.median(x[0] for x in v)} Gbit/s, "
              f"median p50 {statistics.median(p50s)} us (range {p50s[0]}-{p50s[-1]})")

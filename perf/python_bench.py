#!/usr/bin/env python3
"""push_pull of a 64 MiB float32 array from Python against `shardps bench` in C++, in the same
run (docs/perf.md): 1 worker, 1 server, tcp (or --transport). Prints both and the ratio.

Usage: PYTHONPATH=build/python perf/python_bench.py [--shardps build/bin/shardps] [--rounds 3]
Under `shardps launch` (--worker) it is the Python worker itself.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--shardps", default="build/bin/shardps")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--iters", type=int, default=30)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--transport", default="tcp")
p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
args = p.parse_args()
N = 16 << 20  # 64 MiB of float32

if args.worker:
    import numpy as np

    import shardps

    with shardps.Worker.from_environment() as w:
        t = w.declare("bench", N, optimizer="sgd", lr=0.0)
        g, out = np.ones(N, np.float32), np.empty(N, np.float32)
        for _ in range(args.warmup):
            w.push_pull(t, g, out).wait()
        # As `shardps bench` counts it: the bytes pushed and pulled over the whole loop's time.
        start = time.perf_counter()
        for _ in range(args.iters):
            w.push_pull(t, g, out).wait()
        secs = time.perf_counter() - start
        gbit = 2 * N * 4 * args.iters * 8 / secs / 1e9
        print(f"python push_pull: {gbit:.2f} Gbit/s ({args.iters} iterations)", flush=True)
    sys.exit(0)

py, cpp = [], []
for _ in range(args.rounds):
    r = subprocess.run([args.shardps, "--log-level", "warn", "bench", "--servers", "1",
                        "--workers", "1", "--transport", args.transport, "--size", str(N * 4),
                        "--iters", str(args.iters), "--warmup", str(args.warmup)],
                       capture_output=True, text=True, timeout=600)
    m = re.search(r"iters: ([\d.]+) Gbit/s", r.stdout + r.stderr)
    cpp.append(float(m.group(1)))
    r = subprocess.run([args.shardps, "--log-level", "warn", "launch", "--servers", "1",
                        "--workers", "1", "--transport", args.transport, "--", sys.executable,
                        os.path.abspath(__file__), "--worker", "--iters", str(args.iters),
                        "--warmup", str(args.warmup)], capture_output=True, text=True,
                       timeout=600)
    m = re.search(r"python push_pull: ([\d.]+) Gbit/s", r.stdout + r.stderr)
    if not m:
        sys.exit(r.stdout + r.stderr)
    py.append(float(m.group(1)))
c, q = statistics.median(cpp), statistics.median(py)
print(f"C++ bench: {c:.2f} Gbit/s {cpp}; Python: {q:.2f} Gbit/s {py}; ratio {q / c:.3f}")

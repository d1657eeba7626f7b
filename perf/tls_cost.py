#!/usr/bin/env python3
"""The cost of TLS on tcp connections (docs/perf.md): shardps bench over tcp with and without
--tls-cert/--tls-key/--tls-ca, runs alternated so that both share the machine's state.

Usage: perf/tls_cost.py [SHARDPS_BINARY] [ROUNDS]
Makes a throwaway CA and node certificate with the openssl command.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile

shardps = sys.argv[1] if len(sys.argv) > 1 else "build/bin/shardps"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
d = tempfile.mkdtemp(prefix="shardps-tls-cost-")
ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
subprocess.run(["openssl", "req", "-x509", *ec, "-days", "1", "-keyout", f"{d}/ca.key", "-out",
                f"{d}/ca.pem", "-subj", "/CN=ca"], check=True, capture_output=True)
subprocess.run(["openssl", "req", *ec, "-keyout", f"{d}/n.key", "-out", f"{d}/n.csr", "-subj",
                "/CN=n"], check=True, capture_output=True)
subprocess.run(["openssl", "x509", "-req", "-in", f"{d}/n.csr", "-CA", f"{d}/ca.pem", "-CAkey",
                f"{d}/ca.key", "-CAcreateserial", "-days", "1", "-out", f"{d}/n.pem"], check=True,
               capture_output=True)
tls = ["--tls-cert", f"{d}/n.pem", "--tls-key", f"{d}/n.key", "--tls-ca", f"{d}/ca.pem"]
workloads = {
    "push_pull 4 KiB": ["--size", "4096", "--iters", "5000", "--warmup", "500"],
    "push 4 MiB": ["--size", "4194304", "--iters", "200", "--warmup", "20", "--op", "push"],
    "pull 4 MiB": ["--size", "4194304", "--iters", "200", "--warmup", "20", "--op", "pull"],
}
for name, args in workloads.items():
    res = {"plain": [], "tls": []}
    for _ in range(rounds):
        for mode in res:
            cmd = [shardps, "bench", "--servers", "1", "--workers", "1", "--transport", "tcp"] + args
            if mode == "tls":
                cmd += tls
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            for g, p50 in re.findall(r"iters: ([\d.]+) Gbit/s, p50 (\d+) us", out.stdout + out.stderr):
                res[mode].append((float(g), int(p50)))
    for mode, v in res.items():
        if not v:
            print(f"{name} {mode}: no result")
            continue
        print(f"{name} {mode}: {len(v)} runs, median {statistics.median(x[0] for x in v)} Gbit/s, "
              f"median p50 {statistics.median(x[1] for x in v)} us")
subprocess.run(["rm", "-rf", d])

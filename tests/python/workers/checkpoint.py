"""A worker that checkpoints a job (--phase save) or goes on from one (--phase restore, under
`shardps launch --restore DIR`), with integer-valued pushes whose results are exact
(tests/python, docs/fault-tolerance.md)."""
import argparse
import sys

import numpy as np

import shardps

p = argparse.ArgumentParser()
p.add_argument("--phase", choices=["save", "restore"], required=True)
p.add_argument("--dir", required=True)
args = p.parse_args()

SHAPE = (2, 700)


def grad(rank, step):
    i = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return ((rank + 1) * step + (i % 5)).astype(np.float32)


def expect(workers, steps):
    # sum aggregate, sgd with lr 1: every worker's gradients of steps 1..steps subtracted
    return np.full(SHAPE, 1000.0, np.float32) - sum(
        grad(r, k) for r in range(workers) for k in range(1, steps + 1))


with shardps.Worker.from_environment() as w:
    t = w.declare("w", SHAPE, optimizer="sgd", lr=1.0, init_value=1000.0)
    out = np.empty(SHAPE, np.float32)
    first = 1
    if args.phase == "restore":
        h = w.pull(t, out)
        h.wait(60)
        if h.version != 3 or not np.array_equal(out, expect(w.num_workers, 3)):
            sys.exit(f"worker {w.rank}: restored version {h.version}, {out.ravel()[:3]}")
        first = 4
    for s in range(first, first + 3):
        h = w.push_pull(t, grad(w.rank, s), out)
        h.wait(60)
        if h.version != s or not np.array_equal(out, expect(w.num_workers, s)):
            sys.exit(f"worker {w.rank}: step {s}: version {h.version}, {out.ravel()[:3]}")
    if args.phase == "save":
        w.checkpoint(args.dir)
    print(f"worker {w.rank}: {args.phase} exact")

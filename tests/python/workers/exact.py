"""A worker pushing integer-valued gradients whose results are exact (tests/python): numpy and,
where PyTorch is there, torch tensors. Exit status 1 and a message on any wrong value."""
import argparse
import sys

import numpy as np

import shardps

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--mode", default="sync")
args = p.parse_args()

SHAPE = (3, 1000)


def grad(rank, step):
    i = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return ((rank + 1) * step + (i % 7)).astype(np.float32)


with shardps.Worker.from_environment() as w:
    W = w.num_workers
    init = np.full(SHAPE, 1000.0, np.float32)
    t = w.declare("w", SHAPE, optimizer="sgd", lr=1.0, init=init)
    try:
        import torch
    except ImportError:
        torch = None
    tt = w.declare("t", SHAPE, optimizer="sgd", lr=1.0, init_value=500.0) if torch else None
    out = np.empty(SHAPE, np.float32)
    for s in range(1, args.steps + 1):
        g = grad(w.rank, s)
        if args.mode == "sync":
            h = w.push_pull(t, g, out)
            h.wait(60)
            if h.version != s:
                sys.exit(f"worker {w.rank}: step {s} gave version {h.version}")
            # sum aggregate, lr 1: every worker's gradients of steps 1..s subtracted
            expect = init - sum(grad(r, k) for r in range(W) for k in range(1, s + 1))
            if not np.array_equal(out, expect):
                sys.exit(f"worker {w.rank}: step {s}: {out.ravel()[:4]} != {expect.ravel()[:4]}")
        else:
            w.push(t, g).wait(60)
        if torch is not None:
            tg = torch.from_numpy(g.copy())
            tout = torch.empty(SHAPE, dtype=torch.float32)
            w.push_pull(tt, tg, tout).wait(60)
            if args.mode == "sync":
                texp = 500.0 - sum(grad(r, k) for r in range(W) for k in range(1, s + 1))
                if not np.array_equal(tout.numpy(), texp):
                    sys.exit(f"worker {w.rank}: torch step {s} wrong")
    w.barrier("pushed")
    w.pull(t, out).wait(60)
    final = init - sum(grad(r, k) for r in range(W) for k in range(1, args.steps + 1))
    if not np.array_equal(out, final):
        sys.exit(f"worker {w.rank}: final {out.ravel()[:4]} != {final.ravel()[:4]}")
    print(f"py worker {w.rank}: exact ({'torch and numpy' if torch else 'numpy'})")

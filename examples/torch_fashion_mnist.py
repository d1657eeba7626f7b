#!/usr/bin/env python3
"""A small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist) trained through ShardPS with
shardps.torch.DistributedOptimizer, beside the same model trained in one process
(docs/python.md).

    python3 examples/torch_fashion_mnist.py --compare          # both, side by side
    shardps launch --servers 2 --workers 4 -- python3 examples/torch_fashion_mnist.py
    python3 examples/torch_fashion_mnist.py --single           # one process only

Both runs see the same data in the same order: each step takes the next --batch images, and
worker r of W trains on its W-th share of them; with the sync mean aggregate the servers' SGD
step is the one process's step on the whole batch (up to float rounding).
"""
import argparse
import gzip
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

DATA = "/usr/share/datasets/fashion-mnist"


def load(kind, limit):
    with gzip.open(f"{DATA}/{kind}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f"{DATA}/{kind}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10))


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def train(args, worker=None):
    torch.set_num_threads(1)
    x, y = load("train", args.train_size)
    tx, ty = load("t10k", args.test_size)
    net = model()
    loss_fn = torch.nn.CrossEntropyLoss()
    if worker is None:
        rank, size = 0, 1
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    else:
        import shardps.torch

        rank, size = worker.rank, worker.num_workers
        opt = shardps.torch.DistributedOptimizer(net.named_parameters(), worker,
                                                 optimizer="momentum", lr=args.lr,
                                                 momentum=0.9)
    start = time.time()
    steps = len(x) // args.batch
    # The rate decays to 0 over the run (torch's scheduler drives both optimizers alike).
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps) \
        if args.schedule == "cosine" else None
    for epoch in range(args.epochs):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(x), generator=g)
        for s in range(steps):
            idx = order[s * args.batch:(s + 1) * args.batch][rank::size]
            opt.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
            if sched:
                sched.step()
    return accuracy(net, tx, ty), time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--single", action="store_true", help="train in this process only")
    p.add_argument("--compare", action="store_true",
                   help="train in one process, then with shardps launch, and print both")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="the learning rate over the run: cosine decay to 0, or constant")
    p.add_argument("--train-size", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--test-size", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--shardps", default="shardps", help="the shardps command")
    args = p.parse_args()
    common = ["--epochs", str(args.epochs), "--batch", str(args.batch), "--lr", str(args.lr),
              "--schedule", args.schedule,
              "--train-size", str(args.train_size), "--test-size", str(args.test_size)]
    if args.compare:
        acc1, t1 = train(args)
        print(f"one process: accuracy {acc1:.4f} ({t1:.1f} s)", flush=True)
        cmd = [args.shardps, "--log-level", "warn", "launch", "--servers", str(args.servers),
               "--workers", str(args.workers), "--mode", "sync", "--aggregate", "mean", "--",
               sys.executable, os.path.abspath(__file__), *common]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        m = re.search(r"shardps worker 0: accuracy ([\d.]+) \(([\d.]+) s\)", r.stdout + r.stderr)
        if r.returncode != 0 or not m:
            sys.exit(f"the ShardPS run failed:\n{r.stdout}{r.stderr}")
        acc2 = float(m.group(1))
        print(f"shardps, {args.workers} workers, {args.servers} servers: accuracy {acc2:.4f} "
              f"({float(m.group(2)):.1f} s)")
        print(f"difference: {100 * (acc2 - acc1):+.2f} points")
        return
    if args.single:
        acc, t = train(args)
        print(f"one process: accuracy {acc:.4f} ({t:.1f} s)")
        return
    import shardps

    with shardps.Worker.from_environment() as w:
        acc, t = train(args, w)
        print(f"shardps worker {w.rank}: accuracy {acc:.4f} ({t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

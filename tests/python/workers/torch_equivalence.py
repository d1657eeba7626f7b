"""DistributedOptimizer over W workers in sync mean mode against the same model trained by one
process on the whole batch (tests/python): each worker takes every W-th sample, so the mean of
the workers' gradients is the whole batch's, and the servers' SGD step is the single process's
up to float rounding. Then the same with momentum, a torch learning-rate scheduler and gradient
accumulation (two half-share backwards per step, each loss halved) against torch's SGD with
the same scheduler on the whole batch. Exit status 1 on a difference."""
import sys

import torch

import shardps
import shardps.torch

STEPS, N, LR = 10, 96, 0.5


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


g = torch.Generator().manual_seed(1)
x = torch.randn(N, 20, generator=g)
y = torch.randint(0, 3, (N,), generator=g)
loss_fn = torch.nn.CrossEntropyLoss()

with shardps.Worker.from_environment() as w:
    W = w.num_workers
    net = model()
    if w.rank != 0:  # other workers start elsewhere: the optimizer loads worker 0's values
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    opt = shardps.torch.DistributedOptimizer(net.named_parameters(), w, optimizer="sgd", lr=LR)
    ref = model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(net(x[w.rank::W]), y[w.rank::W]).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
        for (n, a), b in zip(net.named_parameters(), ref.parameters()):
            diff = (a - b).abs().max().item()
            if diff > 1e-5 * max(1.0, b.abs().max().item()):
                sys.exit(f"worker {w.rank} step {step}: {n} differs by {diff}")
    print(f"py torch worker {w.rank}: matches one process after {STEPS} steps")

    # A schedule (halving every 3 steps after a warm-up of 2 at a tenth) and accumulation.
    def rate(step):
        return (0.1 if step < 2 else 1.0) * 0.5 ** (step // 3)

    net, ref = model(), model()
    opt = shardps.torch.DistributedOptimizer(net.named_parameters(), w, optimizer="momentum",
                                             lr=LR, momentum=0.9, prefix="acc/",
                                             backward_passes_per_step=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, rate)
    xs, ys = x[w.rank::W], y[w.rank::W]
    half = len(xs) // 2
    for step in range(STEPS):
        opt.zero_grad()
        for part in (slice(0, half), slice(half, None)):
            (loss_fn(net(xs[part]), ys[part]) / 2).backward()
        opt.step()
        sched.step()
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
        ref_sched.step()
        for (n, a), b in zip(net.named_parameters(), ref.parameters()):
            diff = (a - b).abs().max().item()
            if diff > 1e-5 * max(1.0, b.abs().max().item()):
                sys.exit(f"worker {w.rank} step {step} (scheduled, accumulated): {n} differs by "
                         f"{diff}")
    # A third backward before step() is refused, naming the parameter.
    opt.zero_grad()
    for _ in range(2):
        loss_fn(net(xs), ys).backward()
    try:
        loss_fn(net(xs), ys).backward()
        sys.exit("a third backward before step() was accepted")
    except RuntimeError as e:
        if "3 backwards before step()" not in str(e):
            raise
    print(f"py torch worker {w.rank}: with a scheduler and accumulation matches one process "
          f"after {STEPS} steps")

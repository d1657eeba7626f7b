"""ShardPS for PyTorch models (docs/python.md): the servers run the optimizer.

    w = shardps.Worker.from_environment()
    opt = shardps.torch.DistributedOptimizer(model.named_parameters(), w, optimizer="sgd", lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # each gradient is pushed as soon as it is computed
        opt.step()                        # waits, and loads the parameters the servers published

Every worker builds the same model and declares the same parameters; worker 0's initial values
are the ones the servers start from, and every worker loads them at construction (so the
workers start equal: broadcast_parameters). Gradients are pushed per parameter from a hook
that runs when autograd has accumulated the parameter's gradient, so communication overlaps
with the rest of backward; step() waits for each push_pull and copies the new parameters in
(before the next forward). Compression can be chosen per parameter.

It is a torch.optim.Optimizer with one parameter group, so torch's learning-rate schedulers
drive it: the group's "lr" when a gradient is pushed is the rate of the update it is part of
(Worker.set_learning_rate). With backward_passes_per_step=N, gradients accumulate locally over N
backwards (torch's sum) and are pushed after the N-th.
"""

import numpy as np
import torch

from . import Worker  # noqa: F401 (for the docstring's users)


def _shape(p):
    return tuple(p.shape) if p.dim() > 0 else (1,)


class DistributedOptimizer(torch.optim.Optimizer):
    """The servers' optimizer over a model's parameters.

    named_parameters: model.named_parameters(). worker: a shardps.Worker. optimizer, lr,
    weight_decay, momentum, nesterov, beta1, beta2, eps: the servers' optimizer (docs/
    consistency.md); param_groups[0]["lr"] may change between steps (an lr scheduler).
    compression: a codec for every parameter ("fp16", "topk:1%", ...) or a dict from parameter
    name to codec (missing names: "none"). prefix: prepended to every tensor name, to declare two
    models in one job. backward_passes_per_step: the backwards whose gradients are summed before
    each push (gradient accumulation; step() after the last of them).
    """

    def __init__(self, named_parameters, worker, *, optimizer="sgd", lr=0.01, weight_decay=0.0,
                 momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 compression="none", pull="none", prefix="", backward_passes_per_step=1):
        if int(backward_passes_per_step) != backward_passes_per_step or \
                backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be a positive integer, not "
                             f"{backward_passes_per_step}")
        self._w = worker
        self._passes = int(backward_passes_per_step)
        self._params = []
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ValueError(f"{name}: ShardPS takes float32 CPU parameters, not {p.dtype} "
                                 f"on {p.device}")
            self._params.append((prefix + name, p))
        if not self._params:
            raise ValueError("no parameter requires a gradient")
        super().__init__([p for _, p in self._params], {"lr": lr})
        self._sent_lr = {}  # the rate last set per tensor (none: the declared one, defaults["lr"])
        self._backwards = {}  # backwards accumulated per parameter since the last push
        self._tid = {}
        self._out = {}
        self._pending = {}
        self._hooks = []
        for name, p in self._params:
            codec = compression.get(name[len(prefix):], "none") if isinstance(compression, dict) \
                else compression
            init = p.detach().reshape(_shape(p)).contiguous().numpy()
            self._tid[name] = worker.declare(
                name, _shape(p), optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                momentum=momentum, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps,
                init=init, compression=codec, pull=pull)
            self._out[name] = np.empty(_shape(p), np.float32)
        self.broadcast_parameters()
        for name, p in self._params:
            self._hooks.append(self._hook(name, p))

    def _hook(self, name, p):
        # The AccumulateGrad node of the leaf: its hook runs once p.grad holds this backward's
        # gradient (Horovod's way on PyTorch versions without post-accumulate hooks).
        acc = p.expand_as(p).grad_fn.next_functions[0][0]

        def push(*_):
            self._backward_done(name, p)

        acc.register_hook(push)
        return acc  # keep the node (and its hook) alive

    def _backward_done(self, name, p):
        n = self._backwards.get(name, 0) + 1
        if n > self._passes:
            raise RuntimeError(f"{name}: {n} backwards before step(), with "
                               f"backward_passes_per_step={self._passes}: call step() after "
                               "that many")
        self._backwards[name] = n
        if n == self._passes:
            self._push(name, p)

    def _push(self, name, p):
        lr = float(self.param_groups[0]["lr"])
        if lr != self._sent_lr.get(name, self.defaults["lr"]):
            self._w.set_learning_rate(self._tid[name], lr)
            self._sent_lr[name] = lr
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        g = g.detach()
        if not g.is_contiguous():
            g = g.contiguous()
        self._pending[name] = (self._w.push_pull(self._tid[name], g.reshape(_shape(p)),
                                                 self._out[name]), g)

    def zero_grad(self, set_to_none=True):
        for _, p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None, timeout=300.0):
        """Waits for every parameter's push_pull and loads the published parameters. A parameter
        not pushed yet pushes its gradient as it stands (zeros if it has none: every worker
        pushes every tensor every step). `closure` (torch's convention) is called first, with
        gradients enabled, and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._backwards.clear()
        for name, p in self._params:
            if name not in self._pending:
                self._push(name, p)
        for name, p in self._params:
            h, _ = self._pending.pop(name)
            h.wait(timeout)
            p.copy_(torch.from_numpy(self._out[name]).reshape(p.shape))
        return loss

    def broadcast_parameters(self, timeout=300.0):
        """Loads the servers' current parameters into the model (worker 0's at the start)."""
        handles = [self._w.pull(self._tid[name], self._out[name]) for name, _ in self._params]
        for h in handles:
            h.wait(timeout)
        with torch.no_grad():
            for name, p in self._params:
                p.copy_(torch.from_numpy(self._out[name]).reshape(p.shape))


def broadcast_parameters(named_parameters, worker, name="broadcast", timeout=300.0):
    """Makes every worker's parameters worker 0's (outside a DistributedOptimizer): declares them
    under `name`/... with worker 0's values and pulls them into every worker's model."""
    params = [(n, p) for n, p in named_parameters]
    outs = []
    for n, p in params:
        tid = worker.declare(f"{name}/{n}", _shape(p), optimizer="sgd", lr=0.0,
                             init=p.detach().reshape(_shape(p)).contiguous().numpy())
        out = np.empty(_shape(p), np.float32)
        outs.append((p, out, worker.pull(tid, out)))
    for p, out, h in outs:
        h.wait(timeout)
        with torch.no_grad():
            p.copy_(torch.from_numpy(out).reshape(p.shape))

"""ShardPS from Python: a worker of a ShardPS job (docs/python.md).

    import numpy as np, shardps
    with shardps.Worker.from_environment() as w:        # as `shardps launch` starts it
        t = w.declare("w", (1000,), optimizer="sgd", lr=0.1)
        grad, out = np.ones(1000, np.float32), np.empty(1000, np.float32)
        w.push_pull(t, grad, out).wait()

Arrays (numpy, or torch tensors on the CPU) must be float32 and C-contiguous, of the tensor's
shape; they cross without copies. Operations are asynchronous: each returns a Handle whose
wait(timeout) blocks without holding the GIL. The handle holds the arrays until the operation
completed. ShardPS errors raise shardps.Error (shardps.TimeoutError for timeouts), with the
status text; bad arrays raise ValueError.
"""

import builtins
import math

from . import _shardps

__all__ = ["Error", "TimeoutError", "Handle", "Worker"]


class Error(RuntimeError):
    """A ShardPS operation failed; `code` names the status code (e.g. "Unavailable")."""

    code = "Unknown"


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 (shardps.TimeoutError)
    """A bounded wait ran out (the operation goes on)."""


Handle = _shardps.Handle


def _buffer(x, what, name):
    """The object whose buffer ShardPS reads or writes: numpy arrays as they are, torch tensors
    as the numpy view of their memory (which keeps the tensor alive)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        if x.device.type != "cpu":
            raise ValueError(f"{name}: the {what} is on {x.device}; ShardPS takes CPU tensors")
        if x.dtype != torch.float32:
            raise ValueError(f"{name}: the {what} must be float32, not {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name}: the {what} tensor is not contiguous")
        return x.detach().numpy()
    return x


class Worker:
    """One worker of a job. Every worker declares the same tensors in the same order."""

    def __init__(self, impl):
        self._w = impl
        self._ids = {}  # name -> id
        self._shapes = {}  # id -> shape
        self._names = {}  # id -> name

    @classmethod
    def from_environment(cls):
        """Connects as `shardps launch`/`shardps run` tell the worker to (SHARDPS_* variables)."""
        return cls(_shardps.Worker.from_environment())

    @classmethod
    def connect(cls, coordinator, rank=-1, transport=""):
        """Connects to the coordinator at "host:port" (other settings from SHARDPS_*)."""
        return cls(_shardps.Worker.connect(coordinator, rank, transport))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.finish()
        return False

    @property
    def rank(self):
        return self._w.rank

    @property
    def rejoined(self):
        """True when this worker took the place of one that died (--on-worker-loss continue,
        restarted with its rank): the others are past the job's first barriers; pull the current
        parameters and go on from steps(name) (docs/fault-tolerance.md)."""
        return self._w.rejoined

    @property
    def num_workers(self):
        return self._w.num_workers

    @property
    def num_servers(self):
        return self._w.num_servers

    @property
    def mode(self):
        return self._w.mode

    def declare(self, name, shape, *, optimizer="sgd", lr=0.01, weight_decay=0.0, momentum=0.9,
                nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8, init=None, init_value=0.0,
                compression="none", pull="none"):
        """Declares a tensor of `shape` (an int or a tuple) held by the servers, with the
        optimizer the servers run on it; `init` (an array of that shape) or `init_value` is its
        value (worker 0's counts). `compression` is a codec as docs/compression.md writes it
        ("fp16", "int8", "topk:1%", ...); `pull` is "none", "fp16" or "bf16". Returns the
        tensor's id (operations take the id or the name)."""
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if init is not None:
            init = _buffer(init, "initial value", name)
            if tuple(getattr(init, "shape", ())) != shape:
                raise ValueError(f"{name}: the initial value has shape "
                                 f"{tuple(getattr(init, 'shape', ()))}, the tensor {shape}")
        tid = self._w._declare(name, list(shape), optimizer, lr, weight_decay, momentum, nesterov,
                               beta1, beta2, eps, init, init_value, compression, pull)
        self._ids[name] = tid
        self._shapes[tid] = shape
        self._names[tid] = name
        return tid

    def _id(self, tensor):
        if isinstance(tensor, str):
            if tensor not in self._ids:
                raise ValueError(f"unknown tensor '{tensor}' (declare it first)")
            return self._ids[tensor]
        if tensor not in self._shapes:
            raise ValueError(f"unknown tensor id {tensor} (declare it first)")
        return tensor

    def _array(self, tid, x, what):
        name = self._names[tid]
        x = _buffer(x, what, name)
        if not hasattr(x, "shape"):
            raise ValueError(f"{name}: the {what} must be a float32 array (numpy.ndarray or "
                             f"torch.Tensor on the CPU), not {type(x).__name__}")
        shape = tuple(x.shape)
        if shape != self._shapes[tid]:
            raise ValueError(f"{name}: the {what} has shape {shape}, the tensor "
                             f"{self._shapes[tid]}")
        return x

    def push(self, tensor, grad):
        """Pushes a gradient; the handle completes when the servers applied it."""
        tid = self._id(tensor)
        return self._w._push(tid, self._array(tid, grad, "gradient"))

    def pull(self, tensor, out):
        """Reads the newest published parameters into `out`."""
        tid = self._id(tensor)
        return self._w._pull(tid, self._array(tid, out, "output"))

    def push_pull(self, tensor, grad, out):
        """Pushes a gradient, then reads the version it produced (or a newer one) into `out`."""
        tid = self._id(tensor)
        return self._w._push_pull(tid, self._array(tid, grad, "gradient"),
                                  self._array(tid, out, "output"))

    def set_learning_rate(self, tensor, lr):
        """The learning rate of the updates this worker's later pushes of `tensor` are part of
        (a schedule): each push carries the rate it was issued with. In sync mode every worker
        sets the same rate before the same step (a step uses the lowest-ranked worker's)."""
        tid = self._id(tensor)
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{self._names[tid]}: the learning rate must be a finite number "
                             f">= 0, not {lr}")
        self._w._set_learning_rate(tid, lr)

    def barrier(self, name, timeout=60.0):
        """Waits until every worker entered barrier `name` (seconds)."""
        self._w.barrier(name, timeout)

    def checkpoint(self, directory, timeout=600.0):
        """Collective, between steps (every worker, none of its operations in flight): the
        servers write their chunks into `directory`, worker 0 the manifest; a job started with
        --restore DIRECTORY goes on from it (docs/fault-tolerance.md)."""
        self._w.checkpoint(str(directory), timeout)

    def steps(self, tensor):
        """The step of the tensor's next push (1 before the first)."""
        return self._w.steps(self._id(tensor))

    def server_stats(self, server):
        """A server's statistics (a dict)."""
        import json

        return json.loads(self._w.server_stats(server))

    def finish(self):
        """Says goodbye: the job ends when every worker did."""
        self._w.finish()

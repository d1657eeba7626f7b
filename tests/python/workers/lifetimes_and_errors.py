"""One worker: handles keep arrays alive, a dropped handle waits, every bad input is a clear
error (tests/python). Exit status 1 and a message on any failure."""
import gc
import sys
import weakref

import numpy as np

import shardps


class A(np.ndarray):  # an ndarray that takes weak references
    pass


def expect_error(kind, text, fn):
    try:
        fn()
    except kind as e:
        if text not in str(e):
            sys.exit(f"{kind.__name__} without '{text}': {e}")
        return e
    sys.exit(f"no {kind.__name__} ('{text}')")


N = 1 << 16
with shardps.Worker.from_environment() as w:
    t = w.declare("big", N, optimizer="sgd", lr=1.0, init_value=0.0)
    # The handle holds the gradient: dropping our reference does not free it before the push.
    g = np.ones(N, np.float32).view(A)
    ref = weakref.ref(g)
    h = w.push(t, g)
    del g
    gc.collect()
    if ref() is None:
        sys.exit("the gradient was freed while its push was in flight")
    h.wait(60)
    del h
    gc.collect()
    if ref() is not None:
        sys.exit("the gradient is still held after its push completed and the handle went")
    # A handle dropped without wait() waits for its operation first.
    out = np.zeros(N, np.float32).view(A)
    h = w.push_pull(t, np.full(N, 2.0, np.float32), out)
    del h
    if not np.array_equal(np.asarray(out), np.full(N, -3.0, np.float32)):
        sys.exit(f"after a dropped handle: {out[:4]}")
    # Bad arrays: ValueError saying what is wrong.
    expect_error(ValueError, "float32", lambda: w.push(t, np.ones(N, np.float64)))
    expect_error(ValueError, "shape", lambda: w.push(t, np.ones(N + 1, np.float32)))
    expect_error(ValueError, "shape", lambda: w.push(t, np.ones((2, N // 2), np.float32)))
    expect_error(ValueError, "not C-contiguous",
                 lambda: w.push(t, np.ones(2 * N, np.float32)[::2]))
    ro = np.zeros(N, np.float32)
    ro.flags.writeable = False
    expect_error(ValueError, "read-only", lambda: w.pull(t, ro))
    expect_error(ValueError, "unknown tensor", lambda: w.pull("nope", np.zeros(N, np.float32)))
    expect_error(ValueError, "unknown tensor", lambda: w.pull(99, np.zeros(N, np.float32)))
    expect_error(ValueError, "float32", lambda: w.push(t, [1.0] * N))
    expect_error(ValueError, "learning rate", lambda: w.set_learning_rate(t, -0.1))
    expect_error(ValueError, "learning rate", lambda: w.set_learning_rate(t, float("nan")))
    expect_error(ValueError, "unknown tensor", lambda: w.set_learning_rate("nope", 0.1))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        expect_error(ValueError, "float32", lambda: w.push(t, torch.ones(N, dtype=torch.int32)))
        expect_error(ValueError, "not contiguous",
                     lambda: w.push(t, torch.ones(2 * N)[::2]))
        tout = torch.zeros(N)
        w.pull(t, tout).wait(60)  # torch tensors, without copies
        if float(tout[0]) != -3.0:
            sys.exit(f"torch pull read {float(tout[0])}")
    # ShardPS errors: shardps.Error with the status text and code.
    e = expect_error(shardps.Error, "topk", lambda: w.declare("bad", 10, compression="topk:x"))
    if e.code != "InvalidArgument":
        sys.exit(f"code {e.code}")
    expect_error(ValueError, "pulls are", lambda: w.declare("bad2", 10, pull="int8"))
    expect_error(shardps.Error, "optimizer", lambda: w.declare("bad3", 10, optimizer="sgdd"))
    # Timeouts raise shardps.TimeoutError, which is both a shardps.Error and a TimeoutError.
    # (Not provoked here: a push of this size may complete within wait()'s first poll.)
    if not (issubclass(shardps.TimeoutError, TimeoutError)
            and issubclass(shardps.TimeoutError, shardps.Error)):
        sys.exit("shardps.TimeoutError is not a TimeoutError and a shardps.Error")
    print("py lifetimes and errors: ok")

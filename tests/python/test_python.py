"""pytest: the Python package (docs/python.md) in real jobs of real processes on 127.0.0.1,
started by `shardps launch`, each bounded in time."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARDPS = os.environ.get("SHARDPS_BIN", "shardps")


def launch(args, worker, *worker_args, timeout=180, env=None):
    cmd = [SHARDPS, "--log-level", "warn", "launch", *args, "--", sys.executable,
           os.path.join(HERE, "workers", worker), *worker_args]
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_three_workers_two_servers_exact(mode):
    code, out = launch(["--servers", "2", "--workers", "3", "--mode", mode, "--aggregate", "sum",
                        "--chunk-size", "4KiB"], "exact.py", "--steps", "15", "--mode", mode)
    assert code == 0, out
    assert out.count(": exact") == 3, out


def test_a_checkpoint_taken_from_python_restores_exactly(tmp_path):
    d = str(tmp_path / "ckpt")
    job = ["--servers", "2", "--workers", "2", "--mode", "sync", "--aggregate", "sum",
           "--chunk-size", "4KiB"]
    code, out = launch(job, "checkpoint.py", "--phase", "save", "--dir", d)
    assert code == 0, out
    assert out.count(": save exact") == 2, out
    code, out = launch(job + ["--restore", d], "checkpoint.py", "--phase", "restore", "--dir", d)
    assert code == 0, out
    assert out.count(": restore exact") == 2, out


def test_handles_keep_arrays_alive_and_bad_input_is_a_clear_error():
    code, out = launch(["--servers", "1", "--workers", "1"], "lifetimes_and_errors.py")
    assert code == 0, out
    assert "py lifetimes and errors: ok" in out, out


def test_from_environment_outside_a_job_says_what_is_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
    r = subprocess.run([sys.executable, "-c", "import shardps; shardps.Worker.from_environment()"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert "shardps.Error" in r.stderr and "SHARDPS_COORDINATOR" in r.stderr, r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_starts_a_job_of_python_workers(tmp_path):
    """The real torchrun (Debian's python3-torch) starts 4 tasks of `shardps run`: 1 server and 3
    Python workers whose values are exact. torchrun 1.13 under Python 3.11 needs --redirects and
    --tee of 1 with a log folder (docs/deploy.md)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed (apt-get install python3-torch)")
    cmd = ["torchrun", "--nnodes", "1", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--redirects", "1", "--tee", "1",
           "--log_dir", str(tmp_path), "--no_python", SHARDPS, "--log-level", "warn", "run",
           "--servers", "1", "--aggregate", "sum", "--coordinator", f"127.0.0.1:{free_port()}",
           "--", sys.executable, os.path.join(HERE, "workers", "exact.py"), "--steps", "10",
           "--mode", "sync"]
    env = dict(os.environ, SHARDPS_SERVER_LISTEN="127.0.0.1:0")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert out.count(": exact") == 3, out


def test_distributed_optimizer_matches_one_process_in_sync_mode():
    code, out = launch(["--servers", "2", "--workers", "3", "--mode", "sync", "--aggregate",
                        "mean", "--chunk-size", "1KiB"], "torch_equivalence.py")
    assert code == 0, out
    assert out.count(": matches one process after") == 3, out
    assert out.count("with a scheduler and accumulation matches one process") == 3, out


def test_the_fashion_mnist_example_is_within_half_a_point_of_one_process():
    """The issue's goal, as a user runs it: the whole Fashion-MNIST, 2 epochs, 4 workers and 2
    servers in sync mode against one process (docs/python.md: six runs measured ended -0.01 to
    +0.16 points apart, and float rounding alone moves one process by up to 0.36)."""
    example = os.path.join(HERE, "..", "..", "examples", "torch_fashion_mnist.py")
    r = subprocess.run([sys.executable, example, "--compare", "--epochs", "2", "--lr", "0.02",
                        "--servers", "2", "--workers", "4", "--shardps", SHARDPS],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    import re

    one = float(re.search(r"one process: accuracy ([\d.]+)", r.stdout).group(1))
    ps = float(re.search(r"shardps, 4 workers, 2 servers: accuracy ([\d.]+)", r.stdout).group(1))
    assert one > 0.85 and ps > 0.85, r.stdout
    assert abs(one - ps) <= 0.005, r.stdout

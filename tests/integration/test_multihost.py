"""Two processes on this machine, 4 CPU devices each, as one 8-device job.

`jax.distributed.initialize` on a loopback coordinator with gloo CPU collectives:
global-scope masks on FSDP-sharded params and a short `prune_retrain` with
checkpoints (written by both processes, then resumed) must equal the same
computation in one process (`tests/multihost/worker.py` checks it). Loopback only,
bounded in time.
"""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "integration", "multihost", "worker.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_prune_and_retrain_like_one(tmp_path):
  port, ckpt = str(free_port()), str(tmp_path / "ckpt")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), port, ckpt], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=400)[0])
  finally:
    for proc in procs:
      proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"process {i}: multihost ok" in out, out[-4000:]

"""Runs tests/multidevice in its own process with 8 host CPU devices.

`--xla_force_host_platform_device_count` only takes effect before jax initialises its
backends, which this pytest process has already done.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_multidevice_suite_passes_on_8_host_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAXPRUNE_MULTIDEVICE="1")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       os.path.join(HERE, "multidevice")],
      env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE),
  )
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "failed" not in proc.stdout

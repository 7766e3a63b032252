"""Runs a benchmark script with `--quick` in a subprocess and reads the JSON it writes."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# One XLA compilation cache for the runs of this test process: a benchmark run again
# (determinism, another seed) loads its programs instead of compiling them anew.
# bench_compile, which times compilation, turns the cache off for itself.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxprune-bench-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
_ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": _XLA_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_benchmark(name: str, *args: str) -> dict:
  """`benchmarks/bench_{name}.py --quick *args` (which must hold `--json PATH`): its report."""
  json_path = args[args.index("--json") + 1]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", f"bench_{name}.py"), "--quick", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=_ENV,
  )
  assert proc.returncode == 0, (
      f"bench_{name}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  with open(json_path) as f:
    return json.load(f)

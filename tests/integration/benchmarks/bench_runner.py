"""Runs a benchmark script with `--quick` in a subprocess and reads the JSON it writes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_benchmark(name: str, *args: str) -> dict:
  """`benchmarks/bench_{name}.py --quick *args` (which must hold `--json PATH`): its report."""
  json_path = args[args.index("--json") + 1]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", f"bench_{name}.py"), "--quick", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
  )
  assert proc.returncode == 0, (
      f"bench_{name}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  with open(json_path) as f:
    return json.load(f)

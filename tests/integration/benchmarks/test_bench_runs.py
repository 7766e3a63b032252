"""The loop, checkpoint and sharding benchmarks (`--quick`), and the device script.

They keep the scripts from rotting and check the invariants their reports rest on; the
figures in the README come from full runs. They write their own text, never ../shared.
"""

import math
import os
import subprocess

import pytest
from bench_runner import ROOT, run_benchmark

pytestmark = pytest.mark.slow


def test_bench_loop_reports_ratios_and_reaches_its_sparsity(tmp_path, text_file):
  report = run_benchmark("loop", "--data", text_file, "--json", str(tmp_path / "loop.json"))
  for baseline in ("hand pruned(adamw)", "hand adamw"):
    assert report["ratio"][baseline] > 0
    assert len(report["ratios"][baseline]) == len(report["samples"])
  whole = report["whole_run"]
  assert abs(whole["achieved_sparsity"] - report["schedule"][-1]) < 1e-2
  assert math.isfinite(whole["final_perplexity"])


def test_bench_sharding_keeps_per_device_memory_below_replicated(tmp_path):
  report = run_benchmark("sharding", "--json", str(tmp_path / "sharding.json"))
  one, many = report[0], report[-1]
  assert one["devices"] == 1 and many["devices"] > 1
  assert one["params"] == many["params"]
  assert many["per_device_bytes"] < one["per_device_bytes"]


def test_bench_checkpoint_times_checks_against_what_they_guard(tmp_path):
  out = run_benchmark("checkpoint", "--json", str(tmp_path / "ckpt.json"))
  assert out["rounds"] == 3 and len(out["runs"]) == 3
  assert set(out["ratios"]) == {"checksums / orbax write", "verify / orbax read",
                                "guard / (50 updates)"}
  assert all(0 < v < math.inf for v in out["ratios"].values())
  # params, AdamW's mu and nu, the masks packed to a bit each, and two update counts
  weights = 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64)
  assert out["values"] == 3 * weights + weights // 8 + 2


def test_device_check_script_runs_every_benchmark_it_names(tmp_path):
  script = os.path.join(ROOT, "benchmarks", "device_check.sh")
  subprocess.run(["bash", "-n", script], check=True)
  proc = subprocess.run(["bash", script, str(tmp_path), "--quick"], cwd=ROOT, check=True,
                        capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
  names = [line.split()[1] for line in proc.stdout.splitlines()]
  assert names == [f"benchmarks/bench_{n}.py" for n in ("masks", "step", "loop", "compile")]
  assert all(os.path.exists(os.path.join(ROOT, n)) for n in names)

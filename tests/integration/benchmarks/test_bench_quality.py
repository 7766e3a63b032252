"""The quality benchmark (`bench_quality.py --quick`): deterministic for a seed, every
row beside its equal-budget dense twin, the curve over budgets.

They keep the scripts from rotting and check the invariants their reports rest on; the
figures in docs/benchmarks.md come from full runs. They write their own text, never ../shared.
"""

import math
import os
import sys

import pytest
from bench_runner import ROOT, run_benchmark

pytestmark = pytest.mark.slow


def test_bench_quality_is_deterministic_and_honours_retrain_seeds(tmp_path, text_file):
  cache = str(tmp_path / "cache")
  common = ["--data", text_file, "--cache", cache]
  full = run_benchmark("quality", *common, "--json", str(tmp_path / "q.json"))
  assert full["retrain_seeds"] == [0] and len(full["rows"]) >= 4
  for row in full["rows"]:
    assert sum(row["retrain_steps"]) == row["retrain_total"] == full["retrain_totals"][0]
    # Row scope loses round(s * L) of every row of length L: within a row's rounding.
    tolerance = 0.02 if "rows" in row["recipe"] else 1e-3
    assert abs(row["targeted_sparsity"] - row["final_sparsity"]) < tolerance, row["recipe"]
    assert row["whole_model_sparsity"] < row["targeted_sparsity"]
    assert math.isclose(row["degradation"], row["perplexity"] / full["dense_perplexity"] - 1)
    (seed,) = row["per_seed"]
    assert math.isclose(row["vs_equal_budget"],
                        seed["perplexity"] / seed["equal_budget_perplexity"] - 1)
    # The dense twin retrains too: it is not the dense start.
    assert row["equal_budget_perplexity"] != full["dense_perplexity"], row["recipe"]
  rows = {r["recipe"]: r for r in full["rows"]}
  oneshot = rows["oneshot@0.8"]
  # Twins depend on the budgets, learning rate and restarts, not on the final sparsity.
  assert rows["tuned@0.9"]["equal_budget_perplexity"] != oneshot["equal_budget_perplexity"]
  baselines = sorted(os.listdir(cache))
  assert sum(name.startswith("baseline-") for name in baselines) < len(full["rows"])

  again = run_benchmark("quality", *common, "--recipes", "oneshot@0.8",
                        "--json", str(tmp_path / "again.json"))
  assert sorted(os.listdir(cache)) == baselines  # the twins came from the cache
  two = run_benchmark("quality", *common, "--recipes", "oneshot@0.8", "--retrain-seeds", "0,1",
                      "--json", str(tmp_path / "two.json"))
  # The dense model comes from the cache: the same in all three runs.
  assert again["dense_perplexity"] == two["dense_perplexity"] == full["dense_perplexity"]
  assert again["rows"][0]["perplexity"] == oneshot["perplexity"]
  assert again["rows"][0]["equal_budget_perplexity"] == oneshot["equal_budget_perplexity"]
  seed0, seed1 = two["rows"][0]["per_seed"]
  assert seed0["perplexity"] == oneshot["perplexity"]
  assert seed1["perplexity"] != oneshot["perplexity"]
  assert seed1["equal_budget_perplexity"] != seed0["equal_budget_perplexity"]
  assert math.isclose(two["rows"][0]["perplexity_spread"],
                      abs(seed1["perplexity"] - seed0["perplexity"]) / 2)


def test_bench_quality_curve_over_budgets(tmp_path, text_file):
  report = run_benchmark("quality", "--data", text_file, "--cache", str(tmp_path / "cache"),
                         "--recipes", "oneshot@0.8", "--retrain-steps", "12,6",
                         "--json", str(tmp_path / "curve.json"))
  assert report["retrain_totals"] == [6, 12]
  assert [r["retrain_total"] for r in report["rows"]] == [6, 12]
  points = report["curve"]["oneshot@0.8"]["points"]
  assert points == [[r["retrain_total"], r["vs_equal_budget"]] for r in report["rows"]]


def test_crossing_of_the_goal_is_interpolated_in_log_budget():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import bench_quality

  # +9% at 1000 steps, +3% at 4000: 5% lies two thirds of the way, in log2(budget).
  at = bench_quality.crossing([(1000, 0.09), (4000, 0.03)], goal=0.05)
  assert at["first_measured"] == 4000
  assert math.isclose(at["interpolated"], 2 ** (math.log2(1000) + 2 / 3 * 2))
  assert bench_quality.crossing([(500, 0.04)])["interpolated"] == 500.0
  assert bench_quality.crossing([(500, 0.2), (1000, 0.1)]) == {"first_measured": None,
                                                              "interpolated": None}

"""The selection and step benchmarks (`--quick`): masks identical to the sort
reference, optimizer state growing by exactly the packed masks, compile counts.

They keep the scripts from rotting and check the invariants their reports rest on; the
figures in docs/benchmarks.md come from full runs. They write their own text, never ../shared.
"""

import math

import pytest
from bench_runner import run_benchmark

pytestmark = pytest.mark.slow


def test_bench_masks_matches_the_sort_reference(tmp_path):
  report = run_benchmark("masks", "--json", str(tmp_path / "masks.json"))
  assert len(report["results"]) == 3
  for row in report["results"]:
    assert row["masks_identical_to_sort"] is True, row["case"]
    # round(s * n) per leaf (layer scope) or over the tree (global): off by < 1 per leaf.
    assert abs(row["pruned"] - 0.8 * row["params"]) < row["leaves"], row["case"]
    assert row["speedup_vs_sort"] > 0 and row["ratio_to_partition"] > 0
  assert "| masks = sort (approx_max_k's) |" in report["markdown"]
  assert all(r["speedup_vs_approx_max_k"] > 0 for r in report["results"])


@pytest.mark.parametrize("model", ["lm", "mlp"])
def test_bench_step_state_grows_by_exactly_the_packed_masks(tmp_path, model):
  sparse = model == "mlp"  # the MLP run also times sparse training, without async dispatch
  flags = ("--sparse-training", "--sync-dispatch") if sparse else ()
  report = run_benchmark("step", "--model", model, *flags, "--json", str(tmp_path / "step.json"))
  assert report["async_dispatch"] is (model == "lm")
  # Every targeted kernel's last axis is a multiple of 8: one bit per targeted weight.
  assert report["mask_bytes"] * 8 == report["targeted_params"]
  state = report["opt_state_bytes"]
  held = ["pruned(adamw)", "gradual, no update", "gradual, update"]
  if sparse:
    held += [f"{m}, {u}" for m in ("SET", "RigL")
             for u in ("no update", "update")]
    for name in ("STE, no update", "STE, update"):  # + one float32 dense copy
      extra = report["mask_bytes"] + 4 + 4 * report["targeted_params"]
      assert state[name] - state["adamw"] == extra, name
  for name in held:
    assert state[name] - state["adamw"] == report["mask_bytes"] + 4  # + the int32 count
  assert all(report["pruned_weights_zero"].values()) and len(report["pruned_weights_zero"]) \
      == len(state) - 1
  # A step that does not update its masks, compiled alone, is the fixed-mask step.
  alone = report["non_update_bytes_accessed_ratio"]
  fixed = report["bytes_accessed_ratio"]["pruned(adamw)"]
  for name in ("gradual, no update", *(["SET, no update", "RigL, no update"] if sparse else [])):
    assert alone[name] == pytest.approx(fixed, abs=2e-3), name
  # The mask read is elementwise: a fixed count of ops per targeted weight whatever the
  # model (19 as XLA counts them: unpacking, the AND of the gradients, the final select).
  flops = report["flops"]
  assert 0 < (flops["pruned(adamw)"] - flops["adamw"]) / report["targeted_params"] <= 24
  assert 1.0 <= report["bytes_accessed_ratio"]["pruned(adamw)"] < 1.02
  times = report["time_ratios"]
  assert len(times["gradual, update"]["round_ratios"]) == report["rounds"]


def test_bench_mask_reads_zeroes_as_where_does(tmp_path):
  out = run_benchmark("mask_reads", "--json", str(tmp_path / "reads.json"))
  results = out["results"]
  assert set(results) == {"no mask", "where, bool mask", "where, packed", "AND, packed",
                          "multiply, packed"}
  assert not results["no mask"]["equals_where"]  # the check can fail: g is not zeroed
  assert all(results[n]["equals_where"] for n in results if n != "no mask")
  assert all(r["median_ms"] > 0 and math.isfinite(r["ratio"]) for r in results.values())


def test_bench_compile_reports_both_scopes_and_the_unrolled_baseline(tmp_path):
  report = run_benchmark("compile", "--json", str(tmp_path / "compile.json"))
  rows = report["rows"]
  assert {(r["leaves"], r["scope"]) for r in rows} == {
      (n, s) for n in (4, 16) for s in ("layer", "global")}
  for row in rows:
    assert row["params"] == row["leaves"] * 64 * 64
    assert row["grouped"]["compile_s"] > 0 and ("unrolled" in row) == (row["leaves"] == 4)
  # Grouping bounds the scratch: leaves of distinct shapes (no loop shared) hold a
  # histogram each.
  layer4 = next(r for r in rows if r["leaves"] == 4 and r["scope"] == "layer")
  grouped, unrolled = (layer4[k]["extra_bytes_per_param"] for k in ("grouped", "unrolled"))
  assert 2 * grouped < unrolled, (grouped, unrolled)

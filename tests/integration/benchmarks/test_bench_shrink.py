"""The structural benchmarks (`bench_shrink.py`, `bench_shrink_quality.py`, `--quick`).

They keep the scripts from rotting and check the invariants their reports rest on; the
figures in docs/benchmarks.md come from full runs. They write their own text, never ../shared.
"""

import itertools
import math

import pytest
from bench_runner import run_benchmark

pytestmark = pytest.mark.slow


def test_bench_shrink_reports_smaller_models_and_their_lowering(tmp_path):
  report = run_benchmark("shrink", "--json", str(tmp_path / "shrink.json"))
  assert report["fractions_removed"] == [0.25, 0.5, 0.75]
  for name, model in report["models"].items():
    rows = model["rows"]
    assert [r["fraction_removed"] for r in rows] == [0.0, 0.25, 0.5, 0.75], name
    dense, small = rows[0], rows[1:]
    assert dense["kept_units"] == {} and dense["forward_flop_ratio"] == 1.0, name
    params = [r["params"] for r in rows]
    assert all(a > b for a, b in itertools.pairwise(params)), (name, params)
    for what in ("forward", "train_step"):
      ratios = [r[f"{what}_flop_ratio"] for r in small]
      assert 1.0 < ratios[0] < ratios[1] < ratios[2], (name, what, ratios)
      for r in rows:
        assert len(r[f"{what}_round_ratios"]) == report["rounds"], (name, what)
        assert r[f"{what}_time_ratio"] > 0 and r[f"{what}_compile_s"] > 0, (name, what)
        assert math.isclose(r[f"{what}_time_over_flop_ratio"],
                            r[f"{what}_time_ratio"] / r[f"{what}_flop_ratio"])
    for r in small:  # 1 - f of every unit of the removed kinds is kept (ceil per group)
      for kind, k in r["kept_units"].items():
        assert k["kept"] < k["of"], (name, kind)
        assert k["kept"] >= (1 - r["fraction_removed"]) * k["of"] - 1e-9, (name, kind)
  assert set(report["models"]["lm"]["rows"][1]["kept_units"]) == {"mlp_hidden", "heads"}
  assert set(report["models"]["cnn"]["rows"][1]["kept_units"]) == {"conv_channels"}
  assert report["models"]["lm"]["keep_all_max_abs_diff"] < 1e-4
  lowering = report["tpu_lowering"]
  assert lowering["ok"] is True and lowering["heads_removed"] is True, lowering
  assert len(lowering["checks"]) == 4, lowering  # d_ff and heads: small present, dense absent
  trace = report["trace"]
  assert trace["num_layers"] == 32 and trace["first_s"] > 0 and trace["groups"] > 32


def test_bench_shrink_quality_rows_hold_together_and_are_deterministic(tmp_path, text_file):
  common = ["--data", text_file, "--cache", str(tmp_path / "cache")]
  report = run_benchmark("shrink_quality", *common, "--json", str(tmp_path / "sq.json"))
  assert report["seeds"] == [0, 1]
  recovery, dense_steps = report["recovery_steps"], report["setup"]["dense_steps"]
  assert 0 < recovery <= dense_steps / 4
  rows = {(r["row"], r["method"]): r for r in report["rows"]}
  methods = {"mlp50+heads25": ["magnitude", "taylor", "activation"],
             "residual25": ["magnitude", "taylor", "activation"],
             "layers25": ["influence", "last"]}
  assert set(rows) == {("dense", "dense")} | {
      (row, m) for row, ms in methods.items() for m in ms + ["scratch", "masks"]}
  dense = rows[("dense", "dense")]
  for key, r in rows.items():
    ppl = r["perplexity"]
    assert len(ppl["per_seed"]) == 2 and all(1 < v < 256 for v in ppl["per_seed"]), key
    assert math.isclose(ppl["mean"], sum(ppl["per_seed"]) / 2), key
    assert math.isclose(ppl["spread"], abs(ppl["per_seed"][0] - ppl["per_seed"][1]) / 2), key
    assert math.isclose(r["vs_dense"], ppl["mean"] / dense["perplexity"]["mean"] - 1), key
  for row, ms in methods.items():
    small = rows[(row, ms[0])]["params"]
    assert small < dense["params"], row
    # Every estimator keeps the same sizes; (b) is that architecture, (c) that many weights.
    assert all(rows[(row, m)]["params"] == small for m in ms + ["scratch", "masks"]), row
    assert rows[(row, "scratch")]["steps"] == dense_steps + recovery
    assert rows[(row, "masks")]["pruned_nonzero_after"] == [0, 0], row
    speed = rows[(row, ms[0])]["speed"]
    assert speed["forward_flop_ratio"] > 1 and speed["train_step_flop_ratio"] > 1, row
    assert speed["forward_time_ratio"] > 0 and speed["train_step_time_ratio"] > 0, row
    for m in ms:
      r = rows[(row, m)]
      assert r["speed"] == speed, (row, m)
      assert all(v > 1 for v in r["before_recovery"]["per_seed"]), (row, m)
      for base in ("scratch", "masks"):
        want = r["perplexity"]["mean"] / rows[(row, base)]["perplexity"]["mean"] - 1
        assert math.isclose(r[f"vs_{base}"], want), (row, m, base)
  assert rows[("mlp50+heads25", "masks")]["speed"]["forward_time_ratio"] == 1.0
  assert len(rows[("layers25", "influence")]["kept_blocks"]) < report["setup"]["layers"]
  goals = {g["id"]: g["pass"] for g in report["goals"]}
  act = rows[("mlp50+heads25", "activation")]
  assert goals["recovery_budget"] is True
  assert goals["within_dense"] is (act["vs_dense"] <= 0.05)
  assert goals["beats_scratch"] is (act["vs_scratch"] < 0)
  for row in ("mlp50+heads25", "residual25"):
    assert goals[f"activation_vs_magnitude:{row}"] is (
        rows[(row, "activation")]["perplexity"]["mean"]
        <= rows[(row, "magnitude")]["perplexity"]["mean"])

  # Deterministic for a seed: seed 1 alone (its dense params from the cache) measures alike.
  again = run_benchmark("shrink_quality", *common, "--seeds", "1", "--rows", "mlp50+heads25",
                        "--json", str(tmp_path / "again.json"))
  for r in again["rows"]:
    first = rows[(r["row"], r["method"])]
    assert r["perplexity"]["per_seed"] == first["perplexity"]["per_seed"][1:], r["method"]

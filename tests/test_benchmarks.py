"""The benchmarks run (`--quick`) and what they write holds together.

The figures in the README come from full runs on tinyshakespeare; these tests only keep
the scripts from rotting and check the invariants their reports rest on (masks identical
to the sort reference, optimizer state growing by exactly the masks, the quality
benchmark deterministic for a seed and sensitive to `--retrain-seeds`, each row beside
its equal-budget dense twin). They use a text
they write themselves, never ../shared.
"""

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run_benchmark(name: str, *args: str) -> dict:
  json_path = args[args.index("--json") + 1]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", f"bench_{name}.py"), "--quick", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
  )
  assert proc.returncode == 0, (
      f"bench_{name}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  with open(json_path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = random.Random(0)
  words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
           "seven", "owls", "watch", "it"]
  path = tmp_path_factory.mktemp("bench_data") / "text.txt"
  path.write_text(" ".join(rng.choice(words) for _ in range(20_000)))
  return str(path)


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
    held += [f"{m}, {u}" for m in ("SET", "RigL", "STE masks in forward")
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


def test_bench_compile_reports_both_scopes_and_the_unrolled_baseline(tmp_path):
  report = run_benchmark("compile", "--json", str(tmp_path / "compile.json"))
  rows = report["rows"]
  assert {(r["leaves"], r["scope"]) for r in rows} == {
      (n, s) for n in (4, 16) for s in ("layer", "global")}
  for row in rows:
    assert row["params"] == row["leaves"] * 64 * 64
    assert row["grouped"]["compile_s"] > 0 and "unrolled" in row
  # Grouping bounds the scratch: the unrolled layer scope holds one histogram per leaf.
  layer16 = next(r for r in rows if r["leaves"] == 16 and r["scope"] == "layer")
  assert layer16["grouped"]["extra_bytes_per_param"] < layer16["unrolled"]["extra_bytes_per_param"]


def test_device_check_script_runs_every_benchmark_it_names(tmp_path):
  script = os.path.join(ROOT, "benchmarks", "device_check.sh")
  subprocess.run(["bash", "-n", script], check=True)
  proc = subprocess.run(["bash", script, str(tmp_path), "--quick"], cwd=ROOT, check=True,
                        capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
  names = [line.split()[1] for line in proc.stdout.splitlines()]
  assert names == [f"benchmarks/bench_{n}.py" for n in ("masks", "step", "loop", "compile")]
  assert all(os.path.exists(os.path.join(ROOT, n)) for n in names)


def test_bench_granularities_masks_match_the_sort_reference(tmp_path):
  report = run_benchmark("granularities", "--rounds", "1", "--json", str(tmp_path / "g.json"))
  methods = {r["method"] for r in report["rows"]}
  assert {"layer", "global", "ERK (layer)", "row (axis -2)", "N:M 2:4 (axis -2)"} <= methods
  assert all(r["identical"] for r in report["rows"]), [r["method"] for r in report["rows"]
                                                        if not r["identical"]]
  assert all(r["jaxprune_s"] > 0 and r["reference_s"] > 0 for r in report["rows"])


def test_bench_oneshot_prunes_every_method_to_its_sparsity(tmp_path, text_file):
  report = run_benchmark("oneshot", "--data", text_file, "--cache", str(tmp_path / "cache"),
                         "--json", str(tmp_path / "o.json"))
  assert report["unattributed"] == {}
  rows = {(r["sparsity"], r["method"]): r for r in report["rows"]}
  assert {m for _, m in rows} == {"magnitude", "wanda", "sparsegpt", "sparsegpt-seq"}
  for (s, method), r in rows.items():
    want = 0.5 if s == "2:4" else float(s)
    # Wanda's rows each lose round(s * row length): within a row's rounding of s.
    assert abs(r["achieved"] - want) < (0.02 if method == "wanda" else 1e-3), (s, method)
  layers = report["per_layer"]
  assert {tuple(r["shape"]) for r in layers} == {(32, 32), (32, 128), (128, 32)}
  spread = report["feature_norm_spread"]  # one figure per targeted kernel, max >= median
  assert spread and all(p.endswith("kernel") and v >= 1.0 for p, v in spread.items())
  assert all(r["sparsegpt"]["seconds"] > 0 and r["dense_forward"]["seconds"] > 0 and
             r["sparsegpt"]["temp_bytes"] > 0 for r in layers)
  # What one-shot reconstruction is for, on this deterministic tiny run too.
  assert rows[("0.7", "sparsegpt")]["perplexity"] < rows[("0.7", "magnitude")]["perplexity"]


def test_bench_sparse_training_holds_every_method_at_its_sparsity(tmp_path, text_file):
  report = run_benchmark("sparse_training", "--data", text_file, "--methods",
                         "static,set,rigl,ste", "--json", str(tmp_path / "s.json"))
  rows = {r["method"]: r for r in report["rows"]}
  assert set(rows) == {"static", "set", "rigl", "ste"}
  for method, r in rows.items():
    # ERK shares (drop and grow keeps them) sum to round(0.9 * N) of the N = 9216 targeted.
    assert r["targeted_sparsity"] * 9216 == round(0.9 * 9216), method
    assert 1.0 < r["perplexity"] < 256.0, method  # better than a uniform guess over bytes


def test_bench_mask_reads_zeroes_as_where_does(tmp_path):
  out = run_benchmark("mask_reads", "--json", str(tmp_path / "reads.json"))
  results = out["results"]
  assert set(results) == {"no mask", "where, bool mask", "where, packed", "AND, packed",
                          "multiply, packed"}
  assert not results["no mask"]["equals_where"]  # the check can fail: g is not zeroed
  assert all(results[n]["equals_where"] for n in results if n != "no mask")
  assert all(r["median_ms"] > 0 and math.isfinite(r["ratio"]) for r in results.values())


def test_bench_checkpoint_times_checks_against_what_they_guard(tmp_path):
  out = run_benchmark("checkpoint", "--json", str(tmp_path / "ckpt.json"))
  assert out["rounds"] == 3 and len(out["runs"]) == 3
  assert set(out["ratios"]) == {"checksums / orbax write", "verify / orbax read",
                                "guard / (50 updates)"}
  assert all(0 < v < math.inf for v in out["ratios"].values())
  # params, AdamW's mu and nu, the masks packed to a bit each, and two update counts
  weights = 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64)
  assert out["values"] == 3 * weights + weights // 8 + 2


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

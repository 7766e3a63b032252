"""The methods benchmarks (`--quick`): granularities, one-shot, sparse training.

They keep the scripts from rotting and check the invariants their reports rest on; the
figures in docs/benchmarks.md come from full runs. They write their own text, never ../shared.
"""

import pytest
from bench_runner import run_benchmark

pytestmark = pytest.mark.slow


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

"""Tests of `sparsity_report`: per-leaf counts, totals, compression, str and dict forms."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune.training import LeafSparsity, SparsityReport


def model_params():
  fc1 = np.arange(1, 65, dtype=np.float32).reshape(8, 8)
  fc1[:6] = 0.0  # 48 of 64 zeros
  out = np.ones((4, 4), np.float32)
  out[0, :2] = 0.0  # 2 of 16 zeros
  return {
      "fc1": {"kernel": jnp.asarray(fc1), "bias": jnp.zeros(8)},  # bias: 8 zeros, not targeted
      "output_proj": {"kernel": jnp.asarray(out, jnp.bfloat16)},
      "norm": {"scale": jnp.ones(4)},
  }


def test_per_leaf_rows():
  report = jaxprune.sparsity_report(model_params())
  rows = {r.path: r for r in report.leaves}
  assert list(rows) == ["fc1/bias", "fc1/kernel", "norm/scale", "output_proj/kernel"]
  fc1 = rows["fc1/kernel"]
  assert (fc1.shape, fc1.dtype, fc1.size, fc1.zeros, fc1.targeted) == ((8, 8), "float32", 64, 48,
                                                                       True)
  assert fc1.sparsity == 0.75
  out = rows["output_proj/kernel"]
  assert (out.dtype, out.size, out.zeros, out.targeted) == ("bfloat16", 16, 2, True)
  bias = rows["fc1/bias"]
  assert (bias.zeros, bias.sparsity, bias.targeted) == (8, 1.0, False)
  assert rows["norm/scale"].zeros == 0


def test_totals_and_compression_by_hand():
  report = jaxprune.sparsity_report(model_params())
  assert report.targeted_params == 80
  assert report.total_params == 80 + 8 + 4
  assert report.targeted_sparsity == pytest.approx(50 / 80)
  assert report.overall_sparsity == pytest.approx(58 / 92)
  # Targeted: fc1 float32 64 weights, 16 nonzero; output_proj bfloat16 16 weights, 14 nonzero.
  dense_t = 64 * 4 + 16 * 2
  packed_t = (8 + 16 * 4) + (2 + 14 * 2)  # bitmask bytes + nonzero values
  assert report.targeted_compression == pytest.approx(dense_t / packed_t)
  # Whole model: untargeted leaves stay dense (even the all-zero bias).
  dense_rest = 8 * 4 + 4 * 4
  assert report.overall_compression == pytest.approx((dense_t + dense_rest)
                                                     / (packed_t + dense_rest))
  assert report.targeted_param_ratio == pytest.approx(80 / 30)
  assert report.overall_param_ratio == pytest.approx(92 / 34)


def test_compression_differs_from_param_ratio():
  # At 50% sparsity float32: 2x fewer parameters but only 4 / (0.125 + 2) = 1.88x bytes.
  w = np.ones((16, 16), np.float32)
  w.ravel()[::2] = 0.0
  report = jaxprune.sparsity_report({"fc1": jnp.asarray(w)}, where={"fc1": True})
  assert report.targeted_param_ratio == pytest.approx(2.0)
  assert report.targeted_compression == pytest.approx(1024 / (32 + 128 * 4))
  assert report.targeted_compression == pytest.approx(report.overall_compression)


def test_dense_model_compression_below_one_and_full_sparsity():
  report = jaxprune.sparsity_report({"fc1": jnp.ones((8, 8))})
  assert report.targeted_sparsity == 0.0
  assert report.targeted_compression == pytest.approx(256 / (8 + 256))  # bitmask overhead
  assert report.targeted_param_ratio == 1.0
  report = jaxprune.sparsity_report({"fc1": jnp.zeros((8, 8))})
  assert report.targeted_sparsity == 1.0
  assert report.targeted_compression == pytest.approx(256 / 8)
  assert math.isinf(report.targeted_param_ratio)


def test_where_argument():
  params = model_params()
  report = jaxprune.sparsity_report(params, where={"fc1": {"kernel": False, "bias": True},
                                                   "output_proj": {"kernel": False},
                                                   "norm": {"scale": False}})
  assert [r.path for r in report.leaves if r.targeted] == ["fc1/bias"]
  assert report.targeted_sparsity == 1.0
  assert report.targeted_params == 8
  report = jaxprune.sparsity_report(params, where=lambda p: jaxprune.select(p, include="norm",
                                                                            min_ndim=1))
  assert [r.path for r in report.leaves if r.targeted] == ["norm/scale"]
  with pytest.raises(ValueError, match=r"`where` has 1 slots but params have 4"):
    jaxprune.sparsity_report(params, where={"fc1": True})


def test_after_magnitude_masks():
  rng = np.random.default_rng(0)
  params = {"fc1": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=9), jnp.float32)},
            "output_proj": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}}
  where = jaxprune.select(params)
  pruned = jaxprune.apply_masks(params, jaxprune.ranked_masks(params, 0.5, where))
  report = jaxprune.sparsity_report(pruned, where)
  rows = {r.path: r for r in report.leaves}
  assert rows["fc1/kernel"].zeros == round(0.5 * 30) == 15
  assert rows["output_proj/kernel"].zeros == 6
  assert rows["fc1/bias"].zeros == 0
  assert report.targeted_sparsity == pytest.approx(21 / 42)


def test_to_dict_is_plain_json_data():
  report = jaxprune.sparsity_report(model_params())
  d = report.to_dict()
  assert json.loads(json.dumps(d)) == d  # plain Python types only

  def plain(x):
    if isinstance(x, dict):
      return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if isinstance(x, list):
      return all(plain(v) for v in x)
    return type(x) in (int, float, str, bool)

  assert plain(d)
  assert d["targeted_params"] == 80 and d["total_params"] == 92
  assert d["targeted_sparsity"] == report.targeted_sparsity
  assert d["overall_compression"] == report.overall_compression
  assert d["targeted_dense_bytes"] == 64 * 4 + 16 * 2
  assert d["total_dense_bytes"] == 64 * 4 + 16 * 2 + 8 * 4 + 4 * 4
  assert d["targeted_dense_bytes"] / d["targeted_compressed_bytes"] == pytest.approx(
      d["targeted_compression"])
  leaf = next(r for r in d["leaves"] if r["path"] == "fc1/kernel")
  assert leaf == {"path": "fc1/kernel", "shape": [8, 8], "dtype": "float32", "size": 64,
                  "zeros": 48, "sparsity": 0.75, "targeted": True}


def test_str_is_a_readable_table():
  text = str(jaxprune.sparsity_report(model_params()))
  lines = text.splitlines()
  assert lines[0].split()[:4] == ["leaf", "shape", "size", "zeros"]
  fc1 = next(line for line in lines if line.startswith("fc1/kernel"))
  assert "8x8" in fc1 and "75.00%" in fc1 and "not targeted" not in fc1
  bias = next(line for line in lines if line.startswith("fc1/bias"))
  assert "(not targeted)" in bias and "100.00%" in bias
  assert any(line.startswith("targeted leaves: sparsity 62.50% of 80 params") for line in lines)
  assert any(line.startswith("whole model:") and "63.04%" in line for line in lines)
  # Columns line up: every row puts the shape column at the same offset.
  assert len({line.index("  ", len("output_proj/kernel")) for line in lines[1:5]}) == 1


def test_non_array_and_scalar_leaves():
  params = {"fc1": jnp.zeros((2, 2)), "count": 3, "lr": 0.0, "step": jnp.zeros((), jnp.int32)}
  report = jaxprune.sparsity_report(params)
  rows = {r.path: r for r in report.leaves}
  assert rows["fc1"].zeros == 4 and rows["fc1"].targeted
  assert rows["step"].size == 1 and rows["step"].zeros == 1 and rows["step"].dtype == "int32"
  assert rows["count"].size == 1 and not rows["count"].targeted
  assert report.targeted_params == 4


def test_nnx_state_report():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(3, 4, rngs=rngs)
      self.output_proj = nnx.Linear(4, 2, rngs=rngs)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), state))
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  report = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks))
  rows = {r.path: r for r in report.leaves}
  assert rows["fc1/kernel/value"].zeros == 6 and rows["fc1/kernel/value"].targeted
  assert rows["output_proj/kernel/value"].zeros == 4
  assert not rows["fc1/bias/value"].targeted
  assert report.targeted_sparsity == 0.5


def test_report_types():
  report = jaxprune.sparsity_report(model_params())
  assert isinstance(report, SparsityReport)
  assert all(isinstance(r, LeafSparsity) for r in report.leaves)
  row = LeafSparsity("x", (0,), "float32", 0, 0, True)
  assert row.sparsity == 0.0  # empty leaf: no division by zero
  assert SparsityReport(()).targeted_sparsity == 0.0


@settings(max_examples=30, deadline=None)
@given(
    a=hnp.arrays(np.float32, (3, 4), elements=st.sampled_from([0.0, -0.0, 1.0, -2.5])),
    b=hnp.arrays(np.float32, (5,), elements=st.sampled_from([0.0, 3.0])),
    c=hnp.arrays(np.float32, (2, 3, 2), elements=st.sampled_from([0.0, 0.5])),
    bf16=st.booleans(),
)
def test_counts_property(a, b, c, bf16):
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  params = {"fc1": jnp.asarray(a, dtype), "fc1_bias": jnp.asarray(b), "fc2": jnp.asarray(c)}
  report = jaxprune.sparsity_report(params, where={"fc1": True, "fc1_bias": False, "fc2": True})
  rows = {r.path: r for r in report.leaves}
  for name, arr in [("fc1", a), ("fc1_bias", b), ("fc2", c)]:
    assert rows[name].zeros == int((arr == 0).sum())
    assert rows[name].size == arr.size
  zt = int((a == 0).sum() + (c == 0).sum())
  assert report.targeted_sparsity == pytest.approx(zt / 24)
  assert report.overall_sparsity == pytest.approx((zt + int((b == 0).sum())) / 29)
  isz = 2 if bf16 else 4
  dense = 12 * isz + 12 * 4
  packed = (2 + (12 - int((a == 0).sum())) * isz) + (2 + (12 - int((c == 0).sum())) * 4)
  assert report.targeted_compression == pytest.approx(dense / packed)
  assert report.overall_compression == pytest.approx((dense + 20) / (packed + 20))


def test_default_report_targets_linen_auto_named_kernels():
  report = jaxprune.sparsity_report({"Dense_0": {"kernel": jnp.zeros((2, 2)),
                                                 "bias": jnp.ones(2)}})
  assert [r.path for r in report.leaves if r.targeted] == ["Dense_0/kernel"]
  assert report.targeted_sparsity == 1.0


def test_report_with_nothing_targeted_says_so():
  report = jaxprune.sparsity_report({"norm": {"scale": jnp.zeros(3)}})
  assert report.targeted_params == 0
  assert report.overall_sparsity == 1.0
  assert report.targeted_compression == 1.0  # not inf: nothing was compressed
  assert "targeted leaves: none" in str(report)
  targeted_line = next(x for x in str(report).splitlines() if x.startswith("targeted"))
  assert "inf" not in targeted_line

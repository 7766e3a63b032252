"""Issue 28, items 5 (first part) and 6.

5. A dict key holding `/` (a flat dict keyed by Keras variable paths) is matched
   as the path components it names: the default `bias`/`scale` exclusions,
   `include="kernel"`, `exclude="bias"` and `fixed=` patterns see `query/bias`.
6. `export_compressed` stores kept values at each leaf's own dtype by default, so
   a pruned bf16/f16 model exports smaller than its dense bytes, exactly as many
   bytes as `sparsity_report` counts (plus the header), and loads back bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.export import export_compressed, load_compressed


def normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def keras_flat():
  """A flat dict keyed by Keras variable paths, with stacked (rank-2) biases and
  norm scales that only their names tell apart from kernels."""
  return {
      "token_embedding/embeddings": normal(0, (64, 16)),
      "block_0/attention/query/kernel": normal(1, (16, 32)),
      "block_0/attention/query/bias": normal(2, (2, 32)),
      "block_0/attention/output/kernel": normal(3, (32, 16)),
      "block_0/layer_norm/scale": normal(4, (2, 16)),
      "block_0/ffw/kernel": normal(5, (16, 64)),
  }


def nested(flat):
  """The same leaves as nested dicts, one level per `/`."""
  out = {}
  for key, leaf in flat.items():
    *parents, name = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return out


def chosen(where):
  return sorted(p for p, s in zip(jaxprune.tree.leaf_paths(where), jax.tree.leaves(where)) if s)


KERNELS = ["block_0/attention/output/kernel", "block_0/attention/query/kernel",
           "block_0/ffw/kernel"]


# ----------------------------------------------------------------------------- item 5


def test_default_selection_excludes_bias_scale_and_embeddings_inside_keys():
  params = keras_flat()
  where = jaxprune.select(params)
  assert chosen(where) == KERNELS
  # The same as the nested dicts the keys name.
  assert chosen(where) == chosen(jaxprune.select(nested(params)))
  # Printed paths keep each key whole: the Keras path, which also matches itself.
  rows = {r.path: r.targeted for r in jaxprune.sparsity_report(params, where).leaves}
  assert rows == {p: p in KERNELS for p in params}
  assert chosen(jaxprune.select(params, include="block_0/attention/query/kernel")) == [
      "block_0/attention/query/kernel"]


def test_include_and_exclude_patterns_see_components_inside_keys():
  params = keras_flat()
  assert chosen(jaxprune.select(params, include="kernel")) == KERNELS
  assert chosen(jaxprune.select(params, include="query/*")) == [
      "block_0/attention/query/bias", "block_0/attention/query/kernel"]
  everything_but_biases = jaxprune.select(params, include="*", exclude="bias")
  assert chosen(everything_but_biases) == sorted(
      p for p in params if not p.endswith("/bias"))
  assert chosen(jaxprune.select(params, exclude="attention")) == ["block_0/ffw/kernel"]


def test_erk_fixed_pattern_on_a_slashed_key_matches_the_nested_model():
  flat = keras_flat()
  d = jaxprune.distributions.erk(fixed={"query/kernel": 0.25})
  masks = jaxprune.ranked_masks(flat, 0.5, jaxprune.select(flat), distribution=d)
  query = masks["block_0/attention/query/kernel"]
  assert int((~query).sum()) == round(0.25 * query.size)
  for p in ["block_0/attention/query/bias", "block_0/layer_norm/scale"]:
    assert masks[p] is None  # not selected, so not pruned by the ERK budget either
  twin = nested(flat)
  twin_masks = jaxprune.ranked_masks(twin, 0.5, jaxprune.select(twin), distribution=d)
  assert [None if m is None else np.asarray(m).tolist()
          for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)] == [
      None if m is None else np.asarray(m).tolist()
      for m in jax.tree.leaves(twin_masks, is_leaf=lambda x: x is None)]


# ----------------------------------------------------------------------------- item 6


def pruned_model(dtype, sparsity=0.5):
  """A 256x256 kernel of `dtype` (131,072 dense bytes in bf16: the issue's model)
  and a float32 bias, magnitude-pruned to `sparsity`."""
  params = {"fc": {"kernel": normal(6, (256, 256), dtype), "bias": normal(7, (256,))}}
  return params, jaxprune.ranked_masks(params, sparsity, jaxprune.select(params))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_export_is_smaller_than_dense_and_as_the_report_says(tmp_path, dtype):
  params, masks = pruned_model(dtype)
  info = export_compressed(tmp_path / "m", params, masks)
  report = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks))
  totals = report.to_dict()
  assert info.file_bytes < info.dense_bytes == totals["total_dense_bytes"]
  assert info.values is None
  # Exactly the report's bitmask + nonzeros at the leaf's dtype, plus the header.
  assert info.targeted_bytes == totals["targeted_compressed_bytes"] == 256 * 256 // 8 + 32768 * 2
  assert info.file_bytes - info.header_bytes == totals["total_compressed_bytes"]
  assert info.targeted_compression == pytest.approx(report.targeted_compression)  # 1.78x
  assert report.targeted_compression == pytest.approx(65536 * 2 / (8192 + 32768 * 2))
  # An explicit `values` still stores what it names: float32 is the larger file.
  f32 = export_compressed(tmp_path / "f32", params, masks, values="float32")
  assert f32.values == "float32" and f32.file_bytes > info.dense_bytes > info.file_bytes


def test_default_export_keeps_each_leaf_dtype_bitwise(tmp_path):
  params = {"bf16": normal(8, (16, 24), jnp.bfloat16), "f16": normal(9, (24, 8), jnp.float16),
            "f32": normal(10, (8, 8)), "f64": np.asarray(normal(11, (4, 4)), np.float64)}
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  export_compressed(tmp_path / "m", params, masks)
  loaded, loaded_masks = load_compressed(tmp_path / "m", with_masks=True)
  for name, w in params.items():
    # In NumPy: apply_masks would make the float64 leaf float32 (jax without x64).
    x = np.where(np.asarray(masks[name]), np.asarray(w), np.zeros((), np.asarray(w).dtype))
    got = loaded[name]
    assert got.dtype == x.dtype == np.dtype(w.dtype) and got.shape == x.shape, name
    width = f"u{got.dtype.itemsize}"
    np.testing.assert_array_equal(got.view(width), x.view(width), err_msg=name)
    np.testing.assert_array_equal(loaded_masks[name], masks[name])
  info = jaxprune.export.export_info(tmp_path / "m")
  assert info.targeted_bytes == info.analytic_targeted_bytes  # kept values at their own itemsize


def test_report_counts_python_scalars_as_the_export_stores_them(tmp_path):
  params, masks = pruned_model(jnp.bfloat16)
  params = {**params, "lr": 0.5, "step": 3}
  masks = {**masks, "lr": None, "step": None}
  info = export_compressed(tmp_path / "m", params, masks)
  totals = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks)).to_dict()
  assert info.dense_bytes == totals["total_dense_bytes"]
  assert info.file_bytes - info.header_bytes == totals["total_compressed_bytes"]

"""Row scope: every row along the ranking axis loses exactly its count, like a NumPy
per-row stable argsort; no scatter or sort on accelerators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def rows_reference(w: np.ndarray, axis: int, k: int, kept=None) -> np.ndarray:
  """Kept mask pruning the `k` smallest |w| of each row along `axis` (previous first,
  ties by position along the axis)."""
  key = np.abs(w.astype(np.float32)).astype(np.float64)
  if kept is not None:
    key = np.where(kept, key, -1.0)
  moved = np.moveaxis(key, axis, -1)
  order = np.argsort(moved, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")
  return np.moveaxis(rank >= k, -1, axis)


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(6, 5), (4, 3, 8), (1, 7), (9,)]), axis=st.integers(-3, 2),
       levels=st.sampled_from([2, 7, 1000]), fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1), with_previous=st.booleans())
def test_each_row_loses_exactly_its_count(shape, axis, levels, fraction, seed, with_previous):
  if not -len(shape) <= axis < len(shape):
    return
  rng = np.random.default_rng(seed)
  w = (rng.integers(-levels, levels, size=shape) / 4).astype(np.float32)  # ties
  kept = rng.random(shape) > 0.3 if with_previous else None
  k = round(min(fraction, 0.999) * shape[axis])
  params, where = {"w": jnp.asarray(w)}, {"w": True}
  previous = None if kept is None else {"w": jnp.asarray(kept)}
  got = jax.jit(lambda p, m: jaxprune.ranked_masks(p, min(fraction, 0.999), where, scope="row",
                                                   axis=axis, previous=m))(params, previous)
  want = rows_reference(w, axis, k, kept)
  if kept is not None:
    want = want & kept
  np.testing.assert_array_equal(np.asarray(got["w"]), want)


def test_rows_with_erk_shares_and_the_prune_target():
  k = jax.random.split(jax.random.key(0), 2)
  params = {"fc1": {"kernel": jax.random.normal(k[0], (32, 64))},
            "fc2": {"kernel": jax.random.normal(k[1], (64, 8))}}
  where = jaxprune.select(params)
  erk = jaxprune.distributions.erk()
  target = jaxprune.Prune(0.75, scope="row", distribution=erk)
  assert str(target) == "75.00% ERK row"
  masks = target.masks(params, where)
  shares = erk.sparsities(["fc1/kernel", "fc2/kernel"], [(32, 64), (64, 8)], 0.75)
  for name, s in zip(["fc1", "fc2"], shares):
    w = np.asarray(params[name]["kernel"])
    k = round(float(s) * w.shape[0])
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), rows_reference(w, 0, k))
  # Equinox layout: rows along the last axis.
  m = jaxprune.ranked_masks(params, 0.5, where, scope="row", axis=-1)
  assert set(np.asarray((~m["fc2"]["kernel"]).sum(axis=-1)).tolist()) == {4}


def test_row_scope_refuses_a_leaf_without_the_axis():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match="axis -2: b has shape"):
    jaxprune.ranked_masks(params, 0.5, {"w": True, "b": True}, scope="row")
  with pytest.raises(ValueError, match="scope must be"):
    jaxprune.ranked_masks(params, 0.5, {"w": True, "b": False}, scope="rows")


def test_row_scope_lowers_without_scatter_or_sort_for_accelerators():
  params = {"fc": {"kernel": jnp.ones((64, 32))}, "out": {"kernel": jnp.ones((32, 16))}}
  where = jaxprune.select(params)
  f = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.7, where, scope="row"))
  for platform in ("tpu", "cuda", "cpu"):
    module = jax.export.export(f, platforms=[platform])(params).mlir_module()
    assert "stablehlo.scatter" not in module and "stablehlo.sort" not in module, platform

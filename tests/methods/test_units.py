"""Blocks and channels: whole units pruned exactly in count, ranked like a NumPy sort of
the pooled scores, on the pure functions and as `Prune` targets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def _kept_units(unit_scores: np.ndarray, k: int, unit_kept=None) -> np.ndarray:
  key = unit_scores.astype(np.float64).ravel()
  if unit_kept is not None:
    key = np.where(unit_kept.ravel(), key, -1.0)
  keep = np.ones(key.size, bool)
  keep[np.argsort(key, kind="stable")[:k]] = False
  return keep.reshape(unit_scores.shape)


def blocks_reference(w, b0, b1, pool, k, kept=None):
  *lead, r, c = w.shape
  tiles = np.abs(w.astype(np.float32)).reshape(*lead, r // b0, b0, c // b1, b1)
  scores = tiles.mean(axis=(-3, -1)) if pool == "mean" else tiles.max(axis=(-3, -1))
  unit_kept = None if kept is None else kept.reshape(*lead, r // b0, b0, c // b1, b1).any(
      axis=(-3, -1))
  units = _kept_units(scores, k, unit_kept)
  out = np.repeat(np.repeat(units, b0, axis=-2), b1, axis=-1)
  return out if kept is None else out & kept


def channels_reference(w, axis, norm, k, kept=None):
  others = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
  a = np.abs(w.astype(np.float32))
  scores = a.sum(axis=others) if norm == "l1" else np.sqrt((a * a).sum(axis=others))
  unit_kept = None if kept is None else kept.any(axis=others)
  units = _kept_units(scores, k, unit_kept)
  out = np.broadcast_to(np.expand_dims(units, others), w.shape)
  return out if kept is None else out & kept


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(4, 6), (8, 4), (2, 4, 6)]), block=st.sampled_from([(2, 2), (1, 2),
                                                                                  (2, 1)]),
       pool=st.sampled_from(["mean", "max"]), fraction=st.floats(0, 0.99),
       seed=st.integers(0, 2**31 - 1), with_previous=st.booleans())
def test_blocks_prune_whole_tiles_exactly(shape, block, pool, fraction, seed, with_previous):
  rng = np.random.default_rng(seed)
  w = (rng.integers(-3, 4, size=shape) / 2).astype(np.float32)
  kept = rng.random(shape) > 0.2 if with_previous else None
  g = jaxprune.blocks(block, pool)
  units = int(np.prod(shape[:-2])) * (shape[-2] // block[0]) * (shape[-1] // block[1])
  k = round(fraction * units)
  got = jax.jit(lambda p, m: jaxprune.ranked_masks(p, fraction, {"w": True}, scope=g,
                                                   previous=m))(
      {"w": jnp.asarray(w)}, None if kept is None else {"w": jnp.asarray(kept)})
  np.testing.assert_array_equal(np.asarray(got["w"]), blocks_reference(w, *block, pool, k, kept))


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(5, 6), (3, 3, 4, 8)]), axis=st.sampled_from([-1, -2, 0]),
       norm=st.sampled_from(["l2", "l1"]), fraction=st.floats(0, 0.99),
       seed=st.integers(0, 2**31 - 1), with_previous=st.booleans())
def test_channels_prune_whole_slices_exactly(shape, axis, norm, fraction, seed, with_previous):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  kept = rng.random(shape) > 0.1 if with_previous else None
  k = round(fraction * shape[axis])
  got = jaxprune.ranked_masks({"w": jnp.asarray(w)}, fraction, {"w": True},
                              scope=jaxprune.channels(axis, norm),
                              previous=None if kept is None else {"w": jnp.asarray(kept)})
  np.testing.assert_allclose(np.asarray(got["w"]), channels_reference(w, axis, norm, k, kept))


def test_units_as_targets_with_erk_and_refusals():
  k = jax.random.split(jax.random.key(1), 2)
  params = {"fc1": {"kernel": jax.random.normal(k[0], (16, 32))},
            "fc2": {"kernel": jax.random.normal(k[1], (32, 8))}}
  where = jaxprune.select(params)
  target = jaxprune.Prune(0.5, scope=jaxprune.channels(), distribution=jaxprune.distributions.erk())
  tx = jaxprune.pruned(optax.sgd(0.0), jaxprune.ranked_masks(params, 0.0, where))
  _, opt_state = jax.jit(lambda p, o, t: jaxprune.prune_step(p, o, t, where))(
      params, tx.init(params), target)
  got = jaxprune.get_masks(opt_state)
  shares = jaxprune.distributions.erk().sparsities(["fc1/kernel", "fc2/kernel"],
                                                   [(16, 32), (32, 8)], 0.5)
  for name, s in zip(("fc1", "fc2"), shares):
    m = np.asarray(got[name]["kernel"])
    columns = m.all(axis=0)
    assert (m == columns[None]).all()  # whole output channels
    assert int((~columns).sum()) == round(float(s) * m.shape[1])
  with pytest.raises(ValueError, match="fc2/kernel has shape"):
    jaxprune.ranked_masks(params, 0.5, where, scope=jaxprune.blocks((4, 16)))
  with pytest.raises(ValueError, match="block shape"):
    jaxprune.blocks((2,))
  with pytest.raises(ValueError, match="norm"):
    jaxprune.channels(norm="l3")


def test_units_lower_without_scatter_or_sort_for_accelerators():
  params = {"fc": {"kernel": jnp.ones((64, 32))}}
  where = jaxprune.select(params)
  for g in (jaxprune.blocks((4, 4)), jaxprune.channels()):
    f = jax.jit(lambda p, g=g: jaxprune.ranked_masks(p, 0.5, where, scope=g))
    for platform in ("tpu", "cuda"):
      module = jax.export.export(f, platforms=[platform])(params).mlir_module()
      assert "stablehlo.scatter" not in module and "stablehlo.sort" not in module, platform

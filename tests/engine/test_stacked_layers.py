"""Stacked (scanned) layers and MoE experts: each slice along the leading axes is a
layer of its own for layer scope, distributions, units and reports."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_references import exact_count

import jaxprune


def smallest_reference(w: np.ndarray, k: int, kept=None) -> np.ndarray:
  """Kept mask pruning the `k` smallest |w| of `w` (previous first, ties by position)."""
  key = np.abs(w.astype(np.float32)).astype(np.float64).reshape(-1)
  if kept is not None:
    key = np.where(kept.reshape(-1), key, -1.0)
  rank = np.argsort(np.argsort(key, kind="stable"), kind="stable")
  return (rank >= k).reshape(w.shape)


@settings(max_examples=30, deadline=None)
@given(lead=st.sampled_from([(1,), (3,), (2, 2)]), layer=st.sampled_from([(4, 3), (5,), (2, 2, 2)]),
       levels=st.sampled_from([2, 1000]), sparsity=st.floats(0, 0.99),
       seed=st.integers(0, 2**31 - 1), with_previous=st.booleans())
def test_each_stacked_layer_loses_exactly_its_count(lead, layer, levels, sparsity, seed,
                                                    with_previous):
  rng = np.random.default_rng(seed)
  shape = lead + layer
  w = (rng.integers(-levels, levels, size=shape) / 4).astype(np.float32)  # ties
  kept = rng.random(shape) > 0.3 if with_previous else None
  params, where = {"stack": jnp.asarray(w)}, {"stack": True}
  previous = None if kept is None else {"stack": jnp.asarray(kept)}
  got = jax.jit(lambda p, m, s: jaxprune.ranked_masks(
      p, s, where, previous=m, stacked={"stack": len(lead)}))(params, previous, sparsity)
  n = int(np.prod(layer))
  flat_w, got_w = w.reshape(-1, *layer), np.asarray(got["stack"]).reshape(-1, *layer)
  for i in range(flat_w.shape[0]):
    k = exact_count(sparsity, n)
    prev_i = None if kept is None else kept.reshape(-1, *layer)[i]
    want = smallest_reference(flat_w[i], k, prev_i)
    np.testing.assert_array_equal(got_w[i], want if prev_i is None else want & prev_i,
                                  err_msg=f"slice {i}")


def _split_model(seed: int = 0):
  """A stacked model and the same weights as separate leaves."""
  k = jax.random.split(jax.random.key(seed), 2)
  scale = jnp.array([1.0, 3.0, 0.2, 1.5])[:, None, None]  # layers of unequal magnitude
  stack = jax.random.normal(k[0], (4, 16, 8)) * scale
  head = jax.random.normal(k[1], (8, 2))
  stacked = {"blocks": {"kernel": stack}, "head": {"kernel": head}}
  split = {**{f"b{i}": {"kernel": stack[i]} for i in range(4)}, "head": {"kernel": head}}
  return stacked, split


def _as_split(masks) -> dict:
  out = {f"b{i}": {"kernel": masks["blocks"]["kernel"][i]} for i in range(4)}
  return {**out, "head": {"kernel": masks["head"]["kernel"]}}


@pytest.mark.parametrize("target", [
    jaxprune.Prune(0.7),
    jaxprune.Prune(0.7, distribution=jaxprune.distributions.erk()),
    jaxprune.Prune(0.7, distribution=jaxprune.distributions.erk(kernel=False)),
    jaxprune.Prune(0.5, scope=jaxprune.channels(-1)),
    jaxprune.Prune(0.5, scope=jaxprune.blocks((4, 2), pool="max")),
    jaxprune.Prune(0.6, scope="row"),
    jaxprune.Prune(0.6, scope="global"),
], ids=str)
def test_stacked_slices_rank_as_the_same_weights_in_separate_leaves(target):
  stacked, split = _split_model()
  got = dataclasses.replace(target, stacked={"blocks/kernel": 1}).masks(
      stacked, jaxprune.select(stacked))
  want = target.masks(split, jaxprune.select(split))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               _as_split(got), want)


def test_without_stacking_a_stacked_leaf_is_one_layer():
  stacked, _ = _split_model()
  whole = jaxprune.ranked_masks(stacked, 0.7, jaxprune.select(stacked))
  kept = [int(m.sum()) for m in whole["blocks"]["kernel"]]
  assert sum(kept) == 512 - round(0.7 * 512) and len(set(kept)) > 1  # uneven per layer


def test_moe_experts_keep_per_expert_per_output_row():
  # MoE kernels (E, in, out): rows of each expert, each expert its own ERK layer.
  k = jax.random.split(jax.random.key(3), 2)
  params = {"moe": {"experts": jax.random.normal(k[0], (4, 16, 8))},
            "dense": {"kernel": jax.random.normal(k[1], (16, 64))}}
  target = jaxprune.Prune(0.75, scope="row", distribution=jaxprune.distributions.erk(),
                          stacked={"experts": 1})
  masks = target.masks(params, jaxprune.select(params))
  shares = jaxprune.distributions.erk().sparsities(["e"] * 4 + ["d"], [(16, 8)] * 4 + [(16, 64)],
                                                   0.75)
  pruned_per_row = (~masks["moe"]["experts"]).sum(axis=1)          # (E, out)
  assert (pruned_per_row == round(float(shares[0]) * 16)).all()
  assert ((~masks["dense"]["kernel"]).sum(axis=0) == round(float(shares[4]) * 16)).all()


def test_report_shows_each_stacked_layer():
  stacked, _ = _split_model()
  where = jaxprune.select(stacked)
  masks = jaxprune.ranked_masks(stacked, 0.5, where, stacked={"blocks/kernel": 1})
  report = jaxprune.sparsity_report(jaxprune.apply_masks(stacked, masks), where,
                                    stacked={"blocks/kernel": 1})
  rows = {r.path: r for r in report.leaves}
  assert [f"blocks/kernel[{i}]" for i in range(4)] == [p for p in rows if "[" in p]
  assert all(rows[f"blocks/kernel[{i}]"].shape == (16, 8) for i in range(4))
  assert all(rows[f"blocks/kernel[{i}]"].zeros == 64 for i in range(4))
  assert report.targeted_params == 4 * 128 + 16
  assert "blocks/kernel[3]" in str(report)
  plain = jaxprune.sparsity_report(jaxprune.apply_masks(stacked, masks), where)
  assert plain.targeted_sparsity == report.targeted_sparsity


def test_stacked_in_gradual_pruned_and_under_jit_compiles_once():
  stacked, _ = _split_model()
  where = jaxprune.select(stacked)
  schedule = optax.polynomial_schedule(init_value=0.0, end_value=0.8, power=3, transition_steps=4)
  tx = jaxprune.gradually_pruned(optax.sgd(0.0), where=where, update_every=2,
                                 schedule=lambda c: jaxprune.Prune(schedule(c),
                                                         stacked={"blocks/kernel": 1}))
  state = tx.init(stacked)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.zeros_like, stacked)
  for _ in range(6):
    _, state = step(grads, state, stacked)
  assert step._cache_size() == 1
  kernel = jaxprune.get_masks(state)["blocks"]["kernel"]
  assert [int((~m).sum()) for m in kernel] == [round(0.8 * 128)] * 4


def test_bad_stacked_specs_are_refused_by_name():
  stacked, _ = _split_model()
  where = jaxprune.select(stacked)
  with pytest.raises(ValueError, match="'block/kernel' matches no selected leaf"):
    jaxprune.ranked_masks(stacked, 0.5, where, stacked={"block/kernel": 1})
  with pytest.raises(ValueError, match="blocks/kernel has shape \\(4, 16, 8\\); 3 stacked"):
    jaxprune.ranked_masks(stacked, 0.5, where, stacked={"blocks/kernel": 3})
  with pytest.raises(ValueError, match="leading axes >= 1, got 0"):
    jaxprune.Prune(0.5, stacked={"blocks/kernel": 0})
  with pytest.raises(ValueError, match="must map path patterns"):
    jaxprune.ranked_masks(stacked, 0.5, where, stacked=1)
  with pytest.raises(ValueError, match="scope='row' ranks along axis 2: blocks/kernel "
                                       "\\(stacked layers of\\) has shape \\(16, 8\\)"):
    jaxprune.ranked_masks(stacked, 0.5, where, scope="row", axis=2,
                          stacked={"blocks/kernel": 1})


def _linen_scanned():
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(8)(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
      h, _ = scanned(name="blocks")(x, None)
      return nn.Dense(2, name="head")(h)

  net = Net()
  x = jnp.ones((4, 8))
  return net.init(jax.random.key(0), x), lambda p: net.apply(p, x)


def _nnx_scanned():
  from zoo.models import X_FIXED, build_nnx_scan
  model = build_nnx_scan()
  return model.params, lambda p: model.apply(p, X_FIXED)


@pytest.mark.parametrize("build", [_linen_scanned, _nnx_scanned], ids=["linen_scan", "nnx_scan"])
def test_scanned_models_prune_each_layer_exactly(build):
  params, apply = build()
  where = jaxprune.select(params, include=["kernel"])
  target = jaxprune.Prune(0.75, distribution=jaxprune.distributions.erk(),
                          stacked={"blocks/*kernel": 1})
  masks = jax.jit(lambda p: target.masks(p, where))(params)
  pruned_params = jaxprune.apply_masks(params, masks)
  report = jaxprune.sparsity_report(pruned_params, where, stacked={"blocks/*kernel": 1})
  layers = [r for r in report.leaves if "[" in r.path]
  assert len(layers) == 3 and all(r.shape == (8, 8) for r in layers)
  zeros = [r.zeros for r in layers]
  assert max(zeros) - min(zeros) <= 1      # equal shapes: equal ERK shares, to the rounding
  assert report.targeted_params - sum(r.size - r.zeros for r in report.leaves if r.targeted) \
      == round(0.75 * report.targeted_params)                 # the total is exact
  assert np.isfinite(np.asarray(apply(pruned_params))).all()  # the model still runs

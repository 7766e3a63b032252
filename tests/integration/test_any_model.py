"""Regression tests for models the project did not write (issue "any JAX model").

Each test reproduces one reported failure: Equinox modules as `where` trees, `None`
leaves, jit with closed-over params, traced out-of-range sparsities, distillation
without `rng`, resuming with another optimizer, inputs that were silently accepted,
and the friction of the defaults. The model zoo (tests/integration/zoo) runs every public
function on every framework; these pin the individual cases.
"""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def eqx_params():
  model = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))
  return eqx.filter(model, eqx.is_array)


def pruned_counts(masks):
  return [int((~m).sum()) for m in jax.tree.leaves(masks)]


# ----------------------------------------------------------------------------- 1. Equinox


def test_equinox_selection_tree_is_not_called_as_a_builder():
  params = eqx_params()
  where = jaxprune.select(params, include="weight")
  assert callable(where)  # an eqx.Module: callable *and* a pytree
  masks = jaxprune.ranked_masks(params, 0.5, where)
  assert isinstance(masks, eqx.nn.MLP)
  weights = [layer.weight for layer in params.layers]
  assert pruned_counts(masks) == [w.size // 2 for w in weights]
  assert all(layer.bias is None for layer in masks.layers)
  nm = jaxprune.nm_masks(params, 2, 4, where, axis=-1)
  assert jaxprune.is_nm_sparse(nm, 2, 4, axis=-1)


def test_equinox_gradual_pruned_with_a_where_builder():
  params = eqx_params()
  tx = jaxprune.gradually_pruned(optax.adam(1e-2), update_every=1,
                                 where=lambda p: jaxprune.select(p, include="weight"),
                                 schedule=optax.constant_schedule(0.5))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = eqx.apply_updates(params, updates)
  for layer, mask in zip(new.layers, jaxprune.get_masks(state).layers):
    assert int((layer.weight == 0).sum()) == layer.weight.size // 2
    np.testing.assert_array_equal(layer.weight == 0, ~mask.weight)


# ----------------------------------------------------------------------------- 2. None leaves


def test_previous_on_a_tree_with_none_leaves():
  params = {"a": None, "fc": {"kernel": jax.random.normal(jax.random.key(1), (8, 8))},
            "z": None, "out": {"kernel": jax.random.normal(jax.random.key(2), (8, 4))}}
  where = jaxprune.select(params)
  first = jaxprune.ranked_masks(params, 0.5, where)
  second = jaxprune.ranked_masks(params, 0.75, where, previous=first)
  assert first["a"] is None and second["z"] is None
  assert pruned_counts(second) == [48, 24]  # fc (8x8), out (8x4), in key order
  for m1, m2 in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert not bool((m2 & ~m1).any())  # nothing revived


def test_gradual_pruned_on_a_tree_with_none_leaves():
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4), "skip": None}
  tx = jaxprune.gradually_pruned(optax.sgd(0.0), where=jaxprune.select(params),
                                 schedule=optax.constant_schedule(0.25), update_every=1)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.zeros((4, 4)), "skip": None}, state, params)
  new = optax.apply_updates(params, updates)
  assert new["skip"] is None
  np.testing.assert_array_equal(np.asarray(new["w"]).reshape(-1)[:4], 0.0)
  assert int((new["w"] == 0).sum()) == 4


def test_where_selecting_a_none_leaf_is_an_error():
  params = {"w": jnp.ones((2, 2)), "b": None}
  with pytest.raises(ValueError, match="selects b, which is None"):
    jaxprune.ranked_masks(params, 0.5, {"w": True, "b": True})


# ----------------------------------------------------------------------------- 3-4. jit


def test_jit_with_params_closed_over():
  q = {"fc": {"kernel": jnp.arange(16.0).reshape(4, 4)}}
  masks = jax.jit(lambda s: jaxprune.ranked_masks(q, s, jaxprune.select(q)))(0.5)
  np.testing.assert_array_equal(masks["fc"]["kernel"].reshape(-1), np.arange(16) >= 8)
  thr = jax.jit(lambda t: jaxprune.threshold_masks(q, t, jaxprune.select(q)))(3.0)
  np.testing.assert_array_equal(thr["fc"]["kernel"].reshape(-1), np.arange(16) >= 3)


@pytest.mark.parametrize("sparsity, pruned", [(1.5, 1.0), (1.0, 1.0), (-0.5, 0.0),
                                              (float("nan"), 0.0), (float("inf"), 1.0)])
def test_traced_sparsity_out_of_range_is_read_the_same_for_every_leaf(sparsity, pruned):
  params = {"a": jax.random.normal(jax.random.key(0), (16, 20)),
            "b": jax.random.normal(jax.random.key(1), (3, 7))}
  where = jaxprune.select(params)
  for scope in ("layer", "global"):
    masks = jax.jit(lambda p, s, scope=scope: jaxprune.ranked_masks(p, s, where, scope=scope))(
        params, jnp.float32(sparsity))
    assert pruned_counts(masks) == [round(pruned * 320), round(pruned * 21)]


def test_traced_nan_sparsity_keeps_previous_masks():
  params = {"a": jax.random.normal(jax.random.key(0), (16, 20))}
  where = jaxprune.select(params)
  first = jaxprune.ranked_masks(params, 0.3, where)
  again = jax.jit(lambda p, s, m: jaxprune.ranked_masks(p, s, where, previous=m))(
      params, jnp.float32(jnp.nan), first)
  np.testing.assert_array_equal(again["a"], first["a"])


# ----------------------------------------------------------------------------- 5-6. the loop


def _loop_setup():
  params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (8, 8)) * 0.3},
            "out": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)) * 0.3}}
  x = jax.random.normal(jax.random.key(2), (16, 8))
  y = jax.random.randint(jax.random.key(3), (16,), 0, 4)

  def apply(p, batch):
    h = jnp.tanh(batch[0] @ p["fc1"]["kernel"])
    return h @ p["out"]["kernel"]

  return params, apply, (x, y)


def test_distillation_hands_rng_to_a_loss_that_requires_it():
  params, apply, batch = _loop_setup()
  seen = []

  def loss_fn(p, b, rng):  # `rng` is required: dropout on the hidden layer
    seen.append(rng is not None)
    h = jnp.tanh(b[0] @ p["fc1"]["kernel"])
    if rng is not None:
      h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    logits = h @ p["out"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  distilled = jaxprune.distillation_loss(loss_fn, apply, weight=0.5, temperature=2.0)
  taught = jaxprune.training.with_teacher_logits(lambda step: batch, apply, params)
  result = jaxprune.prune_retrain(
      params, distilled, taught, [batch], optimizer=optax.adam(1e-3),
      targets=[0.5], where=jaxprune.select(params), retrain_steps=3, hooks=[])
  assert np.isfinite(result.final_loss)
  assert True in seen  # the training trace got a key
  assert False in seen  # evaluation ran without one


def test_resume_with_another_optimizer_names_the_optimizer_state(tmp_path):
  params, apply, batch = _loop_setup()

  def loss_fn(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, b), b[1]).mean()

  common = dict(targets=[0.5], where=jaxprune.select(params), retrain_steps=2,
                checkpointer=jaxprune.Checkpointer(str(tmp_path)), hooks=[])
  jaxprune.prune_retrain(params, loss_fn, lambda s: batch, [batch], optimizer=optax.adam(1e-3),
                         **common)
  with pytest.raises(ValueError, match=r"another configuration: the optimizer state is "
                                       r'"PrunedState/ScaleByAdamState.*" there and '
                                       r'"PrunedState.*Trace.*" now'):
    jaxprune.prune_retrain(params, loss_fn, lambda s: batch, [batch],
                           optimizer=optax.sgd(1e-3, momentum=0.9), **common)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(targets=[0.8, 0.5]), ValueError, r"must not decrease: targets\[1\] = 0.5"),
    (dict(targets=["0.5"]), ValueError, r"targets\[0\] = '0.5' is neither"),
    (dict(targets=[True]), ValueError, r"targets\[0\] = True is neither"),
    (dict(retrain_steps=2.5), TypeError, r"retrain_steps must be an int or a sequence.*2.5"),
    (dict(retrain_steps=[2.5]), ValueError, r"retrain_steps\[0\] = 2.5"),
    (dict(retrain_steps=True), TypeError, r"retrain_steps must be an int"),
])
def test_loop_refuses_bad_inputs_before_any_compute(overrides, error, message):
  params, apply, batch = _loop_setup()
  calls = []

  def loss_fn(p, b):
    calls.append(1)
    return jnp.mean(apply(p, b) ** 2)

  kwargs = dict(optimizer=optax.adam(1e-3), targets=[0.5], where=jaxprune.select(params),
                retrain_steps=2, hooks=[])
  kwargs.update(overrides)
  with pytest.raises(error, match=message):
    jaxprune.prune_retrain(params, loss_fn, lambda s: batch, [batch], **kwargs)
  assert not calls


# ----------------------------------------------------------------------------- 7. silently accepted


@pytest.mark.parametrize("sparsity, error", [("0.5", TypeError), (True, TypeError),
                                             (None, TypeError), (1.0, ValueError),
                                             (float("nan"), ValueError)])
def test_bad_concrete_sparsity_is_refused(sparsity, error):
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(error, match=r"sparsity must be"):
    jaxprune.ranked_masks(params, sparsity, {"w": True})


def test_where_true_on_an_int_leaf_is_refused():
  params = {"w": jnp.ones((4, 4)), "step": jnp.zeros((2, 2), jnp.int32)}
  for fn in (lambda: jaxprune.ranked_masks(params, 0.5, {"w": True, "step": True}),
             lambda: jaxprune.threshold_masks(params, 0.5, {"w": True, "step": True}),
             lambda: jaxprune.nm_masks(params, 2, 4, {"w": True, "step": True})):
    with pytest.raises(ValueError, match="selects step, a int32 leaf"):
      fn()


def test_all_false_where_is_refused():
  params = {"w": jnp.ones((4, 4))}
  nothing = {"w": False}
  for fn in (lambda: jaxprune.ranked_masks(params, 0.5, nothing),
             lambda: jaxprune.threshold_masks(params, 0.5, nothing),
             lambda: jaxprune.nm_masks(params, 2, 4, nothing),
             lambda: jaxprune.gradually_pruned(
                 optax.adam(1e-3), where=nothing, schedule=optax.constant_schedule(0.5),
                 update_every=1).init(params)):
    with pytest.raises(ValueError, match="selects no leaf"):
      fn()
  with pytest.raises(ValueError, match="holds no mask"):
    jaxprune.pruned(optax.adam(1e-3), {"w": None})


@pytest.mark.parametrize("schedule, error, message", [
    (0.5, TypeError, r"schedule must be a function.*constant_schedule\(0.5\)"),
    (lambda count: 1.5, ValueError, r"schedule\(0\) must be a scalar sparsity in \[0, 1\)"),
    (lambda count: jnp.ones(2), ValueError, r"schedule\(0\) must be a scalar"),
])
def test_pruned_checks_its_schedule_when_called(schedule, error, message):
  with pytest.raises(error, match=message):
    jaxprune.gradually_pruned(optax.adam(1e-3), where=lambda p: jaxprune.select(p),
                              schedule=schedule, update_every=1)


def test_update_every_must_be_a_positive_int():
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="update_every must be an integer"):
      jaxprune.gradually_pruned(optax.adam(1e-3), where=lambda p: p,
                                schedule=optax.constant_schedule(0.5), update_every=bad)


def test_threshold_and_magnitude_agree_on_nan_weights():
  params = {"w": jnp.array([[jnp.nan, 1.0], [0.5, 2.0]])}
  where = {"w": True}
  for fn in (lambda: jaxprune.threshold_masks(params, 0.0, where),
             lambda: jaxprune.ranked_masks(params, 0.5, where)):
    with pytest.raises(ValueError, match="w contains NaN or inf"):
      fn()
  # Under jit neither can raise: NaN counts as the largest magnitude, kept by both.
  thr = jax.jit(lambda p: jaxprune.threshold_masks(p, 0.0, where))(params)["w"]
  mag = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.25, where))(params)["w"]
  assert bool(thr[0, 0]) and bool(mag[0, 0])
  assert not bool(mag[1, 0])


def test_bad_threshold_is_refused():
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(TypeError, match="threshold must be a real number"):
    jaxprune.threshold_masks(params, "0.1", {"w": True})
  with pytest.raises(ValueError, match="threshold must be a number"):
    jaxprune.threshold_masks(params, float("nan"), {"w": True})


# ----------------------------------------------------------------------------- 8. friction


class Block(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def test_default_selection_matches_linen_equinox_and_namedtuples():
  linen = {"params": {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                      "Embed_0": {"embedding": jnp.ones((10, 4))}}}
  where = jaxprune.select(linen)["params"]
  assert where == {"Dense_0": {"kernel": True, "bias": False}, "Embed_0": {"embedding": False}}
  eqx_where = jaxprune.select(eqx_params())
  assert [layer.weight for layer in eqx_where.layers] == [True, True, True]
  tup = jaxprune.select([Block(jnp.ones((2, 2)), jnp.ones(2)), None])
  assert tup == [Block(True, False), None]


@pytest.mark.parametrize("pattern, expected", [
    ("Dense_0/kernel", ["params/Dense_0/kernel"]),
    ("params/Dense_0/kernel", ["params/Dense_0/kernel"]),
    ("*/fc1/kernel", ["params/blocks/0/fc1/kernel", "params/blocks/1/fc1/kernel"]),
    ("blocks/1/*", ["params/blocks/1/fc1/kernel", "params/blocks/1/fc2/kernel"]),
    ("0/fc2/kernel", ["params/blocks/0/fc2/kernel"]),
    ("ense_0/kernel", []),  # whole components only
])
def test_patterns_with_a_slash_match_trailing_whole_components(pattern, expected):
  params = {"params": {
      "Dense_0": {"kernel": jnp.ones((2, 2))},
      "blocks": [{"fc1": {"kernel": jnp.ones((2, 2))}, "fc2": {"kernel": jnp.ones((2, 2))}}
                 for _ in range(2)]}}
  if not expected:
    with pytest.raises(ValueError, match="no leaf matched"):
      jaxprune.select(params, include=pattern)
    return
  where = jaxprune.select(params, include=pattern)
  chosen = [p for p, s in zip(jaxprune.tree.leaf_paths(params), jax.tree.leaves(where)) if s]
  assert chosen == expected


def test_slash_patterns_ignore_the_nnx_value_suffix_and_work_in_exclude():
  state = {"fc1": {"kernel": {"value": jnp.ones((2, 2))}},
           "fc2": {"kernel": {"value": jnp.ones((2, 2))}}}
  where = jaxprune.select(state, include="fc1/kernel")
  assert where == {"fc1": {"kernel": {"value": True}}, "fc2": {"kernel": {"value": False}}}
  where = jaxprune.select(state, exclude="fc1/kernel")
  assert where == {"fc1": {"kernel": {"value": False}}, "fc2": {"kernel": {"value": True}}}


def test_load_compressed_like_restores_the_structure_and_order(tmp_path):
  params = eqx_params()
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  pruned = jaxprune.apply_masks(params, masks)
  path = tmp_path / "m.jxp"
  jaxprune.export.export_compressed(path, pruned, masks)
  loaded, loaded_masks = jaxprune.export.load_compressed(path, like=params, with_masks=True)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(pruned)):
    assert isinstance(a, jax.Array)
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(loaded_masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(a, b)


def test_load_compressed_like_names_mismatches(tmp_path):
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
  path = tmp_path / "m.jxp"
  jaxprune.export.export_compressed(path, params)
  with pytest.raises(ValueError, match=r"c of `like` is not in"):
    jaxprune.export.load_compressed(path, like={"a": params["a"], "b": params["b"],
                                                "c": params["b"]})
  with pytest.raises(ValueError, match=r"holds b, which `like` lacks"):
    jaxprune.export.load_compressed(path, like={"a": params["a"]})
  with pytest.raises(ValueError, match=r"b is float32\[3\] in .* but float32\[4\] in `like`"):
    jaxprune.export.load_compressed(path, like={"a": params["a"], "b": jnp.ones(4)})


def test_the_library_runs_without_flax_or_equinox_installed():
  code = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('flax', 'equinox', 'tqdm'):\n"
      "      raise ImportError('blocked: ' + name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "import jax.numpy as jnp, jaxprune\n"
      "p = {'w': jnp.arange(8.0).reshape(2, 4)}\n"
      "m = jaxprune.ranked_masks(p, 0.5, jaxprune.select(p))\n"
      "assert int(m['w'].sum()) == 4\n"
      "assert not any(k.split('.')[0] in ('flax', 'equinox') for k in sys.modules)\n"
      "print('ok')\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bool_leaves_in_params_pass_through_masking():
  params = {"w": jnp.arange(16.0).reshape(4, 4), "flag": jnp.array([True, False])}
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  pruned = jaxprune.apply_masks(params, masks)
  np.testing.assert_array_equal(pruned["flag"], params["flag"])
  again = jaxprune.ranked_masks(params, 0.75, jaxprune.select(params), previous=masks)
  assert int((~again["w"]).sum()) == 12


def test_load_compressed_like_shape_dtype_structs_and_non_arrays(tmp_path):
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
  path = tmp_path / "m.jxp"
  jaxprune.export.export_compressed(path, params)
  loaded = jaxprune.export.load_compressed(path, like=jax.eval_shape(lambda: params))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
  with pytest.raises(ValueError, match=r"b of `like` is 3, not an array"):
    jaxprune.export.load_compressed(path, like={"a": params["a"], "b": 3})

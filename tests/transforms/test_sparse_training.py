"""Sparse training from the start: drop and grow (SET, RigL) in `pruned`, the
straight-through estimator (`straight_through`), and `train`.

Expectations ported from JaxPruner's `sparse_trainers_test.py` and `ste_test.py`
(same inputs, same kept sets or counts) where the semantics agree; the rest
against a NumPy stable-argsort reference of the drop-and-grow rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune

# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("drop_fraction, expected", [
    (0.0, [0, 1, 0, 1, 0, 1, 1, 0]),
    (0.25, [1, 1, 0, 1, 0, 1, 0, 0]),
    (0.5, [1, 1, 0, 0, 1, 1, 0, 0]),
    (0.75, [1, 0, 1, 0, 1, 1, 0, 0]),
    (1.0, [1, 0, 1, 0, 1, 1, 0, 0]),
])
def test_drop_and_grow_matches_jaxpruner_rigl_update_mask(drop_fraction, expected):
  # JaxPruner's testRigLUpdateMask drops by the signed value and grows by |w|.
  w = jnp.array([-9, 1, 4, -1, 5, 8, -2, 3], jnp.float32)
  old = jnp.array([0, 1, 0, 1, 0, 1, 1, 0], bool)
  target = jaxprune.sparse_training.DropAndGrow(drop_fraction,
                                                jaxprune.scores.given_score({"w": jnp.abs(w)}),
                                drop=jaxprune.scores.given_score({"w": w}))
  got = target.masks({"w": w}, {"w": True}, previous={"w": old})["w"]
  np.testing.assert_array_equal(np.asarray(got), np.array(expected, bool))


def drop_and_grow_reference(w, kept, grow, drop_fraction):
  """The rule with stable argsorts: drop the n smallest |w| among the kept (ties by
  position), then keep the n largest grow scores outside what is left (ties: the
  lower position is pruned first)."""
  flat_w, flat_kept, flat_grow = (np.asarray(a).reshape(-1) for a in (w, kept, grow))
  k = int(flat_kept.sum())
  n = int(np.clip(np.round(np.float32(drop_fraction) * np.float32(k)), 0, k))
  drop_key = np.where(flat_kept, np.abs(flat_w).astype(np.float64), -1.0)
  order = np.argsort(drop_key, kind="stable")
  after_drop = flat_kept.copy()
  after_drop[order[flat_w.size - k: flat_w.size - k + n]] = False
  grow_key = np.where(after_drop, np.inf, flat_grow.astype(np.float64))
  pruned = np.argsort(grow_key, kind="stable")[: flat_w.size - k]
  new = np.ones(flat_w.size, bool)
  new[pruned] = False
  return new.reshape(np.shape(w))


# The target is an argument (its drop fraction and scores traced): one compilation per shape.
_moved = jax.jit(lambda target, p, m: target.masks(p, {"w": True}, previous=m))


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([(1,), (5,), (4, 5), (2, 9, 1), (2, 2, 4, 4), (16, 8)]),
       density=st.floats(0, 1), drop_fraction=st.floats(0, 1), levels=st.sampled_from([3, 1000]),
       seed=st.integers(0, 2**31 - 1))
def test_drop_and_grow_against_the_numpy_reference(shape, density, drop_fraction, levels, seed):
  rng = np.random.default_rng(seed)
  w = (rng.integers(-levels, levels, size=shape) / 4).astype(np.float32)  # ties
  grow = (rng.integers(0, levels, size=shape) / 4).astype(np.float32)
  kept = rng.random(shape) < density
  regrow = jaxprune.scores.given_score({"w": jnp.asarray(grow)})
  target = jaxprune.sparse_training.DropAndGrow(drop_fraction, regrow)
  got = _moved(target, {"w": jnp.asarray(w)}, {"w": jnp.asarray(kept)})["w"]
  np.testing.assert_array_equal(np.asarray(got), drop_and_grow_reference(w, kept, grow,
                                                                         drop_fraction))
  assert int(np.asarray(got).sum()) == int(kept.sum())


def test_a_traced_drop_fraction_is_clipped_to_zero_and_one():
  w = jnp.arange(1.0, 9.0)
  old = {"w": w > 4}
  for fraction, moved in ((-0.5, 0), (2.0, 4)):
    # Built under jit: a concrete fraction out of [0, 1] is refused (tests/faults).
    regrow = jaxprune.scores.given_score({"w": -w})
    got = jax.jit(lambda d, regrow=regrow: jaxprune.sparse_training.DropAndGrow(d, regrow).masks(
        {"w": w}, {"w": True}, previous=old))(jnp.float32(fraction))["w"]
    assert int((got & ~old["w"]).sum()) == moved and int(got.sum()) == 4


# ----------------------------------------------------------------------------- in `pruned`


def mlp_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"fc1": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
          "fc2": {"kernel": jax.random.normal(k2, (8, 4))}}


def mlp_loss(p, x):
  h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return jnp.mean((h @ p["fc2"]["kernel"] - 1.0) ** 2)


def batch(i):
  return jax.random.normal(jax.random.key(100 + i), (32, 16))


def make_step(tx, loss=mlp_loss):
  @jax.jit
  def step(p, state, x):
    updates, state = tx.update(jax.grad(loss)(p, x), state, p)
    return optax.apply_updates(p, updates), state
  return step


def kernels(masks):
  return {k: v["kernel"] for k, v in masks.items()}


@pytest.mark.parametrize("schedule", [jaxprune.sparse_training.set_schedule(0.3, seed=1),
                                      jaxprune.sparse_training.rigl_schedule(0.5, end=30)],
                         ids=["set", "rigl"])
def test_drop_and_grow_training_keeps_counts_zeros_and_compiles_once(schedule):
  params = mlp_params()
  where = jaxprune.select(params)
  start = jaxprune.ranked_masks(params, 0.75, where, score=jaxprune.scores.random_score(0),
                                distribution=jaxprune.distributions.erk())
  tx = jaxprune.sparse_training.drop_and_grow(optax.adamw(1e-2, weight_decay=0.1), start,
                                              schedule=schedule, update_every=3)
  step, state, p = None, tx.init(params), params
  step = make_step(tx)
  before = kernels(start)
  moved_on = []
  for i in range(12):
    p, state = step(p, state, batch(i))
    now = kernels(jaxprune.get_masks(state))
    for path in before:
      assert int(now[path].sum()) == int(before[path].sum()), (i, path)   # exact count
      w = p[path]["kernel"]
      assert bool((w[~now[path]] == 0).all()), (i, path)                   # pruned at 0
      grown = now[path] & ~before[path]
      assert bool((w[grown] == 0).all()), (i, path)                        # grown from 0
      if bool(grown.any()):
        moved_on.append(i)
    before = now
  assert set(moved_on) <= {0, 3, 6, 9} and {3, 6} <= set(moved_on)  # only on update steps
  assert step._cache_size() == 1


@pytest.mark.parametrize("inner, names", [(optax.adam(1e-3), ("mu", "nu")),
                                          (optax.sgd(1e-3, momentum=0.9), ("trace",))],
                         ids=["adam", "momentum"])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 9, 1), (2, 2, 4, 4)])
def test_grown_weights_restart_their_moments(inner, names, shape):
  # JaxPruner's testDynamicSparseUpdateStateInnerReset: moments set to ones, then
  # one drop-and-grow update: the new connections' moments are 0, the others not.
  params = {"w": jax.random.normal(jax.random.key(0), shape)}
  start = jaxprune.ranked_masks(params, 0.5, {"w": True}, score=jaxprune.scores.random_score(3))
  tx = jaxprune.sparse_training.drop_and_grow(inner, start,
                                              update_every=1,
                                              schedule=jaxprune.sparse_training.rigl_schedule(0.3))
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, state.inner_state[0])
  state = state._replace(inner_state=(state.inner_state[0]._replace(
      **{n: getattr(ones, n) for n in names}), *state.inner_state[1:]))
  grads = {"w": jax.random.normal(jax.random.key(8), shape)}
  _, state = jax.jit(tx.update)(grads, state, params)
  grown = jaxprune.get_masks(state)["w"] & ~start["w"]
  assert bool(grown.any())
  for name in names:
    moment = getattr(state.inner_state[0], name)["w"]
    assert float(jnp.abs(moment[grown]).sum()) == 0.0, name
    assert bool((moment[~grown] != 0).all()), name


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("schedule", [jaxprune.sparse_training.rigl_schedule(0.3),
                                      jaxprune.sparse_training.set_schedule(0.3)],
                         ids=["rigl", "set"])
def test_counts_stay_constant_on_every_shape(schedule, sparsity):
  # JaxPruner's testDynamicSparseUpdateStateConstantSparsity, every shape at once.
  shapes = [(1,), (5,), (4, 5), (2, 9, 1), (2, 2, 4, 4)]
  params = {f"w{i}": jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)}
  where = {k: True for k in params}
  start = jaxprune.ranked_masks(params, sparsity, where, score=jaxprune.scores.random_score(0))
  tx = jaxprune.sparse_training.drop_and_grow(optax.sgd(0.1), start, schedule=schedule,
                                              update_every=1)
  grads = {k: jax.random.normal(jax.random.key(8), v.shape) for k, v in params.items()}
  _, state = tx.update(grads, tx.init(params), params)
  for k, m in jaxprune.get_masks(state).items():
    assert int(m.sum()) == int(start[k].sum()), k


def test_reset_grown_leaves_counts_and_unmasked_leaves_alone():
  # Adam's moments and count set to ones, then one drop-and-grow update with zero
  # gradients: Adam decays every moment (mu by 0.9, nu by 0.999) and counts on from 1;
  # only the grown weights' moments restart at 0, not the unmasked leaf's, not the count.
  params = {"w": jnp.ones((2, 4)), "b": jnp.ones(4)}
  start = {"w": jnp.array([[True, False] * 2, [False, True] * 2]), "b": None}
  tx = jaxprune.sparse_training.drop_and_grow(
      optax.adam(1e-3), start, schedule=jaxprune.sparse_training.set_schedule(0.5),
      update_every=1)
  state = tx.init(params)
  state = state._replace(inner_state=jax.tree.map(jnp.ones_like, state.inner_state))
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = jax.jit(tx.update)(zeros, state, params)
  grown = np.asarray(jaxprune.get_masks(state)["w"] & ~start["w"])
  assert grown.any()
  adam = state.inner_state[0]
  for name, decay in (("mu", 0.9), ("nu", 0.999)):
    np.testing.assert_allclose(np.asarray(getattr(adam, name)["w"]),
                               np.where(grown, 0.0, decay), rtol=1e-7, err_msg=name)
    np.testing.assert_allclose(np.asarray(getattr(adam, name)["b"]), decay, rtol=1e-7)
  assert int(adam.count) == 2


def test_drop_and_grow_errors_name_the_problem():
  params = mlp_params()
  with pytest.raises(ValueError, match="starting `masks`"):
    jaxprune.sparse_training.drop_and_grow(optax.sgd(0.1), None,
                                           update_every=10,
                                           schedule=jaxprune.sparse_training.rigl_schedule())
  with pytest.raises(ValueError, match=r"drop_fraction = 1\.5"):
    jaxprune.sparse_training.rigl_schedule(1.5)
  with pytest.raises(ValueError, match=r"drop_fraction = -0\.1"):
    jaxprune.sparse_training.set_schedule(lambda c: -0.1)
  with pytest.raises(ValueError, match="end = 0"):
    jaxprune.sparse_training.rigl_schedule(0.3, end=0)
  with pytest.raises(TypeError, match="grow must be a score"):
    jaxprune.sparse_training.DropAndGrow(0.3, grow=0.5)
  with pytest.raises(ValueError, match="previous"):
    jaxprune.sparse_training.DropAndGrow(0.3, jaxprune.scores.random_score(0)).masks(
        params, jaxprune.select(params))
  with pytest.raises(ValueError, match=r"belongs in jaxprune\.sparse_training\.drop_and_grow"):
    jaxprune.sparse_training.straight_through(optax.sgd(0.1), where=jaxprune.select(params),
                              schedule=jaxprune.sparse_training.set_schedule(), update_every=1)
  with pytest.raises(ValueError, match="gradient_score"):
    jaxprune.scores.gradient_score().scores(params, [0])


def test_rigl_regrows_where_the_dense_gradient_is_largest():
  # One weight kept of four, dropped (smallest |w| among the kept); the largest
  # |g| among the rest comes back, though its weight is 0.
  params = {"w": jnp.array([[0.0, 0.0, 0.5, 0.0]])}
  start = {"w": jnp.array([[False, False, True, False]])}
  tx = jaxprune.sparse_training.drop_and_grow(optax.sgd(0.0), start,
                                              update_every=1,
                                              schedule=jaxprune.sparse_training.rigl_schedule(1.0))
  grads = {"w": jnp.array([[0.1, -3.0, 0.2, 1.0]])}
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(jaxprune.get_masks(state)["w"]),
                                [[False, True, False, False]])


def test_set_draws_differ_per_update_and_repeat_per_seed():
  params = {"w": jnp.ones((1, 64))}
  start = jaxprune.ranked_masks(params, 0.5, {"w": True}, score=jaxprune.scores.random_score(0))
  targets = [jaxprune.sparse_training.set_schedule(0.5, seed=s)(c)
             for s, c in ((0, 0), (0, 1), (0, 0), (1, 0))]
  got = [np.asarray(t.masks(params, {"w": True}, previous=start)["w"]) for t in targets]
  assert (got[0] == got[2]).all() and not (got[0] == got[1]).all()
  assert not (got[0] == got[3]).all()


def test_accelerator_lowerings_of_a_rigl_step_hold_no_sort():
  params = mlp_params()
  start = jaxprune.ranked_masks(params, 0.75, jaxprune.select(params))
  tx = jaxprune.sparse_training.drop_and_grow(optax.adam(1e-3), start,
                                              update_every=10,
                                              schedule=jaxprune.sparse_training.rigl_schedule(0.3))

  def step(p, state, x):
    updates, state = tx.update(jax.grad(mlp_loss)(p, x), state, p)
    return optax.apply_updates(p, updates), state

  for platform in ("tpu", "cuda"):
    module = jax.export.export(jax.jit(step), platforms=[platform])(
        params, tx.init(params), batch(0)).mlir_module()
    assert "stablehlo.sort" not in module, platform
    assert "stablehlo.scatter" not in module, platform


# ----------------------------------------------------------------------------- straight-through


@pytest.mark.parametrize("score", [None, "random"])
def test_ste_sparse_forward_dense_weights_every_iteration(score):
  # JaxPruner's testStePruningGeneratesMaskEachIterationAndKeepDenseWeight: a loss
  # pushing every weight away from 0, masks recomputed every step at 0.5.
  params = {"w": jax.random.normal(jax.random.key(0), (10, 10))}

  def schedule(count):
    if score is None:
      return 0.5
    return jaxprune.Prune(0.5, score=jaxprune.scores.random_score(jax.random.fold_in(
        jax.random.key(0), count)))

  tx = jaxprune.sparse_training.straight_through(optax.adam(1e-4), where={"w": True},
                                                 schedule=schedule,
                                 update_every=1)
  step = make_step(tx, loss=lambda p, x: -jnp.abs(p["w"]).sum())
  p, state = params, tx.init(params)
  masks_seen = []
  for _ in range(10):
    p, state = step(p, state, None)
    assert float((p["w"] == 0).mean()) == 0.5                       # sparse forward
    dense = jaxprune.sparse_training.dense_weights(state, p)["w"]
    assert float((dense == 0).mean()) == 0.0                        # dense weights
    m = jaxprune.get_masks(state)["w"]
    assert bool((dense[m] == p["w"][m]).all())
    masks_seen.append(np.asarray(m))
  if score == "random":
    assert not all((a == masks_seen[0]).all() for a in masks_seen[1:])
  assert step._cache_size() == 1


def test_ste_magnitude_first_step_prunes_like_jaxpruner_instant_sparsify():
  w = jnp.array([[0.11, -1.08, -1.6, 0.37], [-0.3, 1.03, 0.02, -0.78],
                 [-0.95, 0.47, -1.3, 0.87], [1.96, 3.02, 0.3, -0.92]])
  expected = jnp.array([[0.0, -1.08, -1.6, 0.0], [0.0, 1.03, 0.0, 0.0],
                        [-0.95, 0.0, -1.3, 0.0], [1.96, 3.02, 0.0, -0.92]])
  tx = jaxprune.sparse_training.straight_through(optax.sgd(0.0), where={"w": True},
                                 schedule=optax.constant_schedule(0.5), update_every=1)
  updates, _ = tx.update({"w": jnp.ones_like(w)}, tx.init({"w": w}), {"w": w})
  np.testing.assert_array_equal(np.asarray(optax.apply_updates({"w": w}, updates)["w"]),
                                np.asarray(expected))


def test_ste_pruned_weights_keep_learning_and_come_back():
  # The loss pulls w[0, 0] (pruned at first: the smallest) up; its dense value grows
  # until the recompute keeps it, and it lands on that dense value.
  params = {"w": jnp.array([[0.01, 1.0, -1.0, 2.0]])}
  tx = jaxprune.sparse_training.straight_through(optax.sgd(1.0), where={"w": True},
                                 schedule=optax.constant_schedule(0.25), update_every=2)
  step = make_step(tx, loss=lambda p, x: -5.0 * p["w"][0, 0])
  p, state = params, tx.init(params)
  for _ in range(4):
    p, state = step(p, state, None)
  m = jaxprune.get_masks(state)["w"]
  assert bool(m[0, 0]) and float(p["w"][0, 0]) == pytest.approx(20.01)
  assert int((~m).sum()) == 1 and float(p["w"][0, 1]) == 0.0  # |1| ties |-1|: first pruned


def test_ste_nm_training_stays_two_of_four():
  params = mlp_params()
  tx = jaxprune.sparse_training.straight_through(optax.adam(1e-2), where=jaxprune.select(params),
                                 schedule=lambda c: jaxprune.NM(2, 4), update_every=2)
  step = make_step(tx)
  p, state = params, tx.init(params)
  changed = 0
  for i in range(8):
    before = jaxprune.get_masks(state)
    p, state = step(p, state, batch(i))
    assert jaxprune.is_nm_sparse(p, 2, 4, jaxprune.select(p)), i
    after = jaxprune.get_masks(state)
    same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(after)))
    if i % 2:
      assert same, i  # masks move only on recompute steps
    changed += not same
  assert changed >= 2


def test_ste_lowering_holds_no_sort_on_accelerators():
  params = mlp_params()
  tx = jaxprune.sparse_training.straight_through(optax.adam(1e-3), where=jaxprune.select(params),
                                 schedule=optax.constant_schedule(0.8), update_every=10)

  def step(p, state, x):
    updates, state = tx.update(jax.grad(mlp_loss)(p, x), state, p)
    return optax.apply_updates(p, updates), state

  module = jax.export.export(jax.jit(step), platforms=["tpu"])(
      params, tx.init(params), batch(0)).mlir_module()
  assert "stablehlo.sort" not in module and "stablehlo.scatter" not in module


# ----------------------------------------------------------------------------- STE's memory


def _state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_straight_through_holds_one_dense_copy_and_packed_masks():
  # What straight_through costs beyond its inner optimizer: the dense weights of the
  # targeted leaves, their masks at a bit per weight, and the update count; nothing
  # of the untargeted leaves.
  keys = jax.random.split(jax.random.key(0), 3)
  params = {f"fc{i}": {"kernel": jax.random.normal(k, (512, 512)), "bias": jnp.zeros(512)}
            for i, k in enumerate(keys)}
  where = jaxprune.select(params, include="*kernel")
  tx = jaxprune.sparse_training.straight_through(optax.adamw(1e-3), where=where,
                                                 schedule=optax.constant_schedule(0.8),
                                                 update_every=100)
  extra = _state_bytes(tx.init(params)) - _state_bytes(optax.adamw(1e-3).init(params))
  targeted = 3 * 512 * 512
  assert extra == targeted * 4 + targeted // 8 + 4, extra


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize("method", ["rigl", "straight_through"])
def test_train_interrupted_and_resumed_is_bitwise_exact(tmp_path, method):
  params = mlp_params()
  start = jaxprune.ranked_masks(params, 0.8, jaxprune.select(params),
                                score=jaxprune.scores.random_score(0),
                                distribution=jaxprune.distributions.erk())

  def make_tx():
    if method == "straight_through":
      return jaxprune.sparse_training.straight_through(optax.adam(1e-2),
                                                       where=jaxprune.select(params),
                                                       schedule=optax.constant_schedule(0.8),
                                                       update_every=4)
    return jaxprune.sparse_training.drop_and_grow(
        optax.adam(1e-2), start, update_every=4,
        schedule=jaxprune.sparse_training.rigl_schedule(0.3, 12))

  def loss(p, b):
    return mlp_loss(p, b)

  kwargs = dict(steps=16, eval_batches=[batch(99)])
  whole = jaxprune.train(params, loss, batch, optimizer=make_tx(), hooks=[], **kwargs)

  class CrashError(Exception):
    pass

  def crash_at_10(report):
    if report.step == 10:
      raise CrashError

  with pytest.raises(CrashError):
    jaxprune.train(params, loss, batch, optimizer=make_tx(),
                   checkpointer=jaxprune.Checkpointer(str(tmp_path), every=4),
                   hooks=[jaxprune.training.every(2, crash_at_10)], **kwargs)
  seen = []
  resumed = jaxprune.train(params, loss, batch, optimizer=make_tx(),
                           checkpointer=jaxprune.Checkpointer(str(tmp_path), every=4),
                           hooks=[jaxprune.training.every(2, lambda r: seen.append(r.step))],
                           **kwargs)
  assert seen[0] == 10  # resumed from the checkpoint at step 8
  for a, b in zip(jax.tree.leaves((whole.params, whole.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert resumed.evaluation == whole.evaluation
  # Judged as the sparse model it trains.
  sparse = jaxprune.apply_masks(whole.params, jaxprune.get_masks(whole.opt_state))
  assert whole.evaluation.loss == pytest.approx(float(mlp_loss(sparse, batch(99))), rel=1e-6)


def test_train_refuses_bad_counts_and_nan_losses(tmp_path):
  params = mlp_params()
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="steps"):
    jaxprune.train(params, mlp_loss, batch, optimizer=tx, steps=0)
  with pytest.raises(ValueError, match="every must be an integer >= 1"):
    jaxprune.Checkpointer(str(tmp_path), every=-1)
  with pytest.raises(FloatingPointError):
    jaxprune.train(params, lambda p, b: jnp.nan * mlp_loss(p, b), batch, optimizer=tx,
                   steps=4, hooks=[])

"""The loop's pieces run by hand give what `prune_retrain` gives, bitwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune.mask_tree import float_part


def make_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"fc1": {"kernel": jax.random.normal(k[0], (8, 16)) * 0.3, "bias": jnp.zeros(16)},
          "fc2": {"kernel": jax.random.normal(k[1], (16, 4)) * 0.3}}


def batch_at(step):
  key = jax.random.fold_in(jax.random.key(1), step)
  return jax.random.normal(key, (8, 8))


def loss_fn(p, x):
  h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return jnp.mean((h @ p["fc2"]["kernel"] - 1.0) ** 2)


def test_pieces_by_hand_match_prune_retrain(tmp_path):
  params = make_params()
  where = jaxprune.select(params)
  schedule = [0.5, jaxprune.NM(1, 4)]
  result = jaxprune.prune_retrain(
      params, loss_fn, batch_at, [batch_at(10_000)], optimizer=optax.adam(1e-2),
      schedule=schedule, where=where, retrain_steps=6, progress=False, seed=3)

  tx = jaxprune.pruned(optax.adam(1e-2), jaxprune.magnitude_masks(params, 0.0, where))
  train_step = jaxprune.make_train_step(loss_fn, tx)
  masks = jaxprune.get_masks(tx.init(params))
  rng = jax.random.key_data(jax.random.key(3))
  state = jaxprune.LoopState(params, tx.init(params), masks, rng)
  with jaxprune.Checkpointer(tmp_path / "ckpt", {"by": "hand"}) as ckpt:
    for i, target in enumerate(schedule):
      p, m, _ = jaxprune.prune_step(state.params, state.masks, state.opt_state, target, where)
      opt_state = jaxprune.set_masks(tx.init(float_part(p)), m)  # learning-rate rewinding
      state = jaxprune.retrain(train_step, jaxprune.LoopState(p, opt_state, m, rng), batch_at,
                               range(6), first_step=6 * i, iteration=i)
      ckpt.save(state, {"iteration": i + 1})
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(result.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_retrain_checks_losses_and_calls_its_hook():
  params = make_params()
  where = jaxprune.select(params)
  tx = jaxprune.pruned(optax.sgd(1e-2), jaxprune.magnitude_masks(params, 0.5, where))
  step = jaxprune.make_train_step(loss_fn, tx)
  state = jaxprune.LoopState(params, tx.init(params), jaxprune.get_masks(tx.init(params)),
                             jax.random.key_data(jax.random.key(0)))
  seen = []
  jaxprune.retrain(step, state, batch_at, range(2, 7), every=2,
                   on_every=lambda s, j: seen.append(j))
  assert seen == [4, 6]  # not at the last step (7)

  def bad_batch(g):
    return jnp.full((8, 8), jnp.nan) if g == 13 else batch_at(g)

  with pytest.raises(FloatingPointError, match=r"iteration 2, step 3 \(global step 13\)"):
    jaxprune.retrain(step, state, bad_batch, range(0, 5), first_step=10, iteration=2,
                     log_every=2)


def test_checkpointer_never_writes_over_an_existing_checkpoint(tmp_path):
  state = jaxprune.LoopState({"w": jnp.ones(3)}, (), {"w": None}, jnp.zeros(2, jnp.uint32))
  with jaxprune.Checkpointer(tmp_path, {"k": 1}) as ckpt:
    ckpt.save(state, {"iteration": 0})
  with jaxprune.Checkpointer(tmp_path, {"k": 1}) as ckpt:  # saves without resuming first
    ckpt.save(state, {"iteration": 1})
  with jaxprune.Checkpointer(tmp_path, {"k": 1}) as ckpt:
    assert ckpt.resume(state)[1]["iteration"] == 1
  with jaxprune.Checkpointer(tmp_path, {"k": 2}) as ckpt, pytest.raises(
      ValueError, match="another configuration: k is 1 there and 2 now"):
    ckpt.resume(state)
  with jaxprune.Checkpointer(tmp_path, {"k": 1}, resume=False) as ckpt, pytest.raises(
      ValueError, match="already holds checkpoints"):
    ckpt.resume(state)

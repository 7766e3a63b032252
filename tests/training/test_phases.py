"""The loop's pieces run by hand give what `prune_retrain` gives, bitwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


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
      targets=schedule, where=where, retrain_steps=6, hooks=[])

  tx = jaxprune.pruned(optax.adam(1e-2), jaxprune.ranked_masks(params, 0.0, where))
  train_step = jaxprune.make_train_step(loss_fn, tx)
  state = jaxprune.training.LoopState(params, tx.init(params),
                                      jax.random.key_data(jax.random.key(0)))
  with jaxprune.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.resume(state, config={"by": "hand"}) is None
    for i, target in enumerate(schedule):
      p, pruned_state = jaxprune.prune_step(state.params, state.opt_state, target, where)
      # Learning-rate rewinding: a fresh optimizer state holding the new masks.
      opt_state = jaxprune.set_masks(tx.init(p), jaxprune.get_masks(pruned_state))
      state = jaxprune.training.retrain(train_step, state._replace(params=p, opt_state=opt_state),
                               batch_at, range(6), first_step=6 * i, iteration=i)
      ckpt.save(state, {"iteration": i + 1})
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(jaxprune.get_masks(state.opt_state)),
                  jax.tree.leaves(result.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_retrain_reports_to_hooks_in_order_and_guards_against_nan():
  params = make_params()
  where = jaxprune.select(params)
  tx = jaxprune.pruned(optax.sgd(1e-2), jaxprune.ranked_masks(params, 0.5, where))
  step = jaxprune.make_train_step(loss_fn, tx)
  state = jaxprune.training.LoopState(params, tx.init(params),
                                      jax.random.key_data(jax.random.key(0)))
  seen = []
  end = jaxprune.training.retrain(step, state, batch_at, range(2, 7), first_step=10, iteration=4,
                         report_every=(2, 3), hooks=[seen.append, lambda r: seen.append(r.step)])
  # Reports after local steps 3, 4, 6 (multiples of 2 or 3) and at the end (7).
  assert [r.step for r in seen[::2]] == [3, 4, 6, 7] and seen[1::2] == [3, 4, 6, 7]
  assert [len(r.losses) for r in seen[::2]] == [1, 1, 2, 1]  # each loss reported once
  assert [r.global_step for r in seen[::2]] == [12, 13, 15, 16]
  assert [r.final for r in seen[::2]] == [False, False, False, True]
  assert all(r.iteration == 4 and r.losses.dtype == np.float64 for r in seen[::2])
  # The losses are the train step's: rerun by hand, bitwise.
  p, o = params, state.opt_state
  by_hand = []
  for g in range(12, 17):
    p, o, loss = step(p, o, batch_at(g), state.rng, g)
    by_hand.append(float(loss))
  assert np.concatenate([r.losses for r in seen[::2]]).tolist() == by_hand
  assert seen[-2].state.params is end.params

  def bad_batch(g):
    return jnp.full((8, 8), jnp.nan) if g == 13 else batch_at(g)

  with pytest.raises(FloatingPointError, match=r"iteration 2, step 3 \(global step 13\)"):
    jaxprune.training.retrain(step, state, bad_batch, range(0, 5), first_step=10, iteration=2,
                     report_every=2)
  # With the guard switched off, a NaN does not stop the phase.
  quiet = jaxprune.training.retrain(step, state, bad_batch, range(0, 5), first_step=10,
                           check_finite=False)
  assert not np.isfinite(np.asarray(quiet.params["fc1"]["kernel"])).all()
  with pytest.raises(ValueError, match="report_every must be an integer >= 1 or a tuple of "
                                       "them, got 0"):
    jaxprune.training.retrain(step, state, batch_at, range(2), report_every=0)


def test_user_hooks_see_every_report_of_the_loop_after_the_nan_guard():
  params = make_params()
  reports = []
  result = jaxprune.prune_retrain(
      params, loss_fn, batch_at, [batch_at(10_000)], optimizer=optax.adam(1e-2),
      targets=[0.5, 0.75], where=jaxprune.select(params), retrain_steps=5,
      hooks=[jaxprune.training.every(2, reports.append)])
  assert [(r.iteration, r.step, r.final) for r in reports] == [
      (0, 2, False), (0, 4, False), (0, 5, True), (1, 2, False), (1, 4, False), (1, 5, True)]
  assert [r.global_step for r in reports] == [1, 3, 4, 6, 8, 9]
  assert reports[-1].state.params is not None and result.history[-1].retrain_steps == 5

  def nan_after(g):
    return jnp.full((8, 8), jnp.nan) if g == 3 else batch_at(g)

  seen = []
  with pytest.raises(FloatingPointError, match=r"global step 3"):
    jaxprune.prune_retrain(
        params, loss_fn, nan_after, [batch_at(10_000)], optimizer=optax.adam(1e-2),
        targets=[0.5], where=jaxprune.select(params), retrain_steps=5,
        hooks=[jaxprune.training.every(2, seen.append)])
  assert [r.step for r in seen] == [2]  # the bad report raised before the user hook
  with pytest.raises(TypeError, match=r"hooks\[0\] = 3 is not callable"):
    jaxprune.prune_retrain(
        params, loss_fn, batch_at, [batch_at(0)], optimizer=optax.adam(1e-2), targets=[0.5],
        where=jaxprune.select(params), retrain_steps=1, hooks=[3])


def test_checkpointer_never_writes_over_an_existing_checkpoint(tmp_path):
  state = jaxprune.training.LoopState({"w": jnp.ones(3)}, (), jnp.zeros(2, jnp.uint32))
  with jaxprune.Checkpointer(tmp_path) as ckpt:
    assert ckpt.resume(state, {"k": 1}) is None
    ckpt.save(state, {"iteration": 0})
  with jaxprune.Checkpointer(tmp_path) as ckpt:  # saves without resuming first: no settings
    ckpt.save(state, {"iteration": 1})
    assert ckpt.indices() == [0, 1]  # checkpoint 0 is not written over
  with jaxprune.Checkpointer(tmp_path) as ckpt:
    assert ckpt.resume(state, {})[1]["iteration"] == 1
  with jaxprune.Checkpointer(tmp_path, resume="with_changes") as ckpt:
    assert ckpt.resume(state, {"k": 1})[1]["iteration"] == 1
  with jaxprune.Checkpointer(tmp_path) as ckpt, pytest.raises(
      ValueError, match="another configuration: k is not recorded there and 2 now"):
    ckpt.resume(state, {"k": 2})
  with jaxprune.Checkpointer(tmp_path, every=3) as ckpt:
    assert [step for step in range(1, 10) if ckpt.due(step)] == [3, 6, 9]
  with pytest.raises(ValueError, match="pass checkpointer=None for no checkpoints"):
    jaxprune.Checkpointer(None)
  with jaxprune.Checkpointer(tmp_path, resume=False) as ckpt, pytest.raises(
      ValueError, match="already holds checkpoints"):
    ckpt.resume(state, {"k": 1})
  with pytest.raises(RuntimeError, match="inside `with checkpointer:`"):
    jaxprune.Checkpointer(tmp_path).save(state, {"iteration": 2})


def _run_loop(train_batches=batch_at, **kwargs):
  params = make_params()
  args = dict(optimizer=optax.adam(1e-2), targets=[0.5], where=jaxprune.select(params),
              retrain_steps=6, hooks=[])
  args.update(kwargs)
  return jaxprune.prune_retrain(params, loss_fn, train_batches, [batch_at(10_000)], **args)


def test_an_optimizer_that_is_already_pruned_is_refused_before_compute():
  params = make_params()
  inner = jaxprune.pruned(optax.adam(1e-2), jaxprune.ranked_masks(params, 0.3,
                                                                     jaxprune.select(params)))
  calls = []

  def counted(step):
    calls.append(step)
    return batch_at(step)

  with pytest.raises(ValueError, match=r"already holds a jaxprune\.pruned state"):
    _run_loop(optimizer=optax.chain(optax.clip(1.0), inner), train_batches=counted)
  assert calls == []
  # Nested states are found (and refused by get_masks) wherever they are.
  nested = jaxprune.pruned(inner, jaxprune.ranked_masks(params, 0.0, jaxprune.select(params)))
  with pytest.raises(ValueError, match=r"exactly one jaxprune\.pruned state.*found 2"):
    jaxprune.get_masks(nested.init(params))


def test_numpy_counts_are_settings_and_reports_follow_the_hooks_cadence_alone():
  reports = []
  _run_loop(hooks=[jaxprune.training.every(np.int64(4), reports.append)])
  assert [r.step for r in reports] == [4, 6]  # no checkpointer: no checkpoint cadence
  plain = []
  _run_loop(hooks=[jaxprune.training.every(np.int64(4), lambda r: None), plain.append],
            checkpointer=None)
  assert [r.step for r in plain] == [4, 6]  # a plain hook: at every report point
  state = jaxprune.training.LoopState(make_params(), optax.sgd(0.1).init(make_params()),
                             jax.random.key_data(jax.random.key(0)))
  step = jaxprune.make_train_step(loss_fn, optax.sgd(0.1))
  seen = []
  jaxprune.training.retrain(step, state, batch_at, range(4), report_every=np.int64(2),
                            hooks=[seen.append])
  assert [r.step for r in seen] == [2, 4]
  for bad in (2.0, True, (2, 0)):
    with pytest.raises(ValueError, match="report_every must be an integer >= 1"):
      jaxprune.training.retrain(step, state, batch_at, range(4), report_every=bad)
  with pytest.raises(ValueError, match="steps must be a range of consecutive"):
    jaxprune.training.retrain(step, state, batch_at, range(0, 6, 2))
  with pytest.raises(ValueError, match="steps must be a range"):
    jaxprune.training.retrain(step, state, batch_at, [0, 1])
  with pytest.raises(TypeError, match="hooks must be a list"):
    jaxprune.training.retrain(step, state, batch_at, range(2), hooks=seen.append)


def test_the_nan_guard_runs_before_given_hooks_unless_switched_off():
  params = make_params()
  state = jaxprune.training.LoopState(params, optax.sgd(0.1).init(params),
                             jax.random.key_data(jax.random.key(0)))
  step = jaxprune.make_train_step(loss_fn, optax.sgd(0.1))

  def nan_batch(g):
    return jnp.full((8, 8), jnp.nan)

  seen = []
  with pytest.raises(FloatingPointError):
    jaxprune.training.retrain(step, state, nan_batch, range(2), hooks=[seen.append])
  assert seen == []
  jaxprune.training.retrain(step, state, nan_batch, range(2), hooks=[seen.append],
                            check_finite=False)
  assert len(seen) == 1 and np.isnan(seen[0].losses).all()


class StopRunError(Exception):
  pass


def test_a_hook_that_stops_the_run_keeps_the_checkpoint_due_at_that_step(tmp_path):
  def stop_at_4(report):
    if report.step == 4:
      raise StopRunError

  with pytest.raises(StopRunError):
    _run_loop(checkpointer=jaxprune.Checkpointer(tmp_path, every=4), hooks=[stop_at_4])
  with jaxprune.Checkpointer(tmp_path) as ckpt:
    meta = ckpt.read_meta(ckpt.indices()[-1])
  assert (meta["phase"], meta["iteration"], meta["step"]) == ("retrain", 0, 4)

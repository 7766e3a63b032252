"""A resume refuses a run with other settings, compared by value (issue 27, case 6).

A run is checkpointed, then started again in the same directory with one setting
changed: the resume must refuse before any step, naming the setting, unless
`resume="with_changes"` says the change is deliberate (then it continues, the
change logged). Settings the library owns are compared by value: a score's seed,
a distribution's fields, a schedule's values at every recompute, the masks.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import optax
import pytest
import tiny_runs
from tiny_runs import Batches

import jaxprune

PARAMS = tiny_runs.make_params()
WHERE = jaxprune.select(PARAMS)


def masks(sparsity: float, seed: int = 0):
  return jaxprune.ranked_masks(PARAMS, sparsity, WHERE, score=jaxprune.scores.random_score(seed))


def gradual(final: float = 0.9, every: int = 2):
  return jaxprune.gradually_pruned(optax.adam(1e-2), where=WHERE, update_every=every,
                                   schedule=optax.polynomial_schedule(init_value=0.5,
                                                                      end_value=final,
                                                            power=3, transition_steps=8))


def rigl(fraction: float = 0.3, every: int = 2):
  return jaxprune.sparse_training.drop_and_grow(optax.adam(1e-2), masks(0.5), update_every=every,
                                                schedule=jaxprune.sparse_training.rigl_schedule(fraction))


def set_(fraction: float = 0.3):
  return jaxprune.sparse_training.drop_and_grow(
      optax.adam(1e-2), masks(0.5), update_every=2,
      schedule=jaxprune.sparse_training.set_schedule(fraction, seed=0))


# name: (the first run's optimizer, the second run's, the setting named)
TRAIN_CHANGES = {
    "gradual schedule 0.5 -> 0.9 vs 0.5 -> 0.8": (gradual(0.9), gradual(0.8), "training"),
    "RigL -> SET": (rigl(), set_(), "training"),
    "update_every": (rigl(every=2), rigl(every=3), "training"),
    "drop fraction": (rigl(0.3), rigl(0.2), "training"),
    "static masks 50% -> 90%": (jaxprune.pruned(optax.adam(1e-2), masks(0.5)),
                                jaxprune.pruned(optax.adam(1e-2), masks(0.9)), "masks"),
    "the same sparsity, other masks": (jaxprune.pruned(optax.adam(1e-2), masks(0.5, seed=0)),
                                       jaxprune.pruned(optax.adam(1e-2), masks(0.5, seed=1)),
                                       "masks"),
    "a global scope": (jaxprune.gradually_pruned(optax.adam(1e-2), where=WHERE, update_every=2,
                                                 schedule=optax.constant_schedule(0.5)),
                       jaxprune.gradually_pruned(optax.adam(1e-2), where=WHERE, update_every=2,
                                                 schedule=lambda c: jaxprune.Prune(0.5,
                                                                                   scope="global")),
                       "training"),
}


class StopError(Exception):
  pass


def stop_at(step: int):
  def hook(report):
    if report.step == step:
      raise StopError
  return hook


@pytest.mark.parametrize("case", list(TRAIN_CHANGES))
def test_train_refuses_to_resume_under_other_settings(tmp_path, case, caplog):
  first, second, key = TRAIN_CHANGES[case]
  ckpt = tmp_path / "ckpt"
  with pytest.raises(StopError):  # stopped after step 4 of 8, its checkpoint written
    tiny_runs.train(optimizer=first, checkpoint_dir=ckpt, hooks=[stop_at(4)])
  batches = Batches()
  with pytest.raises(ValueError, match=rf"another configuration: {key} is .* there and .* now"):
    tiny_runs.train(optimizer=second, steps=8, checkpoint_dir=ckpt, train_batches=batches)
  assert batches.steps == []
  # A deliberate change: resumed from step 4, the changes logged.
  with caplog.at_level(logging.WARNING, logger="jaxprune"):
    tiny_runs.train(optimizer=second, steps=8, checkpoint_dir=ckpt, train_batches=batches,
                    resume="with_changes")
  assert batches.steps == [4, 5, 6, 7]
  assert f"changed settings: {key}" in caplog.text or f", {key}" in caplog.text


def test_a_finished_run_resumed_says_so(tmp_path, caplog):
  ckpt = tmp_path / "ckpt"
  first = tiny_runs.train(steps=4, checkpoint_dir=ckpt)
  batches = Batches()
  with caplog.at_level(logging.WARNING, logger="jaxprune"):
    again = tiny_runs.train(steps=4, checkpoint_dir=ckpt, train_batches=batches)
  assert batches.steps == []
  assert "holds this run finished (step 4 of 4): returned as saved, nothing trained" in (
      caplog.text)
  tiny_runs.assert_bitwise_equal(again.params, first.params)


def erk_target(**kwargs):
  return jaxprune.Prune(0.5, distribution=jaxprune.distributions.erk(**kwargs))


def distilled_from(scale: float):
  """The settings of a run distilled from a teacher `scale` times the params, given
  the run's batches (the teacher's logits ride on them)."""
  apply_fn = lambda p, b: jnp.tanh(b["x"] @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
  teacher = {k: {"kernel": v["kernel"] * scale} for k, v in PARAMS.items()}
  loss = jaxprune.distillation_loss(tiny_runs.loss_fn, apply_fn, weight=0.5, temperature=2.0)
  return lambda batches: dict(
      targets=[0.5], loss_fn=loss,
      train_batches=jaxprune.training.with_teacher_logits(batches, apply_fn, teacher))


# name: (the first run's settings, the second's, the setting named)
LOOP_CHANGES = {
    "random_score(0) -> random_score(1)": (
        dict(targets=[jaxprune.Prune(0.5, score=jaxprune.scores.random_score(0))]),
        dict(targets=[jaxprune.Prune(0.5, score=jaxprune.scores.random_score(1))]), "targets"),
    "erk() -> erk(0.3, fixed=...)": (
        dict(targets=[erk_target()]),
        dict(targets=[erk_target(power=0.3, fixed={"fc2/kernel": 0.2})]), "targets"),
    "the teacher's params": (distilled_from(1.0), distilled_from(1.01), "composed"),
    "a GivenMasks target": (
        dict(targets=[jaxprune.GivenMasks(masks(0.5, seed=0))]),
        dict(targets=[jaxprune.GivenMasks(masks(0.5, seed=1))]), "targets"),
}


@pytest.mark.parametrize("case", list(LOOP_CHANGES))
def test_prune_retrain_compares_its_schedule_by_value(tmp_path, case):
  first, second, key = LOOP_CHANGES[case]
  ckpt = tmp_path / "ckpt"
  batches = Batches()
  first = first(Batches()) if callable(first) else first
  second = second(batches) if callable(second) else dict(second, train_batches=batches)
  tiny_runs.prune_retrain(checkpoint_dir=ckpt, retrain_steps=2, **first)
  with pytest.raises(ValueError, match=rf"another configuration: {key} is "):
    tiny_runs.prune_retrain(checkpoint_dir=ckpt, retrain_steps=2, **second)
  assert batches.steps == []


def test_the_same_settings_built_again_resume(tmp_path):
  """By value, not identity: new but equal objects (a score, a distribution, masks,
  a schedule) match the checkpoint."""
  ckpt = tmp_path / "ckpt"
  target = lambda: jaxprune.Prune(0.5, score=jaxprune.scores.random_score(0),
                                  distribution=jaxprune.distributions.erk(
                                      fixed={"fc2/kernel": 0.2}))
  tiny_runs.prune_retrain(checkpoint_dir=ckpt, targets=[target()], retrain_steps=2)
  batches = Batches()
  tiny_runs.prune_retrain(checkpoint_dir=ckpt, targets=[target()], retrain_steps=2,
                          train_batches=batches)
  assert batches.steps == []
  tiny_runs.train(optimizer=rigl(), steps=4, checkpoint_dir=tmp_path / "t")
  tiny_runs.train(optimizer=rigl(), steps=4, checkpoint_dir=tmp_path / "t",
                  train_batches=batches)
  assert batches.steps == []


def test_resume_takes_true_false_or_with_changes(tmp_path):
  with pytest.raises(ValueError, match=r"resume must be True, False or 'with_changes', got 'yes'"):
    tiny_runs.train(checkpoint_dir=tmp_path / "c", resume="yes")

"""The training drivers check what they are given before the first step (issue 27,
cases 3, 8 and 9): the evaluation (metric, batch shapes, NaN in the data), the
schedule's entries. Each case asserts the message names the argument and
that no training batch was asked for.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import tiny_runs
from tiny_runs import Batches

import jaxprune

ACCURACY = jaxprune.training.aux_metric("accuracy")  # needs an aux the tiny loss does not return


def _bad_shape():
  return [{**tiny_runs.make_batch(1, 16), "x": np.ones((16, 5), np.float32)}]


def _nan_batch():
  batches = [tiny_runs.make_batch(1, 16), tiny_runs.make_batch(2, 16)]
  batches[1]["x"][3, 2] = np.nan
  return batches


EVALUATIONS = {
    "a metric needing an aux": (dict(metric=ACCURACY), r"evaluating eval batch 0 fails, so "
                                r"nothing was trained: .*accuracy"),
    "an eval batch of the wrong shape": (dict(eval_batches=_bad_shape()),
                                         r"evaluating eval batch 0 fails"),
    "a NaN in an eval batch": (dict(eval_batches=_nan_batch()),
                               r"eval batch 1 holds NaN or inf at \['x'\]"),
}


@pytest.mark.parametrize("case", list(EVALUATIONS))
@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_an_evaluation_that_would_fail_fails_before_the_first_step(tmp_path, case, driver):
  overrides, message = EVALUATIONS[case]
  overrides = dict(overrides)
  if driver is tiny_runs.train:
    overrides.setdefault("eval_batches", tiny_runs.EVAL_BATCHES)
  batches = Batches()
  with pytest.raises(ValueError, match=message):
    driver(train_batches=batches, checkpoint_dir=tmp_path / "c", **overrides)
  assert batches.steps == []
  assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_a_non_finite_evaluation_names_the_batch():
  eval_step = jaxprune.training.make_eval_step(lambda p, b: np.float32(1.0) / b["d"])
  with pytest.raises(FloatingPointError, match=r"the loss of eval batch 1 is inf"):
    jaxprune.training.evaluate(eval_step, {}, [{"d": np.float32(1.0)}, {"d": np.float32(0.0)}])


PARAMS = tiny_runs.make_params()
WHERE = jaxprune.select(PARAMS)
WRONG_SHAPE = jaxprune.ranked_masks(PARAMS, 0.5, WHERE)
WRONG_SHAPE["fc1"]["kernel"] = np.ones((8, 15), bool)
UNSELECTED = jaxprune.ranked_masks(PARAMS, 0.5, jaxprune.select(PARAMS, include="fc1"))

SCHEDULES = {
    "drop and grow": ([0.5, jaxprune.sparse_training.DropAndGrow(0.3,
                                                                 jaxprune.scores.random_score(0))],
                      r"targets\[1\] = .*drop and grow moves kept weights.*jaxprune.train"),
    "given masks of the wrong shape": ([jaxprune.GivenMasks(WRONG_SHAPE)],
                                       r"targets\[0\] \(GivenMasks\).*fc1/kernel"),
    "given masks missing a selected leaf": ([jaxprune.GivenMasks(UNSELECTED)],
                                            r"targets\[0\] = GivenMasks at fc2/kernel: no "
                                            r"mask for a leaf `where` selects"),
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_a_schedule_entry_prune_retrain_cannot_run_is_refused_before_compute(case):
  schedule, message = SCHEDULES[case]
  batches = Batches()
  with pytest.raises(ValueError, match=message):
    tiny_runs.prune_retrain(targets=schedule, train_batches=batches)
  assert batches.steps == []


@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_a_loss_taking_rng_gets_the_documented_per_step_key(driver):
  # The drivers take no seed: step g's key is fold_in(key(0), g); a loss wanting another
  # stream folds its own seed into it.
  seen = []

  def loss(params, batch, rng=None):
    if rng is not None:  # evaluations pass none
      jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(rng))
    return tiny_runs.loss_fn(params, batch)

  driver(loss_fn=loss, steps=2) if driver is tiny_runs.train else driver(
      loss_fn=loss, retrain_steps=1)
  jax.effects_barrier()
  want = [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(0), g)))
          for g in range(2)]
  assert len(seen) == 2 and all(np.array_equal(a, b) for a, b in zip(seen, want))


@pytest.mark.parametrize("seed", [0.5, 3])
@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_a_seed_is_no_longer_taken(driver, seed):
  with pytest.raises(TypeError, match="seed"):
    driver(seed=seed, optimizer=optax.adam(1e-2))


@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_a_non_array_leaf_is_named_before_the_first_step(tmp_path, driver):
  params = tiny_runs.make_params()
  params["fc1"]["activation"] = np.tanh  # an Equinox module's function, say
  batches = Batches()
  extra = {} if driver is tiny_runs.train else {"where": jaxprune.select(tiny_runs.make_params())}
  with pytest.raises(ValueError, match=r"non-array leaf at \['fc1'\]\['activation'\] "
                     r"\(ufunc\).*eqx.partition"):
    driver(params=params, train_batches=batches, checkpoint_dir=tmp_path / "c", **extra)
  assert batches.steps == []

"""The loop reports losses and a named metric: the loss, perplexity, or one the loss computes."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune

W = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc1": {"kernel": jax.random.normal(k1, (6, 16)) * 0.5},
          "fc2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.5}}


def batch_at(step):
  x = np.random.default_rng(step).normal(size=(32, 6)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ W, axis=-1).astype(np.int32)}


EVAL = [batch_at(10_000 + i) for i in range(3)]


def classifier_loss(params, batch):
  logits = jnp.tanh(batch["x"] @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, {"accuracy": jnp.mean(logits.argmax(-1) == batch["y"])}


def numpy_accuracy(params, batches):
  """The mean over batches of each batch's accuracy, in NumPy."""
  k1, k2 = (np.asarray(params[n]["kernel"], np.float64) for n in ("fc1", "fc2"))
  return float(np.mean([np.mean((np.tanh(b["x"] @ k1) @ k2).argmax(-1) == b["y"])
                        for b in batches]))


def run(metric, **kwargs):
  return jaxprune.prune_retrain(
      make_params(), classifier_loss, batch_at, EVAL, optimizer=optax.adam(1e-2),
      targets=[0.5, 0.9], where=jaxprune.select(make_params()), retrain_steps=15,
      metric=metric, hooks=[], **kwargs)


@pytest.fixture(scope="module")
def accuracy_run():
  return run(jaxprune.training.aux_metric("accuracy"))


def test_accuracy_is_the_mean_of_what_the_loss_computes(accuracy_run):
  result = accuracy_run
  params0 = make_params()
  assert result.dense.metric == pytest.approx(numpy_accuracy(params0, EVAL), abs=1e-6)
  assert result.final.metric == pytest.approx(numpy_accuracy(result.params, EVAL), abs=1e-6)
  # Not the loss: the metric and the loss are different figures of the same pass.
  for row in result.history:
    for phase in (row.before_prune, row.after_prune, row.after_retrain):
      assert 0.0 <= phase.metric <= 1.0 and phase.metric != phase.loss
  # Higher is better: degradation is 1 - final/dense.
  assert result.metric.higher_is_better
  assert result.degradation == pytest.approx(1 - result.final.metric / result.dense.metric)
  text = result.summary()
  assert "accuracy before" in text and "dense accuracy" in text and "perplexity" not in text


def test_perplexity_is_exp_of_the_mean_loss_and_lower_is_better():
  result = run(jaxprune.training.perplexity)
  for row in result.history:
    for phase in (row.before_prune, row.after_prune, row.after_retrain):
      assert phase.metric == math.exp(phase.loss)
  assert result.degradation == pytest.approx(result.final.metric / result.dense.metric - 1)
  assert "perplexity before" in result.summary()


def test_the_default_metric_is_the_loss_and_records_round_trip_json(accuracy_run):
  result = run(jaxprune.training.loss_metric)
  assert all(r.after_retrain.metric == r.after_retrain.loss for r in result.history)
  # Same params, same data: the loss figures agree with the accuracy run's.
  assert [r.after_retrain.loss for r in result.history] == [
      r.after_retrain.loss for r in accuracy_run.history]
  for row in accuracy_run.history:
    assert jaxprune.training.IterationRecord.from_json(row.to_json()) == row


def test_bad_metrics_are_named():
  with pytest.raises(TypeError,
                     match=r"metric must be a jaxprune\.training\.Metric.*'perplexity'"):
    run("perplexity")
  with pytest.raises(ValueError, match=r"aux\['recall'\].*keys \['accuracy'\]"):
    run(jaxprune.training.aux_metric("recall"))


def test_resume_with_another_metric_is_refused(tmp_path):
  run(jaxprune.training.loss_metric, checkpointer=jaxprune.Checkpointer(str(tmp_path)))
  with pytest.raises(ValueError, match='metric is "loss" there and "perplexity" now'):
    run(jaxprune.training.perplexity, checkpointer=jaxprune.Checkpointer(str(tmp_path)))


def _result(metric, dense, final):
  before = jaxprune.training.Evaluation(dense, dense)
  record = jaxprune.training.IterationRecord(
      0, "50.00%", 0.5, 0.5, before, before, jaxprune.training.Evaluation(final, final), 1, 0.0)
  return jaxprune.training.PruneRetrainResult(None, None, [record], metric, None)


@pytest.mark.parametrize("metric, dense, final, expected", [
    (jaxprune.training.loss_metric, 2.0, 2.5, 0.25),
    (jaxprune.training.loss_metric, -2.0, -2.5, -0.25),  # a negative loss that fell: better
    (jaxprune.training.loss_metric, -2.0, -1.5, 0.25),
    (jaxprune.training.loss_metric, 0.0, 0.0, 0.0),
    (jaxprune.training.loss_metric, 0.0, 0.1, math.inf),
    (jaxprune.training.aux_metric("accuracy"), 0.8, 0.6, 0.25),
    (jaxprune.training.aux_metric("accuracy"), 0.0, 0.1, -math.inf),
])
def test_degradation_is_the_relative_change_for_the_worse(metric, dense, final, expected):
  assert _result(metric, dense, final).degradation == pytest.approx(expected)


def test_eval_step_checks_its_metric_and_evaluate_uses_it():
  params = make_params()
  vector = jaxprune.training.Metric("per example", of_batch=lambda loss,
                                    aux: aux["accuracy"] * jnp.ones(3))
  with pytest.raises(ValueError, match="metric 'per example' gave a value of shape \\(3,\\)"):
    jaxprune.training.make_eval_step(classifier_loss, vector)(params, EVAL[0])
  accuracy = jaxprune.training.aux_metric("accuracy")
  eval_step = jaxprune.training.make_eval_step(classifier_loss, accuracy)
  assert jaxprune.training.evaluate(eval_step, params, EVAL).metric == pytest.approx(
      numpy_accuracy(params, EVAL), abs=1e-6)
  with pytest.raises(ValueError, match="computes metric 'accuracy', not 'perplexity'"):
    jaxprune.training.evaluate(eval_step, params, EVAL, jaxprune.training.perplexity)
  with pytest.raises(ValueError, match="no batches"):
    jaxprune.training.evaluate(eval_step, params, [])


def test_aux_metric_reads_any_mapping():
  frozen = types.MappingProxyType({"accuracy": jnp.float32(0.5)})
  assert float(jaxprune.training.aux_metric("accuracy").of_batch(jnp.float32(1.0), frozen)) == 0.5

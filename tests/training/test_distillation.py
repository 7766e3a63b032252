"""Distillation from the dense teacher during retraining."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune.training import distillation_loss, kl_to_teacher


def test_kl_is_zero_for_identical_outputs_and_positive_otherwise():
  logits = jax.random.normal(jax.random.key(0), (4, 7, 11))
  assert float(kl_to_teacher(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
  other = logits + jax.random.normal(jax.random.key(1), logits.shape)
  assert float(kl_to_teacher(other, logits, 2.0)) > 1e-3


def test_kl_matches_the_definition():
  s = jnp.array([[1.0, 2.0, 0.5]])
  t = jnp.array([[0.2, 1.5, 1.0]])
  temp = 3.0
  p = np.exp(np.asarray(t) / temp)
  p /= p.sum()
  q = np.exp(np.asarray(s) / temp)
  q /= q.sum()
  expected = temp**2 * float(np.sum(p * (np.log(p) - np.log(q))))
  assert float(kl_to_teacher(s, t, temp)) == pytest.approx(expected, rel=1e-5)


def test_no_gradient_reaches_the_teacher():
  t = jnp.array([[0.2, 1.5, 1.0]])
  grad_t = jax.grad(lambda t: kl_to_teacher(jnp.zeros((1, 3)), t))(t)
  np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


@pytest.mark.parametrize("weight, temperature, named", [(-0.1, 1.0, "weight"), (1.5, 1.0, "weight"),
                                                        (0.5, 0.0, "temperature")])
def test_bad_distillation_settings_are_refused(weight, temperature, named):
  # The message names the argument as this function calls it.
  with pytest.raises(ValueError, match=rf"^{named} must be"):
    distillation_loss(lambda p, b: 0.0, lambda p, b: b, weight=weight, temperature=temperature)


def _problem():
  params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (8, 32)) * 0.4},
            "fc2": {"kernel": jax.random.normal(jax.random.key(1), (32, 5)) * 0.4}}
  x = jax.random.normal(jax.random.key(2), (128, 8))
  labels = jnp.argmax(x[:, :5], axis=-1)

  def apply_fn(p, batch):
    return jax.nn.relu(batch[0] @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch), batch[1]).mean()

  def batch_at(step):
    i = (step * 16) % 128
    return x[i:i + 16], labels[i:i + 16]

  return params, apply_fn, loss_fn, batch_at, [(x, labels)]


def _run(teacher=None, weight=0.5):
  params, apply_fn, loss_fn, batch_at, evals = _problem()
  if teacher is not None:  # the dense params teach (temperature 2, as before)
    loss_fn = jaxprune.distillation_loss(loss_fn, apply_fn, weight=weight, temperature=2.0)
    batch_at = jaxprune.training.with_teacher_logits(batch_at, apply_fn, params)
  return jaxprune.prune_retrain(
      params, loss_fn, batch_at, evals, optimizer=optax.adam(1e-2), targets=[0.5, 0.8],
      where=jaxprune.select(params), retrain_steps=15, hooks=[])


def test_distillation_with_zero_weight_is_plain_retraining():
  plain, zero = _run(), _run(teacher=True, weight=0.0)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(zero.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_distillation_changes_retraining_and_keeps_masks_exact():
  plain, distilled = _run(), _run(teacher=True, weight=0.7)
  assert distilled.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
  differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(plain.params),
                                                    jax.tree.leaves(distilled.params))]
  assert any(differs)
  # Pruned weights are zero whatever the loss.
  for m, w in zip(jax.tree.leaves(distilled.masks),
                  [distilled.params["fc1"]["kernel"], distilled.params["fc2"]["kernel"]]):
    assert not np.asarray(w)[~np.asarray(m)].any()


def test_teacher_logits_of_an_equinox_module_with_non_array_leaves():
  import equinox as eqx

  mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, activation=jax.nn.gelu, key=jax.random.key(0))
  apply_fn = lambda model, x: jax.vmap(model)(x)
  x = jnp.ones((5, 3))
  batches = jaxprune.training.with_teacher_logits(lambda step: x + step, apply_fn, mlp)
  for step in (0, 1):
    taught = batches(step)
    np.testing.assert_array_equal(taught.batch, x + step)
    np.testing.assert_allclose(taught.teacher_logits, apply_fn(mlp, x + step), rtol=1e-6)

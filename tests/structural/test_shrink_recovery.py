"""Recovery of a shrunk model by distillation from the dense one (issue 30), on the
zoo's frameworks: `train` with `distillation_loss` on the shrunk params and the
shrunk program lowers the KL to the teacher, and a run stopped at a checkpoint and
resumed ends bitwise equal to one that was not stopped."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import eqx_mlp, linen_resnet, nnx_gqa_lm

import jaxprune

MODELS = {"equinox": eqx_mlp, "linen": linen_resnet, "nnx_scan": nnx_gqa_lm}
STEPS = 6


def _inputs(example, step):
  """A deterministic batch per step, shaped like the example input."""
  key = jax.random.fold_in(jax.random.key(7), step)
  if jnp.issubdtype(example.dtype, jnp.integer):
    return jax.random.randint(key, example.shape, 0, int(example.max()) + 1, example.dtype)
  return jax.random.normal(key, example.shape, example.dtype)


def _arrays_only(name):
  """The model's params as `train` takes them: for Equinox, the module's arrays
  (`eqx.partition`), the rest closed over by the forward pass."""
  apply_fn, params, (example,) = MODELS[name].build()
  if name != "equinox":
    return apply_fn, params, example
  arrays, static = eqx.partition(params, eqx.is_array)
  return (lambda p, x: apply_fn(eqx.combine(p, static), x)), arrays, example


@pytest.fixture(scope="module", params=sorted(MODELS))
def recovery(request):
  apply_fn, params, example = _arrays_only(request.param)
  groups = jaxprune.structural.channel_groups(apply_fn, params, example)
  keep = jaxprune.structural.keep_top(groups, jaxprune.structural.magnitude_importance(groups,
                                                                                       params), 0.5,
                           kinds=("mlp_hidden", "heads", "conv_channels"))
  assert keep, str(groups)
  student = jaxprune.structural.shrunk_program(groups, keep)
  batch_at = jaxprune.training.with_teacher_logits(lambda step: _inputs(example, step),
                                                   apply_fn, params)
  # No labels here: the loss is the KL to the teacher alone (weight 1).
  loss = jaxprune.distillation_loss(lambda p, x: (jnp.float32(0.0), {"logits": student(p, x)}),
                                    student, weight=1.0, temperature=2.0)
  return jaxprune.structural.shrink(params, groups, keep), loss, batch_at


def _train(recovery, steps, directory=None, hooks=()):
  small, loss, batch_at = recovery
  checkpointer = None if directory is None else jaxprune.Checkpointer(directory, every=2)
  return jaxprune.train(small, loss, batch_at, optimizer=optax.adam(1e-2), steps=steps,
                        checkpointer=checkpointer,
                        hooks=[jaxprune.training.every(1, hook) for hook in hooks])


def test_distillation_recovers_the_shrunk_model(recovery):
  small, loss, batch_at = recovery
  before = float(loss(small, batch_at(0))[0])
  after = float(loss(_train(recovery, STEPS).params, batch_at(0))[0])
  assert np.isfinite(before) and after < before


class _StopError(Exception):
  pass


def _stop_at(step: int):
  def hook(report):
    if report.step == step:
      raise _StopError
  return hook


def test_recovery_resumes_bitwise(recovery, tmp_path):
  straight = _train(recovery, STEPS, str(tmp_path / "a"))
  with pytest.raises(_StopError):  # a killed run: stopped after step 4, its checkpoint written
    _train(recovery, STEPS, str(tmp_path / "b"), hooks=[_stop_at(4)])
  resumed = _train(recovery, STEPS, str(tmp_path / "b"))
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

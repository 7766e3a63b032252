"""Knowledge distillation from the dense model while the pruned one retrains."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._src.oneshot.layouts import array_forward, is_array_leaf
from jaxprune._src.tree.mask_tree import slots
from jaxprune._src.types import ApplyFn, PyTree


def kl_to_teacher(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 2.0
) -> jax.Array:
  """Mean over positions of `T^2 * KL(softmax(t/T) || softmax(s/T))`.

  The `T^2` factor (Hinton et al., 2015) keeps the gradient scale of the soft term
  comparable to the hard loss as `T` changes.

  Args:
    student_logits: `[..., vocab]`.
    teacher_logits: same shape; no gradient flows into it.
    temperature: `T > 0`.

  Returns:
    A scalar, in nats.

  Example::

    >>> jaxprune.training.kl_to_teacher(jnp.zeros((2, 5)), jnp.zeros((2, 5)))   # same outputs -> 0
    Array(0., dtype=float32)
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def takes_rng(loss_fn: Callable[..., Any]) -> bool:
  """Does `loss_fn` have a parameter named `rng` (the per-step key of the loop)?"""
  try:
    return "rng" in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    return False


def distillation_loss(
    loss_fn: Callable[..., Any], apply_fn: ApplyFn, *, weight: float, temperature: float
) -> Callable[[PyTree, dict], tuple[jax.Array, dict]]:
  """`(1 - weight) * loss_fn + weight * kl_to_teacher`, over `{"batch", "teacher_logits"}`.

  The returned loss takes `(params, {"batch": batch, "teacher_logits": logits})`,
  with `logits = apply_fn(teacher_params, batch)` computed *before* the gradient
  (`teacher_logits_fn`), so the teacher is never traced inside `jax.grad` (where an
  `nnx.scan` model, for one, refuses to run on params it does not differentiate)
  and costs one forward pass. Student logits come from `loss_fn`'s aux
  (`(loss, {"logits": ...})`) when it returns them, else from `apply_fn(params, batch)`.

  The returned loss takes an `rng` keyword and hands it to `loss_fn` when `loss_fn`
  has an `rng` parameter, so dropout stays on while distilling (the teacher and an
  `apply_fn` call run without it: deterministic).

  Raises:
    ValueError: `weight` outside [0, 1] or `temperature <= 0`.
  """
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight must be in [0, 1], got {weight!r}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")

  wants_rng = takes_rng(loss_fn)

  def loss(params: PyTree, inputs: dict, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    batch = inputs["batch"]
    out = loss_fn(params, batch, rng=rng) if wants_rng else loss_fn(params, batch)
    hard, aux = out if isinstance(out, tuple) else (out, None)
    student = aux.get("logits") if isinstance(aux, dict) else None
    if student is None:
      student = apply_fn(params, batch)
    soft = kl_to_teacher(student, inputs["teacher_logits"], temperature)
    return (1.0 - weight) * hard + weight * soft, {"hard_loss": hard, "distill_loss": soft}

  return loss


def teacher_logits_fn(apply_fn: ApplyFn) -> Callable[[PyTree, Any], jax.Array]:
  """A jitted `(teacher_params, batch) -> logits`: the teacher's forward pass, compiled once,
  whose output feeds `distillation_loss` as data (it stays on the device).

  `teacher_params` may hold non-array leaves (an Equinox module's activation
  functions): they are closed over, and the program is compiled once per structure
  and per set of such leaves.
  """
  compiled: dict = {}

  def logits(teacher_params: PyTree, batch: Any) -> jax.Array:
    theirs = slots(teacher_params)
    arrays = [i for i, x in enumerate(theirs.leaves) if x is not None and is_array_leaf(x)]
    others = tuple(_hashable(x) for i, x in enumerate(theirs.leaves) if i not in set(arrays))
    key = (theirs.treedef, tuple(arrays), others)
    if key not in compiled:  # traced once per key, not per call
      forward = array_forward(apply_fn, teacher_params).forward
      compiled[key] = jax.jit(lambda xs, b: jax.lax.stop_gradient(forward(xs, b)))
    return compiled[key]([theirs.leaves[i] for i in arrays], batch)

  return logits


def _hashable(x: Any) -> Any:
  try:
    hash(x)
    return x
  except TypeError:
    return id(x)

"""Knowledge distillation: a loss blended with the teacher's soft targets, and the
batches that carry the teacher's logits to it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

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

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
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


class TeacherBatch(NamedTuple):
  """A training batch with the teacher's logits on it (`with_teacher_logits`)."""

  batch: Any
  teacher_logits: jax.Array


class DistillationLoss:
  """`distillation_loss`'s loss: blended on a `TeacherBatch`, `loss_fn` alone on any
  other batch (so the same loss evaluates on plain evaluation batches)."""

  def __init__(self, loss_fn: Callable[..., Any], apply_fn: ApplyFn, weight: float,
               temperature: float):
    self.loss_fn, self.apply_fn = loss_fn, apply_fn
    self.weight, self.temperature = weight, temperature
    self._wants_rng = takes_rng(loss_fn)

  def _student(self, params: PyTree, batch: Any, rng: jax.Array | None) -> Any:
    return self.loss_fn(params, batch, rng=rng) if self._wants_rng else self.loss_fn(params, batch)

  def __call__(self, params: PyTree, inputs: Any, rng: jax.Array | None = None) -> Any:
    if not isinstance(inputs, TeacherBatch):
      return self._student(params, inputs, rng)
    out = self._student(params, inputs.batch, rng)
    hard, aux = out if isinstance(out, tuple) else (out, None)
    student = aux.get("logits") if isinstance(aux, dict) else None
    if student is None:
      student = self.apply_fn(params, inputs.batch)
    soft = kl_to_teacher(student, inputs.teacher_logits, self.temperature)
    blended = (1.0 - self.weight) * hard + self.weight * soft
    return blended, {"hard_loss": hard, "distill_loss": soft}

  def fingerprint(self) -> dict:
    """What a resumed run must share: the blend's settings."""
    return {"weight": self.weight, "temperature": self.temperature}


def distillation_loss(
    loss_fn: Callable[..., Any], apply_fn: ApplyFn, *, weight: float, temperature: float
) -> DistillationLoss:
  """`(1 - weight) * loss_fn + weight * kl_to_teacher` on batches carrying the teacher's logits.

  The returned loss takes `(params, batch)`: on a `TeacherBatch(batch,
  teacher_logits)` (what `with_teacher_logits` yields) it is the blend; on any
  other batch it is `loss_fn(params, batch)` alone, so the run's evaluation
  batches report the plain loss. The teacher's logits are computed *before* the
  gradient (`with_teacher_logits`), so the teacher is never traced inside
  `jax.grad` (where an `nnx.scan` model, for one, refuses to run on params it does
  not differentiate) and costs one forward pass. Student logits come from
  `loss_fn`'s aux (`(loss, {"logits": ...})`) when it returns them, else from
  `apply_fn(params, batch)`.

  The returned loss takes an `rng` keyword and hands it to `loss_fn` when `loss_fn`
  has an `rng` parameter, so dropout stays on while distilling (the teacher and an
  `apply_fn` call run without it: deterministic).

  Raises:
    ValueError: `weight` outside [0, 1] or `temperature <= 0`.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> loss_fn = lambda p, x: jnp.mean(apply_fn(p, x) ** 2)
    >>> params, x = {"w": jnp.ones((3, 4))}, jnp.ones((2, 3))
    >>> distilled = jaxprune.distillation_loss(loss_fn, apply_fn, weight=0.5, temperature=2.0)
    >>> batches = jaxprune.training.with_teacher_logits(lambda step: x, apply_fn, params)
    >>> loss, parts = distilled(params, batches(0))    # the teacher is the student: no KL
    >>> float(loss) == 0.5 * float(loss_fn(params, x)), float(parts["distill_loss"])
    (True, 0.0)
    >>> float(distilled(params, x)) == float(loss_fn(params, x))   # a plain batch: loss_fn
    True
  """
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight must be in [0, 1], got {weight!r}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  return DistillationLoss(loss_fn, apply_fn, weight, temperature)


class TeacherLogits:
  """`with_teacher_logits`'s batches: `step -> TeacherBatch(batch, teacher's logits)`."""

  def __init__(self, batches: Callable[[int], Any], apply_fn: ApplyFn, teacher_params: PyTree):
    self.batches, self.teacher_params = batches, teacher_params
    self._forward = teacher_logits_fn(apply_fn)

  def __call__(self, step: int) -> TeacherBatch:
    batch = self.batches(step)
    return TeacherBatch(batch, self._forward(self.teacher_params, batch))

  def fingerprint(self) -> dict:
    """What a resumed run must share: the teacher, by value."""
    return {"teacher_params": self.teacher_params}


def with_teacher_logits(batches: Callable[[int], Any], apply_fn: ApplyFn,
                        teacher_params: PyTree) -> TeacherLogits:
  """`step -> TeacherBatch(batches(step), apply_fn(teacher_params, batch))`: the
  training batches of a distilled run (`distillation_loss` reads them).

  The teacher's forward is jitted once and runs outside the gradient; its logits
  stay on the device. Place `teacher_params` as you place the student's (on a
  mesh: `jax.device_put(teacher, jaxprune.sharding.param_shardings(teacher, mesh))`).
  A run's checkpoints record the teacher by value: a resume with another teacher
  is refused.
  """
  if not callable(batches):
    raise TypeError(f"batches must be a function step -> batch, got {batches!r}")
  return TeacherLogits(batches, apply_fn, teacher_params)


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

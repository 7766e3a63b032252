"""Target sequences: the sparsities of `prune_retrain`'s iterations, by a formula.

`exponential_targets`, `geometric_keep_targets` and `polynomial_targets` are finite
sequences: `len()` is the number of prune steps, iterating gives the targets, and
calling with `i` gives `s(i)` (also for a traced `i`).

A sparsity that moves with the training step (gradual pruning in `pruned`, straight-
through training) is an optax schedule: `optax.polynomial_schedule(init_value=0.0,
end_value=0.9, power=3, transition_steps=1000)` is Zhu & Gupta's cubic ramp,
`optax.constant_schedule(0.9)` a fixed sparsity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp


def _check_target(name: str, value: float, allow_zero: bool = True) -> float:
  value = float(value)
  low_ok = value >= 0.0 if allow_zero else value > 0.0
  if not (low_ok and value < 1.0):
    bound = "[0, 1)" if allow_zero else "(0, 1)"
    raise ValueError(f"{name} must be in {bound}, got {value!r}")
  return value


class TargetSequence(Sequence):
  """A finite sequence of target sparsities `s(0), ..., s(N-1)` given by a formula.

  Subclasses define `_value(i)`, which must work for a Python int and a traced one.
  """

  def __init__(self, initial: float, final: float, num_iterations: int):
    if int(num_iterations) != num_iterations or num_iterations < 1:
      raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}")
    self.initial = float(initial)
    self.final = float(final)
    self.num_iterations = int(num_iterations)

  def _value(self, i: Any) -> Any:
    raise NotImplementedError

  def __call__(self, i: Any) -> Any:
    if isinstance(i, int) and not 0 <= i < self.num_iterations:
      raise IndexError(f"iteration {i} outside 0..{self.num_iterations - 1}")
    if self.num_iterations == 1:
      return self.final
    if isinstance(i, int) and i in (0, self.num_iterations - 1):
      # The endpoints exactly: the formulas can miss them by an ulp (0.7000000000000001).
      return self.initial if i == 0 else self.final
    return self._value(i)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self(j) for j in range(*i.indices(len(self)))]
    if i < 0:
      i += len(self)
    return self(i)

  def __len__(self) -> int:
    return self.num_iterations

  def __iter__(self) -> Iterator[float]:
    return (self(i) for i in range(self.num_iterations))

  def __repr__(self) -> str:
    targets = ", ".join(f"{s:.4f}" for s in self)
    return (
        f"{type(self).__name__}(initial={self.initial}, final={self.final}, "
        f"num_iterations={self.num_iterations}) = [{targets}]"
    )


def _pow(base: float, exponent: Any) -> Any:
  return base**exponent if isinstance(exponent, (int, float)) else jnp.power(base, exponent)


class ExponentialTargets(TargetSequence):
  """`s(i) = initial * (final / initial) ** (i / (N - 1))`."""

  def _value(self, i):
    # Clipped to [initial, final]: for initial within an ulp of final, rounding in
    # the power could step outside and make the schedule decrease.
    value = self.initial * _pow(self.final / self.initial, i / (self.num_iterations - 1))
    if isinstance(value, float):
      return min(max(value, self.initial), self.final)
    return jnp.clip(value, self.initial, self.final)


class GeometricKeepTargets(TargetSequence):
  """The kept fraction decays geometrically: `1 - s(i) = (1-s0) * ((1-sf)/(1-s0)) ** (i/(N-1))`."""

  def _value(self, i):
    keep0, keepf = 1.0 - self.initial, 1.0 - self.final
    return 1.0 - keep0 * _pow(keepf / keep0, i / (self.num_iterations - 1))


class PolynomialTargets(TargetSequence):
  """`s(i) = sf + (s0 - sf) * (1 - i/(N-1)) ** power` (power 3: Zhu & Gupta's ramp)."""

  def __init__(self, initial: float, final: float, num_iterations: int, power: float = 3):
    super().__init__(initial, final, num_iterations)
    self.power = power

  def _value(self, i):
    progress = i / (self.num_iterations - 1)
    return self.final + (self.initial - self.final) * (1 - progress) ** self.power


def _iteration_args(initial: float, final: float, allow_zero: bool) -> tuple[float, float]:
  initial = _check_target("initial", initial, allow_zero=allow_zero)
  final = _check_target("final", final)
  if initial > final:
    raise ValueError(f"initial ({initial}) must not exceed final ({final})")
  return initial, final


def exponential_targets(initial: float, final: float, num_iterations: int) -> ExponentialTargets:
  """Exponential-in-sparsity targets: `s(i) = initial * (final/initial) ** (i/(N-1))`.

  For `i = 0..N-1`; `N = 1` gives `[final]`. The ratio between consecutive targets is
  constant, so the last prune step is the largest in absolute terms.

  Args:
    initial: `s(0)`, in (0, final].
    final: `s(N-1)`, in [initial, 1).
    num_iterations: N >= 1.

  Returns:
    A sequence: `len(s) == N`, `list(s)` the targets, `s(i)` one target.

  Examples:
    >>> from jaxprune.schedules import exponential_targets
    >>> list(exponential_targets(0.2, 0.8, 3))
    [0.2, 0.4, 0.8]
  """
  initial, final = _iteration_args(initial, final, allow_zero=False)
  return ExponentialTargets(initial, final, num_iterations)


def geometric_keep_targets(
    initial: float, final: float, num_iterations: int
) -> GeometricKeepTargets:
  """Targets whose *kept* fraction shrinks by a constant factor each iteration.

  `s(i) = 1 - (1 - initial) * ((1 - final) / (1 - initial)) ** (i / (N - 1))`, the
  rate of iterative magnitude pruning (each step removes the same share of what is
  left), so early steps prune more weights than late ones.

  Examples:
    >>> from jaxprune.schedules import geometric_keep_targets
    >>> [round(s, 3) for s in geometric_keep_targets(0.2, 0.8, 3)]
    [0.2, 0.6, 0.8]
  """
  initial, final = _iteration_args(initial, final, allow_zero=True)
  return GeometricKeepTargets(initial, final, num_iterations)


def polynomial_targets(initial: float, final: float, num_iterations: int,
                       power: float = 3) -> PolynomialTargets:
  """A polynomial ramp over iterations: `s(i) = sf + (s0 - sf) (1 - i/(N-1)) ** power`.

  `power=3` is Zhu & Gupta's cubic ramp, fast early and slow late, per iteration
  of `prune_retrain` (per training step it is `optax.polynomial_schedule`).

  Examples:
    >>> from jaxprune.schedules import polynomial_targets
    >>> [round(s, 3) for s in polynomial_targets(0.0, 0.8, 3)]
    [0.0, 0.7, 0.8]
  """
  initial, final = _iteration_args(initial, final, allow_zero=True)
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
    raise ValueError(f"power must be a number > 0, got {power!r}")
  return PolynomialTargets(initial, final, num_iterations, power)

"""Pruning methods as values: a target knows how to compute masks from params.

A *target* is any object with a nominal `sparsity` and a method
`masks(params, where, previous) -> mask tree` (the `Target` protocol). Schedule
entries of `prune_retrain`, `prune_step`, and the schedule of `gradually_pruned`
all take targets, so a new criterion is a new value, not a new keyword:

* `Prune(sparsity, score=..., scope="layer", distribution=...)`: exactly
  `round(sparsity * n)` lowest scores (`|w|` by default) per leaf (`"layer"`), over
  all selected leaves (`"global"`), per row, block or channel;
* `NM(n, m, axis=-2)`: the `n` largest magnitudes of every `m` consecutive weights
  along `axis` (the input axis: -2 for Flax kernels, -1 for Equinox weights).

A float is shorthand for `Prune(float)` and a string `"n:m"` for `NM(n, m)`
(`as_target`). Targets are pytrees: `Prune`'s sparsity is a leaf, so one
compiled prune step serves every sparsity of a schedule; everything else is
static.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
  ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
  >>> where = jaxprune.select(params)
  >>> masks = jaxprune.Prune(0.5, scope="global").masks(params, where)
  >>> masks = jaxprune.NM(2, 4).masks(params, where, previous=masks)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from jaxprune._src.engine.stacked_layers import check_stacked
from jaxprune._src.methods.distributions import uniform
from jaxprune._src.methods.masks import (
  check_fraction,
  check_scope,
  ranked_masks,
)
from jaxprune._src.methods.scores import (
  MagnitudeScore,
  Score,
  magnitude_score,
  needs_gradients,
  score_name,
  with_step_gradients,
)
from jaxprune._src.methods.structured import check_nm, nm_masks
from jaxprune._src.types import PyTree


@runtime_checkable
class Target(Protocol):
  """What a pruning method provides: a nominal sparsity and a mask computation.

  `masks` must return a mask tree of `params` (bool arrays for the leaves `where`
  selects, `None` elsewhere) that keeps no weight `previous` pruned, and must be
  jittable when the target's pytree leaves are traced.
  """

  @property
  def sparsity(self) -> Any: ...

  def masks(self, params: PyTree, where: Any, previous: PyTree | None = None) -> PyTree: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prune:
  """Prune exactly the lowest-`score` weights (see `ranked_masks`).

  `sparsity` and `score` (with the arrays it carries: gradients, a key) are pytree
  leaves, so one compiled prune step serves a whole schedule; `scope` ("layer",
  "global", "row", `blocks(...)`, `channels(...)`), `distribution`, `axis` (row
  scope's) and `stacked` (`{pattern: k}`: leading axes of stacked layers, see
  `ranked_masks`) are static.
  A scope other than those is refused when the target is made (ValueError listing
  them).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> where = jaxprune.select(params)
    >>> target = jaxprune.Prune(0.8, distribution=jaxprune.distributions.erk())
    >>> masks = target.masks(params, where)
  """

  sparsity: Any
  score: Any = dataclasses.field(default_factory=magnitude_score)
  scope: str = dataclasses.field(default="layer", metadata={"static": True})
  distribution: Any = dataclasses.field(default_factory=uniform, metadata={"static": True})
  axis: Any = dataclasses.field(default=None, metadata={"static": True})
  stacked: Any = dataclasses.field(default=(), metadata={"static": True})

  def __post_init__(self):
    # A scope typo, or a scope given where the score goes (`Prune(s, "global")`), is
    # refused here, before any compute.
    check_scope(self.scope, structured=True)
    if not isinstance(self.score, Score):
      raise TypeError(f"Prune's score must be a score (jaxprune.scores.magnitude_score(), "
                      f"saliency_score(), ...), got {self.score!r}; a scope is a keyword: "
                      f"Prune(s, scope=...)")
    # A dict is accepted but held as a tuple: static fields must hash.
    object.__setattr__(self, "stacked", check_stacked(self.stacked))

  def masks(self, params: PyTree, where: Any, previous: PyTree | None = None) -> PyTree:
    return ranked_masks(params, self.sparsity, where, score=self.score, scope=self.scope,
                        distribution=self.distribution, previous=previous, axis=self.axis,
                        stacked=self.stacked)

  def __str__(self) -> str:
    s = self.sparsity
    parts = [f"{s:.2%}" if isinstance(s, float) else "traced"]
    if not isinstance(self.score, MagnitudeScore):
      parts.append(score_name(self.score))
    if self.distribution != uniform():
      parts.append(type(self.distribution).__name__)
    if self.scope != "layer":
      parts.append(str(self.scope) if self.scope != "row" or self.axis in (None, -2)
                   else "row by layout" if isinstance(self.axis, Mapping)
                   else f"row axis {self.axis}")
    if self.stacked:
      parts.append("per stacked layer")
    return " ".join(parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NM:
  """At most `n` kept in every group of `m` along `axis` (see `nm_masks`), ranked by
  `|w|` or by `score`. `n`, `m`, `axis` are static."""

  n: int = dataclasses.field(metadata={"static": True})
  m: int = dataclasses.field(metadata={"static": True})
  axis: Any = dataclasses.field(default=None, metadata={"static": True})
  score: Any = None  # ranked by |w| when None (a pytree leaf otherwise: e.g. Wanda's norms)

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def masks(self, params: PyTree, where: Any, previous: PyTree | None = None) -> PyTree:
    return nm_masks(params, self.n, self.m, where, axis=self.axis, previous=previous,
                    score=self.score)

  def __str__(self) -> str:
    scored = "" if self.score is None else f" {score_name(self.score)}"
    along = ("" if self.axis in (None, -2) else " by layout" if isinstance(self.axis, Mapping)
             else f" axis {self.axis}")
    return f"{self.n}:{self.m}{along}{scored}"


@dataclasses.dataclass(frozen=True, eq=False)
class GivenMasks:
  """Masks computed beforehand (`sparsegpt`'s, your own) as a target: `masks` returns
  them (and with `previous`, their intersection). `sparsity` is their pruned
  fraction of the selected weights. Not a pytree: the loop closes over it.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> where = jaxprune.select(params)
    >>> target = jaxprune.GivenMasks(jaxprune.ranked_masks(params, 0.5, where))
    >>> round(target.sparsity, 2)
    0.5
  """

  given: PyTree

  @property
  def sparsity(self) -> float:
    leaves = [np.asarray(m) for m in jax.tree.leaves(self.given)]
    total = sum(m.size for m in leaves)
    return float(sum(int((~m).sum()) for m in leaves) / total) if total else 0.0

  def masks(self, params: PyTree, where: Any, previous: PyTree | None = None) -> PyTree:
    if previous is None:
      return self.given
    return jax.tree.map(lambda a, b: a & b, self.given, previous)

  def __str__(self) -> str:
    return f"{self.sparsity:.2%} given masks"


# The fields of a target that may hold a score waiting for the step's gradients:
# `Prune`'s ranking score, `DropAndGrow`'s regrowth score.
_SCORE_FIELDS = ("score", "grow")


def ranks_plain_magnitude(target: Any) -> bool:
  """Is `target` a `Prune` by `|w|` over whole leaves or all of them (uniform, no
  rows, blocks, channels or stacks), the case the held-mask selection computes?"""
  return (type(target) is Prune and isinstance(target.score, MagnitudeScore)
          and target.scope in ("layer", "global") and target.distribution == uniform()
          and target.axis is None and not target.stacked)


def with_gradients(target: Target, grads: PyTree) -> Target:
  """`target` scoring by `grads` where a score of it waits for the step's gradients
  (`Prune(s, score=saliency_score())`, RigL's `gradient_score()`), else `target`."""
  if not needs_step_gradients(target):
    return target
  return dataclasses.replace(target, **{
      f: with_step_gradients(getattr(target, f), grads)
      for f in _SCORE_FIELDS if needs_gradients(getattr(target, f, None))})


def needs_step_gradients(target: Any) -> bool:
  """Does `target` score by the gradients of the step that prunes?"""
  return dataclasses.is_dataclass(target) and any(
      needs_gradients(getattr(target, f, None)) for f in _SCORE_FIELDS)


def as_target(entry: Any, name: str = "target") -> Target:
  """`entry` as a target: a `Target` as is, a real number as `Prune(entry)`,
  `"n:m"` as `NM(n, m)`.

  Concrete values are checked here (before any compute): a sparsity must be a real
  number in [0, 1), not a bool or a numeric string; `n:m` needs `0 < n < m`.

  Raises:
    ValueError, naming `name` and the value.
  """
  if isinstance(entry, Target) and not isinstance(entry, (str, numbers.Real)):
    if isinstance(entry, Prune):
      check_scope(entry.scope, structured=True)
      return dataclasses.replace(entry, sparsity=_checked_sparsity(entry.sparsity, name))
    if isinstance(entry, NM):
      _check_pattern(entry.n, entry.m, name, entry)
    return entry
  if isinstance(entry, str) and ":" in entry:
    try:
      n, m = (int(v) for v in entry.split(":"))
    except ValueError:
      raise ValueError(f"{name} = {entry!r}: an N:M pattern looks like '2:4'") from None
    _check_pattern(n, m, name, entry)
    return NM(n, m)
  scalar_array = isinstance(entry, (jax.Array, np.ndarray)) and np.shape(entry) == ()
  if isinstance(entry, (bool, str)) or not (isinstance(entry, numbers.Real) or scalar_array):
    raise ValueError(
        f"{name} = {entry!r} is neither a sparsity (a number), 'n:m', nor a target "
        "(jaxprune.Prune, jaxprune.NM, ...)"
    )
  return Prune(_checked_sparsity(entry, name))


def _checked_sparsity(value: Any, name: str) -> Any:
  """A concrete sparsity as a Python float in [0, 1); a traced one as given."""
  try:
    return check_fraction(name, value)
  except TypeError:
    raise ValueError(f"{name} = {value!r}: a sparsity must be a real number") from None
  except ValueError:
    raise ValueError(f"{name} = {value!r} is outside [0, 1)") from None


def _check_pattern(n: Any, m: Any, name: str, shown: Any) -> None:
  try:
    check_nm(n, m)
  except ValueError as err:
    raise ValueError(f"{name} = {shown!r}: {err}") from None

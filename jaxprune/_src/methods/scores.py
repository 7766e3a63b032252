"""What a weight is worth: scores the selection ranks (lowest pruned first).

A *score* is a value with `scores(params, paths) -> list`, one float array per
selected leaf (in the order given), or None for a leaf ranked by `|w|` itself
(no array is built for it). Scores are pytrees: the arrays they carry (gradients,
a random key, a user's tree) are leaves, so a target holding one can be traced.

* `magnitude_score()`: `|w|` (the default of every target).
* `saliency_score(grads)`: `|w * g|` (first-order Taylor, JaxPruner's saliency), `grads`
  a pytree of `params`' structure (e.g. from `mean_gradients`). `saliency_score()`
  (no grads) takes the gradients of the step that prunes: in `gradually_pruned`
  the step's gradient (one batch); in `prune_retrain`, the gradient of the
  iteration's first retraining batch, before each prune.
* `gradient_score(grads)`: `|g|`, what RigL regrows by (`jaxprune.sparse_training.DropAndGrow`);
  `gradient_score()` takes the step's gradients in `pruned`, as `saliency_score()`.
* `random_score(seed)`: uniform in [0, 1), independent per leaf and reproducible
  from the seed (leaf `i` draws from `fold_in(key(seed), i)`).
* `given_score(tree)`: a user's score tree of `params`' structure (any float values,
  negative ones included; ranked by value).
* `normalized_score(inner)`: `inner`'s scores divided per leaf by their L2 norm
  (JaxPruner's global pruners do this by default), for global scope across
  leaves of different scales.

Scores are ranked by value through order-preserving uint32 keys (any float dtype
through float32, as magnitudes); NaN ranks above +inf (kept last), -0.0 as 0.0.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.oneshot.input_statistics import LeafStatistics, check_leaf_statistics
from jaxprune._src.tree.mask_tree import (
  canonical_path,
  float_part,
  merge_float_part,
  resolve_where,
  slots,
)
from jaxprune._src.types import PyTree


@runtime_checkable
class Score(Protocol):
  """Scores of the selected leaves (see the module docstring)."""

  def scores(self, params: PyTree, chosen: Sequence[int]) -> list[jax.Array | None]: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MagnitudeScore:
  """`|w|`, ranked on the weights themselves (no score array)."""

  def scores(self, params, chosen):
    return [None] * len(chosen)


def magnitude_score() -> MagnitudeScore:
  """`|w|` (see the module docstring)."""
  return MagnitudeScore()


def _leaves_at(tree: PyTree, params: PyTree, chosen: Sequence[int], name: str) -> list:
  theirs, mine = slots(params), slots(tree)
  if len(mine.leaves) != len(theirs.leaves):
    raise ValueError(f"{name} must have the structure of params: {len(mine.leaves)} leaves "
                     f"against {len(theirs.leaves)}")
  out = []
  for i in chosen:
    leaf, ref = mine.leaves[i], theirs.leaves[i]
    if leaf is None or jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(f"{name} at {theirs.paths[i]} must be an array of shape "
                       f"{jnp.shape(ref)}, got {None if leaf is None else jnp.shape(leaf)}")
    out.append(leaf)
  return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Saliency:
  """`|w * g|` for gradients `grads` of `params`' structure (None: the gradients of
  the step that prunes, bound by `pruned` or `prune_retrain`)."""

  grads: PyTree = None

  def scores(self, params, chosen):
    if self.grads is None:
      raise ValueError(
          "saliency_score() without grads reads the gradients of the step that prunes: use it "
          "in `gradually_pruned`'s schedule or `prune_retrain`'s targets, or pass grads "
          "(e.g. jaxprune.scores.mean_gradients(loss_fn, params, batches))")
    weights = [slots(params).leaves[i] for i in chosen]
    grads = _leaves_at(self.grads, params, chosen, "saliency grads")
    return [jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
            for w, g in zip(weights, grads)]


def saliency_score(grads: PyTree | None = None) -> Saliency:
  """`|w * g|` (see the module docstring); without `grads`, the gradients of the
  step that prunes."""
  return Saliency(grads)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GradientMagnitude:
  """`|g|` for gradients `grads` of `params`' structure (None: the step's gradients,
  bound by `pruned`). A pruned weight is 0, so its saliency is 0 whatever its
  gradient: regrowth ranks the gradient alone."""

  grads: PyTree = None

  def scores(self, params, chosen):
    if self.grads is None:
      raise ValueError(
          "gradient_score() without grads reads the gradients of the step that updates the "
          "masks: use it in drop_and_grow's schedule (jaxprune.sparse_training.rigl_schedule), "
          "or pass grads")
    return [jnp.abs(g.astype(jnp.float32))
            for g in _leaves_at(self.grads, params, chosen, "gradient_score grads")]


def gradient_score(grads: PyTree | None = None) -> GradientMagnitude:
  """`|g|` (see the module docstring); without `grads`, the step's gradients."""
  return GradientMagnitude(grads)


def needs_gradients(score: Any) -> bool:
  """Does `score` wait for the pruning step's gradients (`saliency_score()`,
  `gradient_score()`)?"""
  return isinstance(score, (Saliency, GradientMagnitude)) and score.grads is None


def with_step_gradients(score: Any, grads: PyTree) -> Any:
  """`score` bound to `grads` if it waits for the step's gradients, else `score`."""
  return dataclasses.replace(score, grads=grads) if needs_gradients(score) else score


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RandomScores:
  """Uniform scores in [0, 1), leaf `i` from `fold_in(key, i)`."""

  key: jax.Array

  def scores(self, params, chosen):
    weights = slots(params).leaves
    return [jax.random.uniform(jax.random.fold_in(self.key, i), jnp.shape(weights[i]))
            for i in chosen]


def random_score(seed: int | jax.Array) -> RandomScores:
  """Seeded random scores (see the module docstring).

  `seed`: an integer (Python, NumPy, or a scalar integer JAX array, traced or not)
  or a PRNG key (`jax.random.key(0)`).

  Raises:
    ValueError: any other seed (a float, a bool, a string, an array of several
      values), naming it.
  """
  if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
    return RandomScores(seed)
  integral = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
  integer_array = (isinstance(seed, (jax.Array, np.ndarray)) and np.shape(seed) == ()
                   and jnp.issubdtype(seed.dtype, jnp.integer))
  if not (integral or integer_array):
    raise ValueError(f"random_score's seed must be an integer or a PRNG key "
                     f"(jax.random.key(0)), got {seed!r} ({type(seed).__name__})")
  return RandomScores(jax.random.key(seed))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Given:
  """A user's score tree of `params`' structure, ranked by value."""

  tree: PyTree

  def scores(self, params, chosen):
    return _leaves_at(self.tree, params, chosen, "given scores")


def given_score(tree: PyTree) -> Given:
  """A user's scores (see the module docstring)."""
  return Given(tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normalized:
  """`inner`'s scores of each leaf divided by their L2 norm over the leaf (+ `eps`)."""

  inner: Any
  eps: float = dataclasses.field(default=1e-8, metadata={"static": True})

  def scores(self, params, chosen):
    weights = slots(params).leaves
    raw = self.inner.scores(params, chosen)
    values = [jnp.abs(weights[i]).astype(jnp.float32) if v is None else v.astype(jnp.float32)
              for i, v in zip(chosen, raw)]
    return [v / (jnp.linalg.norm(v.reshape(-1)) + self.eps) for v in values]


def normalized_score(inner: Score | None = None, eps: float = 1e-8) -> Normalized:
  """`inner`'s scores (default `|w|`) divided per leaf by their L2 norm: what
  JaxPruner's global pruners rank by default (`use_normalization=True`), so that
  leaves of different scales compete on relative terms in global scope."""
  inner = magnitude_score() if inner is None else inner
  if not isinstance(inner, Score):
    raise TypeError(f"normalized_score wraps a score (jaxprune.scores.magnitude_score(), ...), "
                    f"got {inner!r}")
  return Normalized(inner, float(eps))


_NAMES = {"MagnitudeScore": "magnitude", "Saliency": "saliency", "GradientMagnitude": "|grad|",
          "RandomScores": "random", "Given": "given scores", "Normalized": "normalized",
          "Wanda": "wanda"}


def score_name(score: Any) -> str:
  """What a score is called in reports and target names (`"random"`, `"saliency"`)."""
  name = _NAMES.get(type(score).__name__, type(score).__name__.lower())
  return f"normalized {score_name(score.inner)}" if isinstance(score, Normalized) else name


def ranks_by(score: Any) -> str:
  """`"value"` for scores ranked by their signed value (a user's tree), else
  `"magnitude"` (magnitudes, saliencies and random draws are non-negative)."""
  if isinstance(score, Normalized):
    return ranks_by(score.inner)
  return "value" if isinstance(score, Given) else "magnitude"


def mean_gradients(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                   batches: Iterable[Any]) -> PyTree:
  """The mean of `jax.grad(loss_fn)(params, batch)` over `batches` (for `saliency`).

  One jitted gradient per batch, accumulated on device (batches of one shape
  compile once). Only floating-point leaves are differentiated; the others are
  None in the result.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8)), "y": jnp.ones((16, 4))}
    >>> def loss_fn(params, batch):
    ...   h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    ...   return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)
    >>> grads = jaxprune.scores.mean_gradients(loss_fn, params, [batch, batch])
    >>> target = jaxprune.Prune(0.5, score=jaxprune.scores.saliency_score(grads))
  """
  floats = float_part(params)
  # Only floating-point leaves are differentiated (int counters, tables and None
  # leaves get None), as in `prune_retrain`.
  grad = jax.jit(jax.grad(lambda part, batch: loss_fn(merge_float_part(params, part), batch)))
  total, count = None, 0
  for batch in batches:
    g = grad(floats, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    count += 1
  if total is None:
    raise ValueError("mean_gradients needs at least one batch")
  return jax.tree.map(lambda x: x / count, total)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Wanda:
  """`|w| * ||x_j||_2`: each weight times the norm of the input feature it multiplies
  (Sun et al. 2023), from `input_statistics`' per-feature squared norms.

  `axes`: per path, the leaf axes of its norms (stack axes, then input axes);
  `seen`: per path, `(number of stack axes, rows seen)` (a path absent: no stack
  axes, rows unknown); `why`: per path the statistics could not attribute, the
  reason (`InputStatistics.unattributed`)."""

  sq_norms: dict
  axes: tuple = dataclasses.field(metadata={"static": True})
  seen: tuple = dataclasses.field(default=(), metadata={"static": True})
  why: tuple = dataclasses.field(default=(), metadata={"static": True})

  def scores(self, params, chosen):
    theirs = slots(params)
    leaves = [self._statistics(canonical_path(theirs.paths[i])) for i in chosen]
    # Every leaf checked before any score is computed.
    for i, stat in zip(chosen, leaves):
      check_leaf_statistics(theirs.paths[i], stat, tuple(jnp.shape(theirs.leaves[i])))
    out = []
    for i, stat in zip(chosen, leaves):
      w = theirs.leaves[i]
      norms = _spread(jnp.sqrt(stat.sq_norms), stat.stack_axes + stat.feature_axes, w.ndim)
      out.append(jnp.abs(w.astype(jnp.float32)) * norms)
    return out

  def input_axes(self, path: str) -> tuple[int, ...] | None:
    """The input-feature axes of leaf `path` (what one output neuron's row of row
    scope runs along), or None if the statistics do not hold it."""
    axes = dict(self.axes).get(path)
    if axes is None:
      return None
    return axes[dict(self.seen).get(path, (0, None))[0]:]

  def _statistics(self, path: str) -> LeafStatistics:
    if path not in self.sq_norms:
      reason = dict(self.why).get(path)
      if reason is not None:
        raise ValueError(f"wanda_score has no input statistics for {path}: {reason}")
      raise ValueError(f"wanda_score has no input statistics for {path} (it has "
                       f"{', '.join(sorted(self.sq_norms)) or 'none'})")
    axes = dict(self.axes)[path]
    n_stack, rows = dict(self.seen).get(path, (0, None))
    return LeafStatistics(axes[:n_stack], axes[n_stack:], self.sq_norms[path], None, rows)


def _spread(values: jax.Array, axes: tuple[int, ...], ndim: int) -> jax.Array:
  """`values` over the leaf axes `axes` (in that order), broadcastable to the leaf."""
  order = sorted(range(len(axes)), key=lambda k: axes[k])
  moved = jnp.transpose(values, order)
  return jnp.expand_dims(moved, tuple(a for a in range(ndim) if a not in axes))


def _static_rows(rows: Any) -> int | None:
  """A row count as a static (hashable) int; None where it cannot be read."""
  return None if rows is None or isinstance(rows, jax.core.Tracer) else int(rows)


def wanda_score(stats: Any) -> Wanda:
  """Wanda's score from `jaxprune.oneshot.input_statistics(...)`: `|w_ij| * ||x_j||_2`.

  Rank it per output neuron, as Wanda does: `Prune(s, score=wanda_score(stats),
  scope="row")`. A row is then, in every leaf, the weights of one output neuron
  over all its input axes as the statistics recorded them (`(in, out)`,
  `(out, in)`, `(d, heads, head_dim)`, `(heads, head_dim, d)`, gemma's
  `(2, hidden, d)` alike, and a conv kernel's output channel over its `(kh, kw,
  in)` inputs: one call for a whole model). A leaf the statistics could not
  attribute is refused with their reason (`stats.unattributed`).

  Where it ranks, before any score is computed, each ranked leaf's statistics are
  checked against it (`input_statistics.check_leaf_statistics`): a ValueError
  names the leaf (or stacked layer `path[i]`) whose norms do not fit its shape or
  stack length, are of size 1, saw 0 rows, or are all zero (norms traced under
  `jit`: their shapes and rows only).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8))}
    >>> where = jaxprune.select(params)
    >>> def apply_fn(p, b):
    ...   return jnp.tanh(b["x"] @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
    >>> stats = jaxprune.oneshot.input_statistics(apply_fn, params, [batch], where)
    >>> target = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row")
    >>> masks = target.masks(params, where)
  """
  leaves = {canonical_path(p): s for p, s in stats.leaves.items()}
  ordered = sorted(leaves.items())
  return Wanda({p: s.sq_norms for p, s in ordered},
               tuple((p, s.stack_axes + s.feature_axes) for p, s in ordered),
               tuple((p, (len(s.stack_axes), _static_rows(s.rows))) for p, s in ordered),
               tuple(sorted((canonical_path(p), why)
                            for p, why in getattr(stats, "unattributed", {}).items())))


def outlier_ratios(params: PyTree, where: Any, score: Score,
                   m: float = 5.0) -> dict[str, float]:
  """Per selected leaf, the fraction of its scores above `m` times their mean: OWL's
  layerwise outlier distribution (Yin et al. 2024, with `score=wanda_score(stats)` and
  `m` = 5), what `jaxprune.distributions.owl` turns into per-leaf sparsities.

  `D_i = #{a in A_i : a > m * mean(A_i)} / |A_i|`, `A_i` leaf i's scores (`|w|` for
  `magnitude_score()`). A stacked leaf (scanned layers) gets one ratio.

  Args:
    params: the parameter pytree.
    where: bool pytree from `select` (or a callable building one).
    score: any score (`wanda_score(stats)` for OWL).
    m: the outlier threshold, in means (> 0).

  Returns:
    `{path: ratio}` for every selected leaf, ratios in [0, 1].

  Raises:
    ValueError: `m` not a positive number; `where` not matching params; the score's
      own errors (a leaf without statistics, named).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> params = {"a": jnp.array([[1.0, 1.0], [1.0, 20.0]]), "b": jnp.ones((2, 2))}
    >>> jaxprune.scores.outlier_ratios(params, {"a": True, "b": True},
    ...                                jaxprune.scores.magnitude_score(), m=2.0)
    {'a': 0.25, 'b': 0.0}
  """
  if isinstance(m, bool) or not isinstance(m, numbers.Real) or not m > 0:
    raise ValueError(f"outlier_ratios: m must be a positive number, got {m!r}")
  flags = resolve_where(where, params)
  theirs = slots(params)
  chosen = [i for i, f in enumerate(flags) if f]
  out = {}
  for i, a in zip(chosen, score.scores(params, chosen)):
    a = jnp.abs(theirs.leaves[i].astype(jnp.float32)) if a is None else a
    out[canonical_path(theirs.paths[i])] = float(jnp.mean(a > m * jnp.mean(a)))
  return out

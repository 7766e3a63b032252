"""How much each leaf loses: exact per-leaf prune counts from one target sparsity.

A *distribution* turns the selected leaves (their paths and shapes) and a target
sparsity `s` into one prune count per leaf, `prune_counts(paths, shapes, s)`, and
the real-valued sparsities they round, `sparsities(paths, shapes, s)`.
`s` may be traced (a schedule's sparsity inside a compiled step); the counts are
then traced int32/int64 scalars, computed exactly in integers.

* `uniform()`: `round(s * n_i)` for every leaf, each leaf exact on its own
  (what `Prune(s)` does by default).
* `erk(power=1.0)`: Erdős–Rényi-kernel (Evci et al. 2020, as JaxPruner's `erk`):
  leaf i keeps a density `eps * r_i ** power`, `r_i` the sum of its fans over
  their product, so small and thin leaves stay denser; `eps` is solved so that the
  leaves keep `(1 - s) * N` weights in all. A leaf whose density would pass 1 is
  kept dense and `eps` is solved again for the rest (leaves with equal `r_i`
  together). The counts sum to exactly `round(s * N)`: each leaf's share is
  rounded on its own, and the few weights of rounding difference (at most about
  half a weight per leaf) go one each to the leaves whose rounding went furthest
  the other way (largest remainder): every leaf is within one weight of its share.

  The fans come from the program with `erk(layouts=weight_layouts(apply_fn,
  params, x))` (`jaxprune.tree.weight_layouts`): a product weight has `r = (fan_in + fan_out)
  / (fan_in * fan_out)`, `fan_in` the product of its input (contracted) axes'
  sizes and `fan_out` of its output axes', so the heads and head_dim of a
  `(d, heads, head_dim)` or `(heads, head_dim, d)` kernel count as one fan; a conv
  kernel (input feature, output feature, spatial axes) has Evci et al.'s
  `(n_in + n_out + sum(spatial)) / (n_in * n_out * prod(spatial))`; a lookup
  table counts its indexed axis as the fan-in. Stack axes (scanned layers,
  experts) are left out: each stacked layer is a layer. Without layouts the
  convention is JaxPruner's: every axis of the leaf is a fan, `r = sum(shape) /
  prod(shape)`, right for 2-D kernels and for convs, not for multi-axis einsum
  kernels or stacked leaves (see `stacked=`). `erk(kernel=False)` ("ER") drops a
  conv's spatial axes, `(n_in + n_out) / (n_in * n_out)`; without layouts it
  reads them as the last two dims.

Both take `fixed={pattern: sparsity}`: leaves whose path matches a pattern (as in
`jaxprune.select`) get that sparsity, exactly per leaf, and are left out of the
others' sums (JaxPruner's `custom_sparsity_map`). A pattern that matches no
selected leaf is refused (a typo would leave its leaves at the target).

* `by_path(fn)`: leaf i's sparsity is `fn(path_i, shape_i, s)`, any rule of your own.
* `owl(ratios, spread=0.1)`: outlier-weighted (OWL, Yin et al. 2024): a leaf with more
  outlier scores (`jaxprune.scores.outlier_ratios`, Wanda's scores above 5 means) is pruned
  less. With `c_i` the ratios scaled to [0, 1] (min to max) and centred so that
  `sum n_i c_i = 0`, leaf i's sparsity is `s * (1 - 2 * spread * c_i)`: the leaves
  spread about `s` by a fraction of it (OWL's `lambda` = 0.08 at 70% is `spread`
  0.11), proportionally, so a schedule ramping `s` from 0 ramps every leaf from 0.
  A share past 1 is held at 1 and the others move up alike to keep the total; the
  counts sum to exactly `round(s * N)` (largest remainder, as ERK's).

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> d = jaxprune.distributions.erk()
  >>> [int(c) for c in d.prune_counts(["a", "b", "c"], [(2, 4), (3, 6), (2, 4, 6)], 0.5)]
  [0, 6, 31]

  With layouts, the q kernel `(d, heads, head_dim)` is the `(16, 16)` layer it is,
  and keeps more than with every axis a fan (`sum(shape) / prod(shape)`):

  >>> from jaxprune.tree import weight_layouts
  >>> params = {"q": jnp.ones((16, 2, 8)), "o": jnp.ones((2, 8, 16)), "up": jnp.ones((16, 64))}
  >>> def apply_fn(p, x):
  ...   h = jnp.einsum("td,dhk->thk", x, p["q"])
  ...   return jnp.einsum("thk,hkd->td", h, p["o"]) @ p["up"]
  >>> layouts = weight_layouts(apply_fn, params, jnp.ones((3, 16)))
  >>> shapes = [params[k].shape for k in params]
  >>> erk = jaxprune.distributions.erk()
  >>> [round(float(s), 3) for s in erk.sparsities(list(params), shapes, 0.5)]
  [0.409, 0.409, 0.545]
  >>> [round(float(s), 3) for s in
  ...  jaxprune.distributions.erk(layouts=layouts).sparsities(list(params), shapes, 0.5)]
  [0.333, 0.333, 0.583]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.engine.magnitude_rank import count_dtype, round_fraction_of
from jaxprune._src.oneshot.layouts import Layout, Layouts
from jaxprune._src.tree.leaf_selection import matches_pattern
from jaxprune._src.tree.mask_tree import canonical_path
from jaxprune._src.types import Shape


@runtime_checkable
class Distribution(Protocol):
  """Per-leaf prune counts for a target sparsity (see the module docstring)."""

  def sparsities(self, paths: Sequence[str], shapes: Sequence[Shape], sparsity: Any) -> list:
    ...

  def prune_counts(self, paths: Sequence[str], shapes: Sequence[Shape], sparsity: Any) -> list:
    ...


def prune_count(sparsity: Any, n: int) -> Any:
  """`round(sparsity * n)`, exactly. A concrete sparsity gives a Python int; a traced
  one cannot raise, so it is read totally: NaN counts as 0 (nothing newly pruned)
  and the rest is clipped to [0, 1] (1 prunes all `n`), for every leaf alike."""
  count_dtype(n)  # a ranking beyond int32 needs 64-bit types: say so before compute
  if isinstance(sparsity, (jax.core.Tracer, jax.Array)):
    s = jnp.asarray(sparsity, jnp.float32)
    return round_fraction_of(jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0)), n)
  return int(round(min(max(float(sparsity), 0.0), 1.0) * n))


def _fixed_at(paths: Sequence[str], fixed: tuple) -> list[float | None]:
  """Each path's fixed sparsity (the first matching pattern's), or None; a pattern
  matching none of `paths` (a typo would leave its leaves at the target) is refused,
  naming it and a few of the paths."""
  parts = [tuple(path.split("/")) for path in paths]
  for pattern, _ in fixed:
    if not any(matches_pattern(p, pattern) for p in parts):
      names = list(dict.fromkeys(paths))
      shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
      raise ValueError(f"fixed: the pattern {pattern!r} matches no selected leaf (selected: "
                       f"{shown or 'none'}); patterns are as jaxprune.select's")
  return [next((s for p, s in fixed if matches_pattern(q, p)), None) for q in parts]


def _check_fixed(fixed: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
  if not isinstance(fixed, Mapping):
    raise ValueError(f"fixed must map path patterns to sparsities, got {fixed!r}")
  for pattern, s in fixed.items():
    if not isinstance(pattern, str):
      raise ValueError(f"fixed: a path pattern must be a string, got {pattern!r}")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
      raise ValueError(f"fixed sparsity of {pattern!r} must be a number in [0, 1], got {s!r}")
  return tuple((p, float(s)) for p, s in fixed.items())


@dataclasses.dataclass(frozen=True)
class Uniform:
  """`round(s * n_i)` per leaf (fixed leaves: their own sparsity)."""

  fixed: tuple[tuple[str, float], ...] = ()

  def sparsities(self, paths, shapes, sparsity):
    return [sparsity if f is None else f for f in _fixed_at(paths, self.fixed)]

  def prune_counts(self, paths, shapes, sparsity):
    sizes = [int(np.prod(s)) for s in shapes]
    return [prune_count(s, n) for s, n in zip(self.sparsities(paths, shapes, sparsity), sizes)]


def uniform(fixed: Mapping[str, float] | None = None) -> Uniform:
  """Every leaf pruned to the target sparsity on its own (see the module docstring).

  Raises:
    ValueError: a `fixed` entry that is not a string pattern and a sparsity in
      [0, 1]; when the counts are computed, a `fixed` pattern that matches no
      selected leaf (naming it and a few selected paths).
  """
  return Uniform(_check_fixed(fixed or {}))


@dataclasses.dataclass(frozen=True)
class ByPath:
  """Leaf i's sparsity is `fn(path_i, shape_i, s)`, each leaf exact on its own."""

  fn: Callable[[str, Shape, Any], Any]

  def sparsities(self, paths, shapes, sparsity):
    return [_checked_share(path, self.fn(path, tuple(shape), sparsity))
            for path, shape in zip(paths, shapes)]

  def prune_counts(self, paths, shapes, sparsity):
    sizes = [int(np.prod(s)) for s in shapes]
    return [prune_count(s, n) for s, n in zip(self.sparsities(paths, shapes, sparsity), sizes)]


def _checked_share(path: str, value: Any) -> Any:
  """A rule's sparsity for `path`: a concrete real scalar (Python, NumPy or a JAX
  array) as a float in [0, 1], NaN refused; a traced one as given (read totally
  by `prune_count`)."""
  if isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.shape(value) == () and (
      jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"by_path: the sparsity of {path} must be a real number, got {value!r}")
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"by_path: the sparsity of {path} is {value!r}, not in [0, 1]")
  return float(value)


def by_path(fn: Callable[[str, Shape, Any], Any]) -> ByPath:
  """Per-leaf sparsities from a function `fn(path, shape, s) -> sparsity` of the
  leaf's path, its shape and the target `s` (which may be traced: return an
  expression of it, e.g. `min(1.0, 1.2 * s)` is not traceable but
  `jnp.minimum(1.0, 1.2 * s)` is). Each leaf then loses exactly
  `round(sparsity_i * n_i)`.

  A concrete value `fn` returns (a Python or NumPy number, a concrete JAX scalar)
  is checked when the counts are computed: a ValueError names the path and the
  value if it is not a real number in [0, 1] (NaN included). A traced one is read
  as a traced sparsity is (NaN as 0, clipped to [0, 1]).

  Examples:
    >>> import jaxprune
    >>> d = jaxprune.distributions.by_path(lambda path, shape, s: 0.0 if "head" in path else s)
    >>> [int(c) for c in d.prune_counts(["body/kernel", "head/kernel"], [(4, 4), (4, 2)], 0.5)]
    [8, 0]
  """
  if not callable(fn):
    raise ValueError(f"by_path takes a function (path, shape, s) -> sparsity, got {fn!r}")
  return ByPath(fn)


@dataclasses.dataclass(frozen=True)
class OWL:
  """Outlier-weighted per-leaf sparsities (see the module docstring)."""

  ratios: tuple[tuple[str, float], ...]
  spread: float = 0.1

  def centred(self, paths: Sequence[str], shapes: Sequence[Shape]) -> np.ndarray:
    """`c_i`: the leaves' ratios scaled to [0, 1] and centred, weighted by size."""
    known = dict(self.ratios)
    missing = [p for p in paths if canonical_path(p) not in known]
    if missing:
      raise ValueError(f"owl: no outlier ratio for {', '.join(missing[:4])} (ratios hold "
                       f"{', '.join(sorted(known)[:6]) or 'none'}); compute them with "
                       "outlier_ratios over the same selection")
    d = np.array([known[canonical_path(p)] for p in paths], np.float64)
    width = d.max() - d.min()
    c = (d - d.min()) / width if width > 0 else np.zeros_like(d)
    sizes = np.array([int(np.prod(s)) for s in shapes], np.float64)
    return c - float((c * sizes).sum() / sizes.sum())

  def _fractions(self, paths, shapes, sparsity) -> jax.Array:
    c = self.centred(paths, shapes)
    sizes = np.array([int(np.prod(s)) for s in shapes], np.float64)
    return _owl_fractions(c, sizes, _total_fraction(sparsity), self.spread)

  def sparsities(self, paths, shapes, sparsity):
    fractions = self._fractions(paths, shapes, sparsity)
    return [fractions[i] for i in range(len(paths))]

  def prune_counts(self, paths, shapes, sparsity):
    sizes = [int(np.prod(s)) for s in shapes]
    return _apportion(1.0 - self._fractions(paths, shapes, sparsity), sizes, sparsity)


def _owl_fractions(c: np.ndarray, sizes: np.ndarray, s: jax.Array,
                   spread: float) -> jax.Array:
  """float32 sparsities `s * (1 - 2 * spread * c_i)` (in leaf order), where those past 1
  are held at 1 and the rest shifted up alike so that the total stays `s * N`.

  With the leaves in order of increasing `c` (decreasing share) and the first `d`
  fully pruned, the rest move by `delta_d = (s N - size_d - sum_rest n_i r_i) /
  sum_rest n_i`; the answer is the smallest `d` with every remaining share at most 1.
  Every `d` is evaluated at once, so a traced `s` needs no Python loop (as ERK's).
  """
  order = np.argsort(c, kind="stable")
  n_o = jnp.asarray(sizes[order], jnp.float32)
  raw_o = s * (1.0 - 2.0 * spread * jnp.asarray(c[order], jnp.float32))
  pruned_d = jnp.concatenate([jnp.zeros(1), jnp.cumsum(n_o)])  # the first d, fully pruned
  rest_n = n_o.sum() - pruned_d
  rest_mass = jnp.concatenate([jnp.cumsum((n_o * raw_o)[::-1])[::-1], jnp.zeros(1)])
  delta = jnp.where(rest_n > 0, (s * n_o.sum() - pruned_d - rest_mass)
                    / jnp.where(rest_n > 0, rest_n, 1.0), 0.0)
  largest_rest = jnp.concatenate([raw_o, jnp.full(1, -jnp.inf)])
  chosen = jnp.argmax(largest_rest + delta <= 1.0)  # d = all always qualifies
  fractions_o = jnp.where(jnp.arange(len(c)) < chosen, 1.0, raw_o + delta[chosen])
  return jnp.clip(fractions_o, 0.0, 1.0)[np.argsort(order)]


def owl(ratios: Mapping[str, float], spread: float = 0.1) -> OWL:
  """Outlier-weighted per-leaf sparsities (see the module docstring).

  Args:
    ratios: `{path: outlier ratio}` of the selected leaves, from
      `jaxprune.scores.outlier_ratios(params, where, wanda_score(stats))`.
    spread: how far leaves move from the target, as a fraction of it, in [0, 0.5].

  Raises:
    ValueError: `spread` outside [0, 0.5]; `ratios` empty, or holding a non-string
      path or a ratio outside [0, 1] (named); when the counts are computed, a
      selected leaf with no ratio (named).

  Examples:
    >>> import jaxprune
    >>> d = jaxprune.distributions.owl({"a": 0.0, "b": 0.02}, spread=0.1)
    >>> [int(c) for c in d.prune_counts(["a", "b"], [(10, 10), (10, 10)], 0.5)]
    [55, 45]
  """
  if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not (
      0.0 <= spread <= 0.5):
    raise ValueError(f"owl spread must be a number in [0, 0.5], got {spread!r}")
  if not isinstance(ratios, Mapping) or not ratios:
    raise ValueError(f"owl takes a non-empty {{path: outlier ratio}} mapping (from "
                     f"jaxprune.scores.outlier_ratios), got {ratios!r}")
  for path, r in ratios.items():
    if not isinstance(path, str) or isinstance(r, bool) or not isinstance(
        r, (int, float)) or not 0.0 <= r <= 1.0:
      raise ValueError(f"owl: the outlier ratio of {path!r} must be a number in [0, 1], "
                       f"got {r!r}")
  return OWL(tuple(sorted((canonical_path(p), float(r)) for p, r in ratios.items())),
             float(spread))


@dataclasses.dataclass(frozen=True)
class ERK:
  """Erdős–Rényi(-kernel) densities scaled to the target (see the module docstring).

  `layouts` (a `jaxprune.tree.Layouts`, hashable: a static setting of a target)
  gives each leaf's fans from the program; None keeps JaxPruner's convention (every
  axis a fan).
  """

  power: float = 1.0
  kernel: bool = True
  fixed: tuple[tuple[str, float], ...] = ()
  layouts: Layouts | None = None

  def raw_densities(self, shapes: Sequence[Shape],
                    paths: Sequence[str] | None = None) -> np.ndarray:
    """`r_i ** power` of every leaf, before scaling (`paths` needed with layouts)."""
    if self.layouts is None:
      ratios = [shape_ratio(tuple(s), self.kernel) for s in shapes]
    elif paths is None:
      raise ValueError("erk(layouts=...) reads each leaf's fans by its path: pass `paths`")
    else:
      ratios = [layout_ratio(layer_layout(self.layouts, p, tuple(s)), tuple(s), self.kernel)
                for p, s in zip(paths, shapes)]
    return np.array(ratios, np.float64) ** self.power

  def _split(self, paths, shapes):
    fixed = _fixed_at(paths, self.fixed)
    return fixed, [i for i, f in enumerate(fixed) if f is None]

  def _free_leaves(self, paths, shapes, free) -> tuple[tuple[Shape, ...], tuple[float, ...]]:
    """The free leaves' shapes and raw densities, hashable: the static arguments of
    the compiled programs below."""
    free_shapes = tuple(tuple(int(d) for d in shapes[i]) for i in free)
    raw = self.raw_densities(free_shapes, [paths[i] for i in free])
    return free_shapes, tuple(float(r) for r in raw)

  def sparsities(self, paths, shapes, sparsity):
    fixed, free = self._split(paths, shapes)
    out: list[Any] = list(fixed)
    if free:
      density = _erk_densities_compiled(*self._free_leaves(paths, shapes, free), sparsity)
      for j, i in enumerate(free):
        out[i] = 1.0 - density[j]
    return out

  def prune_counts(self, paths, shapes, sparsity):
    fixed, free = self._split(paths, shapes)
    sizes = [int(np.prod(s)) for s in shapes]
    counts: list[Any] = [None if f is None else prune_count(f, n) for f, n in zip(fixed, sizes)]
    if free:
      shares = _erk_counts(*self._free_leaves(paths, shapes, free), sparsity)
      for i, c in zip(free, shares):
        counts[i] = c
    return counts


def _erk_counts(shapes: tuple[Shape, ...], raw: tuple[float, ...], sparsity: Any) -> list:
  """ERK's prune counts as one compiled program per tree of shapes (and per concrete
  sparsity, whose rounding `prune_count` does in Python): op by op, a first call on
  new shapes compiled each of its small ops, seconds where one program takes a
  fraction. Inside an outer `jit` it is inlined."""
  if isinstance(sparsity, (jax.core.Tracer, jax.Array)):  # as `prune_count` tells them
    return list(_erk_counts_at_traced(shapes, raw, sparsity))
  return list(_erk_counts_at_static(shapes, raw, float(sparsity)))


def _erk_densities_program(shapes, raw, sparsity) -> jax.Array:
  return _erk_densities(shapes, np.array(raw, np.float64), sparsity)


def _erk_counts_program(shapes, raw, sparsity) -> tuple:
  density = _erk_densities_program(shapes, raw, sparsity)
  return tuple(_apportion(density, [math.prod(s) for s in shapes], sparsity))


_erk_densities_compiled = jax.jit(_erk_densities_program, static_argnums=(0, 1))
_erk_counts_at_static = jax.jit(_erk_counts_program, static_argnums=(0, 1, 2))
_erk_counts_at_traced = jax.jit(_erk_counts_program, static_argnums=(0, 1))


def erk(power: float = 1.0, *, kernel: bool = True,
        fixed: Mapping[str, float] | None = None, layouts: Layouts | None = None) -> ERK:
  """Erdős–Rényi-kernel per-leaf sparsities (see the module docstring).

  Args:
    power: the exponent of `r_i` (below 1: softer, closer to uniform).
    kernel: count a conv's spatial axes (ERK) or not (ER).
    fixed: `{path pattern: sparsity}` for leaves left out of the ERK sums.
    layouts: `weight_layouts(apply_fn, params, x)`: each leaf's fans read from the
      program (input axes, output axes, stack axes left out); None: every axis of
      the leaf is a fan.

  Raises:
    ValueError: `power` not a positive number; `layouts` not a `Layouts`; `fixed`
      as `uniform`'s (a pattern matching no selected leaf refused when the counts
      are computed); when the counts are computed with layouts, a free leaf they
      do not describe or that the program does not use as a product, conv or
      lookup weight (a norm scale, a tied or unknown use: named with the
      program's reason).
  """
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
    raise ValueError(f"erk power must be a positive number, got {power!r}")
  if layouts is not None and not isinstance(layouts, Layouts):
    raise ValueError("erk layouts must be a jaxprune.tree.Layouts (weight_layouts(apply_fn, "
                     f"params, x)) or None, got {type(layouts).__name__}")
  return ERK(float(power), bool(kernel), _check_fixed(fixed or {}), layouts)


def shape_ratio(shape: Shape, kernel: bool = True) -> float:
  """JaxPruner's `r` of a leaf of `shape` with every axis a fan: `sum(shape) /
  prod(shape)`; with `kernel=False` the last two dims only, `(n_in + n_out) /
  (n_in * n_out)`."""
  dims = shape if kernel else shape[-2:]
  return float(np.sum(dims) / np.prod(dims))


def layout_ratio(layout: Layout, shape: Shape, kernel: bool = True) -> float:
  """ERK's `r` of one layer of a leaf of `shape` the program uses as `layout`.

  A product weight or a lookup table: `(fan_in + fan_out) / (fan_in * fan_out)`,
  `fan_in = prod(shape[a] for a in layout.inputs)`, `fan_out` over `outputs`; a
  conv kernel (`inputs = (*spatial, in feature)`): `(n_in + n_out + sum(spatial))
  / (n_in * n_out * prod(spatial))`, spatial axes dropped with `kernel=False`.
  `layout.stack` is not read: stacked layers share one `r`. An empty leaf gets 0.

    >>> from jaxprune._src.methods.distributions import layout_ratio
    >>> from jaxprune.tree import Layout
    >>> layout_ratio(Layout("dot_general", (0, 1), (2,)), (4, 8, 16))   # (32 + 16) / 512
    0.09375
  """
  def size(axes: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in axes)
  if layout.use == "conv":
    n_in, n_out = shape[layout.inputs[-1]], size(layout.outputs)
    spatial = [shape[a] for a in layout.inputs[:-1]] if kernel else []
    fans, weights = n_in + n_out + sum(spatial), n_in * n_out * math.prod(spatial)
  else:
    fan_in, fan_out = size(layout.inputs), size(layout.outputs)
    fans, weights = fan_in + fan_out, fan_in * fan_out
  return fans / weights if weights else 0.0


def layer_layout(layouts: Layouts, path: str, shape: Shape) -> Layout:
  """The layout of one layer of leaf `path`, axes counted in `shape`: the leaf's
  own shape, or a layer of it (`stacked=` drops leading axes, which must be stack
  axes of the program).

  Raises:
    ValueError: `path` not in `layouts`; a use without fans (not a product, conv
      or lookup); `shape` not a trailing part of the leaf's; `stacked=` dropping an
      input or output axis.
  """
  layout = layouts.get(path, layouts.get(canonical_path(path)))
  if layout is None:
    raise ValueError(f"erk(layouts=...): the layouts have no entry for {path}; build them "
                     "from the same params (weight_layouts(apply_fn, params, x, where=where))")
  if layout.use not in ("dot_general", "conv", "gather"):
    raise ValueError(f"erk(layouts=...): the program uses {path} as {layout.use!r} "
                     f"({layout.reason or layout.source}): it has no fan-in and fan-out; leave "
                     "it out of `where` or give it a sparsity with `fixed`")
  full = tuple(layouts.shapes.get(path, layouts.shapes.get(canonical_path(path), shape)))
  k = len(full) - len(shape)
  if k < 0 or full[k:] != shape:
    raise ValueError(f"erk(layouts=...): the layouts describe {path} as {full}, the "
                     f"distribution is given {shape}")
  if any(a < k for a in layout.inputs + layout.outputs):
    raise ValueError(f"erk(layouts=...): `stacked` takes the first {k} axes of {path} as "
                     f"layers, but the program uses them as inputs {layout.inputs} / outputs "
                     f"{layout.outputs}")
  return layout._replace(inputs=tuple(a - k for a in layout.inputs),
                         outputs=tuple(a - k for a in layout.outputs), stack=())


def _erk_densities(shapes: Sequence[Shape], raw: np.ndarray, sparsity: Any) -> jax.Array:
  """float32 densities (kept fractions) of ERK-scaled leaves, in leaf order.

  With the leaves in order of decreasing `raw` and the first `d` kept dense,
  `eps_d = (keep - dense_d) / sum_rest(raw_i n_i)`, where `keep = (1 - s) N` and
  `dense_d` is the size of the dense leaves; the answer is the smallest `d` (at a
  boundary between distinct `raw` values) with `eps_d * max_rest(raw) <= 1`.
  Every `d` is evaluated at once (vectors of the leaves' count), so a traced
  sparsity needs no Python loop.
  """
  sizes = np.array([int(np.prod(s)) for s in shapes], np.float64)
  order = np.argsort(-raw, kind="stable")
  raw_o, size_o = raw[order], sizes[order]
  # d dense leaves: d = 0 and every boundary between distinct raw values.
  # d = all (every leaf dense) is the answer when float rounding puts the last
  # boundary's eps * raw a hair above 1 (sparsity 0 with distinct raw values).
  candidates = np.array([0] + [d for d in range(1, len(raw_o)) if raw_o[d] != raw_o[d - 1]]
                        + [len(raw_o)])
  dense_size = np.concatenate([[0.0], np.cumsum(size_o)])[candidates]
  rest_weight = np.concatenate([np.cumsum((raw_o * size_o)[::-1])[::-1], [0.0]])[candidates]
  rest_max = np.concatenate([raw_o, [0.0]])[candidates]
  total = float(sizes.sum())
  s = _total_fraction(sparsity)
  keep = (1.0 - s) * total
  weight = jnp.asarray(rest_weight, jnp.float32)
  eps = jnp.where(weight > 0, (keep - jnp.asarray(dense_size, jnp.float32))
                  / jnp.where(weight > 0, weight, 1.0), 0.0)
  valid = eps * jnp.asarray(rest_max, jnp.float32) <= 1.0
  chosen = jnp.argmax(valid)  # the smallest valid d (d = all dense always is: eps 0)
  dense_count = jnp.asarray(candidates, jnp.int32)[chosen]
  density_o = jnp.where(jnp.arange(len(raw_o)) < dense_count, 1.0,
                        jnp.clip(eps[chosen] * jnp.asarray(raw_o, jnp.float32), 0.0, 1.0))
  return density_o[np.argsort(order)]


def _total_fraction(sparsity: Any) -> jax.Array:
  """A sparsity as float32 in [0, 1], NaN as 0 (as `prune_count` reads it)."""
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))


def _apportion(density: jax.Array, sizes: list[int], sparsity: Any) -> list:
  """Prune counts `c_i` with `sum c_i = prune_count(sparsity, N)` exactly and each
  `c_i` within one weight of its share `(1 - density_i) n_i` (largest remainder).

  Each share is rounded on its own; the difference `D` (at most about half a
  weight per leaf, plus float32 error) is then given one weight at a time to the
  `|D|` leaves whose rounding went furthest the other way, among those with room.
  Leaves are ranked by pairwise comparison (L x L for L leaves), not a sort.
  A difference beyond the leaves' count (float32 error on huge models) goes to
  the leaf with the most room.
  """
  n = sum(sizes)
  dtype = count_dtype(n)
  target = jnp.asarray(prune_count(sparsity, n), dtype)
  fraction = 1.0 - density
  base = jnp.stack([jnp.asarray(prune_count(fraction[i], m), dtype)
                    for i, m in enumerate(sizes)])
  size = jnp.asarray(sizes, dtype)
  # How far each share lies above its rounded count (in (-0.5, 0.5]).
  residual = fraction * jnp.asarray(sizes, jnp.float32) - base.astype(jnp.float32)
  short = target - base.sum()
  up = short > 0
  room = jnp.where(up, size - base, base)
  key = jnp.where(room > 0, jnp.where(up, residual, -residual), -jnp.inf)
  order = jnp.arange(len(sizes))
  ahead = (key[None, :] > key[:, None]) | (
      (key[None, :] == key[:, None]) & (order[None, :] < order[:, None]))
  rank = ahead.sum(axis=1)
  step = jnp.where((rank < jnp.abs(short)) & (room > 0), 1, 0).astype(dtype)
  counts = base + jnp.where(up, step, -step)
  rest = target - counts.sum()
  widest = jnp.argmax(jnp.where(rest > 0, size - counts, counts))
  counts = counts + jnp.where(order == widest, rest, 0).astype(dtype)
  counts = jnp.clip(counts, 0, size)
  return [counts[i] for i in range(len(sizes))]

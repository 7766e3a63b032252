"""Stacked (scanned) layers: one leaf holding many layers along its leading axes.

Models built with `nnx.scan` / `nn.scan` (or `jax.lax.scan` over a stacked
pytree) hold one leaf `(L, in, out)` for all L layers, and MoE kernels
`(E, in, out)` one per expert. `stacked={pattern: k}` says that the first `k`
axes of every selected leaf whose path matches `pattern` (as in
`jaxprune.select`) index layers: each of the `prod(shape[:k])` slices is then a
layer of its own for layer scope, distributions (ERK sees the slice's shape),
blocks and channels, and for `sparsity_report` (one row per slice, `path[i]`).
Row scope and N:M already compare within a slice; global scope ranks all
weights together, so stacking changes neither.

Axes of a granularity (`axis=`, `channels(axis)`) count within the slice: on a
stacked `(L, in, out)` kernel, `-2` is `in` and `0` is `in` too.

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> scanned = {"layers": {"kernel": jnp.arange(16.0).reshape(2, 4, 2)}}
  >>> where = jaxprune.select(scanned)
  >>> whole = jaxprune.ranked_masks(scanned, 0.5, where)
  >>> [int(m.sum()) for m in whole["layers"]["kernel"]]       # one ranking: layer 0 pruned
  [0, 8]
  >>> per_layer = jaxprune.ranked_masks(scanned, 0.5, where, stacked={"layers/kernel": 1})
  >>> [int(m.sum()) for m in per_layer["layers"]["kernel"]]   # each layer keeps 4 of 8
  [4, 4]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune._src.tree.leaf_selection import matches_pattern

Stacked = tuple[tuple[str, int], ...]


def check_stacked(stacked: Mapping[str, int] | Stacked | None) -> Stacked:
  """`stacked` as `((pattern, k), ...)`, or a ValueError naming the bad entry."""
  if stacked is None:
    return ()
  items = stacked.items() if isinstance(stacked, Mapping) else stacked
  try:
    items = tuple(items)
  except TypeError:
    raise ValueError(
        f"stacked must map path patterns to leading axis counts, got {stacked!r}") from None
  for entry in items:
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"stacked must map path patterns to leading axis counts, got {stacked!r}")
    pattern, k = entry
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"stacked[{pattern!r}] must be a number of leading axes >= 1, got {k!r}")
  return items


def stacked_axes(path: str, shape: tuple[int, ...], stacked: Stacked) -> int:
  """How many leading axes of the leaf at `path` index layers (the first matching
  pattern's count, 0 if none matches); a count leaving no axis is refused."""
  parts = tuple(path.split("/"))
  k = next((k for pattern, k in stacked if matches_pattern(parts, pattern)), 0)
  if k and k >= len(shape):
    raise ValueError(f"stacked: {path} has shape {shape}; {k} stacked axes leave no layer axes")
  return k


class Unstacked(NamedTuple):
  """Slices of the selected leaves as layers, and how to put their masks back.

  `leaf_paths[j]` is the path of slice j's leaf (what distributions match their
  `fixed` patterns against); `names[j]` is `path[i]` for a slice, `path` for a
  leaf taken whole; `shapes[i]` and `counts[i]` are leaf i's shape and slice count
  (0 for a whole leaf).
  """

  values: list
  previous: list
  leaf_paths: list[str]
  names: list[str]
  shapes: list[tuple[int, ...]]
  counts: list[int]


def unstack(paths: Sequence[str], values: Sequence[jax.Array], previous: Sequence[Any],
            stacked: Stacked) -> Unstacked:
  """Every stacked leaf as its slices along the flattened leading axes."""
  out = Unstacked([], [], [], [], [], [])
  for path, v, p in zip(paths, values, previous):
    shape = tuple(v.shape)
    k = stacked_axes(path, shape, stacked)
    out.shapes.append(shape)
    if not k:
      out.counts.append(0)
      out.values.append(v), out.previous.append(p), out.leaf_paths.append(path)
      out.names.append(path)
      continue
    n = math.prod(shape[:k])
    flat_v = v.reshape(n, *shape[k:])
    flat_p = None if p is None else p.reshape(n, *shape[k:])
    out.counts.append(n)
    for i in range(n):
      out.values.append(flat_v[i])
      out.previous.append(None if flat_p is None else flat_p[i])
      out.leaf_paths.append(path)
      out.names.append(f"{path}[{i}]")
  return out


def restack(results: Sequence[jax.Array], plan: Unstacked) -> list[jax.Array]:
  """`results` (one per slice or whole leaf, in `unstack`'s order) as one array per
  leaf of its shape."""
  out, j = [], 0
  for shape, n in zip(plan.shapes, plan.counts):
    if not n:
      out.append(results[j])
      j += 1
      continue
    out.append(jnp.stack(results[j:j + n]).reshape(shape))
    j += n
  return out


def check_used(stacked: Stacked, paths: Sequence[str]) -> None:
  """Every pattern of `stacked` matches a selected leaf (a typo would silently rank
  a stacked leaf as one layer)."""
  for pattern, _ in stacked:
    if not any(matches_pattern(tuple(p.split("/")), pattern) for p in paths):
      raise ValueError(f"stacked pattern {pattern!r} matches no selected leaf "
                       f"(selected: {', '.join(paths)})")

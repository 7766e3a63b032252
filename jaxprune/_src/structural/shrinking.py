"""The smaller params: which units to keep per channel group, and the params sliced.

`keep_top(groups, importance, fraction)` picks, per prunable group, the units of
highest importance (`jaxprune.group_importance`: magnitude, Taylor, Minitron's
activations, layers' Block Influence), the same width in every layer or ranked
across layers; `shrink(params, groups, keep)` slices every member axis to the
kept units. A group of a scanned stack
(`group.layers`) takes one row of indices per layer, shape `(layers, k)`, or one
row shared by every layer.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.structural import channel_groups, keep_top, magnitude_importance, shrink
  >>> params = {"w1": jnp.arange(32.).reshape(4, 8), "w2": jnp.ones((8, 3))}
  >>> apply_fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> groups = channel_groups(apply_fn, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  >>> keep = keep_top(groups, magnitude_importance(groups, params), 0.5)
  >>> keep
  {1: array([4, 5, 6, 7])}
  >>> small = shrink(params, groups, keep)
  >>> small["w1"].shape, small["w2"].shape
  ((4, 4), (4, 3))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.structural.channel_groups import WIDTH_KINDS, Group
from jaxprune._src.tree.mask_tree import slots
from jaxprune._src.types import PyTree

Keep = Mapping[int, Any]


def check_keep(groups: Sequence[Group], keep: Keep) -> dict[int, np.ndarray]:
  """`keep` checked against `groups`: integer keys naming prunable groups, each
  with valid unit indices (`kept_units`). Returns group index -> indices."""
  if not isinstance(keep, Mapping):
    raise ValueError(f"keep must map group indices to kept units, got {type(keep).__name__}")
  out = {}
  for key, indices in keep.items():
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not (
        0 <= key < len(groups)):
      raise ValueError(f"keep has the key {key!r}; its keys are group indices in [0, "
                       f"{len(groups)}) (keep_top returns them; kinds go to keep_top)")
    group = groups[key]
    if not group.prunable:
      raise ValueError(f"the {group.kind} group {key} of size {group.size} cannot be shrunk: "
                       + "; ".join(group.reasons))
    out[int(key)] = kept_units(group, indices)
  return out


def kept_units(group: Group, indices: Any) -> np.ndarray:
  """`indices` checked against `group`: a sorted, distinct row in `[0, size)`, or
  for a group of `layers` layers, `(layers, k)` rows. Returns them as int64."""
  given = np.asarray(indices)
  if given.size == 0:
    raise ValueError(f"the {group.kind} group (size {group.size}) would keep no unit; drop "
                     "the whole group by other means (a layer, the model's design)")
  if given.dtype == bool or not np.issubdtype(given.dtype, np.integer):
    raise ValueError(f"keep-indices of the {group.kind} group must be integers (unit "
                     f"indices), got {given.dtype}: {given.tolist()}")
  idx = given.astype(np.int64)
  if idx.ndim == 2 and group.layers is None:
    raise ValueError(f"per-layer keep-indices {idx.shape} given for the {group.kind} group, "
                     "which is not inside a scanned stack (group.layers is None)")
  if idx.ndim == 2 and idx.shape[0] != group.layers:
    raise ValueError(f"the {group.kind} group has {group.layers} layers; per-layer "
                     f"keep-indices have {idx.shape[0]} rows")
  rows = idx.reshape(-1, idx.shape[-1]) if idx.ndim else idx.reshape(1, 1)
  if idx.ndim > 2 or any(r.size and (np.any(np.diff(r) <= 0) or r[0] < 0 or r[-1] >= group.size)
                         for r in rows):
    raise ValueError(f"keep-indices of the {group.kind} group (size {group.size}) must be "
                     f"sorted, distinct and in [0, {group.size}), one row or one per layer; "
                     f"got {idx.tolist()}")
  return idx


def unit_mask(group: Group, idx: np.ndarray) -> np.ndarray:
  """Kept units as booleans, `(size,)` or `(layers, size)` for per-layer rows, from
  indices `check_keep` (or `kept_units`) returned."""
  mask = np.zeros(idx.shape[:-1] + (group.size,), bool)
  np.put_along_axis(mask, idx, True, axis=-1)
  return mask


def _axis_masks(groups: Sequence[Group], keep: dict[int, np.ndarray],
                shapes: Mapping[str, tuple]) -> dict:
  """(path, axis) -> kept leaf indices as booleans, `(n,)` or `(layers, n)`; `keep`
  as `check_keep` returned it."""
  masks: dict = {}
  for key, indices in keep.items():
    group = groups[key]
    units = unit_mask(group, indices)
    for m in group.members:
      length = shapes[m.path][m.axis]
      mask = masks.setdefault((m.path, m.axis), np.ones(length, bool))
      dropped = m.indices(group.size)[~units] if units.ndim == 1 else None
      if dropped is not None:
        mask[..., dropped.ravel()] = False
        continue
      rows = np.broadcast_to(mask, (group.layers, length)).copy()
      for layer, alive in enumerate(units):
        rows[layer, m.indices(group.size)[~alive].ravel()] = False
      masks[(m.path, m.axis)] = rows
  return masks


def _take(leaf: Any, mask: np.ndarray, axis: int, path: str) -> Any:
  take = np.take if isinstance(leaf, np.ndarray) else jnp.take
  if mask.ndim == 1:
    return take(leaf, np.flatnonzero(mask), axis=axis)
  counts = mask.sum(1)
  if np.any(counts != counts[0]):
    raise ValueError(f"{path} axis {axis} keeps {counts.tolist()} entries per layer; a stacked "
                     "leaf needs the same count in every layer")
  idx = np.stack([np.flatnonzero(row) for row in mask])  # (layers, k)
  shape = [1] * leaf.ndim
  shape[0], shape[axis] = idx.shape
  along = np.take_along_axis if isinstance(leaf, np.ndarray) else jnp.take_along_axis
  return along(leaf, idx.reshape(shape), axis=axis)


def shrink(params: PyTree, groups: Sequence[Group], keep: Keep) -> PyTree:
  """`params` with every member axis of each group in `keep` sliced to its units.

  Args:
    params: the params `groups` was traced from (same structure and shapes).
    groups: from `channel_groups`.
    keep: group index in `groups` -> kept unit indices, sorted (for `heads`, head
      indices: whole heads are kept; for a group with `layers`, one row shared by
      every layer or a `(layers, k)` array).

  Returns:
    params of the same structure; member leaves hold the kept units only, other
    leaves (`None`, ints, untouched arrays) are passed through.

  Raises:
    ValueError: an unprunable group (with its reasons), bad indices, or params
      whose shapes do not match the groups'.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.structural import Group, Member, shrink
    >>> g = Group("heads", 2, (Member("wq", 1, 3),), True)
    >>> shrink({"wq": jnp.arange(12.).reshape(2, 6)}, [g], {0: [1]})["wq"].tolist()
    [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]
  """
  theirs = slots(params)
  where = {p: i for i, p in enumerate(theirs.paths)}
  keep = check_keep(groups, keep)
  shapes = {}
  for key in keep:
    for m in groups[key].members:
      if m.path not in where:
        raise ValueError(f"params have no leaf {m.path} (a member of group {key}); pass the "
                         "params the groups were traced from")
      shapes[m.path] = tuple(np.shape(theirs.leaves[where[m.path]]))
  _check_shapes(groups, shapes)
  leaves = list(theirs.leaves)
  for (path, axis), mask in _axis_masks(groups, keep, shapes).items():
    leaf = leaves[where[path]]
    leaves[where[path]] = _keep_sharding(leaf, _take(leaf, mask, axis, path), path)
  return jax.tree.unflatten(theirs.treedef, leaves)


def _keep_sharding(leaf: Any, small: Any, path: str) -> Any:
  """`small` laid out as `leaf` was on its mesh; an axis whose new length the mesh
  axes no longer divide is replicated instead, with a warning naming the leaf."""
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return small
  spec = list(sharding.spec) + [None] * (small.ndim - len(sharding.spec))
  for d, names in enumerate(spec):
    parts = math.prod(sharding.mesh.shape[n] for n in (
        names if isinstance(names, tuple) else (names,)) if n is not None)
    if small.shape[d] % parts:
      warnings.warn(f"{path}: axis {d} now has {small.shape[d]} entries, which the mesh "
                    f"axes {names!r} ({parts} ways) do not divide; it is replicated (keep "
                    f"widths that are multiples of {parts}: keep_top(..., round_to={parts}))",
                    stacklevel=3)
      spec[d] = None
  return jax.device_put(small, jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=sharding.memory_kind))


def _check_shapes(groups: Sequence[Group], shapes: Mapping[str, tuple]) -> None:
  traced = getattr(groups, "shapes", {})
  for path, shape in shapes.items():
    if path in traced and tuple(traced[path]) != shape:
      raise ValueError(f"{path} has shape {shape}; the groups were traced with "
                       f"{tuple(traced[path])}")


def _width(size: int, fraction: float, round_to: int) -> int:
  width = math.ceil(fraction * size - 1e-9)  # 0.3 * 10 is 3.0000000000000004
  return max(1, min(size, round_to * math.ceil(width / round_to)))


def _fractions(groups: Sequence[Group], fraction: float | Mapping[str, float],
               kinds: Sequence[str] | None) -> dict[int, float]:
  """group index -> kept fraction, for the prunable groups asked for."""
  if isinstance(fraction, Mapping):
    if kinds is not None:
      raise ValueError("give the kinds once: as the keys of `fraction`, or as `kinds`")
    per_kind = dict(fraction)
  else:
    per_kind = {k: fraction for k in (kinds or WIDTH_KINDS)}
  known = {g.kind for g in groups} | set(WIDTH_KINDS) | {"layers", "other"}
  for kind, f in per_kind.items():
    if kind not in known:
      raise ValueError(f"no group kind {kind!r}; the kinds are {sorted(known)}")
    if not 0 < f <= 1:
      raise ValueError(f"the kept fraction of {kind} must be in (0, 1], got {f}")
  return {i: per_kind[g.kind] for i, g in enumerate(groups)
          if g.prunable and g.kind in per_kind}


def keep_top(groups: Sequence[Group], importance: Mapping[int, Any],
             fraction: float | Mapping[str, float], *, round_to: int = 1,
             kinds: Sequence[str] | None = None, scope: str = "layer") -> dict[int, np.ndarray]:
  """Keep-indices: the most important units of every prunable group asked for.

  Args:
    groups: from `channel_groups`.
    importance: group index -> per-unit importance, `(size,)` or `(layers, size)`
      (`magnitude_importance`, `taylor_importance`, `activation_importance`,
      `layer_importance`).
    fraction: the share of units to keep, for every kind (default: every kind but
      `layers` and `other`, or `kinds`), or per kind: `{"mlp_hidden": 0.5,
      "heads": 0.75}`. `heads` of grouped-query attention are the query heads
      within each KV group (kept evenly in every group); `kv_heads` whole groups.
    round_to: widths rounded up to a multiple (64, 128: TPU tiles), at most the
      whole group, at least one unit.
    kinds: the kinds `fraction` applies to, when it is one number.
    scope: `"layer"`: `ceil(fraction * size)` units in every group (and every
      layer of a stack: Minitron's same width); `"global"`: per kind, one ranking
      of all its groups' units, each group's importance divided by its mean first
      (Torch-Pruning's global pruning), so layers keep different widths.

  Returns:
    group index -> sorted kept unit indices (`(layers, k)` for a group of a stack).

  Raises:
    ValueError: a fraction outside (0, 1], an importance missing or of the wrong
      shape for a group asked for, `"global"` over a stacked group.

  Examples:
    >>> import numpy as np
    >>> from jaxprune.structural import Group, Member, keep_top
    >>> g = Group("mlp_hidden", 5, (Member("w", 0),), True)
    >>> keep_top([g], {0: np.array([3., 1., 4., 1., 5.])}, 0.4)[0].tolist()
    [2, 4]
  """
  if round_to < 1 or scope not in ("layer", "global"):
    raise ValueError(f"round_to must be >= 1 and scope 'layer' or 'global'; got {round_to}, "
                     f"{scope!r}")
  kept = _fractions(groups, fraction, kinds)
  scores = {i: _importance_of(groups, importance, i) for i in kept}
  if scope == "global":
    return _keep_global(groups, scores, kept, round_to)
  out = {}
  for i, f in kept.items():
    width = _width(groups[i].size, f, round_to)
    order = np.argsort(-scores[i], axis=-1, kind="stable")
    out[i] = np.sort(order[..., :width], axis=-1)
  return out


def _importance_of(groups: Sequence[Group], importance: Mapping[int, Any], i: int) -> np.ndarray:
  group = groups[i]
  want = (group.layers, group.size) if group.layers else (group.size,)
  if i not in importance:
    raise ValueError(f"no importance for group {i} ({group.kind}, size {group.size}); score "
                     "it, or leave its kind out of `fraction`")
  values = np.asarray(importance[i], np.float64)
  if values.shape != want:
    raise ValueError(f"the importance of group {i} ({group.kind}) has shape {values.shape}; "
                     f"it needs {want}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"the importance of group {i} ({group.kind}) is not finite")
  return values


def _keep_global(groups: Sequence[Group], scores: dict, kept: dict,
                 round_to: int) -> dict[int, np.ndarray]:
  """Per kind, the top units of all its groups together (importances over their
  group's mean); each group keeps at least `round_to` units, widths rounded up."""
  out = {}
  for kind in dict.fromkeys(groups[i].kind for i in kept):
    members = [i for i in kept if groups[i].kind == kind]
    stacked = [i for i in members if groups[i].layers]
    if stacked:
      raise ValueError(f"scope='global' ranks across layers, but {kind} group {stacked[0]} is "
                       "a scanned stack whose layers must keep equal widths; use scope='layer'")
    pooled = np.concatenate([scores[i] / max(scores[i].mean(), 1e-30) for i in members])
    owner = np.concatenate([np.full(groups[i].size, i) for i in members])
    total = _width(pooled.size, kept[members[0]], 1)
    top = np.argsort(-pooled, kind="stable")[:total]
    for i in members:
      width = _width(groups[i].size, max(np.sum(owner[top] == i), 1) / groups[i].size,
                     round_to)
      out[i] = np.sort(np.argsort(-scores[i], kind="stable")[:width])
  return out


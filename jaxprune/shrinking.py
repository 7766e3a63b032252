"""The smaller params: which units to keep per channel group, and the params sliced.

`keep_top(groups, params, fraction)` picks, per prunable group, the units with the
largest summed L2 norm over the group's members (a Minitron-style importance can
be passed instead of params: any tree of the same shapes); `shrink(params, groups,
keep)` slices every member axis to the kept units. A group of a scanned stack
(`group.layers`) takes one row of indices per layer, shape `(layers, k)`, or one
row shared by every layer.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.channel_groups import channel_groups
  >>> from jaxprune.shrinking import keep_top, shrink
  >>> params = {"w1": jnp.arange(32.).reshape(4, 8), "w2": jnp.ones((8, 3))}
  >>> apply_fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> groups = channel_groups(apply_fn, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  >>> keep = keep_top(groups, params, 0.5)
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

from jaxprune.channel_groups import Group
from jaxprune.mask_tree import slots

PyTree = Any
Keep = Mapping[int, Any]


def kept_units(group: Group, indices: Any) -> np.ndarray:
  """`indices` checked against `group`: a sorted, distinct row in `[0, size)`, or
  for a group of `layers` layers, `(layers, k)` rows. Returns them as int64."""
  idx = np.asarray(indices, dtype=np.int64)
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
  if not rows.shape[-1]:
    raise ValueError(f"the {group.kind} group (size {group.size}) would keep no unit; drop "
                     "the whole group by other means (a layer, the model's design)")
  return idx


def unit_mask(group: Group, indices: Any) -> np.ndarray:
  """Kept units as booleans: `(size,)`, or `(layers, size)` for per-layer rows."""
  idx = kept_units(group, indices)
  mask = np.zeros(idx.shape[:-1] + (group.size,), bool)
  np.put_along_axis(mask, idx, True, axis=-1)
  return mask


def _axis_masks(groups: Sequence[Group], keep: Keep, shapes: Mapping[str, tuple]) -> dict:
  """(path, axis) -> kept leaf indices as booleans, `(n,)` or `(layers, n)`."""
  masks: dict = {}
  for key, indices in keep.items():
    group = groups[key]
    if not group.prunable:
      raise ValueError(f"the {group.kind} group of size {group.size} cannot be shrunk: "
                       + "; ".join(group.reasons))
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

  Example::

    >>> import jax.numpy as jnp
    >>> from jaxprune.channel_groups import Group, Member
    >>> from jaxprune.shrinking import shrink
    >>> g = Group("heads", 2, (Member("wq", 1, 3),), True)
    >>> shrink({"wq": jnp.arange(12.).reshape(2, 6)}, [g], {0: [1]})["wq"].tolist()
    [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]
  """
  theirs = slots(params)
  where = {p: i for i, p in enumerate(theirs.paths)}
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


def unit_norms(group: Group, tree: PyTree) -> np.ndarray:
  """Per unit of `group`, the L2 norm of each member's slice of `tree` (params or
  scores with the same paths), summed over members: shape `(size,)`, or
  `(layers, size)` for a group with `layers` (each layer's own)."""
  theirs = slots(tree)
  by_path = dict(zip(theirs.paths, theirs.leaves))
  total = np.zeros((group.layers or 1, group.size))
  for m in group.members:
    arr = np.asarray(by_path[m.path], dtype=np.float64)
    arr = np.moveaxis(arr, [0, m.axis], [0, 1]) if group.layers else np.moveaxis(
        arr, m.axis, 0)[None]
    picked = arr[:, m.indices(group.size)]  # (layers, size, per unit, rest...)
    total += np.sqrt(np.sum(picked.reshape(*picked.shape[:2], -1) ** 2, axis=-1))
  return total if group.layers else total[0]


def keep_top(groups: Sequence[Group], scores_or_params: PyTree, fraction: float,
             round_to: int = 1, kinds: Sequence[str] | None = None) -> dict[int, np.ndarray]:
  """Keep-indices for every prunable group of `kinds` (default: every kind but
  `layers` and `other`):
  the units with the largest `unit_norms`, `ceil(fraction * size)` of them rounded
  up to a multiple of `round_to` (at most the whole group), in increasing order; a
  group with `layers` gets one row per layer.

  Example::

    >>> import numpy as np
    >>> from jaxprune.channel_groups import Group, Member
    >>> from jaxprune.shrinking import keep_top
    >>> g = Group("mlp_hidden", 5, (Member("w", 0),), True)
    >>> keep_top([g], {"w": np.array([3., 1., 4., 1., 5.])}, 0.4)[0].tolist()
    [2, 4]
  """
  if not 0 < fraction <= 1 or round_to < 1:
    raise ValueError(f"fraction must be in (0, 1] and round_to >= 1, got {fraction}, {round_to}")
  out = {}
  for i, group in enumerate(groups):
    if not group.prunable or group.kind not in (kinds or _WIDTH_KINDS):
      continue
    width = math.ceil(fraction * group.size - 1e-9)  # 0.3 * 10 is 3.0000000000000004
    width = min(group.size, round_to * math.ceil(width / round_to))
    order = np.argsort(-unit_norms(group, scores_or_params), axis=-1, kind="stable")
    out[i] = np.sort(order[..., :width], axis=-1)
  return out


# `other` (an axis no rule names, e.g. an unused leaf's) and `layers` (depth) only
# when asked for.
_WIDTH_KINDS = ("mlp_hidden", "heads", "kv_heads", "head_dim", "residual", "conv_channels",
                "experts")

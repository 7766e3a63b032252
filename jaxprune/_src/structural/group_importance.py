"""How much each unit of a channel group is worth: magnitude, Taylor, activations.

An importance is a dict `group index -> per-unit values`, shape `(size,)`, or
`(layers, size)` for a group of a scanned stack (each layer its own); `keep_top`
ranks it. For unit `u` of a group, with `S_m(u)` the slice of member `m` the unit
covers (`Member.indices`: a neuron's column, a head's block of columns):

* `magnitude_importance`: `‖S_m(u)‖₂` (or `‖·‖₁`) per member, then the sum (mean,
  max) over the members; the norms of a unit's every weight, as Torch-Pruning's
  default.
* `taylor_importance`: `Σ_m Σ |w ⊙ g|` over `S_m(u)`, with `g` the loss gradient
  (e.g. `jaxprune.scores.mean_gradients` over a few batches): the first-order change in
  the loss when the unit's weights go to zero (LLM-Pruner's element-wise Taylor).
* `activation_importance`: NVIDIA Minitron's estimators, from the inputs the
  model's own matmuls read over calibration batches (`input_statistics`, on the
  unmodified model): for each member read as an input (the down projection's
  rows: the MLP neurons entering it; the output projection's: the attention
  output per head; every projection reading the residual stream: the norms'
  outputs), `√(Σ x²)` over every position of every batch, summed over the unit's
  indices and the members. (Minitron takes `mean |x|` over positions, then the L2
  norm over the batch; the sum of squares over both is what the statistics hold.)

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.structural import channel_groups, keep_top, magnitude_importance
  >>> params = {"w1": jnp.arange(24.).reshape(3, 8), "w2": jnp.ones((8, 2))}
  >>> mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> groups = channel_groups(mlp, params, jax.ShapeDtypeStruct((5, 3), jnp.float32))
  >>> importance = magnitude_importance(groups, params)
  >>> keep_top(groups, importance, 0.5)
  {1: array([4, 5, 6, 7])}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from jaxprune._src.oneshot.input_statistics import input_statistics
from jaxprune._src.structural.channel_groups import WIDTH_KINDS, Group, Member
from jaxprune._src.tree.mask_tree import slots
from jaxprune._src.types import PyTree

Importance = dict[int, np.ndarray]
_ACROSS = {"sum": np.sum, "mean": np.mean, "max": np.max}


def unit_slices(group: Group, member: Member, leaf: Any) -> np.ndarray:
  """`member`'s entries per unit of `group`: `(layers or 1, size, per unit, rest)`,
  float64 (for a group with `layers`, axis 0 of the leaf is the layer)."""
  arr = np.asarray(leaf, dtype=np.float64)
  arr = np.moveaxis(arr, [0, member.axis], [0, 1]) if group.layers else np.moveaxis(
      arr, member.axis, 0)[None]
  return arr[:, member.indices(group.size)]


def _chosen(groups: Sequence[Group], kinds: Sequence[str] | None) -> list[int]:
  return [i for i, g in enumerate(groups) if g.prunable and g.kind in (kinds or WIDTH_KINDS)]


def _shaped(group: Group, values: np.ndarray) -> np.ndarray:
  return values if group.layers else values[0]


def _per_member(groups: Sequence[Group], trees: Sequence[PyTree], kinds: Sequence[str] | None,
                of_member: Callable[..., np.ndarray], across: str) -> Importance:
  """`of_member(*slices)` per member (slices of each tree), reduced across members."""
  if across not in _ACROSS:
    raise ValueError(f"across must be one of {sorted(_ACROSS)}, got {across!r}")
  by_path = [dict(zip(t.paths, t.leaves)) for t in map(slots, trees)]
  out = {}
  for i in _chosen(groups, kinds):
    group = groups[i]
    for m in group.members:
      for table, name in zip(by_path, ("params", "the second tree")):
        if table.get(m.path) is None:
          raise ValueError(f"{name} have no array at {m.path} (a member of group {i}, "
                           f"{group.kind}); pass the tree the groups were traced from")
    values = np.stack([of_member(*(unit_slices(group, m, t[m.path]) for t in by_path))
                       for m in group.members])
    out[i] = _shaped(group, _ACROSS[across](values, axis=0))
  return out


def _flat(x: np.ndarray) -> np.ndarray:
  return x.reshape(*x.shape[:2], -1)


def magnitude_importance(groups: Sequence[Group], params: PyTree, *, norm: str = "l2",
                         across: str = "sum",
                         kinds: Sequence[str] | None = None) -> Importance:
  """Per prunable group (of `kinds`), each unit's weight norm (module docstring).

  Args:
    groups: from `channel_groups`.
    params: the params the groups were traced from.
    norm: `"l2"` or `"l1"` over a unit's slice of one member.
    across: `"sum"`, `"mean"` or `"max"` over the members.
    kinds: the group kinds to score; default every kind but `layers` and `other`.

  Returns:
    group index -> `(size,)` (or `(layers, size)`) importances.
  """
  norms = {"l2": lambda s: np.sqrt(np.sum(_flat(s) ** 2, -1)),
           "l1": lambda s: np.sum(np.abs(_flat(s)), -1)}
  if norm not in norms:
    raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
  return _per_member(groups, [params], kinds, norms[norm], across)


def taylor_importance(groups: Sequence[Group], params: PyTree, grads: PyTree, *,
                      kinds: Sequence[str] | None = None) -> Importance:
  """Per prunable group (of `kinds`), each unit's `Σ |w ⊙ g|` over its weights in
  every member (module docstring); `grads` has the params' paths (e.g.
  `jaxprune.scores.mean_gradients(loss_fn, params, batches)`).

  Examples:
    >>> import numpy as np
    >>> from jaxprune.structural import Group, Member, taylor_importance
    >>> g = Group("mlp_hidden", 2, (Member("w", 1),), True)
    >>> w, grad = np.array([[1., 2.], [3., 4.]]), np.array([[1., 0.], [-1., 1.]])
    >>> taylor_importance([g], {"w": w}, {"w": grad})[0].tolist()
    [4.0, 4.0]
  """
  return _per_member(groups, [params, grads], kinds,
                     lambda w, g: np.sum(np.abs(_flat(w) * _flat(g)), -1), "sum")


def activation_importance(groups: Sequence[Group], apply_fn: Callable[[PyTree, Any], Any],
                          params: PyTree, batches: Iterable[Any], *,
                          kinds: Sequence[str] | None = None) -> Importance:
  """Per prunable group (of `kinds`), each unit's input activation norm (Minitron;
  module docstring), from `apply_fn(params, batch)` over the calibration `batches`.

  Returns:
    group index -> `(size,)` (or `(layers, size)`) importances. With `kinds`
    left out, a group no matmul reads as an input (the queries' and keys'
    `head_dim`: the scores read them, no weight does) is left out.

  Raises:
    ValueError: a group of the given `kinds` that no matmul reads as an input
      (nothing to measure), naming it.
  """
  chosen = _chosen(groups, kinds)
  paths = {m.path for i in chosen for m in groups[i].members}
  theirs = slots(params)
  where = jax.tree.unflatten(theirs.treedef, [p in paths for p in theirs.paths])
  stats = input_statistics(apply_fn, params, batches, where).leaves
  out = {}
  for i in chosen:
    group, total = groups[i], None
    for m in group.members:
      stat = stats.get(m.path)
      if stat is None or m.axis not in stat.feature_axes:
        continue
      sq = _features_first(np.asarray(stat.sq_norms, np.float64), stat, m, group)
      total = sq if total is None else total + sq
    if total is None and kinds is None:
      continue  # asked for every kind: left out, and keep_top refuses it if asked for it
    if total is None:
      raise ValueError(f"group {i} ({group.kind}, size {group.size}) is read as an input by "
                       "no matmul of the model: activation_importance has nothing to measure; "
                       "score it by magnitude_importance or taylor_importance")
    out[i] = _shaped(group, np.sqrt(total))
  return out


def _features_first(sq: np.ndarray, stat: Any, m: Member, group: Group) -> np.ndarray:
  """A member's summed squares per unit: `(layers or 1, size)`."""
  n_stack = len(stat.stack_axes)
  axis = n_stack + stat.feature_axes.index(m.axis)
  sq = np.moveaxis(sq, axis, n_stack)  # (stack..., member axis, other features...)
  sq = sq.reshape(*sq.shape[:n_stack + 1], -1).sum(-1)
  if group.layers:
    if n_stack != 1:
      raise ValueError(f"{m.path}: statistics over {n_stack} stack axes for a group of "
                       f"{group.layers} layers")
    per_layer = sq
  else:
    per_layer = sq.reshape(-1, sq.shape[-1]).sum(0)[None]
  return per_layer[:, m.indices(group.size)].sum(-1)

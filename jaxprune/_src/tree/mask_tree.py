"""Trees that go with a parameter pytree: `where` selections and mask trees.

Every public function reads its `where`, `masks` and `previous` arguments through
this module, so one set of rules holds for Flax (Linen and NNX), Equinox and plain
pytrees alike:

* **Slots.** Params are flattened with `None` counted as a leaf. A *slot* is an
  array leaf or a `None` (what `eqx.filter`/`eqx.partition` leave where a module
  holds no array, or what optax-style code uses for "absent"). A `None` slot is
  never selected and never masked.
* **Matching by path.** A tree is matched to params slot by slot and checked by
  path string (`blocks/0/fc1/kernel`), not by container type, so masks held in an
  `nnx.Optimizer`'s `OptVariable`s, or a plain dict of an `nnx.State` (paths
  without the trailing `/value`), match the params they were computed from.
* **A `where` tree** holds a bool per array slot; a `None` slot holds `None` or
  `False`. A callable `where` is a builder `params -> where tree`, unless it is a
  pytree that lines up with params: an Equinox module is callable *and* a pytree.
* **A mask tree** holds a bool array of the param's shape (`True` = kept) at every
  selected slot and `None` elsewhere, so unselected leaves cost no memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.tree.leaf_selection import is_float_array, path_string
from jaxprune._src.types import PyTree


def is_none(x: Any) -> bool:
  """The `is_leaf` of every tree walk over mask trees: `None` is a slot."""
  return x is None


class Slots(NamedTuple):
  """A tree flattened with `None` counted as a leaf."""

  paths: list[str]
  leaves: list[Any]
  treedef: Any


def slots(tree: PyTree) -> Slots:
  """The slots of `tree`: path strings, leaves (`None` included), and the treedef."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
  return Slots([path_string(p) for p, _ in with_path], [x for _, x in with_path], treedef)


def unflatten(params: PyTree, per_slot: list[Any]) -> PyTree:
  """A tree with `params`' structure holding `per_slot[i]` at slot `i`."""
  return jax.tree.unflatten(slots(params).treedef, per_slot)


def canonical_path(path: str) -> str:
  """The path a leaf is matched by: nnx's trailing `/value` left out."""
  # nnx.State paths end in the Variable's `value`; a plain dict of the same model
  # (`nnx.to_pure_dict`) names the same leaf without it.
  return path.removesuffix("/value")


def _check_lined_up(tree: Slots, params: Slots, name: str) -> None:
  if len(tree.leaves) != len(params.leaves):
    raise ValueError(
        f"`{name}` has {len(tree.leaves)} slots but params have {len(params.leaves)} "
        f"(counting None leaves); build it from the same params, e.g. jaxprune.select(params)"
    )
  for mine, theirs in zip(tree.paths, params.paths):
    if canonical_path(mine) != canonical_path(theirs):
      raise ValueError(f"`{name}` has a leaf at {mine} where params have {theirs}")


def _lines_up(tree: PyTree, params: PyTree) -> bool:
  mine, theirs = slots(tree), slots(params)
  return len(mine.paths) == len(theirs.paths) and all(
      canonical_path(a) == canonical_path(b) for a, b in zip(mine.paths, theirs.paths))


def _is_builder(where: Any, params: PyTree) -> bool:
  if not callable(where):
    return False
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(where, is_leaf=is_none)):
    return True  # A function: one opaque leaf.
  return not _lines_up(where, params)  # A callable pytree that is not a selection.


def _as_flag(value: Any, path: str, name: str) -> bool:
  if value is None:
    return False
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and value.dtype == bool:
    if isinstance(value, jax.core.Tracer):
      raise TypeError(f"`{name}` at {path} is traced; a selection must be static (close over it)")
    return bool(value)
  raise TypeError(
      f"`{name}` at {path} must be a bool (True = prune this leaf), got {value!r}; "
      "build it with jaxprune.select(params)"
  )


def resolve_where(
    where: Any,
    params: PyTree,
    *,
    name: str = "where",
    allow_empty: bool = False,
    floats_only: bool = True,
) -> list[bool]:
  """One flag per slot of `params`: is that leaf pruned?

  `floats_only=False` lets the selection hold bool leaves too (checking mask trees).

  Raises:
    ValueError / TypeError, naming the path: `where` does not line up with params,
      holds a non-bool, selects a `None` slot or a non-floating-point leaf, or
      (unless `allow_empty`) selects nothing.
  """
  if _is_builder(where, params):
    where = where(params)
  mine, theirs = slots(where), slots(params)
  _check_lined_up(mine, theirs, name)
  flags = []
  for path, value, leaf in zip(theirs.paths, mine.leaves, theirs.leaves):
    flag = _as_flag(value, path, name)
    if flag and leaf is None:
      raise ValueError(f"`{name}` selects {path}, which is None in params")
    if flag and floats_only and not is_float_array(leaf):
      got = getattr(leaf, "dtype", type(leaf).__name__)
      raise ValueError(
          f"`{name}` selects {path}, a {got} leaf; only floating-point arrays can be pruned"
      )
    flags.append(flag)
  if not allow_empty and not any(flags):
    raise ValueError(
        f"`{name}` selects no leaf of params: the masks would prune nothing. "
        "Check the patterns given to jaxprune.select"
    )
  return flags


def where_tree(params: PyTree, flags: list[bool]) -> PyTree:
  """`flags` as a tree of Python bools in `params`' structure (`None` slots stay None)."""
  leaves = slots(params).leaves
  return unflatten(params, [None if x is None else f for x, f in zip(leaves, flags)])


def _check_mask(mask: Any, ref: Any, path: str, name: str, ref_is_masks: bool) -> None:
  if mask is None:
    if ref_is_masks and ref is not None:
      raise ValueError(f"`{name}` at {path}: None where a mask is held")
    return
  if ref is None:
    raise ValueError(f"`{name}` at {path}: a mask for a leaf that is not targeted (None)")
  if getattr(mask, "dtype", None) != jnp.bool_:
    got = getattr(mask, "dtype", type(mask).__name__)
    raise ValueError(f"`{name}` at {path}: expected a bool array, got {got}")
  if tuple(mask.shape) != tuple(ref.shape):
    raise ValueError(
        f"`{name}` at {path}: mask shape {tuple(mask.shape)} != parameter shape "
        f"{tuple(ref.shape)}"
    )


def align_masks(
    masks: PyTree, params: PyTree, name: str = "masks", *, ref_is_masks: bool = False
) -> list[Any]:
  """The masks of `masks`, one per slot of `params`, after checking each.

  Every mask must be a bool array of its parameter's shape, or `None`; a `None`
  slot of params gets `None`. With `ref_is_masks`, `params` is itself a mask tree
  (the masks held now): its `None` slots must stay `None` and its arrays must get
  arrays.

  Raises:
    ValueError: naming the first offending path.
  """
  mine, theirs = slots(masks), slots(params)
  _check_lined_up(mine, theirs, name)
  for path, mask, ref in zip(theirs.paths, mine.leaves, theirs.leaves):
    _check_mask(mask, ref, path, name, ref_is_masks)
  return mine.leaves


def check_masks(
    masks: PyTree, params: PyTree, name: str = "masks", *, ref_is_masks: bool = False
) -> PyTree:
  """Validates a mask tree against `params` and returns it in `params`' structure.

  Leaves are matched by path string, so masks whose container types differ but
  whose paths agree (an `nnx.Optimizer`'s `OptVariable`-wrapped masks against
  `Param`-wrapped params) are accepted and re-laid in `params`' structure.

  Raises:
    ValueError: naming the first offending path (see `align_masks`).
  """
  return unflatten(params, align_masks(masks, params, name, ref_is_masks=ref_is_masks))


def map_masked(fn: Callable[..., Any], masks: PyTree, params: PyTree, *rest: PyTree) -> PyTree:
  """`fn(mask, param, *rest)` on every slot; `mask` is None for unselected leaves."""
  return jax.tree.map(fn, masks, params, *rest, is_leaf=is_none)


def check_selection(masks: PyTree, flags: list[bool], params: PyTree, name: str) -> None:
  """`masks` (already in `params`' structure) hold a mask exactly where `flags`
  select: a ValueError naming `name` and the first path that disagrees."""
  for path, mask, flag in zip(slots(params).paths, slots(masks).leaves, flags):
    if (mask is not None) != flag:
      raise ValueError(f"{name} at {path}: " + ("no mask for a leaf `where` selects" if flag
                                               else "a mask for a leaf `where` does not select"))


def selected_masks(masks: PyTree) -> list[jax.Array]:
  """The arrays of a mask tree, in slot order."""
  return [m for m in jax.tree.leaves(masks, is_leaf=is_none) if m is not None]


def all_kept(params: PyTree, flags: list[bool]) -> PyTree:
  """The mask tree keeping every weight of the flagged leaves, each sharded as its leaf."""
  leaves = slots(params).leaves
  return unflatten(params, [jnp.ones_like(x, dtype=jnp.bool_) if f else None
                            for x, f in zip(leaves, flags)])


def owned_copy(masks: PyTree) -> PyTree:
  """Fresh bool arrays: a state that owns its masks survives the caller's buffers
  being donated (and the caller survives the state's being donated)."""
  return jax.tree.map(lambda m: None if m is None else jnp.array(m, copy=True),
                      masks, is_leaf=is_none)


def pack_bits(mask: Any) -> Any:
  """One mask as uint8, 1 bit per weight: row-major, big-endian within a byte (the
  `np.packbits` order, shared by checkpoints and the compressed export). A NumPy
  mask packs on the host, a JAX one on its device."""
  xp = np if isinstance(mask, np.ndarray) else jnp
  return xp.packbits(xp.reshape(mask, -1))


def unpack_bits(bits: Any, size: int) -> Any:
  """Inverse of `pack_bits`: the flat bool mask of `size` weights."""
  xp = np if isinstance(bits, np.ndarray) else jnp
  return xp.unpackbits(bits, count=size).astype(bool)



def selected_leaves(
    params: PyTree, where: Any, previous: PyTree | None = None
) -> list[tuple[int, str, Any, Any]]:
  """`(slot, path, param, previous mask or None)` of every leaf `where` selects.

  Raises:
    ValueError: as `resolve_where` (selecting nothing included) and `align_masks`;
      `previous` without a mask for a selected leaf, or with one for a leaf
      `where` does not select.
  """
  flags = resolve_where(where, params)
  theirs = slots(params)
  prev = [None] * len(flags) if previous is None else align_masks(previous, params, "previous")
  chosen = []
  for i, (path, w, flag, mask) in enumerate(zip(theirs.paths, theirs.leaves, flags, prev)):
    if previous is not None and flag != (mask is not None):
      raise ValueError(
          f"`previous` {'has no mask for selected leaf' if flag else 'has a mask for'} {path}"
          f"{'' if flag else ', which `where` does not select'}; compute it with the same `where`"
      )
    if flag:
      chosen.append((i, path, w, mask))
  return chosen


def masks_from(params: PyTree, computed: dict[int, Any]) -> PyTree:
  """The mask tree holding `computed[slot]` at its slots and `None` elsewhere."""
  return unflatten(params, [computed.get(i) for i in range(len(slots(params).leaves))])


def float_part(params: PyTree) -> PyTree:
  """`params` with every leaf that is not a floating-point (or complex) array set to `None`.

  What a train step differentiates and the optimizer updates: int step counters,
  lookup tables and other non-float leaves become absent slots (as in
  `eqx.partition`), so `jax.grad` and optax never see them. `merge_float_part`
  puts them back. A tree of float leaves is returned unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> params = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
    >>> jaxprune.tree.float_part(params)["step"] is None
    True
    >>> opt_state = optax.adam(1e-3).init(jaxprune.tree.float_part(params))  # for make_train_step
  """
  return unflatten(params, [x if _differentiable(x) else None for x in slots(params).leaves])


def merge_float_part(params: PyTree, part: PyTree) -> PyTree:
  """`params` with its float leaves taken from `part` (a `float_part` of it)."""
  mine = slots(params).leaves
  theirs = slots(part).leaves
  return unflatten(params, [y if _differentiable(x) else x for x, y in zip(mine, theirs)])


def _differentiable(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)  # float and complex

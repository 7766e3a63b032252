"""Choosing which leaves of a parameter pytree get pruned, by their path."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp

PyTree = Any
IncludeSpec = Union[str, Sequence[str], Callable[[str, Any], bool]]
# A `where` argument: a bool pytree from `select`, or a function building one from params.
Where = Union[PyTree, Callable[[PyTree], PyTree]]

# Every weight matrix, kernel and stacked kernel (rank >= 2): Flax `Dense_0/kernel`, NNX
# `fc1/kernel/value`, Equinox `layers/0/weight`, Haiku `w`. Not embedding tables, and not
# biases or norm scales that stacking (`nnx.scan`, `vmap`ped layers) made rank 2.
DEFAULT_INCLUDE = ("*",)
DEFAULT_EXCLUDE = ("*embed*", "bias", "scale")


def path_components(path: tuple) -> tuple[str, ...]:
  """Turns a `jax.tree_util` key path into plain strings.

  Dict keys give the key, attributes (NamedTuple fields, `nnx.State`'s `.value`) the
  attribute name, and sequence indices the index as a string.

  Example: `(DictKey('blocks'), SequenceKey(0), GetAttrKey('kernel'))` gives
  `('blocks', '0', 'kernel')`.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:  # Custom key types: their str() is the best name available.
      parts.append(str(key).strip("[]./'\""))
  return tuple(parts)


def path_string(path: tuple) -> str:
  """`blocks/0/attn/output_proj/kernel`-style name of a key path."""
  return "/".join(path_components(path))


def leaf_paths(tree: PyTree) -> list[str]:
  """The path strings of the leaves of `tree`, in `jax.tree.leaves` order."""
  return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_float_array(leaf: Any) -> bool:
  """A floating-point array (or `jax.ShapeDtypeStruct`): the only leaves that can be pruned."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _as_patterns(name: str, patterns: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(patterns, str):
    return (patterns,)
  patterns = tuple(patterns)
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"`{name}` patterns must be strings, got {p!r}")
  return patterns


def matches_pattern(parts: tuple[str, ...], pattern: str) -> bool:
  """Does `pattern` match the path `parts`?

  A pattern without `/` matches any one component; a pattern with `/` matches a
  trailing run of whole components (`Dense_0/kernel` matches
  `params/Dense_0/kernel`), ignoring nnx's trailing `value`.
  """
  if "/" not in pattern:
    return any(fnmatch.fnmatchcase(c, pattern) for c in parts)
  paths = ["/".join(parts)]
  if len(parts) > 1 and parts[-1] == "value":
    paths.append("/".join(parts[:-1]))
  return any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, "*/" + pattern)
             for p in paths)


def select(
    tree: PyTree,
    include: IncludeSpec | None = None,
    exclude: str | Sequence[str] = (),
    min_ndim: int = 2,
) -> PyTree:
  """Chooses the leaves of `tree` to prune, by path.

  A leaf is selected when all of these hold:

  * its path matches an `include` glob (`fnmatch`), or, with a callable `include`,
    `include(path, leaf)` is true. A glob without `/` is matched against each
    path component (dict key, attribute name, sequence index as a string); a glob
    with `/` against a trailing run of whole components, so `"Dense_0/kernel"`
    matches `params/Dense_0/kernel` and `"*/fc1/kernel"` matches
    `blocks/0/mlp/fc1/kernel` (an nnx trailing `/value` may be left out);
  * its path matches no `exclude` glob (same rules);
  * the leaf is a floating-point array (or `jax.ShapeDtypeStruct`);
  * `leaf.ndim >= min_ndim`, so biases and norm scales are skipped by default.

  With `include=None` (the default) every floating-point leaf of rank >= 2 is
  included (kernels of Flax `Dense`/`Conv`/`nnx.Linear`, Equinox `weight`s, stacked
  expert or `nnx.scan` kernels) except embedding tables (a path component matching
  `*embed*`) and leaves named `bias` or `scale` (stacked biases and norm scales are
  rank 2); `exclude` then removes more. An explicit `include` replaces all of that:
  only it, `exclude` and `min_ndim` apply.

  Args:
    tree: any pytree of arrays: a Linen `params` dict, an `nnx.State`,
      `eqx.filter(model, eqx.is_array)` (its `None` leaves are never selected),
      lists, tuples, NamedTuples.
    include: glob pattern(s), a callable `(path: str, leaf) -> bool`, or None for
      the default selection.
    exclude: glob pattern(s); a leaf matching any is never selected.
    min_ndim: smallest rank of a selected leaf.

  Returns:
    A pytree with the structure of `tree`: a Python bool per array leaf (`None`
    leaves stay `None`).

  Raises:
    ValueError: nothing is selected; the message lists the patterns and the first
      paths of `tree`.
    TypeError: a pattern that is not a string.

  Example:

    >>> params = {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    ...           "embed": {"embedding": jnp.ones((8, 4))}}
    >>> jaxprune.select(params)
    {'embed': {'embedding': False}, 'fc1': {'bias': False, 'kernel': True}}
    >>> jaxprune.select(params, include="fc1/kernel")["fc1"]
    {'bias': False, 'kernel': True}
  """
  exclude = _as_patterns("exclude", exclude)
  if include is None:
    include, exclude = DEFAULT_INCLUDE, DEFAULT_EXCLUDE + exclude
  if callable(include):
    def included(path: str, parts: tuple[str, ...], leaf: Any) -> bool:
      return bool(include(path, leaf))
  else:
    patterns = _as_patterns("include", include)

    def included(path: str, parts: tuple[str, ...], leaf: Any) -> bool:
      return any(matches_pattern(parts, p) for p in patterns)

  def choose(path: tuple, leaf: Any) -> bool:
    parts = path_components(path)
    if any(matches_pattern(parts, p) for p in exclude):
      return False
    if not is_float_array(leaf) or leaf.ndim < min_ndim:
      return False
    return included("/".join(parts), parts, leaf)

  chosen = jax.tree_util.tree_map_with_path(choose, tree)
  if not any(jax.tree.leaves(chosen)):
    paths = leaf_paths(tree)
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(
        f"select: no leaf matched include={include!r}, exclude={exclude!r}, "
        f"min_ndim={min_ndim} (floating-point leaves only). "
        f"The tree has {len(paths)} leaves: {shown or '(none)'}"
    )
  return chosen

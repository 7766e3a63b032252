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

DEFAULT_INCLUDE = ("output_proj", "fc*")


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


def _is_float_array(leaf: Any) -> bool:
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


def select(
    tree: PyTree,
    include: IncludeSpec = DEFAULT_INCLUDE,
    exclude: str | Sequence[str] = (),
    min_ndim: int = 2,
) -> PyTree:
  """Chooses the leaves of `tree` to prune, by path.

  A leaf is selected when all of these hold:

  * some component of its path (dict key, attribute name, sequence index as a
    string) matches an `include` glob (`fnmatch`), or, with a callable `include`,
    `include(path, leaf)` is true, where `path` joins the components with `/`
    (`blocks/0/attn/output_proj/kernel`);
  * no component matches an `exclude` glob;
  * the leaf is a floating-point array (or `jax.ShapeDtypeStruct`);
  * `leaf.ndim >= min_ndim`, so biases and norm scales are skipped by default.

  Args:
    tree: any pytree of arrays: a Linen `params` dict, an `nnx.State`, lists, tuples,
      NamedTuples.
    include: glob pattern(s) matched against each path component, or a callable
      `(path: str, leaf) -> bool`.
    exclude: glob pattern(s); a leaf with any matching component is never selected.
    min_ndim: smallest rank of a selected leaf.

  Returns:
    A pytree of Python bools with the structure of `tree`.

  Raises:
    ValueError: nothing is selected; the message lists the patterns and the first
      paths of `tree`.

  Example::

    >>> params = {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    >>> jaxprune.select(params)
    {'fc1': {'bias': False, 'kernel': True}}
  """
  exclude = _as_patterns("exclude", exclude)
  if callable(include):
    def included(path: str, parts: tuple[str, ...], leaf: Any) -> bool:
      return bool(include(path, leaf))
  else:
    patterns = _as_patterns("include", include)

    def included(path: str, parts: tuple[str, ...], leaf: Any) -> bool:
      return any(fnmatch.fnmatchcase(c, p) for c in parts for p in patterns)

  def choose(path: tuple, leaf: Any) -> bool:
    parts = path_components(path)
    if any(fnmatch.fnmatchcase(c, p) for c in parts for p in exclude):
      return False
    if not _is_float_array(leaf) or leaf.ndim < min_ndim:
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


def resolve_where(where: Where, params: PyTree) -> PyTree:
  """The bool pytree that `where` stands for, checked against `params`.

  `where` may be a bool pytree (from `select`) or a callable `params -> bool pytree`.
  """
  if callable(where) and not isinstance(where, (bool, jax.Array)):
    where = where(params)
  params_def = jax.tree.structure(params)
  where_def = jax.tree.structure(where)
  if params_def != where_def:
    raise ValueError(
        "`where` must have the structure of params (use jaxprune.select(params)); "
        f"got {where_def}, params are {params_def}"
    )
  return jax.tree.map(bool, where)

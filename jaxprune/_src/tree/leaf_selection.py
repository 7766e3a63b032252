"""Choosing which leaves of a parameter pytree get pruned: by the role the program
gives them (`layouts=`), else by their path."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import jax
import jax.numpy as jnp

from jaxprune._src.types import PyTree

if TYPE_CHECKING:  # the layouts module imports this one
  from jaxprune._src.oneshot.layouts import Layouts

IncludeSpec = Union[str, Sequence[str], Callable[[str, Any], bool]]
# A `where` argument: a bool pytree from `select`, or a function building one from params.
Where = Union[PyTree, Callable[[PyTree], PyTree]]

# Every weight matrix, kernel and stacked kernel (rank >= 2): Flax `Dense_0/kernel`, NNX
# `fc1/kernel/value`, Equinox `layers/0/weight`, Haiku `w`. Not embedding tables, and not
# biases or norm scales that stacking (`nnx.scan`, `vmap`ped layers) made rank 2.
DEFAULT_INCLUDE = ("*",)
DEFAULT_EXCLUDE = ("*embed*", "bias", "scale")
# With layouts, the uses whose leaves are selected by default: weights of a product
# or a convolution (not lookups, scales, biases, tied or unknown uses).
WEIGHT_USES = ("dot_general", "conv")


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
  """`blocks/0/attn/output_proj/kernel`-style name of a key path.

  Each component is written whole, so a dict key holding `/` (a Keras variable
  path such as `block_0/attention/query/kernel`) prints as itself; patterns read
  that `/` as a separator too (`pattern_parts`), so a printed path, used as a
  pattern, matches its leaf (keys holding glob characters such as `[` aside).
  """
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


def pattern_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
  """The components a pattern sees: `parts` with each `/` inside one splitting it.

  A flat dict keyed by Keras variable paths then matches as the nested dicts its
  keys name: `("block_0/attention/query/bias",)` gives
  `("block_0", "attention", "query", "bias")`, which the default `bias`
  exclusion and `include="kernel"`-style patterns see.

  Examples:
    >>> from jaxprune._src.tree.leaf_selection import pattern_parts
    >>> pattern_parts(("params", "block_0/attention/query/bias"))
    ('params', 'block_0', 'attention', 'query', 'bias')
  """
  return tuple(piece for part in parts for piece in part.split("/"))


def matches_pattern(parts: tuple[str, ...], pattern: str) -> bool:
  """Does `pattern` match the path `parts`?

  A pattern without `/` matches any one component; a pattern with `/` matches a
  trailing run of whole components (`Dense_0/kernel` matches
  `params/Dense_0/kernel`), ignoring nnx's trailing `value`. A `/` inside a
  component separates components too (`pattern_parts`), whether `parts` come
  from `path_components` or from splitting a path string: every caller
  (`select`, `fixed=` of distributions, `stacked=`) matches alike.

  Examples:
    >>> from jaxprune._src.tree.leaf_selection import matches_pattern
    >>> matches_pattern(("block_0/attention/query/bias",), "bias")
    True
    >>> matches_pattern(("block_0/attention/query/kernel",), "query/kernel")
    True
  """
  parts = pattern_parts(parts)
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
    *,
    layouts: Layouts | None = None,
) -> PyTree:
  """Chooses the leaves of `tree` to prune: by role with `layouts`, else by path.

  A leaf is selected when all of these hold:

  * with `layouts` (`jaxprune.tree.weight_layouts(apply_fn, params, x)`), the
    program uses it as the weight of a product or a convolution (`use` is
    `"dot_general"` or `"conv"`): not an embedding table (`"gather"`), a norm
    scale or a bias (`"elementwise"`), a tied (`"mixed"`), unknown or unused leaf,
    nor one the layouts do not describe, whatever its name;
  * its path matches an `include` glob (`fnmatch`), or, with a callable `include`,
    `include(path, leaf)` is true. A glob without `/` is matched against each
    path component (dict key, attribute name, sequence index as a string); a glob
    with `/` against a trailing run of whole components, so `"Dense_0/kernel"`
    matches `params/Dense_0/kernel` and `"*/fc1/kernel"` matches
    `blocks/0/mlp/fc1/kernel` (an nnx trailing `/value` may be left out). A `/`
    inside a dict key separates components too: a flat dict keyed by Keras
    variable paths (`"block_0/attention/query/kernel"`) matches as nested dicts
    would (`"kernel"`, `"query/*"`, the default `bias`/`scale` exclusions);
  * its path matches no `exclude` glob (same rules);
  * the leaf is a floating-point array (or `jax.ShapeDtypeStruct`);
  * `leaf.ndim >= min_ndim`, so biases and norm scales are skipped by default.

  With `include=None` (the default) and `layouts`, the role decides alone
  (`exclude` and `min_ndim` still apply). With `include=None` and no layouts, names
  are the fallback: every floating-point leaf of rank >= 2 is included (kernels
  of Flax `Dense`/`Conv`/`nnx.Linear`, Equinox `weight`s, stacked expert or
  `nnx.scan` kernels) except embedding tables (a path component matching
  `*embed*`) and leaves named `bias` or `scale` (stacked biases and norm scales are
  rank 2); `exclude` then removes more. That convention misses what names do not
  say: norm scales named otherwise (penzai's `weights`, stacked to rank 2) are
  selected, and so are embeddings held where paths are indices (a list of
  arrays). An explicit `include` replaces the name default: only it, `exclude`,
  `min_ndim` and (given) the role apply.

  Args:
    tree: any pytree of arrays: a Linen `params` dict, an `nnx.State`,
      `eqx.filter(model, eqx.is_array)` (its `None` leaves are never selected),
      lists, tuples, NamedTuples.
    include: glob pattern(s), a callable `(path: str, leaf) -> bool`, or None for
      the default selection.
    exclude: glob pattern(s); a leaf matching any is never selected.
    min_ndim: smallest rank of a selected leaf.
    layouts: each leaf's use read from the program (`weight_layouts` of the same
      params), or None to select by names.

  Returns:
    A pytree with the structure of `tree`: a Python bool per array leaf (`None`
    leaves stay `None`).

  Raises:
    ValueError: nothing is selected (the message lists the patterns, the first
      paths of `tree` and, with layouts, their uses); `layouts` that describe no
      leaf of `tree`.
    TypeError: a pattern that is not a string.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    ...           "embed": {"embedding": jnp.ones((8, 4))}}
    >>> jaxprune.select(params)
    {'embed': {'embedding': False}, 'fc1': {'bias': False, 'kernel': True}}
    >>> jaxprune.select(params, include="fc1/kernel")["fc1"]
    {'bias': False, 'kernel': True}
    >>> flat = {"block_0/query/kernel": jnp.ones((4, 4)), "block_0/query/bias": jnp.ones((2, 4))}
    >>> jaxprune.select(flat)           # the stacked (2, 4) bias is excluded by name
    {'block_0/query/bias': False, 'block_0/query/kernel': True}

    By role, where names say nothing (a list of arrays: token and position tables,
    a stacked norm scale, a stacked weight):

    >>> from jaxprune.tree import weight_layouts
    >>> plain = [jnp.ones((10, 4)), jnp.ones((6, 4)), jnp.ones((2, 4)), jnp.ones((2, 4, 4))]
    >>> def apply_fn(p, ids):
    ...   x = p[0][ids] + p[1][jnp.arange(ids.shape[0])]
    ...   for i in range(2):
    ...     x = (x * p[2][i]) @ p[3][i]
    ...   return x
    >>> jaxprune.select(plain)           # names: every rank-2 leaf
    [True, True, True, True]
    >>> jaxprune.select(plain, layouts=weight_layouts(apply_fn, plain, jnp.zeros(5, int)))
    [False, False, False, True]
  """
  exclude = _as_patterns("exclude", exclude)
  role = _by_role(tree, layouts)
  if include is None:
    if layouts is None:
      include, exclude = DEFAULT_INCLUDE, DEFAULT_EXCLUDE + exclude
    else:
      include = DEFAULT_INCLUDE
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
    if not role("/".join(parts)):
      return False
    return included("/".join(parts), parts, leaf)

  chosen = jax.tree_util.tree_map_with_path(choose, tree)
  if not any(jax.tree.leaves(chosen)):
    raise ValueError(_nothing_selected(tree, include, exclude, min_ndim, layouts))
  return chosen


def _layout_at(layouts: Mapping[str, Any], path: str) -> Any:
  """`path`'s layout, or None; an nnx trailing `/value` may differ on either side
  (as `mask_tree.canonical_path` matches)."""
  bare = path.removesuffix("/value")
  for key in (path, bare, bare + "/value"):
    if key in layouts:
      return layouts[key]
  return None


def _by_role(tree: PyTree, layouts: Layouts | None) -> Callable[[str], bool]:
  """`path -> selectable?`: always true without layouts; with them, whether the
  program uses the leaf as the weight of a product or conv (`WEIGHT_USES`)."""
  if layouts is None:
    return lambda path: True
  if not isinstance(layouts, Mapping):
    raise ValueError("layouts must be a jaxprune.tree.Layouts (weight_layouts(apply_fn, "
                     f"params, x)) or None, got {type(layouts).__name__}")
  paths = leaf_paths(tree)
  if paths and not any(_layout_at(layouts, p) is not None for p in paths):
    shown = ", ".join(list(layouts)[:4])
    raise ValueError(f"select: the layouts describe none of the tree's leaves (they hold "
                     f"{shown or 'nothing'}; the tree {', '.join(paths[:4])}): build them "
                     "with weight_layouts from the same params")

  def role(path: str) -> bool:
    layout = _layout_at(layouts, path)
    return layout is not None and layout.use in WEIGHT_USES
  return role


def _nothing_selected(tree: PyTree, include: Any, exclude: tuple, min_ndim: int,
                      layouts: Layouts | None) -> str:
  paths = leaf_paths(tree)
  shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
  text = (f"select: no leaf matched include={include!r}, exclude={exclude!r}, "
          f"min_ndim={min_ndim} (floating-point leaves only). "
          f"The tree has {len(paths)} leaves: {shown or '(none)'}")
  if layouts is not None:
    uses = [f"{p}: {getattr(_layout_at(layouts, p), 'use', 'not described')}" for p in paths[:8]]
    text += (f". With layouts only weights of a product or conv are selected; the program "
             f"uses {'; '.join(uses)}")
  return text

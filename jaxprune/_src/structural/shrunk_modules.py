"""A physically shrunk model put back into its framework: Flax NNX and Equinox.

`shrink(params, groups, keep)` (`jaxprune.shrinking`) returns params of the same
structure with smaller arrays. A framework's layers also hold their sizes as
plain attributes (`nnx.Linear.out_features`, `eqx.nn.Conv2d.out_channels`), read
by their `__call__` (`eqx.nn.LayerNorm` checks its input against `shape`), by
`repr`, and by code that builds on the model. The functions here rebuild the
module around the smaller arrays and rewrite those sizes from the arrays:

* `nnx_module(graphdef, small_state, *rest)` or `nnx_module(model, small_state)`:
  `nnx.merge`, then the sizes of the standard NNX layers.
* `equinox_module(module, small_params, groups=None, keep=None)`: the module's
  arrays replaced, then the sizes of the standard Equinox layers (`groups` and
  `keep`, what `shrink` was given, tell an attention's removed heads from narrowed
  ones).

Each size is read from the layer's own arrays, counted from their last axis (so a
stack of layers made by `vmap`/`nnx.vmap` is read per layer); arrays of one layer
that disagree (a `BatchNorm` whose statistics were not shrunk with its scale) are
an error naming the layer. The sizes rewritten:

* NNX: `Linear` (`in_features`, `out_features`), `LinearGeneral` (`in_features`,
  `out_features`, `batch_axis`), `Conv` and `ConvTranspose` (`in_features`,
  `out_features`, `kernel_shape`), `Einsum` (`kernel_shape`, `bias_shape`),
  `Embed` (`num_embeddings`, `features`), `LayerNorm`, `RMSNorm`, `BatchNorm`,
  `InstanceNorm` (`num_features`), `LoRA` (`in_features`, `out_features`),
  `MultiHeadAttention` (`num_heads`, `num_kv_heads`, `in_features`,
  `in_kv_features`, `out_features`; `head_dim` and `qkv_features` when queries,
  keys and values keep one head size).
* Equinox: `nn.Linear` (`in_features`, `out_features`), `nn.Conv*` and
  `nn.ConvTranspose*` (`in_channels`, `out_channels`), `nn.LayerNorm` and
  `nn.RMSNorm` (`shape`), `nn.Embedding` (`num_embeddings`, `embedding_size`),
  `nn.MLP` (`in_size`, `out_size`; `width_size` when every hidden layer keeps one
  width), `nn.MultiheadAttention` (`num_heads`, `qk_size`, `vo_size` and the four
  feature sizes; the head count from `groups` and `keep` where given, else from
  the rows, refused when fewer heads and narrower heads would both explain them,
  as halving the heads and halving every head do). A `"scalar"` size stays.
  `eqx.nn.BatchNorm`'s running statistics live in an `eqx.nn.State`, outside the
  module: they are not touched here.
* A `GroupNorm` (NNX or Equinox) whose channel count changed is refused: its
  arrays are per channel and do not say whether whole groups or channels within
  groups were removed.

**Your own sizes are not rewritten.** A module attribute that is a plain int your
code set (`self.num_heads = 4` in a hand-written attention) relates to no array,
so it is left as it is. If the forward pass reads it (`q.reshape(t,
self.num_heads, -1)`), compute it from the arrays instead (`heads =
self.wq.kernel.shape[1] // head_dim`), or run the shrunk model as a program:
`jaxprune.structural.shrunk_program(groups, keep)` re-interprets the program
`channel_groups` traced with the smaller shapes, whatever the modules hold.

**Linen** has no write-back function: a Linen module holds no arrays, and its
sizes are constructor arguments that `apply` checks against the params
(`ScopeParamShapeError`). Rebuild the module with the new sizes (`features=...`,
read from the shrunk params) and apply the shrunk variables dict, or run
`shrunk_program(groups, keep)` on them. Example:

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from jaxprune.structural import channel_groups, keep_top, magnitude_importance, shrink
  >>> class MLP(nn.Module):
  ...   hidden: int = 8
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
  ...     return nn.Dense(3, name="fc2")(h)
  >>> x = jnp.ones((2, 4))
  >>> variables = MLP().init(jax.random.key(0), x)
  >>> groups = channel_groups(MLP().apply, variables, x)
  >>> keep = keep_top(groups, magnitude_importance(groups, variables), 0.5)
  >>> small = shrink(variables, groups, keep)
  >>> smaller = MLP(hidden=small["params"]["fc1"]["kernel"].shape[1])
  >>> smaller.apply(small, x).shape
  (2, 3)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxprune._src.oneshot.layouts import is_array_leaf
from jaxprune._src.tree.leaf_selection import path_string
from jaxprune._src.tree.mask_tree import canonical_path, slots
from jaxprune._src.types import PyTree

if TYPE_CHECKING:
  from jaxprune._src.structural.channel_groups import ChannelGroups
  from jaxprune._src.structural.shrinking import Keep

Sizes = dict[str, Any]  # attribute name -> its new value

_FIX = ("shrink every array of a layer together: trace `channel_groups` over all of the "
        "model's arrays (for NNX the whole `nnx.split(model)` state, batch statistics "
        "included) and `shrink` that same tree")
_ROOT = "the root module"  # how a layer at the top of the tree is named in errors


# ----------------------------------------------------------------------------- sizes


def _shape(module: Any, name: str) -> tuple[int, ...] | None:
  """The shape of array attribute `name` of `module` (an NNX Variable or an array),
  None where the module has none (`use_bias=False`)."""
  x = getattr(module, name, None)
  shape = getattr(x, "shape", None)
  return None if shape is None else tuple(shape)


def _size(where: str, module: Any, reads: Sequence[tuple[str, int]]) -> int | None:
  """The one size that axes `reads` (array attribute, axis) of `module` agree on;
  None when the module holds none of the arrays.

  Raises:
    ValueError: the arrays disagree, or one has too few axes (named, with `where`).
  """
  seen = []
  for name, axis in reads:
    shape = _shape(module, name)
    if shape is None:
      continue
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"{where} ({type(module).__name__}): `{name}` has shape {shape}, "
                       f"with no axis {axis}")
    seen.append((name, axis, shape))
  sizes = {shape[axis] for _, axis, shape in seen}
  if len(sizes) > 1:
    listed = ", ".join(f"`{name}` {shape} (axis {axis})" for name, axis, shape in seen)
    raise ValueError(f"{where} ({type(module).__name__}): its arrays disagree on one size: "
                     f"{listed}; {_FIX}")
  return sizes.pop() if sizes else None


def _known(sizes: Sizes) -> Sizes:
  return {k: v for k, v in sizes.items() if v is not None}


def _trailing(where: str, module: Any, name: str, ndim: int) -> tuple[int, ...] | None:
  """The last `ndim` axes of array attribute `name` (a stack's leading axes left out)."""
  shape = _shape(module, name)
  if shape is None:
    return None
  if len(shape) < ndim:
    raise ValueError(f"{where} ({type(module).__name__}): `{name}` has shape {shape}, "
                     f"fewer than the layer's {ndim} axes")
  return shape[len(shape) - ndim:]


# ----------------------------------------------------------------------------- NNX


def _nnx_linear(where: str, m: Any) -> Sizes:
  return {"in_features": _size(where, m, [("kernel", -2)]),
          "out_features": _size(where, m, [("kernel", -1), ("bias", -1)])}


def _nnx_linear_general(where: str, m: Any) -> Sizes:
  nb, ni, no = len(m.batch_axis), len(m.in_features), len(m.out_features)
  kernel = _trailing(where, m, "kernel", nb + ni + no)
  if kernel is None:
    return {}
  bias = _trailing(where, m, "bias", nb + no)
  if bias is not None and bias != kernel[:nb] + kernel[nb + ni:]:
    raise ValueError(f"{where} (LinearGeneral): `bias` {bias} does not match `kernel` "
                     f"{kernel} (batch and out axes); {_FIX}")
  batch = type(m.batch_axis)(zip(m.batch_axis.keys(), kernel[:nb]))
  return {"batch_axis": batch, "in_features": kernel[nb:nb + ni],
          "out_features": kernel[nb + ni:]}


def _nnx_conv(where: str, m: Any) -> Sizes:
  kernel = _trailing(where, m, "kernel", len(m.kernel_shape))
  if kernel is None:
    return {}
  mask = getattr(m, "mask", None)
  if mask is not None and tuple(np.shape(mask)) != kernel:
    raise ValueError(f"{where} ({type(m).__name__}): its `mask` has shape {np.shape(mask)}, "
                     f"the kernel {kernel}; shrink the mask with the kernel")
  transposed = getattr(m, "transpose_kernel", False)
  ins, outs = (-1, -2) if transposed else (-2, -1)
  groups = getattr(m, "feature_group_count", 1)
  return {"kernel_shape": kernel, "in_features": kernel[ins] * groups,
          "out_features": _size(where, m, [("kernel", outs), ("bias", -1)])}


def _nnx_einsum(where: str, m: Any) -> Sizes:
  kernel = _trailing(where, m, "kernel", len(m.kernel_shape))
  bias = None if m.bias_shape is None else _trailing(where, m, "bias", len(m.bias_shape))
  return {"kernel_shape": kernel, "bias_shape": bias}


def _nnx_embed(where: str, m: Any) -> Sizes:
  return {"num_embeddings": _size(where, m, [("embedding", -2)]),
          "features": _size(where, m, [("embedding", -1)])}


def _nnx_norm(where: str, m: Any) -> Sizes:
  reads = [(name, -1) for name in ("scale", "bias", "mean", "var")]
  return {"num_features": _size(where, m, reads)}


def _group_norm(where: str, channels: int | None, before: int) -> Sizes:
  """A GroupNorm's arrays are per channel: they do not say whether whole groups or
  channels within each group went, so a changed count is refused, not guessed."""
  if channels is not None and channels != before:
    raise ValueError(f"{where} (GroupNorm) went from {before} to {channels} channels; its "
                     "arrays do not say whether whole groups or channels within groups were "
                     "removed, so its group count is not rewritten: build the module at the "
                     "new sizes, or run `shrunk_program(groups, keep)`")
  return {}


def _nnx_group_norm(where: str, m: Any) -> Sizes:
  channels = _size(where, m, [("scale", -1), ("bias", -1)])
  return _group_norm(where, channels, m.num_groups * m.group_size)


def _nnx_lora(where: str, m: Any) -> Sizes:
  if _size(where, m, [("lora_a", -1), ("lora_b", -2)]) is None:
    return {}
  return {"in_features": _size(where, m, [("lora_a", -2)]),
          "out_features": _size(where, m, [("lora_b", -1)])}


def _nnx_attention(where: str, m: Any) -> Sizes:
  q, k, v, o = (_trailing(f"{where}/{name}", getattr(m, name), "kernel", 3)
                for name in ("query", "key", "value", "out"))
  sizes = {"num_heads": q[-2], "num_kv_heads": k[-2], "in_features": q[0],
           "in_kv_features": k[0], "out_features": o[-1]}
  if q[-1] == k[-1] == v[-1]:  # `head_dim` is one size only when all three keep it
    sizes |= {"head_dim": q[-1], "qkv_features": q[-2] * q[-1]}
  return sizes


def _nnx_rules(nnx: Any) -> list[tuple[type, Callable[[str, Any], Sizes]]]:
  """(layer class, its sizes from its arrays), most specific first; classes missing
  from the installed flax are left out."""
  named = [("MultiHeadAttention", _nnx_attention), ("LinearGeneral", _nnx_linear_general),
           ("Linear", _nnx_linear), ("Conv", _nnx_conv), ("ConvTranspose", _nnx_conv),
           ("Einsum", _nnx_einsum), ("Embed", _nnx_embed), ("GroupNorm", _nnx_group_norm),
           ("LayerNorm", _nnx_norm), ("RMSNorm", _nnx_norm), ("BatchNorm", _nnx_norm),
           ("InstanceNorm", _nnx_norm), ("LoRA", _nnx_lora)]
  return [(getattr(nnx, name), rule) for name, rule in named if hasattr(nnx, name)]


def _nnx_paths(state: Any) -> list[str]:
  return [canonical_path(p) for p in slots(state).paths]


def _nnx_expected(nnx: Any, graphdef: Any) -> list[str] | None:
  """The state paths `graphdef` takes, read by merging it with placeholders; None
  where the installed flax does not say how many leaves it takes."""
  count = getattr(graphdef, "num_leaves", None)
  if count is None:
    return None
  try:
    placeholder = nnx.merge(graphdef, [np.zeros(())] * count)
  except Exception:  # a layer that checks its values on merge: leave the check to nnx.merge
    return None
  return _nnx_paths(nnx.state(placeholder))


def _check_paths(given: Sequence[str], expected: Sequence[str], what: str, fix: str) -> None:
  """`given` paths are `expected` ones, in any order; else the first stray one named."""
  given_set, expected_set = set(given), set(expected)
  missing = [p for p in expected if p not in given_set]
  extra = [p for p in given if p not in expected_set]
  for paths, says in ((missing, "has no leaf at"), (extra, "has a leaf the module has not at")):
    if paths:
      more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
      raise ValueError(f"{what} does not fit the module: it {says} {paths[0]}{more}; {fix}")


def _overlay(nnx: Any, model: Any, small_state: PyTree) -> tuple[Any, Any]:
  """`model`'s graphdef and its whole state with `small_state`'s leaves put in,
  matched by path (`small_state` may hold part of it, e.g. the `nnx.Param`s)."""
  graphdef, state = nnx.split(model)
  theirs, mine = slots(state), slots(small_state)
  at = {canonical_path(p): i for i, p in enumerate(theirs.paths)}
  extra = [p for p in _nnx_paths(small_state) if p not in at]
  if extra:
    raise ValueError(f"`small_state` has a leaf at {extra[0]}, which the model's state has "
                     "not; pass what `shrink` returned for the model's own state (or its "
                     "`nnx.Param`s)")
  leaves = list(theirs.leaves)
  for path, leaf in zip(mine.paths, mine.leaves):
    leaves[at[canonical_path(path)]] = leaf
  return graphdef, theirs.treedef.unflatten(leaves)


def _nnx_fix_sizes(nnx: Any, model: Any) -> None:
  rules = _nnx_rules(nnx)
  modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
  for path, module in modules:
    where = "/".join(str(p) for p in path) or "the root module"
    for cls, rule in rules:
      if isinstance(module, cls):
        for name, value in _known(rule(where, module)).items():
          if hasattr(module, name):
            setattr(module, name, value)
        break


def nnx_module(graphdef_or_model: Any, small_state: PyTree, *rest: PyTree) -> Any:
  """An NNX module holding `small_state`, with its standard layers' sizes rewritten.

  `nnx_module(graphdef, small_state, *rest)` is `nnx.merge(graphdef, small_state,
  *rest)`; `nnx_module(model, small_state)` merges `model`'s graphdef with its
  state in which `small_state`'s leaves (all of it, or part: the `nnx.Param`s) are
  put by path. Then every layer the module docstring lists gets its size
  attributes from its arrays: the result is the module that building the model at
  the new sizes and loading `small_state` (`nnx.update`) gives, as far as the
  standard layers go. `module(x)` runs the smaller model; it equals
  `apply_fn(small_state, x)` for the `apply_fn` (merging the dense graphdef) that
  `channel_groups` traced, wherever that runs (a dense `LinearGeneral` reshapes
  its bias to its old `out_features` and fails). `model` is not changed: the
  result is a new module. Sizes your own modules hold as plain ints are not
  rewritten (module docstring).

  Args:
    graphdef_or_model: an `nnx.GraphDef` (from `nnx.split`) or an `nnx.Module`.
    small_state: what `shrink` returned for the state (an `nnx.State` or its pure
      dict), with the graphdef's paths.
    *rest: further states for `nnx.merge` (with a graphdef only).

  Returns:
    The merged module.

  Raises:
    ValueError: states whose paths are not the module's (the first missing or
      extra path named), one layer's arrays that disagree on a size, or a
      `GroupNorm` whose channel count changed (the layer named).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.structural import channel_groups, keep_top, magnitude_importance
    >>> from jaxprune.structural import nnx_module, shrink
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> graphdef, state = nnx.split(model)
    >>> apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
    >>> x = jnp.ones((2, 4))
    >>> groups = channel_groups(apply_fn, state, x)
    >>> keep = keep_top(groups, magnitude_importance(groups, state), 0.5)
    >>> small = shrink(state, groups, keep)
    >>> smaller = nnx_module(graphdef, small)
    >>> smaller.layers[0].out_features, smaller.layers[2].in_features
    (4, 4)
    >>> bool(jnp.allclose(smaller(x), apply_fn(small, x)))
    True
  """
  from flax import nnx

  if isinstance(graphdef_or_model, nnx.Module):
    if rest:
      raise TypeError("nnx_module(model, small_state) takes no further states; split the "
                      "model yourself to merge several: nnx_module(graphdef, *states)")
    graphdef, state = _overlay(nnx, graphdef_or_model, small_state)
    states = (state,)
  else:
    graphdef, states = graphdef_or_model, (small_state, *rest)
    expected = _nnx_expected(nnx, graphdef)
    if expected is not None:
      given = [p for s in states for p in _nnx_paths(s)]
      _check_paths(given, expected, "`small_state`" + (" with `rest`" if rest else ""),
                   "pass what `shrink` returned for the state `nnx.split` gave, and the "
                   "states it leaves out (an `nnx.split(model, nnx.Param, ...)` rest) "
                   "after it")
  model = nnx.merge(graphdef, *states)
  _nnx_fix_sizes(nnx, model)
  return model


# ----------------------------------------------------------------------------- Equinox


def _eqx_linear(where: str, m: Any) -> Sizes:
  return {"in_features": None if m.in_features == "scalar" else _size(where, m, [("weight", -1)]),
          "out_features": None if m.out_features == "scalar" else _size(
              where, m, [("weight", -2), ("bias", -1)])}


def _eqx_conv(where: str, m: Any) -> Sizes:
  spatial = m.num_spatial_dims
  ins = _size(where, m, [("weight", -spatial - 1)])
  return {"in_channels": None if ins is None else ins * m.groups,
          "out_channels": _size(where, m, [("weight", -spatial - 2), ("bias", -spatial - 1)])}


def _eqx_norm(where: str, m: Any) -> Sizes:
  found = {name: _trailing(where, m, name, len(m.shape)) for name in ("weight", "bias")}
  shapes = {s for s in found.values() if s is not None}
  if len(shapes) > 1:
    raise ValueError(f"{where} ({type(m).__name__}): `weight` {found['weight']} and `bias` "
                     f"{found['bias']} disagree; {_FIX}")
  return {"shape": shapes.pop() if shapes else None}


def _eqx_embedding(where: str, m: Any) -> Sizes:
  return {"num_embeddings": _size(where, m, [("weight", -2)]),
          "embedding_size": _size(where, m, [("weight", -1)])}


def _eqx_group_norm(where: str, m: Any) -> Sizes:
  channels = _size(where, m, [("weight", -1), ("bias", -1)])
  return {} if m.channels is None else _group_norm(where, channels, m.channels)


def _eqx_mlp(where: str, m: Any) -> Sizes:
  del where  # its Linear layers were checked and rewritten first
  first, last = m.layers[0], m.layers[-1]
  widths = {layer.out_features for layer in m.layers[:-1]} | {
      layer.in_features for layer in m.layers[1:]}
  return {"in_size": None if m.in_size == "scalar" else first.in_features,
          "out_size": None if m.out_size == "scalar" else last.out_features,
          "width_size": widths.pop() if m.depth > 0 and len(widths) == 1 else None}


def _eqx_heads_from_rows(where: str, m: Any, rows: tuple[int, int, int]) -> tuple[int, int, int]:
  """(heads, qk_size, vo_size) read from the rows alone. Fewer heads and narrower heads
  can give the same rows (both q/k and v narrowed by the ratio heads were cut by): then
  it refuses rather than guess."""
  q, k, v = rows
  fits = set()
  if q % m.qk_size == 0 and v % m.vo_size == 0 and q // m.qk_size == v // m.vo_size:
    fits.add((q // m.qk_size, m.qk_size, m.vo_size))  # whole heads removed
  if q % m.num_heads == 0 and v % m.num_heads == 0:
    fits.add((m.num_heads, q // m.num_heads, v // m.num_heads))  # head sizes narrowed
  if q != k or len(fits) != 1:
    raise ValueError(f"{where} (MultiheadAttention): query/key/value projections with {q}, {k}, "
                     f"{v} rows do not tell how many heads of which size remain (it had "
                     f"{m.num_heads} heads, qk_size {m.qk_size}, vo_size {m.vo_size}); rebuild "
                     "it with the sizes you chose, run shrunk_program, or pass groups= and "
                     "keep= (what you gave shrink)")
  return fits.pop()


def _kept_heads(groups: ChannelGroups, keep: Keep, path: str, ndim: int) -> int | None:
  """The heads left of the layer whose query projection weight is leaf `path` (`ndim`
  axes, rows second to last): the kept units of the heads group on its rows, all of
  them where `keep` leaves it whole; None where no heads group is on them."""
  for index, group in enumerate(groups):
    if group.kind in ("heads", "kv_heads") and any(
        m.path == path and m.axis % ndim == ndim - 2 for m in group.members):
      if index not in keep:
        return group.size
      kept = np.asarray(keep[index])  # (k,), or (layers, k) for a stack: k in every layer
      return kept.shape[-1] if kept.ndim else 1
  return None


def _eqx_heads_given(where: str, m: Any, rows: tuple[int, int, int], groups: ChannelGroups,
                     keep: Keep) -> tuple[int, int, int]:
  """(heads, qk_size, vo_size) with the head count from the groups and keep that `shrink`
  took, so rows that fewer or narrower heads would both explain are read as they were
  cut; the head sizes then follow from the rows."""
  q, k, v = rows
  base = "" if where == _ROOT else f"{where}/"
  path = f"{base}query_proj/weight"
  heads = _kept_heads(groups, keep, path, m.query_proj.weight.ndim)
  # No group on this layer's arrays while its rows changed: `groups` was traced over
  # another tree (params wrapped in a dict), so "heads unchanged" would be a guess.
  own = {f"{base}{name}_proj/weight" for name in ("query", "key", "value")}
  named = any(mb.path in own for g in groups for mb in g.members)
  if heads is None and not named and (q, v) != (m.num_heads * m.qk_size,
                                                 m.num_heads * m.vo_size):
    raise ValueError(f"{where} (MultiheadAttention): no group of `groups` holds {path}; pass "
                     "the groups channel_groups traced over this module's arrays")
  heads = m.num_heads if heads is None else heads
  if q != k or q % heads or v % heads:
    raise ValueError(f"{where} (MultiheadAttention): query/key/value projections with {q}, {k}, "
                     f"{v} rows do not split into the {heads} heads that groups= and keep= "
                     "leave; pass the groups and keep that shrink was given")
  return heads, q // heads, v // heads


def _eqx_attention(where: str, m: Any, groups: ChannelGroups | None = None,
                   keep: Keep | None = None) -> Sizes:
  """`nn.MultiheadAttention`: `num_heads`, `qk_size`, `vo_size` from the projections'
  rows (from `groups` and `keep` where given), and the four feature sizes."""
  weights = [getattr(m, f"{name}_proj").weight for name in ("query", "key", "value", "output")]
  rows = tuple(w.shape[-2] for w in weights[:3])  # counted from the end: a stack reads per layer
  if groups is None:
    heads, qk, vo = _eqx_heads_from_rows(where, m, rows)
  else:
    heads, qk, vo = _eqx_heads_given(where, m, rows, groups, keep)
  return {"num_heads": heads, "qk_size": qk, "vo_size": vo,
          "query_size": weights[0].shape[-1], "key_size": weights[1].shape[-1],
          "value_size": weights[2].shape[-1], "output_size": weights[3].shape[-2]}


def _eqx_rules(eqx: Any, groups: ChannelGroups | None = None,
               keep: Keep | None = None) -> list[tuple[type, Callable[[str, Any], Sizes]]]:
  """(layer class, its sizes from its arrays; attention's heads from `groups` and
  `keep` where given). `equinox_module` applies these first and `_eqx_mlp` in a
  second pass: an `MLP` reads its rewritten layers."""
  nn = eqx.nn
  attention = functools.partial(_eqx_attention, groups=groups, keep=keep)
  return [(nn.Linear, _eqx_linear), (nn.Conv, _eqx_conv), (nn.ConvTranspose, _eqx_conv),
          (nn.LayerNorm, _eqx_norm), (nn.RMSNorm, _eqx_norm), (nn.Embedding, _eqx_embedding),
          (nn.GroupNorm, _eqx_group_norm), (nn.MultiheadAttention, attention)]


def _with_sizes(module: Any, sizes: Sizes) -> Any:
  """A copy of Equinox `module` with fields `sizes` set (static fields included,
  which `eqx.tree_at` cannot reach); `__init__` is not rerun."""
  if all(getattr(module, k) == v for k, v in sizes.items()):
    return module
  new = copy.copy(module)
  for name, value in sizes.items():
    object.__setattr__(new, name, value)  # a frozen dataclass: set as Equinox's unflatten does
  return new


def _eqx_fix_sizes(module: Any, rules: Sequence[tuple[type, Callable]]) -> Any:
  classes = tuple(cls for cls, _ in rules)

  def fix(path: tuple, node: Any) -> Any:
    if not isinstance(node, classes):
      return node
    where = path_string(path) or _ROOT
    rule = next(r for cls, r in rules if isinstance(node, cls))
    return _with_sizes(node, _known(rule(where, node)))

  return jax.tree_util.tree_map_with_path(fix, module, is_leaf=lambda x: isinstance(x, classes))


def equinox_module(module: Any, small_params: PyTree, *, groups: ChannelGroups | None = None,
                   keep: Keep | None = None) -> Any:
  """`module` holding the arrays of `small_params`, with its standard layers' sizes
  rewritten.

  `small_params` is what `shrink` returned for `eqx.filter(module, eqx.is_array)`
  (or for `module` itself, when `channel_groups` traced the module as params): every
  array leaf of `module` is replaced by the one at the same path, everything else
  (activations, static fields) is kept; then every layer the module docstring lists
  gets its size fields from its arrays. After it, `new(x)` runs the smaller model
  and equals `apply_fn(small_params, x)` for the `apply_fn` that `channel_groups`
  traced, wherever that runs (a stale `eqx.nn.LayerNorm` refuses its smaller
  input), and `shrunk_program(groups, keep)(small_params, x)` where heads of an
  `nn.MultiheadAttention` were removed (the stale module runs, but splits the rows
  into its old head count). Sizes your own modules hold as plain ints are not
  rewritten (module docstring).

  Args:
    module: the dense Equinox module the params were taken from.
    small_params: the shrunk arrays: a tree with `module`'s paths holding an array
      wherever `module` holds one (`None`, or the same non-array leaf, elsewhere).
    groups: the `channel_groups` that `shrink` was given (traced over the tree
      `small_params` shrinks), with `keep`: each `nn.MultiheadAttention` keeps as
      many heads as its `heads` group (the one on its `query_proj.weight` rows)
      keeps, all where there is none or `keep` leaves it whole; `qk_size` and
      `vo_size` follow from the rows. Without them the heads are read from the rows
      alone, and rows that fewer heads and narrower heads would both give (half of
      the heads removed, or every head halved) are refused.
    keep: the keep-indices `shrink` was given (group index -> kept units).

  Returns:
    A new module; `module` is not changed.

  Raises:
    ValueError: `groups` without `keep` or the reverse; `small_params` whose paths
      are not the module's, or with no array where the module has one (the path
      named); one layer's arrays that disagree on a size, a `GroupNorm` whose
      channel count changed, or a `MultiheadAttention` whose rows do not tell its
      heads, or do not split into the heads `groups` and `keep` leave (the layer
      named).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import equinox as eqx
    >>> from jaxprune.structural import channel_groups, equinox_module, keep_top
    >>> from jaxprune.structural import magnitude_importance, shrink
    >>> mlp = eqx.nn.MLP(4, 3, width_size=8, depth=1, key=jax.random.key(0))
    >>> params, static = eqx.partition(mlp, eqx.is_array)
    >>> apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    >>> x = jnp.ones((2, 4))
    >>> groups = channel_groups(apply_fn, params, x)
    >>> keep = keep_top(groups, magnitude_importance(groups, params), 0.5)
    >>> small = shrink(params, groups, keep)
    >>> smaller = equinox_module(mlp, small)
    >>> smaller.layers[0].out_features, smaller.layers[1].in_features, smaller.width_size
    (4, 4, 4)
    >>> bool(jnp.allclose(jax.vmap(smaller)(x), apply_fn(small, x)))
    True
  """
  import equinox as eqx

  if (groups is None) != (keep is None):
    missing = "keep" if keep is None else "groups"
    raise ValueError(f"equinox_module: `{missing}` is missing; pass both groups= and keep= "
                     "(what you gave shrink), or neither")
  theirs, mine = slots(module), slots(small_params)
  _check_paths([canonical_path(p) for p in mine.paths],
               [canonical_path(p) for p in theirs.paths], "`small_params`",
               "pass what `shrink` returned for eqx.filter(module, eqx.is_array)")
  leaves = []
  for path, old, new in zip(theirs.paths, theirs.leaves, mine.leaves):
    if eqx.is_array(old) != (new is not None and is_array_leaf(new)):
      what = "an array" if eqx.is_array(old) else f"{type(old).__name__}, not an array"
      raise ValueError(f"`small_params` holds {type(new).__name__} at {path}, where the "
                       f"module holds {what}; pass what `shrink` returned for "
                       "eqx.filter(module, eqx.is_array)")
    leaves.append(new if eqx.is_array(old) else old)
  merged = jax.tree.unflatten(theirs.treedef, leaves)
  merged = _eqx_fix_sizes(merged, _eqx_rules(eqx, groups, keep))
  return _eqx_fix_sizes(merged, [(eqx.nn.MLP, _eqx_mlp)])

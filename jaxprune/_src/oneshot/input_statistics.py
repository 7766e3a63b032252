"""What each targeted kernel multiplies: input statistics from calibration batches.

One-shot methods (Wanda, SparseGPT) score a kernel by the inputs it sees: Wanda
by the per-input-feature norms `||x_j||_2`, SparseGPT by the Gram matrix `XᵀX`.
`input_statistics(apply_fn, params, batches, where)` collects them without any
change to the model: it traces `apply_fn(params, batch)` to a jaxpr and
interprets it, following every targeted leaf through views of it (reshape,
transpose, casts, broadcasts, `w[i]`, nested `jit`, `remat`, custom derivatives,
`lax.scan`, `fori_loop` / `while_loop`) to the `dot_general` or convolution that
consumes it, and records what it multiplies there:

* a `dot_general`'s kernel: the other operand. The kernel's contracted axes are
  its *input features* (axis 0 of a Flax `(in, out)` kernel, axis 1 of an
  Equinox `(out, in)` weight, `d` of an attention kernel reshaped
  `(d, heads, head_dim)`), flattened row-major in the order the product
  contracts them;
* a `conv_general_dilated`'s kernel (rhs): the unfolded input patches, as OBC and
  SparseGPT prune convolutions: one row per output position (batch and spatial),
  holding exactly what that position's dot product with the kernel reads (same
  strides, padding, lhs/rhs dilation and dimension numbers; zero padding
  included). Its input features are the kernel's spatial axes, then its
  in-feature axis: `(kh, kw, in)` of a Flax HWIO kernel (axes `(0, 1, 2)`),
  `(kh, kw, in)` of an Equinox/PyTorch OIHW one (axes `(2, 3, 1)`), flattened
  row-major in that order, so the in-channel varies fastest (N:M groups of
  consecutive inputs run along input channels, as NVIDIA's sparse convolutions
  group them). A grouped or depthwise conv (`feature_group_count` or
  `batch_group_count` > 1) is refused: each group of output channels reads other
  input channels, which one statistic over the kernel's input axes cannot hold;
* stack axes index separate statistics: a product's batch axes (a `vmap`ped MoE
  `(E, in, out)`), the axis `lax.scan` slices (stacked layers), and an axis
  indexed by `w[i]` (`for i in range(L): x = x @ w[i]`, or a traced `i` in
  `fori_loop`): layer `i`'s statistics come from what `w[i]` multiplied, added at
  run time into row `i` (the index clamped as `dynamic_slice` clamps it; a
  `jnp.take` index out of range adds nothing, as the gather fills);
* every other axis of the activation (batch, positions) is summed over.

For a leaf with input-feature axes `F` (sizes `f`) and stack axes `S` (sizes
`s`: the axes indexed by `w[i]` or sliced by a scan, outermost first, then a
product's batch axes), the result
holds `sq_norms`: `sum over rows of x**2`, shape `s + f`; `gram` (if asked):
`XᵀX`, shape `s + (prod f, prod f)`; `rows`: the most rows one layer (one index
along `S`) summed. A leaf used by several products sums their rows. Leaves
reached by no product, or only through an op the interpreter cannot see through,
are listed in `unattributed` with the reason (the primitive and the user's
source line); asking for statistics of such a leaf is refused. Wanda and
SparseGPT check each leaf's statistics against the leaf before they compute
anything (`check_leaf_statistics`: shape, stack length, rows, inputs not all
zero).

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
  >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
  ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
  >>> batch = {"x": jax.random.normal(kx, (16, 8))}
  >>> where = jaxprune.select(params)
  >>> def apply_fn(params, batch):
  ...   return jnp.tanh(batch["x"] @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]
  >>> stats = jaxprune.oneshot.input_statistics(apply_fn, params, [batch], where)
  >>> stats.leaves["fc1/kernel"].sq_norms.shape, stats.leaves["fc1/kernel"].rows
  ((8,), 16)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src.oneshot.layouts import (
  INLINE_OPS,
  array_forward,
  is_view_op,
  source_line,
  view_after,
)
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import resolve_where, slots
from jaxprune._src.types import PyTree


class Tracked(NamedTuple):
  """A value that is a view of targeted leaf `leaf` (`layouts.View`'s fields:
  `axes[d]` is the leaf axis of its dimension `d`, None for a mix of leaf axes or
  a new one; `indexed` the leaf axes `w[i]` took away) and, per indexed axis,
  `at`: `(i, size)`, the index (a Python int, or an int scalar computed at run
  time), already clamped as the slicing op clamps it (`size`: out of range, so
  nothing is added), and the leaf axis's size."""

  leaf: int
  axes: tuple
  indexed: tuple = ()
  at: tuple = ()


class Contribution(NamedTuple):
  """One product's statistics for `leaf`: over the leaf axes `axes` (stack axes,
  then input-feature axes, `n_stack` of them stack axes). The first `len(at)`
  stack axes are indexed (`Tracked.at`): the arrays lack them, the statistics
  belong in row `i` of each. `rows`: per slice along the other stack axes."""

  leaf: int
  axes: tuple
  n_stack: int
  sq_norms: jax.Array
  gram: jax.Array | None
  rows: jax.Array
  at: tuple = ()


class LeafStatistics(NamedTuple):
  """Input statistics of one targeted leaf (see the module docstring)."""

  stack_axes: tuple[int, ...]
  feature_axes: tuple[int, ...]
  sq_norms: jax.Array
  gram: jax.Array | None
  rows: int


class InputStatistics(NamedTuple):
  """Per targeted path, its `LeafStatistics`; `unattributed`: path -> reason."""

  leaves: dict[str, LeafStatistics]
  unattributed: dict[str, str]


def _sizes(dims: tuple[int, ...]) -> str:
  return "x".join(map(str, dims)) or "1"


def check_leaf_statistics(path: str, stat: LeafStatistics, shape: tuple[int, ...]) -> None:
  """Refuses, naming `path` and the offending value, statistics that do not fit the
  leaf of `shape` at `path` or saw no data, before anything is computed from them.

  Checked always (traced statistics too): the stack and input-feature axes are
  distinct axes of the leaf; `sq_norms` has shape `S + f` and `gram` (if any)
  `S + (F, F)`, for the leaf's sizes `S` along its stack axes, `f` along its
  input axes, `F = prod f`: no other stack length (an index past the end would
  be clamped to the last layer) and no size-1 statistic broadcast over the leaf;
  a concrete `rows` is > 0. Checked where concrete: no layer's inputs are all
  zero (the leaf would be ranked by position, or SparseGPT would zero it all).
  """
  axes = (*stat.stack_axes, *stat.feature_axes)
  if len(set(axes)) != len(axes) or not all(0 <= a < len(shape) for a in axes):
    raise ValueError(f"the input statistics of {path} are over axes {axes} (stack "
                     f"{stat.stack_axes}, inputs {stat.feature_axes}), not distinct axes of "
                     f"its shape {shape}: statistics of another leaf?")
  stack = tuple(shape[a] for a in stat.stack_axes)
  features = tuple(shape[a] for a in stat.feature_axes)
  got = tuple(jnp.shape(stat.sq_norms))
  if len(got) == len(axes) and got[:len(stack)] != stack:
    raise ValueError(f"the input statistics of {path} are of {_sizes(got[:len(stack)])} "
                     f"stacked layers (sq_norms shape {got}), the leaf has {_sizes(stack)} "
                     f"(shape {shape}, stack axes {stat.stack_axes}): statistics of another "
                     f"model?")
  _check_shape(path, "sq_norms", got, (*stack, *features), shape)
  if stat.gram is not None:
    n = math.prod(features)
    _check_shape(path, "gram", tuple(jnp.shape(stat.gram)), (*stack, n, n), shape)
  rows = stat.rows
  if rows is not None and not isinstance(rows, jax.core.Tracer) and int(rows) <= 0:
    raise ValueError(f"the input statistics of {path} saw {rows} rows: the calibration "
                     f"batches held no rows; pass batches with at least one")
  _check_not_all_zero(path, stat.sq_norms, stack)


def _check_shape(path: str, name: str, got: tuple, want: tuple, shape: tuple) -> None:
  if got != want:
    broadcast = " (a statistic of size 1 is not broadcast)" if math.prod(got) == 1 else ""
    raise ValueError(f"the input statistics of {path} do not fit it: {name} has shape {got}, "
                     f"the leaf of shape {shape} needs {want}{broadcast}")


def _check_not_all_zero(path: str, sq_norms: Any, stack: tuple[int, ...]) -> None:
  """The inputs of each stacked layer `path[i]` (of the leaf if not stacked) are not
  all zero, where `sq_norms` is concrete."""
  if isinstance(sq_norms, jax.core.Tracer):
    return  # under jit: values cannot be read (the shapes were checked)
  # NumPy, not jnp: under an outer jit a jnp op on a closed-over (concrete) array is
  # staged, and its result cannot be read.
  zero = np.all(np.reshape(np.asarray(sq_norms), (math.prod(stack), -1)) == 0, axis=1)
  dead = np.flatnonzero(zero)
  if dead.size:
    names = [f"{path}[{i}]" for i in dead[:5]] if stack else [path]
    more = f" and {dead.size - 5} more" if dead.size > 5 else ""
    raise ValueError(f"the inputs of {', '.join(names)}{more} are all zero on the calibration "
                     f"data (sq_norms all 0.0): nothing to rank its weights by; calibrate on "
                     f"real inputs")


def _read(env: dict, v: Any) -> Any:
  return v.val if isinstance(v, jcore.Literal) else env[v]


class _Ctx(NamedTuple):
  """What every equation needs: whether to build Gram matrices; `notes`: per leaf,
  the first reason a use of it could not be recorded; `context`: the source lines
  of the calls being interpreted (an equation inside `jnp.take` has no line of the
  user's, its call has)."""

  gram: bool
  notes: dict
  context: list

  def where(self, eqn: Any) -> str:
    """`eqn`'s line in the user's code, else the line of the call it is inside."""
    line = source_line(eqn)
    return line if line and line != "unknown source" else (
        self.context[-1] if self.context else "an unknown line")


Sums = tuple  # (sq_norms, gram or None, rows): one key's statistics, summed


def _add(found: dict, c: Contribution) -> None:
  """Adds `c` into `found` (`(leaf, axes, n_stack)` -> `Sums`): an indexed
  contribution into row `i` of each indexed axis (`.at[i].add`, in place: a loop
  over `L` layers holds one `(L, ...)` sum, not `L` of them)."""
  key, values = (c.leaf, c.axes, c.n_stack), (c.sq_norms, c.gram, c.rows)
  if key not in found:
    sizes = tuple(size for _, size in c.at)
    found[key] = jax.tree.map(lambda v: jnp.zeros(sizes + v.shape, v.dtype), values)
  if c.at:
    index = tuple(i for i, _ in c.at)
    found[key] = jax.tree.map(lambda s, v: s.at[index].add(v, mode="drop"), found[key], values)
  else:
    found[key] = jax.tree.map(jnp.add, found[key], values)


def _merge(found: dict, key: tuple, sums: Sums) -> None:
  found[key] = sums if key not in found else jax.tree.map(jnp.add, found[key], sums)


def _sums_of_rows(x: jax.Array, gram: bool) -> tuple:
  """`x` `(*b, n, F)` -> (`sum_n x²` `(*b, F)`, `XᵀX` `(*b, F, F)` or None,
  rows `n` per slice, shape `b`)."""
  sq = jnp.sum(x * x, axis=-2)
  g = jnp.einsum("...nf,...ng->...fg", x, x) if gram else None
  return sq, g, jnp.full(x.shape[:-2], x.shape[-2], jnp.int32)


def _record_dot(view: Tracked, w_side: int, eqn: Any, ins: list, gram: bool,
                where: str) -> Contribution | str:
  """The statistics of the activation operand of a `dot_general` of `view`."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kc, kb = (lc, lb) if w_side == 0 else (rc, rb)
  xc, xb = (rc, rb) if w_side == 0 else (lc, lb)
  feature = tuple(view.axes[d] for d in kc)
  stack = tuple(view.axes[d] for d in kb)
  if None in feature or None in stack:
    return (f"the dot_general at {where} contracts a reshaped mix of its axes or a "
            "part of one (`w[a:b]`), which the statistics cannot map back to its axes")
  x = ins[1 - w_side].astype(jnp.float32)
  rest = [d for d in range(x.ndim) if d not in xc and d not in xb]
  x = jnp.transpose(x, (*xb, *rest, *xc))
  b_shape = x.shape[:len(xb)]
  f_shape = x.shape[len(xb) + len(rest):]
  sq, g, rows = _sums_of_rows(x.reshape(*b_shape, -1, math.prod(f_shape)), gram)
  return Contribution(view.leaf, view.indexed + stack + feature, len(view.indexed) + len(stack),
                      sq.reshape(*b_shape, *f_shape), g, rows, view.at)


def _conv_patches(lhs: jax.Array, kernel_shape: tuple[int, ...], params: dict) -> jax.Array:
  """The unfolded input patches of `conv_general_dilated(lhs, kernel, **params)`:
  `(rows, *spatial, in)`, one row per output position (batch, then output spatial
  positions, in the output's layout order), with `rows[r] · kernel[o]` (the kernel
  as `(*spatial, in)` for output channel `o`, its spatial axes in the order they
  lie in the kernel) equal to that position's output channel `o`. Ungrouped convs
  only; exact (an identity kernel, at the highest precision)."""
  dn = params["dimension_numbers"]
  spatial = tuple(sorted(dn.rhs_spec[2:]))  # `conv_general_dilated_patches`' order
  window = tuple(kernel_shape[d] for d in spatial)
  patches = lax.conv_general_dilated_patches(
      lhs.astype(jnp.float32), window, params["window_strides"], params["padding"],
      params["lhs_dilation"], params["rhs_dilation"], dn, precision=lax.Precision.HIGHEST)
  batch, feature, *positions = dn.out_spec
  channels = patches.shape[feature] // math.prod(window)
  rows = jnp.transpose(patches, (batch, *positions, feature)).reshape(-1, channels, *window)
  return jnp.moveaxis(rows, 1, -1)  # its features are (in, *spatial): in goes last


def _record_conv(view: Tracked, eqn: Any, ins: list, gram: bool,
                 where: str) -> Contribution | str:
  """The statistics of the patches a `conv_general_dilated` kernel `view` reads."""
  p = eqn.params
  groups = (p["feature_group_count"], p["batch_group_count"])
  if groups != (1, 1):
    return (f"it is the kernel of a grouped conv_general_dilated at {where} "
            f"(feature_group_count={groups[0]}, batch_group_count={groups[1]}): each group "
            "of output channels reads other input channels, which one statistic over the "
            "kernel's input axes cannot hold")
  rhs_spec = p["dimension_numbers"].rhs_spec
  features = tuple(view.axes[d] for d in (*sorted(rhs_spec[2:]), rhs_spec[1]))
  if None in features:
    return (f"the conv_general_dilated at {where} reads a reshaped mix of its axes or a part "
            "of one, which the statistics cannot map back to its axes")
  x = _conv_patches(ins[0], tuple(ins[1].shape), p)
  f_shape = x.shape[1:]
  sq, g, rows = _sums_of_rows(x.reshape(x.shape[0], -1), gram)
  return Contribution(view.leaf, view.indexed + features, len(view.indexed),
                      sq.reshape(f_shape), g, rows, view.at)


def _clamped(i: Any, size: int, fill: bool = False) -> Any:
  """Index `i` of an axis of `size` as the slicing op reads it: clamped into range
  (`dynamic_slice`, a clipping gather), or `size` when out of range for a filling
  gather (its slice is filled, not read: `_add` drops it)."""
  if isinstance(i, (int, np.integer)) and not fill:
    return min(max(int(i), 0), size - 1)
  if fill:
    return jnp.where((i >= 0) & (i < size), i, size)
  return jnp.clip(i, 0, size - 1)


def _sliced(t: Tracked, in_shape: tuple, out_shape: tuple, starts: list) -> Tracked:
  """After `slice` / `dynamic_slice` from `starts`: an axis cut to size 1 from a
  longer one is indexed there (`w[i]`, a stack axis once squeezed); one cut to
  another size is no longer a whole leaf axis."""
  axes, indexed, at = list(t.axes), list(t.indexed), list(t.at)
  for d, (a, b) in enumerate(zip(in_shape, out_shape)):
    if a != b:
      if b == 1 and t.axes[d] is not None:
        indexed.append(t.axes[d])
        at.append((_clamped(starts[d], a), a))
      axes[d] = None
  return Tracked(t.leaf, tuple(axes), tuple(indexed), tuple(at))


def _gathered(t: Tracked, eqn: Any, ins: list, out_shape: tuple) -> Tracked | None:
  """After a `gather` that is `w[i]` (`jnp.take(w, i, axis)`: one index vector,
  whole slices of the other axes); None for another gather (a table lookup)."""
  dims, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  in_shape, indices = tuple(ins[0].shape), ins[1]
  taken = tuple(dims.start_index_map)
  if (dims.operand_batching_dims or math.prod(indices.shape[:-1]) != 1
      or sorted(taken) != sorted(dims.collapsed_slice_dims)
      or any(sizes[d] != (1 if d in taken else in_shape[d]) for d in range(len(in_shape)))
      or any(t.axes[d] is None for d in taken)):
    return None
  axes: list[Any] = [None] * len(out_shape)
  for position, a in zip(dims.offset_dims, [a for d, a in enumerate(t.axes) if d not in taken]):
    axes[position] = a
  fill = eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
  flat = jnp.reshape(indices, (-1,))
  at = tuple((_clamped(flat[k], in_shape[d], fill), in_shape[d]) for k, d in enumerate(taken))
  return Tracked(t.leaf, tuple(axes), t.indexed + tuple(t.axes[d] for d in taken), t.at + at)


def _run(jaxpr: Any, consts: list, args: list, views: dict, ctx: _Ctx,
         found: dict) -> tuple[list, list]:
  """Evaluates `jaxpr` on `args`, adding its products' statistics into `found`;
  returns (outputs, their views)."""
  env: dict = {}
  tags: dict = dict(views)
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    in_tags = [None if isinstance(v, jcore.Literal) else tags.get(v) for v in eqn.invars]
    outs, out_tags = _eval(eqn, ins, in_tags, ctx, found)
    for v, x, t in zip(eqn.outvars, outs, out_tags):
      env[v] = x
      if t is not None:
        tags[v] = t
  outs = [_read(env, v) for v in jaxpr.outvars]
  out_tags = [None if isinstance(v, jcore.Literal) else tags.get(v) for v in jaxpr.outvars]
  return outs, out_tags


def _bind(eqn: Any, ins: list) -> list:
  # As jax's own `eval_jaxpr` runs an equation (its context: e.g. an out sharding).
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _note(ctx: _Ctx, tags: list, text: str) -> None:
  for t in tags:
    if t is not None:
      ctx.notes.setdefault(t.leaf, text)


def _eval(eqn: Any, ins: list, in_tags: list, ctx: _Ctx, found: dict) -> tuple[list, list]:
  """One equation: its outputs and their views, recording a product of a leaf."""
  name = eqn.primitive.name
  tracked = [i for i, t in enumerate(in_tags) if t is not None]
  if not tracked:
    outs = _bind(eqn, ins)
    return outs, [None] * len(outs)
  if name in INLINE_OPS:
    sub = eqn.params[INLINE_OPS[name]]
    inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
    ctx.context.append(ctx.where(eqn))
    try:
      return _run(inner, consts, ins, {inner.invars[i]: in_tags[i] for i in tracked}, ctx,
                  found)
    finally:
      ctx.context.pop()
  if name == "scan":
    return _scan(eqn, ins, in_tags, ctx, found)
  if name == "while":
    return _while(eqn, ins, in_tags, ctx, found)
  outs = _bind(eqn, ins)
  got = _product(name, eqn, ins, in_tags, tracked, ctx)
  if got is not None:
    if isinstance(got, str):
      _note(ctx, in_tags, got)
    else:
      _add(found, got)
    return outs, [None]
  after = _view(name, eqn, ins, outs, in_tags, tracked)
  if after is not None:
    return outs, [after]
  _note(ctx, in_tags, f"it reaches `{name}` at {ctx.where(eqn)}, not a dot_general or "
        "conv_general_dilated kernel")
  return outs, [None] * len(outs)


def _product(name: str, eqn: Any, ins: list, in_tags: list, tracked: list,
             ctx: _Ctx) -> Contribution | str | None:
  """A product's statistics for its targeted leaf, why not, or None: no product."""
  where = ctx.where(eqn)
  if name == "dot_general":
    if len(tracked) == 2:
      return (f"the dot_general at {where} multiplies two targeted leaves (no activation "
              "to record)")
    return _record_dot(in_tags[tracked[0]], tracked[0], eqn, ins, ctx.gram, where)
  if name == "conv_general_dilated":
    if tracked != [1]:
      return f"it is the input (lhs) of the conv_general_dilated at {where}, not its kernel"
    return _record_conv(in_tags[1], eqn, ins, ctx.gram, where)
  return None


def _view(name: str, eqn: Any, ins: list, outs: list, in_tags: list,
          tracked: list) -> Tracked | None:
  """The view of its one targeted input `eqn`'s output is (a slice, `w[i]`, a
  reshape...), or None."""
  if tracked != [0] or len(outs) != 1:
    return None
  t, shape_in, shape_out = in_tags[0], tuple(ins[0].shape), tuple(outs[0].shape)
  if name == "slice":
    return _sliced(t, shape_in, shape_out, list(eqn.params["start_indices"]))
  if name == "dynamic_slice":
    return _sliced(t, shape_in, shape_out, ins[1:])
  if name == "gather":
    return _gathered(t, eqn, ins, shape_out)
  if is_view_op(name):
    return view_after(name, eqn.params, t, shape_in, shape_out)
  return None


def _carried(eqn: Any, ins: list, tags: list, kind: str, ctx: _Ctx) -> tuple | None:
  """A loop with a targeted leaf in its carry (its value changes per step): run as
  it is, the leaf noted; None if there is none."""
  if all(t is None for t in tags):
    return None
  _note(ctx, tags, f"it is a carry of the {kind} at {ctx.where(eqn)} (its value changes "
        "per step)")
  outs = _bind(eqn, ins)
  return outs, [None] * len(outs)


def _loop_sums(run: Callable, *args: Any) -> tuple[list, list]:
  """The keys `run(found, *args)` adds statistics under, and zero sums of theirs
  (traced abstractly): the extra carry of a loop that accumulates them."""
  keys: list = []

  def sums(*a):
    found: dict = {}
    run(found, *a)
    keys[:] = list(found)
    return [found[k] for k in keys]

  shapes = jax.eval_shape(sums, *args)
  return keys, [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v) for v in shapes]


def _scan(eqn: Any, ins: list, in_tags: list, ctx: _Ctx, found: dict) -> tuple[list, list]:
  """A `lax.scan` re-run with its body interpreted and the statistics summed in its
  carry: a leaf scanned over (stacked layers, as xs) is indexed by the iteration
  (`w[k]`, its row `k` of the leading axis); a leaf closed over (a const) is seen
  whole each step (a `fori_loop`'s `w[i]` inside then indexes it)."""
  p = eqn.params
  body, nc, nk, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
  consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
  refused = _carried(eqn, ins, in_tags[nc:nc + nk], "scan", ctx)
  if refused is not None:
    return refused
  inner = body.jaxpr
  fixed = {inner.invars[i]: t for i, t in enumerate(in_tags[:nc]) if t is not None}
  sliced = {}
  for i, t in enumerate(in_tags[nc + nk:]):
    if t is not None and t.axes[0] is None:
      _note(ctx, [t], f"the scan at {ctx.where(eqn)} slices a reshaped mix of its axes")
    elif t is not None:
      sliced[inner.invars[nc + nk + i]] = t

  def run(acc, k, carry, x):
    views = {**fixed, **{v: Tracked(t.leaf, t.axes[1:], t.indexed + (t.axes[0],),
                                    t.at + ((k, length),)) for v, t in sliced.items()}}
    return _run(inner, body.consts, [*consts, *carry, *x], views, ctx, acc)[0]

  x0 = [jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)) for x in xs]
  keys, zeros = _loop_sums(run, jnp.int32(0), list(init), x0)

  def step(state, kx):
    acc = dict(zip(keys, state[1]))
    outs = run(acc, kx[0], state[0], kx[1:])
    return (outs[:nk], [acc[key] for key in keys]), outs[nk:]

  (carry, sums), ys = lax.scan(step, (list(init), zeros), [jnp.arange(length), *xs],
                               length=length, reverse=p["reverse"], unroll=p["unroll"])
  for key, s in zip(keys, sums):
    _merge(found, key, s)
  outs = [*carry, *ys]
  return outs, [None] * len(outs)


def _while(eqn: Any, ins: list, in_tags: list, ctx: _Ctx, found: dict) -> tuple[list, list]:
  """A `lax.while_loop` (a `fori_loop` with traced bounds) re-run with its body
  interpreted and the statistics summed in its carry: a leaf closed over by the
  body is seen whole each step (`w[i]` inside indexes it); the condition runs as
  it is."""
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
  refused = _carried(eqn, ins, in_tags[cn + bn:], "while loop", ctx)
  if refused is not None:
    return refused
  body, cond = p["body_jaxpr"], p["cond_jaxpr"]
  fixed = {body.jaxpr.invars[i]: t for i, t in enumerate(in_tags[cn:cn + bn]) if t is not None}

  def run(acc, carry):
    return _run(body.jaxpr, body.consts, [*body_consts, *carry], fixed, ctx, acc)[0]

  keys, zeros = _loop_sums(run, list(init))

  def cond_fun(state):
    return _run(cond.jaxpr, cond.consts, [*cond_consts, *state[0]], {}, ctx, {})[0][0]

  def body_fun(state):
    acc = dict(zip(keys, state[1]))
    return run(acc, state[0]), [acc[key] for key in keys]

  carry, sums = lax.while_loop(cond_fun, body_fun, (list(init), zeros))
  for key, s in zip(keys, sums):
    _merge(found, key, s)
  return list(carry), [None] * len(carry)


def _collector(apply_fn: Callable, params: PyTree, chosen: list[int], gram: bool,
               notes: dict, meta: list) -> Callable:
  """A jitted `(arrays, batch) -> [(sq_norms, gram, rows)]`, one per statistic
  found (a leaf and the axes it is used along), over the array slots of `params`
  (the others, e.g. an Equinox module's functions, are closed over); `meta`
  receives their `(leaf, axes, n_stack)` when traced."""
  traced = array_forward(apply_fn, params)
  position = {slot: k for k, slot in enumerate(traced.slots)}

  def collect(arrs, batch):
    closed = jax.make_jaxpr(traced.forward)(arrs, batch)
    invars = closed.jaxpr.invars
    views = {invars[position[slot]]: Tracked(j, tuple(range(invars[position[slot]].aval.ndim)))
             for j, slot in enumerate(chosen)}
    flat = jax.tree.leaves((arrs, batch))
    found: dict = {}
    _run(closed.jaxpr, closed.consts, flat, views, _Ctx(gram, notes, []), found)
    meta[:] = list(found)
    return list(found.values())

  jitted = jax.jit(collect)
  return lambda batch: jitted(traced.arrays, batch)


def input_statistics(apply_fn: Callable[[PyTree, Any], Any], params: PyTree,
                     batches: Iterable[Any], where: Where, *,
                     gram: bool = False) -> InputStatistics:
  """The input statistics of every targeted kernel over `batches` (see the module
  docstring).

  Args:
    apply_fn: `apply_fn(params, batch)`, the model's forward pass (any output).
    params: the parameter pytree (Flax NNX state, Linen variables, an Equinox
      module, plain arrays).
    batches: calibration batches (an iterable; batches of one shape compile once).
    where: the targeted leaves (bool pytree from `select`, or a callable).
    gram: also accumulate `XᵀX` per leaf (SparseGPT's Hessian).

  Returns:
    `InputStatistics`: per targeted path its `LeafStatistics` (a `dot_general`'s
    kernel over its contracted axes, a convolution's kernel over its unfolded
    patches `(*spatial, in)`, stacked by `scan`, `w[i]` and batch axes), and the
    paths no product could be attributed to, with why (the primitive and the
    source line).

  Raises:
    ValueError: no batch; a non-finite statistic (naming the leaf).
  """
  flags = resolve_where(where, params)
  theirs = slots(params)
  chosen = [i for i, f in enumerate(flags) if f]
  notes: dict[int, str] = {}
  meta: list = []
  collect = _collector(apply_fn, params, chosen, gram, notes, meta)
  total = None
  for batch in batches:
    got = collect(batch)
    total = got if total is None else jax.tree.map(jnp.add, total, got)
  if total is None:
    raise ValueError("input_statistics needs at least one calibration batch")
  return _by_leaf([theirs.paths[i] for i in chosen], meta, total, notes)


def _by_leaf(paths: list[str], meta: list, total: list, notes: dict) -> InputStatistics:
  """Each leaf's statistics; a leaf used along different axes (its keys differ) is
  refused with both uses named."""
  per: dict[int, LeafStatistics] = {}
  mixed: set[int] = set()
  for (leaf, axes, n_stack), (sq, g, rows) in zip(meta, total):
    if not bool(jnp.isfinite(sq).all()):
      raise ValueError(f"the inputs of {paths[leaf]} hold NaN or inf on the calibration data")
    stats = LeafStatistics(tuple(axes[:n_stack]), tuple(axes[n_stack:]), sq, g,
                           int(jnp.max(rows)))
    if leaf in per:
      old = per[leaf]
      mixed.add(leaf)
      notes[leaf] = (f"products use it along different axes (stack {old.stack_axes}, inputs "
                     f"{old.feature_axes}; stack {stats.stack_axes}, inputs "
                     f"{stats.feature_axes})")
    per[leaf] = stats
  for leaf in mixed:
    del per[leaf]
  leaves = {paths[j]: s for j, s in per.items()}
  unattributed = {paths[j]: notes.get(j, "no dot_general or conv_general_dilated consumes it")
                  for j in range(len(paths)) if j not in per}
  return InputStatistics(leaves, unattributed)

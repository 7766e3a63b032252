"""What each targeted kernel multiplies: input statistics from calibration batches.

One-shot methods (Wanda, SparseGPT) score a kernel by the inputs it sees: Wanda
by the per-input-feature norms `||x_j||_2`, SparseGPT by the Gram matrix `XᵀX`.
`input_statistics(apply_fn, params, batches, where)` collects them without any
change to the model: it traces `apply_fn(params, batch)` to a jaxpr and
interprets it, following every targeted leaf through views of it (reshape,
transpose, casts, broadcasts, nested `jit`, `remat`, custom derivatives) to the
`dot_general` that consumes it, and records the other operand there:

* the kernel's contracted axes are its *input features* (axis 0 of a Flax
  `(in, out)` kernel, axis 1 of an Equinox `(out, in)` weight, `d` of an
  attention kernel reshaped `(d, heads, head_dim)`);
* its batch axes in the `dot_general` (a `vmap`ped MoE `(E, in, out)`) and its
  axes scanned over by `lax.scan` (stacked layers) index separate statistics;
* every other axis of the activation (batch, positions) is summed over.

For a leaf with input-feature axes `F` (sizes `f`) and stack axes `S`, the result
holds `sq_norms`: `sum over rows of x**2`, shape `S + f`; `gram` (if asked):
`XᵀX`, shape `S + (prod f, prod f)`; `rows`: how many rows were summed. A leaf
used by several products sums their rows. Leaves reached by no `dot_general`
(or only through an op the interpreter cannot see through) are listed in
`unattributed` with the reason; asking for statistics of such a leaf is refused.
Wanda and SparseGPT check each leaf's statistics against the leaf before they
compute anything (`check_leaf_statistics`: shape, stack length, rows, inputs not
all zero).

Example::

  >>> def apply_fn(params, batch):
  ...   return jnp.tanh(batch["x"] @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]
  >>> stats = jaxprune.input_statistics(apply_fn, params, [batch], where)
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

from jaxprune.leaf_selection import Where
from jaxprune.mask_tree import resolve_where, slots

PyTree = Any

# Ops that only change how a kernel is viewed: followed, not recorded.
_VIEWS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
          "optimization_barrier"}
# Ops holding a jaxpr that runs once on its inputs: interpreted inline.
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
           "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
           "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


class View(NamedTuple):
  """A value that is a view of targeted leaf `leaf`: `axes[d]` is the leaf axis that
  view axis `d` is (None: a mix of leaf axes, or one a broadcast added)."""

  leaf: int
  axes: tuple


class Contribution(NamedTuple):
  """One product's statistics for `leaf`: over the leaf axes `axes` (stack axes,
  then input-feature axes, `n_stack` of them stack axes)."""

  leaf: int
  axes: tuple
  n_stack: int
  sq_norms: jax.Array
  gram: jax.Array | None
  rows: jax.Array


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
  zero = jnp.all(jnp.reshape(sq_norms, (math.prod(stack), -1)) == 0, axis=1)
  dead = np.flatnonzero(np.asarray(zero))
  if dead.size:
    names = [f"{path}[{i}]" for i in dead[:5]] if stack else [path]
    more = f" and {dead.size - 5} more" if dead.size > 5 else ""
    raise ValueError(f"the inputs of {', '.join(names)}{more} are all zero on the calibration "
                     f"data (sq_norms all 0.0): nothing to rank its weights by; calibrate on "
                     f"real inputs")


def _read(env: dict, v: Any) -> Any:
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _reshape_axes(old: tuple[int, ...], new: tuple[int, ...], axes: tuple) -> tuple:
  """View axes after a reshape: a new axis keeps its leaf axis only where it is the
  one old axis of its group (same size, alone); size-1 axes come and go freely."""
  out: list[Any] = [None] * len(new)
  i = j = 0
  while i < len(old) or j < len(new):
    if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      j += 1
      continue
    if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      i += 1
      continue
    if i < len(old) and j < len(new) and old[i] == new[j]:
      out[j] = axes[i]
      i, j = i + 1, j + 1
      continue
    # A group merged or split: its axes lose their identity.
    a, b = (old[i] if i < len(old) else 1), (new[j] if j < len(new) else 1)
    i, j = i + 1, j + 1
    while a != b and (i < len(old) or j < len(new)):
      if a < b and i < len(old):
        a, i = a * old[i], i + 1
      elif j < len(new):
        b, j = b * new[j], j + 1
      else:
        break
  return tuple(out)


def _view_out(name: str, params: dict, view: View, in_shape: tuple, out_shape: tuple) -> View:
  if name in _VIEWS:
    return view
  if name == "transpose":
    return view._replace(axes=tuple(view.axes[p] for p in params["permutation"]))
  if name == "broadcast_in_dim":
    axes: list[Any] = [None] * len(out_shape)
    for i, d in enumerate(params["broadcast_dimensions"]):
      axes[int(d)] = view.axes[i] if in_shape[i] == out_shape[int(d)] else None
    return view._replace(axes=tuple(axes))
  return view._replace(axes=_reshape_axes(in_shape, out_shape, view.axes))


def _record(view: View, w_side: int, eqn: Any, ins: list, gram: bool) -> Contribution | str:
  """The statistics of the activation operand of a `dot_general` of `view`."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kc, kb = (lc, lb) if w_side == 0 else (rc, rb)
  xc, xb = (rc, rb) if w_side == 0 else (lc, lb)
  feature = tuple(view.axes[d] for d in kc)
  stack = tuple(view.axes[d] for d in kb)
  if None in feature or None in stack:
    return "its contracted axes are a reshaped mix of its own (unsupported view)"
  x = ins[1 - w_side].astype(jnp.float32)
  rest = [d for d in range(x.ndim) if d not in xc and d not in xb]
  x = jnp.transpose(x, (*xb, *rest, *xc))
  b_shape = x.shape[:len(xb)]
  f_shape = x.shape[len(xb) + len(rest):]
  x = x.reshape(*b_shape, -1, math.prod(f_shape))
  sq = jnp.sum(x * x, axis=-2).reshape(*b_shape, *f_shape)
  g = jnp.einsum("...nf,...ng->...fg", x, x) if gram else None
  return Contribution(view.leaf, stack + feature, len(stack), sq, g,
                      jnp.asarray(x.shape[-2], jnp.int32))


def _run(jaxpr: Any, consts: list, args: list, views: dict, gram: bool, notes: dict) -> tuple:
  """Evaluates `jaxpr` on `args`; returns (outputs, their views, contributions)."""
  env: dict = {}
  tags: dict = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for v, t in views.items():
    tags[v] = t
  found: list[Contribution] = []
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    in_tags = [None if isinstance(v, jcore.Literal) else tags.get(v) for v in eqn.invars]
    outs, out_tags = _eval(eqn, ins, in_tags, gram, notes, found)
    for v, x, t in zip(eqn.outvars, outs, out_tags):
      env[v] = x
      if t is not None:
        tags[v] = t
  outs = [_read(env, v) for v in jaxpr.outvars]
  out_tags = [None if isinstance(v, jcore.Literal) else tags.get(v) for v in jaxpr.outvars]
  return outs, out_tags, found


def _bind(eqn: Any, ins: list) -> list:
  # As jax's own `eval_jaxpr` runs an equation (its context: e.g. an out sharding).
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval(eqn: Any, ins: list, in_tags: list, gram: bool, notes: dict, found: list) -> tuple:
  name = eqn.primitive.name
  tracked = [i for i, t in enumerate(in_tags) if t is not None]
  if not tracked:
    outs = _bind(eqn, ins)
    return outs, [None] * len(outs)
  if name == "dot_general" and len(tracked) == 1:
    got = _record(in_tags[tracked[0]], tracked[0], eqn, ins, gram)
    if isinstance(got, str):
      notes.setdefault(in_tags[tracked[0]].leaf, got)
    else:
      found.append(got)
    outs = _bind(eqn, ins)
    return outs, [None]
  if name in _INLINE:
    sub = eqn.params[_INLINE[name]]
    inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
    views = {inner.invars[i]: in_tags[i] for i in tracked}
    outs, out_tags, sub_found = _run(inner, consts, ins, views, gram, notes)
    found.extend(sub_found)
    return outs, out_tags
  if name == "scan":
    return _scan(eqn, ins, in_tags, gram, notes, found)
  outs = _bind(eqn, ins)
  if len(tracked) == 1 and len(outs) == 1 and (
      name in _VIEWS or name in ("transpose", "broadcast_in_dim", "reshape", "squeeze",
                                 "expand_dims")):
    t = in_tags[tracked[0]]
    shape_in, shape_out = tuple(ins[tracked[0]].shape), tuple(outs[0].shape)
    return outs, [_view_out(name, eqn.params, t, shape_in, shape_out)]
  for i in tracked:  # consumed by an op the statistics cannot see through
    notes.setdefault(in_tags[i].leaf, f"it reaches `{name}`, not a dot_general")
  return outs, [None] * len(outs)


def _scan(eqn: Any, ins: list, in_tags: list, gram: bool, notes: dict, found: list) -> tuple:
  """A `lax.scan` re-run with its body interpreted: a leaf scanned over (stacked
  layers, as xs) gets one statistic per iteration along the leaf axis it is
  sliced on; a leaf closed over (a const) sums them."""
  p = eqn.params
  body, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
  if any(t is not None for t in in_tags[nc:nc + nk]):
    for t in in_tags[nc:nc + nk]:
      if t is not None:
        notes.setdefault(t.leaf, "it is a carry of a scan (unsupported)")
    outs = _bind(eqn, ins)
    return outs, [None] * len(outs)
  inner = body.jaxpr
  views, scanned = {}, {}
  for i, t in enumerate(in_tags[:nc]):
    if t is not None:
      views[inner.invars[i]] = t
  for i, t in enumerate(in_tags[nc + nk:]):
    if t is not None:
      views[inner.invars[nc + nk + i]] = t._replace(axes=t.axes[1:])
      scanned[t.leaf] = t.axes[0]
  meta: list[Contribution] = []

  def step(carry, x):
    outs, _, contribs = _run(inner, body.consts, [*consts, *carry, *x], views, gram, notes)
    meta[:] = contribs
    return outs[:nk], (outs[nk:], [(c.sq_norms, c.gram, c.rows) for c in contribs])

  carry, (ys, stats) = lax.scan(step, list(init), list(xs), length=p["length"],
                                reverse=p["reverse"], unroll=p["unroll"])
  for c, (sq, g, rows) in zip(meta, stats):
    if c.leaf not in scanned:
      found.append(c._replace(sq_norms=sq.sum(0), gram=None if g is None else g.sum(0),
                              rows=rows.sum()))
    elif scanned[c.leaf] is None:
      notes.setdefault(c.leaf, "it is scanned over a reshaped mix of its axes")
    else:
      axis = scanned[c.leaf]
      found.append(c._replace(axes=(axis, *c.axes), n_stack=c.n_stack + 1, sq_norms=sq,
                              gram=g, rows=rows[0]))
  outs = [*carry, *ys]
  return outs, [None] * len(outs)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, jax.core.Tracer)) or hasattr(x, "__jax_array__") or (
      hasattr(x, "shape") and hasattr(x, "dtype"))


def _collector(apply_fn: Callable, params: PyTree, chosen: list[int], gram: bool,
               notes: dict, meta: list) -> Callable:
  """A jitted `(arrays, batch) -> [(sq_norms, gram, rows)]`, one per product found,
  over the array slots of `params` (the others, e.g. an Equinox module's functions,
  are closed over); `meta` receives their `(leaf, axes, n_stack)` when traced."""
  theirs = slots(params)
  arrays = [i for i, x in enumerate(theirs.leaves) if x is not None and _is_array(x)]
  position = {slot: k for k, slot in enumerate(arrays)}

  def forward(arrs, batch):
    leaves = list(theirs.leaves)
    for slot, x in zip(arrays, arrs):
      leaves[slot] = x
    return apply_fn(jax.tree.unflatten(theirs.treedef, leaves), batch)

  def collect(arrs, batch):
    closed = jax.make_jaxpr(forward)(arrs, batch)
    invars = closed.jaxpr.invars
    views = {invars[position[slot]]: View(j, tuple(range(invars[position[slot]].aval.ndim)))
             for j, slot in enumerate(chosen)}
    flat = jax.tree.leaves((arrs, batch))
    _, _, found = _run(closed.jaxpr, closed.consts, flat, views, gram, notes)
    meta[:] = [(c.leaf, c.axes, c.n_stack) for c in found]
    return [(c.sq_norms, c.gram, c.rows) for c in found]

  jitted = jax.jit(collect)
  return lambda batch: jitted([theirs.leaves[i] for i in arrays], batch)


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
    `InputStatistics`: per targeted path its `LeafStatistics`, and the paths no
    product could be attributed to, with why.

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
  """The products' sums gathered per leaf (products over the same axes add up)."""
  per: dict[int, LeafStatistics] = {}
  mixed: set[int] = set()
  for (leaf, axes, n_stack), (sq, g, rows) in zip(meta, total):
    if not bool(jnp.isfinite(sq).all()):
      raise ValueError(f"the inputs of {paths[leaf]} hold NaN or inf on the calibration data")
    stats = LeafStatistics(tuple(axes[:n_stack]), tuple(axes[n_stack:]), sq, g, int(rows))
    if leaf in per:
      old = per[leaf]
      if (old.stack_axes, old.feature_axes) != (stats.stack_axes, stats.feature_axes):
        mixed.add(leaf)
        notes[leaf] = "products use it along different axes"
      stats = stats._replace(sq_norms=old.sq_norms + sq, rows=old.rows + stats.rows,
                             gram=None if g is None else old.gram + g) if leaf not in mixed \
          else stats
    per[leaf] = stats
  for leaf in mixed:
    del per[leaf]
  leaves = {paths[j]: s for j, s in per.items()}
  unattributed = {paths[j]: notes.get(j, "no dot_general consumes it")
                  for j in range(len(paths)) if j not in per}
  return InputStatistics(leaves, unattributed)

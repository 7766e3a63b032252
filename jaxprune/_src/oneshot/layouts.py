"""Each weight's layout, read from the model's program instead of assumed.

`weight_layouts(apply_fn, params, *args)` traces `apply_fn(params, *args)` to a
jaxpr (abstractly: `args` may be `jax.ShapeDtypeStruct`s, nothing is computed) and
follows every targeted leaf through the views of it (reshape, transpose, casts,
broadcasts, `w[i]` and `dynamic_slice`, scaling by a constant, nested `jit`,
`remat`, custom derivatives, `scan`, `fori_loop`, `cond`) to the operations that
consume it. A leaf's `Layout` says how the program uses it:

* `"dot_general"`: a weight of a product. `inputs` are its contracted axes (the
  input features: axis 0 of a Flax `(in, out)` kernel, axis 1 of an Equinox
  `(out, in)` weight, axes `(0, 1)` of an attention output `(heads, head_dim, d)`),
  `outputs` the axes that flow on (heads and head_dim kept apart);
* `"conv"`: a convolution kernel: `inputs` its spatial axes (as they lie in the
  kernel) then its input-feature axis (the order a patch is flattened in),
  `outputs` its output-feature axis;
* `"gather"`: a table rows are looked up in (an embedding): `inputs` the indexed
  axis, `outputs` the rest;
* `"elementwise"`: multiplied or added to activations (a norm scale, a bias).

`stack` holds the axes that index separate layers or experts: a product's batch
dimensions (a `vmap`ped MoE `(E, in, out)`), the axis `lax.scan` slices, an axis
indexed by `w[i]` in a Python or `fori_loop`. A leaf used in different ways (a
tied embedding, both looked up and multiplied) gets the uses joined where they
agree and `"mixed"` where they do not; a leaf reaching an operation this analysis
does not understand gets `"unknown"`, with the primitive and the user's source
line in `reason`. Nothing is guessed.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.tree import weight_layouts
  >>> params = {"q": jnp.ones((8, 2, 4)), "o": jnp.ones((2, 4, 8)), "scale": jnp.ones(8)}
  >>> def apply_fn(p, x):
  ...   h = jnp.einsum("td,dhk->thk", x * p["scale"], p["q"])
  ...   return jnp.einsum("thk,hkd->td", h, p["o"])
  >>> layouts = weight_layouts(apply_fn, params, jax.ShapeDtypeStruct((5, 8), jnp.float32))
  >>> layouts["q"].inputs, layouts["q"].outputs, layouts["o"].inputs, layouts["o"].outputs
  ((0,), (1, 2), (0, 1), (2,))
  >>> layouts["scale"].use
  'elementwise'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore

from jaxprune._src.tree.leaf_selection import Where, is_float_array
from jaxprune._src.tree.mask_tree import canonical_path, resolve_where, slots
from jaxprune._src.types import PyTree


class Layout(NamedTuple):
  """How the program uses one leaf (see the module docstring).

  Attributes:
    use: `"dot_general"`, `"conv"`, `"gather"`, `"elementwise"`, `"mixed"`,
      `"unknown"` or `"unused"`.
    inputs: the leaf's input-feature axes (contracted; a conv's spatial axes, then
      its in-channel axis).
    outputs: the axes that flow on to the output.
    stack: the axes indexing separate layers or experts.
    source: where in the user's code the leaf is used (`file:line (function)`).
    reason: why the use is `"mixed"`, `"unknown"` or `"unused"`.
  """

  use: str
  inputs: tuple[int, ...] = ()
  outputs: tuple[int, ...] = ()
  stack: tuple[int, ...] = ()
  source: str = ""
  reason: str = ""


# ----------------------------------------------------------------------------- views


class View(NamedTuple):
  """A value that is (a view of) leaf `leaf`: `axes[d]` is the leaf axis of its
  dimension `d` (None: a mix of leaf axes, or a new axis); `indexed` are the leaf
  axes an index (`w[i]`) has already taken away."""

  leaf: int
  axes: tuple[Any, ...]
  indexed: tuple[int, ...] = ()


# Ops that only change how a value is stored: followed as they are.
VIEW_OPS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
            "optimization_barrier"}
# Ops holding a jaxpr that runs once on its inputs: interpreted inline.
INLINE_OPS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "checkpoint": "jaxpr",
              "remat": "jaxpr", "remat2": "jaxpr", "custom_jvp_call": "call_jaxpr",
              "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}

def reshaped_axes(old: tuple[int, ...], new: tuple[int, ...], axes: tuple) -> tuple:
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


def view_after(name: str, params: dict, view: View, in_shape: tuple, out_shape: tuple) -> View:
  """`view` after the view op `name` (a cast, transpose, broadcast or reshape)."""
  if name in VIEW_OPS:
    return view
  if name == "transpose":
    return view._replace(axes=tuple(view.axes[p] for p in params["permutation"]))
  if name == "broadcast_in_dim":
    axes: list[Any] = [None] * len(out_shape)
    for i, d in enumerate(params["broadcast_dimensions"]):
      axes[int(d)] = view.axes[i] if in_shape[i] == out_shape[int(d)] else None
    return view._replace(axes=tuple(axes))
  return view._replace(axes=reshaped_axes(in_shape, out_shape, view.axes))


def is_view_op(name: str) -> bool:
  """Does `name` only re-view its one input (followed by both analyses)?"""
  return name in VIEW_OPS or name in ("transpose", "broadcast_in_dim", "reshape", "squeeze",
                                      "expand_dims")


def _sliced(view: View, in_shape: tuple, out_shape: tuple) -> View:
  """After `slice` / `dynamic_slice`: an axis cut to size 1 from a longer one is
  indexed (`w[i]`: a stack axis once squeezed); one cut to another size is no
  longer the whole leaf axis."""
  axes, indexed = list(view.axes), list(view.indexed)
  for d, (a, b) in enumerate(zip(in_shape, out_shape)):
    if a != b:
      if b == 1 and view.axes[d] is not None:
        indexed.append(view.axes[d])
      axes[d] = None
  return View(view.leaf, tuple(axes), tuple(indexed))


def source_line(eqn: Any, own_only: bool = False) -> str:
  """Where the user's code made `eqn`: `file:line (function)` of the innermost
  frame outside jax, installed libraries (flax, equinox, penzai) and jaxprune,
  else (unless `own_only`: then "") of the innermost frame outside jax."""
  try:
    from jax._src import source_info_util  # no public home for it yet
    frames = list(source_info_util.user_frames(eqn.source_info.traceback))
  except Exception:  # pragma: no cover - a jax without it
    return ""
  own = [f for f in frames if not (f.file_name.startswith(_OWN_DIR)
                                   or any(part in f.file_name for part in _LIBRARY_PATHS))]
  frame = (own or ([] if own_only else frames) or [None])[0]
  if frame is None:
    return ""
  return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


# Frames in these are not the user's model code.
_LIBRARY_PATHS = ("site-packages", "dist-packages")
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # jaxprune's own frames


# ----------------------------------------------------------------------------- uses


class _Use(NamedTuple):
  leaf: int
  layout: Layout


def _dot_use(view: View, side: int, eqn: Any, where: str) -> Layout:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contracted, batch = (lc, lb) if side == 0 else (rc, rb)
  inputs = tuple(view.axes[d] for d in contracted)
  stack = tuple(view.axes[d] for d in batch) + view.indexed
  outputs = tuple(a for d, a in enumerate(view.axes) if d not in contracted and d not in batch)
  if None in inputs or None in stack or None in outputs:
    return Layout("unknown", source=where, reason=(
        f"dot_general at {where} contracts a reshaped mix of its axes (a view this analysis "
        "cannot map back to the leaf's axes)"))
  if not inputs:  # nothing contracted: an elementwise scale written as a product
    return Layout("elementwise", (), tuple(a for a in view.axes), view.indexed, where)
  return Layout("dot_general", inputs, outputs, stack, where)


def _conv_use(view: View, side: int, eqn: Any, where: str) -> Layout:
  if side != 1:
    return Layout("unknown", source=where, reason=f"it is the input of a conv at {where}, not "
                  "its kernel")
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
  axes = [view.axes[d] for d in spec]
  if None in axes:
    return Layout("unknown", source=where, reason=f"conv at {where} on a reshaped mix of its axes")
  groups = eqn.params["feature_group_count"] * eqn.params["batch_group_count"]
  reason = f"grouped conv ({groups} groups)" if groups > 1 else ""
  # Spatial axes as they lie in the kernel, then the in-channel: the order
  # `input_statistics` flattens a patch in, so N:M groups run along in-channels.
  return Layout("conv", (*sorted(axes[2:]), axes[1]), (axes[0],), view.indexed, where, reason)


def _gather_use(view: View, eqn: Any, ins: list,
                where: str) -> tuple[Layout | None, View | None]:
  """`w[i]` (one slice: a view on) or a table lookup (rows gathered: an embedding).
  The looked-up axes are those the gather takes less than whole of."""
  dims = eqn.params["dimension_numbers"]
  shape, sizes = tuple(ins[0].aval.shape), tuple(eqn.params["slice_sizes"])
  looked = tuple(d for d in range(len(shape)) if sizes[d] != shape[d])
  collapsed = tuple(dims.collapsed_slice_dims)
  indices = ins[1].aval.shape
  one_slice = all(s == 1 for s in indices[:-1]) if indices else True
  if one_slice and set(looked) == set(collapsed) and all(view.axes[d] is not None
                                                         for d in looked):
    kept = tuple(a for d, a in enumerate(view.axes) if d not in collapsed)
    if len(kept) == len(eqn.outvars[0].aval.shape):
      return None, View(view.leaf, kept, view.indexed + tuple(view.axes[d] for d in looked))
  looked_up = tuple(view.axes[d] for d in looked)
  rest = tuple(a for d, a in enumerate(view.axes) if d not in looked)
  if None in looked_up or None in rest:
    return Layout("unknown", source=where, reason=f"gather at {where} on a reshaped mix of its "
                  "axes"), None
  return Layout("gather", looked_up, tuple(sorted(rest)), view.indexed, where), None


# ----------------------------------------------------------------------------- the walk


class _State(NamedTuple):
  """What the walk gathers: each leaf's uses, and the first operation that consumed
  it without being understood (with no activation involved: a derived value);
  `context`: the source lines of the calls being walked into (an equation inside
  `jnp.sort` has no line of the user's, its call has)."""

  uses: list[_Use]
  notes: dict[int, str]
  context: list[str]

  def where(self, eqn: Any) -> str:
    """`eqn`'s line in the user's code, else the line of the call it is inside."""
    line = source_line(eqn, own_only=True) or (self.context[-1] if self.context else "")
    return line or source_line(eqn) or "an unknown line"


Tags = tuple[View, ...]  # the leaves a value is a view of (several: `w + delta`)


def _literal(v: Any) -> bool:
  return isinstance(v, jcore.Literal)


def _walk(jaxpr: Any, tags: dict, active: set, state: _State) -> tuple[list, list]:
  """Interprets `jaxpr` abstractly; `tags`: var -> Tags, `active`: vars computed
  from the model's inputs (activations). Returns the outputs' tags and activity."""
  tags, active = dict(tags), set(active)
  for eqn in jaxpr.eqns:
    in_tags = [() if _literal(v) else tags.get(v, ()) for v in eqn.invars]
    in_active = [not _literal(v) and v in active for v in eqn.invars]
    out_tags, out_active = _step(eqn, in_tags, in_active, state)
    for v, t, a in zip(eqn.outvars, out_tags, out_active):
      if t:
        tags[v] = t
      if a:
        active.add(v)
  outs = jaxpr.outvars
  return ([() if _literal(v) else tags.get(v, ()) for v in outs],
          [not _literal(v) and v in active for v in outs])


def _note(state: _State, tags: Tags, text: str) -> None:
  for view in tags:
    state.notes.setdefault(view.leaf, text)


def _record(state: _State, view: View, layout: Layout) -> None:
  state.uses.append(_Use(view.leaf, layout))


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(v.aval.shape)


def _step(eqn: Any, in_tags: list, in_active: list, state: _State) -> tuple[list, list]:
  """One equation: (the outputs' tags, whether each is an activation)."""
  n_out, name = len(eqn.outvars), eqn.primitive.name
  activity = [any(in_active)] * n_out
  if not any(in_tags):
    return [()] * n_out, activity
  if name in INLINE_OPS:
    return _inline(eqn, in_tags, in_active, state)
  if name == "scan":
    return _scan(eqn, in_tags, in_active, state), activity
  if name == "while":
    return _while(eqn, in_tags, in_active, state), activity
  if name == "cond":
    return _cond(eqn, in_tags, in_active, state), activity
  if name == "dot_general":
    for side in (0, 1):
      for view in in_tags[side]:
        _record(state, view, _dot_use(view, side, eqn, state.where(eqn)))
    return [()], activity
  if name == "conv_general_dilated":
    for side in (0, 1):
      for view in in_tags[side]:
        _record(state, view, _conv_use(view, side, eqn, state.where(eqn)))
    return [()], activity
  return _other(eqn, in_tags, in_active, state), activity


# Elementwise primitives: with an activation operand they make the leaf a scale or
# a bias; with none (`w * 0.5`, `w + delta`, `abs(w)`) the result is a view of it.
ELEMENTWISE_OPS = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "abs", "sign", "exp", "exp2",
    "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow",
    "square", "sin", "cos", "erf", "select_n", "clamp", "floor", "ceil", "round",
}


def _other(eqn: Any, in_tags: list, in_active: list, state: _State) -> list:
  """Slices, gathers, views and elementwise ops of a leaf; anything else is noted."""
  name, where = eqn.primitive.name, state.where(eqn)
  tracked = [i for i, t in enumerate(in_tags) if t]
  shapes = [_shape(v) for v in eqn.invars]
  out_shape = _shape(eqn.outvars[0]) if len(eqn.outvars) == 1 else None
  if name == "gather" and tracked == [0]:
    kept = []
    for view in in_tags[0]:
      layout, after = _gather_use(view, eqn, eqn.invars, where)
      if layout is None:
        kept.append(after)
      else:
        _record(state, view, layout)
    return [tuple(kept)]
  if name in ("slice", "dynamic_slice") and tracked == [0]:
    return [tuple(_sliced(v, shapes[0], out_shape) for v in in_tags[0])]
  if is_view_op(name) and tracked == [0] and out_shape is not None:
    return [tuple(view_after(name, eqn.params, v, shapes[0], out_shape) for v in in_tags[0])]
  if name in ELEMENTWISE_OPS and out_shape is not None:
    if any(in_active):  # the leaf meets activations: a scale, a bias, a gate
      for i in tracked:
        for v in in_tags[i]:
          outputs = tuple(a for a in v.axes if a is not None)
          _record(state, v, Layout("elementwise", (), outputs, v.indexed, where))
      return [()]
    return [tuple(v for i in tracked if shapes[i] == out_shape for v in in_tags[i])]
  for i in tracked:
    _note(state, in_tags[i], f"it reaches `{name}` at {where}")
  return [()] * len(eqn.outvars)


def _inline(eqn: Any, in_tags: list, in_active: list, state: _State) -> tuple[list, list]:
  sub = eqn.params[INLINE_OPS[eqn.primitive.name]]
  inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
  if len(inner.invars) != len(eqn.invars):
    for t in in_tags:
      _note(state, t, f"it enters `{eqn.primitive.name}` at {state.where(eqn)}")
    return [()] * len(eqn.outvars), [any(in_active)] * len(eqn.outvars)
  tags = {inner.invars[i]: t for i, t in enumerate(in_tags) if t}
  active = {inner.invars[i] for i, a in enumerate(in_active) if a}
  state.context.append(state.where(eqn))
  try:
    return _walk(inner, tags, active, state)
  finally:
    state.context.pop()


def _refuse_carry(state: _State, tags: list, kind: str, eqn: Any) -> None:
  for t in tags:
    for view in t:
      where = state.where(eqn)
      _record(state, view, Layout("unknown", source=where, reason=(
          f"it is a carry of the {kind} at {where} (its value changes per step)")))


def _loop_body(body: Any, tags: dict, active: set, n_before: int, n_carry: int,
               state: _State) -> None:
  """Walks a loop body once with its carries' activity settled (a carry computed
  from an activation is one on the next step)."""
  for _ in range(n_carry + 1):
    _, out_active = _walk(body, tags, active, _State([], {}, []))
    grown = {body.invars[n_before + k] for k in range(n_carry) if out_active[k]} - active
    if not grown:
      break
    active = active | grown
  _walk(body, tags, active, state)


def _scan(eqn: Any, in_tags: list, in_active: list, state: _State) -> list:
  """`lax.scan`: a leaf scanned over (stacked layers) is sliced along its leading
  axis, a stack axis; a leaf closed over (a const) is seen whole each step."""
  p = eqn.params
  body, nc, nk = p["jaxpr"].jaxpr, p["num_consts"], p["num_carry"]
  _refuse_carry(state, in_tags[nc:nc + nk], "scan", eqn)
  tags = {body.invars[i]: t for i, t in enumerate(in_tags[:nc]) if t}
  for i, t in enumerate(in_tags[nc + nk:]):
    sliced = []
    for v in t:
      if v.axes[0] is None:
        _record(state, v, Layout("unknown", source=state.where(eqn), reason=(
            f"the scan at {state.where(eqn)} slices a reshaped mix of its axes")))
      else:
        sliced.append(View(v.leaf, v.axes[1:], v.indexed + (v.axes[0],)))
    if sliced:
      tags[body.invars[nc + nk + i]] = tuple(sliced)
  active = {body.invars[i] for i, a in enumerate(in_active) if a}
  _loop_body(body, tags, active, nc, nk, state)
  return [()] * len(eqn.outvars)


def _while(eqn: Any, in_tags: list, in_active: list, state: _State) -> list:
  """`lax.while_loop` (and `fori_loop`): leaves closed over by the body or the
  condition are seen whole each step (`w[i]` inside it indexes a stack axis)."""
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  _refuse_carry(state, in_tags[cn + bn:], "while loop", eqn)
  body, cond = p["body_jaxpr"].jaxpr, p["cond_jaxpr"].jaxpr
  tags = {body.invars[i]: t for i, t in enumerate(in_tags[cn:cn + bn]) if t}
  active = {body.invars[i] for i, a in enumerate(in_active[cn:]) if a}
  _loop_body(body, tags, active, bn, len(in_tags) - cn - bn, state)
  cond_tags = {cond.invars[i]: t for i, t in enumerate(in_tags[:cn]) if t}
  _walk(cond, cond_tags, set(), state)
  return [()] * len(eqn.outvars)


def _cond(eqn: Any, in_tags: list, in_active: list, state: _State) -> list:
  """`lax.cond` / `switch`: every branch is walked (either may run)."""
  for branch in eqn.params["branches"]:
    inner = branch.jaxpr
    tags = {inner.invars[i]: t for i, t in enumerate(in_tags[1:]) if t}
    active = {inner.invars[i] for i, a in enumerate(in_active[1:]) if a}
    _walk(inner, tags, active, state)
  return [()] * len(eqn.outvars)


# ----------------------------------------------------------------------------- the result


def _join(uses: list[Layout], note: str | None) -> Layout:
  """One leaf's layout from all its uses: the one use they agree on, else why not."""
  if not uses:
    if note:
      return Layout("unknown", reason=note + " (not a product, conv, lookup or scale)")
    return Layout("unused", reason="no operation of the program reads it")
  for layout in uses:
    if layout.use == "unknown":
      return layout
  distinct = {(u.use, u.inputs, u.outputs, u.stack): u for u in uses}
  if len(distinct) == 1:
    return uses[0]
  listed = "; ".join(f"{u.use} with inputs {u.inputs}, outputs {u.outputs} at {u.source}"
                     for u in distinct.values())
  return Layout("mixed", source=uses[0].source, reason=f"used in different ways: {listed}")


class Layouts(Mapping):
  """Per targeted path, its `Layout`; `str()` is a table of them.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.tree import weight_layouts
    >>> layouts = weight_layouts(lambda p, x: x @ p["w"].T, {"w": jnp.ones((4, 3))},
    ...                          jnp.ones((2, 3)))
    >>> print(layouts)  # doctest: +ELLIPSIS
    path  shape   use          inputs  outputs  stack  source
    w     (4, 3)  dot_general  (1,)    (0,)     ()     ...
  """

  def __init__(self, layouts: dict[str, Layout], shapes: dict[str, tuple[int, ...]]):
    self._layouts, self.shapes = dict(layouts), dict(shapes)

  def __getitem__(self, path: str) -> Layout:
    return self._layouts[path]

  def __iter__(self) -> Iterator[str]:
    return iter(self._layouts)

  def __len__(self) -> int:
    return len(self._layouts)

  def __repr__(self) -> str:
    return f"Layouts({self._layouts!r})"

  # Hashable and compared by value: a target holds it as a static setting.
  def __hash__(self) -> int:
    return hash(tuple(sorted(self._layouts.items())))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Layouts) and self._layouts == other._layouts

  def __str__(self) -> str:
    rows = [("path", "shape", "use", "inputs", "outputs", "stack", "source")]
    for path, layout in self._layouts.items():
      rows.append((path, str(self.shapes[path]), layout.use, str(layout.inputs),
                   str(layout.outputs), str(layout.stack),
                   f"{layout.source} {layout.reason}".strip()))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip()
                     for r in rows)


def is_array_leaf(x: Any) -> bool:
  """Is `x` an array (a jax or NumPy array, a tracer, anything `__jax_array__`)?"""
  return isinstance(x, (jax.Array, jax.core.Tracer)) or hasattr(x, "__jax_array__") or (
      hasattr(x, "shape") and hasattr(x, "dtype"))


class ArrayForward(NamedTuple):
  """`apply_fn` as a function of the array slots of `params`.

  `forward(arrays, *args)` runs `apply_fn(params, *args)` with the leaves at
  `slots` replaced by `arrays` (the other leaves, e.g. an Equinox module's
  functions, closed over): a program whose first inputs are exactly the params'
  arrays, in `slots`' order, which `jax.make_jaxpr` and `jax.jit` can take.
  `arrays` holds their current values.
  """

  forward: Callable[..., Any]
  slots: list[int]
  arrays: list[Any]

  def abstract(self) -> list[jax.ShapeDtypeStruct]:
    """`arrays` as shape-and-dtype specs (tracing them computes nothing)."""
    return [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x))
            for x in self.arrays]


def array_forward(apply_fn: Callable[..., Any], params: PyTree) -> ArrayForward:
  """`apply_fn` over the array slots of `params` (see `ArrayForward`)."""
  theirs = slots(params)
  arrays = [i for i, x in enumerate(theirs.leaves) if x is not None and is_array_leaf(x)]

  def forward(arrs: list[Any], *args: Any) -> Any:
    leaves = list(theirs.leaves)
    for slot, x in zip(arrays, arrs):
      leaves[slot] = x
    return apply_fn(jax.tree.unflatten(theirs.treedef, leaves), *args)

  return ArrayForward(forward, arrays, [theirs.leaves[i] for i in arrays])


def weight_layouts(apply_fn: Callable[..., Any], params: PyTree, *args: Any,
                   where: Where | None = None) -> Layouts:
  """How `apply_fn(params, *args)` uses each targeted leaf (module docstring).

  Args:
    apply_fn: the model's forward pass, `apply_fn(params, *args)`.
    params: the parameter pytree (Flax NNX state, Linen variables, an Equinox
      module, plain arrays).
    *args: example inputs: arrays or `jax.ShapeDtypeStruct`s (only their shapes and
      dtypes are read; nothing is computed).
    where: the leaves to describe (bool pytree from `select`, or a callable);
      default: every floating-point array.

  Returns:
    `Layouts`: per path of a described leaf, its `Layout`.
  """
  theirs = slots(params)
  flags = ([is_float_array(x) for x in theirs.leaves] if where is None
           else resolve_where(where, params))
  traced = array_forward(apply_fn, params)
  arrays = traced.slots
  closed = jax.make_jaxpr(traced.forward)(traced.abstract(), *args)
  invars = closed.jaxpr.invars
  tags = {invars[k]: (View(slot, tuple(range(invars[k].aval.ndim))),)
          for k, slot in enumerate(arrays) if flags[slot]}
  state = _State([], {}, [])
  _walk(closed.jaxpr, tags, set(invars[len(arrays):]), state)
  chosen = [slot for slot in arrays if flags[slot]]
  return Layouts({theirs.paths[slot]: _join([u.layout for u in state.uses if u.leaf == slot],
                                            state.notes.get(slot)) for slot in chosen},
                 {theirs.paths[slot]: tuple(jax.numpy.shape(theirs.leaves[slot]))
                  for slot in chosen})


def input_axes_of(spec: Any, path: str, shape: tuple[int, ...], *, score: Any = None,
                  layer_shape: tuple[int, ...] | None = None,
                  what: str = "axis") -> tuple[int, ...]:
  """The input axes of leaf `path` (of `shape`), from what a caller was given.

  `spec` is an int (the same axis of every leaf, counted within a layer of
  `layer_shape` when the leaf is stacked), a `Layouts` (the leaf's own input axes,
  read from the program), or None: the input axes `score` knows (`wanda_score`'s,
  from its statistics), else -2. `what` names the caller in errors.

  Raises:
    ValueError: a `Layouts` without the leaf or giving it no input axes (an
      embedding, a scale: named with the program's reason), an int out of range.
  """
  layer_shape = shape if layer_shape is None else layer_shape
  if isinstance(spec, Mapping):
    layout = spec.get(path, spec.get(canonical_path(path)))
    if layout is None:
      raise ValueError(f"{what}: the layouts given have no entry for {path}")
    if layout.use not in ("dot_general", "conv"):
      raise ValueError(f"{what} ranks {path} along its input axes, but the program uses it as "
                       f"{layout.use!r}: {layout.reason or layout.source}; leave it out of "
                       "`where`")
    return tuple(layout.inputs)
  if spec is None:
    known = getattr(score, "input_axes", None)
    axes = None if known is None else known(canonical_path(path))
    if axes is not None:
      return tuple(axes)
    spec = -2
  if isinstance(spec, bool) or not isinstance(spec, int):
    raise ValueError(f"axis must be an int, a jaxprune.tree.Layouts or None, got {spec!r}")
  if not -len(layer_shape) <= spec < len(layer_shape):
    named = path if layer_shape == shape else f"{path} (stacked layers of)"
    raise ValueError(f"{what} ranks along axis {spec}: {named} has shape {layer_shape}; "
                     "exclude it from `where` or choose the axis")
  return (spec % len(layer_shape) + len(shape) - len(layer_shape),)

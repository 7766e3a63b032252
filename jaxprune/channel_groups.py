"""Coupled channel groups of a model, traced from its jaxpr, and the smaller model.

`channel_groups(apply_fn, params, *args)` traces `apply_fn(params, *args)` to a
jaxpr (abstractly: `args` may be `jax.ShapeDtypeStruct`s) and joins every axis of
every value and targeted leaf into groups with a union-find over `(value, axis)`:
axes in one group must lose the same indices together. The rules:

* `dot_general`: contracted axes of both operands are one; batch axes of both
  operands are one with the output's batch axes; each free axis is one with its
  output axis.
* n-ary elementwise ops: equal axes of all operands and the output are one (an
  axis broadcast from size 1 does not join). Casts and copies are the identity,
  `transpose` permutes, `broadcast_in_dim` and `squeeze` map.
* `reshape`: an axis kept whole joins its new axis; one axis split into
  `(a, b, ...)` (`d -> (heads, head_dim)`) is a group over whole blocks of size
  `b * ...` of the group of `a` (a *head* structure); merging is the same, read
  backwards. The inner axes of a split (`head_dim`) are unprunable (strided
  indices), and so is any reshape mixing several axes into several.
* `reduce_*`, `argmax`/`argmin`, `cumsum`-like scans over an axis put a
  *reduction* note on its group (allowed: a norm's mean, a softmax).
* `gather` (an embedding lookup): the table's whole axes join the output's; the
  looked-up axis (the vocabulary) is unprunable.
* `slice` / `dynamic_slice` / `concatenate` / `split`: untouched axes map; the cut
  axis is unprunable (offset mapping is not implemented yet).
* `conv_general_dilated`: batch and features map (input features to the
  kernel's in-features, kernel out-features to the output's); spatial axes and
  grouped (depthwise) convs are unprunable.
* `pjit`, `custom_jvp_call`, `custom_vjp_call`, `remat`, `cond` branches are
  inlined; `scan` maps consts, xs (minus the leading axis, which is one group: the
  layers) and ys into its body, and unites each carry's init, body input, body
  output and result (a loop-carried residual stream); `while` likewise.
* Any other primitive makes every axis it touches unprunable, with a reason
  naming the primitive and the user's source line. Never a guess.
* An axis of the program's inputs or outputs (the batch, the input features, the
  logits) is unprunable, and so is one reaching a leaf `where` leaves out.

A `Group`'s members are `(path, axis, block)` of the targeted leaves: pruning
unit `i` of the group removes indices `i * block ... (i + 1) * block - 1` of
that axis. `shrink(params, groups, keep)` slices them; `keep_top` picks indices.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.channel_groups import channel_groups, shrink
  >>> params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
  >>> apply_fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> groups = channel_groups(apply_fn, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  >>> [(g.kind, g.size, g.prunable) for g in groups]
  [('other', 4, False), ('mlp_hidden', 8, True), ('other', 3, False)]
  >>> small = shrink(params, groups, {1: [0, 2, 5]})
  >>> small["w1"].shape, small["w2"].shape
  ((4, 3), (3, 3))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxprune.layouts import ELEMENTWISE_OPS, INLINE_OPS, VIEW_OPS, array_forward, source_line
from jaxprune.leaf_selection import Where, is_float_array
from jaxprune.mask_tree import resolve_where, slots

PyTree = Any
Node = tuple[int, int]  # (value token, axis)

# Elementwise beyond the layouts' list: comparisons and logic (a causal mask).
_ELEMENTWISE = ELEMENTWISE_OPS | {
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "is_finite", "erf_inv",
    "atan2", "rem", "nextafter", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "lgamma", "digamma", "real", "imag", "conj", "erfc", "stop_gradient"}
_REDUCE_OPS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "reduce_xor", "argmax", "argmin"}
_CUMULATIVE_OPS = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_ADDS = {"add", "add_any", "sub"}


class Member(NamedTuple):
  """Axis `axis` of leaf `path`; unit `i` of its group is indices
  `[i * block, (i + 1) * block)` of that axis (`block > 1`: whole heads)."""

  path: str
  axis: int
  block: int = 1


@dataclass(frozen=True)
class Group:
  """Leaf axes that must lose the same units together.

  Attributes:
    kind: `"mlp_hidden"`, `"heads"`, `"residual"`, `"conv_channels"`, `"layers"`
      (a scan's stack axis) or `"other"`.
    size: the number of units (neurons, heads, channels).
    members: the leaf axes, `Member(path, axis, block)`.
    prunable: whether `shrink` may slice it.
    reasons: why not (each names a primitive or axis, and a source line).
    notes: reductions over the group (a norm's mean, a softmax), allowed.
  """

  kind: str
  size: int
  members: tuple[Member, ...]
  prunable: bool
  reasons: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()


class ChannelGroups(Sequence):
  """The groups of a program; `print(groups)` lists kind, size, members, reason."""

  def __init__(self, groups: Sequence[Group], shapes: Mapping[str, tuple[int, ...]]):
    self._groups, self.shapes = tuple(groups), dict(shapes)

  def __getitem__(self, i):  # type: ignore[override]
    return self._groups[i]

  def __len__(self) -> int:
    return len(self._groups)

  def __iter__(self) -> Iterator[Group]:
    return iter(self._groups)

  def __repr__(self) -> str:
    return f"ChannelGroups({list(self._groups)!r})"

  def prunable(self) -> list[int]:
    """Indices of the groups `shrink` may slice."""
    return [i for i, g in enumerate(self._groups) if g.prunable]

  def __str__(self) -> str:
    lines = []
    for i, g in enumerate(self._groups):
      members = ", ".join(f"{m.path}[{m.axis}]" + (f" x{m.block}" if m.block > 1 else "")
                          for m in g.members)
      state = "prunable" if g.prunable else "unprunable: " + "; ".join(g.reasons[:2])
      lines.append(f"{i}: {g.kind} size {g.size} ({members}) {state}")
      lines.extend(f"     note: {n}" for n in g.notes[:2])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- state


@dataclass
class _State:
  """The union-find over `(token, axis)` nodes and what is recorded on roots."""

  shapes: list[tuple[int, ...]] = field(default_factory=list)
  parent: dict = field(default_factory=dict)
  reasons: dict = field(default_factory=dict)
  notes: dict = field(default_factory=dict)
  flags: dict = field(default_factory=dict)
  links: dict = field(default_factory=dict)  # flat node -> [(unit node, block)]
  origin: dict = field(default_factory=dict)  # token -> (leaf slot, leaf axis per axis)
  roles: dict = field(default_factory=dict)  # (slot, leaf axis) -> {"in", "out", "conv"}
  active: set = field(default_factory=set)  # tokens computed from the model's inputs
  context: list = field(default_factory=list)

  def new(self, shape: tuple[int, ...]) -> int:
    self.shapes.append(tuple(shape))
    return len(self.shapes) - 1

  def find(self, n: Node) -> Node:
    root = n
    while self.parent.get(root, root) != root:
      root = self.parent[root]
    while self.parent.get(n, n) != root:  # path compression
      self.parent[n], n = root, self.parent[n]
    return root

  def union(self, a: Node, b: Node, where: str = "") -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    if self.size(ra) != self.size(rb):  # cannot happen under the rules; refuse, not guess
      self.mark(ra, f"axes of sizes {self.size(ra)} and {self.size(rb)} meet at {where}")
    self.parent[rb] = ra
    for table in (self.reasons, self.notes, self.flags):
      if rb in table:
        table.setdefault(ra, []).extend(table.pop(rb))

  def size(self, n: Node) -> int:
    return self.shapes[n[0]][n[1]]

  def mark(self, n: Node, reason: str) -> None:
    self.reasons.setdefault(self.find(n), []).append(reason)

  def note(self, n: Node, text: str) -> None:
    self.notes.setdefault(self.find(n), []).append(text)

  def flag(self, n: Node, text: str) -> None:
    self.flags.setdefault(self.find(n), []).append(text)

  def where(self, eqn: Any) -> str:
    """`eqn`'s line in the user's code, else that of the call it is inside."""
    line = source_line(eqn, own_only=True) or (self.context[-1] if self.context else "")
    return line or source_line(eqn) or "an unknown line"


def _unite_all(st: _State, a: int, b: int, where: str = "") -> None:
  """Every axis of token `a` with the same axis of token `b` (same rank)."""
  for d in range(len(st.shapes[a])):
    st.union((a, d), (b, d), where)


def _mark_all(st: _State, tokens: Sequence[int], reason: str) -> None:
  for t in tokens:
    for d in range(len(st.shapes[t])):
      st.mark((t, d), reason)


# ----------------------------------------------------------------------------- the walk


def _token(st: _State, env: dict, v: Any) -> int:
  """The token of var `v` (a literal gets a fresh one each time)."""
  if isinstance(v, jcore.Literal):
    return st.new(np.shape(v.val))
  if v not in env:
    env[v] = st.new(v.aval.shape)
  return env[v]


def _walk(st: _State, jaxpr: Any, env: dict) -> list[int]:
  """Applies the rules to every equation; returns the tokens of the outputs."""
  for v in jaxpr.constvars:
    _token(st, env, v)
  for eqn in jaxpr.eqns:
    ins = [_token(st, env, v) for v in eqn.invars]
    outs = []
    for v in eqn.outvars:
      env[v] = st.new(v.aval.shape)
      outs.append(env[v])
    if any(t in st.active for t in ins):
      st.active.update(outs)
    _rule(st, eqn, ins, outs)
  return [_token(st, env, v) for v in jaxpr.outvars]


def _rule(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """Dispatches one equation to its rule; an unknown primitive refuses its axes."""
  name = eqn.primitive.name
  if name in VIEW_OPS:
    for a, b in zip(ins, outs):
      _unite_all(st, a, b)
      if a in st.origin:
        st.origin[b] = st.origin[a]
  elif name in _ELEMENTWISE:
    _elementwise(st, eqn, ins, outs[0])
  elif name in _SIMPLE_RULES:
    _SIMPLE_RULES[name](st, eqn, ins, outs)
  elif name in INLINE_OPS or name in ("scan", "while", "cond"):
    _control(st, eqn, ins, outs)
  elif name != "iota":  # iota makes a fresh value from nothing
    _mark_all(st, ins + outs, f"`{name}` at {st.where(eqn)} touches it (a primitive the "
              "channel rules do not know)")


def _elementwise(st: _State, eqn: Any, ins: list[int], out: int) -> None:
  shape = st.shapes[out]
  joined = [t for t in ins if len(st.shapes[t]) == len(shape)]
  for t in joined:
    for d, n in enumerate(st.shapes[t]):
      if n == shape[d]:  # a size-1 axis broadcast against a longer one stays apart
        st.union((t, d), (out, d), st.where(eqn))
  # Two activations added: a residual connection (a bias add has one operand).
  if eqn.primitive.name in _ADDS and sum(t in st.active for t in joined) >= 2:
    for d in range(len(shape)):
      st.flag((out, d), "add")


def _dot_general(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs, out, where = ins[0], ins[1], outs[0], st.where(eqn)
  for a, b in zip(lc, rc):
    st.union((lhs, a), (rhs, b), where)
  k = 0
  for a, b in zip(lb, rb):
    st.union((lhs, a), (out, k), where)
    st.union((rhs, b), (out, k), where)
    k += 1
  for side, (contracted, batch) in enumerate(((lc, lb), (rc, rb))):
    tok = ins[side]
    for d in range(len(st.shapes[tok])):
      if d not in contracted and d not in batch:
        st.union((tok, d), (out, k), where)
        k += 1
    _role(st, tok, contracted, "in")
    _role(st, tok, [d for d in range(len(st.shapes[tok])) if d not in contracted
                    and d not in batch], "out")


def _role(st: _State, tok: int, axes: Sequence[int], role: str) -> None:
  """Records how a leaf (seen through casts and transposes) is used, for kinds."""
  if tok in st.origin:
    slot, leaf_axes = st.origin[tok]
    for d in axes:
      st.roles.setdefault((slot, leaf_axes[d]), set()).add(role)


def _transpose(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  perm = eqn.params["permutation"]
  for d, p in enumerate(perm):
    st.union((ins[0], p), (outs[0], d))
  if ins[0] in st.origin:
    slot, axes = st.origin[ins[0]]
    st.origin[outs[0]] = (slot, tuple(axes[p] for p in perm))


def _broadcast(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  out_shape = st.shapes[outs[0]]
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if st.shapes[ins[0]][i] == out_shape[int(d)]:
      st.union((ins[0], i), (outs[0], int(d)))


def _squeeze(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  kept = [d for d in range(len(st.shapes[ins[0]])) if d not in eqn.params["dimensions"]]
  for k, d in enumerate(kept):
    st.union((ins[0], d), (outs[0], k))


def _reshape_chunks(old: tuple, new: tuple) -> list[tuple[list[int], list[int]]]:
  """Runs of old and new axes (size-1 axes left out) with equal products."""
  oi = [i for i, s in enumerate(old) if s != 1]
  ni = [j for j, s in enumerate(new) if s != 1]
  chunks, i, j = [], 0, 0
  while i < len(oi) and j < len(ni):
    a_idx, b_idx = [oi[i]], [ni[j]]
    a, b, i, j = old[oi[i]], new[ni[j]], i + 1, j + 1
    while a != b and (i < len(oi) or j < len(ni)):
      if a < b and i < len(oi):
        a, i = a * old[oi[i]], i + 1
        a_idx.append(oi[i - 1])
      elif j < len(ni):
        b, j = b * new[ni[j]], j + 1
        b_idx.append(ni[j - 1])
      else:
        break
    chunks.append((a_idx, b_idx))
  return chunks


def _reshape(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  src, dst, where = ins[0], outs[0], st.where(eqn)
  old, new = st.shapes[src], st.shapes[dst]
  for a_idx, b_idx in _reshape_chunks(old, new):
    if len(a_idx) == 1 and len(b_idx) == 1:
      st.union((src, a_idx[0]), (dst, b_idx[0]), where)
      continue
    if len(a_idx) == 1 or len(b_idx) == 1:
      # One flat axis is whole blocks of the outer axis of the other side.
      flat, parts = ((src, a_idx[0]), [(dst, j) for j in b_idx]) if len(a_idx) == 1 else (
          (dst, b_idx[0]), [(src, i) for i in a_idx])
      block = math.prod(st.size(p) for p in parts[1:])
      st.links.setdefault(flat, []).append((parts[0], block))
      for p in parts[1:]:
        st.mark(p, f"it is the inner part of an axis split or merged by the reshape at "
                f"{where} (pruning it would need strided indices)")
      continue
    _mark_all_axes(st, [(src, i) for i in a_idx] + [(dst, j) for j in b_idx],
                   f"the reshape at {where} mixes several axes into several")


def _mark_all_axes(st: _State, nodes: Sequence[Node], reason: str) -> None:
  for n in nodes:
    st.mark(n, reason)


def _reduce(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  axes = tuple(eqn.params["axes"])
  kept = [d for d in range(len(st.shapes[ins[0]])) if d not in axes]
  for k, d in enumerate(kept):
    st.union((ins[0], d), (outs[0], k))
  for d in axes:
    st.note((ins[0], d), f"reduced by `{eqn.primitive.name}` at {st.where(eqn)}")


def _cumulative(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  _unite_all(st, ins[0], outs[0])
  st.note((ins[0], eqn.params["axis"]), f"reduced by `{eqn.primitive.name}` at "
          f"{st.where(eqn)}")


def _cut(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`slice` / `dynamic_slice`: whole axes map, the cut ones are refused."""
  src, dst = ins[0], outs[0]
  for d, (a, b) in enumerate(zip(st.shapes[src], st.shapes[dst])):
    if a == b:
      st.union((src, d), (dst, d))
    else:
      st.mark((src, d), f"it is cut by `{eqn.primitive.name}` at {st.where(eqn)} (offsets "
              "are not mapped yet)")
      st.mark((dst, d), f"it is cut by `{eqn.primitive.name}` at {st.where(eqn)}")


def _joined_along(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`concatenate` / `split`: other axes are one; the joined axis is refused."""
  axis = eqn.params.get("dimension", eqn.params.get("axis"))
  reason = (f"it is joined or split by `{eqn.primitive.name}` at {st.where(eqn)} (offsets "
            "are not mapped yet)")
  first = ins[0]
  for t in ins + outs:
    for d in range(len(st.shapes[t])):
      if d == axis:
        st.mark((t, d), reason)
      elif t != first:
        st.union((first, d), (t, d))


def _gather(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """A lookup: the table's whole axes join the output's offset axes, the indices'
  batch axes the output's batch axes; the looked-up axis is refused."""
  dims, where = eqn.params["dimension_numbers"], st.where(eqn)
  table, idx, out = ins[0], ins[1], outs[0]
  shape, sizes = st.shapes[table], tuple(eqn.params["slice_sizes"])
  if dims.operand_batching_dims:
    _mark_all(st, ins + outs, f"`gather` with batching dims at {where} (not mapped yet)")
    return
  skipped = set(dims.collapsed_slice_dims)
  offset_axes = [d for d in range(len(shape)) if d not in skipped]
  for d, o in zip(offset_axes, dims.offset_dims):
    if sizes[d] == shape[d] and d not in dims.start_index_map:
      st.union((table, d), (out, o), where)
    else:
      st.mark((table, d), f"it is looked up by `gather` at {where}")
      st.mark((out, o), f"it is looked up by `gather` at {where}")
  for d in skipped:
    st.mark((table, d), f"it is looked up by `gather` at {where}")
  batch_out = [o for o in range(len(st.shapes[out])) if o not in dims.offset_dims]
  for k, o in enumerate(batch_out):  # the index vector is the indices' last axis
    st.union((idx, k), (out, o), where)


def _conv(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  dn, where = eqn.params["dimension_numbers"], st.where(eqn)
  lhs, rhs, out = ins[0], ins[1], outs[0]
  st.union((lhs, dn.lhs_spec[0]), (out, dn.out_spec[0]), where)
  grouped = eqn.params["feature_group_count"] * eqn.params["batch_group_count"] > 1
  if grouped:
    reason = f"grouped (depthwise) conv at {where} (not mapped yet)"
    for n in ((lhs, dn.lhs_spec[1]), (rhs, dn.rhs_spec[0]), (rhs, dn.rhs_spec[1]),
              (out, dn.out_spec[1])):
      st.mark(n, reason)
  else:
    st.union((lhs, dn.lhs_spec[1]), (rhs, dn.rhs_spec[1]), where)
    st.union((rhs, dn.rhs_spec[0]), (out, dn.out_spec[1]), where)
  spatial = [(lhs, d) for d in dn.lhs_spec[2:]] + [(rhs, d) for d in dn.rhs_spec[2:]] + [
      (out, d) for d in dn.out_spec[2:]]
  _mark_all_axes(st, spatial, f"it is a spatial axis of the conv at {where}")
  _role(st, rhs, [dn.rhs_spec[1]], "in")
  _role(st, rhs, [dn.rhs_spec[0]], "out")
  _role(st, rhs, [dn.rhs_spec[0], dn.rhs_spec[1]], "conv")


_SIMPLE_RULES: dict[str, Callable[..., None]] = {
    "dot_general": _dot_general, "transpose": _transpose, "broadcast_in_dim": _broadcast,
    "squeeze": _squeeze, "reshape": _reshape, "slice": _cut, "dynamic_slice": _cut,
    "concatenate": _joined_along, "split": _joined_along, "gather": _gather,
    "conv_general_dilated": _conv,
    **{name: _reduce for name in _REDUCE_OPS}, **{name: _cumulative for name in _CUMULATIVE_OPS},
}


# ----------------------------------------------------------------------------- control flow


def _call(st: _State, sub: Any, ins: list[int], where: str) -> list[int]:
  """Walks `sub` (a jaxpr or closed jaxpr) with its inputs bound to `ins`."""
  inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
  st.context.append(where)
  try:
    return _walk(st, inner, dict(zip(inner.invars, ins)))
  finally:
    st.context.pop()


def _control(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  name, p, where = eqn.primitive.name, eqn.params, st.where(eqn)
  if name in INLINE_OPS:
    sub = p[INLINE_OPS[name]]
    inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
    if len(inner.invars) != len(ins):
      _mark_all(st, ins + outs, f"`{name}` at {where} has inputs that do not line up")
      return
    for a, b in zip(_call(st, sub, ins, where), outs):
      _unite_all(st, a, b, where)
  elif name == "cond":
    for branch in p["branches"]:  # either branch may run
      for a, b in zip(_call(st, branch, ins[1:], where), outs):
        _unite_all(st, a, b, where)
  elif name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    _carry(st, carry, outs, where)
    for a, b in zip(_call(st, p["body_jaxpr"], ins[cn:cn + bn] + carry, where), carry):
      _unite_all(st, a, b, where)
    _call(st, p["cond_jaxpr"], ins[:cn] + carry, where)
  else:
    _scan(st, eqn, ins, outs)


def _carry(st: _State, carry: list[int], outs: list[int], where: str) -> None:
  """A loop's carries: init and result are one value, seen by every step."""
  for a, b in zip(carry, outs):
    _unite_all(st, a, b, where)
    for d in range(len(st.shapes[a])):
      st.flag((a, d), "carry")
  st.active.update(carry)  # the carry may hold activations on later steps


def _scan(st: _State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`lax.scan`: consts seen whole, xs and ys one step at a time (their leading
  axes are one group: the layers), carries as in `_carry`."""
  p, where = eqn.params, st.where(eqn)
  nc, nk = p["num_consts"], p["num_carry"]
  carry = ins[nc:nc + nk]
  _carry(st, carry, outs[:nk], where)
  steps = []
  for x in ins[nc + nk:]:
    t = st.new(st.shapes[x][1:])
    for d in range(len(st.shapes[t])):
      st.union((x, d + 1), (t, d), where)
    if x in st.active:
      st.active.add(t)
    if x in st.origin:
      slot, axes = st.origin[x]
      st.origin[t] = (slot, axes[1:])
    steps.append(t)
  body_outs = _call(st, p["jaxpr"], ins[:nc] + carry + steps, where)
  for a, b in zip(body_outs[:nk], carry):
    _unite_all(st, a, b, where)
  for y, t in zip(outs[nk:], body_outs[nk:]):
    for d in range(len(st.shapes[t])):
      st.union((y, d + 1), (t, d), where)
  stacked = ins[nc + nk:] + outs[nk:]
  for t in stacked:
    st.union((stacked[0], 0), (t, 0), where)
  if stacked:
    st.flag((stacked[0], 0), "layers")


# ----------------------------------------------------------------------------- groups


def _final(st: _State, by_root: dict, r: Node, memo: dict, seen: tuple = ()) -> tuple:
  """The unit group a flat root is whole blocks of, and the block: (root, block).
  A flat axis split two ways is refused (so are the groups it would tie)."""
  if r in memo:
    return memo[r]
  targets = set(by_root.get(r, ()))
  if not targets:
    result = (r, 1)
  elif len(targets) > 1 or r in seen:
    reason = "reshapes split it into blocks in different ways"
    for n in [r, *(a for a, _ in targets)]:
      st.reasons.setdefault(n, []).append(reason)
    result = (r, 1)
  else:
    ((a, block),) = targets
    fa, fb = _final(st, by_root, a, memo, (*seen, r))
    for table in (st.reasons, st.notes, st.flags):  # what binds the flat axis binds the units
      if fa != r and r in table:
        table.setdefault(fa, []).extend(table[r])
    result = (fa, block * fb)
  memo[r] = result
  return result


def _kind(st: _State, root: Node, members: list[tuple[int, Member]]) -> str:
  """A label for a group, from its members' roles and what joined it."""
  flags = set(st.flags.get(root, ()))
  if any(m.block > 1 for _, m in members):
    return "heads"
  if "layers" in flags:
    return "layers"
  roles = [(m.path, st.roles.get((slot, m.axis), set())) for slot, m in members]
  if any("conv" in r for _, r in roles):
    return "conv_channels"
  ins = {p for p, r in roles if "in" in r}
  outs = {p for p, r in roles if "out" in r}
  if "add" in flags and (len(ins) >= 2 or "carry" in flags):
    return "residual"  # activations added across layers: the residual stream
  if ins and outs:
    return "mlp_hidden"
  return "other"


def _groups(st: _State, leaves: list[tuple[int, str, int]]) -> list[Group]:
  """`leaves`: (slot, path, token) of the targeted leaves, in params order."""
  by_root: dict = {}
  for n, links in st.links.items():
    by_root.setdefault(st.find(n), []).extend((st.find(a), b) for a, b in links)
  memo: dict = {}
  for r in list(by_root):
    _final(st, by_root, r, memo)
  found: dict = {}
  for slot, path, tok in leaves:
    for d in range(len(st.shapes[tok])):
      root, block = _final(st, by_root, st.find((tok, d)), memo)
      found.setdefault(root, []).append((slot, Member(path, d, block)))
  out = []
  for root, members in found.items():
    reasons = tuple(dict.fromkeys(st.reasons.get(root, ())))
    out.append(Group(_kind(st, root, members), st.size(root),
                     tuple(m for _, m in members), not reasons, reasons,
                     tuple(dict.fromkeys(st.notes.get(root, ())))))
  return out


def channel_groups(apply_fn: Callable[..., Any], params: PyTree, *example_args: Any,
                   where: Where | None = None) -> ChannelGroups:
  """The coupled channel groups of `apply_fn(params, *example_args)` (module docstring).

  Args:
    apply_fn: the forward pass, `apply_fn(params, *args)`.
    params: the parameter pytree (plain arrays, Flax state, an Equinox module).
    *example_args: example inputs: arrays or `jax.ShapeDtypeStruct`s (only shapes
      and dtypes are read; nothing is computed).
    where: the leaves that may be sliced (bool pytree or builder); default every
      floating-point array. An axis reaching a leaf left out is unprunable.

  Returns:
    `ChannelGroups`: every group holding an axis of a targeted leaf.
  """
  theirs = slots(params)
  flags = ([is_float_array(x) for x in theirs.leaves] if where is None
           else resolve_where(where, params))
  traced = array_forward(apply_fn, params)
  arrays = traced.slots
  closed = jax.make_jaxpr(traced.forward)(traced.abstract(), *example_args)
  jaxpr, st = closed.jaxpr, _State()
  env = {v: st.new(v.aval.shape) for v in jaxpr.invars}
  targeted = []
  for v, slot in zip(jaxpr.invars, arrays):
    tok, path = env[v], theirs.paths[slot]
    if flags[slot]:
      st.origin[tok] = (slot, tuple(range(len(st.shapes[tok]))))
      targeted.append((slot, path, tok))
    else:
      _mark_all(st, [tok], f"it reaches leaf {path}, which `where` leaves out")
  inputs = [env[v] for v in jaxpr.invars[len(arrays):]]
  st.active.update(inputs)
  outputs = _walk(st, jaxpr, env)
  for what, toks in (("input", inputs), ("output", outputs)):
    for i, tok in enumerate(toks):
      for d in range(len(st.shapes[tok])):
        st.mark((tok, d), f"it is an input/output axis of the program (axis {d} of {what} "
                f"{i}, shape {st.shapes[tok]})")
  shapes = {path: tuple(theirs.leaves[slot].shape) for slot, path, _ in targeted}
  return ChannelGroups(_groups(st, targeted), shapes)


# ----------------------------------------------------------------------------- the smaller model


def _group_of(groups: Sequence[Group], key: int | Group) -> Group:
  return groups[key] if isinstance(key, (int, np.integer)) else key


def _units(group: Group, indices: Any) -> np.ndarray:
  """Checked keep-indices of `group`: sorted, distinct, in range."""
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= group.size):
    raise ValueError(f"keep-indices of the {group.kind} group (size {group.size}) must be "
                     f"sorted, distinct and in [0, {group.size}); got {idx.tolist()}")
  return idx


def shrink(params: PyTree, groups: Sequence[Group],
           keep: Mapping[int | Group, Any]) -> PyTree:
  """`params` with every member axis of each group in `keep` sliced to its units.

  Args:
    params: the params `groups` was traced from (same structure and shapes).
    groups: from `channel_groups`.
    keep: group (its index in `groups`, or the `Group`) -> sorted unit indices to
      keep (for a `heads` group, head indices: whole blocks are kept).

  Returns:
    params of the same structure; member leaves have the kept units only, other
    leaves (`None`, ints, untouched arrays) are passed through.

  Raises:
    ValueError: an unprunable group (with its reasons), bad indices, or params
      whose shapes do not match the groups.

  Example::

    >>> import jax.numpy as jnp
    >>> from jaxprune.channel_groups import Group, Member, shrink
    >>> g = Group("heads", 2, (Member("wq", 1, 3),), True)
    >>> shrink({"wq": jnp.arange(12.).reshape(2, 6)}, [g], {0: [1]})["wq"].tolist()
    [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]
  """
  theirs = slots(params)
  where = {p: i for i, p in enumerate(theirs.paths)}
  leaves = list(theirs.leaves)
  for key, indices in keep.items():
    group = _group_of(groups, key)
    if not group.prunable:
      raise ValueError(f"the {group.kind} group of size {group.size} cannot be shrunk: "
                       + "; ".join(group.reasons))
    units = _units(group, indices)
    for m in group.members:
      leaf = leaves[where[m.path]]
      if leaf.shape[m.axis] != group.size * m.block:
        raise ValueError(f"{m.path} has {leaf.shape[m.axis]} entries on axis {m.axis}; the "
                         f"group expects {group.size} x {m.block}")
      flat = (units[:, None] * m.block + np.arange(m.block)[None, :]).reshape(-1)
      take = np.take if isinstance(leaf, np.ndarray) else jnp.take
      leaves[where[m.path]] = take(leaf, flat, axis=m.axis)
  return jax.tree.unflatten(theirs.treedef, leaves)


def unit_norms(group: Group, tree: PyTree) -> np.ndarray:
  """Per unit of `group`, the L2 norm of each member's slice (a block for heads),
  summed over members; `tree` holds params or scores with the same paths. Shape
  `(group.size,)`."""
  theirs = slots(tree)
  by_path = dict(zip(theirs.paths, theirs.leaves))
  total = np.zeros(group.size)
  for m in group.members:
    arr = np.moveaxis(np.asarray(by_path[m.path], dtype=np.float64), m.axis, 0)
    total += np.sqrt(np.sum(arr.reshape(group.size, -1) ** 2, axis=1))
  return total


def keep_top(groups: Sequence[Group], scores_or_params: PyTree, fraction: float,
             round_to: int = 1, kinds: Sequence[str] | None = None) -> dict[int, np.ndarray]:
  """Keep-indices for every prunable group (of `kinds`, default all): the units
  with the largest `unit_norms`, `ceil(fraction * size)` of them rounded up to a
  multiple of `round_to` (at most the whole group), in increasing order.

  Example::

    >>> import numpy as np
    >>> from jaxprune.channel_groups import Group, Member, keep_top
    >>> g = Group("mlp_hidden", 5, (Member("w", 0),), True)
    >>> keep_top([g], {"w": np.array([3., 1., 4., 1., 5.])}, 0.4)[0].tolist()
    [2, 4]
  """
  if not 0 < fraction <= 1 or round_to < 1:
    raise ValueError(f"fraction must be in (0, 1] and round_to >= 1, got {fraction}, {round_to}")
  out = {}
  for i, group in enumerate(groups):
    if not group.prunable or (kinds is not None and group.kind not in kinds):
      continue
    width = math.ceil(fraction * group.size - 1e-9)  # 0.3 * 10 is 3.0000000000000004
    width = min(group.size, round_to * math.ceil(width / round_to))
    order = np.argsort(-unit_norms(group, scores_or_params), kind="stable")
    out[i] = np.sort(order[:width])
  return out

"""The rules behind `channel_groups`: a union-find over every `(value, axis)` of a jaxpr.

Each value of the program gets a token; a node is `(token, axis)`. A rule per
primitive unites the nodes that must lose the same indices together (a matmul's
contracted axes, an elementwise op's equal axes) and *links* an axis to the axes
it is made of, with an index map: a reshape `d -> (heads, head_dim)` links `d` to
`heads` (unit `h` is indices `h * head_dim + j`) and to `head_dim`; a slice,
`split` or `concatenate` links the whole axis to its pieces at their offsets. A
link is `(target node, A)` with `A[u]` the indices of the linked axis that unit
`u` of the target covers (shape `(target size, per unit)`).

The rules, by primitive:

* `dot_general`: contracted axes of both operands are one; batch axes of both
  operands are one with the output's batch axes; each free axis is one with its
  output axis.
* n-ary elementwise ops: equal axes of all operands and the output are one (an
  axis broadcast from size 1 does not join). Casts are the identity, `transpose`
  permutes, `broadcast_in_dim` and `squeeze` map.
* `reshape`: an axis read as several (`d -> (heads, head_dim)`, or
  `(kv_heads, groups, head_dim)`) is made of *parts*: unit `h` of `heads` is its
  indices `h * head_dim ... (h + 1) * head_dim - 1`, unit `j` of `head_dim` the
  indices `j, head_dim + j, ...`; merging is the same read backwards. A reshape
  mixing several axes into several is refused.
* `slice`, `dynamic_slice` at literal starts, `concatenate`, `split`: the whole
  axis is made of its pieces at their offsets (a fused `qkv` kernel: the `q`,
  `k`, `v` columns of head `h` are one unit). A strided or traced cut is refused.
* `reduce_*`, `argmax`, `cumsum`...: the reduced axis is noted on its group (a
  norm's mean, a softmax); `top_k` ranks an axis, and indices it returns that
  `one_hot` compares with an `iota`, or that `gather` looks up, join that axis:
  the router's expert axis is one with the experts'.
* `gather` (an embedding lookup): the table's whole axes join the output's; the
  looked-up axis (the vocabulary) is refused.
* `conv_general_dilated`: batch and features map; spatial axes and grouped
  (depthwise) convs are refused. `reduce_window_*` (pooling) maps the axes its
  window leaves alone (the channels) and refuses the pooled ones.
* `pjit`, `custom_jvp_call`, `custom_vjp_call`, `remat`, `cond` branches are
  walked inline; `scan` steps its xs (their leading axes are one group: the
  layers), unites each carry's init, body input, body output and result.
* Any other primitive refuses every axis it touches, naming the primitive and
  the user's source line; so is an axis of the program's inputs or outputs, or
  one reaching a leaf `where` leaves out. Never a guess.

The walk also records what `shrunk_program` needs to run the program again at new
sizes (each sub-jaxpr's frame, the divisors of means and variances) and what the
group kinds are read from (matmuls between two activations: attention; batch
axes against weights: vmapped experts; indices from `top_k`/`argmax` compared
with `iota`: routed experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax.extend.core as jcore
import numpy as np

from jaxprune._src.oneshot.layouts import ELEMENTWISE_OPS, INLINE_OPS, VIEW_OPS, source_line

Node = tuple[int, int]  # (value token, axis)

# Elementwise beyond the layouts' list: comparisons and logic (a causal mask).
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
ELEMENTWISE = ELEMENTWISE_OPS | COMPARISONS | {
    "and", "or", "not", "xor", "is_finite", "erf_inv", "atan2", "rem", "nextafter", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "lgamma", "digamma",
    "real", "imag", "conj", "erfc", "stop_gradient"}
REDUCE_OPS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
              "reduce_or", "reduce_xor", "argmax", "argmin"}
CUMULATIVE_OPS = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_ADDS = {"add", "add_any", "sub"}


@dataclass
class State:
  """The union-find over nodes and what the walk records on roots and frames."""

  shapes: list[tuple[int, ...]] = field(default_factory=list)
  parent: dict = field(default_factory=dict)
  reasons: dict = field(default_factory=dict)
  notes: dict = field(default_factory=dict)
  flags: dict = field(default_factory=dict)
  links: dict = field(default_factory=dict)  # node -> [(target node, index map)]
  origin: dict = field(default_factory=dict)  # token -> (leaf slot, leaf axis per axis)
  roles: dict = field(default_factory=dict)  # (slot, leaf axis) -> {"in", "out", "conv"}
  active: set = field(default_factory=set)  # tokens computed from the model's inputs
  domain: dict = field(default_factory=dict)  # token of indices -> (axis they index, routed)
  dots: list = field(default_factory=list)  # matmuls of two activations: (batch, contracted,
  #                                            free lhs, free rhs) nodes
  stacked: dict = field(default_factory=dict)  # leaf slot -> layers, when a scan steps it
  sums: dict = field(default_factory=dict)  # token of a reduce_sum -> the nodes it summed
  positions: set = field(default_factory=set)  # iota nodes compared with indices (one_hot)
  count_source: dict = field(default_factory=dict)  # scalar token -> (eqn, literal) of `n - x`
  counts: dict = field(default_factory=dict)  # (frame, eqn) -> summed nodes: `n` is their size
  frames: list = field(default_factory=list)  # (jaxpr, env, consts) per walked (sub-)jaxpr
  children: dict = field(default_factory=dict)  # (frame, eqn index) -> [child frames]
  here: tuple = (0, 0)
  context: list = field(default_factory=list)
  used: set = field(default_factory=set)  # tokens some equation or output reads

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
    for table in (self.reasons, self.notes, self.flags, self.links):
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

  def link(self, whole: Node, part: Node, index: np.ndarray) -> None:
    """`part`'s unit `u` is indices `index[u]` of `whole`."""
    self.links.setdefault(self.find(whole), []).append((part, np.asarray(index, np.int64)))

  def where(self, eqn: Any) -> str:
    """`eqn`'s line in the user's code, else that of the call it is inside."""
    line = source_line(eqn, own_only=True) or (self.context[-1] if self.context else "")
    return line or source_line(eqn) or "an unknown line"


def unite_all(st: State, a: int, b: int, where: str = "") -> None:
  """Every axis of token `a` with the same axis of token `b` (same rank)."""
  for d in range(len(st.shapes[a])):
    st.union((a, d), (b, d), where)


def mark_all(st: State, tokens: Sequence[int], reason: str) -> None:
  for t in tokens:
    for d in range(len(st.shapes[t])):
      st.mark((t, d), reason)


def segment(offset: int, length: int) -> np.ndarray:
  """The index map of a piece `[offset, offset + length)`: one index per unit."""
  return (offset + np.arange(length))[:, None]


# ----------------------------------------------------------------------------- the walk


def token(st: State, env: dict, v: Any) -> int:
  """The token of var `v` (a literal gets a fresh one each time)."""
  if isinstance(v, jcore.Literal):
    return st.new(np.shape(v.val))
  if v not in env:
    env[v] = st.new(v.aval.shape)
  return env[v]


def walk(st: State, jaxpr: Any, env: dict, consts: Sequence[Any] = ()) -> list[int]:
  """Applies the rules to every equation; returns the tokens of the outputs."""
  frame = len(st.frames)
  st.frames.append((jaxpr, env, list(consts)))
  for v in jaxpr.constvars:
    token(st, env, v)
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [token(st, env, v) for v in eqn.invars]
    st.used.update(ins)
    outs = []
    for v in eqn.outvars:
      env[v] = st.new(v.aval.shape)
      outs.append(env[v])
    if any(t in st.active for t in ins):
      st.active.update(outs)
    st.here = (frame, i)
    _rule(st, eqn, ins, outs)
  results = [token(st, env, v) for v in jaxpr.outvars]
  st.used.update(results)
  return results


def _rule(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """Dispatches one equation to its rule; an unknown primitive refuses its axes."""
  name = eqn.primitive.name
  if name in VIEW_OPS:
    for a, b in zip(ins, outs):
      unite_all(st, a, b)
      _carry_origin(st, a, b)
  elif name in ELEMENTWISE:
    _elementwise(st, eqn, ins, outs[0])
  elif name in _SIMPLE_RULES:
    _SIMPLE_RULES[name](st, eqn, ins, outs)
  elif name in INLINE_OPS or name in ("scan", "while", "cond"):
    _control(st, eqn, ins, outs)
  else:
    mark_all(st, ins + outs, f"`{name}` at {st.where(eqn)} touches it (a primitive the "
             "channel rules do not know)")


def _carry_origin(st: State, a: int, b: int) -> None:
  """A view of a leaf (a cast) is still that leaf; indices stay indices."""
  if a in st.origin:
    st.origin[b] = st.origin[a]
  _follow(st, a, b)


def _follow(st: State, a: int, b: int) -> None:
  """Indices stay indices, and a sum stays a sum, through casts and reshapes
  (`mean(keepdims=True)` broadcasts its sum before dividing it)."""
  if a in st.domain:
    st.domain[b] = st.domain[a]
  if a in st.sums:
    st.sums[b] = st.sums[a]


def _elementwise(st: State, eqn: Any, ins: list[int], out: int) -> None:
  shape, where = st.shapes[out], st.where(eqn)
  joined = [t for t in ins if len(st.shapes[t]) == len(shape)]
  for t in joined:
    for d, n in enumerate(st.shapes[t]):
      if n == shape[d]:  # a size-1 axis broadcast against a longer one stays apart
        st.union((t, d), (out, d), where)
  name = eqn.primitive.name
  _note_counts(st, eqn, ins, out)
  # Two activations added: a residual connection (a bias add has one operand).
  if name in _ADDS and sum(t in st.active for t in joined) >= 2:
    for d in range(len(shape)):
      st.flag((out, d), "add")
  if name in COMPARISONS:
    indexed = [st.domain[t] for t in ins if t in st.domain]
    if len(indexed) == 2:  # `indices == iota`: a one-hot over the axis indexed
      (a, routed_a), (b, routed_b) = indexed
      st.positions.update((a, b))  # renumbered with the axis, not its original indices
      st.union(a, b, where)
      if routed_a or routed_b:
        st.flag(a, "routed")


def _note_counts(st: State, eqn: Any, ins: list[int], out: int) -> None:
  """`jnp.var` divides a sum by `n - ddof`: the `n` of that `sub` is the summed
  axes' size, to be the kept count in the smaller program."""
  name, first = eqn.primitive.name, eqn.invars[0]
  if name == "sub" and isinstance(first, jcore.Literal) and not np.ndim(first.val):
    st.count_source[out] = (st.here, float(first.val))
  elif name == "div" and ins[0] in st.sums and ins[1] in st.count_source:
    here, n = st.count_source[ins[1]]
    nodes = st.sums[ins[0]]
    if n == float(math.prod(st.size(node) for node in nodes)):
      st.counts[here] = nodes


def _reduce_window(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """Pooling: an axis the window does not touch (size 1, stride 1, no padding or
  dilation: the channels) maps; a pooled axis is refused (spatial)."""
  p = eqn.params
  for d in range(len(st.shapes[ins[0]])):
    untouched = (p["window_dimensions"][d] == 1 and p["window_strides"][d] == 1
                 and tuple(p["padding"][d]) == (0, 0) and p["base_dilation"][d] == 1
                 and p["window_dilation"][d] == 1)
    if untouched:
      st.union((ins[0], d), (outs[0], d))
    else:
      for t in (ins[0], outs[0]):
        st.mark((t, d), f"it is pooled by `{eqn.primitive.name}` at {st.where(eqn)} (spatial)")


def _dot_general(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs, out, where = ins[0], ins[1], outs[0], st.where(eqn)
  for a, b in zip(lc, rc):
    st.union((lhs, a), (rhs, b), where)
  for k, (a, b) in enumerate(zip(lb, rb)):
    st.union((lhs, a), (out, k), where)
    st.union((rhs, b), (out, k), where)
  k, free = len(lb), []
  for tok, contracted, batch in ((lhs, lc, lb), (rhs, rc, rb)):
    mine = [d for d in range(len(st.shapes[tok])) if d not in contracted and d not in batch]
    for d in mine:
      st.union((tok, d), (out, k), where)
      k += 1
    free.append([(tok, d) for d in mine])
    _role(st, tok, contracted, "in")
    _role(st, tok, mine, "out")
  if lhs in st.active and rhs in st.active:  # attention: scores or the mix of values
    st.dots.append(([(out, k) for k in range(len(lb))], [(lhs, a) for a in lc], *free))
  elif lb and lc and (lhs in st.origin or rhs in st.origin):  # vmapped weights: experts
    # (a matmul: penzai multiplies a norm's scale by a dot_general with no contraction)
    for k in range(len(lb)):
      st.flag((out, k), "expert_batch")


def _role(st: State, tok: int, axes: Sequence[int], role: str) -> None:
  """Records how a leaf (seen through casts and transposes) is used, for kinds."""
  if tok in st.origin:
    slot, leaf_axes = st.origin[tok]
    for d in axes:
      st.roles.setdefault((slot, leaf_axes[d]), set()).add(role)


def _transpose(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  perm = eqn.params["permutation"]
  for d, p in enumerate(perm):
    st.union((ins[0], p), (outs[0], d))
  if ins[0] in st.origin:
    slot, axes = st.origin[ins[0]]
    st.origin[outs[0]] = (slot, tuple(axes[p] for p in perm))


def _broadcast(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  out_shape = st.shapes[outs[0]]
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if st.shapes[ins[0]][i] == out_shape[int(d)]:
      st.union((ins[0], i), (outs[0], int(d)))
  _follow(st, ins[0], outs[0])


def _squeeze(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  kept = [d for d in range(len(st.shapes[ins[0]])) if d not in eqn.params["dimensions"]]
  for k, d in enumerate(kept):
    st.union((ins[0], d), (outs[0], k))
  _follow(st, ins[0], outs[0])


def reshape_chunks(old: tuple, new: tuple) -> list[tuple[list[int], list[int]]]:
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


def part_maps(sizes: Sequence[int]) -> list[np.ndarray]:
  """Index maps of the parts of a flat axis read as `sizes` (row-major): unit `u`
  of part `m` is every flat index whose `m`-th digit is `u`."""
  flat = np.arange(math.prod(sizes)).reshape(tuple(sizes))
  return [np.moveaxis(flat, m, 0).reshape(s, -1) for m, s in enumerate(sizes)]


def _reshape(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  src, dst, where = ins[0], outs[0], st.where(eqn)
  old, new = st.shapes[src], st.shapes[dst]
  for a_idx, b_idx in reshape_chunks(old, new):
    if len(a_idx) == 1 and len(b_idx) == 1:
      st.union((src, a_idx[0]), (dst, b_idx[0]), where)
    elif len(a_idx) == 1 or len(b_idx) == 1:
      # One flat axis read as several: each of them is a part of it.
      flat, parts = ((src, a_idx[0]), [(dst, j) for j in b_idx]) if len(a_idx) == 1 else (
          (dst, b_idx[0]), [(src, i) for i in a_idx])
      for part, index in zip(parts, part_maps([st.size(p) for p in parts])):
        st.link(flat, part, index)
    else:
      for n in [(src, i) for i in a_idx] + [(dst, j) for j in b_idx]:
        st.mark(n, f"the reshape at {where} mixes several axes into several")
  _follow(st, src, dst)


def _reduce(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  axes = tuple(eqn.params["axes"])
  kept = [d for d in range(len(st.shapes[ins[0]])) if d not in axes]
  for k, d in enumerate(kept):
    st.union((ins[0], d), (outs[0], k))
  for d in axes:
    st.note((ins[0], d), f"reduced by `{eqn.primitive.name}` at {st.where(eqn)}")
  if eqn.primitive.name == "reduce_sum":
    st.sums[outs[0]] = [(ins[0], d) for d in axes]
  if eqn.primitive.name in ("argmax", "argmin"):
    st.domain[outs[0]] = ((ins[0], axes[0]), True)


def _top_k(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`top_k` over the last axis: the others map; the indices index that axis."""
  last = len(st.shapes[ins[0]]) - 1
  for t in outs:
    for d in range(last):
      st.union((ins[0], d), (t, d))
    st.mark((t, last), f"it holds the k = {st.shapes[t][last]} picks of `top_k` at "
            f"{st.where(eqn)}")
  st.note((ins[0], last), f"ranked by `top_k` at {st.where(eqn)}")
  st.domain[outs[1]] = ((ins[0], last), True)


def _iota(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """A fresh value; its values index its own axis (`one_hot` compares them)."""
  st.domain[outs[0]] = ((outs[0], eqn.params["dimension"]), False)


def _cumulative(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  unite_all(st, ins[0], outs[0])
  st.note((ins[0], eqn.params["axis"]), f"reduced by `{eqn.primitive.name}` at "
          f"{st.where(eqn)}")


def _static_starts(eqn: Any, ins: list[int], st: State) -> list[int] | None:
  """A `dynamic_slice`'s start indices when every one is a literal, else None."""
  starts = eqn.invars[1:]
  if all(isinstance(v, jcore.Literal) for v in starts):
    return [int(v.val) for v in starts]
  return None


def _cut(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`slice` / `dynamic_slice`: whole axes map; a cut axis with a static start and
  unit stride links to its piece; any other cut axis is refused."""
  src, dst, where = ins[0], outs[0], st.where(eqn)
  if eqn.primitive.name == "slice":
    starts, strides = eqn.params["start_indices"], eqn.params["strides"]
  else:
    starts, strides = _static_starts(eqn, ins, st), None
  for d, (a, b) in enumerate(zip(st.shapes[src], st.shapes[dst])):
    if a == b:
      st.union((src, d), (dst, d), where)
    elif starts is not None and (strides is None or strides[d] == 1):
      st.link((src, d), (dst, d), segment(starts[d], b))
    else:
      reason = f"it is cut by `{eqn.primitive.name}` at {where} at a strided or traced offset"
      st.mark((src, d), reason)
      st.mark((dst, d), reason)


def _joined_along(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """`concatenate` / `split`: other axes are one; the joined axis links to its pieces."""
  axis = eqn.params.get("dimension", eqn.params.get("axis"))
  whole, pieces = (outs[0], ins) if eqn.primitive.name == "concatenate" else (ins[0], outs)
  offset = 0
  for t in pieces:
    for d in range(len(st.shapes[t])):
      if d != axis:
        st.union((whole, d), (t, d))
    st.link((whole, axis), (t, axis), segment(offset, st.shapes[t][axis]))
    offset += st.shapes[t][axis]


def _gather(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  """A lookup: the table's whole axes join the output's offset axes, the indices'
  batch axes the output's batch axes. A looked-up axis is refused unless the
  indices are positions along a grouped axis (`top_k` picks): then it joins it."""
  dims, where = eqn.params["dimension_numbers"], st.where(eqn)
  table, idx, out = ins[0], ins[1], outs[0]
  shape, sizes = st.shapes[table], tuple(eqn.params["slice_sizes"])
  if dims.operand_batching_dims:
    mark_all(st, ins + outs, f"`gather` with batching dims at {where} (not mapped yet)")
    return
  looked_up = f"it is looked up by `gather` at {where}"
  skipped = set(dims.collapsed_slice_dims)
  offset_axes = [d for d in range(len(shape)) if d not in skipped]
  for d, o in zip(offset_axes, dims.offset_dims):
    if sizes[d] == shape[d]:  # a full slice starts at 0 whatever the index (clamped)
      st.union((table, d), (out, o), where)
    else:
      st.mark((table, d), looked_up)
      st.mark((out, o), looked_up)
  indexed = st.domain.get(idx)
  for d in skipped:
    if indexed is not None and tuple(dims.start_index_map) == (d,):
      st.union((table, d), indexed[0], where)
      if indexed[1]:
        st.flag((table, d), "routed")
    else:
      st.mark((table, d), looked_up)
  batch_out = [o for o in range(len(st.shapes[out])) if o not in dims.offset_dims]
  for k, o in enumerate(batch_out):  # the index vector is the indices' last axis
    st.union((idx, k), (out, o), where)


def _conv(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  dn, where = eqn.params["dimension_numbers"], st.where(eqn)
  lhs, rhs, out = ins[0], ins[1], outs[0]
  st.union((lhs, dn.lhs_spec[0]), (out, dn.out_spec[0]), where)
  if eqn.params["feature_group_count"] * eqn.params["batch_group_count"] > 1:
    reason = f"grouped (depthwise) conv at {where} (not mapped yet)"
    for n in ((lhs, dn.lhs_spec[1]), (rhs, dn.rhs_spec[0]), (rhs, dn.rhs_spec[1]),
              (out, dn.out_spec[1])):
      st.mark(n, reason)
  else:
    st.union((lhs, dn.lhs_spec[1]), (rhs, dn.rhs_spec[1]), where)
    st.union((rhs, dn.rhs_spec[0]), (out, dn.out_spec[1]), where)
  for tok, spec in ((lhs, dn.lhs_spec), (rhs, dn.rhs_spec), (out, dn.out_spec)):
    for d in spec[2:]:
      st.mark((tok, d), f"it is a spatial axis of the conv at {where}")
  _role(st, rhs, [dn.rhs_spec[1]], "in")
  _role(st, rhs, [dn.rhs_spec[0]], "out")
  _role(st, rhs, [dn.rhs_spec[0], dn.rhs_spec[1]], "conv")


_SIMPLE_RULES: dict[str, Callable[..., None]] = {
    "dot_general": _dot_general, "transpose": _transpose, "broadcast_in_dim": _broadcast,
    "squeeze": _squeeze, "reshape": _reshape, "slice": _cut, "dynamic_slice": _cut,
    "concatenate": _joined_along, "split": _joined_along, "gather": _gather,
    "conv_general_dilated": _conv, "top_k": _top_k, "iota": _iota,
    **{f"reduce_window_{op}": _reduce_window for op in ("sum", "max", "min")},
    **{name: _reduce for name in REDUCE_OPS}, **{name: _cumulative for name in CUMULATIVE_OPS},
}


# ----------------------------------------------------------------------------- control flow


def _call(st: State, sub: Any, ins: list[int], where: str) -> list[int]:
  """Walks `sub` (a jaxpr or closed jaxpr) with its inputs bound to `ins`."""
  inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
  parent = st.here
  st.children.setdefault(parent, []).append(len(st.frames))
  st.context.append(where)
  try:
    return walk(st, inner, dict(zip(inner.invars, ins)), getattr(sub, "consts", ()))
  finally:
    st.context.pop()
    st.here = parent


def _control(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
  name, p, where = eqn.primitive.name, eqn.params, st.where(eqn)
  if name in INLINE_OPS:
    sub = p[INLINE_OPS[name]]
    inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
    if len(inner.invars) != len(ins):
      mark_all(st, ins + outs, f"`{name}` at {where} has inputs that do not line up")
      return
    for a, b in zip(_call(st, sub, ins, where), outs):
      unite_all(st, a, b, where)
      _carry_origin(st, a, b)
  elif name == "cond":
    for branch in p["branches"]:  # either branch may run
      for a, b in zip(_call(st, branch, ins[1:], where), outs):
        unite_all(st, a, b, where)
  elif name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    _carry(st, carry, outs, where)
    for a, b in zip(_call(st, p["body_jaxpr"], ins[cn:cn + bn] + carry, where), carry):
      unite_all(st, a, b, where)
    _call(st, p["cond_jaxpr"], ins[:cn] + carry, where)
  else:
    _scan(st, eqn, ins, outs)


def _carry(st: State, carry: list[int], outs: list[int], where: str) -> None:
  """A loop's carries: init and result are one value, seen by every step."""
  for a, b in zip(carry, outs):
    unite_all(st, a, b, where)
    for d in range(len(st.shapes[a])):
      st.flag((a, d), "carry")
  st.active.update(carry)  # the carry may hold activations on later steps


def _scan(st: State, eqn: Any, ins: list[int], outs: list[int]) -> None:
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
      if axes[0] == 0:
        st.stacked[slot] = st.shapes[x][0]
    steps.append(t)
  body_outs = _call(st, p["jaxpr"], ins[:nc] + carry + steps, where)
  for a, b in zip(body_outs[:nk], carry):
    unite_all(st, a, b, where)
  for y, t in zip(outs[nk:], body_outs[nk:]):
    for d in range(len(st.shapes[t])):
      st.union((y, d + 1), (t, d), where)
  stacked = ins[nc + nk:] + outs[nk:]
  for t in stacked:
    st.union((stacked[0], 0), (t, 0), where)
  if stacked:
    st.flag((stacked[0], 0), "layers")

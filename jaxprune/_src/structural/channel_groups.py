"""Coupled channel groups of a model, traced from its jaxpr.

`channel_groups(apply_fn, params, *args)` traces `apply_fn(params, *args)` to a
jaxpr (abstractly: `args` may be `jax.ShapeDtypeStruct`s) and joins every axis of
every value and targeted leaf into groups: axes in one group must lose the same
units together. The rules, by primitive, are in `jaxprune.channel_rules`.

A `Group` is a set of `Member(path, axis, block, offset, outer)`: unit `u` of the
group covers the leaf indices `offset + o * size * block + u * block + j` for
`o < outer`, `j < block`. Kinds are read from the program: `heads` (a batch axis
of a matmul between two activations, or a query axis of the attention scores),
`kv_heads` (heads that also cover the keys and values of a finer heads group:
grouped-query attention), `head_dim` (contracted by the scores, or a value's
feature axis), `experts` (routed by `top_k`/`argmax`, or a batch axis against
weights), `conv_channels`, `residual` (activations added across layers),
`mlp_hidden` (written by one weight and read by another), `layers` (a scan's stack
axis), else `other`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.structural import channel_groups
  >>> params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
  >>> apply_fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> groups = channel_groups(apply_fn, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  >>> [(g.kind, g.size, g.prunable) for g in groups]
  [('other', 4, False), ('mlp_hidden', 8, True), ('other', 3, False)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxprune._src.oneshot.layouts import ArrayForward, array_forward
from jaxprune._src.structural import channel_rules as rules
from jaxprune._src.structural.channel_rules import Node, State
from jaxprune._src.tree.leaf_selection import Where, is_float_array
from jaxprune._src.tree.mask_tree import resolve_where, slots
from jaxprune._src.types import PyTree

# The kinds a width is chosen for by default; `other` (an axis no rule names, e.g.
# an unused leaf's) and `layers` (depth) only when asked for.
WIDTH_KINDS = ("mlp_hidden", "heads", "kv_heads", "head_dim", "residual", "conv_channels",
               "experts")


class Member(NamedTuple):
  """Axis `axis` of leaf `path`: unit `u` of its group (of `size` units) covers the
  indices `offset + o * size * block + u * block + j`, `o < outer`, `j < block`
  (`block > 1`: whole heads; `outer > 1`: the heads of every KV group, or the
  q, k, v thirds of a fused kernel)."""

  path: str
  axis: int
  block: int = 1
  offset: int = 0
  outer: int = 1

  def indices(self, size: int) -> np.ndarray:
    """The leaf indices per unit: shape `(size, outer * block)`."""
    o = np.arange(self.outer)[None, :, None] * size * self.block
    u = np.arange(size)[:, None, None] * self.block
    return (self.offset + o + u + np.arange(self.block)[None, None, :]).reshape(size, -1)


@dataclass(frozen=True)
class Group:
  """Leaf axes that must lose the same units together.

  Attributes:
    kind: `"mlp_hidden"`, `"heads"`, `"kv_heads"`, `"head_dim"`, `"residual"`,
      `"conv_channels"`, `"experts"`, `"layers"` or `"other"` (module docstring).
    size: the number of units (neurons, heads, channels, experts).
    members: the leaf axes, `Member(path, axis, block, offset, outer)`.
    prunable: whether `shrink` may slice it.
    reasons: why not (each names a primitive or axis, and a source line).
    notes: reductions over the group (a norm's mean, a softmax), allowed.
    layers: the number of layers when every member is a leaf a `scan` steps
      through (stacked on axis 0): each layer may then keep its own units.
  """

  kind: str
  size: int
  members: tuple[Member, ...]
  prunable: bool
  reasons: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()
  layers: int | None = None


@dataclass(frozen=True)
class Program:
  """What `shrunk_program` needs to run the traced program at new sizes."""

  state: State
  closed: Any  # the ClosedJaxpr
  forward: ArrayForward
  out_tree: Any
  roots: dict  # union-find root -> group index (unit groups)
  parts: dict  # flat union-find root -> [(group index, index map)]


class ChannelGroups(Sequence):
  """The groups of a program; `print(groups)` lists kind, size, members, reasons."""

  def __init__(self, groups: Sequence[Group], shapes: Mapping[str, tuple[int, ...]],
               program: Program | None = None):
    self._groups, self.shapes, self.program = tuple(groups), dict(shapes), program

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
      members = ", ".join(_describe(m) for m in g.members)
      more = f" (+{len(g.reasons) - 2} more: group.reasons)" if len(g.reasons) > 2 else ""
      state = "prunable" if g.prunable else "unprunable: " + "; ".join(g.reasons[:2]) + more
      layers = f" x {g.layers} layers" if g.layers else ""
      lines.append(f"{i}: {g.kind} size {g.size}{layers} ({members}) {state}")
      lines.extend(f"     note: {n}" for n in g.notes[:2])
      if len(g.notes) > 2:
        lines.append(f"     (+{len(g.notes) - 2} more notes: group.notes)")
    return "\n".join(lines)


def _describe(m: Member) -> str:
  extra = [f"x{m.block}"] * (m.block > 1) + [f"+{m.offset}"] * (m.offset > 0) + [
      f"{m.outer} times"] * (m.outer > 1)
  return f"{m.path}[{m.axis}]" + (" " + " ".join(extra) if extra else "")


# ----------------------------------------------------------------------------- parts


def _fit(index: np.ndarray) -> tuple[int, int, int] | None:
  """`(block, offset, outer)` of a `Member` whose `indices` equal `index`, or None."""
  size = index.shape[0]
  first = np.sort(index[0])
  block = 1
  while block < first.size and first[block] == first[0] + block:
    block += 1
  if index.shape[1] % block:
    return None
  outer = index.shape[1] // block
  offset = int(first[0])
  candidate = Member("", 0, block, offset, outer).indices(size)
  return (block, offset, outer) if np.array_equal(np.sort(index, 1), candidate) else None


def _parts(st: State, r: Node, memo: dict, seen: tuple = ()) -> list:
  """The unit roots a flat root is made of: `[(unit root, [index maps])]`; a root
  without links is its own single part (`[(r, None)]`)."""
  if r in memo:
    return memo[r]
  if r not in st.links or r in seen:
    if r in seen:
      st.reasons.setdefault(r, []).append("reshapes and slices make it part of itself")
    memo[r] = [(r, None)]
    return memo[r]
  found: dict = {}
  for target, index in st.links[r]:
    for unit, maps in _parts(st, st.find(target), memo, (*seen, r)):
      for m in maps or [np.arange(st.size(unit))[:, None]]:
        found.setdefault(unit, []).append(index[m].reshape(st.size(unit), -1))
  for unit in found:  # what binds the whole axis binds every part of it
    for table in (st.reasons, st.notes, st.flags):
      if r in table:
        table.setdefault(unit, []).extend(table[r])
  memo[r] = list(found.items())
  return memo[r]


def _labels(st: State, unit: Node, maps: list, length: int) -> np.ndarray:
  out = np.full(length, -1)
  for m in maps:
    out[m] = np.arange(st.size(unit))[:, None]
  return out


def _check_parts(st: State, r: Node, parts: list) -> bool:
  """Parts of one axis must cut it the same way everywhere: two parts overlapping
  must meet in equal counts (a factorization); two that cut it identically are one
  group (joined; returns True so the parts are recomputed); else both are refused."""
  length = st.size(r)
  labels = [(unit, _labels(st, unit, maps, length)) for unit, maps in parts]
  for i, (a, la) in enumerate(labels):
    for b, lb in labels[i + 1:]:
      both = (la >= 0) & (lb >= 0)
      if not both.any() or st.find(a) == st.find(b):
        continue
      counts = np.zeros((st.size(a), st.size(b)), np.int64)
      np.add.at(counts, (la[both], lb[both]), 1)
      if np.all(counts == counts.flat[0]):
        continue
      if st.size(a) == st.size(b) and np.all((counts > 0).sum(0) == 1) and np.all(
          (counts > 0).sum(1) == 1):
        st.union(a, b)  # the same units under two names (rotate-half of RoPE)
        return True
      for n in (a, b):
        st.reasons.setdefault(st.find(n), []).append(
            "two reshapes or slices cut one axis in ways that do not line up")
  return False


def _cover_rest(st: State) -> None:
  """The indices of a flat axis that no piece covers (`h` read whole and `h[:, :4]`
  read apart) are one more part of it: the rest, a group of their own."""
  for r in {st.find(n) for n in st.links}:
    covered = np.zeros(st.size(r), bool)
    for _, index in st.links[r]:
      covered[index.ravel()] = True
    if not covered.all():
      rest = np.flatnonzero(~covered)
      st.link(r, (st.new((rest.size,)), 0), rest[:, None])


def _resolve_parts(st: State) -> dict:
  """Every flat root's parts, after joining parts that are one group."""
  _cover_rest(st)
  while True:
    memo: dict = {}
    flat = {st.find(n) for n in st.links}
    parts = {r: _parts(st, r, memo) for r in flat}
    if not any(_check_parts(st, r, p) for r, p in parts.items()):
      return parts


# ----------------------------------------------------------------------------- kinds


def _unit_roots(st: State, parts: dict, nodes: Sequence[Node]) -> set:
  out = set()
  for n in nodes:
    r = st.find(n)
    out.update(u for u, _ in parts.get(r, [(r, None)]))
  return out


def _attention(st: State, parts: dict, weighted: set) -> tuple[set, set]:
  """Heads-like and head_dim roots, read from the matmuls between activations
  (either operand order): the scores contract a projected axis (head_dim) and keep
  the heads as batch or free axes; the mix with the values contracts the sequence
  and keeps the values' projected axis (head_dim)."""
  heads, head_dim, mixed = set(), set(), set()
  for batch, contracted, free_lhs, free_rhs in st.dots:
    heads |= _unit_roots(st, parts, batch) & weighted
    free = _unit_roots(st, parts, free_lhs + free_rhs) & weighted
    scored = _unit_roots(st, parts, contracted) & weighted
    if scored:  # q . k
      head_dim |= scored
      heads |= free
    else:  # scores . v
      mixed |= free
  return heads - head_dim, head_dim | (mixed - heads)


def _kinds(st: State, found: dict, parts: dict) -> dict:
  """root -> kind, for the roots holding leaf members."""
  weighted = {r for r, members in found.items()
              if any(st.roles.get((slot, m.axis)) for slot, m in members)}
  heads, head_dim = _attention(st, parts, weighted)
  paths = {r: {m.path for _, m in found[r]} for r in heads}
  kinds = {}
  for root, members in found.items():
    flags = set(st.flags.get(root, ()))
    if "layers" in flags:
      kinds[root] = "layers"
    elif flags & {"routed", "expert_batch"}:
      kinds[root] = "experts"
    elif root in heads:
      finer = any(o != root and paths[o] < paths[root] for o in heads)
      kinds[root] = "kv_heads" if finer else "heads"
    elif root in head_dim:
      kinds[root] = "head_dim"
    else:
      kinds[root] = _kind_by_roles(st, flags, members)
  return kinds


def _kind_by_roles(st: State, flags: set, members: list) -> str:
  roles = [(m.path, st.roles.get((slot, m.axis), set())) for slot, m in members]
  ins = {p for p, r in roles if "in" in r}
  outs = {p for p, r in roles if "out" in r}
  if "add" in flags and (len(ins) >= 2 or "carry" in flags):
    return "residual"  # activations added across layers: the residual stream (a ResNet's too)
  if any("conv" in r for _, r in roles):
    return "conv_channels"
  if ins and outs:
    return "mlp_hidden"
  return "other"


# ----------------------------------------------------------------------------- groups


def _members(st: State, leaves: list, parts: dict) -> tuple[dict, dict]:
  """root -> [(slot, Member)] for every targeted leaf axis; root -> extra reasons."""
  found: dict = {}
  odd: dict = {}
  for slot, path, tok in leaves:
    for d in range(len(st.shapes[tok])):
      r = st.find((tok, d))
      for unit, maps in parts.get(r, [(r, None)]):
        for fit in _fits(maps):
          if fit is None:  # kept as a member so the group shows, refused
            odd.setdefault(unit, []).append(f"{path} axis {d} maps to its units irregularly")
            fit = (1, 0, 1)
          found.setdefault(unit, []).append((slot, Member(path, d, *fit)))
  return found, odd


def _fits(maps: list | None) -> list:
  """Members' `(block, offset, outer)` for one leaf axis of a unit: one for the
  whole map when it is regular (RoPE's pairs of halves), else one per piece."""
  if maps is None:
    return [(1, 0, 1)]
  whole = _fit(np.concatenate(maps, axis=1))
  return [whole] if whole is not None else [_fit(m) for m in maps]


def _layers(st: State, members: list) -> int | None:
  counts = {st.stacked.get(slot) for slot, m in members if m.axis != 0}
  if len(counts) == 1 and None not in counts and all(m.axis != 0 for _, m in members):
    return counts.pop()
  return None


def _groups(st: State, leaves: list) -> tuple[list[Group], dict, dict]:
  """`leaves`: (slot, path, token) of the targeted leaves, in params order."""
  parts = _resolve_parts(st)
  found, odd = _members(st, leaves, parts)
  kinds = _kinds(st, found, parts)
  unused = {path for _, path, tok in leaves if tok not in st.used}
  out, roots = [], {}
  for root, members in found.items():
    single = ["it has one unit (a piece picked by an index, or a broadcast axis): removing "
              "it removes the axis"] if st.size(root) == 1 else []
    idle = [f"the program never reads {', '.join(sorted({m.path for _, m in members}))} "
            "(does apply_fn use its params argument?)"] if all(
                m.path in unused for _, m in members) else []
    reasons = tuple(dict.fromkeys(st.reasons.get(root, []) + odd.get(root, []) + single
                                  + idle))
    kind = kinds[root]
    roots[root] = len(out)
    out.append(Group(kind, st.size(root), tuple(dict.fromkeys(m for _, m in members)),
                     not reasons, reasons, tuple(dict.fromkeys(st.notes.get(root, ()))),
                     None if kind == "layers" else _layers(st, members)))
  flat = {r: [(roots.get(u), _joined(maps, st.size(u))) for u, maps in p]
          for r, p in parts.items()}
  return out, roots, flat


def _joined(maps: list | None, size: int) -> np.ndarray:
  return np.arange(size)[:, None] if maps is None else np.concatenate(maps, axis=1)


def channel_groups(apply_fn: Callable[..., Any], params: PyTree, *example_args: Any,
                   where: Where | None = None) -> ChannelGroups:
  """The coupled channel groups of `apply_fn(params, *example_args)`: which leaf axes
  must lose the same units together, read from the program (how each primitive
  joins axes: the guide "Shrinking a model"; members and kinds:
  `help(jaxprune.structural.Group)`).

  Args:
    apply_fn: the forward pass, `apply_fn(params, *args)`.
    params: the parameter pytree (plain arrays, Flax state, an Equinox module).
    *example_args: example inputs: arrays or `jax.ShapeDtypeStruct`s (only shapes
      and dtypes are read; nothing is computed).
    where: the leaves that may be sliced (bool pytree or builder); default every
      floating-point array. An axis reaching a leaf left out is unprunable.

  Returns:
    `ChannelGroups`: every group holding an axis of a targeted leaf, and the
    traced program (`shrunk_program` runs it at the new sizes).
  """
  theirs = slots(params)
  flags = ([is_float_array(x) for x in theirs.leaves] if where is None
           else resolve_where(where, params))
  traced = array_forward(apply_fn, params)
  closed, out_shape = jax.make_jaxpr(traced.forward, return_shape=True)(
      traced.abstract(), *example_args)
  jaxpr, st = closed.jaxpr, State()
  env = {v: st.new(v.aval.shape) for v in jaxpr.invars}
  targeted = []
  for v, slot in zip(jaxpr.invars, traced.slots):
    tok, path = env[v], theirs.paths[slot]
    if flags[slot]:
      st.origin[tok] = (slot, tuple(range(len(st.shapes[tok]))))
      targeted.append((slot, path, tok))
    else:
      rules.mark_all(st, [tok], f"it reaches leaf {path}, which `where` leaves out")
  inputs = [env[v] for v in jaxpr.invars[len(traced.slots):]]
  st.active.update(inputs)
  outputs = rules.walk(st, jaxpr, env, closed.consts)
  for what, toks in (("input", inputs), ("output", outputs)):
    for i, tok in enumerate(toks):
      for d in range(len(st.shapes[tok])):
        st.mark((tok, d), f"it is an input/output axis of the program (axis {d} of {what} "
                f"{i}, shape {st.shapes[tok]})")
  groups, roots, flat = _groups(st, targeted)
  shapes = {path: tuple(theirs.leaves[slot].shape) for slot, path, _ in targeted}
  program = Program(st, closed, traced, jax.tree.structure(out_shape), roots, flat)
  return ChannelGroups(groups, shapes, program)

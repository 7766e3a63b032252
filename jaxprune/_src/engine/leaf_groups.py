"""One computation over many arrays, compiled once per distinct shape.

A model with hundreds of targeted leaves has only a handful of distinct leaf
shapes. Unrolling a per-leaf computation (a selection, a count) once per leaf
makes the program, and its compile time, grow with the number of leaves. Here
arrays are grouped by the shapes and dtypes of their *sources* (the tuple of
arrays a leaf's computation reads, e.g. `(w, kept)`), and each group of more
than one member runs as a `fori_loop` over its members: the body is traced and
compiled once, and picks member `i` either with a `lax.switch`, whose n
branches each take all n members (n² in the program: no memory, but slow to
compile for large n), or from a stacked copy of the group (a dynamic index,
fused into its reader: compiles fast, costs the group's bytes once and the time
to copy them). Groups of at least `STACK_MIN_MEMBERS` members and at most
`STACK_LIMIT_BYTES` are stacked; the others switch.

* `sum_over(groups, fn, init)`: `init + sum_j fn(sources_j, j)`;
* `map_over(groups, fn)`: `[fn(sources_j, j) for j]`, in the original order;
  `map_groups` / `split_groups`: the same in two steps, one result per group
  (stacked over its members) and then one per member, so a `cond` can return
  one array per group rather than one per member;
* `map_scalars(groups, fn)`: `[fn(sources_j, j) for j]` for small results (a
  threshold, a count): one separate array per member, never a slice of a stack.
  XLA's CPU backend compiles every slice (a distinct constant offset) as a kernel
  of its own, 6-15 ms each: 256 slices of one stacked result took 1.5-2.4 s to
  compile, while computations that differ only in their operands share one kernel.

`j` is the member's position in the original sequence: a Python int for a
member alone in its group, a traced int32 inside a group's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Groups of this many members or more, up to this many bytes of sources, are
# stacked (see the module docstring). Below 16 members the switch compiles fast
# and a 51M-parameter tree of groups of 4 ranks 1.5x faster without the copy.
STACK_MIN_MEMBERS = 16
STACK_LIMIT_BYTES = 2**30


class Group(NamedTuple):
  """Members of equal source shapes: their original positions, their sources, and
  the sources stacked over the members (one array per source slot, None where the
  slot is None; `stacked` is None for a lone member or a group not copied)."""

  positions: tuple[int, ...]
  sources: tuple[tuple, ...]
  stacked: tuple | None = None


def _signature(source: tuple) -> tuple:
  # The sharding in the type (an Explicit-axis mesh) too: `lax.switch` branches
  # must agree on it. (Under Auto axes the type carries none.)
  return tuple(None if a is None else (tuple(a.shape), jnp.dtype(a.dtype),
                                       str(jax.typeof(a).sharding.spec))
               for a in source)


def group_by_shape(sources: Sequence[tuple]) -> list[Group]:
  """`sources` grouped by the shapes and dtypes of their arrays (None counts as a
  kind of its own), groups in order of first appearance."""
  found: dict[tuple, tuple[list[int], list[tuple]]] = {}
  for position, source in enumerate(sources):
    positions, members = found.setdefault(_signature(tuple(source)), ([], []))
    positions.append(position)
    members.append(tuple(source))
  return [_with_stack(Group(tuple(p), tuple(m))) for p, m in found.values()]


def _with_stack(group: Group) -> Group:
  # Per-member scalars (a count each) do not count: 256 leaves of 1024x1024 are
  # exactly the limit, and their counts must not tip them into the switch.
  size = sum(a.size * jnp.dtype(a.dtype).itemsize
             for source in group.sources for a in source if a is not None and a.ndim)
  if len(group.sources) < max(STACK_MIN_MEMBERS, 2) or size > STACK_LIMIT_BYTES:
    return group
  columns = zip(*group.sources)
  return group._replace(stacked=tuple(None if c[0] is None else jnp.stack(c) for c in columns))


def group_arrays(groups: Sequence[Group]) -> list[tuple]:
  """The arrays of `groups` (sources and stacks), as one pytree: what a `cond` or an
  optimization barrier takes, so the stacks built once are not built again."""
  return [(g.sources, g.stacked) for g in groups]


def with_arrays(groups: Sequence[Group], arrays: Sequence[tuple]) -> list[Group]:
  """`groups` holding `arrays` (from `group_arrays`, e.g. traced in a branch)."""
  return [g._replace(sources=s, stacked=st) for g, (s, st) in zip(groups, arrays, strict=True)]


def _member(group: Group, i: jax.Array) -> tuple:
  if group.stacked is not None:
    return tuple(None if a is None else lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
                 for a in group.stacked)
  return lax.switch(i, [lambda s=s: s for s in group.sources])


def sum_over(groups: Sequence[Group], fn: Callable[[tuple, Any], jax.Array],
             init: jax.Array) -> jax.Array:
  """`init + sum over every member of fn(sources, position)`."""
  total = init
  for group in groups:
    # The first member outside the loop: the carry then has the type of the data
    # (inside `shard_map`, varying over its axes), which the loop requires.
    total = total + fn(group.sources[0], group.positions[0])
    if len(group.sources) == 1:
      continue
    positions = jnp.asarray(group.positions, jnp.int32)
    total = lax.fori_loop(
        1, len(group.sources),
        lambda i, acc, g=group, p=positions: acc + fn(_member(g, i), p[i]), total)
  return total


def map_groups(groups: Sequence[Group], fn: Callable[[tuple, Any], jax.Array]) -> list[jax.Array]:
  """`fn(sources, position)` for every member, one array per group: the lone
  member's result, or the members' results stacked along a new leading axis.

  A group's results are written into the stack inside its loop. The stack starts
  as the first member's result broadcast, so it has that result's type and sharding.
  """
  out = []
  for group in groups:
    first = fn(group.sources[0], group.positions[0])
    if len(group.sources) == 1:
      out.append(first)
      continue
    positions = jnp.asarray(group.positions, jnp.int32)
    stacked = jnp.broadcast_to(first[None], (len(group.sources), *first.shape))
    out.append(lax.fori_loop(
        1, len(group.sources),
        lambda i, acc, g=group, p=positions: lax.dynamic_update_index_in_dim(
            acc, fn(_member(g, i), p[i]), i, 0),
        stacked))
  return out


def split_groups(groups: Sequence[Group], results: Sequence[jax.Array]) -> list[jax.Array]:
  """`map_groups`' results as one array per member, in the original order."""
  out: list[Any] = [None] * sum(len(g.sources) for g in groups)
  for group, result in zip(groups, results, strict=True):
    if len(group.sources) == 1:
      out[group.positions[0]] = result
      continue
    for j, position in enumerate(group.positions):
      out[position] = result[j]
  return out


def map_scalars(groups: Sequence[Group], fn: Callable[[tuple, Any], Any]) -> list[Any]:
  """`[fn(sources, position)]` for every member, in the original order, for results
  of a few bytes each (pytrees of scalars).

  A group's loop carries one result per member, shifted by one at every step
  (`carried[1:] + (new,)`): after the loop each member's result is an output of
  its own, not a slice of a stacked array (see the module docstring). Every step
  moves all carried results, so they must be small.
  """
  out: list[Any] = [None] * sum(len(g.sources) for g in groups)
  for group in groups:
    first = fn(group.sources[0], group.positions[0])
    out[group.positions[0]] = first
    if len(group.sources) == 1:
      continue
    positions = jnp.asarray(group.positions, jnp.int32)
    # Started from the first member's result, the carry has its type (see sum_over).
    rest = lax.fori_loop(
        1, len(group.sources),
        lambda i, carried, g=group, p=positions: carried[1:] + (fn(_member(g, i), p[i]),),
        (first,) * (len(group.sources) - 1))
    for position, result in zip(group.positions[1:], rest, strict=True):
      out[position] = result
  return out


def map_over(groups: Sequence[Group], fn: Callable[[tuple, Any], jax.Array]) -> list[jax.Array]:
  """`[fn(sources, position)]` for every member, in the original order (one extra
  copy of the outputs, none of the inputs beyond the group's stack)."""
  return split_groups(groups, map_groups(groups, fn))

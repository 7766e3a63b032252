"""One computation over many arrays, compiled once per distinct shape.

A model with hundreds of targeted leaves has only a handful of distinct leaf
shapes. Unrolling a per-leaf computation (a selection, a count) once per leaf
makes the program, and its compile time, grow with the number of leaves. Here
arrays are grouped by the shapes and dtypes of their *sources* (the tuple of
arrays a leaf's computation reads, e.g. `(w, kept)`), and each group of more
than one member runs as a `fori_loop` over its members: the body is traced and
compiled once, and picks member `i` with `lax.switch` (no stacked copy of the
group: one member's arrays are live at a time).

* `sum_over(groups, fn, init)`: `init + sum_j fn(sources_j, j)`;
* `map_over(groups, fn)`: `[fn(sources_j, j) for j]`, in the original order.

`j` is the member's position in the original sequence: a Python int for a
member alone in its group, a traced int32 inside a group's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Group(NamedTuple):
  """Members of equal source shapes: their original positions and their sources."""

  positions: tuple[int, ...]
  sources: tuple[tuple, ...]


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
  return [Group(tuple(p), tuple(m)) for p, m in found.values()]


def _member(group: Group, i: jax.Array) -> tuple:
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


def map_over(groups: Sequence[Group], fn: Callable[[tuple, Any], jax.Array]) -> list[jax.Array]:
  """`[fn(sources, position)]` for every member, in the original order.

  A group's results are written into one stacked array inside its loop and split
  after it (one extra copy of the outputs, none of the inputs). The stack starts as
  the first member's result broadcast, so it has that result's type and sharding.
  """
  out: list[Any] = [None] * sum(len(g.sources) for g in groups)
  for group in groups:
    first = fn(group.sources[0], group.positions[0])
    out[group.positions[0]] = first
    if len(group.sources) == 1:
      continue
    positions = jnp.asarray(group.positions, jnp.int32)
    stacked = jnp.broadcast_to(first[None], (len(group.sources), *first.shape))
    stacked = lax.fori_loop(
        1, len(group.sources),
        lambda i, acc, g=group, p=positions: lax.dynamic_update_index_in_dim(
            acc, fn(_member(g, i), p[i]), i, 0),
        stacked)
    for j, position in enumerate(group.positions[1:], start=1):
      out[position] = stacked[j]
  return out

"""The traced program run again at the smaller sizes: a model without its code.

A model that takes its sizes from its arrays (plain JAX, Equinox, NNX layers) runs
on `shrink`'s params as it is. One that writes a size as a constant (a
`num_heads` in a reshape, a Linen shape check) cannot; `shrunk_program(groups,
keep)` re-interprets the jaxpr `channel_groups` traced, equation by equation, with
every shape parameter (`reshape`'s sizes, `broadcast_in_dim`'s shape, `iota`,
slice bounds, `split` sizes, `gather` slice sizes, a scan's length) set from the
kept units, constants sliced like the leaves, and a mean over a shrunk axis
divided by the kept count (a norm over residual channels normalizes over the kept
channels, as NVIDIA's Minitron does). The result is a plain JAX function:
jittable, differentiable, exportable with `jax.export`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.structural import channel_groups, shrink, shrunk_program
  >>> HEADS = 4  # a constant, as a model's config holds it
  >>> def attn(p, x):
  ...   q = (x @ p["wq"]).reshape(x.shape[0], HEADS, 2)
  ...   return (q * q).reshape(x.shape[0], HEADS * 2) @ p["wo"]
  >>> params = {"wq": jnp.ones((3, 8)), "wo": jnp.ones((8, 3))}
  >>> groups = channel_groups(attn, params, jax.ShapeDtypeStruct((5, 3), jnp.float32))
  >>> [g.kind for g in groups if g.prunable]
  ['mlp_hidden', 'mlp_hidden']
  >>> keep = {groups.prunable()[0]: [0, 3]}
  >>> small_fn = shrunk_program(groups, keep)
  >>> small_fn(shrink(params, groups, keep), jnp.ones((5, 3))).shape
  (5, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxprune._src.oneshot.layouts import INLINE_OPS
from jaxprune._src.structural.channel_groups import ChannelGroups, Program
from jaxprune._src.structural.channel_rules import Node
from jaxprune._src.structural.shrinking import Keep, check_keep, unit_mask
from jaxprune._src.tree.mask_tree import slots
from jaxprune._src.types import PyTree


class KeptSizes:
  """Kept indices of every axis of the traced program, from the kept units per group
  (`keep={}`: the traced sizes)."""

  def __init__(self, program: Program, groups: Sequence[Any], keep: Keep):
    self.program, self.st = program, program.state
    self.units = {key: unit_mask(groups[key], indices)
                  for key, indices in check_keep(groups, keep).items()}
    self._memo: dict = {}

  def mask(self, node: Node) -> np.ndarray:
    """Booleans over the axis (for a per-layer group, its first layer's row: the
    program only needs counts, equal in every layer)."""
    r = self.st.find(node)
    if r not in self._memo:
      self._memo[r] = self._root_mask(r)
    return self._memo[r]

  def _root_mask(self, r: Node) -> np.ndarray:
    size = self.st.size(r)
    if r in self.program.parts:
      out = np.ones(size, bool)
      for group, index in self.program.parts[r]:
        if group in self.units:
          out[index[~self._row(group)].ravel()] = False
      return out
    group = self.program.roots.get(r)
    return self._row(group) if group in self.units else np.ones(size, bool)

  def _row(self, group: int) -> np.ndarray:
    units = self.units[group]
    return units if units.ndim == 1 else units[0]

  def per_layer(self, node: Node) -> bool:
    r = self.st.find(node)
    groups = [g for g, _ in self.program.parts.get(r, [(self.program.roots.get(r), None)])]
    return any(g in self.units and self.units[g].ndim == 2 for g in groups)

  def shape(self, tok: int) -> tuple[int, ...]:
    return tuple(int(self.mask((tok, d)).sum()) for d in range(len(self.st.shapes[tok])))

  def slice_const(self, tok: int, value: Any) -> Any:
    """A constant of the program with its grouped axes cut like the leaves."""
    value = np.asarray(value) if not isinstance(value, jax.Array) else value
    for d in range(np.ndim(value)):
      mask = self.mask((tok, d))
      if mask.all():
        continue
      if self.per_layer((tok, d)):
        raise ValueError(f"a constant of the program (shape {np.shape(value)}) has an axis "
                         "in a group kept per layer; keep one row for every layer instead")
      value = np.take(np.asarray(value), np.flatnonzero(mask), axis=d)
    return value


def _cut_start(sizes: KeptSizes, tok: int, d: int, start: int) -> int:
  return int(sizes.mask((tok, d))[:start].sum())


def _params(sizes: KeptSizes, eqn: Any, ins: list[int], outs: list[int], invals: list,
            here: tuple[int, int]) -> tuple:
  """`eqn`'s params (and operands) at the new sizes."""
  p, name = dict(eqn.params), eqn.primitive.name
  if here in sizes.st.counts:  # the `n` of `jnp.var`'s `n - ddof`
    n = np.prod([sizes.mask(node).sum() for node in sizes.st.counts[here]])
    invals[0] = np.asarray(n, np.asarray(eqn.invars[0].val).dtype)
  new = [sizes.shape(t) for t in outs]
  if name == "reshape":
    p["new_sizes"], p["dimensions"] = new[0], None
  elif name in ("broadcast_in_dim", "iota"):
    p["shape"] = new[0]
  elif name == "slice":
    starts = [_cut_start(sizes, ins[0], d, s) for d, s in enumerate(p["start_indices"])]
    p["start_indices"] = tuple(starts)
    p["limit_indices"] = tuple(s + n for s, n in zip(starts, new[0]))
  elif name == "dynamic_slice":
    p["slice_sizes"] = new[0]
    for d, v in enumerate(eqn.invars[1:]):
      if isinstance(v, jcore.Literal):
        start = _cut_start(sizes, ins[0], d, int(v.val))
        invals[1 + d] = np.asarray(start, np.asarray(v.val).dtype)
  elif name == "split":
    p["sizes"] = tuple(shape[p["axis"]] for shape in new)
  elif name == "gather":
    old, now = sizes.st.shapes[ins[0]], sizes.shape(ins[0])
    p["slice_sizes"] = tuple(n if s == o else s for s, o, n in zip(p["slice_sizes"], old, now))
  elif name == "div" and _is_mean(sizes, eqn, ins):
    nodes = sizes.st.sums[ins[0]]
    invals[1] = np.asarray(np.prod([sizes.mask(n).sum() for n in nodes]), np.asarray(
        eqn.invars[1].val).dtype)
  return p, invals


def _is_mean(sizes: KeptSizes, eqn: Any, ins: list[int]) -> bool:
  """`sum / n` with `n` the summed axes' traced size: a mean, kept a mean."""
  nodes = sizes.st.sums.get(ins[0])
  divisor = eqn.invars[1]
  if not nodes or not isinstance(divisor, jcore.Literal) or np.ndim(divisor.val):
    return False
  return float(divisor.val) == float(np.prod([sizes.st.size(n) for n in nodes]))


class ProgramRunner:
  """Evaluates the traced program's frames (`run(0, flat_inputs)`) at `sizes`.

  The interpreter behind `shrunk_program`, and the seam for a pass that watches the
  program as it runs: a subclass overrides `lax_scan` (as `layer_importance` does to
  collect per-layer values). Internal to jaxprune (not exported)."""

  def __init__(self, sizes: KeptSizes):
    self.sizes, self.st = sizes, sizes.st

  def run(self, frame: int, args: Sequence[Any]) -> list[Any]:
    jaxpr, env_tokens, consts = self.st.frames[frame]
    values: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      values[v] = self.sizes.slice_const(env_tokens[v], c)
    values.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jcore.Literal) else values[v]
    for i, eqn in enumerate(jaxpr.eqns):
      invals = [read(v) for v in eqn.invars]
      children = self.st.children.get((frame, i), [])
      outs = self._eqn(eqn, invals, children, [env_tokens[v] for v in eqn.outvars],
                       [-1 if isinstance(v, jcore.Literal) else env_tokens[v]
                        for v in eqn.invars], (frame, i))
      values.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn: Any, invals: list, children: list, outs: list, ins: list,
           here: tuple[int, int]) -> list:
    name = eqn.primitive.name
    if name in INLINE_OPS:
      return self._inline(eqn, invals, children[0])
    if name == "cond":
      branches = [lambda *ops, c=c: self.run(c, ops) for c in children]
      return jax.lax.switch(invals[0], branches, *invals[1:])
    if name == "while":
      return self._while(eqn, invals, children)
    if name == "scan":
      return self._scan(eqn, invals, children[0], outs)
    if name == "iota" and (outs[0], eqn.params["dimension"]) not in self.st.positions:
      return [self._kept_iota(eqn, outs[0])]
    params, invals = _params(self.sizes, eqn, ins, outs, invals, here)
    result = eqn.primitive.bind(*invals, **params)
    return list(result) if eqn.primitive.multiple_results else [result]

  def _kept_iota(self, eqn: Any, out: int) -> Any:
    """An `iota` read as numbers (RoPE's frequencies): the kept original indices,
    so the smaller program computes what the zeroed dense one does."""
    p = eqn.params
    kept = np.flatnonzero(self.sizes.mask((out, p["dimension"])))
    if kept.size == p["shape"][p["dimension"]]:
      return eqn.primitive.bind(**p)
    shape = [1] * len(p["shape"])
    shape[p["dimension"]] = kept.size
    return jax.numpy.broadcast_to(kept.reshape(shape).astype(p["dtype"]), self.sizes.shape(out))

  def _inline(self, eqn: Any, invals: list, child: int) -> list:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      p = eqn.params
      body = jax.checkpoint(lambda *a: self.run(child, a), prevent_cse=p.get("prevent_cse", True),
                            policy=p.get("policy"))
      return list(body(*invals))
    return self.run(child, invals)

  def _while(self, eqn: Any, invals: list, children: list) -> list:
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    body, cond = children
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    return list(jax.lax.while_loop(lambda c: self.run(cond, [*cconsts, *c])[0],
                                   lambda c: tuple(self.run(body, [*bconsts, *c])),
                                   tuple(init)))

  def _scan(self, eqn: Any, invals: list, child: int, outs: list) -> list:
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

    def body(carry, x):
      result = self.run(child, [*consts, *carry, *x])
      return tuple(result[:nk]), tuple(result[nk:])

    length = xs[0].shape[0] if xs else (
        self.sizes.shape(outs[nk])[0] if len(outs) > nk else p["length"])
    carry, ys = self.lax_scan(eqn, body, tuple(init), tuple(xs), length=length,
                               reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]

  def lax_scan(self, eqn: Any, body: Callable, init: tuple, xs: tuple, **kwargs: Any) -> tuple:
    """`jax.lax.scan(body, init, xs, **kwargs)` for the scan `eqn`: the hook where a
    subclass watches the steps (`layer_importance` adds per-layer values as ys)."""
    return jax.lax.scan(body, init, xs, **kwargs)


def shrunk_program(groups: ChannelGroups, keep: Keep) -> Callable[..., Any]:
  """`small_apply(small_params, *args)`: the traced program at the kept sizes.

  Args:
    groups: from `channel_groups(apply_fn, params, *example_args)`.
    keep: group index -> kept units, as for `shrink`.

  Returns:
    A function of `shrink(params, groups, keep)` and inputs shaped like the
    example args, returning what `apply_fn` returns. For the groups that removal
    equals zeroing (MLP neurons, heads, conv channels), it equals `apply_fn` on
    the params with the removed units zeroed; a mean over a shrunk axis is over the
    kept entries. Jittable, differentiable, exportable (`jax.export`).

  Raises:
    ValueError: bad keep-indices, or params whose shapes are not the shrunk ones
      (naming the leaf).
  """
  program = groups.program
  if program is None:
    raise ValueError("these groups carry no traced program; build them with channel_groups")
  sizes = KeptSizes(program, groups, keep)
  runner = ProgramRunner(sizes)
  forward, st = program.forward, program.state
  expected = [sizes.shape(st.frames[0][1][v]) for v in program.closed.jaxpr.invars]

  def small_apply(small_params: PyTree, *args: Any) -> Any:
    theirs = slots(small_params)
    arrays = [theirs.leaves[s] for s in forward.slots]
    flat = arrays + jax.tree.leaves(args)
    if len(flat) != len(expected):
      raise ValueError(f"expected {len(forward.slots)} arrays in params and "
                       f"{len(expected) - len(forward.slots)} in args, got {len(arrays)} and "
                       f"{len(flat) - len(arrays)}")
    for k, (x, shape) in enumerate(zip(flat, expected)):
      if tuple(np.shape(x)) != shape:
        what = theirs.paths[forward.slots[k]] if k < len(arrays) else f"input {k - len(arrays)}"
        raise ValueError(f"{what} has shape {tuple(np.shape(x))}; the shrunk program takes "
                         f"{shape}")
    return jax.tree.unflatten(program.out_tree, runner.run(0, flat))

  return small_apply

"""How much each layer changes the residual stream: Block Influence, for depth pruning.

ShortGPT's Block Influence (Men et al., 2024), which NVIDIA's Minitron uses to rank
layers for depth pruning: a layer whose output is close in direction to its input
does little and is the first to remove. For a layer with input `x` and output `y`
(the residual stream entering and leaving it, feature axis last, `D` features)
and calibration batches `b = 1..B`, each with positions `p = 1..P_b` (every index
but the feature axis):

  cos_b,p = <x_b,p, y_b,p> / max(‖x_b,p‖₂ ‖y_b,p‖₂, 1e-12)

  BI = 1 - (Σ_b Σ_p cos_b,p) / (Σ_b P_b)

`0` for a layer that leaves every position as it was (or only rescales it), up to
`2`. Higher is more important.

* `layer_importance(groups, params, batches)`: for a model that `lax.scan`s (or
  `nnx.scan`s) a stack of layers with the residual stream as its carry, one
  value per layer of each `layers` group, `{group index: (layers,)}`, the dict
  `keep_top(..., kinds=("layers",))` ranks; `shrink` then drops the layers and
  `shrunk_program` runs the shorter stack. The dense traced program is run once
  per batch (jitted, compiled once), each scan step adding its `cos` mean as an
  extra scan output: no host callback.
* `block_influence(stages, params, batches)`: the same score for a model cut into
  `stage(params, x) -> x'` pieces (as `sparsegpt_sequential` takes), per stage
  whose output has its input's shape.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.structural import channel_groups, keep_top
  >>> from jaxprune.structural import layer_importance
  >>> def model(p, x):
  ...   step = lambda h, w: (h + jnp.tanh(h @ w["a"]) @ w["b"], None)
  ...   return jax.lax.scan(step, x @ p["embed"], p["layers"])[0] @ p["head"]
  >>> k = jax.random.split(jax.random.key(0), 5)
  >>> params = {"embed": jax.random.normal(k[0], (2, 4)), "head": jnp.ones((4, 1)),
  ...           "layers": {"a": jax.random.normal(k[1], (3, 4, 8)),
  ...                      "b": jax.random.normal(k[2], (3, 8, 4)).at[1].set(0.0)}}
  >>> batches = [jax.random.normal(k[3], (5, 2)), jax.random.normal(k[4], (5, 2))]
  >>> groups = channel_groups(model, params, batches[0])
  >>> importance = layer_importance(groups, params, batches)
  >>> [(groups[i].kind, v.shape, bool(abs(v[1]) < 1e-6)) for i, v in importance.items()]
  [('layers', (3,), True)]
  >>> [v.tolist() for v in keep_top(groups, importance, 2 / 3, kinds=("layers",)).values()]
  [[0, 2]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxprune._src.oneshot.layouts import source_line
from jaxprune._src.structural.channel_groups import ChannelGroups, Program
from jaxprune._src.structural.channel_rules import Node
from jaxprune._src.structural.shrunk_program import KeptSizes, ProgramRunner
from jaxprune._src.tree.mask_tree import slots
from jaxprune._src.types import PyTree

EPS = 1e-12  # the floor of ‖x‖‖y‖: a zero vector has cos 0
_NOT_WATCHABLE = {"checkpoint", "remat", "remat2", "cond", "while", "scan"}


def mean_cos(before: jax.Array, after: jax.Array, axis: int = -1) -> jax.Array:
  """The cosine similarity of `before` and `after` along `axis`, averaged over every
  other index (at least float32): `mean_p <x_p, y_p> / max(‖x_p‖ ‖y_p‖, EPS)`."""
  dtype = jnp.promote_types(before.dtype, jnp.float32)
  x = jnp.moveaxis(before, axis, -1).astype(dtype)
  y = jnp.moveaxis(after, axis, -1).astype(dtype)
  norms = jnp.sqrt(jnp.sum(x * x, -1) * jnp.sum(y * y, -1))
  return jnp.mean(jnp.sum(x * y, -1) / jnp.maximum(norms, EPS))


# ----------------------------------------------------------------------------- scans


def _groups_at(program: Program, node: Node) -> set:
  """The group indices an axis belongs to (several when a reshape made it of parts)."""
  r = program.state.find(node)
  return {g for g, _ in program.parts.get(r, [(program.roots.get(r), None)])} - {None}


def _residual_axis(groups: ChannelGroups, env: dict, eqn: Any, line: str) -> tuple[int, int]:
  """(carry position, axis) of the scan's one carry holding the residual group."""
  p, program = eqn.params, groups.program
  residual = {i for i, g in enumerate(groups) if g.kind == "residual"}
  hits = [(k, d) for k, v in enumerate(eqn.invars[p["num_consts"]:][:p["num_carry"]])
          if not isinstance(v, jcore.Literal) for d in range(len(v.aval.shape))
          if _groups_at(program, (env[v], d)) & residual]
  if len(hits) != 1:
    found = "no carry" if not hits else f"several carry axes {hits} (carry, axis)"
    raise ValueError(f"the scan over layers at {line} has {found} in a residual group; "
                     "Block Influence needs the one carry that is the residual stream")
  return hits[0]


def _check_nesting(groups: ChannelGroups, frame: int, line: str) -> None:
  """The scan must run where its ys reach the top program: not in a loop's body,
  a `cond` branch or a `checkpoint` (only jit-like calls in between)."""
  st = groups.program.state
  parents = {c: key for key, children in st.children.items() for c in children}
  while frame:
    parent, i = parents[frame]
    name = st.frames[parent][0].eqns[i].primitive.name
    if name in _NOT_WATCHABLE:
      raise ValueError(f"the scan over layers at {line} runs inside a `{name}`; its per-layer "
                       "values cannot be collected there")
    frame = parent


def _layer_scans(groups: ChannelGroups) -> dict[tuple[int, int], tuple[int, int, int]]:
  """(frame, id of the scan equation) -> (layers group, carry position, feature axis)
  for every scan stepping through a `layers` group."""
  program = groups.program
  st, found, seen = program.state, {}, {}
  for f, (jaxpr, env, _) in enumerate(st.frames):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name != "scan":
        continue
      xs = eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]
      layers = set().union(*[_groups_at(program, (env[v], 0)) for v in xs
                             if not isinstance(v, jcore.Literal)])
      layers = [g for g in layers if groups[g].kind == "layers"]
      if not layers:
        continue
      line = source_line(eqn) or "an unknown line"
      if layers[0] in seen:
        raise ValueError(f"the layers group {layers[0]} is scanned twice (at {seen[layers[0]]} "
                         f"and {line}); its layers have no single input and output")
      seen[layers[0]] = line
      _check_nesting(groups, f, line)
      found[(f, id(eqn))] = (layers[0], *_residual_axis(groups, env, eqn, line))
  return found


class _Watcher(ProgramRunner):
  """The dense program, each watched scan also returning its steps' `mean_cos`."""

  def __init__(self, sizes: KeptSizes, watch: dict):
    super().__init__(sizes)
    self.watch, self.frames, self.collected = watch, [], {}

  def run(self, frame: int, args: Sequence[Any]) -> list[Any]:
    self.frames.append(frame)
    try:
      return super().run(frame, args)
    finally:
      self.frames.pop()

  def lax_scan(self, eqn: Any, body: Callable, init: tuple, xs: tuple, **kwargs: Any) -> tuple:
    key = (self.frames[-1], id(eqn))
    if key not in self.watch:
      return super().lax_scan(eqn, body, init, xs, **kwargs)
    group, k, axis = self.watch[key]

    def watched(carry: tuple, x: tuple) -> tuple:
      new, ys = body(carry, x)
      return new, (ys, mean_cos(carry[k], new[k], axis))

    carry, (ys, cos) = jax.lax.scan(watched, init, xs, **kwargs)
    self.collected[group] = cos
    return carry, ys


def _flat_inputs(program: Program, params: PyTree, batch: Any) -> list[Any]:
  """The program's inputs: the params' traced leaves, then the batch's leaves (one
  example arg, or a tuple of them), checked against the traced shapes."""
  theirs, st = slots(params), program.state
  arrays = [theirs.leaves[s] for s in program.forward.slots]
  flat = arrays + jax.tree.leaves(batch)
  expected = [st.shapes[st.frames[0][1][v]] for v in program.closed.jaxpr.invars]
  if len(flat) != len(expected):
    raise ValueError(f"expected {len(arrays)} arrays in params and {len(expected) - len(arrays)}"
                     f" in a batch, got {len(arrays)} and {len(flat) - len(arrays)}")
  for k, (x, shape) in enumerate(zip(flat, expected)):
    if tuple(np.shape(x)) != shape:
      what = (theirs.paths[program.forward.slots[k]] if k < len(arrays)
              else f"batch leaf {k - len(arrays)}")
      raise ValueError(f"{what} has shape {tuple(np.shape(x))}; the groups were traced with "
                       f"{shape}")
  return flat


def layer_importance(groups: ChannelGroups, params: PyTree,
                     batches: Iterable[Any]) -> dict[int, np.ndarray]:
  """Block Influence (module docstring) of every layer of every `layers` group.

  Args:
    groups: from `channel_groups(apply_fn, params, *example_args)` on a model that
      scans its stacked layers with the residual stream as a carry.
    params: the params the groups were traced from (same shapes).
    batches: calibration batches, each shaped as the example args (one arg, or a
      tuple of them): the traced program runs at the traced sizes.

  Returns:
    group index -> `(layers,)` float64 Block Influence, `BI[l] = 1 - mean cos`
    between the carry entering and leaving step `l` of the scan (layer `l` of the
    stack, also for a reversed scan), over its residual-group axis (the feature
    axis) per position, the mean over every position of every batch.

  Raises:
    ValueError: no `layers` group; a layers scan with no carry, or several, in a
      `residual` group, scanned twice, or inside a loop, `cond` or `checkpoint`
      (naming its source line); no batch; inputs not of the traced shapes.
  """
  if groups.program is None:
    raise ValueError("these groups carry no traced program; build them with channel_groups")
  watch = _layer_scans(groups)
  if not watch:
    raise ValueError("no `layers` group: the model scans no stacked params (for a Python "
                     "loop over layers, cut it into stages and use block_influence)")
  runner = _Watcher(KeptSizes(groups.program, groups, {}), watch)

  def collect(flat: list) -> dict:
    runner.collected = {}
    runner.run(0, flat)
    return dict(runner.collected)

  collect_jit = jax.jit(collect)
  per_batch = [collect_jit(_flat_inputs(groups.program, params, b)) for b in batches]
  if not per_batch:
    raise ValueError("layer_importance needs at least one batch")
  # Every batch has the traced shape, so the mean of per-batch means is the mean
  # over every position.
  return {g: 1.0 - np.mean([np.asarray(c[g], np.float64) for c in per_batch], axis=0)
          for g, _, _ in sorted(watch.values())}


def block_influence(stages: Sequence[Callable[[PyTree, Any], Any]], params: PyTree,
                    batches: Iterable[Any]) -> dict[int, float]:
  """Block Influence (module docstring) of each stage of a model cut into stages.

  Args:
    stages: `stage(params, x) -> x'`, run in order: the first takes a batch, each
      next the previous one's output (`sparsegpt_sequential`'s stages; the example
      LM's `make_stages`: the embedding, then each block).
    params: the params every stage takes.
    batches: calibration batches for the first stage.

  Returns:
    stage index -> `1 - mean cos` between the stage's input and output over the
    last axis per position, the mean over every position of every batch (batches
    of other shapes weigh by their positions), for the stages whose input and
    output are arrays of one shape in every batch; other stages (an embedding, a
    head) have no entry. Ranked by value, the keys are the layers to keep.

  Raises:
    ValueError: no batch.
  """
  runs, cos = [jax.jit(s) for s in stages], jax.jit(mean_cos)
  sums: dict[int, float] = {}
  counts: dict[int, int] = {}
  unscored: set[int] = set()
  batches_seen = 0
  for batch in batches:
    batches_seen += 1
    x = batch
    for k, run in enumerate(runs):
      y = run(params, x)
      if (isinstance(x, jax.Array | np.ndarray) and isinstance(y, jax.Array)
          and x.shape == y.shape and x.ndim):
        positions = x.size // x.shape[-1]
        sums[k] = sums.get(k, 0.0) + float(cos(x, y)) * positions
        counts[k] = counts.get(k, 0) + positions
      else:
        unscored.add(k)
      x = y
  if not batches_seen:
    raise ValueError("block_influence needs at least one batch")
  return {k: 1.0 - sums[k] / counts[k] for k in sorted(sums) if k not in unscored}

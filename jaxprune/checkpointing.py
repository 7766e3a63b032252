"""Orbax checkpoints of a prune-retrain run: packed masks, exact resume, config checks.

A checkpoint holds two items:

* `state`: params, the optimizer state (whose `pruned` state holds the masks,
  their one home, held packed to 1 bit per weight: `packed_masks`),
  and the RNG key data;
* `meta` (JSON): where the run is (iteration, phase, step), the history so far, and
  a fingerprint of the configuration (param paths/shapes/dtypes, schedule, budgets)
  that a resume must match.

Orbax writes each checkpoint to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.leaf_selection import leaf_paths
from jaxprune.mask_tree import is_none
from jaxprune.optax_wrapper import replace_masks
from jaxprune.retraining import LoopState

PyTree = Any


def describe_state(opt_state: PyTree) -> str:
  """A short name of an optimizer state's layout, for the resume check.

  The node types in order (`PrunedState(ScaleByAdamState, ...)` reads as
  `PrunedState/ScaleByAdamState/...`) and a digest of every leaf's path, shape and
  dtype, with the masks left out: two optimizers agree iff their states would
  restore into each other.
  """
  kinds: list[str] = []

  def visit(node: Any) -> None:
    if isinstance(node, (dict, list, tuple)) and type(node) in (dict, list, tuple):
      children = node.values() if isinstance(node, dict) else node
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(node, is_leaf=is_none)):
      return
    else:
      name = type(node).__name__
      if not kinds or kinds[-1] != name:
        kinds.append(name)
      children = jax.tree.leaves(node, is_leaf=lambda y: y is not node)
    for child in children:
      visit(child)

  state = replace_masks(opt_state, None)
  visit(state)
  layout = [f"{p}:{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}"
            for p, x in zip(leaf_paths(state), jax.tree.leaves(state))]
  digest = hashlib.sha256("\n".join(layout).encode()).hexdigest()[:12]
  return f"{'/'.join(kinds) or 'no state'} ({len(layout)} arrays, layout {digest})"


# 2: masks stored inside the optimizer state (their one home), not beside it.
# 3: masks packed along each leaf's last axis (`packed_masks`), as `pruned` holds them.
FORMAT = 3


def fingerprint(params: PyTree, **config: Any) -> dict[str, Any]:
  """JSON-able description of a run that a checkpoint must match to be resumed."""
  layout = [
      f"{p}:{tuple(x.shape)}:{x.dtype}"
      for p, x in zip(leaf_paths(params), jax.tree.leaves(params))
  ]
  digest = hashlib.sha256("\n".join(layout).encode()).hexdigest()[:16]
  return {"format": FORMAT, "params_layout": digest, "num_leaves": len(layout),
          **json.loads(json.dumps(config))}


def _saved_tree(state: LoopState) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def _abstract(tree: PyTree) -> PyTree:
  def spec(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(spec, tree)


def open_manager(directory: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  """A synchronous `CheckpointManager` keeping the last `keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=("state", "meta")
  )


def save(manager: ocp.CheckpointManager, index: int, state: LoopState, meta: dict) -> None:
  """Writes checkpoint number `index` (complete on return)."""
  manager.save(
      index,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(_saved_tree(state)), meta=ocp.args.JsonSave(meta)
      ),
  )
  manager.wait_until_finished()


def check_fingerprint(saved: dict[str, Any], expected: dict[str, Any], directory: str) -> None:
  """Raises `ValueError` naming the first setting a checkpoint disagrees on."""
  # The optimizer state follows from the params and settings: name those first.
  for key in sorted(set(saved) | set(expected), key=lambda k: (k == "optimizer_state", k)):
    if saved.get(key) != expected.get(key):
      what = "the optimizer state" if key == "optimizer_state" else key
      raise ValueError(
          f"checkpoint in {directory} was written by another configuration: {what} is "
          f"{saved.get(key)!r} there and {expected.get(key)!r} now. Resume with the same "
          "settings (and optimizer), or use another checkpoint_dir (nothing was overwritten)."
      )


def read_meta(manager: ocp.CheckpointManager, index: int) -> dict:
  """The JSON `meta` item of checkpoint `index`."""
  return manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(manager: ocp.CheckpointManager, index: int, like: LoopState) -> LoopState:
  """Checkpoint `index` restored into the layout of `like`."""
  target = _abstract(_saved_tree(like))
  tree = manager.restore(
      index, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
  )["state"]
  return LoopState(tree["params"], tree["opt_state"], tree["rng"])


class Checkpointer:
  """The checkpoints of one prune-retrain run: resume check, saves, always closed.

  A context manager over `directory` (None: every call does nothing). On entry it
  opens the orbax manager; `resume(like)` returns the latest state and meta if the
  directory holds a checkpoint of the same configuration (else raises, naming the
  setting that differs); `save(state, meta)` writes the next one; `due(step)` says
  whether a phase should save after `step` steps (every `every` steps; never if
  `every` is None); exit closes the manager, also when the run raises.

  Example::

    >>> state = jaxprune.LoopState(params, opt_state, rng_data)
    >>> with jaxprune.Checkpointer("ckpt", {"seed": 0}) as ckpt:
    ...   print(ckpt.resume(state))
    ...   ckpt.save(state, {"iteration": 0})
    None
    >>> with jaxprune.Checkpointer("ckpt", {"seed": 0}) as ckpt:
    ...   print(ckpt.resume(state)[1]["iteration"])
    0
  """

  def __init__(self, directory: str | os.PathLike | None, config: dict, *, keep: int = 3,
               resume: bool = True, every: int | None = None):
    self.directory = None if directory is None else os.fspath(directory)
    self.config, self.keep, self.allow_resume, self.every = config, keep, resume, every
    self._manager: ocp.CheckpointManager | None = None
    self._next = 0

  def __enter__(self) -> Checkpointer:
    if self.directory is not None:
      self._manager = open_manager(self.directory, self.keep)
      latest = self._manager.latest_step()
      self._next = 0 if latest is None else latest + 1  # never write over a checkpoint
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def resume(self, like: LoopState) -> tuple[LoopState, dict] | None:
    """The latest checkpoint restored into `like`'s layout, with its meta; or None."""
    latest = None if self._manager is None else self._manager.latest_step()
    if latest is None:
      return None
    if not self.allow_resume:
      raise ValueError(
          f"{self.directory} already holds checkpoints; pass resume=True to continue "
          "that run, or use an empty directory (nothing was overwritten)"
      )
    meta = read_meta(self._manager, latest)
    check_fingerprint(meta["config"], self.config, self.directory)
    self._next = latest + 1
    return restore_state(self._manager, latest, like), meta

  @property
  def active(self) -> bool:
    """Whether checkpoints are written (a directory was given and the manager is open)."""
    return self._manager is not None

  def due(self, step: int) -> bool:
    """Whether to save after `step` steps of a phase (a multiple of `every`)."""
    return self.active and bool(self.every) and step % self.every == 0

  def save(self, state: LoopState, meta: dict) -> None:
    """Writes the next checkpoint (complete on return); no-op without a directory."""
    if self._manager is None:
      return
    save(self._manager, self._next, state, {**meta, "config": self.config})
    self._next += 1

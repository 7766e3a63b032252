"""Orbax checkpoints of a training run: exact resume, checked on the way in and out.

A checkpoint holds two items:

* `state`: params, the optimizer state (whose `pruned` state holds the masks,
  their one home, held packed to 1 bit per weight: `packed_masks`),
  and the RNG key data;
* `meta` (JSON): where the run is (iteration, phase, step), the history so far,
  the run's settings by value (`run_settings.fingerprint`) that a resume must
  match, the checksum of every saved array (`integrity`) and a digest of itself.

Nothing unsound is written: a state with a non-finite param or a NaN in the
optimizer state is refused at the save (`FloatingPointError`), so a NaN gradient
behind a finite loss cannot poison the checkpoints. A resume takes the newest
checkpoint that reads back intact (its meta digest and every array's checksum
agree, its state is sound), and says which newer ones it skipped and why.
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the
latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxprune._src.methods.masks import check_count
from jaxprune._src.training import integrity, run_settings
from jaxprune._src.training.phases import LoopState
from jaxprune._src.types import PyTree

logger = logging.getLogger("jaxprune")

RESUME_VALUES = (True, False, "with_changes")


class DamagedCheckpointError(Exception):
  """A checkpoint that does not read back as it was written (the reason is the text)."""


def check_directory(directory: Any, name: str = "directory") -> str | None:
  """`directory` as an absolute path, checked writable by writing a file there (or,
  if it does not exist yet, in the nearest folder above it, so that nothing is
  created before the run starts); None stays None. A ValueError naming `name`
  otherwise."""
  if directory is None:
    return None
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {directory!r}")
  path = os.fspath(directory)
  if not str(path).strip():
    raise ValueError(f"{name}={directory!r} names no directory (checkpoints would go into the "
                     "working directory, and later runs there would resume them); give a path "
                     "or None")
  path = existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{name}={directory!r}: {existing} exists and is not a directory")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as err:
    raise ValueError(f"{name}={directory!r}: cannot write in {existing} ({err})") from None
  return path


def _saved_tree(state: LoopState) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def _abstract(tree: PyTree) -> PyTree:
  def spec(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(spec, tree)


def _meta_digest(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "digest"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def open_manager(directory: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  """A synchronous `CheckpointManager` keeping the last `keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=check_count("keep", keep), create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=("state", "meta")
  )


def _integrity(state: LoopState) -> dict[str, integrity.Checksums]:
  return {name: integrity.checksums(part) for name, part in _saved_tree(state).items()}


def _position(meta: dict) -> str:
  return ", ".join(f"{k} {meta[k]}" for k in ("iteration", "phase", "step") if k in meta)


def save(manager: ocp.CheckpointManager, index: int, state: LoopState, meta: dict) -> None:
  """Writes checkpoint number `index` (complete on return), every array checksummed.

  Raises:
    FloatingPointError: the state is unsound (`integrity.is_sound`): nothing is
      written, the previous checkpoints stay the latest.
  """
  checks = _integrity(state)
  bad = integrity.unsound(checks["params"], checks["opt_state"])
  if bad:
    raise FloatingPointError(f"not saved ({_position(meta)}): {integrity.unsound_leaves(bad)}. "
                             f"The loss was finite, so {integrity.FINITE_LOSS_CAUSE}")
  sums = {name: dict(zip(c.paths, c.sums)) for name, c in checks.items()}
  meta = {**meta, "integrity": sums}
  meta["digest"] = _meta_digest(meta)
  manager.save(
      index,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(_saved_tree(state)), meta=ocp.args.JsonSave(meta)
      ),
  )
  manager.wait_until_finished()


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def read_meta(manager: ocp.CheckpointManager, index: int) -> dict:
  """The JSON `meta` item of checkpoint `index`, its digest checked.

  Raises:
    DamagedCheckpointError: it cannot be read, or its digest disagrees.
  """
  try:
    meta = manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as err:  # orbax and TensorStore raise many kinds on damaged files
    raise DamagedCheckpointError(f"its meta does not read ({_first_line(err)})") from None
  if not isinstance(meta, dict):
    raise DamagedCheckpointError(f"its meta is not a JSON object but {type(meta).__name__}")
  config = meta.get("config")
  written_by = config.get("format") if isinstance(config, dict) else None
  if "digest" not in meta and written_by != run_settings.FORMAT:
    # An older format, not damage: the fingerprint check refuses it, naming the format.
    return meta
  if meta.get("digest") != _meta_digest(meta):
    raise DamagedCheckpointError("its meta does not match its digest (changed after the save)")
  return meta


def _check_sums(checks: dict[str, integrity.Checksums], saved: dict) -> None:
  for name, c in checks.items():
    for path, got in zip(c.paths, c.sums):
      want = saved.get(name, {}).get(path)
      if got != want:
        raise DamagedCheckpointError(f"{name}/{path} reads back with checksum {got}, saved {want}")


def restore_state(manager: ocp.CheckpointManager, index: int, like: LoopState,
                  meta: dict | None = None) -> LoopState:
  """Checkpoint `index` restored into the layout of `like`, every array checked
  against the checksums in `meta` (read if not given) and the state's soundness.

  Raises:
    DamagedCheckpointError: an array does not read back, or not as it was saved.
  """
  meta = read_meta(manager, index) if meta is None else meta
  target = _abstract(_saved_tree(like))
  try:
    tree = manager.restore(
        index, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
  except Exception as err:
    raise DamagedCheckpointError(f"its arrays do not read ({_first_line(err)})") from None
  state = LoopState(tree["params"], tree["opt_state"], tree["rng"])
  checks = _integrity(state)
  _check_sums(checks, meta.get("integrity", {}))
  bad = integrity.unsound(checks["params"], checks["opt_state"])
  if bad:
    raise DamagedCheckpointError(integrity.unsound_leaves(bad))
  return state


def check_resume(resume: Any) -> bool | str:
  """`resume` if it is True, False or "with_changes", else a ValueError naming it."""
  if not any(resume is v or (isinstance(v, str) and resume == v) for v in RESUME_VALUES):
    raise ValueError(f"resume must be True, False or 'with_changes', got {resume!r}")
  return resume


class Checkpointer:
  """Where a run keeps its checkpoints, how often, and whether it resumes them.

  Give one to `jaxprune.train` or `jaxprune.prune_retrain` (`checkpointer=`): the
  run enters it, resumes from the newest intact checkpoint in `directory` (in the
  run's layout) unless none is there, saves every `every` steps of a phase and at
  each phase's end, and closes it, also when the run raises.

  A resume checks the checkpoint was written with the run's settings (`config`,
  a `run_settings` fingerprint), naming the first that differs, unless
  `resume="with_changes"` (then only the array layout must agree, and the changes
  are logged); `resume=False` refuses a directory that holds checkpoints. Newer
  checkpoints that do not read back intact are skipped with a warning naming each
  and why; when none is intact it raises, naming them all. `save` refuses an
  unsound state (nothing is written). Subclass it to watch or interrupt saves (a
  test announcing each save, a run stopped after one): `save` is the one seam.

  Args:
    directory: created when the checkpointer is entered (the run's start);
      checked writable now (`check_directory`).
    every: also save every this many steps of a phase (None: at phase ends only).
    keep: how many checkpoints to keep (>= 1).
    resume: True, False or `"with_changes"` (above).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> params = {"w": jnp.ones((4, 4))}
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> rng_data = jax.random.key_data(jax.random.key(0))   # raw key data
    >>> state = jaxprune.training.LoopState(params, opt_state, rng_data)
    >>> with jaxprune.Checkpointer("ckpt") as ckpt:
    ...   print(ckpt.resume(state, config={"seed": 0}))
    ...   ckpt.save(state, {"iteration": 0})
    None
    >>> with jaxprune.Checkpointer("ckpt") as ckpt:
    ...   print(ckpt.resume(state, config={"seed": 0})[1]["iteration"], ckpt.indices())
    0 [0]
  """

  def __init__(self, directory: str | os.PathLike, *, every: int | None = None, keep: int = 3,
               resume: bool | str = True):
    self.directory = check_directory(directory, "directory")
    if self.directory is None:
      raise ValueError("Checkpointer needs a directory; pass checkpointer=None for no "
                       "checkpoints")
    self.every = None if every is None else check_count("every", every)
    self.keep = check_count("keep", keep)
    self.allow_resume = check_resume(resume)
    self.config: dict = {}
    self._manager: ocp.CheckpointManager | None = None
    self._next = 0

  def __enter__(self) -> Checkpointer:
    self._manager = open_manager(self.directory, self.keep)
    latest = self._manager.latest_step()
    self._next = 0 if latest is None else latest + 1  # never write over a checkpoint
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def _open(self) -> ocp.CheckpointManager:
    if self._manager is None:
      raise RuntimeError("use the Checkpointer inside `with checkpointer:` (the run does)")
    return self._manager

  def _read(self, index: int, like: LoopState) -> tuple[LoopState, dict]:
    """Checkpoint `index` checked: DamagedCheckpointError if it does not read back intact,
    ValueError if it is another run's."""
    meta = self.read_meta(index)
    changed = run_settings.check_fingerprint(
        meta.get("config", {}), self.config, f"checkpoint {index} in {self.directory}",
        allow_changes=self.allow_resume == "with_changes")
    state = restore_state(self._open(), index, like, meta)
    if changed:
      logger.warning("resume='with_changes': %s continues under changed settings: %s",
                     self.directory, ", ".join(changed))
    return state, meta

  def indices(self) -> list[int]:
    """The checkpoints in the directory, oldest first (numbered from 0)."""
    return sorted(self._open().all_steps())

  def read_meta(self, index: int) -> dict:
    """Checkpoint `index`'s meta: position, history, settings, checksums (its digest
    checked; `DamagedCheckpointError` when it does not read back as written)."""
    return read_meta(self._open(), index)

  def resume(self, like: LoopState, config: dict) -> tuple[LoopState, dict] | None:
    """The newest intact checkpoint restored into `like`'s layout, with its meta; or
    None when the directory holds no checkpoint. `config` is this run's settings:
    checked against the checkpoint's, and recorded by every later `save`."""
    self.config = config
    indices = sorted(self._open().all_steps(), reverse=True)
    if not indices:
      return None
    if self.allow_resume is False:
      raise ValueError(
          f"{self.directory} already holds checkpoints; pass resume=True to continue "
          "that run, or use an empty directory (nothing was overwritten)"
      )
    skipped = []
    for index in indices:
      try:
        state, meta = self._read(index, like)
      except DamagedCheckpointError as err:
        skipped.append(f"checkpoint {index}: {err}")
        continue
      for reason in skipped:
        logger.warning("skipped %s in %s; resuming from checkpoint %d", reason,
                       self.directory, index)
      self._next = indices[0] + 1
      return state, meta
    raise ValueError(f"no checkpoint in {self.directory} reads back intact, so none can be "
                     f"resumed (nothing was deleted): {'; '.join(skipped)}. Move the directory "
                     "aside to start the run afresh.")

  def due(self, step: int) -> bool:
    """Whether to save after `step` steps of a phase (a multiple of `every`)."""
    return bool(self.every) and step % self.every == 0

  def save(self, state: LoopState, meta: dict) -> None:
    """Writes the next checkpoint (complete on return), with the run's settings.

    Raises:
      FloatingPointError: the state is unsound; nothing is written.
    """
    save(self._open(), self._next, state, {**meta, "config": self.config})
    self._next += 1


class NoCheckpoints:
  """What a run without a `Checkpointer` uses: nothing resumed, nothing saved."""

  directory = None
  every = None

  def __enter__(self) -> NoCheckpoints:
    return self

  def __exit__(self, *exc: Any) -> None:
    pass

  def resume(self, like: LoopState, config: dict) -> None:
    return None

  def due(self, step: int) -> bool:
    return False

  def save(self, state: LoopState, meta: dict) -> None:
    pass


def check_checkpointer(checkpointer: Any) -> Checkpointer | NoCheckpoints:
  """`checkpointer` if it is a `Checkpointer`, `NoCheckpoints()` for None, else a TypeError."""
  if checkpointer is None:
    return NoCheckpoints()
  if not isinstance(checkpointer, Checkpointer):
    raise TypeError(f"checkpointer must be a jaxprune.Checkpointer(directory, every=..., "
                    f"keep=..., resume=...) or None, got {checkpointer!r}")
  return checkpointer

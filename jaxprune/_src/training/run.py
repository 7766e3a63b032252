"""What `train` and `prune_retrain` share: their sources, state, phases and checkpoints.

Both drivers are a few phases of `retrain` over one `LoopState`: they read their
batches the same way (`train_source`, `eval_source`), start from the same state
(`start_state`, placed on the params' mesh when they are sharded), describe what
they compose (`composed_settings`: a distillation loss, a teacher) in their
checkpoints' fingerprints, and run each phase with the same hooks around the
user's (`run_phase`: a checkpoint when one is due, logging, closing the hooks when
a phase raises). What differs is what a driver does between phases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding

from jaxprune._src.io.sharding import onto_mesh
from jaxprune._src.training.checkpointing import Checkpointer, NoCheckpoints
from jaxprune._src.training.phases import (
  Hook,
  LoopState,
  check_hooks,
  close_hooks,
  log_losses,
  progress_bar,
  retrain,
)
from jaxprune._src.types import PyTree


def eval_source(eval_batches: Any) -> Callable[[], Iterable]:
  """`eval_batches` as a callable returning an iterable (checked re-iterable, non-empty)."""
  source = eval_batches if callable(eval_batches) else (lambda: eval_batches)
  first = source()
  if not callable(eval_batches) and iter(first) is first:
    raise TypeError(
        "eval_batches must be re-iterable (a list) or a callable returning an iterable; "
        "a one-shot iterator would be empty at the second evaluation"
    )
  if next(iter(first), None) is None:
    raise ValueError("eval_batches is empty: evaluation needs at least one batch")
  return source


def train_source(train_batches: Any) -> tuple[Callable[[int], Any], bool]:
  """(step -> batch, whether a resumed run gets the same batches)."""
  if callable(train_batches):
    return train_batches, True
  iterator = iter(train_batches)

  def next_batch(step: int):
    try:
      return next(iterator)
    except StopIteration:
      raise ValueError(f"train_batches ran out at global step {step}") from None

  return next_batch, False


def driver_hooks(hooks: Sequence[Hook] | None) -> tuple[Hook, ...]:
  """The user's hooks, checked; None is the default: a progress bar."""
  return (progress_bar(),) if hooks is None else check_hooks(hooks)


def mesh_of(tree: PyTree) -> Mesh | None:
  """The mesh of the first array of `tree` placed with a `NamedSharding`, or None."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def start_state(params: PyTree, opt_state: PyTree) -> LoopState:
  """The state a run starts from: its RNG is `key(0)` (a loss wanting another stream
  folds its own seed into the per-step key it gets); on a mesh when the params are
  (every array of the state global, also with several processes)."""
  state = LoopState(params, opt_state, jax.random.key_data(jax.random.key(0)))
  mesh = mesh_of(params)
  return state if mesh is None else onto_mesh(state, mesh)


def composed_settings(**parts: Any) -> dict[str, Any]:
  """What the user composed into a run that a resume must match: each part's
  `fingerprint()` (a `distillation_loss`'s blend, `with_teacher_logits`' teacher),
  by name; parts without one are left out."""
  return {name: part.fingerprint() for name, part in parts.items()
          if callable(getattr(part, "fingerprint", None))}


class Phases(NamedTuple):
  """What every phase of a run shares, built once."""

  train_step: Callable[..., Any]
  batch_at: Callable[[int], Any]
  checkpointer: Checkpointer | NoCheckpoints
  hooks: tuple[Hook, ...]


def run_phase(run: Phases, state: LoopState, steps: range, *, first_step: int, iteration: int,
              total: int, phase: str, save: Callable[[LoopState, int], None]) -> LoopState:
  """`retrain` over `steps` of a phase of `total` steps, with, after its guards (nothing
  unsound is saved): `save(state, step)` when a checkpoint is due before the phase's
  end (the driver saves at the end itself), so a hook that stops the run loses
  nothing; then the user's hooks and logging. Hooks with a `close` are closed when
  the phase ends or raises."""
  def checkpoint(report) -> None:
    if run.checkpointer.due(report.step) and not report.final:
      save(report.state, report.step)

  cadence = run.checkpointer.every
  try:
    return retrain(run.train_step, state, run.batch_at, steps, first_step=first_step,
                   iteration=iteration, report_every=(cadence,) if cadence else (),
                   hooks=(checkpoint, *run.hooks, log_losses), total=total, phase=phase)
  finally:
    close_hooks(run.hooks)

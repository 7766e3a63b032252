"""`train`: one checkpointed, resumable training run with any optimizer.

Sparse training from the start (`drop_and_grow`, `straight_through`, static masks) is
one phase of training, not a prune-retrain schedule: `train` runs it on the same core as
`prune_retrain` (`run`: `make_train_step`, `retrain` with its NaN guard and hooks, a
`Checkpointer`), compiled once. Step `g` gets `train_batches(g)` and the RNG folded with
`g`; a run killed at any point and started again with the same arguments resumes from
its latest checkpoint and ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import optax

from jaxprune._src.methods.masks import check_count
from jaxprune._src.training import checkpointing, run_settings
from jaxprune._src.training.metrics import Metric, check_metric, loss_metric
from jaxprune._src.training.phases import Hook, LoopState, check_array_leaves
from jaxprune._src.training.results import Evaluation, check_evaluation, evaluate
from jaxprune._src.training.run import (
  Phases,
  composed_settings,
  driver_hooks,
  eval_source,
  run_phase,
  start_state,
  train_source,
)
from jaxprune._src.training.steps import LossFn, make_eval_step, make_train_step
from jaxprune._src.transforms.optax_wrapper import pruned_states
from jaxprune._src.tree.mask_tree import float_part
from jaxprune._src.types import PyTree

logger = logging.getLogger("jaxprune")


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    params: the params after the last step.
    opt_state: the optimizer state after it (`get_masks` reads masks from it).
    evaluation: the evaluation after the last step (None without `eval_batches`).
    wall_seconds: time of this call (a resumed run counts only its own part).
  """

  params: PyTree
  opt_state: PyTree
  evaluation: Evaluation | None
  wall_seconds: float


def _resumed(ckpt: Any, state: LoopState, config: dict, steps: int,
             exact: bool) -> tuple[LoopState, int]:
  """(the state to start from, its step): the newest intact checkpoint's, or `state`'s."""
  resumed = ckpt.resume(state, config)
  if resumed is None:
    return state, 0
  state, meta = resumed
  if meta["step"] >= steps:
    logger.warning("%s holds this run finished (step %d of %d): returned as saved, nothing "
                   "trained; use another directory to train again", ckpt.directory,
                   meta["step"], steps)
  elif not exact:
    logger.warning("train_batches is an iterable: resume restarts it (approximate)")
  return state, meta["step"]


def train(
    params: PyTree,
    loss_fn: LossFn,
    train_batches: Callable[[int], Any] | Iterable,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    eval_batches: Iterable | Callable[[], Iterable] | None = None,
    metric: Metric = loss_metric,
    checkpointer: checkpointing.Checkpointer | None = None,
    hooks: Sequence[Hook] | None = None,
) -> TrainResult:
  """Trains `params` for `steps` steps of `optimizer`, checkpointed and resumable.

  Args:
    params: the initial params (any pytree; placed on a mesh if you want it there).
    loss_fn: `loss_fn(params, batch) -> scalar` (or `(loss, aux)`; an `rng`
      keyword gets a per-step key, `fold_in(key(0), step)`); a
      `distillation_loss` with `with_teacher_logits` batches distills.
    train_batches: `step -> batch` (exact resume) or an iterable (resume restarts it).
    optimizer: any optax transformation: `drop_and_grow(adam, masks,
      schedule=rigl_schedule(...), update_every=100)`, `gradually_pruned(...)`,
      `straight_through(...)`, `pruned(adam, masks)`, a plain optimizer.
    steps: number of training steps.
    eval_batches: evaluated once after the last step (optional); checked before the first
      step (traced on the first batch with the metric, every batch finite).
    metric: the figure the evaluation reports beside the loss.
    checkpointer: a `jaxprune.Checkpointer(directory, every=..., keep=...,
      resume=...)`: resumed from its newest intact checkpoint (refusing one of
      other settings: the schedule, masks, `update_every`, `steps`, compared by
      value; the wrapped optimizer's own hyperparameters are yours to keep, only
      its state's layout is compared), saved every `every` steps and after the
      last. None: no checkpoints.
    hooks: `hook(StepReport)` callables (see `prune_retrain`); None shows a progress
      bar, `[]` runs none.

  Returns:
    A `TrainResult`.

  Raises:
    ValueError: before any compute, for a bad count, an evaluation that fails or
      holds NaN, or a checkpoint of another configuration; or when no checkpoint
      in the directory reads back intact (naming each and why).
      FloatingPointError for a NaN/inf loss, or NaN/inf params or a NaN optimizer
      state behind a finite loss (the last good checkpoint is kept: nothing
      unsound is saved).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8)), "y": jnp.ones((16, 4))}
    >>> def loss_fn(params, batch):
    ...   h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    ...   return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)
    >>> batch_at_step = lambda step: batch   # the same batch at every step
    >>> where = jaxprune.select(params)
    >>> start = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.scores.random_score(0))
    >>> tx = jaxprune.sparse_training.drop_and_grow(
    ...     optax.adam(1e-2), start, schedule=jaxprune.sparse_training.rigl_schedule(0.3),
    ...     update_every=2)
    >>> result = jaxprune.train(params, loss_fn, batch_at_step, optimizer=tx, steps=4,
    ...                         checkpointer=jaxprune.Checkpointer("ckpt_rigl"), hooks=[])
    >>> float((result.params["fc1"]["kernel"] == 0).mean())
    0.5
  """
  check_array_leaves(params)
  steps = check_count("steps", steps)
  hooks, metric = driver_hooks(hooks), check_metric(metric)
  ckpt = checkpointing.check_checkpointer(checkpointer)
  eval_step = make_eval_step(loss_fn, metric)
  batch_at, exact = train_source(train_batches)
  evaluations = None if eval_batches is None else eval_source(eval_batches)
  started = time.perf_counter()
  with run_settings.recording() as notes:
    opt_state = optimizer.init(float_part(params))
  state = start_state(params, opt_state)
  config = run_settings.fingerprint(
      params, run="train", steps=steps, metric=metric.name,
      training=run_settings.describe_notes(notes, steps),
      masks=[s.packed_masks for s in pruned_states(opt_state)],
      composed=composed_settings(loss_fn=loss_fn, train_batches=train_batches),
      optimizer_state=run_settings.describe_state(opt_state))
  run = Phases(make_train_step(loss_fn, optimizer), batch_at, ckpt, hooks)
  with ckpt:
    state, first = _resumed(ckpt, state, config, steps, exact)
    if evaluations is not None:  # before the first step, not after the last
      check_evaluation(eval_step, params, evaluations())
    state = run_phase(run, state, range(first, steps), first_step=0, iteration=0, total=steps,
                      phase="train", save=lambda s, step: ckpt.save(s, {"step": step}))
    if first < steps:
      ckpt.save(state, {"step": steps})
  evaluation = None
  if evaluations is not None:
    evaluation = evaluate(eval_step, state.params, evaluations())
  return TrainResult(state.params, state.opt_state, evaluation, time.perf_counter() - started)

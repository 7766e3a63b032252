"""`train`: one checkpointed, resumable training run with any optimizer.

Sparse training from the start (`pruned` with drop and grow, `straight_through`,
`straight_through_masks`, static masks) is one phase of training, not a
prune-retrain schedule: `train` runs it from the same pieces as `prune_retrain`
(`make_train_step`, `retrain` with its NaN guard and hooks, `Checkpointer`),
compiled once. Step `g` gets `train_batches(g)` and the RNG folded with `g`; a
run killed at any point and started again with the same arguments resumes from
its latest checkpoint and ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import optax

from jaxprune._src.methods.masks import check_count, check_seed
from jaxprune._src.training import checkpointing, run_settings
from jaxprune._src.training.loop import eval_source, train_source
from jaxprune._src.training.metrics import Metric, check_metric, loss_metric
from jaxprune._src.training.results import Evaluation, check_evaluation, evaluate
from jaxprune._src.training.retraining import (
  Hook,
  LoopState,
  ProgressBar,
  check_array_leaves,
  check_hooks,
  log_losses,
  retrain,
)
from jaxprune._src.training.steps import LossFn, make_eval_step, make_train_step
from jaxprune._src.transforms.forward_masks import straight_through_view
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


def _resumed(ckpt: checkpointing.Checkpointer, state: LoopState, steps: int,
             exact: bool) -> tuple[LoopState, int]:
  """(the state to start from, its step): the newest intact checkpoint's, or `state`'s."""
  resumed = ckpt.resume(state)
  if resumed is None:
    return state, 0
  state, meta = resumed
  if meta["step"] >= steps:
    logger.warning("%s holds this run finished (step %d of %d): returned as saved, nothing "
                   "trained; use another checkpoint_dir to train again", ckpt.directory,
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
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = True,
    keep_checkpoints: int = 3,
    seed: int = 0,
    log_every: int = 50,
    metric: Metric = loss_metric,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
) -> TrainResult:
  """Trains `params` for `steps` steps of `optimizer`, checkpointed and resumable.

  Args:
    params: the initial params (any pytree).
    loss_fn: `loss_fn(params, batch) -> scalar` (or `(loss, aux)`; an `rng`
      keyword gets a per-step key).
    train_batches: `step -> batch` (exact resume) or an iterable (resume restarts it).
    optimizer: any optax transformation: `pruned(adam, masks, schedule=rigl_schedule(...),
      update_every=100)`, `straight_through(...)`, `straight_through_masks(...)` (the
      forward then runs on `straight_through_view`), a plain optimizer.
    steps: number of training steps.
    eval_batches: evaluated once after the last step (optional), on what the forward
      runs on (`straight_through_view(params, opt_state)`); checked before the first
      step (traced on the first batch with the metric, every batch finite).
    checkpoint_dir: orbax checkpoints go here (None: none), created and checked
      writable before any compute; resumed when it holds one.
    checkpoint_every: save every this many steps (and always after the last).
    resume: continue from the newest intact checkpoint in `checkpoint_dir` (True),
      refuse a directory holding checkpoints (False), or `"with_changes"`: continue
      although the run's settings changed (the schedule, masks, `update_every`,
      `steps`, the seed...), the changes logged. The settings are compared by
      value; the wrapped optimizer's own hyperparameters (learning rate) are yours
      to keep, only its state's layout is compared.
    keep_checkpoints: how many checkpoints orbax keeps (>= 1).
    seed: seeds the RNG handed to `loss_fn(..., rng=...)` (an integer >= 0).
    log_every: steps between report points (NaN guard, logging, hooks, the bar).
    metric: the figure the evaluation reports beside the loss.
    hooks: extra `retrain` hooks, called at every report point.
    progress: a tqdm bar (process 0 only).

  Returns:
    A `TrainResult`.

  Raises:
    ValueError: before any compute, for a bad count, seed or checkpoint directory,
      an evaluation that fails or holds NaN, or a checkpoint of another
      configuration; or when no checkpoint in the directory reads back intact
      (naming each and why). FloatingPointError for a NaN/inf loss, or NaN/inf
      params or a NaN optimizer state behind a finite loss (the last good
      checkpoint is kept: nothing unsound is saved).

  Example::

    >>> start = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.scores.random_score(0))
    >>> tx = jaxprune.pruned(optax.adam(1e-2), start,
    ...                      schedule=jaxprune.sparse_training.rigl_schedule(0.3),
    ...                      update_every=2)
    >>> result = jaxprune.train(params, loss_fn, batch_at_step, optimizer=tx, steps=4,
    ...                         checkpoint_dir="ckpt_rigl", progress=False)
    >>> float((result.params["fc1"]["kernel"] == 0).mean())
    0.5
  """
  check_array_leaves(params)
  steps = check_count("steps", steps)
  every = None if checkpoint_every is None else check_count("checkpoint_every", checkpoint_every)
  log_every, hooks = check_count("log_every", log_every), check_hooks(hooks)
  keep, seed = check_count("keep_checkpoints", keep_checkpoints), check_seed(seed)
  resume = checkpointing.check_resume(resume)
  checkpoint_dir = checkpointing.check_directory(checkpoint_dir)
  metric = check_metric(metric)
  eval_step = make_eval_step(loss_fn, metric)
  batch_at, exact = train_source(train_batches)
  evaluations = None if eval_batches is None else eval_source(eval_batches)
  started = time.perf_counter()
  with run_settings.recording() as notes:
    opt_state = optimizer.init(float_part(params))
  state = LoopState(params, opt_state, jax.random.key_data(jax.random.key(seed)))
  config = run_settings.fingerprint(
      params, run="train", steps=steps, seed=seed, metric=metric.name,
      training=run_settings.describe_notes(notes, steps),
      masks=[s.packed_masks for s in pruned_states(opt_state)],
      optimizer_state=run_settings.describe_state(opt_state))
  with checkpointing.Checkpointer(checkpoint_dir, config, keep=keep, resume=resume,
                                  every=every) as ckpt:
    state, first = _resumed(ckpt, state, steps, exact)
    if evaluations is not None:  # before the first step, not after the last
      check_evaluation(eval_step, params, evaluations())

    def checkpoint(report) -> None:
      if ckpt.due(report.step) and not report.final:
        ckpt.save(report.state, {"step": report.step})

    cadences = (log_every,) + ((every,) if ckpt.active and every else ())
    with ProgressBar(steps, initial=first, desc="train", enabled=progress) as bar:
      state = retrain(make_train_step(loss_fn, optimizer), state, batch_at, range(first, steps),
                      report_every=cadences, hooks=[checkpoint, *hooks, log_losses, bar])
    if first < steps:
      ckpt.save(state, {"step": steps})
  evaluation = None
  if evaluations is not None:
    # A `straight_through_masks` run is judged as the sparse model it runs forward.
    evaluation = evaluate(eval_step, straight_through_view(state.params, state.opt_state),
                          evaluations())
  return TrainResult(state.params, state.opt_state, evaluation, time.perf_counter() - started)

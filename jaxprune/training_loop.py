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

from jaxprune import checkpointing
from jaxprune.forward_masks import straight_through_view
from jaxprune.loop import eval_source, train_source
from jaxprune.mask_tree import float_part
from jaxprune.masks import check_count
from jaxprune.metrics import Metric, check_metric, loss_metric
from jaxprune.results import Evaluation, evaluate
from jaxprune.retraining import Hook, LoopState, ProgressBar, check_hooks, log_losses, retrain
from jaxprune.steps import LossFn, make_eval_step, make_train_step

PyTree = Any
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
    resume: bool = True,
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
      runs on (`straight_through_view(params, opt_state)`).
    checkpoint_dir: orbax checkpoints go here (None: none); resumed when it holds one.
    checkpoint_every: save every this many steps (and always after the last).
    resume: continue from the latest checkpoint in `checkpoint_dir`.
    keep_checkpoints: how many checkpoints orbax keeps.
    seed: seeds the RNG handed to `loss_fn(..., rng=...)`.
    log_every: steps between report points (NaN guard, logging, hooks, the bar).
    metric: the figure the evaluation reports beside the loss.
    hooks: extra `retrain` hooks, called at every report point.
    progress: a tqdm bar (process 0 only).

  Returns:
    A `TrainResult`.

  Raises:
    ValueError: before any compute, for a bad count or a checkpoint of another
      configuration; FloatingPointError for a NaN/inf loss (the last good
      checkpoint is kept).

  Example::

    >>> start = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.random_score(0))
    >>> tx = jaxprune.pruned(optax.adam(1e-2), start, schedule=jaxprune.rigl_schedule(0.3),
    ...                      update_every=2)
    >>> result = jaxprune.train(params, loss_fn, batch_at_step, optimizer=tx, steps=4,
    ...                         checkpoint_dir="ckpt_rigl", progress=False)
    >>> float((result.params["fc1"]["kernel"] == 0).mean())
    0.5
  """
  steps = check_count("steps", steps)
  every = None if checkpoint_every is None else check_count("checkpoint_every", checkpoint_every)
  log_every, hooks = check_count("log_every", log_every), check_hooks(hooks)
  metric = check_metric(metric)
  batch_at, exact = train_source(train_batches)
  evaluations = None if eval_batches is None else eval_source(eval_batches)
  started = time.perf_counter()
  state = LoopState(params, optimizer.init(float_part(params)),
                    jax.random.key_data(jax.random.key(seed)))
  config = checkpointing.fingerprint(
      params, run="train", steps=steps, seed=seed, metric=metric.name,
      optimizer_state=checkpointing.describe_state(state.opt_state))
  with checkpointing.Checkpointer(checkpoint_dir, config, keep=keep_checkpoints,
                                  resume=resume, every=every) as ckpt:
    resumed = ckpt.resume(state)
    first = 0
    if resumed is not None:
      state, meta = resumed
      first = meta["step"]
      if not exact:
        logger.warning("train_batches is an iterable: resume restarts it (approximate)")

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
    evaluation = evaluate(make_eval_step(loss_fn, metric),
                          straight_through_view(state.params, state.opt_state), evaluations(),
                          metric)
  return TrainResult(state.params, state.opt_state, evaluation, time.perf_counter() - started)

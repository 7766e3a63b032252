"""The prune-retrain loop: prune to each of a list of targets, retrain with masks held.

For each iteration `i`:

1. evaluate (iteration 0: the dense baseline; later ones reuse the previous
   after-retrain figure, the params being the same);
2. `prune_step` to `targets[i]` (previous masks respected) and evaluate;
3. `retrain` for `retrain_steps[i]` steps with `pruned(optimizer)` holding the
   masks (their one home is its state);
4. evaluate, append an `IterationRecord`, checkpoint.

`prune_retrain` is built from public pieces (`prune_step`, `make_train_step`,
`retrain` and its hooks, `Checkpointer`), which a user can run by hand in a loop of
their own, and shares its core with `train` (`run`). The train step and the eval step are each
compiled once for the whole run; the Python loop only dispatches them, and reads
the device at report points, at checkpoints and at the end of each phase.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._src.io.sharding import onto_mesh, place_masks
from jaxprune._src.methods.masks import is_count
from jaxprune._src.methods.targets import (
  GivenMasks,
  Target,
  as_target,
  needs_step_gradients,
  with_gradients,
)
from jaxprune._src.training import checkpointing, run_settings
from jaxprune._src.training.metrics import Metric, check_metric, loss_metric
from jaxprune._src.training.phases import Hook, LoopState, check_array_leaves
from jaxprune._src.training.reporting import sparsity_report
from jaxprune._src.training.results import (
  Evaluation,
  IterationRecord,
  PruneRetrainResult,
  check_evaluation,
  evaluate,
  pruned_fraction,
)
from jaxprune._src.training.run import (
  Phases,
  composed_settings,
  driver_hooks,
  eval_source,
  mesh_of,
  run_phase,
  start_state,
  train_source,
)
from jaxprune._src.training.steps import (
  LossFn,
  make_eval_step,
  make_gradient_step,
  make_train_step,
  prune_step,
)
from jaxprune._src.transforms.drop_grow import DropAndGrow
from jaxprune._src.transforms.optax_wrapper import get_masks, pruned, pruned_states, replace_masks
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  all_kept,
  check_masks,
  check_selection,
  float_part,
  resolve_where,
  slots,
  where_tree,
)
from jaxprune._src.types import PyTree

logger = logging.getLogger("jaxprune")


# ----------------------------------------------------------------------------- inputs


def _check_entry(entry: Any, name: str) -> Target:
  if isinstance(entry, DropAndGrow):
    raise ValueError(
        f"{name} = {entry}: drop and grow moves kept weights and prunes none; it is sparse "
        "training, run with jaxprune.train(optimizer=jaxprune.sparse_training.drop_and_grow("
        "opt, masks, schedule=jaxprune.sparse_training.rigl_schedule(...), update_every=...))")
  return as_target(entry, name)


def _check_given(targets: list[Target], params: PyTree, flags: list[bool]) -> None:
  """`GivenMasks` entries must be masks of `params` exactly where `where` selects."""
  for i, target in enumerate(targets):
    if isinstance(target, GivenMasks):
      given = check_masks(target.given, params, f"targets[{i}] (GivenMasks)")
      check_selection(given, flags, params, f"targets[{i}] = GivenMasks")


def _check_targets(entries: Sequence[Any]) -> list[Target]:
  if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
    raise TypeError(f"targets must be a finite sequence of sparsities, got {entries!r}")
  entries = list(entries)
  targets = [_check_entry(entry, f"targets[{i}]") for i, entry in enumerate(entries)]
  if not targets:
    raise ValueError("targets is empty: give at least one target sparsity")
  for i in range(1, len(targets)):
    if targets[i].sparsity < targets[i - 1].sparsity:
      raise ValueError(
          f"targets must not decrease: targets[{i}] = {entries[i]!r} comes after "
          f"targets[{i - 1}] = {entries[i - 1]!r}, and masks never revive a pruned weight"
      )
  return targets


def _run_prune(prune, closed: dict, params, opt_state, target: Target):
  """`prune(params, opt_state, target)` compiled once per kind of target.

  A pytree target goes in as an argument with its Python floats as float32 (one
  compilation for every sparsity); a target that is not a pytree is closed over,
  one compilation per distinct (hashable) target of the run, kept in `closed`.
  """
  if jax.tree.leaves(target) == [target]:  # not a pytree (an NM, with no leaves, is one)
    def compile_it():
      return jax.jit(functools.partial(prune.__wrapped__, target=target))

    try:
      compiled = closed.get(target)
    except TypeError:  # unhashable: compiled for this call
      return compile_it()(params, opt_state)
    if compiled is None:
      compiled = closed[target] = compile_it()
    return compiled(params, opt_state)
  target = jax.tree.map(lambda x: jnp.float32(x) if isinstance(x, float) else x, target)
  return prune(params, opt_state, target)


def _check_budgets(retrain_steps: int | Sequence[int], n: int) -> list[int]:
  if is_count(retrain_steps):
    budgets = [retrain_steps] * n
  elif isinstance(retrain_steps, (Sequence, np.ndarray)) and not isinstance(retrain_steps, str):
    budgets = [b.item() if isinstance(b, np.generic) else b for b in retrain_steps]
  else:
    raise TypeError(
        f"retrain_steps must be an int or a sequence of ints (one per iteration), "
        f"got {retrain_steps!r}"
    )
  if len(budgets) != n:
    raise ValueError(f"retrain_steps has {len(budgets)} entries for {n} targets")
  for i, b in enumerate(budgets):
    if not is_count(b) or b < 0:
      raise ValueError(f"retrain_steps[{i}] = {b!r}: must be an integer >= 0")
  return [int(b) for b in budgets]


# ----------------------------------------------------------------------------- the loop


class _Run(NamedTuple):
  """What every iteration of `prune_retrain` needs, built once."""

  phases: Phases
  tx: optax.GradientTransformation
  evaluate: Callable[[PyTree], Evaluation]
  prune: Callable[..., Any]
  targets: list[Target]
  budgets: list[int]
  restart_optimizer: bool
  closed: dict  # target -> its compiled prune, for targets that are not pytrees
  gradients: Callable[..., PyTree]  # for targets scoring by the gradients at the prune
  metric: Metric


def _check_optimizer(optimizer: Any, params: PyTree) -> None:
  """Refuses an optimizer that is already `pruned`: the loop wraps it, and a second
  set of masks inside would prune on its own, unreported."""
  if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
    raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
  if pruned_states(jax.eval_shape(optimizer.init, float_part(params))):
    raise ValueError(
        "optimizer already holds a jaxprune.pruned state; pass the plain optimizer "
        "(prune_retrain wraps it in pruned itself, and its masks are the only ones)"
    )


def _prune_phase(run: _Run, state, i: int, history: list[dict]) -> tuple[Any, dict]:
  """Prune to `targets[i]` and evaluate: (state, the iteration's record so far, as JSON)."""
  params, opt_state, rng = state
  before = (Evaluation(**history[-1]["after_retrain"]) if history
            else run.evaluate(params))
  target = run.targets[i]
  if needs_step_gradients(target):
    # The gradient of the batch of the iteration's first retraining step: a pure
    # function of the run's state, so a resumed run prunes alike.
    first = sum(run.budgets[:i])
    target = with_gradients(target, run.gradients(params, run.phases.batch_at(first), rng,
                                                  first))
  params, opt_state = _run_prune(run.prune, run.closed, params, opt_state, target)
  masks = get_masks(opt_state)
  mesh = mesh_of(params)
  if mesh is not None:  # Keep masks exactly on their params' shardings.
    masks = place_masks(masks, params)
  if run.restart_optimizer:
    opt_state = run.tx.init(float_part(params))
    if mesh is not None:  # its scalars on the mesh too, as every array of the state
      opt_state = onto_mesh(opt_state, mesh)
  opt_state = replace_masks(opt_state, masks)
  row = {"iteration": i, "target": str(target), "target_sparsity": float(target.sparsity),
         "achieved_sparsity": pruned_fraction(masks), "before_prune": before._asdict(),
         "after_prune": run.evaluate(params)._asdict()}
  return LoopState(params, opt_state, rng), row


def _iteration(run: _Run, state, meta: dict, i: int, ckpt) -> LoopState:
  """Iteration `i`: prune (unless resuming inside its retraining), retrain, evaluate,
  record and checkpoint. Returns the state after it; `meta` is updated in place."""
  resuming = meta["phase"] == "retrain" and meta["iteration"] == i
  row = dict(meta["row"]) if resuming else {}
  started = time.perf_counter() - row.get("wall_seconds", 0.0)
  if not resuming:
    state, row = _prune_phase(run, state, i, meta["history"])

  def save_mid_phase(mid_state, step: int) -> None:
    row["wall_seconds"] = time.perf_counter() - started
    meta.update(phase="retrain", iteration=i, step=step, row=row)
    ckpt.save(mid_state, meta)

  first, j0 = sum(run.budgets[:i]), meta["step"] if resuming else 0
  state = run_phase(run.phases, state, range(j0, run.budgets[i]), first_step=first, iteration=i,
                    total=run.budgets[i], save=save_mid_phase,
                    phase=f"retrain {i + 1}/{len(run.targets)} @ {run.targets[i]}")
  row.update(after_retrain=run.evaluate(state.params)._asdict(), retrain_steps=run.budgets[i],
             wall_seconds=time.perf_counter() - started)
  record = IterationRecord.from_json(row)
  meta["history"].append(record.to_json())
  logger.info("iteration %d: sparsity %.2f%% (target %s), %s %.4f -> %.4f (pruned) -> "
              "%.4f (retrained)", i, 100 * record.achieved_sparsity, record.target,
              run.metric.name, record.before_prune.metric, record.after_prune.metric,
              record.after_retrain.metric)
  meta.update(phase="prune", iteration=i + 1, step=0, row={})
  ckpt.save(state, meta)
  return state


def _log_resumed(meta: dict, iterations: int, directory: str, exact_batches: bool) -> None:
  if meta["iteration"] >= iterations:
    logger.warning("%s holds this run finished (%d iterations): returned as saved, nothing "
                   "retrained; use another checkpoint directory to run again", directory,
                   iterations)
    return
  logger.info("resumed: iteration %d, phase %s, step %d",
              meta["iteration"], meta["phase"], meta["step"])
  if not exact_batches:
    logger.warning("train_batches is an iterable: resume restarts it (approximate)")


def prune_retrain(
    params: PyTree,
    loss_fn: LossFn,
    train_batches: Callable[[int], Any] | Iterable,
    eval_batches: Iterable | Callable[[], Iterable],
    *,
    optimizer: optax.GradientTransformation,
    targets: Sequence[float | str | Target],
    where: Where,
    retrain_steps: int | Sequence[int],
    restart_optimizer: bool = True,
    metric: Metric = loss_metric,
    checkpointer: checkpointing.Checkpointer | None = None,
    hooks: Sequence[Hook] | None = None,
) -> PruneRetrainResult:
  """Prunes to each of `targets` in turn, retraining after each, and returns the
  pruned model with its figures.

  What a run composes stays outside it: distill by passing
  `loss_fn=jaxprune.distillation_loss(loss_fn, apply_fn, ...)` with
  `train_batches=jaxprune.training.with_teacher_logits(batches, apply_fn, dense)`
  (evaluation batches stay plain, so evaluations report `loss_fn` alone); run on
  a mesh by placing the params (`jaxprune.sharding.param_shardings`) and the
  batches (`jaxprune.sharding.place_batch`) yourself: the masks follow their
  params' shardings and every array of the state is put on the params' mesh.

  Args:
    params: trained dense params (any pytree).
    loss_fn: `loss_fn(params, batch) -> scalar` mean loss (or `(loss, aux)`); an
      `rng` keyword, if it has one, gets a per-step key (`fold_in(key(0), step)`:
      fold your own seed into it for another stream).
    train_batches: `step -> batch`, a pure function of the global retraining step
      (0, 1, ... across the whole run), which makes resume exact. An iterable is
      accepted too; resume then continues from wherever a fresh iterator starts
      (approximate).
    eval_batches: a finite re-iterable of batches, or a callable returning one.
    optimizer: the optax optimizer to retrain with; it is wrapped in `pruned`.
    targets: one pruning target per iteration, never decreasing in sparsity: a
      sparsity in [0, 1) (`Prune(s)`: per leaf by `|w|`; a list, or
      `jaxprune.schedules.exponential_targets(...)`), an N:M pattern `"2:4"`
      (`NM(2, 4)`, along axis -2), or any `Target` (`NM(2, 4, axis=-1)`,
      `Prune(0.9, scope="global")`, `Prune(0.9, score=..., distribution=...)`,
      your own): `[0.25, "2:4"]` ends in 2:4 sparsity, previous masks respected.
      A `Prune(s, score=saliency_score())` ranks `|w * g|` by the gradient of the
      retraining loss on the batch of the iteration's first retraining step.
    where: the targeted leaves (bool pytree from `select`, or a callable).
    retrain_steps: steps per iteration: an int, or one budget per iteration.
    restart_optimizer: re-initialise the optimizer state after every prune, so
      moments and the learning-rate schedule restart each iteration (learning-rate
      rewinding). False keeps one state, and one schedule, across the whole run.
    metric: the figure evaluations report beside the loss
      (`jaxprune.training.perplexity` for a language model,
      `jaxprune.training.aux_metric("accuracy")`, your own `Metric`); the default
      is the loss itself.
    checkpointer: a `jaxprune.Checkpointer(directory, every=..., keep=...,
      resume=...)`: the run resumes from its newest intact checkpoint (refusing one
      written with other settings, compared by value), checkpoints after every
      iteration and every `every` retraining steps. None: no checkpoints.
    hooks: `hook(StepReport)` callables watching each retraining phase, after the
      NaN guard and any checkpoint due: a hook with an `every` (`every(n, f)`,
      `progress_bar(every=n)`) runs every `n` steps and at the phase's end, one
      without at every report point. A logger, an early stop (raise), a metrics
      sink. None (the default) shows a progress bar; `[]` runs none (then the NaN
      guard reads the losses at each phase's end and checkpoint only).

  Returns:
    A `PruneRetrainResult`.

  Raises:
    ValueError: before any compute for empty or out-of-range targets, a
      target the loop cannot run (drop and grow, given masks that do not fit
      the params), negative budgets, empty `eval_batches` or an evaluation that
      fails or holds NaN, a `where` selecting nothing, a checkpoint of another
      configuration, or no checkpoint that reads back intact (naming each);
      FloatingPointError when a retraining loss is NaN/inf, or the
      params/optimizer state are behind a finite loss (naming iteration, step and
      leaves; the last good checkpoint is kept).

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
    >>> eval_batches = [batch]
    >>> result = jaxprune.prune_retrain(
    ...     params, loss_fn, batch_at_step, eval_batches,
    ...     optimizer=optax.adamw(1e-3),
    ...     targets=jaxprune.schedules.exponential_targets(0.2, 0.8, 3),
    ...     where=jaxprune.select(params), retrain_steps=2,
    ...     checkpointer=jaxprune.Checkpointer("ckpt"))
    >>> print(result.summary())
    iter        target  achieved     loss before  after prune  after retrain   steps   seconds
    ------------------------------------------------------------------------------------------
       0        20.00%    19.79%  ...       2  ...
       1        40.00%    40.62%  ...       2  ...
       2        80.00%    80.21%  ...       2  ...
    <BLANKLINE>
    dense loss ... -> final ...
    sparsity: targeted leaves 80.21%, whole model 74.04%
    compression (bitmask + nonzeros): targeted 4.36x, whole model 3.47x bytes; ...
  """
  targets = _check_targets(targets)
  budgets = _check_budgets(retrain_steps, len(targets))
  hooks, metric = driver_hooks(hooks), check_metric(metric)
  ckpt = checkpointing.check_checkpointer(checkpointer)
  check_array_leaves(params)
  _check_optimizer(optimizer, params)
  flags = resolve_where(where, params)
  where = where_tree(params, flags)
  _check_given(targets, params, flags)
  evaluations, (batch_at, exact_batches) = eval_source(eval_batches), train_source(train_batches)
  eval_step = make_eval_step(loss_fn, metric)
  start = all_kept(params, flags)
  tx = pruned(optimizer, start if mesh_of(params) is None else place_masks(start, params))
  # Targets are pytrees: a Prune's sparsity is traced, so its iterations
  # share one compilation; each distinct static target (an NM pattern) gets its own.
  run = _Run(Phases(make_train_step(loss_fn, tx), batch_at, ckpt, hooks), tx,
             lambda p: evaluate(eval_step, p, evaluations(), metric),
             jax.jit(functools.partial(prune_step, where=where)), targets, budgets,
             restart_optimizer, {}, make_gradient_step(loss_fn), metric)
  state = start_state(params, tx.init(float_part(params)))
  config = run_settings.fingerprint(
      params, targets=targets, retrain_steps=budgets,
      selected=[p for p, flag in zip(slots(params).paths, flags) if flag],
      restart_optimizer=restart_optimizer, metric=metric.name,
      composed=composed_settings(loss_fn=loss_fn, train_batches=train_batches),
      optimizer_state=run_settings.describe_state(state.opt_state))
  # Where the run stands: what a checkpoint's `meta` records.
  meta: dict[str, Any] = {"iteration": 0, "phase": "prune", "step": 0, "history": [], "row": {}}
  with ckpt:
    resumed = ckpt.resume(state, config)
    if resumed is not None:
      state, meta = resumed
      _log_resumed(meta, len(targets), ckpt.directory, exact_batches)
    if meta["iteration"] < len(targets):  # before any compute of the run
      check_evaluation(eval_step, params, evaluations())
    for i in range(meta["iteration"], len(targets)):
      state = _iteration(run, state, meta, i, ckpt)
  return PruneRetrainResult(
      params=state.params, opt_state=state.opt_state, metric=metric,
      history=[IterationRecord.from_json(row) for row in meta["history"]],
      report=sparsity_report(state.params, where))

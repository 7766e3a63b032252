"""The prune-retrain loop: prune to each target of a schedule, retrain with masks held.

For each iteration `i` of the schedule:

1. evaluate (iteration 0: the dense baseline; later ones reuse the previous
   after-retrain figure, the params being the same);
2. prune to `schedule[i]` with `magnitude_masks(previous=masks)` and evaluate;
3. retrain `retrain_steps[i]` steps with `pruned(optimizer)` holding the masks;
4. evaluate, append a history row, checkpoint.

The train step and the eval step are each compiled once for the whole run; the
Python loop only dispatches them, and reads the device only where progress is
shown, at checkpoints and at the end of each phase.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxprune import checkpointing
from jaxprune.distillation import distillation_loss, takes_rng, teacher_logits_fn
from jaxprune.leaf_selection import Where
from jaxprune.mask_tree import (
  all_kept,
  float_part,
  merge_float_part,
  resolve_where,
  selected_masks,
  slots,
  where_tree,
)
from jaxprune.masks import Scope, apply_masks, check_scope
from jaxprune.optax_wrapper import pruned, replace_masks
from jaxprune.reporting import SparsityReport, sparsity_report
from jaxprune.sharding import ParamLayout, param_shardings, place_batch, place_masks
from jaxprune.targets import Magnitude, Target, as_target

PyTree = Any
LossFn = Callable[..., Any]
logger = logging.getLogger("jaxprune")


# ----------------------------------------------------------------------------- steps


def _loss_and_aux(loss_fn: LossFn, params, batch, rng):
  out = loss_fn(params, batch, rng=rng) if rng is not None else loss_fn(params, batch)
  if isinstance(out, tuple):
    return out[0], out[1]
  return out, None


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, donate: bool = False
) -> Callable[..., tuple[PyTree, PyTree, jax.Array]]:
  """A jitted `step(params, opt_state, batch, rng_data, step) -> (params, opt_state, loss)`.

  `loss_fn(params, batch)` returns a scalar mean loss, or `(loss, aux)`. If it has
  a parameter named `rng`, it is called with `rng=fold_in(wrap_key_data(rng_data),
  step)`, so dropout noise is a pure function of the step (exact resume).

  Only floating-point leaves are differentiated and updated; other leaves (int
  step counters, tables) pass through unchanged. The optimizer state must then be
  `optimizer.init(jaxprune.mask_tree.float_part(params))` (the same as
  `optimizer.init(params)` when every leaf is a float array).

  Args:
    loss_fn: the loss.
    optimizer: any optax transformation (typically `pruned(...)`); it gets `params`.
    donate: donate params and optimizer state buffers (saves memory on
      accelerators; do not reuse the inputs afterwards).

  Example::

    >>> step = jaxprune.make_train_step(loss_fn, jaxprune.pruned(optax.adam(1e-3), masks))
    >>> params, opt_state, loss = step(params, opt_state, batch, rng_data, 0)
  """
  wants_rng = takes_rng(loss_fn)

  def step(params, opt_state, batch, rng_data, step_index):
    rng = None
    if wants_rng:
      rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step_index)
    trainable = float_part(params)
    grad_fn = jax.value_and_grad(
        lambda t: _loss_and_aux(loss_fn, merge_float_part(params, t), batch, rng), has_aux=True
    )
    (loss, _), grads = grad_fn(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return merge_float_part(params, optax.apply_updates(trainable, updates)), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable[[PyTree, Any], jax.Array]:
  """A jitted `eval_step(params, batch) -> loss`.

  Evaluation is deterministic: a `loss_fn` with an `rng` parameter gets `rng=None`
  (switch dropout off on None).
  """
  if takes_rng(loss_fn):
    return jax.jit(lambda params, batch: _loss_and_aux(
        lambda p, b: loss_fn(p, b, rng=None), params, batch, None)[0])
  return jax.jit(lambda params, batch: _loss_and_aux(loss_fn, params, batch, None)[0])


def prune_step(
    params: PyTree,
    masks: PyTree,
    opt_state: PyTree,
    target: Target | float | str,
    where: Where,
    scope: Scope = "layer",
) -> tuple[PyTree, PyTree, PyTree]:
  """One prune: new masks (previous respected), params zeroed, masks put in `opt_state`.

  `target` is a pruning method (`Magnitude(0.5)`, `NM(2, 4)`, any `Target`), or a
  float (`Magnitude(target, scope)`) or `"n:m"`. `masks` may be None for the first
  prune. Jittable: a `Magnitude`'s sparsity may be traced, so one compilation
  serves a whole schedule.

  Returns:
    `(params, masks, opt_state)`.

  Example::

    >>> params, masks, opt_state = jaxprune.prune_step(params, masks, opt_state, 0.5, where)
  """
  masks = as_target(target, scope).masks(params, where, previous=masks)
  return apply_masks(params, masks), masks, replace_masks(opt_state, masks)


# ----------------------------------------------------------------------------- inputs


def _check_schedule(schedule: Sequence[Any], scope: Scope) -> list[Target]:
  if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
    raise TypeError(f"schedule must be a finite sequence of sparsities, got {schedule!r}")
  schedule = list(schedule)
  targets = [as_target(entry, scope, f"schedule[{i}]") for i, entry in enumerate(schedule)]
  if not targets:
    raise ValueError("schedule is empty: give at least one target sparsity")
  for i in range(1, len(targets)):
    if targets[i].sparsity < targets[i - 1].sparsity:
      raise ValueError(
          f"schedule must not decrease: schedule[{i}] = {schedule[i]!r} comes after "
          f"schedule[{i - 1}] = {schedule[i - 1]!r}, and masks never revive a pruned weight"
      )
  return targets


def _run_prune(prune, params, masks, opt_state, target: Target):
  """`prune(params, masks, opt_state, target)` compiled once per kind of target.

  A pytree target goes in as an argument with its Python floats as float32 (one
  compilation for every sparsity); a target that is not a pytree is closed over
  (one compilation for it).
  """
  if jax.tree.leaves(target) == [target]:  # not a pytree (an NM, with no leaves, is one)
    closed = functools.partial(prune.__wrapped__, target=target)
    return jax.jit(closed)(params, masks, opt_state)
  target = jax.tree.map(lambda x: jnp.float32(x) if isinstance(x, float) else x, target)
  return prune(params, masks, opt_state, target)


def _describe(target: Target) -> float | str:
  """A schedule entry as the checkpoint fingerprint and the history record it."""
  if isinstance(target, Magnitude) and target.scope == "layer":
    return float(target.sparsity)
  return str(target)


def _is_count(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_budgets(retrain_steps: int | Sequence[int], n: int) -> list[int]:
  if _is_count(retrain_steps):
    budgets = [retrain_steps] * n
  elif isinstance(retrain_steps, (Sequence, np.ndarray)) and not isinstance(retrain_steps, str):
    budgets = [b.item() if isinstance(b, np.generic) else b for b in retrain_steps]
  else:
    raise TypeError(
        f"retrain_steps must be an int or a sequence of ints (one per iteration), "
        f"got {retrain_steps!r}"
    )
  if len(budgets) != n:
    raise ValueError(f"retrain_steps has {len(budgets)} entries for {n} schedule iterations")
  for i, b in enumerate(budgets):
    if not _is_count(b) or b < 0:
      raise ValueError(f"retrain_steps[{i}] = {b!r}: must be an integer >= 0")
  return [int(b) for b in budgets]


def _eval_source(eval_batches) -> Callable[[], Iterable]:
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


def _train_source(train_batches) -> tuple[Callable[[int], Any], bool]:
  if callable(train_batches):
    return train_batches, True
  iterator = iter(train_batches)

  def next_batch(step: int):
    try:
      return next(iterator)
    except StopIteration:
      raise ValueError(f"train_batches ran out at global step {step}") from None

  return next_batch, False


# ----------------------------------------------------------------------------- result


def _perplexity(loss: float) -> float:
  return math.exp(loss) if loss < 700 else math.inf


@dataclasses.dataclass(frozen=True)
class PruneRetrainResult:
  """What `prune_retrain` returns: the pruned model and honest figures.

  Losses are mean nats per token of `eval_batches`; perplexity is `exp(loss)`;
  `perplexity_degradation = final_perplexity / dense_perplexity - 1`.
  `achieved_sparsity` is the fraction of targeted weights the masks prune (as in
  every history row); `overall_sparsity` the fraction of zeros over the whole
  model; `report` has per-leaf zero counts and compression ratios (a kept weight
  that is exactly 0 counts as a zero there, not as pruned).
  """

  params: PyTree
  masks: PyTree
  opt_state: PyTree
  history: list[dict[str, Any]]
  dense_loss: float
  final_loss: float
  report: SparsityReport

  @property
  def dense_perplexity(self) -> float:
    return _perplexity(self.dense_loss)

  @property
  def final_perplexity(self) -> float:
    return _perplexity(self.final_loss)

  @property
  def perplexity_degradation(self) -> float:
    return self.final_perplexity / self.dense_perplexity - 1.0

  @property
  def achieved_sparsity(self) -> float:
    return pruned_fraction(self.masks)

  @property
  def overall_sparsity(self) -> float:
    return self.report.overall_sparsity

  def summary(self) -> str:
    """A readable table of the whole run."""
    head = (
        f"{'iter':>4}  {'target':>7}  {'achieved':>8}  {'ppl before':>10}  "
        f"{'after prune':>11}  {'after retrain':>13}  {'steps':>6}  {'seconds':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in self.history:
      lines.append(
          f"{r['iteration']:>4}  {r.get('pattern') or format(r['target_sparsity'], '.2%'):>7}  "
          f"{r['achieved_sparsity']:>8.2%}  "
          f"{r['perplexity_before_prune']:>10.3f}  {r['perplexity_after_prune']:>11.3f}  "
          f"{r['perplexity_after_retrain']:>13.3f}  {r['retrain_steps']:>6}  "
          f"{r['wall_seconds']:>8.1f}"
      )
    rep = self.report
    lines += [
        "",
        f"dense perplexity {self.dense_perplexity:.3f} -> final {self.final_perplexity:.3f} "
        f"({self.perplexity_degradation:+.2%})",
        f"sparsity: targeted leaves {self.achieved_sparsity:.2%}, whole model "
        f"{self.overall_sparsity:.2%}",
        f"compression (bitmask + nonzeros): targeted {rep.targeted_compression:.2f}x, "
        f"whole model {rep.overall_compression:.2f}x bytes; parameters "
        f"{rep.targeted_param_ratio:.2f}x / {rep.overall_param_ratio:.2f}x",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop


@jax.jit
def _pruned_counts(masks: list[jax.Array]) -> list[jax.Array]:
  return [jnp.sum(~m, dtype=jnp.int32) for m in masks]


def pruned_fraction(masks: PyTree) -> float:
  """Fraction of the targeted weights that `masks` prune, exactly (integer counts per
  leaf, summed on the host): what `achieved_sparsity` means everywhere."""
  leaves = selected_masks(masks)
  counts = jax.device_get(_pruned_counts(leaves))
  return sum(int(c) for c in counts) / sum(m.size for m in leaves)


def _evaluate(eval_step, params, source) -> float:
  total, count = jnp.zeros((), jnp.float32), 0
  for batch in source():
    total = total + eval_step(params, batch)
    count += 1
  return float(total) / count


def _first_bad(losses: list[jax.Array]) -> int | None:
  if not losses:
    return None
  values = jax.device_get(losses)  # A list: no stacking program to compile per length.
  bad = [i for i, v in enumerate(values) if not math.isfinite(float(v))]
  return bad[0] if bad else None


def _check_losses(pending: list[jax.Array], iteration: int, first_step: int, j_end: int) -> None:
  """Raises if a loss in `pending` (steps up to `j_end` of `iteration`) is not finite."""
  bad = _first_bad(pending)
  if bad is not None:
    step = j_end - len(pending) + bad
    raise FloatingPointError(
        f"non-finite retraining loss at iteration {iteration}, step {step} (global step "
        f"{first_step + step}); stopped. The last good checkpoint is kept."
    )
  pending.clear()


def _is_main_process() -> bool:
  return jax.process_index() == 0


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
  if not (enabled and _is_main_process()):
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is an optional extra: fall back to logging.
    return None
  return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def retrain(
    train_step: Callable[..., tuple[PyTree, PyTree, jax.Array]],
    state: checkpointing.LoopState,
    batch_at: Callable[[int], Any],
    steps: range,
    *,
    first_step: int = 0,
    iteration: int = 0,
    log_every: int = 50,
    bar: Any = None,
    every: int | None = None,
    on_every: Callable[[checkpointing.LoopState, int], None] | None = None,
) -> checkpointing.LoopState:
  """One retraining phase on the host: `train_step` for the local steps `steps`.

  Global step `g = first_step + j` feeds `batch_at(g)` and the RNG, so a phase
  resumed at `steps.start` continues bitwise. Losses stay on the device and are
  checked every `log_every` steps and at the end (a NaN/inf raises
  `FloatingPointError` naming `iteration` and the step); `bar` (tqdm-like) shows
  progress. Every `every` steps before the last, after a check, `on_every(state,
  j + 1)` is called (the loop checkpoints there).

  `state.masks` is carried through as given: the loop's masks are fixed during a
  phase (with a gradual `pruned` optimizer, read them with `get_masks(opt_state)`).

  Returns:
    The `LoopState` after the phase.
  """
  params, opt_state, masks, rng = state
  pending: list[jax.Array] = []
  check = functools.partial(_check_losses, pending, iteration, first_step)
  for j in steps:
    g = first_step + j
    params, opt_state, loss = train_step(params, opt_state, batch_at(g), rng, g)
    pending.append(loss)
    if bar is not None:
      bar.update(1)
    if (j + 1) % log_every == 0:
      check(j + 1)
      if bar is not None:
        bar.set_postfix(loss=f"{float(loss):.4f}")
      logger.debug("iteration %d step %d loss %.4f", iteration, j + 1, float(loss))
    if every and on_every is not None and (j + 1) % every == 0 and j + 1 < steps.stop:
      check(j + 1)
      on_every(checkpointing.LoopState(params, opt_state, masks, rng), j + 1)
  check(steps.stop)
  return checkpointing.LoopState(params, opt_state, masks, rng)


class _Run(NamedTuple):
  """What every iteration of `prune_retrain` needs, built once."""

  tx: optax.GradientTransformation
  train_step: Callable[..., Any]
  evaluate: Callable[[PyTree], float]
  prune: Callable[..., Any]
  batch_at: Callable[[int], Any]
  targets: list[Target]
  budgets: list[int]
  restart_optimizer: bool
  mesh: Mesh | None
  log_every: int
  checkpoint_every: int | None
  progress: bool


def _check_loop_args(schedule, retrain_steps, scope, checkpoint_every, log_every):
  """(targets, budgets), after checking every scalar setting of the loop."""
  check_scope(scope)
  targets = _check_schedule(schedule, scope)
  budgets = _check_budgets(retrain_steps, len(targets))
  if checkpoint_every is not None and not (_is_count(checkpoint_every) and checkpoint_every >= 1):
    raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
  if not (_is_count(log_every) and log_every >= 1):
    raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
  return targets, budgets


def _placed_sources(params, train_batches, eval_batches, mesh, layout):
  """(params, step -> batch, eval source, exact?) with params and batches on `mesh`."""
  eval_source = _eval_source(eval_batches)
  batch_at, exact = _train_source(train_batches)
  if mesh is None:
    return params, batch_at, eval_source, exact
  params = jax.device_put(params, param_shardings(params, mesh, layout))
  return (params, lambda step: place_batch(batch_at(step), mesh),
          lambda: (place_batch(b, mesh) for b in eval_source()), exact)


def _distilling(loss_fn, batch_at, teacher, weight, temperature, mesh, layout):
  """(train loss, step -> batch): with a teacher, its logits join every batch."""
  if teacher is None:
    return loss_fn, batch_at
  apply_fn, teacher_params = teacher
  train_loss = distillation_loss(loss_fn, apply_fn, weight=weight, temperature=temperature)
  if mesh is not None:
    teacher_params = jax.device_put(teacher_params,
                                    param_shardings(teacher_params, mesh, layout))
  forward = teacher_logits_fn(apply_fn)

  def with_logits(step: int) -> dict:
    batch = batch_at(step)
    return {"batch": batch, "teacher_logits": forward(teacher_params, batch)}

  return train_loss, with_logits


def _prune_phase(run: _Run, state, i: int, history: list) -> tuple[Any, dict]:
  """Prune to `targets[i]` and evaluate: (state, the iteration's history row so far)."""
  params, opt_state, masks, rng = state
  before = history[-1]["loss_after_retrain"] if history else run.evaluate(params)
  target = run.targets[i]
  params, masks, opt_state = _run_prune(run.prune, params, masks, opt_state, target)
  if run.mesh is not None:  # Keep masks exactly on their params' shardings.
    masks = place_masks(masks, params)
    opt_state = replace_masks(opt_state, masks)
  if run.restart_optimizer:
    opt_state = replace_masks(run.tx.init(float_part(params)), masks)
  after_prune = run.evaluate(params)
  row = {
      "iteration": i,
      "target_sparsity": target.sparsity,
      "pattern": None if isinstance(target, Magnitude) else str(target),
      "achieved_sparsity": pruned_fraction(masks),
      "loss_before_prune": before,
      "perplexity_before_prune": _perplexity(before),
      "loss_after_prune": after_prune,
      "perplexity_after_prune": _perplexity(after_prune),
  }
  return checkpointing.LoopState(params, opt_state, masks, rng), row


def _iteration(run: _Run, state, meta: dict, i: int, ckpt: checkpointing.Checkpointer):
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
  bar = _progress_bar(run.progress, run.budgets[i], j0,
                      f"retrain {i + 1}/{len(run.targets)} @ {run.targets[i].sparsity:.1%}")
  try:
    state = retrain(run.train_step, state, run.batch_at, range(j0, run.budgets[i]),
                    first_step=first, iteration=i, log_every=run.log_every, bar=bar,
                    every=run.checkpoint_every, on_every=save_mid_phase)
  finally:  # also when the NaN guard or a batch function raises
    if bar is not None:
      bar.close()
  after = run.evaluate(state.params)
  row.update(loss_after_retrain=after, perplexity_after_retrain=_perplexity(after),
             retrain_steps=run.budgets[i], wall_seconds=time.perf_counter() - started)
  meta["history"].append(row)
  logger.info("iteration %d: sparsity %.2f%% (target %.2f%%), perplexity %.3f -> %.3f "
              "(pruned) -> %.3f (retrained)", i, 100 * row["achieved_sparsity"],
              100 * run.targets[i].sparsity, row["perplexity_before_prune"],
              row["perplexity_after_prune"], row["perplexity_after_retrain"])
  meta.update(phase="prune", iteration=i + 1, step=0, row={})
  ckpt.save(state, meta)
  return state


def prune_retrain(
    params: PyTree,
    loss_fn: LossFn,
    train_batches: Callable[[int], Any] | Iterable,
    eval_batches: Iterable | Callable[[], Iterable],
    *,
    optimizer: optax.GradientTransformation,
    schedule: Sequence[float | str | Target],
    where: Where,
    retrain_steps: int | Sequence[int],
    scope: Scope = "layer",
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    restart_optimizer: bool = True,
    keep_checkpoints: int = 3,
    log_every: int = 50,
    mesh: Mesh | None = None,
    param_layout: ParamLayout = "replicated",
    teacher: tuple[Callable[[PyTree, Any], jax.Array], PyTree] | None = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
) -> PruneRetrainResult:
  """Runs a whole prune-retrain schedule and returns the pruned model with its figures.

  Args:
    params: trained dense params (any pytree).
    loss_fn: `loss_fn(params, batch) -> scalar` mean loss in nats per token (or
      `(loss, aux)`); an `rng` keyword, if it has one, gets a per-step key.
    train_batches: `step -> batch`, a pure function of the global retraining step
      (0, 1, ... across the whole run), which makes resume exact. An iterable is
      accepted too; resume then continues from wherever a fresh iterator starts
      (approximate).
    eval_batches: a finite re-iterable of batches, or a callable returning one.
    optimizer: the optax optimizer to retrain with; it is wrapped in `pruned`.
    schedule: one pruning target per iteration, never decreasing in sparsity: a
      sparsity in [0, 1) (`Magnitude(s, scope)`; `exponential_schedule(...)`, a
      list, ...), an N:M pattern `"2:4"` (`NM(2, 4)`, along axis -2), or any
      `Target` (`NM(2, 4, axis=-1)`, `Magnitude(0.9, "global")`, your own):
      `[0.25, "2:4"]` ends in 2:4 sparsity, previous masks respected.
    where: the targeted leaves (bool pytree from `select`, or a callable).
    retrain_steps: steps per iteration: an int, or one budget per iteration.
    scope: `"layer"` or `"global"` magnitude ranking.
    checkpoint_dir: orbax checkpoints go here (None: no checkpoints).
    checkpoint_every: also checkpoint every this many retraining steps.
    resume: continue from the latest complete checkpoint in `checkpoint_dir`.
    progress: a tqdm bar per retrain phase (process 0 only).
    seed: seeds the RNG handed to `loss_fn(..., rng=...)`.
    restart_optimizer: re-initialise the optimizer state after every prune, so
      moments and the learning-rate schedule restart each iteration (learning-rate
      rewinding). False keeps one state, and one schedule, across the whole run.
    keep_checkpoints: how many checkpoints orbax keeps.
    log_every: steps between progress/log updates (each one reads the loss
      from the device).
    mesh: a device mesh (`jaxprune.make_mesh("data=2,fsdp=4")`): batches are split
      along their leading axis over all mesh axes; params, optimizer state and masks
      are replicated or FSDP-sharded per `param_layout`, masks always sharded like
      their params. With several processes, `train_batches` and `eval_batches` give
      each process its own slice of the global batch.
    param_layout: `"replicated"` or `"fsdp"` (see `jaxprune.param_shardings`).
    teacher: `(apply_fn, teacher_params)` to distill from while retraining, with
      `apply_fn(params, batch) -> logits` aligned with `loss_fn`'s targets (usually
      the dense model: `(apply_fn, params)`). The retraining loss becomes
      `(1 - distill_weight) * loss_fn + distill_weight * T^2 KL(teacher || student)`
      at temperature `T`; evaluation still reports `loss_fn` alone.
    distill_weight: weight of the distillation term, in [0, 1].
    temperature: softmax temperature of the distillation term.

  Returns:
    A `PruneRetrainResult`.

  Raises:
    ValueError: before any compute for an empty or out-of-range schedule, negative
      budgets, empty `eval_batches`, a `where` selecting nothing, a checkpoint of
      another configuration; FloatingPointError when a retraining loss is NaN/inf
      (naming iteration and step; the last good checkpoint is kept).

  Example::

    >>> result = jaxprune.prune_retrain(
    ...     params, loss_fn, batch_at_step, eval_batches,
    ...     optimizer=optax.adamw(1e-3), schedule=jaxprune.exponential_schedule(0.2, 0.8, 3),
    ...     where=jaxprune.select(params), retrain_steps=2, checkpoint_dir="ckpt")
    >>> print(result.summary())
    iter   target  achieved  ppl before  after prune  after retrain   steps   seconds
    ---------------------------------------------------------------------------------
       0   20.00%    19.79%  ...       2  ...
       1   40.00%    40.62%  ...       2  ...
       2   80.00%    80.21%  ...       2  ...
    <BLANKLINE>
    dense perplexity ... -> final ...
    sparsity: targeted leaves 80.21%, whole model 74.04%
    compression (bitmask + nonzeros): targeted 4.36x, whole model 3.47x bytes; ...
  """
  targets, budgets = _check_loop_args(schedule, retrain_steps, scope, checkpoint_every,
                                      log_every)
  flags = resolve_where(where, params)
  where = where_tree(params, flags)
  params, batch_at, eval_source, exact_batches = _placed_sources(
      params, train_batches, eval_batches, mesh, param_layout)
  train_loss, batch_at = _distilling(loss_fn, batch_at, teacher, distill_weight, temperature,
                                     mesh, param_layout)
  start = all_kept(params, flags)
  if mesh is not None:
    start = place_masks(start, params)
  tx = pruned(optimizer, start)
  # Targets are pytrees: a Magnitude's sparsity is traced, so magnitude iterations
  # share one compilation; each distinct static target (an NM pattern) gets its own.
  run = _Run(tx, make_train_step(train_loss, tx),
             functools.partial(_evaluate, make_eval_step(loss_fn), source=eval_source),
             jax.jit(functools.partial(prune_step, where=where)), batch_at, targets, budgets,
             restart_optimizer, mesh, log_every, checkpoint_every, progress)
  state = checkpointing.LoopState(
      params, tx.init(float_part(params)), start, jax.random.key_data(jax.random.key(seed)))
  config = checkpointing.fingerprint(
      params, schedule=[_describe(t) for t in targets], retrain_steps=budgets, scope=scope,
      selected=[p for p, flag in zip(slots(params).paths, flags) if flag],
      restart_optimizer=restart_optimizer, seed=seed,
      distillation=None if teacher is None else [distill_weight, temperature],
      optimizer_state=checkpointing.describe_state(state.opt_state))
  # Where the run stands: what a checkpoint's `meta` records.
  meta: dict[str, Any] = {"iteration": 0, "phase": "prune", "step": 0, "history": [], "row": {}}
  with checkpointing.Checkpointer(checkpoint_dir, config, keep=keep_checkpoints,
                                  resume=resume) as ckpt:
    resumed = ckpt.resume(state)
    if resumed is not None:
      state, meta = resumed
      logger.info("resumed: iteration %d, phase %s, step %d",
                  meta["iteration"], meta["phase"], meta["step"])
      if not exact_batches:
        logger.warning("train_batches is an iterable: resume restarts it (approximate)")
    for i in range(meta["iteration"], len(targets)):
      state = _iteration(run, state, meta, i, ckpt)
  history = meta["history"]
  return PruneRetrainResult(
      params=state.params, masks=state.masks, opt_state=state.opt_state, history=history,
      # Iteration 0's row: also right when resuming inside iteration 0's retraining.
      dense_loss=history[0]["loss_before_prune"], final_loss=history[-1]["loss_after_retrain"],
      report=sparsity_report(state.params, where))

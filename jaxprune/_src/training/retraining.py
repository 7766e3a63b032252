"""One retraining phase on the host, and the hooks that watch it.

`retrain` only dispatches the jitted train step: losses stay on the device and
are read once per *report point* (every `report_every` steps and at the end of
the phase), where each hook gets a `StepReport`. The NaN guard, progress bars,
logging and mid-phase checkpoints are hooks, so a loop adds a feature by adding
a hook, not a keyword:

* `check_finite_losses`: the NaN guard, `FloatingPointError` naming the first
  bad step; then `check_sound_state`: the params finite and no NaN in the
  optimizer state (a NaN gradient behind a finite loss); `retrain` runs both
  first unless `check_finite=False`;
* `log_losses`: the last loss to the `jaxprune` logger (debug level);
* `ProgressBar(total, ...)`: a tqdm bar (a context manager that always closes).

Hooks run in order, after the guards: nothing non-finite reaches a hook that saves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxprune._src.methods.masks import is_count
from jaxprune._src.training import integrity
from jaxprune._src.types import PyTree

logger = logging.getLogger("jaxprune")


class LoopState(NamedTuple):
  """Everything a prune-retrain run needs to continue bitwise-exactly.

  The masks are not a field: they live in the `pruned` state inside `opt_state`
  (`jaxprune.get_masks(state.opt_state)`).
  """

  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), see `jax.random.key_data`


class StepReport(NamedTuple):
  """What a hook sees at a report point of `retrain`.

  Attributes:
    iteration: the schedule iteration the phase belongs to (for messages).
    step: local steps done in the phase so far (`j + 1` after step `j`).
    global_step: the global step index of the last step done (`first_step + step - 1`).
    losses: float64 host array, the losses of the steps since the previous report.
    final: True at the end of the phase.
    state: the `LoopState` after `step` steps.
  """

  iteration: int
  step: int
  global_step: int
  losses: np.ndarray
  final: bool
  state: LoopState


Hook = Callable[[StepReport], None]


def check_finite_losses(report: StepReport) -> None:
  """The NaN guard: raises `FloatingPointError` if a loss of `report` is NaN or inf.

  The message names the iteration, the local step and the global step of the first
  bad loss, so a run stopped here resumes from its last good checkpoint.
  """
  bad = np.flatnonzero(~np.isfinite(report.losses))
  if bad.size:
    local = report.step - len(report.losses) + int(bad[0])
    first_step = report.global_step + 1 - report.step
    raise FloatingPointError(
        f"non-finite retraining loss at iteration {report.iteration}, step {local} (global "
        f"step {first_step + local}); stopped. The last good checkpoint is kept."
    )


def check_array_leaves(params: Any) -> None:
  """Refuses params with a leaf that is neither an array, a number nor None (an
  Equinox module's activation function): the loops jit and differentiate arrays.

  Raises:
    ValueError: naming the first such leaf, its type, and the way out.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)):
      raise ValueError(
          f"params hold a non-array leaf at {jax.tree_util.keystr(path)} "
          f"({type(leaf).__name__}); the training loops take arrays: pass the arrays (for "
          "Equinox, `arrays, static = eqx.partition(model, eqx.is_array)`) and rebuild the "
          "model inside loss_fn (`eqx.combine(arrays, static)`)")


def check_sound_state(report: StepReport) -> None:
  """The guard behind the losses: raises `FloatingPointError` if the state of
  `report` is unsound (`integrity.is_sound`: a non-finite param, a NaN in the
  optimizer state), naming the leaves. A finite loss with a NaN gradient (a sqrt
  at 0, a float16 overflow in Adam) is caught here, at the report point after it:
  one jitted pass over the state (`integrity.checksums`), a few words per leaf read.
  """
  params, opt_state, _ = report.state
  bad = integrity.unsound(integrity.checksums(params), integrity.checksums(opt_state))
  if not bad:
    return
  raise FloatingPointError(
      f"{integrity.unsound_leaves(bad)} after global step {report.global_step} (iteration "
      f"{report.iteration}, step {report.step}), though every loss was finite: "
      f"{integrity.FINITE_LOSS_CAUSE}")


def log_losses(report: StepReport) -> None:
  """Logs the last loss of `report` at debug level on the `jaxprune` logger."""
  if len(report.losses):
    logger.debug("iteration %d step %d loss %.4f", report.iteration, report.step,
                 report.losses[-1])


class ProgressBar:
  """A tqdm bar over one phase, as a hook: advanced and labelled at each report.

  Shown on process 0 only, and only if `tqdm` is installed (an optional extra);
  otherwise the hook does nothing. Use it as a context manager so the bar closes
  when the phase raises.
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = "retrain",
               enabled: bool = True):
    self._bar = None
    self._shown = initial
    if enabled and jax.process_index() == 0:
      try:
        from tqdm.auto import tqdm
      except ImportError:
        return
      self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

  def __call__(self, report: StepReport) -> None:
    if self._bar is None:
      return
    self._bar.update(report.step - self._shown)
    self._shown = report.step
    if len(report.losses):
      self._bar.set_postfix(loss=f"{report.losses[-1]:.4f}")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _cadences(report_every: Any) -> tuple[int, ...]:
  cadences = tuple(report_every) if isinstance(report_every, (tuple, list)) else (report_every,)
  if not cadences or not all(is_count(c) and c >= 1 for c in cadences):
    raise ValueError(
        f"report_every must be an integer >= 1 or a tuple of them, got {report_every!r}")
  return tuple(int(c) for c in cadences)


def check_hooks(hooks: Any) -> tuple[Hook, ...]:
  """`hooks` as a tuple of callables; a TypeError naming the first that is not one."""
  if callable(hooks) or not isinstance(hooks, (tuple, list)):
    raise TypeError(f"hooks must be a list of callables `f(StepReport)`, got {hooks!r}")
  for i, hook in enumerate(hooks):
    if not callable(hook):
      raise TypeError(f"hooks[{i}] = {hook!r} is not callable: a hook is `f(StepReport)`")
  return tuple(hooks)


def _read(losses: list[jax.Array]) -> np.ndarray:
  # A list, not a stacked array: no stacking program to compile per length.
  return np.asarray([float(v) for v in jax.device_get(losses)], dtype=np.float64)


def retrain(
    train_step: Callable[..., tuple[PyTree, PyTree, jax.Array]],
    state: LoopState,
    batch_at: Callable[[int], Any],
    steps: range,
    *,
    first_step: int = 0,
    iteration: int = 0,
    report_every: int | Sequence[int] = 50,
    hooks: Sequence[Hook] = (),
    check_finite: bool = True,
) -> LoopState:
  """Runs `train_step` for the local steps `steps` of one phase; hooks watch it.

  Local step `j` is global step `g = first_step + j`: it gets `batch_at(g)` and
  the RNG folded with `g`, so a phase resumed at `steps.start` continues bitwise.
  After every local step `j` with `(j + 1) % c == 0` for a cadence `c` of
  `report_every` (an int or several), and after the last step, the losses since
  the previous report are read from the device once and every hook is called with
  a `StepReport`, in order, after the guards `check_finite_losses` and
  `check_sound_state` (which `check_finite=False` leaves out: a NaN then does not
  stop the phase).

  Masks stay where they live, in the `pruned` state inside `state.opt_state`.

  Returns:
    The `LoopState` after the phase.

  Example::

    >>> tx = jaxprune.pruned(optax.adam(1e-3), masks)
    >>> state = jaxprune.training.LoopState(params, tx.init(params), rng_data)
    >>> seen = []
    >>> state = jaxprune.training.retrain(jaxprune.make_train_step(loss_fn, tx), state,
    ...                                   batch_at_step, range(5), report_every=2,
    ...                                   hooks=[seen.append])
    >>> [(r.step, len(r.losses), r.final) for r in seen]
    [(2, 2, False), (4, 2, False), (5, 1, True)]
  """
  if not isinstance(steps, range) or steps.step != 1:
    raise ValueError(f"steps must be a range of consecutive local steps, got {steps!r}")
  cadences = _cadences(report_every)
  guards = (check_finite_losses, check_sound_state) if check_finite else ()
  hooks = guards + check_hooks(hooks)
  params, opt_state, rng = state
  pending: list[jax.Array] = []

  def report(step: int, final: bool) -> None:
    losses = _read(pending)
    pending.clear()
    now = LoopState(params, opt_state, rng)
    for hook in hooks:
      hook(StepReport(iteration, step, first_step + step - 1, losses, final, now))

  for j in steps:
    g = first_step + j
    params, opt_state, loss = train_step(params, opt_state, batch_at(g), rng, g)
    pending.append(loss)
    if j + 1 < steps.stop and any((j + 1) % c == 0 for c in cadences):
      report(j + 1, final=False)
  if len(steps):
    report(steps.stop, final=True)
  return LoopState(params, opt_state, rng)


"""One training phase on the host, and the hooks that watch it.

`retrain` only dispatches the jitted train step: losses stay on the device and
are read once per *report point*, where each hook gets a `StepReport`. A hook
with an `every` attribute (`every(n, hook)`, `progress_bar(every=n)`) is called
every `n` steps of a phase and at its end; a plain callable at every report
point. The report points are the union of those cadences, `report_every` and the
phase's end. The NaN guard, progress bars, logging and mid-phase checkpoints are
hooks, so a loop adds a feature by adding a hook, not a keyword:

* `check_finite_losses`: the NaN guard, `FloatingPointError` naming the first
  bad step; then `check_sound_state`: the params finite and no NaN in the
  optimizer state (a NaN gradient behind a finite loss); `retrain` runs both
  first, at every report point, unless `check_finite=False`;
* `log_losses`: the last loss to the `jaxprune` logger (debug level);
* `progress_bar(every=50)`: a tqdm bar per phase, closed at the phase's end (and
  by `close_hooks` when a phase raises).

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
    iteration: the iteration of `prune_retrain` the phase belongs to (0 in `train`).
    step: local steps done in the phase so far (`j + 1` after step `j`).
    global_step: the global step index of the last step done (`first_step + step - 1`).
    losses: float64 host array, the losses of the steps since the previous report.
    final: True at the end of the phase.
    state: the `LoopState` after `step` steps.
    total: the number of steps of the whole phase (a resumed one included).
    phase: what the phase is, for display (`"train"`, `"retrain 2/5 @ 50.00%"`).
  """

  iteration: int
  step: int
  global_step: int
  losses: np.ndarray
  final: bool
  state: LoopState
  total: int = 0
  phase: str = ""


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


class Every(NamedTuple):
  """`hook` called every `every` steps of a phase and at its end (see `every`)."""

  every: int
  hook: Hook

  def __call__(self, report: StepReport) -> None:
    self.hook(report)


def every(n: int, hook: Hook) -> Every:
  """`hook` called every `n` steps of a phase and at the phase's end.

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
    >>> rng_data = jax.random.key_data(jax.random.key(0))   # raw key data
    >>> tx = optax.adam(1e-3)
    >>> state = jaxprune.training.LoopState(params, tx.init(params), rng_data)
    >>> seen = []
    >>> log = jaxprune.training.every(2, lambda r: seen.append(r.step))
    >>> state = jaxprune.training.retrain(jaxprune.make_train_step(loss_fn, tx), state,
    ...                                   batch_at_step, range(5), hooks=[log])
    >>> seen
    [2, 4, 5]
  """
  if not callable(hook):
    raise TypeError(f"every({n!r}, hook): hook must be a callable f(StepReport), got {hook!r}")
  return Every(_cadence(n, "every"), hook)


class ProgressBar:
  """A tqdm bar per phase, as a hook (`progress_bar`): opened at a phase's first
  report, advanced and labelled at each, closed at its end or by `close`.

  Shown on process 0 only, and only if `tqdm` is installed (an optional extra);
  otherwise the hook does nothing.
  """

  def __init__(self, every: int = 50):
    self.every = _cadence(every, "every")
    self._bar = None
    self._phase: tuple | None = None
    self._shown = 0

  def _open(self, report: StepReport) -> None:
    self.close()
    self._phase = (report.iteration, report.phase)
    self._shown = report.step - len(report.losses)
    if jax.process_index() != 0:
      return
    try:
      from tqdm.auto import tqdm
    except ImportError:
      return
    self._bar = tqdm(total=report.total or None, initial=self._shown, desc=report.phase or None,
                     leave=False, dynamic_ncols=True)

  def __call__(self, report: StepReport) -> None:
    if self._phase != (report.iteration, report.phase) or self._shown > report.step:
      self._open(report)
    if self._bar is not None:
      self._bar.update(report.step - self._shown)
      if len(report.losses):
        self._bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
    self._shown = report.step
    if report.final:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._bar, self._phase = None, None


def progress_bar(every: int = 50) -> ProgressBar:
  """A tqdm progress bar over each phase, updated every `every` steps: the hook the
  drivers run by default (`hooks=None`); `hooks=[]` shows none."""
  return ProgressBar(every)


def close_hooks(hooks: Sequence[Hook]) -> None:
  """Calls `close()` on every hook that has one (a bar left open by a phase that raised)."""
  for hook in hooks:
    close = getattr(hook, "close", None)
    if callable(close):
      close()


def _cadence(value: Any, name: str) -> int:
  if not is_count(value) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def _cadences(report_every: Any) -> tuple[int, ...]:
  cadences = tuple(report_every) if isinstance(report_every, (tuple, list)) else (report_every,)
  if not all(is_count(c) and c >= 1 for c in cadences):
    raise ValueError(
        f"report_every must be an integer >= 1 or a tuple of them, got {report_every!r}")
  return tuple(int(c) for c in cadences)


def check_hooks(hooks: Any) -> tuple[Hook, ...]:
  """`hooks` as a tuple of callables; a TypeError naming the first that is not one (or
  a ValueError for a bad `every`)."""
  if callable(hooks) or not isinstance(hooks, (tuple, list)):
    raise TypeError(f"hooks must be a list of callables `f(StepReport)`, got {hooks!r}")
  for i, hook in enumerate(hooks):
    if not callable(hook):
      raise TypeError(f"hooks[{i}] = {hook!r} is not callable: a hook is `f(StepReport)`")
    if getattr(hook, "every", None) is not None:
      _cadence(hook.every, f"hooks[{i}].every")
  return tuple(hooks)


def hook_cadences(hooks: Sequence[Hook]) -> tuple[int, ...]:
  """The cadences hooks ask for (their `every`)."""
  return tuple(int(h.every) for h in hooks if getattr(h, "every", None) is not None)


def _read(losses: list[jax.Array]) -> np.ndarray:
  # A list, not a stacked array: no stacking program to compile per length.
  return np.asarray([float(v) for v in jax.device_get(losses)], dtype=np.float64)


def _calls(hook: Hook, report: StepReport) -> bool:
  cadence = getattr(hook, "every", None)
  return cadence is None or report.final or report.step % cadence == 0


def retrain(
    train_step: Callable[..., tuple[PyTree, PyTree, jax.Array]],
    state: LoopState,
    batch_at: Callable[[int], Any],
    steps: range,
    *,
    first_step: int = 0,
    iteration: int = 0,
    report_every: int | Sequence[int] = (),
    hooks: Sequence[Hook] = (),
    check_finite: bool = True,
    total: int | None = None,
    phase: str = "",
) -> LoopState:
  """Runs `train_step` for the local steps `steps` of one phase; hooks watch it.

  Local step `j` is global step `g = first_step + j`: it gets `batch_at(g)` and
  the RNG folded with `g`, so a phase resumed at `steps.start` continues bitwise.
  After every local step `j` with `(j + 1) % c == 0` for a cadence `c` (of
  `report_every`, an int or several, and of the hooks' `every`), and after the
  last step, the losses since the previous report are read from the device once
  and the hooks due are called with a `StepReport`, in order, after the guards
  `check_finite_losses` and `check_sound_state` (which `check_finite=False` leaves
  out: a NaN then does not stop the phase). `total` (default `steps.stop`) and
  `phase` label the reports.

  Masks stay where they live, in the `pruned` state inside `state.opt_state`.

  Returns:
    The `LoopState` after the phase.

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
    >>> rng_data = jax.random.key_data(jax.random.key(0))   # raw key data
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
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
  hooks = check_hooks(hooks)
  cadences = _cadences(report_every) + hook_cadences(hooks)
  guards = (check_finite_losses, check_sound_state) if check_finite else ()
  total = steps.stop if total is None else total
  params, opt_state, rng = state
  pending: list[jax.Array] = []

  def report(step: int, final: bool) -> None:
    losses = _read(pending)
    pending.clear()
    now = StepReport(iteration, step, first_step + step - 1, losses, final,
                     LoopState(params, opt_state, rng), total, phase)
    for hook in guards + hooks:
      if _calls(hook, now):
        hook(now)

  for j in steps:
    g = first_step + j
    params, opt_state, loss = train_step(params, opt_state, batch_at(g), rng, g)
    pending.append(loss)
    if j + 1 < steps.stop and any((j + 1) % c == 0 for c in cadences):
      report(j + 1, final=False)
  if len(steps):
    report(steps.stop, final=True)
  return LoopState(params, opt_state, rng)

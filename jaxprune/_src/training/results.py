"""What a prune-retrain run reports: typed history records and the result.

Losses are the mean of `loss_fn` over the eval batches; the *metric* is the
run's `Metric` (the loss itself by default, `jaxprune.training.perplexity` for a language
model, `jaxprune.training.aux_metric("accuracy")` for a classifier). `achieved_sparsity`
means one thing everywhere: the exact fraction of targeted weights the masks
prune (integer counts per leaf, `pruned_fraction`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune._src.training.metrics import Metric, loss_metric
from jaxprune._src.training.reporting import SparsityReport
from jaxprune._src.transforms.optax_wrapper import get_masks
from jaxprune._src.tree.mask_tree import selected_masks
from jaxprune._src.types import PyTree


class Evaluation(NamedTuple):
  """The mean loss over the eval batches, and the metric's figure."""

  loss: float
  metric: float


def evaluate(eval_step: Callable[[PyTree, Any], tuple[jax.Array, jax.Array]], params: PyTree,
             batches: Iterable, metric: Metric | None = None) -> Evaluation:
  """`Evaluation(mean loss, metric.of_mean(mean metric value))` over `batches`.

  `eval_step` comes from `make_eval_step(loss_fn, metric)`, which records its
  metric: `metric` defaults to it, and another one is refused (the values would be
  one metric's, labelled as another's). Sums stay on the device, read once.

  Raises:
    ValueError: `batches` is empty, or `metric` is not `eval_step`'s.
    FloatingPointError: the mean loss is NaN or inf, naming the first batch whose
      loss is.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8)), "y": jnp.ones((16, 4))}
    >>> def loss_fn(params, batch):
    ...   h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    ...   return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)
    >>> eval_step = jaxprune.training.make_eval_step(loss_fn, jaxprune.training.perplexity)
    >>> e = jaxprune.training.evaluate(eval_step, params, [batch, batch])
    >>> bool(abs(e.metric - np.exp(e.loss)) < 1e-4 * e.metric)
    True
  """
  own = getattr(eval_step, "metric", None)
  if metric is not None and own is not None and metric != own:
    raise ValueError(f"eval_step computes metric {own.name!r}, not {metric.name!r}: build it "
                     f"with make_eval_step(loss_fn, metric)")
  metric = metric or own or loss_metric
  losses, value_total = [], jnp.zeros((), jnp.float32)
  for batch in batches:
    loss, value = eval_step(params, batch)
    losses.append(loss)
    value_total = value_total + value
  if not losses:
    raise ValueError("evaluate got no batches: the mean of nothing is undefined")
  loss_total, value_total = jax.device_get((sum(losses[1:], losses[0]), value_total))
  if not math.isfinite(float(loss_total)):
    first = next(i for i, v in enumerate(jax.device_get(losses)) if not math.isfinite(float(v)))
    raise FloatingPointError(f"evaluation: the loss of eval batch {first} is "
                             f"{float(jax.device_get(losses[first]))}")
  count = len(losses)
  return Evaluation(float(loss_total) / count, float(metric.of_mean(float(value_total) / count)))


def _non_finite_input(batch: Any) -> str | None:
  """The path of the first float array of `batch` holding NaN or inf, else None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and not bool(
        jnp.isfinite(leaf).all()):
      return jax.tree_util.keystr(path) or "the batch"
  return None


def check_evaluation(eval_step: Callable[[PyTree, Any], Any], params: PyTree,
                     batches: Iterable) -> None:
  """Checks an evaluation before any training: `eval_step` traced (not run) on the
  first batch (`jax.eval_shape`), and every batch's float inputs finite.

  A metric that needs an `aux` the loss does not return, a batch of the wrong
  shape or a NaN in the data raise here, before the first step, rather than after
  all of training.

  Raises:
    ValueError: a batch holds NaN or inf (naming the batch and the array), or
      tracing the step fails (the error names the first batch).
  """
  for i, batch in enumerate(batches):
    if i == 0:
      try:
        jax.eval_shape(eval_step, params, batch)
      except Exception as err:
        raise ValueError(f"evaluating eval batch 0 fails, so nothing was trained: "
                         f"{type(err).__name__}: {err}") from err
    bad = _non_finite_input(batch)
    if bad is not None:
      raise ValueError(f"eval batch {i} holds NaN or inf at {bad}: its figures would be NaN")


class IterationRecord(NamedTuple):
  """One iteration of the schedule: prune to `target`, then retrain.

  Attributes:
    iteration: index in the schedule.
    target: the pruning method, as text (`"50.00%"`, `"2:4"`, `"90.00% global"`).
    target_sparsity: its nominal sparsity.
    achieved_sparsity: fraction of targeted weights the masks prune, exactly.
    before_prune, after_prune, after_retrain: `Evaluation`s (loss and metric).
    retrain_steps: the iteration's retraining budget.
    wall_seconds: wall time of the iteration (across a resume, the sum).
  """

  iteration: int
  target: str
  target_sparsity: float
  achieved_sparsity: float
  before_prune: Evaluation
  after_prune: Evaluation
  after_retrain: Evaluation
  retrain_steps: int
  wall_seconds: float

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (evaluations as `{"loss", "metric"}`)."""
    return {k: v._asdict() if isinstance(v, Evaluation) else v for k, v in self._asdict().items()}

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> IterationRecord:
    """Inverse of `to_json`."""
    return cls(**{k: Evaluation(**v) if isinstance(v, dict) else v for k, v in row.items()})


@jax.jit
def _pruned_counts(masks: list[jax.Array]) -> list[jax.Array]:
  return [jnp.sum(~m, dtype=jnp.int32) for m in masks]


def pruned_fraction(masks: PyTree) -> float:
  """Fraction of the targeted weights that `masks` prune, exactly (integer counts per
  leaf, summed on the host): what `achieved_sparsity` means everywhere."""
  leaves = selected_masks(masks)
  counts = jax.device_get(_pruned_counts(leaves))
  return sum(int(c) for c in counts) / sum(m.size for m in leaves)


@dataclasses.dataclass(frozen=True)
class PruneRetrainResult:
  """What `prune_retrain` returns: the pruned model and honest figures.

  `degradation` is the relative change of the metric for the worse, from the dense
  model to the final one: `(final - dense) / |dense|` for a lower-is-better metric
  (loss, perplexity: `final / dense - 1`), `(dense - final) / |dense|` for a
  higher-is-better one (accuracy); with `dense == 0`, 0 if `final` is 0 too, else
  ±inf.
  `overall_sparsity` is the fraction of zeros over the whole model; `report` has
  per-leaf zero counts and compression ratios (a kept weight that is exactly 0
  counts as a zero there, not as pruned). The masks are those held in
  `opt_state`'s `pruned` state.
  """

  params: PyTree
  opt_state: PyTree
  history: list[IterationRecord]
  metric: Metric
  report: SparsityReport

  @property
  def masks(self) -> PyTree:
    return get_masks(self.opt_state)

  @property
  def dense(self) -> Evaluation:
    """The dense model's evaluation (iteration 0, before its prune)."""
    return self.history[0].before_prune

  @property
  def final(self) -> Evaluation:
    """The final model's evaluation (after the last retraining)."""
    return self.history[-1].after_retrain

  @property
  def dense_loss(self) -> float:
    return self.dense.loss

  @property
  def final_loss(self) -> float:
    return self.final.loss

  @property
  def degradation(self) -> float:
    worse = self.final.metric - self.dense.metric
    if self.metric.higher_is_better:
      worse = -worse
    if self.dense.metric == 0:
      return 0.0 if worse == 0 else math.copysign(math.inf, worse)
    return worse / abs(self.dense.metric)

  @property
  def achieved_sparsity(self) -> float:
    return pruned_fraction(self.masks)

  @property
  def overall_sparsity(self) -> float:
    return self.report.overall_sparsity

  def summary(self) -> str:
    """A readable table of the whole run."""
    name = self.metric.name
    head = (f"{'iter':>4}  {'target':>12}  {'achieved':>8}  {name + ' before':>14}  "
            f"{'after prune':>11}  {'after retrain':>13}  {'steps':>6}  {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in self.history:
      lines.append(
          f"{r.iteration:>4}  {r.target:>12}  {r.achieved_sparsity:>8.2%}  "
          f"{r.before_prune.metric:>14.4f}  {r.after_prune.metric:>11.4f}  "
          f"{r.after_retrain.metric:>13.4f}  {r.retrain_steps:>6}  {r.wall_seconds:>8.1f}")
    rep = self.report
    lines += [
        "",
        f"dense {name} {self.dense.metric:.4f} -> final {self.final.metric:.4f} "
        f"(degradation {self.degradation:+.2%})",
        f"sparsity: targeted leaves {self.achieved_sparsity:.2%}, whole model "
        f"{self.overall_sparsity:.2%}",
        f"compression (bitmask + nonzeros): targeted {rep.targeted_compression:.2f}x, "
        f"whole model {rep.overall_compression:.2f}x bytes; parameters "
        f"{rep.targeted_param_ratio:.2f}x / {rep.overall_param_ratio:.2f}x",
    ]
    return "\n".join(lines)

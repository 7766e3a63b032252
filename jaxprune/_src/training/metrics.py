"""What the loop reports besides the loss: a named evaluation metric.

A `Metric` turns the eval batches into one figure: per batch it reads a value
from the loss and its aux (`loss_fn` may return `(loss, aux)`), the loop takes
the mean over batches, then `of_mean` maps that mean to the figure:

    figure = of_mean(mean_b of_batch(loss_b, aux_b))

`loss_metric` (the default) reports the mean loss itself; `perplexity` is the
language-model view, `exp(mean loss)`; `aux_metric("accuracy")` reads a value
the loss function computes, e.g. a classifier's accuracy.

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> jaxprune.training.perplexity.of_mean(0.0), jaxprune.training.perplexity.name
  (1.0, 'perplexity')
  >>> acc = jaxprune.training.aux_metric("accuracy")
  >>> float(acc.of_batch(jnp.float32(0.3), {"accuracy": jnp.float32(0.75)}))
  0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax


def _loss_value(loss: jax.Array, aux: Any) -> jax.Array:
  del aux
  return loss


def _identity(mean: float) -> float:
  return mean


def _exp(mean: float) -> float:
  return math.exp(mean) if mean < 700 else math.inf


class Metric(NamedTuple):
  """A named evaluation figure (see the module docstring for the math).

  Attributes:
    name: how tables and records call it ("perplexity", "accuracy").
    of_batch: `(loss, aux) -> scalar` for one eval batch, jittable; `aux` is
      what `loss_fn` returns beside the loss (None if it returns a bare loss).
    of_mean: host function of the mean over batches.
    higher_is_better: False for losses and perplexity, True for accuracy; sets
      the sign of `PruneRetrainResult.degradation`.
  """

  name: str
  of_batch: Callable[[jax.Array, Any], jax.Array] = _loss_value
  of_mean: Callable[[float], float] = _identity
  higher_is_better: bool = False


loss_metric = Metric("loss")
perplexity = Metric("perplexity", of_mean=_exp)


def aux_metric(key: str, *, higher_is_better: bool = True, name: str | None = None) -> Metric:
  """A metric that `loss_fn` computes: the mean over eval batches of `aux[key]`.

  `loss_fn(params, batch)` must return `(loss, aux)` with `aux[key]` a scalar,
  e.g. `{"accuracy": jnp.mean(logits.argmax(-1) == labels)}`.
  """
  def of_batch(loss: jax.Array, aux: Any) -> jax.Array:
    del loss
    if not isinstance(aux, Mapping) or key not in aux:
      raise ValueError(
          f"metric {key!r} reads aux[{key!r}], but loss_fn returned aux {type(aux).__name__}"
          + (f" with keys {sorted(aux)}" if isinstance(aux, Mapping) else "")
          + f"; return (loss, {{{key!r}: value, ...}})"
      )
    return aux[key]

  return Metric(name or key, of_batch, _identity, higher_is_better)


def check_metric(metric: Any) -> Metric:
  """`metric` if it is a `Metric`; else a TypeError naming it."""
  if not isinstance(metric, Metric):
    raise TypeError(
        f"metric must be a jaxprune.training.Metric (jaxprune.training.loss_metric, "
        f"jaxprune.training.perplexity, "
        f"jaxprune.training.aux_metric('accuracy')), got {metric!r}"
    )
  return metric

"""The jitted steps of prune-and-retrain: train, evaluate, prune (and gradients).

Each is a pure function of its inputs, compiled once and usable in any loop:

* `make_train_step(loss_fn, tx)`: one optimizer step on the float leaves;
* `make_eval_step(loss_fn, metric)`: the loss and a metric's value of a batch;
* `make_gradient_step(loss_fn)`: the gradients a saliency score ranks by;
* `prune_step(params, opt_state, target, where)`: new masks from a pruning
  method, held in the `pruned` optimizer state (their only home) and applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune._src.methods.masks import apply_masks
from jaxprune._src.methods.targets import Target, as_target
from jaxprune._src.training.distillation import takes_rng
from jaxprune._src.training.metrics import Metric, loss_metric
from jaxprune._src.transforms.optax_wrapper import get_masks, replace_masks
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import float_part, merge_float_part
from jaxprune._src.types import LossFn, PyTree


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

  The loss runs on the params as they are (a straight-through optimizer keeps them
  sparse itself, so no view of them is needed). Only floating-point leaves are
  differentiated and updated; other leaves (int step counters, tables) pass through
  unchanged. The optimizer state must then be
  `optimizer.init(jaxprune.tree.float_part(params))` (the same as
  `optimizer.init(params)` when every leaf is a float array).

  Args:
    loss_fn: the loss.
    optimizer: any optax transformation (typically `pruned(...)`); it gets `params`.
    donate: donate params and optimizer state buffers (saves memory on
      accelerators; do not reuse the inputs afterwards).

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
    >>> rng_data = jax.random.key_data(jax.random.key(0))   # raw key data
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> tx = jaxprune.pruned(optax.adam(1e-3), masks)
    >>> step = jaxprune.make_train_step(loss_fn, tx)
    >>> params, opt_state, loss = step(params, tx.init(params), batch, rng_data, 0)
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


def make_gradient_step(loss_fn: LossFn) -> Callable[..., PyTree]:
  """A jitted `gradients(params, batch, rng_data, step) -> grads` of `loss_fn` over the
  float leaves (None elsewhere), with the train step's per-step `rng`: what a
  `saliency_score()` target ranks by when `prune_retrain` prunes.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8)), "y": jnp.ones((16, 4))}
    >>> def loss_fn(params, batch):
    ...   h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    ...   return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)
    >>> rng_data = jax.random.key_data(jax.random.key(0))   # raw key data
    >>> grads = jaxprune.training.make_gradient_step(loss_fn)(params, batch, rng_data, 0)
    >>> target = jaxprune.Prune(0.5, score=jaxprune.scores.saliency_score(grads))
  """
  wants_rng = takes_rng(loss_fn)

  def gradients(params, batch, rng_data, step_index):
    rng = None
    if wants_rng:
      rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step_index)
    return jax.grad(lambda t: _loss_and_aux(loss_fn, merge_float_part(params, t), batch, rng)[0])(
        float_part(params))

  return jax.jit(gradients)


def make_eval_step(
    loss_fn: LossFn, metric: Metric = loss_metric
) -> Callable[[PyTree, Any], tuple[jax.Array, jax.Array]]:
  """A jitted `eval_step(params, batch) -> (loss, metric.of_batch(loss, aux))`.

  Evaluation is deterministic: a `loss_fn` with an `rng` parameter gets `rng=None`
  (switch dropout off on None). One forward pass gives both figures. The step
  records its metric (`eval_step.metric`), which `jaxprune.training.evaluate` reads.

  Raises (when first traced):
    ValueError: the metric's value of a batch is not a scalar.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> batch = {"x": jax.random.normal(kx, (16, 8)), "y": jnp.ones((16, 4))}
    >>> def loss_fn(params, batch):
    ...   h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    ...   return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)
    >>> eval_step = jaxprune.training.make_eval_step(loss_fn)
    >>> loss, value = eval_step(params, batch)   # the default metric is the loss
    >>> bool(loss == value)
    True
  """
  wants_rng = takes_rng(loss_fn)

  def eval_step(params, batch):
    call = (lambda p, b: loss_fn(p, b, rng=None)) if wants_rng else loss_fn
    loss, aux = _loss_and_aux(call, params, batch, None)
    value = metric.of_batch(loss, aux)
    if jnp.shape(value) != ():
      raise ValueError(f"metric {metric.name!r} gave a value of shape {jnp.shape(value)} "
                       "for a batch; of_batch must return a scalar (the batch's mean)")
    return loss, value

  jitted = jax.jit(eval_step)
  jitted.metric = metric
  return jitted


def prune_step(
    params: PyTree,
    opt_state: PyTree,
    target: Target | float | str,
    where: Where,
) -> tuple[PyTree, PyTree]:
  """One prune: new masks from `target`, held in the `pruned` state, params zeroed.

  The masks live in `opt_state` (the state of a `jaxprune.pruned` optimizer,
  anywhere inside it): the masks held there are `previous` (no pruned weight is
  revived) and the new ones replace them; read them with `get_masks(opt_state)`.
  `target` is a pruning method (`Prune(0.5, scope="global")`, `NM(2, 4)`, any
  `Target`), a float (`Prune(target)`: per leaf by `|w|`) or `"n:m"`. Jittable: a
  `Prune`'s sparsity may be traced, so one compilation serves a whole schedule.

  Returns:
    `(params, opt_state)`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> where = jaxprune.select(params)
    >>> tx = jaxprune.pruned(optax.adam(1e-3), jaxprune.ranked_masks(params, 0.0, where))
    >>> params, opt_state = jaxprune.prune_step(params, tx.init(params), 0.75, where)
    >>> float(jaxprune.get_masks(opt_state)["fc1"]["kernel"].mean())   # 48 of 64 pruned
    0.25
  """
  masks = as_target(target).masks(params, where, previous=get_masks(opt_state))
  return apply_masks(params, masks), replace_masks(opt_state, masks)

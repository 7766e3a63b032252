"""A tiny Flax Linen ResNet: a conv stem, two residual blocks, BatchNorm in eval mode.

`stem_conv` (3x3, IN_CH -> CH) -> `stem_bn` -> relu, then two `ResBlock`s
(`conv1` CH -> MID, `bn1`, relu, `conv2` MID -> CH, `bn2`, add the block's input,
relu), global average pooling and a `head` Dense (CH -> CLASSES). Convolutions
have no bias (BatchNorm follows each), NHWC layout, kernels (3, 3, in, out).

BatchNorm runs with `use_running_average=True`. What a Linen user does with the
running statistics: they live in the `batch_stats` collection next to `params`,
and the apply function pruning sees closes over them, exactly as
`flax.training.train_state` code writes an eval step:
`model.apply({"params": params, "batch_stats": batch_stats}, x)`. So
`apply_fn(params, x)` takes only the `params` collection; `batch_stats` are
constants of the program (the non-targeted state), not leaves of `params`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import random_params

IN_CH, CH, MID, CLASSES, BLOCKS = 3, 8, 6, 5, 2
BATCH, SIZE = 2, 6


class ResBlock(nn.Module):
  channels: int
  mid: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.mid, (3, 3), use_bias=False, name="conv1")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(h))
    h = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv2")(h)
    h = nn.BatchNorm(use_running_average=True, name="bn2")(h)
    return nn.relu(x + h)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(CH, (3, 3), use_bias=False, name="stem_conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(x))
    for i in range(BLOCKS):
      x = ResBlock(CH, MID, name=f"block{i}")(x)
    return nn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


def build():
  """`(apply_fn, params, (x,))`: `params` is the `params` collection only.

  Shapes and paths from Linen's own init, traced abstractly (`jax.eval_shape`);
  values from `random_params.fill` (BatchNorm scales around 1, running variances
  in [1, 2))."""
  model = ResNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, SIZE, SIZE, IN_CH)), jnp.float32)
  variables = random_params.fill(jax.eval_shape(model.init, jax.random.key(0), x), seed=1)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def apply_fn(params, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x)

  return apply_fn, params, (x,)

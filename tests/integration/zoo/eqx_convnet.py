"""A tiny Equinox conv net: two 3x3 `eqx.nn.Conv2d`s with relu, mean pooling, a Linear head.

`conv0` (C0, IN_CH, 3, 3) with bias (C0, 1, 1), `conv1` (C1, C0, 3, 3) with bias
(C1, 1, 1), `head` (CLASSES, C1). One example is (IN_CH, SIZE, SIZE); the batch
goes through `jax.vmap`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import random_params

IN_CH, C0, C1, CLASSES, SIZE, BATCH = 3, 6, 5, 4, 6, 2


class ConvNet(eqx.Module):
  conv0: eqx.nn.Conv2d
  conv1: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k0, k1, k2 = jax.random.split(key, 3)
    self.conv0 = eqx.nn.Conv2d(IN_CH, C0, 3, padding=1, key=k0)
    self.conv1 = eqx.nn.Conv2d(C0, C1, 3, padding=1, key=k1)
    self.head = eqx.nn.Linear(C1, CLASSES, key=k2)

  def __call__(self, x):
    h = jax.nn.relu(self.conv0(x))
    h = jax.nn.relu(self.conv1(h))
    return self.head(h.mean(axis=(1, 2)))


def build():
  """`(apply_fn, model, (x,))` with `x` (BATCH, IN_CH, SIZE, SIZE). The module built
  abstractly (`eqx.filter_eval_shape`), its arrays from `random_params.fill`."""
  model = random_params.fill(eqx.filter_eval_shape(ConvNet, jax.random.key(0)), seed=0)

  def apply_fn(model, x):
    return jax.vmap(model)(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, IN_CH, SIZE, SIZE)), jnp.float32)
  return apply_fn, model, (x,)

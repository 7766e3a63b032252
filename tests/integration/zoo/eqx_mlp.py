"""A tiny Equinox MLP: `eqx.nn.MLP(IN -> WIDTH -> WIDTH -> OUT)`, relu, batched with `jax.vmap`.

The params are the module itself; paths `layers/0/weight` (WIDTH, IN),
`layers/0/bias` (WIDTH,), ..., `layers/2/weight` (OUT, WIDTH). Equinox weights
are `(out, in)`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import random_params

IN, WIDTH, OUT, DEPTH, BATCH = 6, 8, 3, 2, 4


def build():
  """`(apply_fn, model, (x,))` with `x` (BATCH, IN). The module built abstractly
  (`eqx.filter_eval_shape`), its arrays from `random_params.fill`."""
  model = random_params.fill(eqx.filter_eval_shape(
      eqx.nn.MLP, IN, OUT, WIDTH, DEPTH, activation=jax.nn.relu, key=jax.random.key(0)), seed=0)

  def apply_fn(model, x):
    return jax.vmap(model)(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, IN)), jnp.float32)
  return apply_fn, model, (x,)

"""A zoo of tiny models, one per framework, behind one adapter (`ZooModel`).

Every model maps inputs `x [B, 8]` to logits `[B, 4]` and is trained on the same
synthetic task (`batch_at`). Hidden widths are 8-16 and every input (contraction)
axis of a weight is a multiple of 4, so 2:4 masks apply along it.

The adapter, for model `z`:

* `z.params`: the parameter pytree a user of that framework prunes;
* `z.apply(params, x)`: logits, a pure jittable function. `x` may also be a
  `(x, y)` batch, so `z.apply` is directly a `prune_retrain` teacher `apply_fn`;
* `z.loss(params, batch, rng=None)`: mean cross-entropy over `batch = (x, y)`,
  with dropout-like noise on the hidden activations when `rng` is given;
  `z.loss_rng(params, batch, rng)` is the same with `rng` a required argument;
* `z.where`: the selection the model prunes: `jaxprune.select(params)` (every rank >= 2
  float leaf but embeddings), or for the scanned model its kernels only;
* `z.input_axis`: the contraction axis of the selected weights (-2 for Flax's
  `(in, out)` kernels, -1 for Equinox's `(out, in)` weights);
* `z.put_back(params)`: puts a params tree into a running model of the framework
  the way a user would, and returns its outputs on `X_FIXED`;
* `z.train(tx, params, num_steps, on_check, check_every)`: trains in the
  framework's own idiom, calling `on_check(step, params)` every `check_every`
  steps and at the end, and returns `(params, opt_state)`;
* `z.retrain_params`: what `prune_retrain` starts from: `params`, except that the
  plain model's float16 leaf is float32 there (see `_f16_to_f32`);
* `z.kernel_paths`: the paths `z.where` selects, and `z.default_paths` those the
  default `select` must choose (nnx's trailing `/value` left out); `z.glob` with
  `z.glob_paths`, and `z.slash_pattern` (a pattern with `/` naming exactly one
  leaf) for the `select` tests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxprune

IN, HIDDEN, CLASSES = 8, 16, 4
TRAIN_SIZE, EVAL_SIZE = 16, 32
KEEP = 0.8  # keep probability of the dropout-like noise
_TEACHER = np.random.default_rng(1234).normal(size=(IN, CLASSES)).astype(np.float32)
X_FIXED = np.random.default_rng(99).normal(size=(4, IN)).astype(np.float32)


def make_batch(seed: int, size: int = TRAIN_SIZE) -> tuple[np.ndarray, np.ndarray]:
  r = np.random.default_rng(seed)
  x = r.normal(size=(size, IN)).astype(np.float32)
  return x, np.argmax(x @ _TEACHER, axis=-1).astype(np.int32)


def batch_at(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of a global step: a pure function of it (exact resume)."""
  return make_batch(10_000 + int(step))


EVAL_BATCHES = [make_batch(1, EVAL_SIZE), make_batch(2, EVAL_SIZE)]


def _inputs(x_or_batch):
  return x_or_batch[0] if isinstance(x_or_batch, tuple) else x_or_batch


def drop(h: jax.Array, rng) -> jax.Array:
  """Dropout-like noise: a bernoulli keep mask drawn from `rng` (none if `rng` is None)."""
  if rng is None:
    return h
  keep = jax.random.bernoulli(rng, KEEP, h.shape)
  return jnp.where(keep, h / KEEP, jnp.zeros((), h.dtype))


def cross_entropy(logits: jax.Array, y) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


@dataclasses.dataclass(frozen=True)
class ZooModel:
  name: str
  params: Any
  apply: Callable[..., jax.Array]
  loss: Callable[..., jax.Array]
  loss_rng: Callable[..., jax.Array]
  where: Any
  input_axis: int
  put_back: Callable[[Any], np.ndarray]
  train: Callable[..., tuple[Any, Any]]
  kernel_paths: tuple[str, ...]
  default_paths: tuple[str, ...]
  glob: str
  glob_paths: tuple[str, ...]
  slash_pattern: str
  retrain_params: Any  # what `prune_retrain` starts from


def _adapter(name, params, forward, **fields) -> ZooModel:
  """A `ZooModel` from `forward(params, x, rng) -> logits`."""

  def apply(params, x):
    return forward(params, _inputs(x), None)

  def loss(params, batch, rng=None):
    x, y = batch
    return cross_entropy(forward(params, x, rng), y)

  def loss_rng(params, batch, rng):
    return loss(params, batch, rng=rng)

  fields.setdefault("default_paths", fields["kernel_paths"])
  fields.setdefault("where", jaxprune.select(params))
  fields.setdefault("retrain_params", params)
  return ZooModel(name=name, params=params, apply=apply, loss=loss, loss_rng=loss_rng, **fields)


def _checkpoints(num_steps: int, check_every: int) -> set[int]:
  return {1, num_steps, *range(check_every, num_steps + 1, check_every)}


def _step_key(step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(7), step)


# ----------------------------------------------------------------------------- Flax Linen


class LinenNet(nn.Module):
  """Auto-named layers: `Conv_0` on x seen as a 1x2 image of 4 channels, `Dense_0`, `Dense_1`."""

  @nn.compact
  def __call__(self, x, rng=None):
    h = x.reshape(x.shape[0], 1, 2, IN // 2)
    h = jnp.tanh(nn.Conv(8, kernel_size=(1, 2))(h)).reshape(x.shape[0], -1)  # 16 wide
    h = drop(jnp.tanh(nn.Dense(HIDDEN)(h)), rng)
    return nn.Dense(CLASSES)(h)


@functools.cache
def build_linen() -> ZooModel:
  module = LinenNet()
  variables = module.init(jax.random.key(0), jnp.zeros((1, IN)))
  params = variables["params"]

  def forward(p, x, rng):
    return module.apply({"params": p}, x, rng)

  def put_back(p):
    return np.asarray(module.apply({"params": p}, X_FIXED))

  def train(tx, params, num_steps, on_check, check_every=50):
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def step(state, batch, rng):
      grads = jax.grad(lambda p: cross_entropy(
          forward(p, batch[0], rng), batch[1]))(state.params)
      return state.apply_gradients(grads=grads)

    checks = _checkpoints(num_steps, check_every)
    for i in range(num_steps):
      state = step(state, batch_at(i), _step_key(i))
      if i + 1 in checks:
        on_check(i + 1, state.params)
    return state.params, state.opt_state

  kernels = ("Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel")
  return _adapter(
      "linen", params, forward, input_axis=-2, put_back=put_back, train=train,
      kernel_paths=kernels, glob="Dense_*", glob_paths=kernels[1:],
      slash_pattern="Dense_0/kernel",
  )


# ----------------------------------------------------------------------------- Flax NNX


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.dense2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x, rng=None):
    h = drop(jnp.tanh(self.dense1(x)), rng)
    return self.head(jnp.tanh(self.dense2(h)))


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(IN, IN, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class NnxScanNet(nnx.Module):
  """Three identical blocks created with `nnx.vmap`: `blocks/linear/kernel` is `(3, 8, 8)`."""

  def __init__(self, rngs: nnx.Rngs, num_layers: int = 3):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(IN, CLASSES, rngs=rngs)

  def __call__(self, x, rng=None):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return self.head(drop(body(x, self.blocks), rng))


def _nnx_zoo(name: str, model: nnx.Module, select=None, **fields) -> ZooModel:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if select is not None:
    fields["where"] = select(params)

  def forward(p, x, rng):
    return nnx.merge(graphdef, p, rest)(x, rng)

  def put_back(p):
    running = nnx.clone(model)
    nnx.update(running, p)
    return np.asarray(running(X_FIXED))

  def train(tx, params, num_steps, on_check, check_every=50):
    running = nnx.clone(model)
    nnx.update(running, params)
    optimizer = nnx.Optimizer(running, tx, wrt=nnx.Param)

    @nnx.jit
    def step(running, optimizer, batch, rng):
      graphdef, params, rest = nnx.split(running, nnx.Param, ...)

      def loss(p):
        return cross_entropy(nnx.merge(graphdef, p, rest)(batch[0], rng), batch[1])

      optimizer.update(running, jax.grad(loss)(params))

    checks = _checkpoints(num_steps, check_every)
    for i in range(num_steps):
      step(running, optimizer, batch_at(i), _step_key(i))
      if i + 1 in checks:
        on_check(i + 1, nnx.state(running, nnx.Param))
    return nnx.state(running, nnx.Param), optimizer.opt_state

  return _adapter(name, params, forward, input_axis=-2, put_back=put_back, train=train,
                  **fields)


@functools.cache
def build_nnx() -> ZooModel:
  kernels = ("dense1/kernel", "dense2/kernel", "head/kernel")
  return _nnx_zoo("nnx", NnxNet(nnx.Rngs(0)), kernel_paths=kernels, glob="kernel",
                  glob_paths=kernels, slash_pattern="dense2/kernel")


@functools.cache
def build_nnx_scan() -> ZooModel:
  kernels = ("blocks/linear/kernel", "head/kernel")
  # The stacked bias `blocks/linear/bias` is (3, 8), rank 2: the default select leaves it
  # out by name, as it does every `bias`.
  return _nnx_zoo("nnx_scan", NnxScanNet(nnx.Rngs(0)),
                  select=lambda p: jaxprune.select(p), kernel_paths=kernels,
                  default_paths=kernels, glob="linear",
                  glob_paths=("blocks/linear/bias", "blocks/linear/kernel"),
                  slash_pattern="blocks/linear/kernel")


# ----------------------------------------------------------------------------- Equinox


class EqxNet(eqx.Module):
  layers: tuple
  activation: Callable  # not an array: `None` in `eqx.partition`'s params

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.layers = (eqx.nn.Linear(IN, HIDDEN, key=k1), eqx.nn.Linear(HIDDEN, HIDDEN, key=k2),
                   eqx.nn.Linear(HIDDEN, CLASSES, key=k3))
    self.activation = jax.nn.tanh

  def __call__(self, x, rng=None):
    h = drop(self.activation(jax.vmap(self.layers[0])(x)), rng)
    h = self.activation(jax.vmap(self.layers[1])(h))
    return jax.vmap(self.layers[2])(h)


@functools.cache
def build_equinox() -> ZooModel:
  params, static = eqx.partition(EqxNet(jax.random.key(0)), eqx.is_array)

  def forward(p, x, rng):
    return eqx.combine(p, static)(x, rng)

  def put_back(p):
    return np.asarray(eqx.combine(p, static)(X_FIXED))

  def train(tx, params, num_steps, on_check, check_every=50):
    model = eqx.combine(params, static)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def model_loss(model, batch, rng):
      return cross_entropy(model(batch[0], rng), batch[1])

    @eqx.filter_jit
    def step(model, opt_state, batch, rng):
      _, grads = eqx.filter_value_and_grad(model_loss)(model, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
      return eqx.apply_updates(model, updates), opt_state

    checks = _checkpoints(num_steps, check_every)
    for i in range(num_steps):
      model, opt_state = step(model, opt_state, batch_at(i), _step_key(i))
      if i + 1 in checks:
        on_check(i + 1, eqx.filter(model, eqx.is_array))
    return eqx.filter(model, eqx.is_array), opt_state

  weights = ("layers/0/weight", "layers/1/weight", "layers/2/weight")
  return _adapter(
      "equinox", params, forward, input_axis=-1, put_back=put_back, train=train,
      kernel_paths=weights, glob="weight", glob_paths=weights, slash_pattern="layers/0/weight",
  )


# ----------------------------------------------------------------------------- plain pytree


class Head(NamedTuple):
  w: Any
  b: Any


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _floats(tree):
  """The floating-point leaves of `tree`, `None` in place of the others."""
  return jax.tree.map(lambda x: x if _is_float(x) else None, tree)


def _others(tree):
  return jax.tree.map(lambda x: None if _is_float(x) else x, tree)


def _combine(floats, others):
  return jax.tree.map(lambda a, b: b if a is None else a, floats, others,
                      is_leaf=lambda x: x is None)


def _f16_to_f32(x):
  # `prune_retrain` trains leaves at their own dtype, and Adam cannot train float16
  # weights (its second moment underflows to 0 and the update divides by eps = 0 in
  # float16: NaN after one step, with or without pruning), so it retrains a float32
  # copy of the float16 leaf. bfloat16 has float32's range and trains as is.
  return x.astype(jnp.float32) if x.dtype == jnp.float16 else x


@functools.cache
def build_plain() -> ZooModel:
  r = np.random.default_rng(0)
  normal = lambda *shape: r.normal(size=shape).astype(np.float32) / np.sqrt(shape[0])
  params = {
      "layers": [
          {"w": jnp.asarray(normal(IN, HIDDEN), jnp.bfloat16), "b": jnp.zeros(HIDDEN)},
          {"w": jnp.asarray(normal(HIDDEN, HIDDEN), jnp.float16), "b": None},
      ],
      "head": Head(w=jnp.asarray(normal(HIDDEN, CLASSES)), b=jnp.zeros(CLASSES)),
      "embed": jnp.asarray(normal(4, IN)),  # an embedding table: never selected by default
      # a step counter, None, and an int table: never selected
      "extras": (jnp.zeros((), jnp.int32), None, jnp.arange(16, dtype=jnp.int32).reshape(4, 4)),
  }

  def forward(p, x, rng):
    f32 = lambda a: a.astype(jnp.float32)
    h = x + f32(p["embed"]).mean(axis=0)
    layer0, layer1 = p["layers"]
    h = drop(jnp.tanh(h @ f32(layer0["w"]) + layer0["b"]), rng)
    h = jnp.tanh(h @ f32(layer1["w"]))
    return h @ p["head"].w + p["head"].b

  def put_back(p):
    return np.asarray(jax.jit(forward, static_argnums=2)(p, X_FIXED, None))

  def train(tx, params, num_steps, on_check, check_every=50):
    # Mixed precision, the usual way: the optimizer works on float32 master copies of
    # the floating-point leaves (Adam's moments underflow in float16), the int leaves
    # are left out of jax.grad (which refuses them), and params are stored back at
    # their own dtypes. Masks and `where` of the whole tree line up with the master
    # tree slot by slot (`None` where an int leaf is).
    dtypes = jax.tree.map(lambda x: x.dtype, _floats(params))
    master = jax.tree.map(lambda x: x.astype(jnp.float32), _floats(params))
    others = _others(params)
    opt_state = tx.init(master)
    stored = lambda master, others: _combine(
        jax.tree.map(lambda x, d: x.astype(d), master, dtypes), others)

    @jax.jit
    def step(master, others, opt_state, batch, rng):
      grads = jax.grad(lambda f: cross_entropy(
          forward(_combine(f, others), batch[0], rng), batch[1]))(master)
      updates, opt_state = tx.update(grads, opt_state, master)
      extras = others["extras"]
      others = {**others, "extras": (extras[0] + 1, *extras[1:])}
      return optax.apply_updates(master, updates), others, opt_state

    checks = _checkpoints(num_steps, check_every)
    for i in range(num_steps):
      master, others, opt_state = step(master, others, opt_state, batch_at(i), _step_key(i))
      if i + 1 in checks:
        on_check(i + 1, stored(master, others))
    return stored(master, others), opt_state

  weights = ("layers/0/w", "layers/1/w", "head/w")
  return _adapter(
      "plain", params, forward, input_axis=-2, put_back=put_back, train=train,
      kernel_paths=weights, glob="w", glob_paths=weights,
      slash_pattern="layers/1/w", retrain_params=jax.tree.map(_f16_to_f32, params),
  )


ZOO = [
    pytest.param(build_linen, id="linen"),
    pytest.param(build_nnx, id="nnx"),
    pytest.param(build_nnx_scan, id="nnx_scan"),
    pytest.param(build_equinox, id="equinox"),
    pytest.param(build_plain, id="plain"),
]

"""Tests of the optax wrapper `pruned`, `get_masks` and `set_masks`.

The reference for every "kept weights" comparison is the inner optimizer run alone
on the masked gradients (the wrapper zeroes pruned gradients before `inner` sees
them), fed the gradients computed at the wrapper's params. Elementwise optimizers
then give kept weights bit-identical trajectories, so they are compared exactly;
pruned weights must be bitwise `+0.0`.

Arrays are tiny and every jitted step is compiled once per test.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import jaxprune

# Random values from NumPy: jax.random would compile a sampler per leaf shape.
X = jnp.asarray(np.random.default_rng(1).standard_normal((16, 6)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(2).standard_normal((16, 4)), jnp.float32)


def is_none(x):
  return x is None


def make_params(seed=0, dtypes=None):
  """fc1/fc2 kernels are selected by `select`; biases and the embedding are not."""
  dtypes = dtypes or {}
  shapes = {
      "fc1": {"kernel": (6, 8), "bias": (8,)},
      "fc2": {"kernel": (8, 4), "bias": (4,)},
      "embed": {"embedding": (5, 6)},
  }
  rng = np.random.default_rng(seed)
  out = {}
  for layer, leaves in shapes.items():
    out[layer] = {}
    for name, shape in leaves.items():
      dtype = dtypes.get(f"{layer}/{name}", jnp.float32)
      out[layer][name] = jnp.asarray(rng.standard_normal(shape).astype(dtype))
  return out


def loss_fn(params):
  f32 = jax.tree.map(lambda w: w.astype(jnp.float32), params)
  h = jnp.tanh(X @ f32["fc1"]["kernel"] + f32["fc1"]["bias"])
  out = h @ f32["fc2"]["kernel"] + f32["fc2"]["bias"]
  return ((out - Y) ** 2).mean() + 0.01 * (f32["embed"]["embedding"] ** 2).sum()


grad_fn = jax.jit(jax.grad(loss_fn))


def masks_at(params, sparsity, previous=None):
  return jaxprune.ranked_masks(params, sparsity, jaxprune.select(params), previous=previous)


def map_masked(fn, masks, *trees):
  """`fn(mask, leaf, ...)` on every slot of `masks` (None: a leaf not pruned)."""
  return jax.tree.map(fn, masks, *trees, is_leaf=lambda x: x is None)


def mask_grads(grads, masks):
  """What the wrapper feeds `inner`: pruned gradients zeroed, others untouched."""
  return map_masked(lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype)),
                    masks, grads)


def assert_pruned_zero(params, masks):
  """Every pruned weight is bitwise +0.0 (not -0.0, not a tiny residue)."""
  checked = 0
  for m, w in zip(jax.tree.leaves(masks, is_leaf=is_none), jax.tree.leaves(params)):
    if m is None:
      continue
    m, w = np.asarray(m), np.asarray(w).astype(np.float32)
    assert (~m).any(), "test setup: nothing pruned"
    values = w[~m]
    assert np.all(values == 0.0) and not np.signbit(values).any(), values[values != 0][:5]
    checked += 1
  assert checked


def assert_kept_equal(params, ref, masks, exact=False):
  """Kept weights of selected leaves and all unselected leaves equal `ref`.

  `exact`: bitwise. Otherwise within a few float32 ulps: the wrapper's and the
  reference's programs are fused differently by XLA, and over many Adam steps
  (division, sqrt) last-bit differences appear. Any real deviation (a pruned
  gradient reaching the moments or a global norm, a wrong update) is far larger.
  """
  for m, w, r in zip(jax.tree.leaves(masks, is_leaf=is_none), jax.tree.leaves(params),
                     jax.tree.leaves(ref)):
    assert w.dtype == r.dtype
    w, r = np.asarray(w).astype(np.float32), np.asarray(r).astype(np.float32)
    if m is not None:
      w, r = w[np.asarray(m)], r[np.asarray(m)]
    if exact:
      np.testing.assert_array_equal(w, r)
    else:
      np.testing.assert_allclose(w, r, rtol=1e-5, atol=1e-6)


def make_paired_step(tx, inner, masks):
  """One jitted step of the wrapper and of the reference, both fed the same gradients."""

  @jax.jit
  def step(params, state, ref_params, ref_state):
    grads = grad_fn(params)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = inner.update(mask_grads(grads, masks), ref_state, ref_params)
    return (optax.apply_updates(params, updates), state,
            optax.apply_updates(ref_params, ref_updates), ref_state)

  return step


# ------------------------------------------------------------------- fixed masks, 200 steps

INNERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    # The clip is active (norms ~1 >> 0.05): kept updates depend on the global norm,
    # which must count kept gradients only.
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(0.05),
                                      optax.adamw(1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_200_jitted_steps_pruned_stay_zero_kept_follow_inner(name):
  params = make_params()
  masks = masks_at(params, 0.5)
  inner = INNERS[name]()
  tx = jaxprune.pruned(inner, masks)
  step = make_paired_step(tx, inner, masks)
  state, ref_params, ref_state = tx.init(params), params, inner.init(params)
  for _ in range(200):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
    # Checked every step on the first few, then at the end (keeps the test fast).
    if int(state.count) <= 3:
      assert_pruned_zero(params, masks)
  assert step._cache_size() == 1
  assert int(state.count) == 200
  assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)
  # The kept weights did train (a wrapper that returned zeros would fail above only
  # through the reference, so make the movement explicit).
  start = make_params()
  moved = np.abs(np.asarray(params["fc1"]["kernel"] - start["fc1"]["kernel"]))
  assert moved[np.asarray(masks["fc1"]["kernel"])].min() > 0


def test_gradient_of_pruned_weights_is_zeroed_before_inner():
  """`inner` sees `g * m`: a transform that keeps its input as its state shows it."""
  params = make_params()
  masks = masks_at(params, 0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  recorder = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                          lambda updates, state, params=None: (updates, updates))
  tx = jaxprune.pruned(recorder, masks)
  _, state = tx.update(grads, tx.init(params), params)
  for m, g in zip(jax.tree.leaves(masks, is_leaf=is_none), jax.tree.leaves(state.inner_state)):
    expected = np.ones(g.shape) if m is None else np.asarray(m, np.float32)
    np.testing.assert_array_equal(np.asarray(g), expected)


def test_unselected_leaves_pass_through_untouched():
  params = make_params()
  masks = masks_at(params, 0.5)
  inner = optax.adam(1e-2)
  tx = jaxprune.pruned(inner, masks)
  grads = grad_fn(params)
  # One program: wrapper and reference may be fused differently (last-bit differences).
  out, ref = jax.jit(lambda g, p: (tx.update(g, tx.init(p), p)[0],
                                   inner.update(g, inner.init(p), p)[0]))(grads, params)
  for name in ("fc1/bias", "fc2/bias", "embed/embedding"):
    layer, leaf = name.split("/")
    np.testing.assert_allclose(out[layer][leaf], ref[layer][leaf], rtol=1e-6, atol=0)
  # ... and selected leaves give -w where pruned, the inner update where kept.
  m = np.asarray(masks["fc1"]["kernel"])
  u, w, r = (np.asarray(t["fc1"]["kernel"]) for t in (out, params, ref))
  np.testing.assert_array_equal(u[~m], -w[~m])
  np.testing.assert_allclose(u[m], r[m], rtol=1e-6, atol=0)


def test_decoupled_weight_decay_cannot_move_pruned_weights():
  """Zero gradients: only adamw's decay acts. Gradient masking alone would leave
  pruned weights at w * (1 - lr * wd)**t, never 0; the wrapper holds them at 0."""
  params = make_params()
  masks = masks_at(params, 0.6)
  inner = optax.adamw(0.1, weight_decay=0.5)
  tx = jaxprune.pruned(inner, masks)

  @jax.jit
  def step(params, state, naive_params, naive_state):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, state, params)
    naive_updates, naive_state = inner.update(zeros, naive_state, naive_params)
    return (optax.apply_updates(params, updates), state,
            optax.apply_updates(naive_params, naive_updates), naive_state)

  start = params
  state, naive_params, naive_state = tx.init(params), params, inner.init(params)
  for _ in range(20):
    params, state, naive_params, naive_state = step(params, state, naive_params, naive_state)
    assert_pruned_zero(params, masks)
  assert_kept_equal(params, naive_params, masks)
  m = np.asarray(masks["fc1"]["kernel"])
  w0, w, naive = (np.abs(np.asarray(t["fc1"]["kernel"])) for t in (start, params, naive_params))
  # The decay is active: kept weights shrank ...
  assert np.all(w[m] < w0[m])
  # ... and with gradients masked but no `-w` rewrite, pruned weights only shrink.
  assert np.all(naive[~m] > 0) and np.all(naive[~m] < w0[~m])


# ------------------------------------------------------------------- masks changed mid-run


def test_set_masks_mid_training_takes_effect_on_next_update():
  params = make_params()
  masks0 = masks_at(params, 0.25)
  inner = INNERS["adamw"]()
  tx = jaxprune.pruned(inner, masks0)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(10):
    params, state = step(params, state)
  masks1 = masks_at(params, 0.6, previous=masks0)
  newly = np.asarray(masks0["fc1"]["kernel"]) & ~np.asarray(masks1["fc1"]["kernel"])
  assert newly.any() and np.all(np.asarray(params["fc1"]["kernel"])[newly] != 0)

  new_state = jaxprune.set_masks(state, masks1)
  # Functional: the old state still holds the old masks; the inner state is kept.
  np.testing.assert_array_equal(jaxprune.get_masks(state)["fc1"]["kernel"],
                                masks0["fc1"]["kernel"])
  np.testing.assert_array_equal(jaxprune.get_masks(new_state)["fc1"]["kernel"],
                                masks1["fc1"]["kernel"])
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert new_state.inner_state is state.inner_state

  # Naive contrast: zeroing the weights and masking gradients, with the momentum
  # built up over 10 steps, revives the newly pruned weights at once.
  @jax.jit
  def naive_step(params, inner_state):
    params = jaxprune.apply_masks(params, masks1)
    updates, _ = inner.update(mask_grads(grad_fn(params), masks1), inner_state, params)
    return optax.apply_updates(params, updates)

  naive_next = naive_step(params, state.inner_state)
  assert np.any(np.asarray(naive_next["fc1"]["kernel"])[newly] != 0)

  params, state = step(params, new_state)
  assert_pruned_zero(params, masks1)
  for _ in range(20):
    params, state = step(params, state)
  assert_pruned_zero(params, masks1)
  assert int(state.count) == 31
  assert step._cache_size() == 1


# ------------------------------------------------------------------- dtypes


def test_bfloat16_and_mixed_dtype_params():
  # Selected leaves in bf16 and f32; unselected ones in bf16, f16 and f32.
  dtypes = {"fc1/kernel": jnp.bfloat16, "fc1/bias": jnp.bfloat16, "fc2/bias": jnp.float16,
            "embed/embedding": jnp.bfloat16}
  params = make_params(dtypes=dtypes)
  masks = masks_at(params, 0.5)
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx = jaxprune.pruned(inner, masks)
  step = make_paired_step(tx, inner, masks)
  state, ref_params, ref_state = tx.init(params), params, inner.init(params)
  for _ in range(30):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
  for w, r in zip(jax.tree.leaves(params), jax.tree.leaves(make_params(dtypes=dtypes))):
    assert w.dtype == r.dtype
  assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)


def test_low_precision_updates_of_float32_params_still_land_on_zero():
  """bf16 gradients of f32 weights with sgd give bf16 updates; `-w` rounded to bf16
  would leave pruned weights near, not at, zero."""
  params = make_params()
  masks = masks_at(params, 0.5)
  grads = jax.tree.map(lambda w: jnp.ones(w.shape, jnp.bfloat16), params)
  tx = jaxprune.pruned(optax.sgd(0.1), masks)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert_pruned_zero(new, masks)
  assert new["fc1"]["kernel"].dtype == jnp.float32
  sgd = optax.sgd(0.1)
  ref = optax.apply_updates(params, sgd.update(grads, sgd.init(params), params)[0])
  assert_kept_equal(new, ref, masks, exact=True)


# ------------------------------------------------------------------- placement


def test_pruned_wrapping_the_chain_clips_by_the_kept_norm_only():
  params = make_params()
  masks = masks_at(params, 0.5)
  # Gradients of pruned weights are huge: a norm that counted them would shrink the rest.
  grads = jax.tree.map(lambda w: jnp.full(w.shape, 0.01, w.dtype), params)
  grads = map_masked(
      lambda m, g: g if m is None else jnp.where(m, g, jnp.asarray(1e3, g.dtype)), masks, grads)
  kept = mask_grads(grads, masks)
  kept_norm = float(optax.global_norm(kept))
  max_norm = kept_norm / 2  # the kept gradients alone are clipped by exactly 1/2
  tx = jaxprune.pruned(optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(1.0)), masks)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = jax.tree.map(lambda g: -g * (max_norm / kept_norm), kept)
  assert_kept_equal(updates, expected, masks)
  assert_pruned_zero(optax.apply_updates(params, updates), masks)
  # Clipping outside `pruned` counts the pruned gradients too: the kept updates shrink far more.
  outside = optax.chain(optax.clip_by_global_norm(max_norm), jaxprune.pruned(optax.sgd(1.0), masks))
  out_updates, _ = outside.update(grads, outside.init(params), params)
  ratio = float(optax.global_norm(mask_grads(out_updates, masks))) / kept_norm
  assert ratio < 0.01 * (max_norm / kept_norm)


def test_chain_clip_then_pruned_adamw():
  params = make_params()
  masks = masks_at(params, 0.5)
  clip, adamw = optax.clip_by_global_norm(0.1), optax.adamw(1e-2, weight_decay=0.1)
  tx = optax.chain(optax.clip_by_global_norm(0.1),
                   jaxprune.pruned(optax.adamw(1e-2, weight_decay=0.1), masks))

  @jax.jit
  def step(params, state, ref_params, ref_state):
    grads = grad_fn(params)
    updates, state = tx.update(grads, state, params)
    clipped, _ = clip.update(grads, clip.init(params))  # the clip sees all gradients
    ref_updates, ref_state = adamw.update(mask_grads(clipped, masks), ref_state, ref_params)
    return (optax.apply_updates(params, updates), state,
            optax.apply_updates(ref_params, ref_updates), ref_state)

  state, ref_params, ref_state = tx.init(params), params, adamw.init(params)
  for _ in range(30):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
  assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)
  np.testing.assert_array_equal(jaxprune.get_masks(state)["fc2"]["kernel"],
                                masks["fc2"]["kernel"])


def test_multisteps_wraps_pruned():
  k = 3
  params = make_params()
  masks = masks_at(params, 0.5)
  tx = optax.MultiSteps(jaxprune.pruned(optax.adamw(1e-2, weight_decay=0.1), masks), k)
  ref = optax.MultiSteps(optax.adamw(1e-2, weight_decay=0.1), k)
  step = make_paired_step(tx, ref, masks)
  state, ref_params, ref_state = tx.init(params), params, ref.init(params)
  start = params
  for i in range(1, 13):
    before = params
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
    if i < k:  # no update emitted yet: nothing moves
      jax.tree.map(np.testing.assert_array_equal, params, start)
    elif i % k:  # between emitted updates: nothing moves
      jax.tree.map(np.testing.assert_array_equal, params, before)
    else:
      assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)
  assert int(state.inner_opt_state.count) == 12 // k
  assert step._cache_size() == 1
  # get/set_masks reach through MultiStepsState.
  masks1 = masks_at(params, 0.75, previous=masks)
  state = jaxprune.set_masks(state, masks1)
  np.testing.assert_array_equal(jaxprune.get_masks(state)["fc1"]["kernel"],
                                masks1["fc1"]["kernel"])
  for _ in range(k):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
  assert_pruned_zero(params, masks1)


def test_pruned_around_inject_hyperparams():
  """`pruned(inject_hyperparams(adamw)(...))`: the injected learning rate is live."""
  params = make_params()
  masks = masks_at(params, 0.5)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
  tx = jaxprune.pruned(inner, masks)
  step = make_paired_step(tx, inner, masks)
  state, ref_params, ref_state = tx.init(params), params, inner.init(params)
  for _ in range(5):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
  assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)
  # Learning rate 0: kept weights freeze, pruned ones stay at 0.
  state.inner_state.hyperparams["learning_rate"] = jnp.zeros_like(
      state.inner_state.hyperparams["learning_rate"])
  frozen = params
  params, state, _, _ = step(params, state, ref_params, ref_state)
  jax.tree.map(np.testing.assert_array_equal, params, frozen)


def test_inject_hyperparams_around_pruned():
  params = make_params()
  masks = masks_at(params, 0.5)
  tx = optax.inject_hyperparams(
      lambda learning_rate: jaxprune.pruned(optax.adamw(learning_rate, weight_decay=0.1), masks)
  )(learning_rate=1e-2)
  inner = optax.adamw(1e-2, weight_decay=0.1)
  step = make_paired_step(tx, inner, masks)
  state, ref_params, ref_state = tx.init(params), params, inner.init(params)
  for _ in range(5):
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state)
  assert_pruned_zero(params, masks)
  assert_kept_equal(params, ref_params, masks)
  masks1 = masks_at(params, 0.75, previous=masks)
  state = jaxprune.set_masks(state, masks1)
  assert isinstance(state.inner_state, jaxprune.PrunedState)
  params, state, _, _ = step(params, state, ref_params, ref_state)
  assert_pruned_zero(params, masks1)


CONTAINERS = {
    "bare": lambda t: t,
    "chain": lambda t: optax.chain(optax.clip_by_global_norm(1.0), t),
    "named_chain": lambda t: optax.named_chain(("clip", optax.clip_by_global_norm(1.0)),
                                               ("opt", t)),
    "multisteps": lambda t: optax.MultiSteps(t, 2),
    "nested": lambda t: optax.MultiSteps(optax.chain(optax.scale_by_rms(), optax.chain(t)), 2),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_get_and_set_masks_find_the_state_anywhere(container):
  params = make_params()
  masks = masks_at(params, 0.5)
  tx = CONTAINERS[container](jaxprune.pruned(optax.sgd(0.1, momentum=0.9), masks))
  state = tx.init(params)
  got = jaxprune.get_masks(state)
  assert jax.tree.structure(got, is_leaf=is_none) == jax.tree.structure(masks, is_leaf=is_none)
  jax.tree.map(np.testing.assert_array_equal, got, masks)
  masks1 = masks_at(params, 0.75)
  new = jaxprune.set_masks(state, masks1)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jaxprune.get_masks(new), masks1)
  jax.tree.map(np.testing.assert_array_equal, jaxprune.get_masks(state), masks)
  # Only the masks changed.
  old_leaves = jax.tree.leaves(state)
  new_leaves = jax.tree.leaves(new)
  changed = [i for i, (a, b) in enumerate(zip(old_leaves, new_leaves))
             if a.shape != b.shape or not np.array_equal(a, b)]
  assert len(changed) == 2  # fc1 and fc2 masks


# ------------------------------------------------------------------- Flax


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def nnx_loss(model):
  return ((model(X) - Y) ** 2).mean()


def test_nnx_optimizer():
  model = NnxMLP(nnx.Rngs(0))
  ref_model = nnx.clone(model)
  param_state = nnx.state(model, nnx.Param)
  masks = jaxprune.ranked_masks(param_state, 0.5, jaxprune.select(param_state))
  opt = nnx.Optimizer(model, jaxprune.pruned(optax.adam(1e-2), masks), wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref_model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, ref_model, ref_opt, masks):
    grads = nnx.grad(nnx_loss)(model)
    opt.update(model, grads)
    ref_opt.update(ref_model, jaxprune.apply_masks(grads, masks))

  def check(masks):
    for name in ("fc1", "fc2"):
      m = np.asarray(masks[name]["kernel"][...])
      w = np.asarray(getattr(model, name).kernel[...])
      r = np.asarray(getattr(ref_model, name).kernel[...])
      assert (~m).any() and np.all(w[~m] == 0) and not np.signbit(w[~m]).any()
      np.testing.assert_allclose(w[m], r[m], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(getattr(model, name).bias[...],
                                 getattr(ref_model, name).bias[...], rtol=1e-5, atol=1e-6)

  for _ in range(10):
    step(model, opt, ref_model, ref_opt, masks)
  check(masks)
  held = jaxprune.get_masks(opt.opt_state)
  np.testing.assert_array_equal(held["fc1"]["kernel"][...], masks["fc1"]["kernel"][...])

  param_state = nnx.state(model, nnx.Param)
  masks1 = jaxprune.ranked_masks(param_state, 0.75, jaxprune.select(param_state),
                                    previous=masks)
  opt.opt_state = jaxprune.set_masks(opt.opt_state, masks1)
  step(model, opt, ref_model, ref_opt, masks1)
  check(masks1)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))


def test_linen_train_state():
  net = LinenMLP()
  params = net.init(jax.random.key(0), X)["params"]
  masks = masks_at(params, 0.5)
  tx = jaxprune.pruned(optax.adamw(1e-2, weight_decay=0.1), masks)
  # An int32 step from the start: `create`'s Python int 0 would compile the step twice.
  step0 = jnp.zeros((), jnp.int32)
  state = TrainState.create(apply_fn=net.apply, params=params, tx=tx).replace(step=step0)
  ref = TrainState.create(apply_fn=net.apply, params=params,
                          tx=optax.adamw(1e-2, weight_decay=0.1)).replace(step=step0)

  @jax.jit
  def train_step(state, ref):
    def loss(p):
      return ((state.apply_fn({"params": p}, X) - Y) ** 2).mean()

    grads = jax.grad(loss)(state.params)
    masks = jaxprune.get_masks(state.opt_state)
    return state.apply_gradients(grads=grads), ref.apply_gradients(grads=mask_grads(grads, masks))

  for _ in range(20):
    state, ref = train_step(state, ref)
  assert_pruned_zero(state.params, masks)
  assert_kept_equal(state.params, ref.params, masks)
  masks1 = masks_at(state.params, 0.75, previous=masks)
  state = state.replace(opt_state=jaxprune.set_masks(state.opt_state, masks1))
  state, ref = train_step(state, ref)
  assert_pruned_zero(state.params, masks1)
  assert int(state.step) == 21
  assert train_step._cache_size() == 1


# ------------------------------------------------------------------- gradual mode


def make_gradual_step(tx):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_follows_schedule_monotone_compiled_once(scope):
  every, begin, end, final = 3, 2, 12, 0.8
  schedule = optax.polynomial_schedule(init_value=0.0, end_value=final, power=3,
                                       transition_steps=end - begin, transition_begin=begin)
  params = make_params()
  where = jaxprune.select(params)
  tx = jaxprune.gradually_pruned(optax.adamw(1e-2, weight_decay=0.1), where=where,
                                 schedule=lambda c: jaxprune.Prune(schedule(c),
                                                                   scope=scope), update_every=every)
  step = make_gradual_step(tx)
  state = tx.init(params)
  masks = jaxprune.get_masks(state)
  assert all(bool(np.asarray(m).all()) for m in jax.tree.leaves(masks))
  sizes = [int(m.size) for m in jax.tree.leaves(masks)]
  recomputed = 0
  for count in range(20):
    before = params
    params, state = step(params, state)
    new = jaxprune.get_masks(state)
    if count % every == 0:
      # Recomputed from the params the update saw, previous masks respected.
      expected = jaxprune.ranked_masks(before, float(schedule(count)), where, scope=scope,
                                          previous=masks)
      jax.tree.map(np.testing.assert_array_equal, new, expected)
      recomputed += 1
    else:
      jax.tree.map(np.testing.assert_array_equal, new, masks)
    # Never revive; pruned weights exactly zero.
    for m_old, m_new in zip(jax.tree.leaves(masks), jax.tree.leaves(new)):
      assert not np.any(np.asarray(m_new) & ~np.asarray(m_old))
    if any((~np.asarray(m)).any() for m in jax.tree.leaves(new)):
      assert_pruned_zero(params, new)
    # Sparsity is the schedule's target at the last recompute step.
    last = count - count % every
    pruned_counts = [int((~np.asarray(m)).sum()) for m in jax.tree.leaves(new)]
    target = float(schedule(last))
    if scope == "layer":
      assert pruned_counts == [round(target * n) for n in sizes]
    else:
      assert sum(pruned_counts) == round(target * sum(sizes))
    masks = new
  assert recomputed == 7
  # The target is reached at the first recompute step >= end_step (12) and held.
  assert float(schedule(12)) == pytest.approx(final)
  if scope == "layer":
    assert pruned_counts == [round(final * n) for n in sizes]
  assert int(state.count) == 20
  assert step._cache_size() == 1


def test_gradual_never_revives_weights_pruned_by_starting_masks():
  """Starting masks that prune the *largest* weights: a recompute that ignored them
  would keep those weights (they are the largest); respected, they stay pruned."""
  params = make_params()
  where = jaxprune.select(params)
  start = jax.tree.map(lambda w, sel: (jnp.abs(w) < 1.0) if sel else None, params, where)
  tx = jaxprune.gradually_pruned(optax.adam(1e-2), where=where,
                                 schedule=optax.constant_schedule(0.3), update_every=2, masks=start)
  step = make_gradual_step(tx)
  state = tx.init(params)
  for _ in range(6):
    params, state = step(params, state)
    new = jaxprune.get_masks(state)
    for m_start, m_new in zip(jax.tree.leaves(start), jax.tree.leaves(new)):
      assert not np.any(np.asarray(m_new) & ~np.asarray(m_start))
    assert_pruned_zero(params, new)
  # The recompute also pruned more than the starting masks where needed (30% target).
  for m, w in zip(jax.tree.leaves(new), jax.tree.leaves(jax.tree.map(
      lambda p, s: p if s else None, params, where))):
    assert int((~np.asarray(m)).sum()) >= round(0.3 * w.size)


def test_gradual_inside_multisteps_counts_emitted_updates():
  schedule = optax.polynomial_schedule(init_value=0.0, end_value=0.5, power=1, transition_steps=2)
  params = make_params()
  tx = optax.MultiSteps(jaxprune.gradually_pruned(optax.adam(1e-2), where=jaxprune.select(params),
                                                  schedule=schedule, update_every=1), 2)
  step = make_gradual_step(tx)
  state = tx.init(params)
  sparsities = []
  for _ in range(6):
    params, state = step(params, state)
    masks = jaxprune.get_masks(state)
    sparsities.append(float(1 - np.asarray(masks["fc1"]["kernel"]).mean()))
  # Masks move only on emitted updates (every 2nd micro-step), with schedule(0, 1, 2).
  assert sparsities == [0.0, 0.0, 0.0, 0.25, 0.25, 0.5]
  assert_pruned_zero(params, masks)


def test_gradual_update_outside_jit_matches_jitted():
  """An eager `tx.update` (e.g. `nnx.Optimizer.update` without `nnx.jit`) recomputes
  masks too, and gives what the jitted update gives."""
  params = make_params()
  tx = jaxprune.gradually_pruned(optax.adam(1e-2), where=jaxprune.select(params),
                                 schedule=optax.constant_schedule(0.5), update_every=2)
  grads = grad_fn(params)
  state = tx.init(params)
  eager_out, eager_state = tx.update(grads, state, params)
  jit_out, jit_state = jax.jit(tx.update)(grads, state, params)
  masks = jaxprune.get_masks(eager_state)
  assert float(np.asarray(masks["fc1"]["kernel"]).mean()) == 0.5
  jax.tree.map(np.testing.assert_array_equal, masks, jaxprune.get_masks(jit_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager_out, jit_out)
  assert_pruned_zero(optax.apply_updates(params, eager_out), masks)


def test_gradual_with_nnx_optimizer_and_bool_where():
  """`where = select(nnx.state(model, nnx.Param))`: `init` sees Param-wrapped params,
  `update` pure arrays; the selection must carry over."""
  model = NnxMLP(nnx.Rngs(0))
  where = jaxprune.select(nnx.state(model, nnx.Param))
  schedule = optax.polynomial_schedule(init_value=0.0, end_value=0.5, power=1, transition_steps=2)
  tx = jaxprune.gradually_pruned(optax.adam(1e-2), where=where, schedule=schedule,
                                 update_every=1)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(nnx_loss)(model))

  for _ in range(3):
    step(model, opt)
  masks = jaxprune.get_masks(opt.opt_state)
  for name in ("fc1", "fc2"):
    m = np.asarray(masks[name]["kernel"][...])
    assert m.mean() == 0.5
    w = np.asarray(getattr(model, name).kernel[...])
    assert np.all(w[~m] == 0) and np.all(w[m] != 0)
  assert len(jax.tree.leaves(masks)) == 2  # kernels only, biases untargeted


# ------------------------------------------------------------------- extra args


def needs_factor():
  """An inner transform that asserts it receives the `factor` keyword."""

  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, *, factor=None, **extra):
    assert factor is not None, "`factor` did not reach the inner transform"
    return jax.tree.map(lambda g: -factor * g, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def test_extra_args_pass_through():
  params = make_params()
  masks = masks_at(params, 0.5)
  tx = optax.chain(optax.clip_by_global_norm(1e6), jaxprune.pruned(needs_factor(), masks))
  grads = grad_fn(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, factor=jnp.float32(0.5))
  expected = jax.tree.map(lambda g: -0.5 * g, grads)
  jax.tree.map(np.testing.assert_array_equal,
               map_masked(lambda m, u: u if m is None else u[m], masks, updates),
               map_masked(lambda m, u: u if m is None else u[m], masks, expected))
  # Without the keyword the inner transform's assertion fires (tracing suffices).
  with pytest.raises(AssertionError, match="did not reach"):
    jax.eval_shape(tx.update, grads, tx.init(params), params)


def test_extra_args_pass_through_in_gradual_mode():
  """The keyword is consumed while tracing, so tracing the update shows it arrives."""
  params = make_params()
  tx = optax.chain(
      optax.clip_by_global_norm(1e6),
      jaxprune.gradually_pruned(needs_factor(), where=jaxprune.select(params),
                                schedule=optax.constant_schedule(0.5), update_every=1))
  state, grads = tx.init(params), grad_fn(params)
  shapes, _ = jax.eval_shape(functools.partial(tx.update, factor=jnp.float32(0.5)),
                             grads, state, params)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  with pytest.raises(AssertionError, match="did not reach"):
    jax.eval_shape(tx.update, grads, state, params)


# ------------------------------------------------------------------- errors


def test_update_without_params_is_a_clear_error():
  params = make_params()
  masks = masks_at(params, 0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  for tx in (jaxprune.pruned(optax.adam(1e-3), masks),
             optax.chain(optax.clip_by_global_norm(1.0), jaxprune.pruned(optax.adam(1e-3), masks))):
    with pytest.raises(ValueError, match=r"needs the current params.*tx.update\(grads, state, "):
      jax.eval_shape(tx.update, grads, tx.init(params))  # raised while tracing


def test_mask_with_wrong_shape_names_the_path():
  params = make_params()
  masks = masks_at(params, 0.5)
  bad = jax.tree.map(lambda m: m, masks, is_leaf=is_none)
  bad["fc2"]["kernel"] = jnp.ones((4, 8), jnp.bool_)
  with pytest.raises(ValueError, match=r"fc2/kernel.*\(4, 8\).*\(8, 4\)"):
    jaxprune.pruned(optax.adam(1e-3), bad).init(params)
  state = jaxprune.pruned(optax.adam(1e-3), masks).init(params)
  with pytest.raises(ValueError, match=r"fc2/kernel.*\(4, 8\).*\(8, 4\)"):
    jaxprune.set_masks(state, bad)
  with pytest.raises(ValueError, match=r"fc1/kernel.*bool"):
    jaxprune.set_masks(state, {**masks, "fc1": {"kernel": jnp.ones((6, 8)), "bias": None}})


def test_get_and_set_masks_need_exactly_one_pruned_state():
  params = make_params()
  masks = masks_at(params, 0.5)
  none = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(params)
  two = optax.chain(jaxprune.pruned(optax.adam(1e-3), masks),
                    jaxprune.pruned(optax.sgd(1e-3), masks)).init(params)
  for fn in (jaxprune.get_masks, lambda s: jaxprune.set_masks(s, masks)):
    with pytest.raises(ValueError, match="found 0"):
      fn(none)
    with pytest.raises(ValueError, match="found 2"):
      fn(two)


def test_constructor_errors():
  params = make_params()
  where = jaxprune.select(params)
  schedule = optax.constant_schedule(0.5)
  with pytest.raises(TypeError, match="masks"):
    jaxprune.pruned(optax.adam(1e-3))
  with pytest.raises(TypeError, match=r"holds fixed masks.*gradually_pruned"):
    jaxprune.pruned(optax.adam(1e-3), lambda params: None)
  with pytest.raises(ValueError, match="gradually_pruned needs `where`"):
    jaxprune.gradually_pruned(optax.adam(1e-3), schedule=schedule, update_every=2)
  with pytest.raises(ValueError, match="update_every"):
    jaxprune.gradually_pruned(optax.adam(1e-3), where=where, schedule=schedule, update_every=0)
  with pytest.raises(TypeError, match="scope"):   # the scope goes with the target now
    jaxprune.pruned(optax.adam(1e-3), masks_at(params, 0.5), scope="row")
  # Starting masks that disagree with `where` in gradual mode.
  only_fc1 = jaxprune.select(params, include="fc1")
  tx = jaxprune.gradually_pruned(optax.adam(1e-3), where=only_fc1, schedule=schedule,
                                 update_every=2, masks=masks_at(params, 0.5))
  with pytest.raises(ValueError, match="fc2/kernel"):
    tx.init(params)


def test_nnx_optimizer_accepts_masks_from_a_pure_dict_and_survives_donation():
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 16, rngs=rngs)

  model = Tiny(nnx.Rngs(0))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  masks = jaxprune.ranked_masks(pure, 0.5, jaxprune.select(pure))
  tx = jaxprune.pruned(optax.adam(1e-3), masks)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  held = jaxprune.get_masks(opt.opt_state)["fc1"]["kernel"]
  assert int(jnp.sum(~held[...])) == 64
  # The state owns a copy: deleting (as donation does) the held masks leaves the caller's.
  held[...].delete()
  assert int(jnp.sum(~masks["fc1"]["kernel"])) == 64

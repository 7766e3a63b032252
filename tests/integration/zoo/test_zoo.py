"""Every public function of jaxprune on every model of the zoo (tests/integration/zoo/models.py).

Results are checked against NumPy references computed here: stable argsorts for
magnitude ranking (ties broken by flat index), per-group argsorts for N:M, plain
counts of zeros for reports. Trees are compared slot by slot: flattened with
`None` counted as a leaf, paths written `a/0/kernel` with nnx's trailing `value`
left out, so masks held by an optimizer line up with the params they belong to.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune

from .models import EVAL_BATCHES, X_FIXED, ZOO, batch_at

STEPS = 200


@pytest.fixture(params=ZOO)
def model(request):
  return request.param()


# ----------------------------------------------------------------------------- helpers


def _key_name(key) -> str:
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    return str(key.key)
  if isinstance(key, tu.GetAttrKey):
    return key.name
  if isinstance(key, tu.SequenceKey):
    return str(key.idx)
  if isinstance(key, tu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_of(keypath) -> str:
  parts = [_key_name(k) for k in keypath]
  if len(parts) > 1 and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


def slots(tree) -> list[tuple[str, object]]:
  """`(path, leaf)` for every leaf of `tree`, `None` counted as a leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return [(path_of(p), x) for p, x in flat]


def slot_structure(tree):
  return jax.tree.structure(tree, is_leaf=lambda x: x is None)


def selected(where) -> set[str]:
  return {p for p, s in slots(where) if s is not None and bool(s)}


def pairs(params, masks) -> list[tuple[str, object, object]]:
  """`(path, param, mask)` for the array slots of params; the trees must line up."""
  ps, ms = slots(params), slots(masks)
  assert [p for p, _ in ps] == [p for p, _ in ms], "mask tree does not line up with params"
  return [(p, w, m) for (p, w), (_, m) in zip(ps, ms) if w is not None]


def masked_pairs(params, masks) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """`(path, param, mask)` as NumPy arrays for the slots that hold a mask."""
  return [(p, np.asarray(w), np.asarray(m)) for p, w, m in pairs(params, masks) if m is not None]


def f32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32)


def bits(x) -> np.ndarray:
  """The bit patterns of `x` (so -0.0 != 0.0 and NaNs compare by payload)."""
  a = np.asarray(x)
  if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
    return a
  return a.view(f"u{a.dtype.itemsize}")


def assert_bitwise_zero(w: np.ndarray, where: str) -> None:
  nonzero = bits(w) != 0
  assert not nonzero.any(), f"{where}: {int(nonzero.sum())} pruned weights not bitwise 0.0"


def assert_same_masks(a, b) -> None:
  sa, sb = slots(a), slots(b)
  assert [p for p, _ in sa] == [p for p, _ in sb]
  for (path, x), (_, y) in zip(sa, sb):
    assert (x is None) == (y is None), path
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


def assert_check_masks_hold(model, masks) -> None:
  """The mask tree holds a bool array of the right shape exactly at the selected slots."""
  for path, w, m in pairs(model.params, masks):
    assert (m is not None) == (path in model.kernel_paths), path
    if m is not None:
      assert np.asarray(m).dtype == np.bool_ and np.shape(m) == np.shape(w), path


def layer_reference(w, k: int, previous=None) -> np.ndarray:
  """Keep-mask pruning the `k` smallest |w| (flat index breaks ties; previous pruned first)."""
  key = np.abs(f32(w)).reshape(-1).astype(np.float64)
  if previous is not None:
    key = np.where(np.asarray(previous).reshape(-1), key, -1.0)
  keep = np.ones(key.size, bool)
  keep[np.argsort(key, kind="stable")[:k]] = False
  return keep.reshape(np.shape(w))


def nm_reference(w, axis: int, n: int = 2, m: int = 4) -> np.ndarray:
  """Keep-mask of the `n` largest |w| in each group of `m` along `axis` (earlier wins ties)."""
  a = np.moveaxis(np.abs(f32(w)), axis, -1)
  g = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
  rank = np.argsort(np.argsort(-g, axis=-1, kind="stable"), axis=-1)
  return np.moveaxis((rank < n).reshape(a.shape), -1, axis)


def perturbed(params, seed: int = 1):
  """`params` plus noise on every float leaf (dtypes kept), to rank a different tree."""
  r = np.random.default_rng(seed)

  def noise(x):
    if not jnp.issubdtype(np.asarray(x).dtype, jnp.floating):
      return x
    return (f32(x) + f32(x).std() * r.normal(size=np.shape(x))).astype(np.asarray(x).dtype)

  return jax.tree.map(noise, params)


def eval_loss(model, params) -> float:
  return float(np.mean([model.loss(params, b) for b in EVAL_BATCHES]))


# ----------------------------------------------------------------------------- the zoo itself


def test_zoo_adapter(model):
  """The adapter does what the other tests rely on (so their failures are the library's)."""
  params = model.params
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(params, X_FIXED)),
                             model.put_back(params), rtol=1e-5, atol=1e-6)
  batch = batch_at(0)
  assert float(model.loss_rng(params, batch, None)) == float(model.loss(params, batch))
  noisy = float(model.loss(params, batch, rng=jax.random.key(3)))
  assert math.isfinite(noisy) and noisy != float(model.loss(params, batch))
  assert set(selected(model.where)) == set(model.kernel_paths)
  for path in model.kernel_paths:
    assert model.input_axis in (-1, -2)
    w = dict(slots(params))[path]
    assert w.shape[model.input_axis] % 4 == 0, path


# ----------------------------------------------------------------------------- select


def test_select_default(model):
  where = jaxprune.select(model.params)
  assert [p for p, _ in slots(where)] == [p for p, _ in slots(model.params)]
  assert selected(where) == set(model.default_paths)
  for path, leaf in slots(model.params):
    if leaf is None:
      assert dict(slots(where))[path] is None, f"{path}: a None slot must stay None"


def test_select_glob(model):
  assert selected(jaxprune.select(model.params, include=model.glob)) == set(model.glob_paths)
  # `exclude` removes what it matches from the default selection.
  where = jaxprune.select(model.params, exclude=("*embed*", model.slash_pattern))
  assert selected(where) == set(model.default_paths) - {model.slash_pattern}


def test_select_slash_pattern(model):
  where = jaxprune.select(model.params, include=model.slash_pattern)
  assert selected(where) == {model.slash_pattern}
  with pytest.raises(ValueError):
    jaxprune.select(model.params, include=model.slash_pattern + "_nope")


def test_select_callable(model):
  target = dict(slots(model.params))[model.slash_pattern]
  calls = []

  def include(path, leaf):
    calls.append((path, leaf))
    return tuple(leaf.shape) == tuple(target.shape) and path.startswith(
        model.slash_pattern.split("/")[0])

  where = jaxprune.select(model.params, include=include)
  assert model.slash_pattern in selected(where)
  for path in selected(where):
    leaf = dict(slots(model.params))[path]
    assert tuple(leaf.shape) == tuple(target.shape)
  assert calls and all(isinstance(p, str) and leaf is not None for p, leaf in calls)
  # Even a callable accepting everything selects only floating-point leaves of rank >= 2.
  everything = selected(jaxprune.select(model.params, include=lambda path, leaf: True))
  floats = {p for p, x in slots(model.params) if x is not None and np.ndim(x) >= 2
            and jnp.issubdtype(np.asarray(x).dtype, jnp.floating)}
  assert set(model.kernel_paths) <= everything <= floats


# ----------------------------------------------------------------------------- masks


def test_threshold_masks(model):
  params = model.params
  magnitudes = np.concatenate([np.abs(f32(w)).reshape(-1)
                               for _, w, s in pairs(params, model.where) if s])
  t = float(np.median(magnitudes).astype(np.float32))
  masks = jaxprune.threshold_masks(params, t, model.where)
  assert_check_masks_hold(model, masks)
  kept = pruned_count = 0
  for path, w, m in masked_pairs(params, masks):
    np.testing.assert_array_equal(m, np.abs(f32(w)) >= np.float32(t), err_msg=path)
    kept, pruned_count = kept + m.sum(), pruned_count + (~m).sum()
  assert kept > 0 and pruned_count > 0


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_masks_layer(model, sparsity):
  masks = jaxprune.ranked_masks(model.params, sparsity, model.where, scope="layer")
  assert_check_masks_hold(model, masks)
  for path, w, m in masked_pairs(model.params, masks):
    k = round(sparsity * w.size)
    assert int((~m).sum()) == k, path
    np.testing.assert_array_equal(m, layer_reference(w, k), err_msg=path)


def test_magnitude_masks_global(model):
  sparsity = 0.6
  masks = jaxprune.ranked_masks(model.params, sparsity, model.where, scope="global")
  assert_check_masks_hold(model, masks)
  chosen = masked_pairs(model.params, masks)
  total = sum(w.size for _, w, _ in chosen)
  k = round(sparsity * total)
  assert sum(int((~m).sum()) for _, _, m in chosen) == k
  key = np.concatenate([np.abs(f32(w)).reshape(-1) for _, w, _ in chosen])
  keep = np.ones(total, bool)
  keep[np.argsort(key, kind="stable")[:k]] = False
  np.testing.assert_array_equal(np.concatenate([m.reshape(-1) for _, _, m in chosen]), keep)


def test_magnitude_masks_previous(model):
  first = jaxprune.ranked_masks(model.params, 0.5, model.where)
  moved = perturbed(model.params)
  second = jaxprune.ranked_masks(moved, 0.75, model.where, previous=first)
  assert_check_masks_hold(model, second)
  prev = {p: m for p, _, m in masked_pairs(model.params, first)}
  revived_anywhere = False
  for path, w, m in masked_pairs(moved, second):
    k = round(0.75 * w.size)
    assert int((~m).sum()) == k, path
    assert not (m & ~prev[path]).any(), f"{path}: a pruned weight was revived"
    np.testing.assert_array_equal(m, layer_reference(w, k, previous=prev[path]), err_msg=path)
    # Without `previous`, the moved weights would have revived some: the test can tell.
    revived_anywhere |= bool((layer_reference(w, k) & ~prev[path]).any())
  assert revived_anywhere


def test_magnitude_masks_jit(model):
  params, where = model.params, model.where
  eager = jaxprune.ranked_masks(params, 0.5, where)
  traced = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where))(params, 0.5)
  assert_same_masks(traced, eager)
  closed = jax.jit(lambda s: jaxprune.ranked_masks(params, s, where))(0.5)
  assert_same_masks(closed, eager)
  eager_25 = jaxprune.ranked_masks(params, 0.25, where)
  assert_same_masks(jax.jit(lambda s: jaxprune.ranked_masks(params, s, where))(0.25), eager_25)


# ----------------------------------------------------------------------------- N:M


def test_nm_masks(model):
  params, where, axis = model.params, model.where, model.input_axis
  masks = jaxprune.nm_masks(params, 2, 4, where, axis=axis)
  assert_check_masks_hold(model, masks)
  for path, w, m in masked_pairs(params, masks):
    np.testing.assert_array_equal(m, nm_reference(w, axis), err_msg=path)
    groups = np.moveaxis(m, axis, -1).reshape(-1, 4)
    assert (groups.sum(axis=-1) == 2).all(), path
  assert jaxprune.is_nm_sparse(masks, 2, 4, axis=axis)
  violations = jaxprune.nm_violations(masks, 2, 4, axis=axis)
  assert {path_of_string(p) for p in violations} == set(model.kernel_paths)
  assert all(v == 0 for v in violations.values())

  pruned = jaxprune.apply_masks(params, masks)
  assert jaxprune.is_nm_sparse(pruned, 2, 4, where, axis=axis)
  # The dense params violate 2:4 in every group: the check can fail.
  assert not jaxprune.is_nm_sparse(params, 2, 4, where, axis=axis)
  dense = {path_of_string(p): v for p, v in
           jaxprune.nm_violations(params, 2, 4, where, axis=axis).items()}
  for path, w, _ in masked_pairs(params, masks):
    assert dense[path] == np.count_nonzero(
        (np.moveaxis(w, axis, -1).reshape(-1, 4) != 0).sum(axis=-1) > 2), path


def path_of_string(path: str) -> str:
  return path.removesuffix("/value")


# ----------------------------------------------------------------------------- apply / report


def test_apply_masks(model):
  masks = jaxprune.ranked_masks(model.params, 0.5, model.where)
  pruned = jaxprune.apply_masks(model.params, masks)
  assert slot_structure(pruned) == slot_structure(model.params)
  for (path, w), (_, m), (_, p) in zip(slots(model.params), slots(masks), slots(pruned)):
    assert (w is None) == (p is None), path
    if w is None:
      continue
    w, p = np.asarray(w), np.asarray(p)
    assert p.dtype == w.dtype and p.shape == w.shape, path
    if m is None:
      np.testing.assert_array_equal(bits(p), bits(w), err_msg=path)
      continue
    m = np.asarray(m)
    assert_bitwise_zero(p[~m], path)
    np.testing.assert_array_equal(bits(p[m]), bits(w[m]), err_msg=path)


def test_sparsity_report(model):
  masks = jaxprune.ranked_masks(model.params, 0.5, model.where)
  pruned = jaxprune.apply_masks(model.params, masks)
  report = jaxprune.sparsity_report(pruned, model.where)
  arrays = [(p, np.asarray(x)) for p, x in slots(pruned) if x is not None]
  assert [path_of_string(r.path) for r in report.leaves] == [p for p, _ in arrays]
  zeros_t = size_t = zeros_all = size_all = 0
  for row, (path, x) in zip(report.leaves, arrays):
    zeros = int(np.count_nonzero(x == 0))
    assert (row.zeros, row.size, tuple(row.shape)) == (zeros, x.size, x.shape), path
    assert row.dtype == str(x.dtype), path
    assert row.targeted == (path in model.kernel_paths), path
    zeros_all, size_all = zeros_all + zeros, size_all + x.size
    if row.targeted:
      zeros_t, size_t = zeros_t + zeros, size_t + x.size
  assert report.targeted_sparsity == zeros_t / size_t
  assert report.overall_sparsity == zeros_all / size_all


# ----------------------------------------------------------------------------- training


def test_pruned_fixed_masks_training(model):
  masks = jaxprune.ranked_masks(model.params, 0.5, model.where)
  tx = jaxprune.pruned(optax.adamw(1e-2, weight_decay=0.1), masks)
  seen = []

  def on_check(step, params):
    for path, w, m in masked_pairs(params, masks):
      assert_bitwise_zero(w[~m], f"step {step}, {path}")
    seen.append(step)

  final, opt_state = model.train(tx, model.params, STEPS, on_check)
  assert seen == [1, 50, 100, 150, 200]
  assert slot_structure(final) == slot_structure(model.params)
  assert_same_masks(jaxprune.get_masks(opt_state), masks)
  initial = {p: w for p, w, _ in masked_pairs(model.params, masks)}
  for path, w, m in masked_pairs(final, masks):
    assert_bitwise_zero(w[~m], path)
    moved = np.mean(bits(w[m]) != bits(initial[path][m]))
    assert moved > 0.9, f"{path}: only {moved:.0%} of the kept weights moved"
  assert eval_loss(model, final) < eval_loss(model, jaxprune.apply_masks(model.params, masks))


def test_pruned_gradual_training(model):
  final_target = 0.75
  schedule = optax.polynomial_schedule(init_value=0.0, end_value=final_target, power=3,
                                       transition_steps=100)
  tx = jaxprune.gradually_pruned(optax.adamw(1e-2, weight_decay=0.1), where=model.where,
                                 schedule=schedule, update_every=10)
  zeros_seen = []

  def on_check(step, params):
    zeros_seen.append(sum(int(np.count_nonzero(np.asarray(w) == 0))
                          for p, w in slots(params) if p in model.kernel_paths))

  final, opt_state = model.train(tx, model.params, STEPS, on_check)
  assert zeros_seen == sorted(zeros_seen) and zeros_seen[0] < zeros_seen[-1]
  masks = jaxprune.get_masks(opt_state)
  assert_check_masks_hold(model, masks)
  for path, w, m in masked_pairs(final, masks):
    k = round(final_target * w.size)
    assert int((~m).sum()) == k, path
    assert_bitwise_zero(w[~m], path)
    assert int(np.count_nonzero(w == 0)) == k, path


# ----------------------------------------------------------------------------- prune_retrain


def _prune_retrain(model, params, tmp_path, *, loss=None, train_batches=None, every=None,
                   resume=True, teacher=None):
  loss = model.loss if loss is None else loss
  batches = (lambda step: batch_at(step)) if train_batches is None else train_batches
  if teacher is not None:  # distilled from `teacher = (apply_fn, teacher_params)`
    apply_fn, teacher_params = teacher
    loss = jaxprune.distillation_loss(loss, apply_fn, weight=0.5, temperature=2.0)
    batches = jaxprune.training.with_teacher_logits(batches, apply_fn, teacher_params)
  return jaxprune.prune_retrain(
      params, loss, train_batches=batches, eval_batches=EVAL_BATCHES,
      optimizer=optax.adam(1e-3), targets=[0.5, 0.75], where=model.where, retrain_steps=5,
      checkpointer=jaxprune.Checkpointer(str(tmp_path / "ckpt"), every=every, resume=resume),
      hooks=[])


def _assert_exact_sparsity(model, result, target):
  assert slot_structure(result.params) == slot_structure(model.params)
  pruned_total = size_total = 0
  for path, w, m in masked_pairs(result.params, result.masks):
    k = round(target * w.size)
    assert int((~m).sum()) == k, path
    assert_bitwise_zero(w[~m], path)
    pruned_total, size_total = pruned_total + k, size_total + w.size
  assert {p for p, _, _ in masked_pairs(result.params, result.masks)} == set(model.kernel_paths)
  assert result.achieved_sparsity == pruned_total / size_total


def test_prune_retrain_and_resume(model, tmp_path):
  result = _prune_retrain(model, model.retrain_params, tmp_path)
  _assert_exact_sparsity(model, result, 0.75)
  assert [r.target_sparsity for r in result.history] == [0.5, 0.75]
  assert all(math.isfinite(r.after_retrain.loss) for r in result.history)

  again = _prune_retrain(model, model.retrain_params, tmp_path, resume=True)
  assert slot_structure(again.params) == slot_structure(result.params)
  for (path, a), (_, b) in zip(slots(again.params), slots(result.params)):
    assert (a is None) == (b is None), path
    if a is not None:
      assert np.asarray(a).dtype == np.asarray(b).dtype, path
      np.testing.assert_array_equal(bits(a), bits(b), err_msg=path)
  assert_same_masks(again.masks, result.masks)
  assert [r.after_retrain.loss for r in again.history] == [
      r.after_retrain.loss for r in result.history]


class SimulatedCrashError(Exception):
  pass


def test_prune_retrain_interrupted_then_resumed_is_bitwise_exact(model, tmp_path):
  whole = _prune_retrain(model, model.retrain_params, tmp_path / "whole")

  def batches_until_7(step):
    if step == 7:  # iteration 1, step 2: after the checkpoint at its step 2
      raise SimulatedCrashError
    return batch_at(step)

  with pytest.raises(SimulatedCrashError):
    _prune_retrain(model, model.retrain_params, tmp_path / "cut", every=2,
                   train_batches=batches_until_7)
  resumed = _prune_retrain(model, model.retrain_params, tmp_path / "cut", every=2)
  for (path, a), (_, b) in zip(slots(resumed.params), slots(whole.params)):
    assert (a is None) == (b is None), path
    if a is not None:
      np.testing.assert_array_equal(bits(a), bits(b), err_msg=path)
  assert_same_masks(resumed.masks, whole.masks)
  assert [r.after_retrain.loss for r in resumed.history] == [
      r.after_retrain.loss for r in whole.history]


def test_prune_retrain_distillation_with_rng(model, tmp_path):
  rng_given = []

  def loss_rng(params, batch, rng):
    rng_given.append(rng is not None)  # runs while tracing: once per compiled use
    return model.loss_rng(params, batch, rng)

  result = _prune_retrain(model, model.retrain_params, tmp_path, loss=loss_rng,
                          teacher=(model.apply, model.retrain_params))
  _assert_exact_sparsity(model, result, 0.75)
  assert len(result.history) == 2
  for row in result.history:
    for phase in (row.before_prune, row.after_prune, row.after_retrain):
      assert math.isfinite(phase.loss) and math.isfinite(phase.metric), row
  assert True in rng_given, "retraining never handed the loss an rng"
  assert False in rng_given, "evaluation should call the loss with rng=None"


# ----------------------------------------------------------------------------- export


def test_export_load_compressed(model, tmp_path):
  masks = jaxprune.ranked_masks(model.params, 0.5, model.where)
  pruned = jaxprune.apply_masks(model.params, masks)
  path = str(tmp_path / "model.jxp")
  info = jaxprune.export.export_compressed(path, pruned, masks)
  assert info.kept == sum(int(m.sum()) for _, _, m in masked_pairs(pruned, masks))

  loaded = jaxprune.export.load_compressed(path, like=model.params)
  assert slot_structure(loaded) == slot_structure(model.params)
  for (p, a), (_, b) in zip(slots(loaded), slots(pruned)):
    assert (a is None) == (b is None), p
    if a is not None:
      assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b), p
      np.testing.assert_array_equal(bits(a), bits(b), err_msg=p)
  np.testing.assert_array_equal(model.put_back(loaded), model.put_back(pruned))
  # The outputs do depend on the pruning: a dense reload would differ.
  assert not np.array_equal(model.put_back(model.params), model.put_back(pruned))

  loaded2, loaded_masks = jaxprune.export.load_compressed(path, like=model.params, with_masks=True)
  assert slot_structure(loaded2) == slot_structure(model.params)
  assert_same_masks(loaded_masks, masks)


# ------------------------------------------------------------------ scores, distributions


def test_ranked_masks_erk(model):
  params, where = model.params, model.where
  erk = jaxprune.distributions.erk()
  masks = jaxprune.ranked_masks(params, 0.7, where, distribution=erk)
  assert_check_masks_hold(model, masks)
  chosen = masked_pairs(params, masks)
  counts = [int(c) for c in erk.prune_counts([p for p, _, _ in chosen],
                                             [w.shape for _, w, _ in chosen], 0.7)]
  assert sum(counts) == round(0.7 * sum(w.size for _, w, _ in chosen))
  for (path, w, m), k in zip(chosen, counts):
    np.testing.assert_array_equal(m, layer_reference(w, k), err_msg=path)
  traced = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where, distribution=erk))(params, 0.7)
  assert_same_masks(traced, masks)


def test_ranked_masks_saliency_random_and_given(model):
  params, where = model.params, model.where
  grads = jaxprune.scores.mean_gradients(model.loss, params, [batch_at(0), batch_at(1)])
  masks = jax.jit(lambda p, g: jaxprune.ranked_masks(
      p, 0.5, where, score=jaxprune.scores.saliency_score(g)))(params, grads)
  assert_check_masks_hold(model, masks)
  g_of = {p: g for p, g in slots(grads)}
  for path, w, m in masked_pairs(params, masks):
    k = round(0.5 * w.size)
    score = np.abs(f32(w) * f32(g_of[path]))
    np.testing.assert_array_equal(m, layer_reference(score, k), err_msg=path)
  random = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.scores.random_score(3))
  assert_same_masks(random, jaxprune.ranked_masks(params, 0.5, where,
                                                  score=jaxprune.scores.random_score(3)))
  for path, w, m in masked_pairs(params, random):
    assert int((~m).sum()) == round(0.5 * w.size), path
  # A user's scores: the weights' negatives rank the largest magnitudes of positive
  # weights first, a ranking no magnitude criterion gives.
  flipped = jax.tree.map(lambda x: -x if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                         else x, params)
  given = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.scores.given_score(flipped),
                                scope="global")
  chosen = masked_pairs(params, given)
  values = np.concatenate([-f32(w).reshape(-1) for _, w, _ in chosen])
  keep = np.ones(values.size, bool)
  keep[np.argsort(values, kind="stable")[:round(0.5 * values.size)]] = False
  np.testing.assert_array_equal(np.concatenate([m.reshape(-1) for _, _, m in chosen]), keep)


def test_ranked_masks_rows(model):
  # Rows along the model's input axis: each output neuron keeps the same count.
  params, where, axis = model.params, model.where, model.input_axis
  masks = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.5, where, scope="row", axis=axis))(params)
  assert_check_masks_hold(model, masks)
  for path, w, m in masked_pairs(params, masks):
    k = round(0.5 * w.shape[axis])
    rank = np.argsort(np.argsort(np.moveaxis(np.abs(f32(w)), axis, -1), axis=-1, kind="stable"),
                      axis=-1, kind="stable")
    np.testing.assert_array_equal(m, np.moveaxis(rank >= k, -1, axis), err_msg=path)


def test_ranked_masks_channels_and_blocks(model):
  params, where = model.params, model.where
  out_axis = -1 if model.input_axis == -2 else -2  # the output axis of the layout
  masks = jax.jit(lambda p: jaxprune.ranked_masks(
      p, 0.5, where, scope=jaxprune.channels(out_axis)))(params)
  assert_check_masks_hold(model, masks)
  for path, w, m in masked_pairs(params, masks):
    others = tuple(a for a in range(w.ndim) if a != out_axis % w.ndim)
    kept_channels = m.all(axis=others)
    assert (m == np.expand_dims(kept_channels, others)).all(), path
    norms = np.sqrt((f32(w) ** 2).sum(axis=others))
    assert int((~kept_channels).sum()) == round(0.5 * w.shape[out_axis]), path
    assert norms[kept_channels].min() >= norms[~kept_channels].max(), path
  tiles = jaxprune.ranked_masks(params, 0.5, where, scope=jaxprune.blocks((2, 2)))
  for path, w, m in masked_pairs(params, tiles):
    assert int((~m).sum()) == 4 * round(0.5 * w.size / 4), path
    t = m.reshape(*m.shape[:-2], m.shape[-2] // 2, 2, m.shape[-1] // 2, 2)
    assert (t.all(axis=(-3, -1)) == t.any(axis=(-3, -1))).all(), path  # whole tiles


# ----------------------------------------------------------------------------- sparse training


def test_rigl_sparse_training(model):
  start = jaxprune.ranked_masks(model.params, 0.75, model.where,
                                score=jaxprune.scores.random_score(0),
                                distribution=jaxprune.distributions.erk())
  tx = jaxprune.sparse_training.drop_and_grow(
      optax.adam(1e-2), start, update_every=20,
      schedule=jaxprune.sparse_training.rigl_schedule(0.3, end=75))
  kept_total = sum(int(m.sum()) for _, _, m in masked_pairs(model.params, start))
  nonzero_seen = []

  def on_check(step, params):
    nonzero_seen.append(sum(int(np.count_nonzero(np.asarray(w)))
                            for p, w in slots(params) if p in model.kernel_paths))

  final, opt_state = model.train(tx, model.params, STEPS // 2, on_check)
  assert max(nonzero_seen) <= kept_total
  masks = jaxprune.get_masks(opt_state)
  assert_check_masks_hold(model, masks)
  started = {p: m for p, _, m in masked_pairs(model.params, start)}
  moved = 0
  for path, w, m in masked_pairs(final, masks):
    assert int(m.sum()) == int(started[path].sum()), path
    assert_bitwise_zero(w[~m], path)
    moved += int((m & ~started[path]).sum())
  assert moved > 0
  assert eval_loss(model, final) < eval_loss(model, jaxprune.apply_masks(model.params, start))


def test_straight_through_training(model):
  tx = jaxprune.sparse_training.straight_through(optax.adam(1e-2), where=model.where,
                                 schedule=optax.constant_schedule(0.75), update_every=20)
  final, opt_state = model.train(tx, model.params, STEPS // 2, lambda step, params: None)
  masks = jaxprune.get_masks(opt_state)
  assert_check_masks_hold(model, masks)
  dense = jaxprune.sparse_training.dense_weights(opt_state, final)
  dense_by_path = {p: np.asarray(v) for p, v, m in pairs(dense, masks) if m is not None}
  for path, w, m in masked_pairs(final, masks):
    assert int((~m).sum()) == round(0.75 * w.size), path
    assert_bitwise_zero(w[~m], path)
    assert (f32(dense_by_path[path][m]) == f32(w[m])).all(), path
    assert np.count_nonzero(dense_by_path[path][~m]) > 0, path  # pruned weights kept learning
  masked_start = jaxprune.apply_masks(model.params,
                                      jaxprune.ranked_masks(model.params, 0.75, model.where))
  assert eval_loss(model, final) < eval_loss(model, masked_start)


# ----------------------------------------------------------------------------- one-shot


def test_one_shot_wanda_and_sparsegpt(model):
  # Calibration through the unmodified forward pass: every targeted kernel attributed.
  calibration = [jnp.asarray(b[0]) for b in EVAL_BATCHES]
  stats = jaxprune.oneshot.input_statistics(model.apply, model.params, calibration, model.where,
                                    gram=True)
  # Every targeted kernel is attributed, convolutions included (their unfolded patches).
  assert stats.unattributed == {}
  attributed = {p.removesuffix("/value") for p in stats.leaves}
  assert attributed == set(model.kernel_paths)
  where = model.where
  # One Wanda call for every layout: a row is one output neuron over the input axes
  # the statistics recorded for each leaf.
  wanda = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(
      model.params, where)
  new_params, masks = jaxprune.oneshot.sparsegpt(model.params, stats, 0.5, where, block=8)
  assert {p for p, _, _ in masked_pairs(model.params, masks)} == attributed
  for path, w, m in masked_pairs(new_params, masks):
    assert int((~m).sum()) == round(0.5 * w.size), path
    assert_bitwise_zero(w[~m], path)
  inputs = {p.removesuffix("/value"): s.feature_axes for p, s in stats.leaves.items()}
  for path, _, m in masked_pairs(model.params, wanda):
    axes = inputs[path.removesuffix("/value")]
    rows = np.moveaxis(m, axes, range(-len(axes), 0)).reshape(
        *[m.shape[d] for d in range(m.ndim) if d not in axes], -1)
    assert (rows.sum(axis=-1) == rows.shape[-1] - round(0.5 * rows.shape[-1])).all(), path
  # SparseGPT's reconstruction: on the calibration inputs, closer to the dense outputs
  # than magnitude pruning.
  x = jnp.concatenate(calibration)
  dense = np.asarray(model.apply(model.params, x))
  magnitude = jaxprune.apply_masks(model.params,
                                   jaxprune.ranked_masks(model.params, 0.5, where))
  error = lambda p: float(np.mean((np.asarray(model.apply(p, x)) - dense) ** 2))
  assert error(new_params) < error(magnitude)

"""Sharded pruning on 8 host devices: exact masks, no gathers, FSDP memory, resharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "embed": jax.random.normal(k[0], (64, 32)),
      "blocks": [
          {"fc1": {"kernel": jax.random.normal(k[1], (32, 128)), "bias": jnp.zeros(128)},
           "fc2": {"kernel": jax.random.normal(k[2], (128, 32))},
           "output_proj": {"kernel": jax.random.normal(k[3], (32, 32))}},
      ],
  }


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sharded_masks_equal_single_device_masks(layout, scope):
  mesh = jaxprune.sharding.make_mesh("data=2,fsdp=4")
  params = _params()
  where = jaxprune.select(params)
  expected = jaxprune.ranked_masks(params, 0.7, where, scope=scope)
  sharded = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, layout))
  got = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where, scope=scope))(
      sharded, jnp.float32(0.7))
  selected = [w for w, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(where)) if s]
  for g, e, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), selected, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_on_explicit_and_auto_meshes(axis_type, scope):
  # `jax.make_mesh` makes Explicit axes by default in current JAX: the scatter-add of
  # the CPU histogram cannot run there, so such arrays take the comparison counts.
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
  params = _params()
  params["blocks"][0]["fc2"]["kernel"] = jnp.round(params["blocks"][0]["fc2"]["kernel"])  # ties
  # Leaves of one shape share a loop: two sharded alike, one sharded another way.
  k = jax.random.split(jax.random.key(7), 2)
  params["blocks"][0]["q"] = {"kernel": jnp.round(4 * jax.random.normal(k[0], (32, 32)))}
  params["blocks"][0]["k"] = {"kernel": jax.random.normal(k[1], (32, 32))}
  where = jaxprune.select(params)
  shardings = jaxprune.sharding.param_shardings(params, mesh, "fsdp")
  shardings["blocks"][0]["k"]["kernel"] = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  sharded = jax.device_put(params, shardings)
  previous = jaxprune.ranked_masks(params, 0.3, where, scope=scope)
  with jax.set_mesh(mesh):
    prune = jax.jit(lambda p, m: jaxprune.ranked_masks(p, 0.7, where, scope=scope,
                                                           previous=m))
    got = prune(sharded, jaxprune.sharding.place_masks(previous, sharded))
    hlo = prune.lower(sharded, jaxprune.sharding.place_masks(previous, sharded)).compile().as_text()
  selected = [w for w, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(where)) if s]
  expected = jaxprune.ranked_masks(params, 0.7, where, scope=scope, previous=previous)
  for g, e, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), selected, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
  for line in re.findall(r"^.*all-gather.*$", hlo, flags=re.M):
    shapes = re.findall(r"\[([\d,]+)\]", line.split("=")[1] if "=" in line else line)
    biggest = max((int(np.prod([int(d) for d in s.split(",")])) for s in shapes), default=0)
    # Row-count vectors of the tie-break may be gathered (128 rows, padded by the
    # scan); no targeted leaf (the smallest has 32 x 32 = 1024 weights) ever is.
    assert biggest < 32 * 32, f"all-gather of a whole leaf: {line.strip()}"


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mask_selection_never_gathers_a_whole_leaf(scope):
  mesh = jaxprune.sharding.make_mesh("fsdp=8")
  params = {"fc1": {"kernel": jnp.ones((512, 256))}, "fc2": {"kernel": jnp.ones((256, 512))}}
  params = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  where = jaxprune.select(params)
  hlo = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.8, where, scope=scope)).lower(
      params).compile().as_text()
  leaf_elements = 256 * 512
  for line in re.findall(r"^.*all-gather.*$", hlo, flags=re.M):
    shapes = re.findall(r"\[([\d,]+)\]", line.split("=")[1] if "=" in line else line)
    biggest = max((int(np.prod([int(d) for d in s.split(",")])) for s in shapes), default=0)
    assert biggest < leaf_elements // 8 + 1, f"all-gather of a whole leaf: {line.strip()}"
  # The counts do cross devices: the selection is global, not per shard.
  assert "all-reduce" in hlo


def test_fsdp_params_and_masks_take_an_eighth_per_device():
  mesh = jaxprune.sharding.make_mesh("fsdp=8")
  params = {f"fc{i}": {"kernel": jnp.ones((256, 512))} for i in range(4)}
  params = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  tree = {"params": params, "masks": masks}
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  per_device = jaxprune.sharding.bytes_per_device(tree)
  assert len(per_device) == 8
  assert max(per_device.values()) == pytest.approx(total / 8, rel=0.01)


def _toy_problem():
  params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (16, 64)) * 0.3},
            "fc2": {"kernel": jax.random.normal(jax.random.key(1), (64, 8)) * 0.3}}
  x = jax.random.normal(jax.random.key(2), (256, 16))
  y = jnp.sin(x @ jax.random.normal(jax.random.key(3), (16, 8)))

  def loss_fn(p, batch):
    bx, by = batch
    return jnp.mean((jax.nn.gelu(bx @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"] - by) ** 2)

  def batch_at(step):
    i = (step * 32) % 256
    return x[i:i + 32], y[i:i + 32]

  return params, loss_fn, batch_at, [(x[:64], y[:64])]


def _run(mesh, layout, checkpoint_dir=None):
  params, loss_fn, batch_at, evals = _toy_problem()
  where = jaxprune.select(params)
  if mesh is not None:  # the caller places params and batches; the loop follows the params
    params = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, layout))
    plain_batch_at = batch_at

    def batch_at(step):
      return jaxprune.sharding.place_batch(plain_batch_at(step), mesh)

    evals = [jaxprune.sharding.place_batch(b, mesh) for b in evals]
  checkpointer = None if checkpoint_dir is None else jaxprune.Checkpointer(checkpoint_dir)
  return jaxprune.prune_retrain(
      params, loss_fn, batch_at, evals, optimizer=optax.adam(1e-2), targets=[0.3, 0.6],
      where=where, retrain_steps=12, checkpointer=checkpointer, hooks=[])


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_sharded_prune_retrain_matches_single_device(layout):
  single = _run(None, "replicated")
  sharded = _run(jaxprune.sharding.make_mesh("data=2,fsdp=4"), layout)
  for a, b in zip(jax.tree.leaves(_host(single.masks)), jax.tree.leaves(_host(sharded.masks))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(_host(single.params)), jax.tree.leaves(_host(sharded.params))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert sharded.achieved_sparsity == pytest.approx(0.6, abs=1e-3)
  held = [w for w, m in zip(jax.tree.leaves(sharded.params),
                            jax.tree.leaves(sharded.masks, is_leaf=lambda m: m is None))
          if m is not None]
  for m, w in zip(jax.tree.leaves(sharded.masks), held, strict=True):
    assert m.sharding.is_equivalent_to(w.sharding, m.ndim)


def test_checkpoint_restores_onto_smaller_meshes(tmp_path):
  result = _run(jaxprune.sharding.make_mesh("fsdp=8"), "fsdp", checkpoint_dir=str(tmp_path))
  with jaxprune.Checkpointer(str(tmp_path)) as ckpt:
    config = ckpt.read_meta(ckpt.indices()[-1])["config"]
  for devices in (jax.devices()[:4], jax.devices()[:1]):
    mesh = jaxprune.sharding.make_mesh({"fsdp": len(devices)}, devices)
    params = jax.device_put(result.params,
                            jaxprune.sharding.param_shardings(result.params, mesh, "fsdp"))
    masks = jaxprune.sharding.place_masks(jax.device_get(result.masks), params)
    tx = jaxprune.pruned(optax.adam(1e-2), masks)
    like = jaxprune.training.LoopState(params, tx.init(params), jnp.zeros(2, jnp.uint32))
    with jaxprune.Checkpointer(str(tmp_path)) as ckpt:
      restored, _ = ckpt.resume(like, config)
    for a, b in zip(jax.tree.leaves(_host(result.params)), jax.tree.leaves(restored.params)):
      np.testing.assert_array_equal(a, np.asarray(b))
    restored_masks = jaxprune.get_masks(restored.opt_state)
    for a, b in zip(jax.tree.leaves(_host(result.masks)), jax.tree.leaves(restored_masks)):
      np.testing.assert_array_equal(a, np.asarray(b))
    for m, ref in zip(jax.tree.leaves(restored_masks), jax.tree.leaves(masks), strict=True):
      assert m.sharding.is_equivalent_to(ref.sharding, m.ndim)  # on their params' shardings
    for x in jax.tree.leaves(restored.params):
      assert set(x.sharding.device_set) == set(devices)


def test_training_script_runs_on_an_fsdp_mesh(tmp_path):
  import train_lm

  results = train_lm.main(["--d-model", "32", "--layers", "1", "--context", "32",
                           "--batch-size", "8", "--max-bytes", "100000", "--eval-batches", "2",
                           "--steps", "6", "--retrain-steps", "2", "--iterations", "2",
                           "--no-plots", "--mesh", "data=2,fsdp=4", "--out", str(tmp_path)])
  assert results["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)


GRANULARITIES = [
    jaxprune.Prune(0.7, distribution=jaxprune.distributions.erk()),
    jaxprune.Prune(0.7, scope="row"),
    jaxprune.Prune(0.6, scope="row", axis=-1),
    jaxprune.Prune(0.5, scope=jaxprune.blocks((4, 4))),
    jaxprune.Prune(0.5, scope=jaxprune.channels(-1)),
    jaxprune.Prune(0.7, score=jaxprune.scores.random_score(3)),
    jaxprune.Prune(0.7, distribution=jaxprune.distributions.erk(), stacked={"stack/kernel": 1}),
    jaxprune.NM(2, 4),
]


# Every granularity on Explicit axes (where JAX checks shardings at trace time); on
# Auto axes those with their own reshapes and scans.
CASES = [(t, "Explicit") for t in GRANULARITIES] + [
    (t, "Auto") for t in GRANULARITIES if str(t).split()[1:2] in (["row"], ["blocks"], ["ERK"])]


@pytest.mark.parametrize("target, axis_type", CASES, ids=lambda v: str(v))
def test_every_granularity_on_fsdp_leaves_equals_one_device(target, axis_type):
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
  params = _params()
  params["stack"] = {"kernel": jnp.round(4 * jax.random.normal(jax.random.key(9), (4, 32, 64)))}
  where = jaxprune.select(params)
  sharded = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  previous = jaxprune.ranked_masks(params, 0.2, where)
  expected = target.masks(params, where, previous=previous)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, m, t: t.masks(p, where, previous=m))(
        sharded, jaxprune.sharding.place_masks(previous, sharded), target)
  selected = [w for w, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(where)) if s]
  for g, e, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), selected, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim)


def test_calibration_statistics_wanda_and_sparsegpt_on_fsdp_params_equal_one_device():
  mesh = jaxprune.sharding.make_mesh("fsdp=8")
  params = _params()
  where = jaxprune.select(params)

  def apply(p, x):
    block = p["blocks"][0]
    h = jnp.tanh(x @ block["fc1"]["kernel"] + block["fc1"]["bias"]) @ block["fc2"]["kernel"]
    return h @ block["output_proj"]["kernel"]

  x = jax.random.normal(jax.random.key(5), (64, 32))
  want = jaxprune.oneshot.input_statistics(apply, params, [x], where, gram=True)
  sharded = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  got = jaxprune.oneshot.input_statistics(apply, sharded, [x], where, gram=True)
  assert set(got.leaves) == set(want.leaves) and got.unattributed == want.unattributed
  for path, s in want.leaves.items():
    np.testing.assert_allclose(np.asarray(got.leaves[path].sq_norms), np.asarray(s.sq_norms),
                               rtol=1e-5, err_msg=path)
  target = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(got), scope="row")
  np.testing.assert_equal(_host(target.masks(sharded, where)),
                          _host(jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(want),
                                               scope="row").masks(params, where)))
  new_sharded, masks_sharded = jaxprune.oneshot.sparsegpt(sharded, got, 0.5, where, block=16)
  new, masks = jaxprune.oneshot.sparsegpt(params, want, 0.5, where, block=16)
  np.testing.assert_equal(_host(masks_sharded), _host(masks))
  for a, b in zip(jax.tree.leaves(new_sharded), jax.tree.leaves(new)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _sparse_steps(tx, params, steps=6, gather=False):
  def loss(p, x):
    if gather:  # FSDP's forward: an Explicit mesh wants the all-gather written out
      p = jax.tree.map(lambda w: jax.sharding.reshard(w, jax.P()), p)
    block = p["blocks"][0]
    h = jnp.tanh(x @ block["fc1"]["kernel"] + block["fc1"]["bias"]) @ block["fc2"]["kernel"]
    return jnp.mean((h @ block["output_proj"]["kernel"]) ** 2)

  @jax.jit
  def step(p, state, x):
    grads = jax.grad(loss)(p, x)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, jax.random.normal(jax.random.key(i), (16, 32)))
  assert step._cache_size() == 1
  return params, state


# SET is RigL's code path with random growth; STE's state on Auto axes is RigL's case.
@pytest.mark.parametrize("method, axis_type", [("rigl", "Explicit"), ("rigl", "Auto"),
                                               ("ste", "Explicit")])
def test_sparse_training_on_fsdp_leaves_equals_one_device(method, axis_type):
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
  params = _params()
  where = jaxprune.select(params)
  start = jaxprune.ranked_masks(params, 0.75, where, score=jaxprune.scores.random_score(0))

  def make_tx(masks):
    if method == "ste":
      return jaxprune.sparse_training.straight_through(optax.adam(1e-2), where=where,
                                                       update_every=2,
                                       schedule=optax.constant_schedule(0.75))
    schedule = (jaxprune.sparse_training.rigl_schedule(0.3) if method == "rigl"
                else jaxprune.sparse_training.set_schedule(0.3))
    return jaxprune.sparse_training.drop_and_grow(optax.adam(1e-2), masks, schedule=schedule,
                                                  update_every=2)

  want_params, want_state = _sparse_steps(make_tx(start), params)
  sharded = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  with jax.set_mesh(mesh):
    got_params, got_state = _sparse_steps(make_tx(jaxprune.sharding.place_masks(start, sharded)),
                                          sharded, gather=axis_type == "Explicit")
  np.testing.assert_equal(_host(jaxprune.get_masks(got_state)),
                          _host(jaxprune.get_masks(want_state)))
  for a, b, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params),
                     jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert a.sharding.is_equivalent_to(w.sharding, a.ndim)


def test_shrink_keeps_each_leafs_sharding():
  mesh = jaxprune.sharding.make_mesh("data=2,fsdp=4")
  params = _params()["blocks"][0]
  fsdp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  by_rank = {1: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")), 2: fsdp}
  sharded = jax.device_put(params, jax.tree.map(lambda x: by_rank[x.ndim], params))

  def mlp(p, x):
    return jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]

  groups = jaxprune.structural.channel_groups(mlp, sharded, jax.ShapeDtypeStruct((4, 32),
                                                                                 jnp.float32))
  importance = jaxprune.structural.magnitude_importance(groups, sharded)
  keep = jaxprune.structural.keep_top(groups, importance, 0.5, round_to=4)
  small = jaxprune.structural.shrink(sharded, groups, keep)
  assert [groups[i].kind for i in keep] == ["mlp_hidden"]
  assert small["fc1"]["kernel"].shape == (32, 64)
  assert small["fc1"]["kernel"].sharding.is_equivalent_to(fsdp, 2)
  assert small["fc2"]["kernel"].sharding.is_equivalent_to(fsdp, 2)
  with pytest.warns(UserWarning) as record:
    uneven = jaxprune.structural.shrink(sharded, groups, {i: np.arange(63) for i in keep})
  messages = sorted(str(w.message) for w in record)
  assert [m.split(":")[0] for m in messages] == ["fc1/bias", "fc1/kernel"]
  assert all("now has 63 entries" in m and "round_to=4" in m for m in messages)
  assert uneven["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, None)
  x = jnp.ones((4, 32))
  np.testing.assert_allclose(mlp(small, x), mlp(jax.device_get(small), x), rtol=1e-5)

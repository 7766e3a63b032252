"""Per-leaf sparsity distributions: JaxPruner's ERK expectations, exact totals, traced
sparsities, and the masks they give through `ranked_masks` and `Prune`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_references import exact_count

import jaxprune

# JaxPruner's `sparsity_distributions_test.testGetSparsityERKSucceed` cases: shapes,
# sparsity, kernel (their include_kernel), power, expected per-leaf sparsity (2 places).
THREE = {"a": (2, 4), "b": (3, 6), "c": (2, 4, 6)}
ERK_CASES = [
    ({"a": (2, 4)}, 0.5, True, 1.0, {"a": 0.5}),
    (THREE, 0.5, True, 1.0, {"a": 0.0, "b": 0.31, "c": 0.655}),
    (THREE, 0.5, False, 1.0, {"a": 0.21, "b": 0.47, "c": 0.56}),
    # JaxPruner expects 0.556 / 0.70 / 0.85 here: it keeps sum(n_i - floor(0.8 n_i)) = 16
    # weights (sparsity 0.784), jaxprune exactly (1 - 0.8) * 74 = 14.8: eps = 14.8 / 27.
    (THREE, 0.8, True, 1.0, {"a": 0.589, "b": 0.726, "c": 0.863}),
    (THREE, 0.5, True, 2.0, {"a": 0.0, "b": 0.033, "c": 0.758}),
    # testERKSparsityMapGenerator: a tree with a 3-d and a 2-d leaf.
    ({"a": (2, 4), "b/c": (3, 6, 7), "b/d": (7, 4)}, 0.5, True, 1.0, {"a": 0.0, "b/c": 0.64,
                                                                      "b/d": 0.0}),
]


@pytest.mark.parametrize("shapes, sparsity, kernel, power, want", ERK_CASES)
def test_erk_sparsities_match_jaxpruner(shapes, sparsity, kernel, power, want):
  d = jaxprune.distributions.erk(power, kernel=kernel)
  got = d.sparsities(list(shapes), list(shapes.values()), sparsity)
  for name, s in zip(shapes, got):
    assert float(s) == pytest.approx(want[name], abs=0.006), name
  # Traced: the same figures inside jit.
  traced = jax.jit(lambda s: d.sparsities(list(shapes), list(shapes.values()), s))(sparsity)
  np.testing.assert_allclose([float(x) for x in traced], [float(x) for x in got], atol=1e-6)


def test_fixed_leaves_keep_their_sparsity_and_leave_the_erk_sums():
  # JaxPruner's testERKSparsityMapGeneratorWithCustomMap: b/d fixed at 0.1, c gets 0.53.
  shapes = {"a": (2, 4), "b/c": (3, 6, 7), "b/d": (7, 4)}
  d = jaxprune.distributions.erk(fixed={"b/d": 0.1})
  got = dict(zip(shapes, d.sparsities(list(shapes), list(shapes.values()), 0.5)))
  assert got["b/d"] == 0.1 and float(got["b/c"]) == pytest.approx(0.53, abs=0.006)
  u = jaxprune.distributions.uniform(fixed={"b/d": 0.1})
  assert u.sparsities(list(shapes), list(shapes.values()), 0.5) == [0.5, 0.5, 0.1]
  counts = d.prune_counts(list(shapes), list(shapes.values()), 0.5)
  assert int(counts[2]) == round(0.1 * 28)
  # The free leaves' counts sum to the target over the free leaves exactly.
  assert int(counts[0]) + int(counts[1]) == round(0.5 * (8 + 126))


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
                       min_size=1, max_size=6),
       sparsity=st.floats(0, 0.999), power=st.sampled_from([0.5, 1.0, 2.0]))
def test_erk_counts_are_exact_in_total_and_bounded_per_leaf(shapes, sparsity, power):
  paths = [f"l{i}" for i in range(len(shapes))]
  sizes = [int(np.prod(s)) for s in shapes]
  d = jaxprune.distributions.erk(power)
  counts = [int(c) for c in d.prune_counts(paths, shapes, sparsity)]
  assert sum(counts) == round(sparsity * sum(sizes))
  assert all(0 <= c <= n for c, n in zip(counts, sizes))
  # Every leaf within one weight of its real-valued share (largest remainder).
  shares = [float(s) * n for s, n in zip(d.sparsities(paths, shapes, sparsity), sizes)]
  assert max(abs(c - s) for c, s in zip(counts, shares)) <= 1.0 + 1e-3
  traced = jax.jit(lambda s: d.prune_counts(paths, shapes, s))(jnp.float32(sparsity))
  assert sum(int(c) for c in traced) == exact_count(sparsity, sum(sizes))


def test_erk_at_sparsity_zero_keeps_every_leaf_dense():
  # Distinct raw densities: the last boundary's eps * raw lands a float32 ulp above
  # 1, which once fell back to d = 0 and pruned 12% of a leaf at sparsity 0.
  shapes = [(2, 36), (2, 17, 36), (4, 7, 18)]
  d = jaxprune.distributions.erk(0.5)
  assert [float(s) for s in d.sparsities(["a", "b", "c"], shapes, 0.0)] == [0.0] * 3
  assert [int(c) for c in d.prune_counts(["a", "b", "c"], shapes, 0.0)] == [0] * 3


def test_erk_total_rounds_like_prune_count():
  # One weight at sparsity 0.5: Python's round (half to even) says 0, as `uniform`.
  assert [int(c) for c in jaxprune.distributions.erk(0.5).prune_counts(["a"], [(1,)], 0.5)] == [0]
  # A NumPy scalar is concrete too (Python's rounding); a jax array is read as traced.
  erk = jaxprune.distributions.erk(0.5)
  assert [int(c) for c in erk.prune_counts(["a"], [(1,)], np.float32(0.5))] == [0]
  assert [int(c) for c in erk.prune_counts(["a"], [(1,)], jnp.float32(0.5))] == [
      int(jaxprune.distributions.uniform().prune_counts(["a"], [(1,)], jnp.float32(0.5))[0])]


def test_bad_distributions_are_refused_by_name():
  with pytest.raises(ValueError, match="power"):
    jaxprune.distributions.erk(0)
  with pytest.raises(ValueError, match="fixed sparsity of 'fc1'"):
    jaxprune.distributions.erk(fixed={"fc1": 1.5})
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="global"):
    jaxprune.ranked_masks(params, 0.5, {"w": True}, scope="global",
                          distribution=jaxprune.distributions.erk())
  with pytest.raises(TypeError, match="distribution"):
    jaxprune.ranked_masks(params, 0.5, {"w": True}, distribution={"w": 0.5})


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 8, 16))},
          "fc1": {"kernel": jax.random.normal(k[1], (64, 128)), "bias": jnp.zeros(128)},
          "head": {"kernel": jax.random.normal(k[2], (128, 10))}}


def test_erk_masks_prune_the_exact_total_and_keep_thin_leaves_denser():
  params = _params()
  where = jaxprune.select(params)
  masks = jaxprune.ranked_masks(params, 0.9, where, distribution=jaxprune.distributions.erk())
  sizes = {k: params[k]["kernel"].size for k in ("conv", "fc1", "head")}
  pruned = {k: int((~masks[k]["kernel"]).sum()) for k in sizes}
  assert sum(pruned.values()) == round(0.9 * sum(sizes.values()))
  assert masks["fc1"]["bias"] is None
  # (sum dims / prod dims) is largest for the head: it keeps the largest fraction.
  density = {k: 1 - pruned[k] / sizes[k] for k in sizes}
  assert density["head"] > density["conv"] > 0 and density["head"] > density["fc1"]
  # The kept weights are each leaf's largest magnitudes.
  for k in sizes:
    w = np.abs(np.asarray(params[k]["kernel"])).ravel()
    kept = np.asarray(masks[k]["kernel"]).ravel()
    assert w[kept].min() >= w[~kept].max()


def test_prune_targets_run_in_pruned_and_in_prune_retrain():
  params = _params()
  where = jaxprune.select(params)
  target = jaxprune.Prune(0.8, distribution=jaxprune.distributions.erk())
  assert str(target) == "80.00% ERK"
  want = target.masks(params, where)
  # As the schedule of `pruned`'s gradual mode (traced sparsity inside the update).
  tx = jaxprune.gradually_pruned(optax.sgd(0.0), where=where, update_every=1,
                                 schedule=lambda count: jaxprune.Prune(0.8,
                                                             distribution=jaxprune.distributions.erk()))
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  got = jaxprune.get_masks(state)
  for k in ("conv", "fc1", "head"):
    np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"], err_msg=k)
  # As a schedule entry of the loop's prune step (its sparsity traced).
  opt_state = jaxprune.pruned(optax.sgd(0.0), jaxprune.ranked_masks(params, 0.0, where)).init(
      params)
  step = jax.jit(lambda p, o, t: jaxprune.prune_step(p, o, t, where))
  _, opt_state = step(params, opt_state, target)
  got = jaxprune.get_masks(opt_state)
  for k in ("conv", "fc1", "head"):
    np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"], err_msg=k)


def test_a_schedule_of_erk_targets_compiles_one_prune_step():
  from test_targets import make_params, prune_retrain_counting_compiles

  params = make_params()
  schedule = [jaxprune.Prune(s, distribution=jaxprune.distributions.erk()) for s in (0.3, 0.6, 0.8)]
  result, compiled = prune_retrain_counting_compiles(params, schedule)
  assert compiled.count("jit(prune_step)") == 1
  # ERK's exact total after every prune, and the thin fc2 (16 x 4) kept denser.
  total = sum(int((~m).sum()) for m in jax.tree.leaves(result.masks))
  assert total == round(0.8 * (8 * 16 + 16 * 4))
  assert result.masks["fc2"]["kernel"].mean() > result.masks["fc1"]["kernel"].mean()
  assert [r.target_sparsity for r in result.history] == [0.3, 0.6, 0.8]


def test_by_path_gives_each_leaf_its_own_exact_sparsity():
  k = jax.random.split(jax.random.key(2), 2)
  params = {"body": {"kernel": jax.random.normal(k[0], (16, 8))},
            "head": {"kernel": jax.random.normal(k[1], (8, 4))}}
  d = jaxprune.distributions.by_path(lambda path, shape, s: s / 2 if "head" in path else s)
  masks = jax.jit(lambda p, s: jaxprune.Prune(s, distribution=d).masks(
      p, jaxprune.select(p)))(params, 0.5)
  assert int((~masks["body"]["kernel"]).sum()) == 64
  assert int((~masks["head"]["kernel"]).sum()) == 8          # round(0.25 * 32)
  with pytest.raises(ValueError, match=r"the sparsity of head/kernel is 1\.5"):
    jaxprune.distributions.by_path(lambda path, shape,
                                   s: 1.5 if "head" in path else s).prune_counts(
        ["body/kernel", "head/kernel"], [(16, 8), (8, 4)], 0.5)
  with pytest.raises(ValueError, match="takes a function"):
    jaxprune.distributions.by_path(0.5)


# ----------------------------------------------------------------------------- OWL


def owl_reference(ratios: list[float], sizes: list[int], s: float, spread: float) -> np.ndarray:
  """OWL's per-leaf sparsities in NumPy (float64), written from the formula: ratios
  scaled to [0, 1], centred by size, `s * (1 - 2 * spread * c)`; then, one at a time,
  shares past 1 held at 1 and the others shifted up alike to keep `s * N`."""
  d = np.asarray(ratios, np.float64)
  n = np.asarray(sizes, np.float64)
  c = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else np.zeros_like(d)
  c = c - (c * n).sum() / n.sum()
  out = s * (1 - 2 * spread * c)
  full = np.zeros(len(d), bool)
  while (out[~full] > 1 + 1e-12).any():
    full |= out > 1 + 1e-12
    out[full] = 1.0
    rest = ~full
    if rest.any():
      out[rest] += (s * n.sum() - (out * n).sum()) / n[rest].sum()
  return np.clip(out, 0.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(leaves=st.lists(st.tuples(st.integers(1, 60), st.floats(0, 0.2)), min_size=1,
                       max_size=6),
       sparsity=st.floats(0, 0.95), spread=st.floats(0, 0.5))
def test_owl_matches_the_numpy_reference_and_totals_exactly(leaves, sparsity, spread):
  paths = [f"l{i}" for i in range(len(leaves))]
  shapes = [(n,) for n, _ in leaves]
  d = jaxprune.distributions.owl({p: r for p, (_, r) in zip(paths, leaves)}, spread)
  want = owl_reference([r for _, r in leaves], [n for n, _ in leaves], sparsity, spread)
  got = np.array([float(x) for x in d.sparsities(paths, shapes, sparsity)])
  np.testing.assert_allclose(got, want, atol=1e-6)
  counts = [int(c) for c in d.prune_counts(paths, shapes, sparsity)]
  assert sum(counts) == round(sparsity * sum(n for n, _ in leaves))
  for c, (n, _), s in zip(counts, leaves, want):
    assert abs(c - s * n) <= 1 + 1e-4 * n  # each within one weight (largest remainder)


def test_owl_prunes_outlier_rich_leaves_less_and_ramps_from_zero():
  ratios = {"quiet/kernel": 0.001, "loud/kernel": 0.05, "mid/kernel": 0.02}
  paths, shapes = list(ratios), [(32, 32)] * 3
  d = jaxprune.distributions.owl(ratios, spread=0.1)
  quiet, loud, mid = (float(x) for x in d.sparsities(paths, shapes, 0.8))
  # Scaled ratios 0, 1, 19/49; centred (equal sizes), quiet's is -(1 + 19/49) / 3.
  assert loud < mid < quiet
  assert quiet == pytest.approx(0.8 * (1 + 0.2 * (1 + 19 / 49) / 3), abs=1e-6)
  # Under jit (a gradual ramp's traced sparsity): the same; at 0 every leaf stays dense.
  traced = jax.jit(lambda s: d.prune_counts(paths, shapes, s))
  assert [int(c) for c in traced(0.0)] == [0, 0, 0]
  assert [int(c) for c in traced(0.8)] == [int(c) for c in d.prune_counts(paths, shapes, 0.8)]


def test_outlier_ratios_from_wanda_scores_feed_owl_masks():
  k1, k2, kx = jax.random.split(jax.random.key(3), 3)
  params = {"fc1": {"kernel": jax.random.normal(k1, (16, 32))},
            "fc2": {"kernel": jax.random.normal(k2, (32, 8))}}
  # Two input features of fc1 ten times louder: its Wanda scores have outliers.
  x = jax.random.normal(kx, (64, 16)).at[:, :2].multiply(10.0)

  def apply_fn(p, x):
    return jnp.tanh(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]

  where = jaxprune.select(params)
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, [x], where)
  ratios = jaxprune.scores.outlier_ratios(params, where, jaxprune.scores.wanda_score(stats), m=5.0)
  # The reference: |w| * ||x_j|| per weight, the fraction above 5 means.
  norms = np.sqrt((np.asarray(x, np.float64) ** 2).sum(0))
  a = np.abs(np.asarray(params["fc1"]["kernel"])) * norms[:, None]
  assert ratios["fc1/kernel"] == pytest.approx(float((a > 5 * a.mean()).mean()), abs=1e-6)
  assert ratios["fc1/kernel"] > ratios["fc2/kernel"]
  masks = jaxprune.Prune(0.7, distribution=jaxprune.distributions.owl(ratios)).masks(params, where)
  kept = {k: float(np.mean(masks[k]["kernel"])) for k in masks}
  assert kept["fc1"] > kept["fc2"]  # the outlier-rich leaf keeps more
  total = sum(int(np.sum(~masks[k]["kernel"])) for k in masks)
  assert total == round(0.7 * (16 * 32 + 32 * 8))


@pytest.mark.parametrize("call, named", [
    (lambda: jaxprune.distributions.owl({"a": 0.1}, spread=0.6), "spread"),
    (lambda: jaxprune.distributions.owl({}), "non-empty"),
    (lambda: jaxprune.distributions.owl({"a": 1.5}), "'a'"),
    (lambda: jaxprune.distributions.owl({"a": 0.1}).prune_counts(["b"], [(4,)], 0.5),
     "no outlier ratio for b"),
    (lambda: jaxprune.scores.outlier_ratios({"a": jnp.ones(4)}, {"a": True},
                                     jaxprune.scores.magnitude_score(), m=0), "m must be"),
])
def test_bad_owl_settings_are_refused_by_name(call, named):
  with pytest.raises(ValueError, match=named):
    call()

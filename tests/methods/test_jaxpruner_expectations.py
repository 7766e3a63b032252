"""JaxPruner's `mask_calculator_test`, `pruners_test` and `global_pruners_test`
expectations, ported to jaxprune's API.

Where the semantics match (same scores, sparsity and pattern), jaxprune must give
JaxPruner's masks. Where they differ on purpose, the test says how and checks
jaxprune's own rule: ties at the threshold are *pruned* in position order
(JaxPruner keeps the earlier ones, and in N:M groups the later ones).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune

SCORE_1 = [
    [[0.69, 0.37, 0.96, 0.81], [0.79, 0.55, 0.88, 0.53], [0.66, 0.88, 0.4, 0.83],
     [0.13, 0.8, 0.91, 0.96]],
    [[0.34, 0.17, 0.07, 0.74], [0.13, 0.13, 0.83, 0.76], [0.13, 0.92, 0.25, 0.75],
     [0.37, 0.42, 0.65, 0.46]],
]
MASK_UNS_1 = [
    [[0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
]
MASK_N2_M4_1 = [
    [[0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
    [[1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1]],
]
MASK_N2_M4_AXIS1_1 = [
    [[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1], [0, 1, 1, 1]],
    [[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 0]],
]
MASK_CHANNEL_AXIS1_1 = [[[0] * 4, [0] * 4, [1] * 4, [1] * 4]] * 2
MASK_CHANNEL_AXIS2_1 = [[[0, 0, 1, 1]] * 4] * 2
SCORE_4 = [1, 0.5, 0.3, 0.2, 1, 1.5, 1.8, 2.0, 1, 1]
SCORE_5 = [SCORE_4, SCORE_4]


def _ranked(score, sparsity, **kw):
  params = {"w": jnp.asarray(score, jnp.float32)}
  return np.asarray(jaxprune.ranked_masks(params, sparsity, {"w": True},
                                          score=jaxprune.scores.given_score(params), **kw)["w"])


def test_unstructured_top_k():
  # testScoreBasedTopKWithUnstructuredInput, SCORE_1 at 0.8: no tie at the threshold.
  np.testing.assert_array_equal(_ranked(SCORE_1, 0.8), np.array(MASK_UNS_1, bool))
  # SCORE_4 / SCORE_5 at 0.5 tie four 1.0s at the threshold. JaxPruner keeps the earlier
  # ones ([1,0,0,0,1,1,1,1,0,0]); jaxprune prunes ties in position order, keeping the later.
  np.testing.assert_array_equal(_ranked(SCORE_4, 0.5), np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                                                                bool))
  # SCORE_5 as one leaf: 10 of 20 pruned; of the eight 1.0s, the first four in flat order
  # (all of row 0's) go. JaxPruner keeps those: [[1,0,0,0,1,1,1,1,1,1], [0,0,0,0,0,1,1,1,0,0]].
  np.testing.assert_array_equal(
      _ranked(SCORE_5, 0.5),
      np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 1, 1, 1, 1, 1, 1]], bool))


@pytest.mark.parametrize("axis, want", [(-1, MASK_N2_M4_1), (1, MASK_N2_M4_AXIS1_1)])
def test_n_by_m(axis, want):
  # testScoreBasedTopKWithNbyMInput (JaxPruner's default axis is the last one).
  params = {"w": jnp.asarray(SCORE_1, jnp.float32)}
  got = jaxprune.nm_masks(params, 2, 4, {"w": True}, axis=axis)["w"]
  np.testing.assert_array_equal(np.asarray(got), np.array(want, bool))
  # All-equal scores: JaxPruner keeps the later two of each group, jaxprune the earlier two.
  ones = {"w": jnp.ones((1, 8))}
  got = jaxprune.nm_masks(ones, 2, 4, {"w": True}, axis=-1)["w"]
  np.testing.assert_array_equal(np.asarray(got), np.array([[1, 1, 0, 0, 1, 1, 0, 0]], bool))
  # n > m, and an axis that is not a multiple of m, are refused.
  with pytest.raises(ValueError):
    jaxprune.nm_masks(ones, 4, 2, {"w": True}, axis=-1)
  with pytest.raises(ValueError):
    jaxprune.nm_masks({"w": jnp.ones((2, 5, 3))}, 2, 4, {"w": True}, axis=1)


@pytest.mark.parametrize("axis, want", [(1, MASK_CHANNEL_AXIS1_1), (-2, MASK_CHANNEL_AXIS1_1),
                                        (2, MASK_CHANNEL_AXIS2_1), (-1, MASK_CHANNEL_AXIS2_1)])
def test_channels(axis, want):
  # testScoreBasedTopKWithChannelInput on SCORE_1 at 0.5 (L2 norms, and JaxPruner's mean,
  # order these channels alike).
  np.testing.assert_array_equal(_ranked(SCORE_1, 0.5, scope=jaxprune.channels(axis)),
                                np.array(want, bool))


def test_channels_with_tied_scores():
  # SCORE_5, channels along axis 1: four channels tie at the threshold. JaxPruner keeps
  # channels 0 and 4; jaxprune prunes those first and keeps 8 and 9.
  got = _ranked(SCORE_5, 0.5, scope=jaxprune.channels(1))
  np.testing.assert_array_equal(got, np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]] * 2, bool))


# ----------------------------------------------- pruners_test and global_pruners_test


def test_magnitude_and_saliency_scores():
  # pruners_test.testMagnitudePruning / testSaliencyPruning: |w| and |w * g|.
  params = {"w": jnp.array([0.1, 0.9, -0.2, 0.5])}
  grads = {"w": jnp.array([5.0, 1.0, 3.0, 0.5])}
  np.testing.assert_allclose(np.asarray(jnp.abs(params["w"])), [0.1, 0.9, 0.2, 0.5])
  (saliency,) = jaxprune.scores.saliency_score(grads).scores(params, [0])
  np.testing.assert_allclose(np.asarray(saliency), [0.5, 0.9, 0.6, 0.25], rtol=1e-6)
  # Their ranking: at 0.5, magnitude keeps 0.9 and 0.5, saliency 0.9 and 0.6.
  kept = jaxprune.ranked_masks(params, 0.5, {"w": True})["w"]
  np.testing.assert_array_equal(np.asarray(kept), [0, 1, 0, 1])
  kept = jaxprune.ranked_masks(params, 0.5, {"w": True},
                               score=jaxprune.scores.saliency_score(grads))["w"]
  np.testing.assert_array_equal(np.asarray(kept), [0, 1, 1, 0])


def test_random_scores_differ_by_seed_and_prune_exactly_half():
  # pruners_test.testRandomPruning: two seeds, different scores; 50% sparsity exactly.
  params = {"w": jax.random.normal(jax.random.key(0), (10, 10))}
  (a,) = jaxprune.scores.random_score(0).scores(params, [0])
  (b,) = jaxprune.scores.random_score(5).scores(params, [0])
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  mask = jaxprune.ranked_masks(params, 0.5, {"w": True}, score=jaxprune.scores.random_score(0))["w"]
  assert float((~mask).mean()) == 0.5


@pytest.mark.parametrize("score", [None, jaxprune.scores.normalized_score()],
                         ids=["raw", "normalized"])
def test_global_pruning(score):
  # global_pruners_test.testGlobalPruning (JaxPruner normalizes per leaf by default:
  # `use_normalization=True`, here `normalized_score()`); both keep the same three.
  tree = {"w": jnp.array([0.1, 0.9, -0.2, 0.5]), "w2": jnp.array([0.7, 0.8])}
  masks = jaxprune.ranked_masks(tree, 0.5, {"w": True, "w2": True}, scope="global",
                                score=score)
  np.testing.assert_array_equal(np.asarray(masks["w"]), [0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(masks["w2"]), [1, 1])


def test_normalized_global_scope_balances_leaves_of_different_scales():
  # Raw magnitudes in global scope prune a small-scale leaf first; normalized ones
  # compare each weight with its leaf's norm (JaxPruner's default behaviour).
  small = np.linspace(0.01, 0.1, 8, dtype=np.float32)
  big = 100 * np.linspace(0.02, 0.09, 8, dtype=np.float32)
  tree, where = {"a": jnp.asarray(small), "b": jnp.asarray(big)}, {"a": True, "b": True}
  raw = jaxprune.ranked_masks(tree, 0.5, where, scope="global")
  assert int(raw["a"].sum()) == 0 and int(raw["b"].sum()) == 8
  norm = jaxprune.ranked_masks(tree, 0.5, where, scope="global",
                               score=jaxprune.scores.normalized_score())
  scores = np.concatenate([small / np.linalg.norm(small), big / np.linalg.norm(big)])
  kept = np.ones(16, bool)
  kept[np.argsort(scores, kind="stable")[:8]] = False
  np.testing.assert_array_equal(np.concatenate([norm["a"], norm["b"]]), kept)
  assert 0 < int(norm["a"].sum()) < 8

"""Scores: saliency, random and given scores rank exactly like a NumPy sort of them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def _reference(values: list[np.ndarray], fraction: float, scope: str) -> list[np.ndarray]:
  """Kept masks from a stable argsort of the scores (ties by leaf, then row-major)."""
  def kept_of(flat, k):
    out = np.ones(flat.size, bool)
    out[np.argsort(flat, kind="stable")[:k]] = False
    return out
  if scope == "layer":
    return [kept_of(v.ravel(), round(fraction * v.size)).reshape(v.shape) for v in values]
  flat = np.concatenate([v.ravel() for v in values])
  kept, out, start = kept_of(flat, round(fraction * flat.size)), [], 0
  for v in values:
    out.append(kept[start:start + v.size].reshape(v.shape))
    start += v.size
  return out


PARAMS = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)),
                                       jnp.float32)},
          "b": {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)),
                                       jnp.bfloat16)}}
WHERE = {"a": {"kernel": True}, "b": {"kernel": True}}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0, 0.99),
       scope=st.sampled_from(["layer", "global"]), levels=st.sampled_from([3, 1000]))
def test_saliency_ranks_w_times_g(seed, fraction, scope, levels):
  rng = np.random.default_rng(seed)
  grads = {k: {"kernel": jnp.asarray(rng.integers(-levels, levels, v["kernel"].shape) / 4,
                                     v["kernel"].dtype)} for k, v in PARAMS.items()}
  got = jaxprune.ranked_masks(PARAMS, fraction, WHERE, scope=scope,
                              score=jaxprune.scores.saliency_score(grads))
  values = [np.abs(np.asarray(PARAMS[k]["kernel"], np.float32)
                   * np.asarray(grads[k]["kernel"], np.float32)) for k in ("a", "b")]
  for g, w in zip([got["a"]["kernel"], got["b"]["kernel"]], _reference(values, fraction, scope)):
    np.testing.assert_array_equal(g, w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0, 0.99),
       scope=st.sampled_from(["layer", "global"]))
def test_given_scores_rank_by_value_negative_first(seed, fraction, scope):
  rng = np.random.default_rng(seed)
  tree = {k: {"kernel": jnp.asarray(rng.integers(-4, 4, v["kernel"].shape) * 0.5, jnp.float32)}
          for k, v in PARAMS.items()}
  tree["a"]["kernel"] = tree["a"]["kernel"].at[0, 0].set(-0.0).at[0, 1].set(-jnp.inf)
  # -inf is refused outside jit (not finite); under jit it ranks first.
  masks = jax.jit(lambda p, t: jaxprune.ranked_masks(p, fraction, WHERE, scope=scope,
                                                     score=jaxprune.scores.given_score(t)))(PARAMS,
                                                                                            tree)
  values = [np.asarray(tree[k]["kernel"]) + 0.0 for k in ("a", "b")]  # -0.0 as 0.0
  for g, w in zip([masks["a"]["kernel"], masks["b"]["kernel"]],
                  _reference(values, fraction, scope)):
    np.testing.assert_array_equal(g, w)


def test_random_scores_are_reproducible_exact_and_seeded():
  a = jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score=jaxprune.scores.random_score(7))
  b = jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score=jaxprune.scores.random_score(7))
  c = jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score=jaxprune.scores.random_score(8))
  for k in ("a", "b"):
    np.testing.assert_array_equal(a[k]["kernel"], b[k]["kernel"])
    assert int((~a[k]["kernel"]).sum()) == round(0.5 * PARAMS[k]["kernel"].size)
  assert any(not np.array_equal(a[k]["kernel"], c[k]["kernel"]) for k in ("a", "b"))
  # Not the magnitude ranking.
  m = jaxprune.ranked_masks(PARAMS, 0.5, WHERE)
  assert any(not np.array_equal(a[k]["kernel"], m[k]["kernel"]) for k in ("a", "b"))


def test_mean_gradients_and_score_errors_name_the_leaf():
  def loss(p, x):
    return jnp.sum(p["a"]["kernel"] * x) + jnp.sum(p["b"]["kernel"].astype(jnp.float32))
  grads = jaxprune.scores.mean_gradients(loss, PARAMS, [jnp.ones((6, 8)), 3 * jnp.ones((6, 8))])
  np.testing.assert_allclose(grads["a"]["kernel"], 2.0)
  with pytest.raises(ValueError, match="at least one batch"):
    jaxprune.scores.mean_gradients(loss, PARAMS, [])
  bad = {"a": {"kernel": jnp.ones((6, 8))}, "b": {"kernel": jnp.ones((3, 5))}}
  with pytest.raises(ValueError, match="b/kernel"):
    jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score=jaxprune.scores.saliency_score(bad))
  nan = {"a": {"kernel": jnp.full((6, 8), jnp.nan)}, "b": {"kernel": jnp.ones((5, 3))}}
  with pytest.raises(ValueError, match="the score of a/kernel"):
    jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score=jaxprune.scores.given_score(nan))
  with pytest.raises(TypeError, match="score must be"):
    jaxprune.ranked_masks(PARAMS, 0.5, WHERE, score="saliency")


def _mlp():
  k = jax.random.split(jax.random.key(5), 3)
  params = {"fc1": {"kernel": jax.random.normal(k[0], (8, 16))},
            "fc2": {"kernel": jax.random.normal(k[1], (16, 4))}}
  x = jax.random.normal(k[2], (32, 8))
  y = jnp.arange(32) % 4

  def loss_fn(p, batch):
    logits = jnp.tanh(batch[0] @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), batch[1]])

  return params, loss_fn, (x, y)


def test_saliency_without_grads_uses_the_gradual_steps_gradient():
  params, loss_fn, batch = _mlp()
  where = jaxprune.select(params)
  tx = jaxprune.gradually_pruned(optax.sgd(0.0), where=where, update_every=1,
                                 schedule=lambda c: jaxprune.Prune(0.5,
                                                         score=jaxprune.scores.saliency_score()))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, batch)
  _, state = jax.jit(tx.update)(grads, state, params)
  want = jaxprune.Prune(0.5, score=jaxprune.scores.saliency_score(grads)).masks(params, where)
  got = jaxprune.get_masks(state)
  for name in ("fc1", "fc2"):
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]),
                                  np.asarray(want[name]["kernel"]))
  # Not what magnitude alone keeps: the gradient really entered the ranking.
  by_magnitude = jaxprune.ranked_masks(params, 0.5, where)
  assert not np.array_equal(np.asarray(got["fc1"]["kernel"]),
                            np.asarray(by_magnitude["fc1"]["kernel"]))


def test_saliency_without_grads_in_prune_retrain_uses_the_first_retraining_batch():
  params, loss_fn, batch = _mlp()
  where = jaxprune.select(params)
  seen = []

  def batch_at(step):
    seen.append(step)
    return batch

  target = jaxprune.Prune(0.6, score=jaxprune.scores.saliency_score())
  result = jaxprune.prune_retrain(
      params, loss_fn, batch_at, [batch], optimizer=optax.sgd(0.0), targets=[target],
      where=where, retrain_steps=1, hooks=[])
  want = jaxprune.Prune(0.6, score=jaxprune.scores.saliency_score(
      jax.grad(loss_fn)(params, batch))).masks(params, where)
  got = jaxprune.get_masks(result.opt_state)
  for name in ("fc1", "fc2"):
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]),
                                  np.asarray(want[name]["kernel"]))
  assert result.history[0].target == "60.00% saliency"


def test_saliency_without_grads_elsewhere_says_where_it_works():
  params, _, _ = _mlp()
  with pytest.raises(ValueError, match="gradients of the step that prunes"):
    jaxprune.Prune(0.5, score=jaxprune.scores.saliency_score()).masks(params,
                                                                      jaxprune.select(params))

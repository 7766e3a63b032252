"""Input statistics of targeted kernels, collected by interpreting the model's program,
against the inputs computed by hand; and Wanda's score ranked from them."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune

KEYS = jax.random.split(jax.random.key(0), 6)
X = np.asarray(jax.random.normal(KEYS[0], (6, 5, 8)))  # (batch, positions, features)


def _sq(x: np.ndarray) -> np.ndarray:
  x = x.reshape(-1, x.shape[-1]).astype(np.float64)
  return (x * x).sum(0)


def _plain():
  params = {"fc1": {"kernel": jax.random.normal(KEYS[1], (8, 16)), "bias": jnp.zeros(16)},
            "fc2": {"kernel": jax.random.normal(KEYS[2], (16, 4))}}

  def apply(p, x):
    return jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]

  hidden = np.tanh(X @ np.asarray(params["fc1"]["kernel"]))
  return params, apply, {"fc1/kernel": ((0,), _sq(X)), "fc2/kernel": ((0,), _sq(hidden))}


def _nnx():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 16, rngs=rngs)
      self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  k1 = np.asarray(state["fc1"]["kernel"].value)
  b1 = np.asarray(state["fc1"]["bias"].value)
  hidden = np.maximum(X @ k1 + b1, 0)
  return state, lambda s, x: nnx.merge(graphdef, s)(x), {
      "fc1/kernel": ((0,), _sq(X)), "fc2/kernel": ((0,), _sq(hidden))}


def _linen():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(x)))

  net = Net()
  variables = net.init(jax.random.key(1), X)
  p = variables["params"]
  hidden = np.asarray(nn.gelu(X @ p["fc1"]["kernel"] + p["fc1"]["bias"]))
  return variables, net.apply, {"fc1/kernel": ((0,), _sq(X)), "fc2/kernel": ((0,), _sq(hidden))}


def _equinox():
  mlp = eqx.nn.MLP(8, 4, 16, 1, key=KEYS[3])
  flat = X.reshape(-1, 8)
  hidden = np.maximum(flat @ np.asarray(mlp.layers[0].weight).T + np.asarray(mlp.layers[0].bias),
                      0)
  return mlp, lambda m, x: jax.vmap(m)(x.reshape(-1, 8)), {
      "layers/0/weight": ((1,), _sq(X)), "layers/1/weight": ((1,), _sq(hidden))}


@pytest.mark.parametrize("build", [_plain, _nnx, _linen, _equinox],
                         ids=["plain", "nnx", "linen", "equinox"])
def test_statistics_are_the_inputs_each_kernel_multiplies(build):
  params, apply, want = build()
  where = jaxprune.select(params, include=["kernel", "weight"])
  stats = jaxprune.oneshot.input_statistics(apply, params, [jnp.asarray(X), jnp.asarray(X)], where,
                                    gram=True)
  assert stats.unattributed == {}
  # Paths without nnx's trailing `/value` or Linen's leading `params/`.
  got = {p.removesuffix("/value").removeprefix("params/"): s for p, s in stats.leaves.items()}
  assert set(got) == set(want)
  for path, (axes, sq) in want.items():
    s = got[path]
    assert s.feature_axes == axes and s.stack_axes == () and s.rows == 2 * 30, path
    np.testing.assert_allclose(np.asarray(s.sq_norms), 2 * sq, rtol=2e-5, err_msg=path)
    np.testing.assert_allclose(np.trace(np.asarray(s.gram)), 2 * sq.sum(), rtol=2e-5)


def test_scanned_layers_get_one_statistic_per_layer_and_remat_is_seen_through():
  ws = jax.random.normal(KEYS[4], (3, 8, 8)) / 3

  def apply(p, x):
    @jax.checkpoint
    def body(h, w):
      return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, p["stack"])[0]

  stats = jaxprune.oneshot.input_statistics(apply, {"stack": ws}, [jnp.asarray(X)], {"stack": True})
  s = stats.leaves["stack"]
  assert s.stack_axes == (0,) and s.feature_axes == (1,) and s.sq_norms.shape == (3, 8)
  h, want = X, []
  for i in range(3):
    want.append(_sq(h))
    h = np.tanh(h @ np.asarray(ws[i]))
  np.testing.assert_allclose(np.asarray(s.sq_norms), np.stack(want), rtol=1e-4)


def test_attention_kernels_reshaped_into_heads_and_vmapped_experts():
  qkv = jax.random.normal(KEYS[4], (8, 12))              # (d, heads * head_dim), 2 heads
  experts = jax.random.normal(KEYS[5], (2, 8, 4))        # (E, in, out)

  def apply(p, x):
    heads = jnp.einsum("btd,dhk->bthk", x, p["qkv"].reshape(8, 2, 6))
    routed = jnp.stack([x, 2 * x])                       # each expert its own tokens
    per_expert = jax.vmap(lambda w, xe: xe @ w)(p["experts"], routed)
    return heads.sum() + per_expert.sum()

  params = {"qkv": qkv, "experts": experts}
  stats = jaxprune.oneshot.input_statistics(apply, params, [jnp.asarray(X)],
                                    {"qkv": True, "experts": True})
  assert stats.leaves["qkv"].feature_axes == (0,)
  np.testing.assert_allclose(np.asarray(stats.leaves["qkv"].sq_norms), _sq(X), rtol=1e-5)
  e = stats.leaves["experts"]
  assert e.stack_axes == (0,) and e.feature_axes == (1,)
  np.testing.assert_allclose(np.asarray(e.sq_norms), np.stack([_sq(X), 4 * _sq(X)]), rtol=1e-5)


def test_leaves_no_product_reaches_are_named_and_bad_input_refused():
  params = {"scale": jnp.ones((8, 8)), "fc": jnp.ones((8, 4))}

  def apply(p, x):
    return (x @ p["fc"]) * p["scale"].sum()

  stats = jaxprune.oneshot.input_statistics(apply, params, [jnp.asarray(X)], {"scale": True,
                                                                              "fc": True})
  assert set(stats.leaves) == {"fc"}
  assert "reduce_sum" in stats.unattributed["scale"]
  with pytest.raises(ValueError, match="at least one calibration batch"):
    jaxprune.oneshot.input_statistics(apply, params, [], {"scale": True, "fc": True})
  with pytest.raises(ValueError, match="inputs of fc hold NaN"):
    jaxprune.oneshot.input_statistics(apply, params, [jnp.full((2, 8), jnp.nan)],
                              {"scale": False, "fc": True})


def test_wanda_ranks_weight_times_input_norm_per_output_row():
  params, apply, _ = _plain()
  where = jaxprune.select(params)
  x = jnp.asarray(X) * jnp.arange(1.0, 9.0)        # input features of unequal scale
  stats = jaxprune.oneshot.input_statistics(apply, params, [x], where)
  target = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row")
  masks = jax.jit(lambda p, t: t.masks(p, where))(params, target)
  for name, inputs in (("fc1", np.asarray(x)),
                       ("fc2", np.tanh(np.asarray(x) @ np.asarray(params["fc1"]["kernel"])))):
    w = np.asarray(params[name]["kernel"])
    score = np.abs(w) * np.sqrt(_sq(inputs))[:, None]
    k = w.shape[0] // 2
    rank = np.argsort(np.argsort(score, axis=0, kind="stable"), axis=0, kind="stable")
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), rank >= k, err_msg=name)
  magnitude = jaxprune.ranked_masks(params, 0.5, where, scope="row")
  assert not np.array_equal(np.asarray(masks["fc1"]["kernel"]),
                            np.asarray(magnitude["fc1"]["kernel"]))
  with pytest.raises(ValueError, match="no input statistics for fc2/kernel"):
    only_fc1 = jaxprune.oneshot.input_statistics(apply, params, [x], {
        "fc1": {"kernel": True, "bias": False}, "fc2": {"kernel": False}})
    jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(only_fc1)).masks(params, where)


def test_wanda_two_four_keeps_the_best_two_of_every_four_inputs_by_score():
  params, apply, _ = _plain()
  where = {"fc1": {"kernel": True, "bias": False}, "fc2": {"kernel": False}}
  x = jnp.asarray(X) * jnp.arange(1.0, 9.0)
  stats = jaxprune.oneshot.input_statistics(apply, params, [x], where)
  target = jaxprune.NM(2, 4, score=jaxprune.scores.wanda_score(stats))
  assert str(target) == "2:4 wanda"
  kept = np.asarray(jax.jit(lambda p, t: t.masks(p, where))(params, target)["fc1"]["kernel"])
  score = np.abs(np.asarray(params["fc1"]["kernel"])) * np.sqrt(_sq(np.asarray(x)))[:, None]
  groups = score.reshape(2, 4, 16)
  order = np.argsort(-groups, axis=1, kind="stable")
  want = np.zeros_like(groups, bool)
  np.put_along_axis(want, order[:, :2], True, axis=1)
  np.testing.assert_array_equal(kept, want.reshape(8, 16))
  by_magnitude = jaxprune.nm_masks(params, 2, 4, where)["fc1"]["kernel"]
  assert not np.array_equal(kept, np.asarray(by_magnitude))

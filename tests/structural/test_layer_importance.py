"""Block Influence for depth pruning: per layer of a scanned residual stack against
a NumPy loop over the layers, an identity layer scored ~0 and ranked last then
dropped by `shrink` + `shrunk_program`, refusals naming the scan's line, and per
stage of the example LM against the stages' own outputs."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import lm_model
import numpy as np
import pytest
from flax import nnx

from jaxprune.structural import (
    block_influence,
    channel_groups,
    keep_top,
    layer_importance,
    shrink,
    shrunk_program,
)

B, T, D, F, LAYERS, VOCAB = 2, 5, 8, 16, 4, 11
IDENTITY = 2  # the layer whose output projection is zero


def _normal(key, *shape, scale=0.5):
  return jax.random.normal(jax.random.key(key), shape) * scale


def _rms(x, scale):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _model(params, tokens, reverse=False):
  def layer(carry, p):
    x, count = carry  # a second carry that is not the residual stream
    return (x + jnp.tanh(_rms(x, p["norm"]) @ p["w1"]) @ p["w2"], count + 1), None

  (x, _), _ = jax.lax.scan(layer, (params["emb"][tokens], 0), params["layers"], reverse=reverse)
  return _rms(x, params["final"]) @ params["emb"].T


def _params():
  layers = {"norm": 1 + _normal(0, LAYERS, D, scale=0.1), "w1": _normal(1, LAYERS, D, F),
            "w2": _normal(2, LAYERS, F, D).at[IDENTITY].set(0.0)}
  return {"emb": _normal(3, VOCAB, D, scale=1.0), "final": jnp.ones(D), "layers": layers}


def _batches():
  return [jax.random.randint(jax.random.key(10 + i), (B, T), 0, VOCAB) for i in range(2)]


def _reference(params, batches, reverse=False):
  """The layers in a NumPy loop: 1 - the mean over batches and positions of cos(x, y)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  cos = np.zeros((len(batches), LAYERS))
  for b, tokens in enumerate(batches):
    x = p["emb"][np.asarray(tokens)]
    for k in (reversed(range(LAYERS)) if reverse else range(LAYERS)):
      h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * p["layers"]["norm"][k]
      y = x + np.tanh(h @ p["layers"]["w1"][k]) @ p["layers"]["w2"][k]
      per_position = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
      cos[b, k] = per_position.mean()
      x = y
  return 1.0 - cos.mean(0)


@pytest.mark.parametrize("reverse", [False, True])
def test_scanned_layers_match_numpy_and_identity_ranks_last(reverse):
  params, batches = _params(), _batches()
  model = lambda p, t: _model(p, t, reverse)
  groups = channel_groups(model, params, batches[0])
  importance = layer_importance(groups, params, batches)
  [(index, values)] = importance.items()
  assert groups[index].kind == "layers" and values.shape == (LAYERS,)
  np.testing.assert_allclose(values, _reference(params, batches, reverse), atol=2e-6)
  assert abs(values[IDENTITY]) < 1e-6 and np.all(np.delete(values, IDENTITY) > 1e-3)
  assert np.argsort(values)[0] == IDENTITY

  keep = keep_top(groups, importance, (LAYERS - 1) / LAYERS, kinds=("layers",))
  assert keep[index].tolist() == [k for k in range(LAYERS) if k != IDENTITY]
  small = shrink(params, groups, keep)
  assert small["layers"]["w1"].shape == (LAYERS - 1, D, F)
  out = jax.jit(shrunk_program(groups, keep))(small, batches[1])
  np.testing.assert_allclose(out, model(params, batches[1]), atol=1e-5, rtol=1e-5)


def test_refusals_name_the_scan():
  def no_residual(params, x):  # the carry is never added to: no residual group
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["layers"])[0]

  line = inspect.getsourcelines(no_residual)[1] + 1
  params = {"layers": _normal(0, LAYERS, D, D)}
  x = _normal(1, T, D)
  groups = channel_groups(no_residual, params, x)
  with pytest.raises(ValueError, match=f"test_layer_importance.py:{line} .*no carry"):
    layer_importance(groups, params, [x])
  flat = {"w": _normal(2, D, D)}
  residual = channel_groups(lambda p, x: x + x @ p["w"], flat, x)
  with pytest.raises(ValueError, match="no `layers` group"):
    layer_importance(residual, flat, [x])
  params = _params()
  groups = channel_groups(_model, params, _batches()[0])
  with pytest.raises(ValueError, match="at least one batch"):
    layer_importance(groups, params, [])
  with pytest.raises(ValueError, match=r"batch leaf 0 has shape \(5,\)"):
    layer_importance(groups, params, [jnp.zeros(T, jnp.int32)])


def test_stages_of_the_example_lm_match_numpy():
  config = lm_model.LMConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=2, d_ff=32,
                             context=8)
  graphdef, params, rest = lm_model.split_model(lm_model.TransformerLM(config,
                                                                       rngs=nnx.Rngs(0)))
  stages = lm_model.make_stages(graphdef, rest, config.num_layers)
  batches = [jax.random.randint(jax.random.key(i), (2, config.context + 1), 0, 32)
             for i in range(2)]
  scores = block_influence(stages, params, batches)
  assert list(scores) == [1, 2, 3]  # the embedding changes the shape: not scored
  runs = [jax.jit(s) for s in stages]
  cos = np.zeros((len(batches), len(stages)))
  for b, batch in enumerate(batches):
    x = runs[0](params, batch)
    for k in range(1, len(stages)):
      y = runs[k](params, x)
      a, c = np.asarray(x, np.float64), np.asarray(y, np.float64)
      cos[b, k] = np.mean((a * c).sum(-1) / np.linalg.norm(a, axis=-1)
                          / np.linalg.norm(c, axis=-1))
      x = y
  reference = 1.0 - cos.mean(0)
  assert all(np.isfinite(v) for v in scores.values())
  np.testing.assert_allclose([scores[k] for k in (1, 2, 3)], reference[1:], atol=2e-6)


class _Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm, self.fc1 = nnx.RMSNorm(D, rngs=rngs), nnx.Linear(D, F, rngs=rngs)
    self.fc2 = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


class _ScannedNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.emb = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.split_rngs(splits=3)(nnx.vmap(_Block, in_axes=0, out_axes=0))(rngs)

  def __call__(self, tokens):
    step = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    return step(self.emb(tokens), self.blocks) @ self.emb.embedding[...].T


def test_nnx_scan_matches_its_layers_one_by_one():
  model = _ScannedNNX(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  apply = lambda p, t: nnx.merge(graphdef, p, rest)(t)
  batches = _batches()
  groups = channel_groups(apply, params, batches[0])
  [(index, values)] = layer_importance(groups, params, batches).items()
  block_def, stacked = nnx.split(model.blocks)
  cos = np.zeros((len(batches), 3))
  for b, tokens in enumerate(batches):
    x = np.asarray(model.emb(tokens), np.float64)
    for k in range(3):
      block = nnx.merge(block_def, jax.tree.map(lambda a, k=k: a[k], stacked))
      y = np.asarray(block(x), np.float64)
      cos[b, k] = np.mean((x * y).sum(-1) / np.linalg.norm(x, axis=-1)
                          / np.linalg.norm(y, axis=-1))
      x = y
  assert groups[index].kind == "layers"
  np.testing.assert_allclose(values, 1.0 - cos.mean(0), atol=2e-6)

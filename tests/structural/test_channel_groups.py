"""`channel_groups` / `shrink` / `keep_top`: coupled channels traced from the jaxpr
(issue 29, the foundation): an MLP's hidden neurons, a residual stream across
layers through a norm, attention heads as blocks of a flat projection, a refusal
naming an unknown primitive and its line, and the exactness of the smaller model
(equal to the dense one with the removed channels zeroed)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.structural import (
    Group,
    Member,
    channel_groups,
    keep_top,
    magnitude_importance,
    shrink,
    shrunk_program,
)

S = jax.ShapeDtypeStruct
D, HIDDEN, OUT, T = 4, 6, 3, 5
HEADS, HEAD_DIM = 3, 2


def _mlp_params(key=0) -> dict:
  k = jax.random.split(jax.random.key(key), 4)
  return {"w1": jax.random.normal(k[0], (D, HIDDEN)), "b1": jax.random.normal(k[1], (HIDDEN,)),
          "w2": jax.random.normal(k[2], (HIDDEN, OUT)), "b2": jax.random.normal(k[3], (OUT,))}


def _mlp(p, x):
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _attn_params(key=0) -> dict:
  k = jax.random.split(jax.random.key(key), 4)
  width = HEADS * HEAD_DIM
  return {"wq": jax.random.normal(k[0], (D, width)), "wk": jax.random.normal(k[1], (D, width)),
          "wv": jax.random.normal(k[2], (D, width)), "wo": jax.random.normal(k[3], (width, D))}


def _attention(p, x):
  t = x.shape[0]
  heads = p["wq"].shape[1] // HEAD_DIM  # shapes from the arrays: runs on shrunk params
  q, k, v = ((x @ p[n]).reshape(t, heads, HEAD_DIM) for n in ("wq", "wk", "wv"))
  weights = jax.nn.softmax(jnp.einsum("thk,shk->hts", q, k), axis=-1)
  out = jnp.einsum("hts,shk->thk", weights, v).reshape(t, heads * HEAD_DIM)
  return out @ p["wo"]


def _members(group: Group) -> set[tuple[str, int, int]]:
  assert all(m.offset == 0 and m.outer == 1 for m in group.members), group
  return {tuple(m)[:3] for m in group.members}


def _one(groups, kind: str) -> Group:
  found = [g for g in groups if g.kind == kind]
  assert len(found) == 1, str(groups)
  return found[0]


def _zeroed(params: dict, group: Group, kept) -> dict:
  """`params` with the units of `group` not in `kept` zeroed (same shapes)."""
  out = dict(params)
  for m in group.members:
    units = np.isin(np.arange(group.size), kept)
    alive = np.repeat(units, m.block)
    shape = [1] * out[m.path].ndim
    shape[m.axis] = -1
    out[m.path] = out[m.path] * alive.reshape(shape)
  return out


def test_mlp_hidden_group():
  groups = channel_groups(_mlp, _mlp_params(), S((T, D), jnp.float32))
  hidden = _one(groups, "mlp_hidden")
  assert hidden.prunable and hidden.size == HIDDEN
  assert _members(hidden) == {("w1", 1, 1), ("b1", 0, 1), ("w2", 0, 1)}
  by_member = {m: g for g in groups for m in g.members}
  for member in (Member("w1", 0), Member("w2", 1), Member("b2", 0)):
    group = by_member[member]
    assert not group.prunable
    assert any("input/output axis of the program" in r for r in group.reasons)
  assert "mlp_hidden size 6 (b1[0], w1[1], w2[0]) prunable" in str(groups)


def _residual_params() -> list[dict]:
  layers = []
  for i in range(2):
    p = _mlp_params(i)
    layers.append({"w1": p["w1"], "b1": p["b1"], "w2": p["w2"][:, :1].repeat(D, 1),
                   "b2": jnp.zeros(D), "scale": jnp.ones(D)})
  return layers


def _residual(layers, x):
  for p in layers:
    centred = x - x.mean(-1, keepdims=True)
    normed = centred / jnp.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"]
    x = x + jax.nn.gelu(normed @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return x


def test_residual_stream_joins_layers():
  groups = channel_groups(_residual, _residual_params(), S((T, D), jnp.float32))
  residual = _one(groups, "residual")
  expected = {(f"{i}/{name}", axis, 1) for i in range(2)
              for name, axis in (("w1", 0), ("w2", 1), ("b2", 0), ("scale", 0))}
  assert _members(residual) == expected
  assert residual.size == D and not residual.prunable
  assert any("reduce_sum" in n for n in residual.notes)
  hidden = [g for g in groups if g.kind == "mlp_hidden"]
  assert [_members(g) for g in hidden] == [
      {(f"{i}/w1", 1, 1), (f"{i}/b1", 0, 1), (f"{i}/w2", 0, 1)} for i in range(2)]
  assert all(g.prunable for g in hidden)


def test_attention_heads_group():
  groups = channel_groups(_attention, _attn_params(), S((T, D), jnp.float32))
  heads = _one(groups, "heads")
  assert heads.prunable and heads.size == HEADS
  assert _members(heads) == {("wq", 1, HEAD_DIM), ("wk", 1, HEAD_DIM), ("wv", 1, HEAD_DIM),
                             ("wo", 0, HEAD_DIM)}


def _callback_mlp(p, x):
  h = x @ p["w1"] + p["b1"]
  h = jax.pure_callback(np.tanh, S(h.shape, h.dtype), h)
  return h @ p["w2"] + p["b2"]


def test_unknown_op_refuses_with_primitive_and_line():
  groups = channel_groups(_callback_mlp, _mlp_params(), S((T, D), jnp.float32))
  line = inspect.getsourcelines(_callback_mlp)[1] + 2
  # The callback's input and output are unrelated to the rules: the hidden axis
  # before it (w1, b1) and after it (w2) are both refused, naming it.
  for member in (Member("w1", 1), Member("b1", 0), Member("w2", 0)):
    hidden = next(g for g in groups if member in g.members)
    assert not hidden.prunable
    assert any("pure_callback" in r and f"test_channel_groups.py:{line}" in r
               for r in hidden.reasons), hidden.reasons
  with pytest.raises(ValueError, match="pure_callback"):
    shrink(_mlp_params(), groups, {groups.index(hidden): [0]})


@pytest.mark.parametrize("model", ["mlp", "attention"])
def test_shrink_equals_zeroing(model):
  fn, params, kind = {"mlp": (_mlp, _mlp_params(), "mlp_hidden"),
                      "attention": (_attention, _attn_params(), "heads")}[model]
  x = jax.random.normal(jax.random.key(7), (T, D))
  groups = channel_groups(fn, params, S((T, D), jnp.float32))
  index = next(i for i, g in enumerate(groups) if g.kind == kind)
  kept = [0, 2] if kind == "heads" else [1, 2, 4]
  small = shrink(params, groups, {index: kept})
  for m in groups[index].members:
    assert small[m.path].shape[m.axis] == len(kept) * m.block
  assert jax.tree.structure(small) == jax.tree.structure(params)
  np.testing.assert_allclose(fn(small, x), fn(_zeroed(params, groups[index], kept), x),
                             atol=1e-5, rtol=1e-5)


def test_keep_top_rounds_up_and_picks_largest():
  group = Group("mlp_hidden", 10, (Member("a", 1), Member("b", 0)), True)
  norms = {0: np.arange(10.0)}
  assert keep_top([group], norms, 0.3)[0].tolist() == [7, 8, 9]
  assert keep_top([group], norms, 0.3, round_to=4)[0].tolist() == [6, 7, 8, 9]
  assert keep_top([group], norms, 0.5, round_to=8)[0].tolist() == list(range(2, 10))
  assert keep_top([group], norms, 0.9, round_to=8)[0].tolist() == list(range(10))
  tree = {"a": np.ones((3, 10)) * np.arange(10.0), "b": np.zeros((10, 2))}
  assert keep_top([group], magnitude_importance([group], tree), 0.3)[0].tolist() == [7, 8, 9]
  heads = Group("heads", 3, (Member("w", 0, 2),), True)
  by_heads = magnitude_importance([heads], {"w": np.array([5., 5., 0., 1., 2., 0.])})
  assert keep_top([heads], by_heads, 0.5)[0].tolist() == [0, 2]
  assert keep_top([Group("other", 4, (), False)], {}, 0.5) == {}


def _cnn(p, x):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn))
  h = jax.lax.cond(True, lambda h: h * 2, lambda h: h, h)
  h = jax.lax.fori_loop(0, 2, lambda i, h: h * 1.5, h)
  return jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn)


def test_conv_channels_through_cond_and_loop():
  k1, k2, kx = jax.random.split(jax.random.key(3), 3)
  params = {"k1": jax.random.normal(k1, (3, 3, 2, 5)), "k2": jax.random.normal(k2, (3, 3, 5, 4))}
  x = jax.random.normal(kx, (1, 6, 6, 2))
  groups = channel_groups(_cnn, params, S(x.shape, x.dtype))
  index = groups.prunable()
  assert len(index) == 1 and groups[index[0]].kind == "conv_channels"
  assert _members(groups[index[0]]) == {("k1", 3, 1), ("k2", 2, 1)}
  assert all("spatial axis of the conv" in g.reasons[0] for g in groups if g.size == 3)
  small = shrink(params, groups, {index[0]: [0, 3]})
  np.testing.assert_allclose(_cnn(small, x), _cnn(_zeroed(params, groups[index[0]], [0, 3]), x),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep, message", [
    ({99: [0]}, r"the key 99; its keys are group indices in \[0, "),
    ({"mlp_hidden": [0]}, r"the key 'mlp_hidden'; its keys are group indices"),
    ({0: []}, r"would keep no unit"),
    ({0: [0.5, 2.7]}, r"must be integers \(unit indices\), got float64"),
    ({0: [True, False, True, False, True, False]}, r"must be integers .* got bool"),
    ({0: [3, 1]}, r"sorted, distinct"),
    ({1: [0, 1]}, r"cannot be shrunk: it is an input/output axis"),
])
def test_bad_keep_is_named_by_shrink_and_shrunk_program(keep, message):
  groups = channel_groups(_mlp, _mlp_params(), S((T, D), jnp.float32))
  assert groups[0].kind == "mlp_hidden" and not groups[1].prunable
  with pytest.raises(ValueError, match=message):
    shrink(_mlp_params(), groups, keep)
  with pytest.raises(ValueError, match=message):
    shrunk_program(groups, keep)


def test_unknown_kind_and_unused_leaves_are_named():
  params = {**_mlp_params(), "spare": jnp.ones((3, 3))}
  groups = channel_groups(_mlp, params, S((T, D), jnp.float32))
  spare = [g for g in groups if g.members[0].path == "spare"]
  assert spare and all(not g.prunable and "never reads spare" in g.reasons[0] for g in spare)
  importance = magnitude_importance(groups, params)
  with pytest.raises(ValueError, match=r"no group kind 'head'"):
    keep_top(groups, importance, {"head": 0.5})

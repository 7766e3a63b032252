"""The smaller model (issue 29): grouped-query attention in a scanned stack with
per-layer keep-indices, a fused qkv kernel split at offsets, RoPE's pairs of
halves, routed experts, residual channels through RMSNorm (normalized over the kept
channels), `jax.export` of the shrunk program, and refusals naming `pallas_call`
and a custom primitive. Exactness: the shrunk program equals the dense one with
the removed units zeroed (experts: never routed to)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from numpy_references import zeroed_units as zeroed

from jaxprune.structural import (
    Member,
    channel_groups,
    keep_top,
    magnitude_importance,
    shrink,
    shrunk_program,
)

D, KV, G, HD, LAYERS, F, T, VOCAB = 8, 2, 2, 4, 3, 16, 5, 11
H = KV * G


def _normal(key, *shape, scale=0.3):
  return jax.random.normal(jax.random.key(key), shape) * scale


def _rms(x, scale):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _gqa_layer(x, p):
  h = _rms(x, p["n1"])
  q = (h @ p["wq"]).reshape(T, KV, G, HD)  # sizes as constants: needs the program
  k, v = ((h @ p[n]).reshape(T, KV, HD) for n in ("wk", "wv"))
  scores = jax.nn.softmax(jnp.einsum("tkgh,skh->kgts", q, k) / np.sqrt(HD), -1)
  x = x + jnp.einsum("kgts,skh->tkgh", scores, v).reshape(T, H * HD) @ p["wo"]
  return x + jax.nn.silu(_rms(x, p["n2"]) @ p["w1"]) @ p["w2"], None


def _gqa_model(params, tokens):
  x, _ = jax.lax.scan(_gqa_layer, params["emb"][tokens], params["layers"])
  return _rms(x, params["nf"]) @ params["emb"].T


def _gqa_params():
  shapes = {"n1": (D,), "n2": (D,), "wq": (D, H * HD), "wk": (D, KV * HD), "wv": (D, KV * HD),
            "wo": (H * HD, D), "w1": (D, F), "w2": (F, D)}
  layers = {n: _normal(i, LAYERS, *s) + (1.0 if n[0] == "n" else 0.0)
            for i, (n, s) in enumerate(shapes.items())}
  return {"emb": _normal(20, VOCAB, D), "nf": 1 + _normal(21, D), "layers": layers}


@pytest.fixture(scope="module")
def gqa():
  params = _gqa_params()
  tokens = jnp.arange(T) % VOCAB
  return params, tokens, channel_groups(_gqa_model, params, tokens)


def _by_kind(groups) -> dict:
  return {g.kind: g for g in groups if g.prunable and g.kind != "residual"}


def test_gqa_groups_in_a_scanned_stack(gqa):
  _, _, groups = gqa
  kinds = _by_kind(groups)
  assert kinds["kv_heads"].size == KV and kinds["heads"].size == G
  assert set(kinds["kv_heads"].members) == {
      Member("layers/wq", 2, G * HD), Member("layers/wk", 2, HD), Member("layers/wv", 2, HD),
      Member("layers/wo", 1, G * HD)}
  assert set(kinds["heads"].members) == {Member("layers/wq", 2, HD, 0, KV),
                                         Member("layers/wo", 1, HD, 0, KV)}
  assert set(kinds["mlp_hidden"].members) == {Member("layers/w1", 2), Member("layers/w2", 1)}
  assert all(g.layers == LAYERS for g in kinds.values() if g.kind != "layers")
  head_dims = [set(g.members) for g in groups if g.kind == "head_dim"]
  assert {Member("layers/wq", 2, 1, 0, H), Member("layers/wk", 2, 1, 0, KV)} in head_dims
  assert {Member("layers/wv", 2, 1, 0, KV), Member("layers/wo", 1, 1, 0, H)} in head_dims


@pytest.mark.parametrize("kinds", [("mlp_hidden",), ("heads",), ("kv_heads",), ("head_dim",),
                                   ("mlp_hidden", "heads", "head_dim")])
def test_gqa_per_layer_shrink_equals_zeroing(gqa, kinds):
  params, tokens, groups = gqa
  keep = keep_top(groups, magnitude_importance(groups, params), 0.5, kinds=kinds)
  assert keep and all(np.asarray(v).ndim == 2 for v in keep.values())
  small = shrink(params, groups, keep)
  out = jax.jit(shrunk_program(groups, keep))(small, tokens)
  reference = _gqa_model(zeroed(params, groups, keep), tokens)
  np.testing.assert_allclose(out, reference, atol=2e-5, rtol=2e-5)
  assert not np.allclose(reference, _gqa_model(params, tokens), atol=1e-3)


def test_shrunk_program_is_differentiable_and_exportable(gqa, tmp_path):
  params, tokens, groups = gqa
  importance = magnitude_importance(groups, params)
  keep = keep_top(groups, importance, 0.5, kinds=("mlp_hidden", "kv_heads"))
  small = shrink(params, groups, keep)
  small_fn = shrunk_program(groups, keep)
  jitted = jax.jit(small_fn)
  for _ in range(3):
    jitted(small, tokens).block_until_ready()
  assert jitted._cache_size() == 1  # traced and compiled once
  grads = jax.grad(lambda p: small_fn(p, tokens).sum())(small)
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, small)
  exported = jax.export.export(jax.jit(small_fn))(small, tokens)
  path = tmp_path / "small.bin"
  path.write_bytes(exported.serialize())
  reloaded = jax.export.deserialize(bytearray(path.read_bytes()))
  np.testing.assert_allclose(reloaded.call(small, tokens), small_fn(small, tokens), rtol=1e-6)
  tpu = jax.export.export(jax.jit(small_fn), platforms=["tpu"])(small, tokens).mlir_module()
  assert f"tensor<{LAYERS}x{D}x{F // 2}xf32>" in tpu and f"x{D}x{F}xf32>" not in tpu


def test_wrong_small_shapes_name_the_leaf(gqa):
  params, tokens, groups = gqa
  keep = keep_top(groups, magnitude_importance(groups, params), 0.5, kinds=("mlp_hidden",))
  with pytest.raises(ValueError, match="layers/w1 has shape"):
    shrunk_program(groups, keep)(params, tokens)


def _rope(x):
  half = x.shape[-1] // 2
  angle = jnp.arange(x.shape[0])[:, None, None] / (100.0 ** (jnp.arange(half) / half))
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


def _fused_attention(p, x):
  q, k, v = (a.reshape(T, H, HD) for a in jnp.split(x @ p["wqkv"], 3, axis=-1))
  scores = jax.nn.softmax(jnp.einsum("thd,shd->hts", _rope(q), _rope(k)), -1)
  return jnp.einsum("hts,shd->thd", scores, v).reshape(T, H * HD) @ p["wo"]


def test_fused_qkv_split_at_offsets_and_rope_pairs():
  params = {"wqkv": _normal(0, D, 3 * H * HD), "wo": _normal(1, H * HD, D)}
  x = _normal(2, T, D, scale=1.0)
  groups = channel_groups(_fused_attention, params, x)
  found = {g.kind + str(g.size): set(g.members) for g in groups if g.prunable}
  # One unit per head: its q, k and v columns (three thirds of the fused kernel).
  assert found[f"heads{H}"] == {Member("wqkv", 1, HD, 0, 3), Member("wo", 0, HD)}
  # RoPE rotates the halves of q and k into each other: unit i is the pair
  # (i, i + HD/2) of every head of q and k; v's head_dim is free.
  assert found[f"head_dim{HD // 2}"] == {Member("wqkv", 1, 1, 0, 2 * H * 2)}
  assert found[f"head_dim{HD}"] == {Member("wqkv", 1, 1, 2 * H * HD, H), Member("wo", 0, 1, 0, H)}
  for index in groups.prunable():
    keep = {index: [1]}
    out = shrunk_program(groups, keep)(shrink(params, groups, keep), x)
    np.testing.assert_allclose(out, _fused_attention(zeroed(params, groups, keep), x),
                               atol=1e-5, rtol=1e-5)


E, TOP = 4, 2


def _moe(p, x):
  logits = x @ p["router"] + p["router_bias"]
  top, picked = jax.lax.top_k(logits, TOP)
  gates = jnp.einsum("tk,tke->te", jax.nn.softmax(top, -1), jax.nn.one_hot(picked, E))
  hidden = jax.nn.gelu(jax.vmap(lambda w, b: x @ w + b, out_axes=1)(p["w1"], p["b1"]))
  experts = jnp.einsum("tef,efd->ted", hidden, p["w2"])
  return x + jnp.einsum("te,ted->td", gates, experts)


def test_routed_experts_equal_never_routing_to_the_removed():
  params = {"router": _normal(0, D, E), "router_bias": _normal(1, E), "w1": _normal(2, E, D, F),
            "b1": _normal(3, E, F), "w2": _normal(4, E, F, D)}
  x = _normal(5, T, D, scale=1.0)
  groups = channel_groups(_moe, params, x)
  experts = [i for i, g in enumerate(groups) if g.kind == "experts"]
  assert len(experts) == 1 and groups[experts[0]].prunable
  assert set(groups[experts[0]].members) == {
      Member("router", 1), Member("router_bias", 0), Member("w1", 0), Member("b1", 0),
      Member("w2", 0)}
  keep = {experts[0]: [0, 2, 3]}
  out = shrunk_program(groups, keep)(shrink(params, groups, keep), x)
  never = dict(params, router_bias=params["router_bias"].at[1].set(-1e30))
  np.testing.assert_allclose(out, _moe(never, x), atol=1e-5, rtol=1e-5)
  assert not np.allclose(out, _moe(params, x), atol=1e-3)


def _residual_net(p, x):
  for layer in p["layers"]:
    x = x + jax.nn.relu(_rms(x, layer["norm"]) @ layer["w1"]) @ layer["w2"]
  return _rms(x, p["final"]) @ p["head"]


def test_residual_channels_are_normalized_over_the_kept():
  layers = [{"norm": 1 + _normal(i, D), "w1": _normal(10 + i, D, F), "w2": _normal(20 + i, F, D)}
            for i in range(2)]
  params = {"embed": _normal(30, 3, D), "layers": layers, "final": 1 + _normal(31, D),
            "head": _normal(32, D, 3)}
  net = lambda p, x: _residual_net(p, x @ p["embed"])
  x = _normal(33, T, 3, scale=1.0)
  groups = channel_groups(net, params, x)
  residual = [i for i, g in enumerate(groups) if g.kind == "residual"]
  assert len(residual) == 1 and groups[residual[0]].prunable
  assert any("reduce_sum" in n for n in groups[residual[0]].notes)
  keep = {residual[0]: [0, 1, 3, 4, 6]}
  small = shrink(params, groups, keep)
  out = shrunk_program(groups, keep)(small, x)
  # The model code takes D from its arrays: at the smaller width its norms average
  # over the kept channels, which is the defined behaviour (Minitron's).
  np.testing.assert_allclose(out, net(small, x), atol=1e-5, rtol=1e-5)
  assert not np.allclose(out, net(zeroed(params, groups, keep), x), atol=1e-3)


def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


_opaque = jax.extend.core.Primitive("opaque_kernel")
_opaque.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
_opaque.def_impl(lambda x: x)


@pytest.mark.parametrize("op", ["pallas_call", "opaque_kernel"])
def test_unknown_kernels_refuse_with_their_line(op):
  def mlp(p, x):
    h = x @ p["w1"]
    h = (pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
                        interpret=True)(h) if op == "pallas_call" else _opaque.bind(h))
    return h @ p["w2"]

  params = {"w1": _normal(0, D, F), "w2": _normal(1, F, D)}
  groups = channel_groups(mlp, params, jax.ShapeDtypeStruct((T, D), jnp.float32))
  line = inspect.getsourcelines(mlp)[1] + 2
  hidden = [g for g in groups if Member("w1", 1) in g.members]
  assert len(hidden) == 1 and not hidden[0].prunable
  assert any(f"`{op}`" in r and any(f"test_shrunk_program.py:{n} " in r for n in (line, line + 1))
             for r in hidden[0].reasons), hidden[0].reasons  # the call spans two lines
  assert not groups.prunable()


def _layer_norm(x, scale):  # as eqx.nn.LayerNorm: jnp.var divides by `n - ddof`
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-5) * scale


def test_a_variance_over_residual_channels_is_over_the_kept():
  params = {"embed": _normal(0, 3, D), "w1": _normal(1, D, F), "w2": _normal(2, F, D),
            "norm": 1 + _normal(3, D), "head": _normal(4, D, 3)}

  def net(p, x):
    h = x @ p["embed"]
    h = h + jax.nn.relu(_layer_norm(h, p["norm"]) @ p["w1"]) @ p["w2"]
    return _layer_norm(h, p["norm"]) @ p["head"]

  x = _normal(5, T, 3, scale=1.0)
  groups = channel_groups(net, params, x)
  (residual,) = [i for i, g in enumerate(groups) if g.kind == "residual"]
  keep = {residual: [0, 2, 3, 5, 7]}
  small = shrink(params, groups, keep)
  np.testing.assert_allclose(shrunk_program(groups, keep)(small, x), net(small, x),
                             atol=1e-5, rtol=1e-5)


def _pooled_cnn(p, x):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn))
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn)
  h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 3, 3, 1), "VALID") / 9
  return h.reshape(h.shape[0], -1) @ p["head"]


def test_pooling_keeps_the_channels_prunable():
  params = {"k1": _normal(0, 3, 3, 2, 6), "k2": _normal(1, 3, 3, 6, 4), "head": _normal(2, 4, 3)}
  x = _normal(3, 2, 6, 6, 2, scale=1.0)
  groups = channel_groups(_pooled_cnn, params, x)
  found = {tuple(sorted(g.members)) for g in groups if g.prunable}
  assert found == {(Member("k1", 3), Member("k2", 2)), (Member("head", 0), Member("k2", 3))}
  for index in groups.prunable():
    keep = {index: [0, 2, 3]}
    out = shrunk_program(groups, keep)(shrink(params, groups, keep), x)
    np.testing.assert_allclose(out, _pooled_cnn(zeroed(params, groups, keep), x),
                               atol=1e-5, rtol=1e-5)


def _side_read(p, x):
  h = jax.nn.relu(x @ p["w1"])
  return h @ p["w2"] + jnp.sum(h[:, :4], -1, keepdims=True)


def test_an_axis_partly_read_apart_leaves_no_unit_out():
  params = {"w1": _normal(0, D, F), "w2": _normal(1, F, D)}
  x = _normal(2, T, D, scale=1.0)
  groups = channel_groups(_side_read, params, x)
  hidden = [g for g in groups if g.prunable]
  assert sorted(g.size for g in hidden) == [4, F - 4]  # the piece read apart, and the rest
  covered = sorted(i for g in hidden for m in g.members if m.path == "w1"
                   for i in m.indices(g.size).ravel())
  assert covered == list(range(F))
  for index in groups.prunable():
    keep = {index: [0, 1]}
    out = shrunk_program(groups, keep)(shrink(params, groups, keep), x)
    np.testing.assert_allclose(out, _side_read(zeroed(params, groups, keep), x), atol=1e-5)

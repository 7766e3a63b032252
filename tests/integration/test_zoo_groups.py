"""Channel groups on a zoo of models written the way their frameworks' users write
them (tests/integration/zoo/): hand-written expectations and the exactness of the smaller model.

Every expectation below is written from the models' code and the grouping
contract (kinds, `Member(path, axis, block, offset, outer)`: unit `i` covers the
leaf indices `offset + o * size * block + i * block + j`), never from the
engine's output. The exactness contract checked per prunable kind:

* `mlp_hidden`, `heads`, `kv_heads`, `head_dim`, `conv_channels` (and a residual
  stream without a cross-channel norm, the ResNet's): the shrunk program on the
  shrunk params equals the dense model with the removed units' member indices
  zeroed;
* `experts`: equals the dense model whose removed experts are never routed to
  (router bias -1e30);
* a residual stream through LayerNorm/RMSNorm: the norm is computed over the kept
  channels (Minitron), so the shrunk program equals the same model code run at
  the smaller width, and differs from the zeroed dense model.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_references import slots
from zoo import (
  dict_moe,
  eqx_convnet,
  eqx_mlp,
  example_lm,
  gemma_attention,
  keras_attention,
  linen_resnet,
  nnx_gqa_lm,
)

from jaxprune.structural import (
  channel_groups,
  keep_top,
  magnitude_importance,
  shrink,
  shrunk_program,
)

MODELS = {m.__name__.split(".")[-1]: m for m in (
    nnx_gqa_lm, linen_resnet, eqx_mlp, eqx_convnet, dict_moe, example_lm, gemma_attention,
    keras_attention)}
ZEROING_KINDS = ("mlp_hidden", "heads", "kv_heads", "head_dim", "conv_channels")
TOL = {"atol": 1e-4, "rtol": 1e-4}


# ----------------------------------------------------------------------------- expectations


def mem(path: str, axis: int, block: int = 1, offset: int = 0, outer: int = 1) -> tuple:
  return (path, axis, block, offset, outer)


class Want(NamedTuple):
  kind: str
  size: int
  members: frozenset
  layers: int | None = None


def grp(kind: str, size: int, members, layers: int | None = None) -> Want:
  return Want(kind, size, frozenset(members), layers)


def _nnx_gqa_lm() -> list[Want]:
  m = nnx_gqa_lm
  L, H, KV, G, HD = m.LAYERS, m.HEADS, m.KV_HEADS, m.GROUP, m.HEAD_DIM
  wq, wk, wv, wo = (f"blocks/attn/{n}/kernel" for n in ("wq", "wk", "wv", "wo"))
  w1, w2, w3 = (f"blocks/mlp/{n}/kernel" for n in ("w1", "w2", "w3"))
  return [
      # One stream for embedding, every layer (stacked: axis 1 is d, or 2 for the
      # down projections), the final norm and the unembedding; no per-layer units.
      grp("residual", m.D, [mem("embed/embedding", 1), mem("blocks/attn_norm/scale", 1),
                            mem(wq, 1), mem(wk, 1), mem(wv, 1), mem(wo, 2),
                            mem("blocks/mlp_norm/scale", 1), mem(w1, 1), mem(w3, 1), mem(w2, 2),
                            mem("final_norm/scale", 0), mem("lm_head/kernel", 0)]),
      # wq's axis is (KV, G, HD): a KV head is G query heads.
      grp("kv_heads", KV, [mem(wq, 2, G * HD), mem(wk, 2, HD), mem(wv, 2, HD),
                           mem(wo, 1, G * HD)], L),
      grp("heads", G, [mem(wq, 2, HD, outer=KV), mem(wo, 1, HD, outer=KV)], L),
      grp("head_dim", HD, [mem(wq, 2, outer=H), mem(wk, 2, outer=KV)], L),  # q . k
      grp("head_dim", HD, [mem(wv, 2, outer=KV), mem(wo, 1, outer=H)], L),  # v -> wo
      grp("mlp_hidden", m.FFN, [mem(w1, 2), mem(w3, 2), mem(w2, 1)], L),
  ]


def _linen_resnet() -> list[Want]:
  m = linen_resnet
  stream = [mem("stem_conv/kernel", 3), mem("stem_bn/scale", 0), mem("stem_bn/bias", 0),
            mem("head/kernel", 0)]
  for i in range(m.BLOCKS):
    stream += [mem(f"block{i}/conv1/kernel", 2), mem(f"block{i}/conv2/kernel", 3),
               mem(f"block{i}/bn2/scale", 0), mem(f"block{i}/bn2/bias", 0)]
  return [grp("residual", m.CH, stream)] + [
      grp("conv_channels", m.MID, [mem(f"block{i}/conv1/kernel", 3),
                                   mem(f"block{i}/bn1/scale", 0), mem(f"block{i}/bn1/bias", 0),
                                   mem(f"block{i}/conv2/kernel", 2)])
      for i in range(m.BLOCKS)]


def _eqx_mlp() -> list[Want]:
  return [grp("mlp_hidden", eqx_mlp.WIDTH, [mem(f"layers/{i}/weight", 0),
                                            mem(f"layers/{i}/bias", 0),
                                            mem(f"layers/{i + 1}/weight", 1)])
          for i in range(eqx_mlp.DEPTH)]


def _eqx_convnet() -> list[Want]:
  m = eqx_convnet
  return [grp("conv_channels", m.C0, [mem("conv0/weight", 0), mem("conv0/bias", 0),
                                      mem("conv1/weight", 1)]),
          grp("conv_channels", m.C1, [mem("conv1/weight", 0), mem("conv1/bias", 0),
                                      mem("head/weight", 1)])]


def _dict_moe() -> list[Want]:
  # The residual stream (norm_scale, router rows, w1 rows, w2 columns) is the
  # program's input and output axis: not prunable, so not listed.
  m = dict_moe
  return [grp("experts", m.E, [mem("router/kernel", 1), mem("router/bias", 0),
                               mem("experts/w1", 0), mem("experts/b1", 0), mem("experts/w2", 0)]),
          grp("mlp_hidden", m.F, [mem("experts/w1", 2), mem("experts/b1", 1),
                                  mem("experts/w2", 1)])]


def _example_lm() -> list[Want]:
  c = example_lm.CONFIG
  H, HD = c.num_heads, c.d_model // c.num_heads
  stream = [mem("token_embed/embedding", 1), mem("pos_embed/embedding", 1),
            mem("ln_f/scale", 0), mem("ln_f/bias", 0), mem("lm_head/kernel", 0)]
  wants = []
  for i in range(c.num_layers):
    b = f"blocks/{i}"
    qkv, qkv_b, out = f"{b}/attn/qkv/kernel", f"{b}/attn/qkv/bias", f"{b}/attn/output_proj/kernel"
    stream += [mem(f"{b}/ln1/scale", 0), mem(f"{b}/ln1/bias", 0), mem(qkv, 0), mem(out, 1),
               mem(f"{b}/attn/output_proj/bias", 0), mem(f"{b}/ln2/scale", 0),
               mem(f"{b}/ln2/bias", 0), mem(f"{b}/mlp/fc1/kernel", 0),
               mem(f"{b}/mlp/fc2/kernel", 1), mem(f"{b}/mlp/fc2/bias", 0)]
    wants += [
        # qkv's axis is (3, H, HD): a head is HD columns in each third.
        grp("heads", H, [mem(qkv, 1, HD, outer=3), mem(qkv_b, 0, HD, outer=3),
                         mem(out, 0, HD)]),
        # q, k and v are slices of one (B, T, 3, H, HD) value: one head-dim axis.
        grp("head_dim", HD, [mem(qkv, 1, outer=3 * H), mem(qkv_b, 0, outer=3 * H),
                             mem(out, 0, outer=H)]),
        grp("mlp_hidden", c.d_ff, [mem(f"{b}/mlp/fc1/kernel", 1), mem(f"{b}/mlp/fc1/bias", 0),
                                   mem(f"{b}/mlp/fc2/kernel", 0)]),
    ]
  return [grp("residual", c.d_model, stream), *wants]


def _gemma_attention() -> list[Want]:
  # The residual stream is the program's input and output: not prunable.
  m = gemma_attention
  KV, G, half = m.KV_HEADS, m.GROUP, m.HEAD_DIM // 2
  wants = []
  for i in range(m.LAYERS):
    a = f"layer_{i}/attn"
    q, kv, o_ = f"{a}/q_einsum/w", f"{a}/kv_einsum/w", f"{a}/attn_vec_einsum/w"
    wants += [
        # Query head n = k * G + g reads KV head k.
        grp("kv_heads", KV, [mem(q, 0, G), mem(kv, 1), mem(o_, 0, G)]),
        grp("heads", G, [mem(q, 0, outer=KV), mem(o_, 0, outer=KV)]),
        # RoPE's `jnp.split` halves are rotated together: a unit is the pair of dims
        # (i, i + half), written as one member per half (the same indices as one
        # member with outer=2). Keys and values share kv_einsum's head-dim axis, so
        # values pair up too.
        grp("head_dim", half, [mem(w, axis, offset=o) for w, axis in ((q, 2), (kv, 3), (o_, 1))
                               for o in (0, half)]),
        # gating_einsum (2, D, FFN): gate and up share the hidden axis.
        grp("mlp_hidden", m.FFN, [mem(f"layer_{i}/mlp/gating_einsum", 2),
                                  mem(f"layer_{i}/mlp/linear", 0)]),
    ]
  return wants


def _keras_attention() -> list[Want]:
  m = keras_attention
  return [
      grp("heads", m.HEADS, [mem("query/kernel", 1), mem("query/bias", 0), mem("key/kernel", 1),
                             mem("key/bias", 0), mem("value/kernel", 1), mem("value/bias", 0),
                             mem("attention_output/kernel", 0)]),
      grp("head_dim", m.KEY_DIM, [mem("query/kernel", 2), mem("query/bias", 1),
                                  mem("key/kernel", 2), mem("key/bias", 1)]),
      grp("head_dim", m.VALUE_DIM, [mem("value/kernel", 2), mem("value/bias", 1),
                                    mem("attention_output/kernel", 1)]),
  ]


EXPECTED = {"nnx_gqa_lm": _nnx_gqa_lm, "linen_resnet": _linen_resnet, "eqx_mlp": _eqx_mlp,
            "eqx_convnet": _eqx_convnet, "dict_moe": _dict_moe, "example_lm": _example_lm,
            "gemma_attention": _gemma_attention, "keras_attention": _keras_attention}


# ----------------------------------------------------------------------------- helpers


@functools.cache
def built(name: str):
  return MODELS[name].build()


@functools.cache
def traced(name: str):
  apply_fn, params, args = built(name)
  return channel_groups(apply_fn, params, *args)


def _member(m) -> tuple:
  return (m.path, m.axis, getattr(m, "block", 1), getattr(m, "offset", 0), getattr(m, "outer", 1))


def _seen(g) -> Want:
  return grp(g.kind, g.size, [_member(m) for m in g.members], getattr(g, "layers", None))


def _unit_indices(member: tuple, size: int) -> np.ndarray:
  """The contract's leaf indices of every unit: (size, outer * block)."""
  _, _, block, offset, outer = member
  idx = (offset + np.arange(outer)[None, :, None] * size * block
         + np.arange(size)[:, None, None] * block + np.arange(block)[None, None, :])
  return idx.reshape(size, -1)


def _index_map(members, size: int) -> dict:
  """(path, axis) -> the sorted leaf indices of every unit, (size, n): what the
  members mean, whichever way they are written (two offset members or one with
  `outer=2` cover the same indices)."""
  per: dict = {}
  for m in members:
    per.setdefault(m[:2], []).append(_unit_indices(m, size))
  return {k: np.sort(np.concatenate(v, axis=1), axis=1) for k, v in per.items()}


def _meaning(w: Want) -> tuple:
  indices = _index_map(w.members, w.size)
  return (w.kind, w.size, w.layers,
          frozenset((k, v.tobytes(), v.shape) for k, v in indices.items()))


def _show(w: Want) -> str:
  def one(m):
    path, axis, block, offset, outer = m
    extra = "".join(f" {k}={v}" for k, v, d in (("block", block, 1), ("offset", offset, 0),
                                                 ("outer", outer, 1)) if v != d)
    return f"{path}[{axis}{extra}]"
  layers = f" layers={w.layers}" if w.layers else ""
  return f"{w.kind} size {w.size}{layers}: " + ", ".join(one(m) for m in sorted(w.members))


def _find(groups, want: Want) -> int:
  """The index of the engine's group whose units cover the same indices of
  `want`'s first leaf axis: the group the exactness tests keep units of."""
  key = min(want.members)[:2]
  mine = _index_map(want.members, want.size)[key]
  for i, g in enumerate(groups):
    theirs = _index_map([_member(m) for m in g.members], g.size).get(key)
    if theirs is not None and np.array_equal(theirs, mine):
      return i
  raise AssertionError(f"no group has the units of {key} in {_show(want)}; groups:\n{groups}")


def _pick(size: int) -> list[int]:
  """Kept units that are not a prefix: every other one from 0, or the last of 2."""
  return [size - 1] if size <= 2 else list(range(0, size, 2))


def _zeroed(params, wants_keeps):
  """`params` with the units of each `(want, keep)` not kept zeroed, at the member
  indices of the contract; a 2-D keep is per layer (axis 0 of every member)."""
  theirs = slots(params)
  leaves = list(theirs.leaves)
  where = {p: i for i, p in enumerate(theirs.paths)}
  for want, keep in wants_keeps:
    keep = np.asarray(keep)
    rows = [keep] if keep.ndim == 1 else list(keep)
    for (path, axis), units in _index_map(want.members, want.size).items():
      arr = np.array(leaves[where[path]])
      for layer, row in enumerate(rows):
        index = [slice(None)] * arr.ndim
        if keep.ndim == 2:
          index[0] = layer
        index[axis] = units[np.setdiff1d(np.arange(want.size), row)].reshape(-1)
        arr[tuple(index)] = 0
      leaves[where[path]] = jnp.asarray(arr)
  return jax.tree.unflatten(theirs.treedef, leaves)


def _check_shapes(small, wants_keeps) -> None:
  shapes = {p: np.shape(x) for p, x in zip(*slots(small)[:2])}
  for want, keep in wants_keeps:
    kept = np.asarray(keep).shape[-1]
    for (path, axis), units in _index_map(want.members, want.size).items():
      assert shapes[path][axis] == kept * units.shape[1], (path, shapes[path], _show(want))


def _shrunk(name: str, wants_keeps):
  """`(small_apply(small, *args), small)` for the given keeps."""
  _, params, args = built(name)
  groups = traced(name)
  keep = {_find(groups, want): k for want, k in wants_keeps}
  small = shrink(params, groups, keep)
  _check_shapes(small, wants_keeps)
  return shrunk_program(groups, keep)(small, *args), small


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prunable_groups(name):
  """The prunable groups (the scan's `layers` group aside, see below) are exactly
  the expected ones: kind, size, layers, and the leaf indices every unit covers on
  each member axis (equal index sets, however the members are written)."""
  groups = traced(name)
  seen = sorted((_seen(groups[i]) for i in groups.prunable() if groups[i].kind != "layers"),
                key=_show)
  want = sorted(EXPECTED[name](), key=_show)
  seen_count, want_count = Counter(map(_meaning, seen)), Counter(map(_meaning, want))
  missing = [_show(w) for w in want if want_count[_meaning(w)] > seen_count[_meaning(w)]]
  extra = [_show(s) for s in seen if seen_count[_meaning(s)] > want_count[_meaning(s)]]
  assert not missing and not extra, (
      "\nexpected, not found:\n  " + "\n  ".join(missing)
      + "\nfound, not expected:\n  " + "\n  ".join(extra) + f"\nall groups:\n{groups}")


def test_scanned_stack_has_one_layers_group():
  """`nnx.scan` over stacked blocks: one `layers` group, axis 0 of every stacked
  leaf. (Whether it is prunable is not part of the contract yet: not asserted.)"""
  _, params, _ = built("nnx_gqa_lm")
  stacked = {p for p in slots(params).paths if p.startswith("blocks/")}
  layers = [g for g in traced("nnx_gqa_lm") if g.kind == "layers"]
  assert len(layers) == 1, traced("nnx_gqa_lm")
  assert layers[0].size == nnx_gqa_lm.LAYERS
  got = grp("layers", layers[0].size, [_member(m) for m in layers[0].members])
  assert _meaning(got) == _meaning(grp("layers", nnx_gqa_lm.LAYERS, [mem(p, 0) for p in stacked]))


# ----------------------------------------------------------------------------- exactness


def _zeroing_cases():
  return [(name, kind) for name in sorted(MODELS) for kind in ZEROING_KINDS
          if any(w.kind == kind for w in EXPECTED[name]())]


@pytest.mark.parametrize(("name", "kind"), _zeroing_cases())
def test_shrunk_equals_zeroed(name, kind):
  """Every group of `kind` shrunk at once (non-prefix units) equals the dense model
  with the removed units zeroed."""
  apply_fn, params, args = built(name)
  wants_keeps = [(w, _pick(w.size)) for w in EXPECTED[name]() if w.kind == kind]
  got, _ = _shrunk(name, wants_keeps)
  np.testing.assert_allclose(got, apply_fn(_zeroed(params, wants_keeps), *args), **TOL)


PER_LAYER_KEEPS = {"mlp_hidden": [[0, 2, 5, 7], [1, 3, 4, 9]], "kv_heads": [[1], [0]],
                   "heads": [[0], [1]], "head_dim": [[0, 2], [1, 2]]}


@pytest.mark.parametrize("kind", sorted(PER_LAYER_KEEPS))
def test_scanned_per_layer_keep(kind):
  """A 2-D keep (LAYERS, k) on the scanned model: each layer keeps its own units."""
  apply_fn, params, args = built("nnx_gqa_lm")
  wants_keeps = [(w, PER_LAYER_KEEPS[kind]) for w in _nnx_gqa_lm() if w.kind == kind]
  got, _ = _shrunk("nnx_gqa_lm", wants_keeps)
  np.testing.assert_allclose(got, apply_fn(_zeroed(params, wants_keeps), *args), **TOL)


def test_experts_equal_never_routed():
  """Removing experts equals the dense MoE whose removed experts get router bias
  -1e30 (never in any token's top-k)."""
  apply_fn, params, args = built("dict_moe")
  want = next(w for w in _dict_moe() if w.kind == "experts")
  keep = [0, 2, 4]
  got, small = _shrunk("dict_moe", [(want, keep)])
  bias = np.array(params["router"]["bias"])
  bias[np.setdiff1d(np.arange(dict_moe.E), keep)] = -1e30
  reference = {**params, "router": {**params["router"], "bias": jnp.asarray(bias)}}
  np.testing.assert_allclose(got, apply_fn(reference, *args), **TOL)
  assert small["experts"]["w1"].shape == (3, dict_moe.D, dict_moe.F)


def _residual(name: str) -> Want:
  return next(w for w in EXPECTED[name]() if w.kind == "residual")


def test_residual_rmsnorm_is_over_kept_channels():
  """The scanned GQA LM (RMSNorm, widths read from the arrays): the shrunk program
  equals `apply_fn` on the shrunk params (the norm over the kept channels), which
  differs from zeroing the removed channels."""
  apply_fn, params, args = built("nnx_gqa_lm")
  want = _residual("nnx_gqa_lm")
  keep = _pick(want.size)
  got, small = _shrunk("nnx_gqa_lm", [(want, keep)])
  np.testing.assert_allclose(got, apply_fn(small, *args), **TOL)
  zeroed = apply_fn(_zeroed(params, [(want, keep)]), *args)
  assert np.max(np.abs(np.asarray(got) - np.asarray(zeroed))) > 1e-2


def _lm_reference(params, tokens, heads: int):
  """examples/lm_model.py's forward written again with every width read from the
  arrays (the model's own code derives the head dim from d_model)."""

  def norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]

  def dense(x, p):
    return x @ p["kernel"] + p["bias"]

  b, t = tokens.shape
  x = params["token_embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][:t]
  for i in range(len(params["blocks"])):
    p = params["blocks"][i]
    qkv = dense(norm(x, p["ln1"]), p["attn"]["qkv"])
    qkv = qkv.reshape(b, t, 3, heads, qkv.shape[-1] // (3 * heads))
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    x = x + dense(out.reshape(b, t, -1), p["attn"]["output_proj"])
    x = x + dense(jax.nn.gelu(dense(norm(x, p["ln2"]), p["mlp"]["fc1"])), p["mlp"]["fc2"])
  return dense(norm(x, params["ln_f"]), params["lm_head"])


def test_residual_layernorm_is_over_kept_channels():
  """The example LM (LayerNorm): the shrunk program equals the same forward at the
  smaller width (LayerNorm's mean and variance over the kept channels)."""
  apply_fn, params, (tokens,) = built("example_lm")
  heads = example_lm.CONFIG.num_heads
  np.testing.assert_allclose(_lm_reference(params, tokens, heads), apply_fn(params, tokens),
                             **TOL)
  want = _residual("example_lm")
  keep = [0, 1, 3, 6, 8, 9, 12, 15]
  got, small = _shrunk("example_lm", [(want, keep)])
  np.testing.assert_allclose(got, _lm_reference(small, tokens, heads), **TOL)
  zeroed = apply_fn(_zeroed(params, [(want, keep)]), tokens)
  assert np.max(np.abs(np.asarray(got) - np.asarray(zeroed))) > 1e-2


def test_residual_batchnorm_equals_zeroed():
  """The ResNet's residual channels pass only per-channel ops (BatchNorm, relu,
  adds, pooling): removing them equals zeroing them, and the closed-over
  `batch_stats` (constants of the program) are sliced with them."""
  apply_fn, params, args = built("linen_resnet")
  want = _residual("linen_resnet")
  keep = [0, 2, 3, 6]
  got, _ = _shrunk("linen_resnet", [(want, keep)])
  np.testing.assert_allclose(got, apply_fn(_zeroed(params, [(want, keep)]), *args), **TOL)


def test_example_lm_trains_after_shrinking():
  """Half of every prunable group kept (heads, head dim, MLP, residual): a
  gradient step on the shrunk program and params runs, is finite and lowers the
  loss."""
  _, params, (tokens,) = built("example_lm")
  groups = traced("example_lm")
  keep = keep_top(groups, magnitude_importance(groups, params), 0.5)
  assert {groups[i].kind for i in keep} >= {"heads", "head_dim", "mlp_hidden", "residual"}
  small = shrink(params, groups, keep)
  small_apply = shrunk_program(groups, keep)
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(p):
    logits = small_apply(p, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(small)
  assert jax.tree.structure(grads) == jax.tree.structure(small)
  assert all(g.shape == p.shape for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(small)))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)) > 0
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, small, grads)
  assert float(jax.jit(loss)(stepped)) < float(value)

"""Layouts read from the program, in use (issue 28, items 3 and 5): ERK's fans, int8
export scales per output channel, and the default selection by role.

Each test first reproduces what the name- and shape-based conventions give on a layout
they misread (a gemma-like block whose `kv_einsum` ERK leaves dense, int8 scales along
the input axis of a gating kernel, penzai-style norm scales named `weights` and
embedding tables held in a list selected by names), then checks the layout-aware
result against a NumPy reference written from the model's known fans and axes.
`jaxprune.layouts` is imported inside the tests.
"""

from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune

S = jax.ShapeDtypeStruct
D, HEADS, KV, HD, HIDDEN, VOCAB = 64, 4, 1, 16, 128, 50


def _layouts(apply_fn, params, *args, **kwargs):
  return jaxprune.tree.weight_layouts(apply_fn, params, *args, **kwargs)


# ----------------------------------------------------------------------------- ERK


def _gemma_params() -> dict:
  """A gemma-like block (Linen names): q `(heads, d, head_dim)`, kv `(2, kv_heads, d,
  head_dim)`, attention output `(heads, head_dim, d)`, gating `(2, hidden, d)`."""
  keys = jax.random.split(jax.random.key(0), 6)
  def normal(k, *shape):
    return 0.1 * jax.random.normal(k, shape)
  return {
      "embedder": {"input_embedding": normal(keys[0], VOCAB, D)},
      "layer_0": {
          "pre_attention_norm": {"scale": jnp.zeros(D)},
          "attn": {"q_einsum": {"w": normal(keys[1], HEADS, D, HD)},
                   "kv_einsum": {"w": normal(keys[2], 2, KV, D, HD)},
                   "attn_vec_einsum": {"w": normal(keys[3], HEADS, HD, D)}},
          "mlp": {"gating_einsum": normal(keys[4], 2, HIDDEN, D),
                  "linear": normal(keys[5], HIDDEN, D)}}}


def _gemma_apply(p, ids):
  block, attn = p["layer_0"], p["layer_0"]["attn"]
  x = p["embedder"]["input_embedding"][ids]
  h = x * (1 + block["pre_attention_norm"]["scale"])
  q = jnp.einsum("BTD,NDH->BTNH", h, attn["q_einsum"]["w"])
  k, v = jnp.einsum("BSD,CKDH->CBSKH", h, attn["kv_einsum"]["w"])
  probs = jax.nn.softmax(jnp.einsum("BTNH,BSKH->BNTS", q, k))
  o = jnp.einsum("BNTS,BSKH->BTNH", probs, v)
  x = x + jnp.einsum("BTNH,NHD->BTD", o, attn["attn_vec_einsum"]["w"])
  g = jnp.einsum("BTD,CFD->CBTF", x, block["mlp"]["gating_einsum"])
  x = x + jnp.einsum("BTF,FD->BTD", jax.nn.gelu(g[0]) * g[1], block["mlp"]["linear"])
  return x @ p["embedder"]["input_embedding"].T


# The true fans (fan_in, fan_out) of the selected gemma leaves, in path order.
GEMMA_FANS = {
    "layer_0/attn/attn_vec_einsum/w": (HEADS * HD, D),
    "layer_0/attn/kv_einsum/w": (D, 2 * KV * HD),
    "layer_0/attn/q_einsum/w": (D, HEADS * HD),
    "layer_0/mlp/gating_einsum": (D, 2 * HIDDEN),
    "layer_0/mlp/linear": (HIDDEN, D),
}


def erk_reference(raw: list[float], sizes: list[int], sparsity: float) -> np.ndarray:
  """Densities `min(1, eps * r_i)` keeping `(1 - s) * N` weights, the densest leaves made
  dense one value of `r` at a time (RigL's / JaxPruner's loop, exact budget)."""
  raw, sizes = np.asarray(raw, np.float64), np.asarray(sizes, np.float64)
  dense = np.zeros(len(raw), bool)
  while True:
    eps = ((1 - sparsity) * sizes.sum() - sizes[dense].sum()) / (raw * sizes)[~dense].sum()
    if eps * raw[~dense].max() <= 1:
      return np.where(dense, 1.0, eps * raw)
    dense |= raw == raw[~dense].max()


def _selected(params, where):
  flags = dict(zip(jaxprune.tree.leaf_paths(params), jax.tree.leaves(where)))
  paths = [p for p in jaxprune.tree.leaf_paths(params) if flags[p]]
  shapes = [x.shape for p, x in zip(jaxprune.tree.leaf_paths(params), jax.tree.leaves(params))
            if flags[p]]
  return paths, shapes


def test_erk_fans_from_layouts_unfreeze_gemma_kv_einsum():
  params = _gemma_params()
  where = jaxprune.select(params)
  paths, shapes = _selected(params, where)
  assert paths == list(GEMMA_FANS)
  # The failure: every axis counted as a fan leaves kv_einsum fully dense at 50%.
  old = [1 - float(s) for s in jaxprune.distributions.erk().sparsities(paths, shapes, 0.5)]
  old_reference = erk_reference([sum(s) / math.prod(s) for s in shapes],
                                [math.prod(s) for s in shapes], 0.5)
  np.testing.assert_allclose(old, old_reference, atol=1e-6)
  assert old[paths.index("layer_0/attn/kv_einsum/w")] == 1.0

  layouts = _layouts(_gemma_apply, params, S((1, 5), jnp.int32))
  new = [1 - float(s) for s in jaxprune.distributions.erk(layouts=layouts).sparsities(paths,
                                                                                      shapes, 0.5)]
  reference = erk_reference([(i + o) / (i * o) for i, o in GEMMA_FANS.values()],
                            [math.prod(s) for s in shapes], 0.5)
  np.testing.assert_allclose(new, reference, atol=1e-6)
  assert new[paths.index("layer_0/attn/kv_einsum/w")] == pytest.approx(0.944, abs=1e-3)
  assert max(new) < 1.0

  # As a static setting of a compiled Prune: the counts are the reference shares.
  target = jaxprune.Prune(0.5, distribution=jaxprune.distributions.erk(layouts=layouts))
  masks = jax.jit(lambda t, p: t.masks(p, where))(target, params)
  kept = [int(m.sum()) for m in jax.tree.leaves(masks)]
  shares = reference * np.array([math.prod(s) for s in shapes])
  assert np.all(np.abs(np.array(kept) - shares) <= 1)
  assert sum(kept) == round(0.5 * sum(math.prod(s) for s in shapes))


def _three_apply(p, x2, x3, signal):
  y = jax.lax.conv_general_dilated(signal, p["c"], (1,), "SAME",
                                   dimension_numbers=("NWC", "WIO", "NWC"))
  return x2 @ p["a"], x3 @ p["b"], y


@pytest.mark.parametrize("kernel, want", [(True, {"a": 0.0, "b": 0.31, "c": 0.655}),
                                          (False, {"a": 0.21, "b": 0.47, "c": 0.56})])
def test_erk_layouts_keep_jaxpruner_figures_on_dense_and_conv(kernel, want):
  # JaxPruner's testGetSparsityERKSucceed shapes as the program uses them: two dense
  # kernels (in, out) and a 1-d conv kernel (width, in, out), where every axis is a fan
  # (Evci et al.'s (n_in + n_out + w) / (n_in * n_out * w); ER drops the width).
  params = {"a": jnp.ones((2, 4)), "b": jnp.ones((3, 6)), "c": jnp.ones((2, 4, 6))}
  layouts = _layouts(_three_apply, params, S((1, 2), jnp.float32), S((1, 3), jnp.float32),
                     S((1, 5, 4), jnp.float32))
  assert layouts["c"].use == "conv" and layouts["c"].inputs == (0, 1)
  got = jaxprune.distributions.erk(kernel=kernel, layouts=layouts).sparsities(
      list(params), [x.shape for x in params.values()], 0.5)
  for name, s in zip(params, got):
    assert float(s) == pytest.approx(want[name], abs=0.006), name


def _stacked_apply(p, x):
  x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])
  return x @ p["head"]


def test_erk_layouts_leave_stack_axes_out_and_follow_stacked():
  params = {"layers": jnp.ones((3, 8, 8)), "head": jnp.ones((8, 32))}
  shapes = [(3, 8, 8), (8, 32)]
  layouts = _layouts(_stacked_apply, params, S((2, 8), jnp.float32))
  # Each of the three stacked layers is an (8, 8) layer, not a (3, 8, 8) kernel.
  reference = erk_reference([16 / 64, 40 / 256], [192, 256], 0.6)
  old = [1 - float(s) for s in jaxprune.distributions.erk().sparsities(list(params), shapes, 0.6)]
  assert not np.allclose(old, reference, atol=1e-3)
  new = [1 - float(s) for s in
         jaxprune.distributions.erk(layouts=layouts).sparsities(list(params), shapes, 0.6)]
  np.testing.assert_allclose(new, reference, atol=1e-6)
  # With `stacked=` the distribution sees (8, 8) slices; the layouts still apply.
  masks = jaxprune.ranked_masks(params, 0.6, jaxprune.select(params),
                                distribution=jaxprune.distributions.erk(layouts=layouts),
                                stacked={"layers": 1})
  per_layer = [int(m.sum()) for m in masks["layers"]]
  assert all(abs(k - reference[0] * 64) <= 1 for k in per_layer)


def test_erk_layouts_refuse_a_leaf_without_fans_unless_fixed():
  params = {"w": jnp.ones((4, 4)), "gain": jnp.ones((2, 4))}
  layouts = _layouts(lambda p, x: (x @ p["w"]) * p["gain"], params, S((2, 4), jnp.float32))
  d = jaxprune.distributions.erk(layouts=layouts)
  with pytest.raises(ValueError, match="gain as 'elementwise'"):
    d.sparsities(["w", "gain"], [(4, 4), (2, 4)], 0.5)
  fixed = jaxprune.distributions.erk(layouts=layouts, fixed={"gain": 0.0})
  assert [float(s) for s in fixed.sparsities(["w", "gain"], [(4, 4), (2, 4)], 0.5)] == [0.5, 0.0]
  with pytest.raises(ValueError, match="no entry for other"):
    d.sparsities(["other"], [(4, 4)], 0.5)


# ----------------------------------------------------------------------------- int8


def _export_params() -> dict:
  r = np.random.default_rng(0)
  gating = r.normal(size=(2, 16, 8)).astype(np.float32)
  gating[0, 3] *= 1e-3  # one output neuron far smaller than the rest
  return {"gating": jnp.asarray(gating),
          "attn_out": jnp.asarray(r.normal(size=(2, 4, 8)), jnp.float32),
          "layers": jnp.asarray(r.normal(size=(3, 8, 8)), jnp.float32),
          "conv": jnp.asarray(r.normal(size=(6, 4, 3, 3)), jnp.float32)}


def _export_apply(p, x, img):
  g = jnp.einsum("td,chd->tch", x, p["gating"])                  # contracted on d (axis 2)
  h = (jax.nn.gelu(g[:, 0]) * g[:, 1])[:, :8].reshape(-1, 2, 4)
  x = x + jnp.einsum("thk,hkd->td", h, p["attn_out"])             # contracted on (0, 1)
  x, _ = jax.lax.scan(lambda c, w: (c @ w, None), x, p["layers"])
  y = jax.lax.conv_general_dilated(img, p["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "OIHW", "NHWC"))
  return x, y


# Per leaf, the axes a NumPy per-output-channel quantization takes its max over.
INPUT_AXES = {"gating": (2,), "attn_out": (0, 1), "layers": (1,), "conv": (2, 3, 1)}


def int8_reference(w: np.ndarray, mask: np.ndarray, reduce: tuple[int, ...]) -> np.ndarray:
  """Symmetric int8 of the kept weights, one scale per index over the other axes."""
  kept = np.where(mask, w, 0).astype(np.float32)
  scale = (np.abs(kept).max(axis=reduce, keepdims=True) / np.float32(127)).astype(np.float32)
  safe = np.where(scale > 0, scale, 1).astype(np.float64)
  q = np.clip(np.rint(kept.astype(np.float64) / safe), -127, 127).astype(np.float32)
  return np.where(mask, q * scale, 0).astype(np.float32)


def _header(path) -> tuple[int, dict]:
  data = path.read_bytes()
  _, version, header_len, _ = struct.unpack_from("<8sIQQ", data)
  return version, json.loads(data[28:28 + header_len])


def test_int8_scales_per_output_channel_from_layouts(tmp_path):
  params = _export_params()
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params),
                                score=jaxprune.scores.random_score(0))
  host = {k: np.asarray(v) for k, v in params.items()}
  host_masks = {k: np.asarray(m) for k, m in masks.items()}
  # The failure: per last axis, the gating kernel's scales run along its input axis d,
  # so its small output neuron shares scales with large ones and loses its weights.
  jaxprune.export.export_compressed(tmp_path / "old", params, masks, values="int8")
  old = np.asarray(jaxprune.export.load_compressed(tmp_path / "old")["gating"])
  small = np.abs(np.where(host_masks["gating"], host["gating"], 0)[0, 3]).max()
  assert np.abs(old[0, 3] - np.where(host_masks["gating"][0, 3], host["gating"][0, 3], 0)).max() \
      > small / 4

  layouts = _layouts(_export_apply, params, S((5, 8), jnp.float32), S((1, 5, 5, 4), jnp.float32))
  info = jaxprune.export.export_compressed(tmp_path / "new", params, masks, values="int8",
                                    layouts=layouts)
  loaded, loaded_masks = jaxprune.export.load_compressed(tmp_path / "new", with_masks=True)
  for name, reduce in INPUT_AXES.items():
    want = int8_reference(host[name], host_masks[name], reduce)
    np.testing.assert_allclose(loaded[name], want, rtol=0, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(loaded_masks[name], host_masks[name])
  # Every kept weight within half its own output neuron's scale (small neuron too).
  kept = np.where(host_masks["gating"], host["gating"], 0)
  bound = np.abs(kept).max(axis=2, keepdims=True) / 254 * (1 + 1e-6)
  assert np.all(np.abs(loaded["gating"] - kept) <= bound)
  # The header says which axes the scales run over (the last axis goes unsaid), and
  # the file is version 2 so that a reader that does not know them refuses it.
  version, header = _header(tmp_path / "new")
  axes = {e["path"]: e.get("scale_axes") for e in header["leaves"]}
  assert axes == {"gating": [0, 1], "attn_out": None, "layers": [0, 2], "conv": [0]}
  assert version == 2 and _header(tmp_path / "old")[0] == 1
  scales = 2 * 16 + 8 + 3 * 8 + 6
  assert info.targeted_bytes == sum(-(-v.size // 8) for v in host.values()) + \
      sum(int(m.sum()) for m in host_masks.values()) + 4 * scales


def test_int8_layouts_refuse_a_leaf_without_output_channels(tmp_path):
  params = {"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
  layouts = _layouts(lambda p, ids: p["embed"][ids] @ p["w"], params, S((3,), jnp.int32))
  masks = {"embed": jnp.ones((10, 4), bool), "w": jnp.ones((4, 4), bool)}
  with pytest.raises(ValueError, match="embed as 'gather'"):
    jaxprune.export.export_compressed(tmp_path / "m", params, masks, values="int8", layouts=layouts)
  # Other encodings do not read the layouts.
  jaxprune.export.export_compressed(tmp_path / "m", params, masks, layouts=layouts)


# ----------------------------------------------------------------------------- selection


def _penzai_like() -> dict:
  """Penzai-style names: norm scales are `weights` (stacked `(2, d)` over two layers)."""
  keys = jax.random.split(jax.random.key(1), 5)
  return {
      "embedding": {"embeddings": jax.random.normal(keys[0], (VOCAB, 16))},
      "blocks": {"norm": {"weights": jnp.ones((2, 16))},
                 "attention": {"query": {"weights": jax.random.normal(keys[1], (2, 16, 2, 8))},
                               "output": {"weights": jax.random.normal(keys[2], (2, 2, 8, 16))}},
                 "mlp": {"weights": jax.random.normal(keys[3], (2, 16, 16))}},
      "final_norm": {"weights": jnp.ones(16)},
  }


def _penzai_apply(p, ids):
  def block(x, b):
    h = x * b["norm"]["weights"]
    q = jnp.einsum("td,dhk->thk", h, b["attention"]["query"]["weights"])
    x = x + jnp.einsum("thk,hkd->td", q, b["attention"]["output"]["weights"])
    return x + jax.nn.relu(x @ b["mlp"]["weights"]), None
  x, _ = jax.lax.scan(block, p["embedding"]["embeddings"][ids], p["blocks"])
  return x * p["final_norm"]["weights"]


def test_select_by_role_skips_penzai_norm_scales_named_weights():
  params = _penzai_like()
  old = jaxprune.select(params)
  assert old["blocks"]["norm"]["weights"] is True  # the failure: a stacked norm picked by name
  layouts = _layouts(_penzai_apply, params, S((5,), jnp.int32))
  new = jaxprune.select(params, layouts=layouts)
  by_use = {p: layouts[p].use in ("dot_general", "conv") for p in layouts}
  assert dict(zip(jaxprune.tree.leaf_paths(params), jax.tree.leaves(new))) == by_use
  assert by_use == {"blocks/attention/output/weights": True, "blocks/attention/query/weights": True,
                    "blocks/mlp/weights": True, "blocks/norm/weights": False,
                    "embedding/embeddings": False, "final_norm/weights": False}
  # Patterns still apply on top of the role.
  only_attention = jaxprune.select(params, include="attention/*", layouts=layouts)
  assert [p for p, f in zip(jaxprune.tree.leaf_paths(params),
                            jax.tree.leaves(only_attention)) if f] \
      == ["blocks/attention/output/weights", "blocks/attention/query/weights"]
  no_mlp = jaxprune.select(params, exclude="mlp", layouts=layouts)
  assert no_mlp["blocks"]["mlp"]["weights"] is False
  assert no_mlp["blocks"]["attention"]["query"]["weights"] is True


def _list_apply(p, ids):
  x = p[0][ids] + p[1][jnp.arange(ids.shape[0])]  # token and position tables
  return jax.nn.relu(x @ p[2]) @ p[3] @ p[4]


def test_select_by_role_skips_embedding_tables_with_index_paths():
  r = np.random.default_rng(0)
  params = [jnp.asarray(r.normal(size=s), jnp.float32)
            for s in [(VOCAB, 8), (6, 8), (8, 16), (16, 8), (8, VOCAB)]]
  # The failure: the names are list indices, so both tables are selected.
  assert jaxprune.select(params) == [True] * 5
  layouts = _layouts(_list_apply, params, S((6,), jnp.int32))
  assert [layouts[str(i)].use for i in range(5)] == ["gather"] * 2 + ["dot_general"] * 3
  assert jaxprune.select(params, layouts=layouts) == [False, False, True, True, True]


def test_select_by_role_takes_convs_and_refuses_foreign_layouts():
  params = {"a": jnp.ones((3, 3, 1, 4)), "b": jnp.ones((2, 4)), "c": jnp.ones((4, 2))}
  def apply_fn(p, img):
    y = jax.lax.conv_general_dilated(img, p["a"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y * p["b"][0] + p["b"][1]).mean((1, 2)) @ p["c"]
  layouts = _layouts(apply_fn, params, S((1, 4, 4, 1), jnp.float32))
  assert jaxprune.select(params) == {"a": True, "b": True, "c": True}  # `b`: scale + bias
  assert jaxprune.select(params, layouts=layouts) == {"a": True, "b": False, "c": True}
  with pytest.raises(ValueError, match="describe none of the tree's leaves"):
    jaxprune.select({"x": jnp.ones((2, 2))}, layouts=layouts)
  with pytest.raises(ValueError, match="b: elementwise"):
    jaxprune.select(params, include="b", layouts=layouts)

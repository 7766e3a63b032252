"""`weight_layouts`: each leaf's layout read from the program (issue 28).

A zoo of the layouts real model code has (einsum attention kernels `(d, heads,
head_dim)` and `(heads, head_dim, d)`, a gemma-style transposed gating kernel
`(2, hidden, d)` contracted on its last axis, a flat dict keyed by `a/b/kernel`
strings with norm scales named `weights`, convolutions in two layouts, `w[i]` in a
Python loop and in `fori_loop`, stacked layers under `scan`, a `vmap`ped MoE, a tied
embedding), the three frameworks' own layers, and what must be refused with a
reason (a leaf carried by a scan, a kernel flattened before its product, a leaf
only fed to an op the analysis does not understand). A hypothesis test draws
einsum products at random and checks the contracted axes against the subscripts.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.tree import Layout, weight_layouts

S = jax.ShapeDtypeStruct


def _zoo_params() -> dict:
  return {
      "embed": jnp.ones((50, 8)),
      "block/norm/weights": jnp.ones(8),
      "block/attn/q": jnp.ones((8, 2, 4)), "block/attn/o": jnp.ones((2, 4, 8)),
      "block/mlp/gating": jnp.ones((2, 16, 8)), "block/mlp/linear": jnp.ones((16, 8)),
      "loop": jnp.ones((3, 8, 8)), "fori": jnp.ones((3, 8, 8)), "scanned": jnp.ones((3, 8, 8)),
      "bias": jnp.zeros(8), "experts": jnp.ones((4, 8, 8)),
      "conv_hwio": jnp.ones((3, 3, 4, 6)), "conv_oihw": jnp.ones((5, 6, 3, 3)),
      "head": jnp.ones((8, 50)),
  }


def _zoo_apply(p, ids, img):
  x = p["embed"][ids] * p["block/norm/weights"]
  h = jnp.einsum("td,dhk->thk", x, p["block/attn/q"])
  x = x + jnp.einsum("thk,hkd->td", h, p["block/attn/o"])
  g = jnp.einsum("td,chd->tch", x, p["block/mlp/gating"])
  x = x + (jax.nn.gelu(g[:, 0]) * g[:, 1]) @ p["block/mlp/linear"]
  for i in range(3):
    x = x @ p["loop"][i]
  x = jax.lax.fori_loop(0, 3, lambda i, c: c @ p["fori"][i], x)
  x, _ = jax.lax.scan(lambda c, w: (c @ w + p["bias"], None), x, p["scanned"])
  tokens = jnp.broadcast_to(x, (4, *x.shape))  # each expert's tokens (a dispatch)
  x = jax.vmap(lambda w, xs: xs @ w)(p["experts"], tokens).sum(0)
  y = jax.lax.conv_general_dilated(img, p["conv_hwio"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.lax.conv_general_dilated(y, p["conv_oihw"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "OIHW", "NHWC"))
  return jax.checkpoint(lambda x: x @ p["head"])(x), y


# path: (use, inputs, outputs, stack)
ZOO = {
    "embed": ("gather", (0,), (1,), ()),
    "block/norm/weights": ("elementwise", (), (0,), ()),
    "block/attn/q": ("dot_general", (0,), (1, 2), ()),
    "block/attn/o": ("dot_general", (0, 1), (2,), ()),
    "block/mlp/gating": ("dot_general", (2,), (0, 1), ()),
    "block/mlp/linear": ("dot_general", (0,), (1,), ()),
    "loop": ("dot_general", (1,), (2,), (0,)),
    "fori": ("dot_general", (1,), (2,), (0,)),
    "scanned": ("dot_general", (1,), (2,), (0,)),
    "bias": ("elementwise", (), (0,), ()),
    "experts": ("dot_general", (1,), (2,), (0,)),
    "conv_hwio": ("conv", (0, 1, 2), (3,), ()),
    "conv_oihw": ("conv", (2, 3, 1), (0,), ()),
    "head": ("dot_general", (0,), (1,), ()),
}


@pytest.fixture(scope="module")
def zoo():
  return weight_layouts(_zoo_apply, _zoo_params(), S((5,), jnp.int32),
                        S((1, 6, 6, 4), jnp.float32))


@pytest.mark.parametrize("path", list(ZOO))
def test_zoo_layouts_are_read_from_the_program(zoo, path):
  layout = zoo[path]
  assert (layout.use, layout.inputs, layout.outputs, layout.stack) == ZOO[path], layout
  assert "test_layouts.py" in layout.source  # the user's line, not jax's


def test_the_table_names_every_leaf(zoo):
  table = str(zoo).splitlines()
  assert table[0].split() == ["path", "shape", "use", "inputs", "outputs", "stack", "source"]
  assert len(table) == 1 + len(ZOO)
  assert any(line.startswith("block/attn/o") and "(2, 4, 8)" in line for line in table)


def test_a_tied_embedding_is_mixed_with_both_uses_named():
  layouts = weight_layouts(lambda p, ids: p["e"][ids] @ p["e"].T, {"e": jnp.ones((10, 4))},
                           S((3,), jnp.int32))
  assert layouts["e"].use == "mixed"
  assert "gather with inputs (0,)" in layouts["e"].reason
  assert "dot_general with inputs (1,)" in layouts["e"].reason


# (apply_fn, the input's shape, the reason given)
REFUSED = {
    "a scan carry": (lambda p, x: jax.lax.scan(lambda w, _: (w * 0.5, None), p["w"], None,
                                               length=2)[0] @ x, (4,), "carry of the scan"),
    "a flattened kernel": (lambda p, x: x @ p["w"].reshape(8), (8,), "reshaped mix"),
    "an op it does not understand": (lambda p, x: jnp.sort(p["w"], axis=0) @ x, (4,),
                                     "reaches `sort` at"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_it_cannot_map_is_refused_with_the_reason(case):
  apply_fn, shape, reason = REFUSED[case]
  layout = weight_layouts(apply_fn, {"w": jnp.ones((2, 4))}, S(shape, jnp.float32))["w"]
  assert layout.use == "unknown" and reason in layout.reason, layout
  assert "test_layouts.py" in layout.reason or "test_layouts.py" in layout.source


def test_an_unused_leaf_and_a_scaled_kernel():
  layouts = weight_layouts(lambda p, x: x @ (0.5 * p["w"]).astype(jnp.bfloat16),
                           {"w": jnp.ones((4, 3)), "spare": jnp.ones((2, 2))},
                           S((2, 4), jnp.bfloat16))
  assert layouts["w"][:4] == ("dot_general", (0,), (1,), ())
  assert layouts["spare"].use == "unused"


def test_where_restricts_the_leaves_described():
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
  layouts = weight_layouts(lambda p, x: x @ p["a"] @ p["b"], params, S((3,), jnp.float32),
                           where={"a": True, "b": False})
  assert list(layouts) == ["a"]


def test_nnx_linen_style_and_equinox_layers():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                         decode=False, rngs=rngs)
      self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)

    def __call__(self, x, img):
      return self.attn(x), self.conv(img)

  graphdef, state = nnx.split(Model(nnx.Rngs(0)))
  layouts = weight_layouts(lambda s, x, img: nnx.merge(graphdef, s)(x, img), state,
                           S((2, 5, 8), jnp.float32), S((1, 6, 6, 3), jnp.float32))
  assert layouts["attn/query/kernel/value"][:3] == ("dot_general", (0,), (1, 2))
  assert layouts["attn/out/kernel/value"][:3] == ("dot_general", (0, 1), (2,))
  assert layouts["conv/kernel/value"][:3] == ("conv", (0, 1, 2), (3,))
  mlp = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
  eqx_layouts = weight_layouts(lambda m, x: jax.vmap(m)(x), mlp, S((5, 4), jnp.float32))
  assert eqx_layouts["layers/0/weight"][:3] == ("dot_general", (1,), (0,))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_einsum_products_contract_the_axes_their_subscripts_say(data):
  rank = data.draw(st.integers(2, 4))
  letters = "abcd"[:rank]
  contracted = data.draw(st.sets(st.sampled_from(letters), min_size=1, max_size=rank - 1))
  order = data.draw(st.permutations(letters))
  kernel = "".join(order)
  x_sub = "t" + "".join(c for c in letters if c in contracted)
  out = "t" + "".join(c for c in letters if c not in contracted)
  sizes = {c: 2 + i for i, c in enumerate(letters)}
  w = jnp.ones(tuple(sizes[c] for c in kernel))
  x = S((3, *[sizes[c] for c in x_sub[1:]]), jnp.float32)
  layout = weight_layouts(lambda p, x: jnp.einsum(f"{x_sub},{kernel}->{out}", x, p["w"]),
                          {"w": w}, x)["w"]
  assert layout.use == "dot_general"
  assert sorted(layout.inputs) == sorted(kernel.index(c) for c in contracted)
  assert sorted(layout.outputs) == sorted(kernel.index(c) for c in letters
                                          if c not in contracted)
  assert isinstance(layout, Layout) and layout.stack == ()

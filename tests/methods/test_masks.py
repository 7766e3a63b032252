"""Tests of `ranked_masks`, `threshold_masks`, `apply_masks`, `check_masks`.

Every mask is compared with a NumPy reference: a stable argsort of |w| (as float32,
exact for float32 and bfloat16 leaves) with previously pruned weights first, ties
broken by flat index (leaf order, then row-major), pruning exactly `round(s * n)`.

Shapes come from a small fixed set so that JAX compiles each computation once.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune

SETTINGS = settings(max_examples=20, deadline=None)
LAYER_SHAPES = [(1, 1), (1, 2), (3, 4), (2, 3, 5)]
# A fixed tree for global-scope tests: leaf shapes never change, only values.
GLOBAL_SHAPES = {"fc1": (3, 4), "fc2": (1, 2), "output_proj": (2, 3, 5)}


def is_none(x):
  return x is None


def round_fraction_of(fraction, n: int):
  """The count a float32 array sparsity `fraction` prunes of a leaf of `n` weights, as
  the library computes it for a traced sparsity (`prune_counts` of the uniform
  distribution, which `ranked_masks` uses): an int32 or int64 array."""
  return jaxprune.distributions.uniform().prune_counts(["w"], [(n,)], fraction)[0]


# ----------------------------------------------------------------------------- reference


def ref_pruned(leaves, k, previous=None):
  """Bool arrays, True = pruned: exactly k of the smallest, previously pruned first."""
  mags = [np.abs(np.asarray(jnp.asarray(w).astype(jnp.float32))).ravel() for w in leaves]
  flat = np.concatenate(mags) if mags else np.zeros(0, np.float32)
  if previous is None:
    kept_before = np.ones(flat.size, bool)
  else:
    kept_before = np.concatenate([np.asarray(p).ravel() for p in previous])
  # Primary key: already pruned (kept_before=False) first; then |w|; then index (stable).
  order = np.lexsort((np.arange(flat.size), flat, kept_before))
  pruned = np.zeros(flat.size, bool)
  pruned[order[:k]] = True
  pruned |= ~kept_before
  out, start = [], 0
  for w in leaves:
    size = int(np.size(w))
    out.append(pruned[start : start + size].reshape(np.shape(w)))
    start += size
  return out


def ref_kept(leaves, k, previous=None):
  return [~p for p in ref_pruned(leaves, k, previous)]


def selected_masks(masks):
  return [m for m in jax.tree.leaves(masks, is_leaf=is_none) if m is not None]


def assert_masks_equal(got, expected):
  got = selected_masks(got) if not isinstance(got, list) else got
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    g = np.asarray(g)
    assert g.dtype == np.bool_
    assert g.shape == e.shape
    np.testing.assert_array_equal(g, e)


def traced_counts(s32: np.float32, n: int) -> set[int]:
  """Counts a traced float32 sparsity may give: round(s*n), or either side at an exact half."""
  exact = Fraction(float(s32)) * n
  py = round(float(s32) * n)  # exact in float64: 24-bit mantissa times n < 2**29
  if exact.denominator == 2:
    return {int(exact - Fraction(1, 2)), int(exact + Fraction(1, 2))}
  return {py}


# ----------------------------------------------------------------------------- strategies

# Few distinct magnitudes, so that ties (also between +x and -x, and many zeros) are common.
TIE_VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 1e-3, -1e-3]
tie_elements = st.sampled_from(TIE_VALUES)
float_elements = st.floats(-4.0, 4.0, width=32, allow_subnormal=True)
elements = st.one_of(tie_elements, float_elements)


@st.composite
def leaf(draw, shape, dtype=np.float32):
  values = draw(
      st.one_of(
          hnp.arrays(np.float32, shape, elements=tie_elements),
          hnp.arrays(np.float32, shape, elements=float_elements),
          hnp.arrays(np.float32, shape, elements=elements),
      )
  )
  return jnp.asarray(values, dtype)


@st.composite
def layer_case(draw):
  # bfloat16 on one shape only: every (shape, dtype) pair costs a compilation.
  shape, dtype = draw(st.sampled_from([(s, jnp.float32) for s in LAYER_SHAPES]
                                      + [((3, 4), jnp.bfloat16)]))
  return draw(leaf(shape, dtype))


@st.composite
def global_tree(draw):
  return {name: draw(leaf(shape)) for name, shape in GLOBAL_SHAPES.items()}


sparsities = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
# Sparsities landing on exact halves of s * n for the shapes used, to exercise rounding.
half_sparsities = st.sampled_from([0.5, 0.25, 0.75, 1 / 6, 0.1, 0.3, 0.7, 0.9])
any_sparsity = st.one_of(sparsities, half_sparsities)


def single(w, name="fc1"):
  return {name: {"kernel": w}}


# ----------------------------------------------------------------------------- layer scope


@SETTINGS
@given(w=layer_case(), s=any_sparsity)
def test_layer_exact_count_matches_reference(w, s):
  params = single(w)
  masks = jaxprune.ranked_masks(params, s, {"fc1": {"kernel": True}})
  k = round(s * w.size)
  expected = ref_kept([w], k)
  assert_masks_equal(masks, expected)
  assert int((~np.asarray(masks["fc1"]["kernel"])).sum()) == k


@SETTINGS
@given(tree=global_tree(), s=any_sparsity)
def test_layer_scope_ranks_each_leaf_alone(tree, s):
  where = jax.tree.map(lambda _: True, tree)
  masks = jaxprune.ranked_masks(tree, s, where, scope="layer")
  for name, w in tree.items():
    k = round(s * w.size)
    assert_masks_equal([masks[name]], ref_kept([w], k))


@SETTINGS
@given(tree=global_tree(), s=any_sparsity)
def test_global_scope_ranks_leaves_together(tree, s):
  where = jax.tree.map(lambda _: True, tree)
  masks = jaxprune.ranked_masks(tree, s, where, scope="global")
  leaves = jax.tree.leaves(tree)
  n = sum(w.size for w in leaves)
  k = round(s * n)
  assert_masks_equal(masks, ref_kept(leaves, k))
  assert sum(int((~m).sum()) for m in selected_masks(masks)) == k


@SETTINGS
@given(w=layer_case(), s1=any_sparsity, s2=any_sparsity, scope=st.sampled_from(["layer", "global"]))
def test_previous_is_respected(w, s1, s2, scope):
  params = single(w)
  where = {"fc1": {"kernel": True}}
  m1 = jaxprune.ranked_masks(params, s1, where, scope=scope)
  m2 = jaxprune.ranked_masks(params, s2, where, scope=scope, previous=m1)
  prev, new = np.asarray(m1["fc1"]["kernel"]), np.asarray(m2["fc1"]["kernel"])
  # Never revives: everything pruned before stays pruned.
  assert not np.any(new & ~prev)
  k1, k2 = round(s1 * w.size), round(s2 * w.size)
  assert int((~new).sum()) == max(k1, k2)
  if k1 >= k2:
    np.testing.assert_array_equal(new, prev)
  assert_masks_equal([new], ref_kept([w], k2, previous=[prev]))


@SETTINGS
@given(tree=global_tree(), s=any_sparsity, data=st.data())
def test_previous_arbitrary_masks_global(tree, s, data):
  # `previous` need not come from ranked_masks: any mask is respected.
  previous = {
      name: jnp.asarray(data.draw(hnp.arrays(np.bool_, w.shape)))
      for name, w in tree.items()
  }
  where = jax.tree.map(lambda _: True, tree)
  masks = jaxprune.ranked_masks(tree, s, where, scope="global", previous=previous)
  leaves = jax.tree.leaves(tree)
  prev = [np.asarray(p) for p in jax.tree.leaves(previous)]
  k = round(s * sum(w.size for w in leaves))
  expected = ref_kept(leaves, k, previous=prev)
  assert_masks_equal(masks, expected)
  already = sum(int((~p).sum()) for p in prev)
  assert sum(int((~m).sum()) for m in selected_masks(masks)) == max(k, already)


# ----------------------------------------------------------------------------- jit

_jit_layer = jax.jit(
    lambda p, s: jaxprune.ranked_masks(p, s, {"fc1": {"kernel": True}}, scope="layer")
)
_jit_global = jax.jit(
    lambda p, s: jaxprune.ranked_masks(
        p, s, jax.tree.map(lambda _: True, p), scope="global"
    )
)


@SETTINGS
@given(w=st.sampled_from(LAYER_SHAPES).flatmap(leaf),
       s=st.one_of(st.floats(0, 1, exclude_max=True, width=32), half_sparsities))
def test_jit_traced_sparsity_matches_eager(w, s):
  s32 = np.float32(s)
  if not s32 < 1.0:
    s32 = np.float32(0.5)
  got = np.asarray(_jit_layer(single(w), s32)["fc1"]["kernel"])
  k = int((~got).sum())
  allowed = traced_counts(s32, w.size)
  assert k in allowed, (k, allowed)
  # Whatever the count, the choice is the reference's for that count.
  assert_masks_equal([got], ref_kept([w], k))
  eager = np.asarray(jaxprune.ranked_masks(single(w), float(s32), {"fc1": {"kernel": True}})
                     ["fc1"]["kernel"])
  if len(allowed) == 1:
    np.testing.assert_array_equal(got, eager)
  else:  # Exact half: eager rounds half to even, traced may round half up; at most one apart.
    assert abs(int((~eager).sum()) - k) <= 1


@SETTINGS
@given(tree=global_tree(), s=st.floats(0.0, 1.0, exclude_max=True, width=32))
def test_jit_traced_sparsity_global(tree, s):
  s32 = np.float32(s)
  got = _jit_global(tree, s32)
  n = sum(w.size for w in jax.tree.leaves(tree))
  k = sum(int((~m).sum()) for m in selected_masks(got))
  assert k in traced_counts(s32, n)
  assert_masks_equal(got, ref_kept(jax.tree.leaves(tree), k))


def test_jit_with_python_float_sparsity_is_exact():
  # Only params are traced; a Python float sparsity still gives Python's round.
  w = jnp.arange(1.0, 13.0).reshape(3, 4)  # n = 12
  where = {"fc1": {"kernel": True}}
  for s, k in [(0.375, 4), (0.125, 2)]:  # 4.5 and 1.5: halves to even
    assert round(s * 12) == k
    got = jax.jit(lambda p, s=s: jaxprune.ranked_masks(p, s, where))(single(w))
    assert int((~got["fc1"]["kernel"]).sum()) == k


def test_jit_with_previous_and_traced_sparsity():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
  where = {"fc1": {"kernel": True}}
  f = jax.jit(lambda p, s, prev: jaxprune.ranked_masks(p, s, where, previous=prev))
  m1 = jaxprune.ranked_masks(single(w), 0.25, where)
  m2 = f(single(w), jnp.float32(0.5), m1)
  m3 = f(single(w), jnp.float32(0.25), m2)
  assert int((~m1["fc1"]["kernel"]).sum()) == 8  # round(7.5)
  assert int((~m2["fc1"]["kernel"]).sum()) == 15
  assert_masks_equal(m2, ref_kept([w], 15, previous=[np.asarray(m1["fc1"]["kernel"])]))
  np.testing.assert_array_equal(m3["fc1"]["kernel"], m2["fc1"]["kernel"])


@settings(max_examples=40, deadline=None)
@given(
    s=st.floats(0.0, 1.0, exclude_max=True, width=32),
    n=st.one_of(st.integers(0, 100), st.integers(0, 2**31 - 1)),
)
def test_round_fraction_of_is_exact_except_halves(s, n):
  s32 = np.float32(s)
  got = int(round_fraction_of(jnp.float32(s32), n))
  exact = Fraction(float(s32)) * n
  if exact.denominator == 2:
    assert got == int(exact + Fraction(1, 2))  # documented: exact halves round up
  else:
    assert got == round(exact)


@pytest.mark.parametrize("n", [1, 12_345, 50_000_000, 2**31 - 1])
def test_round_fraction_of_every_exponent(n):
  # Fractions across every float32 exponent in use (normal and subnormal), so each
  # shift of the limb product is exercised; compared with exact rational arithmetic.
  rng = np.random.default_rng(n)
  fractions = np.concatenate([
      np.float32(2.0) ** -np.arange(1, 150, dtype=np.float32),
      rng.uniform(1, 2, size=149).astype(np.float32) * np.float32(2.0) ** -np.arange(1, 150.0),
      rng.uniform(0, 1, size=64), [0.0, 0.5, 0.25, np.nextafter(np.float32(1), np.float32(0))],
  ]).astype(np.float32)
  got = np.asarray(jax.jit(jax.vmap(lambda f: round_fraction_of(f, n)))(fractions))
  for f, g in zip(fractions, got):
    exact = Fraction(float(f)) * n
    expected = int(exact + Fraction(1, 2)) if exact.denominator == 2 else round(exact)
    assert int(g) == expected, (float(f), n)


def test_round_fraction_of_halves_and_large_n():
  assert int(round_fraction_of(jnp.float32(0.5), 5)) == 3  # 2.5 rounds up (Python: 2)
  for s, n in [(0.8, 50_000_000), (0.3, 49_999_999), (0.123456, 2**31 - 1)]:
    expected = round(Fraction(float(np.float32(s))) * n)
    assert int(round_fraction_of(jnp.float32(s), n)) == expected
  # float32 arithmetic would be off by units here; the limb product is not.
  assert round(float(np.float32(0.3) * np.float32(49_999_999))) != round(
      Fraction(float(np.float32(0.3))) * 49_999_999
  )
  with pytest.raises(ValueError, match="2\\*\\*31"):
    round_fraction_of(jnp.float32(0.5), 2**31)


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_all_equal_weights(s):
  w = jnp.full((2, 3, 5), -0.25, jnp.float32)
  masks = jaxprune.ranked_masks(single(w), s, {"fc1": {"kernel": True}})
  k = round(s * 30)
  kept = np.asarray(masks["fc1"]["kernel"])
  assert int((~kept).sum()) == k
  # Ties broken by row-major index: the first k go.
  np.testing.assert_array_equal(kept.ravel(), np.arange(30) >= k)


def test_many_zeros_then_values():
  w = np.zeros((2, 3, 5), np.float32)
  w[1] = -np.arange(1, 16).reshape(3, 5)
  w = jnp.asarray(w)
  where = {"fc1": {"kernel": True}}
  for s, k in [(0.2, 6), (0.5, 15), (0.9, 27)]:
    kept = np.asarray(jaxprune.ranked_masks(single(w), s, where)["fc1"]["kernel"])
    assert int((~kept).sum()) == k == round(s * 30)
    assert_masks_equal([kept], ref_kept([w], k))
  # 15 zeros; 20% prunes 6 of them, in index order.
  kept = np.asarray(jaxprune.ranked_masks(single(w), 0.2, where)["fc1"]["kernel"])
  np.testing.assert_array_equal(kept.ravel()[:15], np.arange(15) >= 6)
  np.testing.assert_array_equal(kept.ravel()[15:], True)


@pytest.mark.parametrize(
    "shape,s,k",
    [((1, 1), 0.5, 0), ((1, 1), 0.6, 1), ((1, 2), 0.25, 0), ((1, 2), 0.75, 2), ((3, 4), 0.125, 2),
     ((3, 4), 0.375, 4), ((1, 1), 0.0, 0)],
)
def test_tiny_leaves_python_rounding(shape, s, k):
  # Python's round: half to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2).
  assert round(s * np.prod(shape)) == k
  w = jnp.asarray(np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape))
  kept = np.asarray(jaxprune.ranked_masks(single(w), s, {"fc1": {"kernel": True}})
                    ["fc1"]["kernel"])
  assert int((~kept).sum()) == k


def test_low_bits_only_differences():
  # Magnitudes share their high 16 bits: the second radix pass decides.
  rng = np.random.default_rng(1)
  base = np.float32(1.0)
  values = np.array([base + np.float32(i) * np.finfo(np.float32).eps for i in range(30)],
                    np.float32)
  assert len({int(v.view(np.uint32)) >> 16 for v in values}) == 1
  signs = rng.choice([-1.0, 1.0], size=30).astype(np.float32)
  w = jnp.asarray((rng.permutation(values) * signs).reshape(2, 3, 5))
  for s in [0.1, 0.35, 0.5, 0.8]:
    k = round(s * 30)
    masks = jaxprune.ranked_masks(single(w), s, {"fc1": {"kernel": True}})
    assert_masks_equal(masks, ref_kept([w], k))


def test_smallest_k_ties_by_position():
  # 4 of 12 pruned (round(12 / 3)): the 0, then the first three 1s in row-major order.
  w = jnp.array([[3, 1, 2, 1], [1, 5, 0, 9], [1, 1, 1, 1]], jnp.float32)
  kept = jaxprune.ranked_masks({"w": w}, 1 / 3, {"w": True})["w"]
  np.testing.assert_array_equal(~np.asarray(kept), [[False, True, False, True],
                                                   [True, False, True, False], [False] * 4])


def test_smallest_magnitudes_counts_pruned_first_then_small():
  w = jnp.array([[0.5, -0.1, 0.3], [0.2, -0.9, 0.0]], jnp.float32)
  kept = jnp.array([[False, True, True], [True, True, True]])
  # 3 of 6 pruned (the one pruned before counts among them).
  got = ~np.asarray(jaxprune.ranked_masks({"w": w}, 0.5, {"w": True}, previous={"w": kept})["w"])
  # 0.5 is already pruned, then the two smallest |w|: 0.0 and -0.1.
  np.testing.assert_array_equal(got, [[True, True, False], [False, False, True]])


DISTINCT = {"fc1": (512, 1024), "fc2": (1024, 512), "output_proj": (4, 128, 256)}
EQUAL = {f"block{i:02d}": (128, 256) for i in range(16)}  # one stacked group
# 65,536 weights: 65,536 histogram buckets would be 20 B/param of fixed scratch.
SMALL = {f"block{i:02d}": (64, 64) for i in range(16)}


@pytest.mark.parametrize("shapes", [DISTINCT, EQUAL, SMALL], ids=["distinct", "equal", "small"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mask_selection_peak_memory_at_most_8_bytes_per_param(scope, shapes):
  # The goal of issue 2: XLA's temp buffers for ranking, per ranked parameter. Held
  # keys or int32 scatter indices would each add 4 bytes and break it; equal leaves
  # add their stacked copy (4 bytes).
  tree = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  where = {k: True for k in shapes}
  compiled = jax.jit(
      lambda t: jaxprune.ranked_masks(t, 0.8, where, scope=scope)
  ).lower(tree).compile()
  stats = compiled.memory_analysis()
  assert stats is not None, "this backend reports no memory analysis"
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert stats.temp_size_in_bytes / n <= 8.0


def test_global_ties_broken_in_leaf_order():
  tree = {"a": jnp.ones((1, 2)), "b": -jnp.ones((1, 2))}
  where = {"a": True, "b": True}
  masks = jaxprune.ranked_masks(tree, 0.75, where, scope="global")
  np.testing.assert_array_equal(masks["a"], [[False, False]])
  np.testing.assert_array_equal(masks["b"], [[False, True]])


def test_global_vs_layer_scope():
  small = jnp.asarray(np.linspace(0.01, 0.1, 12).reshape(3, 4), jnp.float32)
  large = -jnp.asarray(np.linspace(1.0, 2.0, 12).reshape(3, 4), jnp.float32)
  tree = {"fc1": small, "fc2": large}
  where = {"fc1": True, "fc2": True}
  layer = jaxprune.ranked_masks(tree, 0.5, where, scope="layer")
  glob = jaxprune.ranked_masks(tree, 0.5, where, scope="global")
  assert int((~layer["fc1"]).sum()) == int((~layer["fc2"]).sum()) == 6
  # Globally the 12 smallest are all in fc1.
  assert int((~glob["fc1"]).sum()) == 12
  assert int((~glob["fc2"]).sum()) == 0


def test_deterministic():
  w = jnp.asarray(np.random.default_rng(2).integers(-2, 3, size=(2, 3, 5)), jnp.float32)
  where = {"fc1": {"kernel": True}}
  a = jaxprune.ranked_masks(single(w), 0.37, where)
  b = jaxprune.ranked_masks(single(w), 0.37, where)
  np.testing.assert_array_equal(a["fc1"]["kernel"], b["fc1"]["kernel"])


def test_empty_and_scalar_like_leaves():
  tree = {"fc0": jnp.zeros((0, 3)), "fc1": jnp.asarray([[3.0, 1.0]]), "fc2": jnp.ones((1, 1))}
  where = {"fc0": True, "fc1": True, "fc2": True}
  masks = jaxprune.ranked_masks(tree, 0.5, where, scope="layer")
  assert masks["fc0"].shape == (0, 3)
  np.testing.assert_array_equal(masks["fc1"], [[True, False]])
  np.testing.assert_array_equal(masks["fc2"], [[True]])  # round(0.5) == 0
  masks = jaxprune.ranked_masks(tree, 0.6, where, scope="global")  # round(1.8) == 2
  assert masks["fc0"].shape == (0, 3)
  np.testing.assert_array_equal(masks["fc1"], [[True, False]])
  np.testing.assert_array_equal(masks["fc2"], [[False]])


def test_bfloat16_leaf():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(3, 4)) * 0.01 + 1.0, jnp.bfloat16)  # bf16: many ties
  for scope in ["layer", "global"]:
    masks = jaxprune.ranked_masks(single(w), 0.6, {"fc1": {"kernel": True}}, scope=scope)
    kept = masks["fc1"]["kernel"]
    assert kept.dtype == jnp.bool_ and kept.shape == (3, 4)
    assert_masks_equal(masks, ref_kept([w], round(0.6 * 12)))
  pruned = jaxprune.apply_masks(single(w), masks)
  assert pruned["fc1"]["kernel"].dtype == jnp.bfloat16


def test_where_callable_and_unselected_leaves_are_none():
  params = {"fc1": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "embed": {"embedding": jnp.ones((5, 4))}}
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select)
  assert masks["fc1"]["bias"] is None
  assert masks["embed"]["embedding"] is None
  assert masks["fc1"]["kernel"].shape == (3, 4)
  assert int((~masks["fc1"]["kernel"]).sum()) == 6
  assert jax.tree.structure(masks, is_leaf=is_none) == jax.tree.structure(params)


# ----------------------------------------------------------------------------- pytrees


class Dense(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def test_nested_lists_tuples_namedtuples():
  rng = np.random.default_rng(4)
  r = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {
      "fc": [r(3, 4), (r(1, 2), Dense(kernel=r(2, 3, 5), bias=r(4)))],
      "head": Dense(kernel=r(3, 4), bias=r(2)),
      "steps": jnp.asarray(3),
  }
  where = jaxprune.select(params, include=("fc", "head"))
  assert where["fc"][1][1].bias is False and where["head"].kernel is True
  for scope in ["layer", "global"]:
    masks = jaxprune.ranked_masks(params, 0.5, where, scope=scope)
    assert jax.tree.structure(masks, is_leaf=is_none) == jax.tree.structure(params)
    assert isinstance(masks["head"], Dense) and isinstance(masks["fc"][1], tuple)
    assert masks["head"].bias is None and masks["steps"] is None
    chosen = [w for w, sel in zip(jax.tree.leaves(params), jax.tree.leaves(where)) if sel]
    if scope == "layer":
      expected = [ref_kept([w], round(0.5 * w.size))[0] for w in chosen]
    else:
      expected = ref_kept(chosen, round(0.5 * sum(w.size for w in chosen)))
    assert_masks_equal(masks, expected)
  pruned = jaxprune.apply_masks(params, masks)
  assert isinstance(pruned["head"], Dense)
  np.testing.assert_array_equal(pruned["head"].bias, params["head"].bias)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(4, name="fc1")(x))
    x = nn.LayerNorm(name="norm")(x)
    return nn.Dense(3, name="output_proj")(x)


def random_like(tree, seed=0):
  """Concrete random arrays for an abstract tree (cheaper than running initialisers)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), tree)


def test_linen_params():
  # The real Linen structure, with values filled in (eager `init` costs seconds of compiling).
  variables = random_like(jax.eval_shape(MLP().init, jax.random.key(0), jnp.ones((1, 3))))
  params = variables["params"]
  where = jaxprune.select(params)
  assert where == {
      "fc1": {"kernel": True, "bias": False},
      "norm": {"scale": False, "bias": False},
      "output_proj": {"kernel": True, "bias": False},
  }
  masks = jaxprune.ranked_masks(params, 0.75, where)
  assert masks["norm"]["scale"] is None and masks["fc1"]["bias"] is None
  for name in ["fc1", "output_proj"]:
    w = params[name]["kernel"]
    assert_masks_equal([masks[name]["kernel"]], ref_kept([w], round(0.75 * w.size)))
  # The whole variables dict works too, with paths through "params".
  masks_v = jaxprune.ranked_masks(variables, 0.75, jaxprune.select(variables))
  np.testing.assert_array_equal(masks_v["params"]["fc1"]["kernel"], masks["fc1"]["kernel"])
  pruned = jaxprune.apply_masks(params, masks)
  assert jax.tree.structure(pruned) == jax.tree.structure(params)
  assert int((pruned["fc1"]["kernel"] == 0).sum()) == round(0.75 * 12)
  np.testing.assert_array_equal(pruned["norm"]["scale"], params["norm"]["scale"])


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.output_proj = nnx.Linear(4, 3, rngs=rngs)


def nnx_model():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0))))
  return nnx.merge(graphdef, random_like(state, seed=1))


def test_nnx_state():
  model = nnx_model()
  state = nnx.state(model, nnx.Param)
  assert isinstance(state, nnx.State)
  where = jaxprune.select(state)
  assert jax.tree.structure(where) == jax.tree.structure(state)
  chosen = [p for p, sel in zip(jaxprune.tree.leaf_paths(state), jax.tree.leaves(where)) if sel]
  assert chosen == ["fc1/kernel/value", "output_proj/kernel/value"]
  kernels = [model.fc1.kernel[...], model.output_proj.kernel[...]]
  for scope in ["layer", "global"]:
    masks = jaxprune.ranked_masks(state, 0.5, where, scope=scope)
    assert jax.tree.structure(masks, is_leaf=is_none) == jax.tree.structure(state)
    if scope == "layer":
      expected = [ref_kept([w], round(0.5 * w.size))[0] for w in kernels]
    else:
      expected = ref_kept(kernels, round(0.5 * sum(w.size for w in kernels)))
    assert_masks_equal(masks, expected)
  pruned = jaxprune.apply_masks(state, masks)
  assert isinstance(pruned, nnx.State)
  nnx.update(model, pruned)
  np.testing.assert_array_equal(model.fc1.kernel[...] != 0, expected[0])
  np.testing.assert_array_equal(model.output_proj.kernel[...] != 0, expected[1])
  # `previous` as an nnx mask tree.
  m2 = jaxprune.ranked_masks(state, 0.8, where, previous=masks, scope="global")
  n = sum(w.size for w in kernels)
  assert sum(int((~m).sum()) for m in selected_masks(m2)) == round(0.8 * n)
  assert all(not np.any(np.asarray(b) & ~np.asarray(a))
             for a, b in zip(selected_masks(masks), selected_masks(m2)))


# ----------------------------------------------------------------------------- threshold


@SETTINGS
@given(
    w=layer_case(),
    t=st.one_of(
        # Not subnormal: XLA on CPU flushes subnormals to zero in float comparisons.
        st.floats(-1.0, 5.0, allow_nan=False, allow_subnormal=False).filter(
            lambda t: t == 0 or abs(t) >= 2e-38
        ),
        st.sampled_from([0.0, 0.5, 1.0, 1e-3, 0.1002, 0.1004, float("inf"), 1e39, -1e39]),
    ),
)
def test_threshold_keeps_exactly_at_least(w, t):
  masks = jaxprune.threshold_masks(single(w), t, {"fc1": {"kernel": True}})
  mag = np.abs(np.asarray(w.astype(jnp.float32), np.float64))
  np.testing.assert_array_equal(np.asarray(masks["fc1"]["kernel"]), mag >= t)


def test_threshold_not_rounded_to_leaf_dtype():
  # bfloat16 neighbours of 0.1: 0.099609375, 0.10009765625, 0.1005859375.
  w = jnp.asarray([[0.10009765625, 0.1005859375]], jnp.bfloat16)
  got = jaxprune.threshold_masks(single(w), 0.1002, {"fc1": {"kernel": True}})
  np.testing.assert_array_equal(got["fc1"]["kernel"], [[False, True]])
  # float32: a threshold between two float32 values.
  x = np.float32(0.1)
  t = (float(x) + float(np.nextafter(x, np.float32(1)))) / 2
  got = jaxprune.threshold_masks(single(jnp.asarray([[x]])), t, {"fc1": {"kernel": True}})
  assert not bool(got["fc1"]["kernel"][0, 0])


def test_threshold_traced_and_structure():
  params = {"fc1": {"kernel": jnp.asarray([[0.1, -0.5], [2.0, -0.05]]), "bias": jnp.ones(2)}}
  where = jaxprune.select(params)
  f = jax.jit(lambda p, t: jaxprune.threshold_masks(p, t, where))
  got = f(params, jnp.float32(0.1))
  np.testing.assert_array_equal(got["fc1"]["kernel"], [[True, True], [True, False]])
  assert got["fc1"]["bias"] is None
  w16 = {"fc1": {"kernel": params["fc1"]["kernel"].astype(jnp.bfloat16), "bias": jnp.ones(2)}}
  got = f(w16, jnp.float32(0.1002))  # bf16(0.1) = 0.10009765625 < 0.1002
  np.testing.assert_array_equal(got["fc1"]["kernel"], [[False, True], [True, False]])


def test_threshold_nan_is_an_error():
  with pytest.raises(ValueError, match=r"threshold.*nan"):
    jaxprune.threshold_masks(single(jnp.ones((2, 2))), float("nan"), {"fc1": {"kernel": True}})


# ----------------------------------------------------------------------------- apply / check


@SETTINGS
@given(w=layer_case(), s=sparsities)
def test_apply_masks_zeroes_exactly_the_pruned(w, s):
  params = {"fc1": {"kernel": w, "bias": jnp.arange(3.0)}}
  masks = jaxprune.ranked_masks(params, s, jaxprune.select(params))
  out = jaxprune.apply_masks(params, masks)
  kept = np.asarray(masks["fc1"]["kernel"])
  got = np.asarray(out["fc1"]["kernel"].astype(jnp.float32))
  orig = np.asarray(w.astype(jnp.float32))
  assert out["fc1"]["kernel"].dtype == w.dtype
  np.testing.assert_array_equal(got[~kept], 0.0)
  np.testing.assert_array_equal(got[kept], orig[kept])
  np.testing.assert_array_equal(out["fc1"]["bias"], params["fc1"]["bias"])


def test_apply_masks_under_jit():
  params = {"fc1": jnp.asarray([[1.0, -2.0], [3.0, -0.5]])}
  masks = {"fc1": jnp.asarray([[True, False], [True, False]])}
  out = jax.jit(jaxprune.apply_masks)(params, masks)
  np.testing.assert_array_equal(out["fc1"], [[1.0, 0.0], [3.0, 0.0]])


def test_apply_masks_shape_mismatch_names_path():
  params = {"blocks": [{"fc1": jnp.ones((3, 4))}]}
  masks = {"blocks": [{"fc1": jnp.ones((4, 3), bool)}]}
  with pytest.raises(ValueError, match=re.escape("blocks/0/fc1") + ".*\\(4, 3\\).*\\(3, 4\\)"):
    jaxprune.apply_masks(params, masks)


def test_apply_masks_structure_mismatch():
  params = {"fc1": jnp.ones((3, 4)), "fc2": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"`masks` has 1 slots but params have 2"):
    jaxprune.apply_masks(params, {"fc1": jnp.ones((3, 4), bool)})
  with pytest.raises(ValueError, match=r"`masks` has a leaf at fc3 where params have fc2"):
    jaxprune.apply_masks(params, {"fc1": jnp.ones((3, 4), bool), "fc3": jnp.ones((2, 2), bool)})


def test_apply_masks_non_bool_mask():
  params = {"fc1": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match=r"fc1.*bool.*float32"):
    jaxprune.apply_masks(params, {"fc1": jnp.ones((3, 4))})


def test_check_masks_accepts_valid_tree():
  params = {"fc1": jnp.ones((3, 4)), "b": jnp.ones(3)}
  jaxprune.check_masks({"fc1": jnp.ones((3, 4), bool), "b": None}, params)
  with pytest.raises(ValueError, match="b"):
    jaxprune.check_masks({"fc1": jnp.ones((3, 4), bool), "b": jnp.ones(2, bool)}, params)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_sparsity(s):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got " + re.escape(repr(s))):
    jaxprune.ranked_masks(single(jnp.ones((2, 2))), s, {"fc1": {"kernel": True}})


def test_bad_scope():
  with pytest.raises(ValueError, match=r"scope.*'model'"):
    jaxprune.ranked_masks(single(jnp.ones((2, 2))), 0.5, {"fc1": {"kernel": True}},
                             scope="model")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_leaf_names_path(bad, dtype):
  w = np.ones((2, 3), np.float32)
  w[1, 2] = bad
  params = {"blocks": [{"attn": {"output_proj": {"kernel": jnp.asarray(w, dtype)}}}],
            "fc1": {"kernel": jnp.ones((2, 2))}}
  where = jaxprune.select(params)
  with pytest.raises(ValueError, match=re.escape("blocks/0/attn/output_proj/kernel") + ".*NaN"):
    jaxprune.ranked_masks(params, 0.5, where)


def test_previous_of_another_structure():
  params = {"fc1": jnp.ones((2, 2)), "fc2": jnp.ones((2, 2))}
  where = {"fc1": True, "fc2": True}
  with pytest.raises(ValueError, match=r"`previous` has 1 slots but params have 2"):
    jaxprune.ranked_masks(params, 0.5, where, previous={"fc1": jnp.ones((2, 2), bool)})
  other = {"fc1": jnp.ones((2, 2), bool), "out": jnp.ones((2, 2), bool)}
  with pytest.raises(ValueError, match=r"`previous` has a leaf at out where params have fc2"):
    jaxprune.ranked_masks(params, 0.5, where, previous=other)
  with pytest.raises(ValueError, match="`previous` at fc2: mask shape \\(4,\\)"):
    jaxprune.ranked_masks(
        params, 0.5, where, previous={"fc1": jnp.ones((2, 2), bool), "fc2": jnp.ones(4, bool)}
    )


def test_previous_missing_mask_for_selected_leaf():
  params = {"fc1": jnp.ones((2, 2)), "fc2": jnp.ones((2, 2))}
  previous = jaxprune.ranked_masks(params, 0.5, {"fc1": True, "fc2": False})
  with pytest.raises(ValueError, match="no mask for selected leaf fc2"):
    jaxprune.ranked_masks(params, 0.5, {"fc1": True, "fc2": True}, previous=previous)


def test_where_of_another_structure():
  params = {"fc1": jnp.ones((2, 2)), "fc2": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="`where` has 1 slots but params have 2"):
    jaxprune.ranked_masks(params, 0.5, {"fc1": True})
  with pytest.raises(ValueError, match="`where` has 1 slots but params have 2"):
    jaxprune.threshold_masks(params, 0.5, {"fc1": True})


def test_threshold_prunes_subnormal_magnitudes_below_it():
  params = {"fc1": jnp.asarray([[0.0, 1e-39, 1.0, -3e-39]], jnp.float32)}
  masks = jaxprune.threshold_masks(params, 5e-39, {"fc1": True})
  np.testing.assert_array_equal(np.asarray(masks["fc1"]), [[False, False, True, False]])


@pytest.mark.parametrize("scope", ["Layer", "rows", "model"])
def test_ranked_masks_refuses_an_unknown_scope_listing_the_scopes(scope):
  params = {"w": jnp.arange(12.0).reshape(3, 4)}
  with pytest.raises(ValueError, match=r"scope must be 'layer', 'global', 'row', "
                                       r"jaxprune.blocks\(\(b0, b1\)\) or .*" + repr(scope)):
    jaxprune.ranked_masks(params, 0.5, {"w": True}, scope=scope)

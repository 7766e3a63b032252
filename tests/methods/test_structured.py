"""Tests of `nm_masks`, `nm_violations`, `is_nm_sparse` (N:M structured sparsity).

Masks are compared with a NumPy reference: within each group of `m` consecutive
entries along the axis, previously pruned entries rank last, then larger |w|
first, then lower position; the first `n` are kept, intersected with `previous`.

Shapes and patterns come from small fixed sets so that JAX compiles each
computation once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune import is_nm_sparse, nm_masks, nm_violations

SETTINGS = settings(max_examples=25, deadline=None)
RNG = np.random.default_rng(0)  # NumPy data: no jax.random compilations.
# (shape, axis): 2-D kernels (in, out), stacked expert kernels (E, in, out), another axis.
CASES = [((8, 3), -2), ((4, 1), -2), ((2, 8, 5), -2), ((3, 8), -1), ((8, 2, 2), 0)]
PATTERNS = [(2, 4), (1, 4), (3, 8)]


def groups(x: np.ndarray, axis: int, m: int) -> np.ndarray:
  """Rows of length `m`: every group of `m` consecutive entries along `axis`."""
  return np.moveaxis(np.asarray(x), axis, -1).reshape(-1, m)


def ref_nm(w, n, m, axis, previous=None):
  """NumPy reference mask (True = kept), shape of `w`."""
  mag = np.abs(np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64))
  alive = np.ones(mag.shape, bool) if previous is None else np.asarray(previous)
  moved_shape = np.moveaxis(mag, axis, -1).shape
  rows, alive_rows = groups(mag, axis, m), groups(alive, axis, m)
  keep = np.zeros(rows.shape, bool)
  for r, (row, ok) in enumerate(zip(rows, alive_rows)):
    # lexsort: last key is primary: survivors first, then larger |w|, then position.
    order = np.lexsort((np.arange(m), -row, ~ok))
    keep[r, order[:n]] = True
  keep &= alive_rows
  return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def tree(w):
  return {"fc1": {"kernel": w, "bias": jnp.zeros(3)}}


# Many ties (small integers, zeros) or continuous values.
values = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-100, 100, allow_nan=False, width=32),
)


@st.composite
def case(draw, with_previous=False):
  shape, axis = draw(st.sampled_from(CASES))
  n, m = draw(st.sampled_from(PATTERNS))
  if shape[axis] % m:
    m, n = 4, 2  # Every case's axis is a multiple of 4.
  w = draw(hnp.arrays(np.float32, shape, elements=values))
  prev = draw(hnp.arrays(np.bool_, shape)) if with_previous else None
  return w, n, m, axis, prev


# ----------------------------------------------------------------------------- pattern


@SETTINGS
@given(case())
def test_matches_reference_and_keeps_exactly_n_per_group(c):
  w, n, m, axis, _ = c
  params = {"fc1": {"kernel": jnp.asarray(w)}}
  mask = np.asarray(nm_masks(params, n, m, axis=axis)["fc1"]["kernel"])
  np.testing.assert_array_equal(mask, ref_nm(w, n, m, axis))
  assert (groups(mask, axis, m).sum(axis=1) == n).all()
  assert nm_violations({"k": mask}, n, m, axis=axis) == {"k": 0}


@SETTINGS
@given(case(with_previous=True))
def test_previous_stays_pruned(c):
  w, n, m, axis, prev = c
  params = {"fc1": {"kernel": jnp.asarray(w)}}
  previous = {"fc1": {"kernel": jnp.asarray(prev)}}
  mask = np.asarray(nm_masks(params, n, m, axis=axis, previous=previous)["fc1"]["kernel"])
  np.testing.assert_array_equal(mask, ref_nm(w, n, m, axis, prev))
  assert not (mask & ~prev).any()
  # A group keeps min(n, survivors): it prunes at least m - n.
  kept, survivors = groups(mask, axis, m).sum(1), groups(prev, axis, m).sum(1)
  np.testing.assert_array_equal(kept, np.minimum(n, survivors))


def test_keeps_the_largest_and_breaks_ties_by_position():
  w = jnp.array([[4.0, -1.0], [1.0, 2.0], [-3.0, 3.0], [2.0, 0.0]])
  mask = nm_masks(tree(w), 2, 4)["fc1"]["kernel"]
  np.testing.assert_array_equal(mask, [[1, 0], [0, 1], [1, 1], [0, 0]])
  # All equal (zeros included): the first n of every group are kept.
  for fill in (0.0, -1.5):
    mask = nm_masks(tree(jnp.full((8, 3), fill)), 2, 4)["fc1"]["kernel"]
    np.testing.assert_array_equal(mask, np.tile([[1], [1], [0], [0]], (2, 3)).astype(bool))


def test_sparsity_is_exactly_one_minus_n_over_m():
  w = RNG.standard_normal((64, 32), np.float32)
  for n, m in [(2, 4), (1, 4), (3, 8)]:
    masks = nm_masks(tree(w), n, m)
    assert np.asarray(masks["fc1"]["kernel"]).mean() == n / m
    assert masks["fc1"]["bias"] is None


def test_stacked_expert_kernels_group_along_the_input_axis():
  w = RNG.standard_normal((3, 8, 5), np.float32)  # (E, in, out)
  params = {"moe": {"fc1": w}}
  mask = nm_masks(params, 2, 4)["moe"]["fc1"]
  for e in range(3):
    alone = nm_masks({"fc1": w[e]}, 2, 4)["fc1"]
    np.testing.assert_array_equal(mask[e], alone)
  np.testing.assert_array_equal(mask, ref_nm(w, 2, 4, -2))


def test_bfloat16_leaves():
  w = jnp.asarray(RNG.standard_normal((8, 4)), jnp.bfloat16)
  mask = nm_masks(tree(w), 2, 4)["fc1"]["kernel"]
  np.testing.assert_array_equal(mask, ref_nm(w, 2, 4, -2))


# ----------------------------------------------------------------------------- jit


def test_under_jit_matches_eager():
  w = RNG.standard_normal((2, 8, 6), np.float32)
  params = {"blocks": [{"fc1": {"kernel": w}}]}
  where = jaxprune.select(params)
  prev = nm_masks(params, 3, 4, where)
  eager = nm_masks(params, 2, 4, where, previous=prev)
  jitted = jax.jit(lambda p, q: nm_masks(p, 2, 4, where, previous=q))(params, prev)
  leaf = lambda t: t["blocks"][0]["fc1"]["kernel"]
  np.testing.assert_array_equal(leaf(jitted), leaf(eager))
  assert is_nm_sparse(jitted, 2, 4)


# ----------------------------------------------------------------------------- errors


def test_axis_length_not_multiple_of_m_names_the_leaf():
  params = {"blocks": [{"fc1": {"kernel": jnp.ones((6, 4))}}]}
  with pytest.raises(ValueError, match=r"blocks/0/fc1/kernel of shape \(6, 4\).*multiple of m=4"):
    nm_masks(params, 2, 4)
  with pytest.raises(ValueError, match=r"blocks/0/fc1/kernel of shape \(6, 4\)"):
    nm_violations(params, 2, 4)
  # Another axis that divides works.
  assert is_nm_sparse(nm_masks(params, 2, 4, axis=-1), 2, 4, axis=-1)


def test_leaf_without_the_axis_names_the_leaf():
  params = {"fc1": {"kernel": jnp.ones(8)}}
  where = jaxprune.select(params, min_ndim=1)
  with pytest.raises(ValueError, match=r"fc1/kernel of shape \(8,\) has no axis -2"):
    nm_masks(params, 2, 4, where)


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (-1, 2), (2.0, 4), (2, None), (True, 4)])
def test_bad_pattern(n, m):
  with pytest.raises(ValueError, match=r"\bn\b|\bm\b"):
    nm_masks(tree(jnp.ones((8, 3))), n, m)


def test_previous_must_match_params():
  params = tree(jnp.ones((8, 3)))
  with pytest.raises(ValueError, match="previous"):
    nm_masks(params, 2, 4, previous={"fc1": {"kernel": jnp.ones((4, 3), bool), "bias": None}})


def test_non_finite_weights_are_reported_outside_jit():
  w = jnp.ones((8, 3)).at[1, 1].set(jnp.nan)
  with pytest.raises(ValueError, match="fc1/kernel contains NaN"):
    nm_masks(tree(w), 2, 4)


# ----------------------------------------------------------------------------- violations


def test_violations_count_groups_over_n():
  w = np.ones((8, 3), np.float32)
  w[0:4, 0] = [1, 0, 0, 0]  # 1 nonzero: fine for 2:4
  w[4:8, 1] = [1, 1, 0, 0]  # 2: fine
  # Every other group has 3 or 4 nonzeros.
  w[4:8, 2] = [1, 1, 1, 0]
  params = tree(jnp.asarray(w))
  assert nm_violations(params, 2, 4) == {"fc1/kernel": 4}
  assert not is_nm_sparse(params, 2, 4)
  assert nm_violations(params, 3, 4) == {"fc1/kernel": 3}
  masks = nm_masks(params, 2, 4)
  assert nm_violations(masks, 2, 4) == {"fc1/kernel": 0}  # A mask tree: its masks.
  assert is_nm_sparse(jaxprune.apply_masks(params, masks), 2, 4)


def test_violations_where_on_a_mask_tree_with_nones():
  params = {"fc1": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)}, "fc2": jnp.ones((4, 4))}
  where = jaxprune.select(params)
  masks = {"fc1": {"kernel": np.ones((8, 3), bool), "bias": None}, "fc2": np.ones((4, 4), bool)}
  assert set(nm_violations(masks, 2, 4)) == {"fc1/kernel", "fc2"}
  only_fc2 = jax.tree.map(lambda s: False, where) | {"fc2": True}
  counts = nm_violations(masks, 2, 4, only_fc2)
  assert list(counts) == ["fc2"] and counts["fc2"] > 0

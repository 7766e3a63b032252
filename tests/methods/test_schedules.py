"""Tests of the sparsity schedules."""

from __future__ import annotations

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune

SETTINGS = settings(max_examples=60, deadline=None)

targets = st.floats(0.0, 0.999, allow_nan=False)
positive_targets = st.floats(1e-4, 0.999, allow_nan=False)
iterations = st.integers(1, 40)


# ----------------------------------------------------------------------------- exponential


def test_exponential_docstring_example():
  assert list(jaxprune.schedules.exponential_targets(0.2, 0.8, 3)) == pytest.approx([0.2, 0.4, 0.8])


def test_exponential_formula_len_iter_call():
  s = jaxprune.schedules.exponential_targets(0.1, 0.9, 5)
  expected = [0.1 * 9 ** (i / 4) for i in range(5)]
  assert len(s) == 5
  assert list(s) == pytest.approx(expected, rel=1e-12)
  assert [s(i) for i in range(5)] == pytest.approx(expected, rel=1e-12)
  assert [s[i] for i in range(5)] == pytest.approx(expected, rel=1e-12)
  assert s[-1] == s(4) and s[-5] == s(0)
  assert s[1:3] == pytest.approx(expected[1:3], rel=1e-12)
  # Constant ratio between consecutive targets.
  ratios = [b / a for a, b in zip(s, list(s)[1:])]
  assert ratios == pytest.approx([9 ** 0.25] * 4, rel=1e-12)
  assert "ExponentialTargets" in repr(s) and "0.9000" in repr(s)


def test_exponential_endpoints_are_exact():
  # The formula alone gives 0.7000000000000001 for the last target here.
  for initial, final, n in [(0.3, 0.7, 2), (0.15, 0.7, 5), (0.45, 0.95, 7), (0.1, 0.99, 3)]:
    s = jaxprune.schedules.exponential_targets(initial, final, n)
    assert s(0) == initial
    assert s(n - 1) == final
    assert list(s)[-1] == final
    assert s[-1] == final


def test_single_iteration_is_final():
  for make in [jaxprune.schedules.exponential_targets, jaxprune.schedules.geometric_keep_targets,
               jaxprune.schedules.polynomial_targets]:
    s = make(0.2, 0.6, 1)
    assert len(s) == 1 and list(s) == [0.6] and s(0) == 0.6


def test_call_out_of_range():
  s = jaxprune.schedules.exponential_targets(0.2, 0.8, 3)
  with pytest.raises(IndexError, match=r"iteration 3 outside 0\.\.2"):
    s(3)
  with pytest.raises(IndexError, match=r"iteration -1 outside 0\.\.2"):
    s(-1)
  with pytest.raises(IndexError):
    s[-4]


def test_traced_iteration_under_jit():
  s = jaxprune.schedules.exponential_targets(0.2, 0.8, 5)
  f = jax.jit(s)
  got = [float(f(jnp.int32(i))) for i in range(5)]
  assert got == pytest.approx(list(s), rel=1e-6)
  g = jaxprune.schedules.geometric_keep_targets(0.2, 0.8, 5)
  assert [float(jax.jit(g)(jnp.int32(i))) for i in range(5)] == pytest.approx(list(g), rel=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0.0, 0.8, 3), "initial must be in (0, 1), got 0.0"),
        ((-0.1, 0.8, 3), "initial must be in (0, 1), got -0.1"),
        ((0.9, 0.8, 3), "initial (0.9) must not exceed final (0.8)"),
        ((0.2, 1.0, 3), "final must be in [0, 1), got 1.0"),
        ((0.2, 1.5, 3), "final must be in [0, 1), got 1.5"),
        ((0.2, 0.8, 0), "num_iterations must be an integer >= 1, got 0"),
        ((0.2, 0.8, -2), "num_iterations must be an integer >= 1, got -2"),
        ((0.2, 0.8, 2.5), "num_iterations must be an integer >= 1, got 2.5"),
        ((float("nan"), 0.8, 3), "initial must be in (0, 1), got nan"),
        ((0.2, float("nan"), 3), "final must be in [0, 1), got nan"),
    ],
)
def test_exponential_bad_arguments(args, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    jaxprune.schedules.exponential_targets(*args)


@SETTINGS
@given(a=positive_targets, b=positive_targets, n=iterations)
def test_exponential_property(a, b, n):
  initial, final = min(a, b), max(a, b)
  s = jaxprune.schedules.exponential_targets(initial, final, n)
  values = list(s)
  assert len(values) == len(s) == n
  assert values[-1] == final
  if n > 1:
    assert values[0] == initial
  for i, v in enumerate(values[:-1] if n > 1 else []):
    assert v == pytest.approx(initial * (final / initial) ** (i / (n - 1)), rel=1e-12)
  assert all(x <= y for x, y in itertools.pairwise(values))  # non-decreasing
  assert all(initial <= v <= final for v in values)
  assert all(0 < v < 1 for v in values)


# ----------------------------------------------------------------------------- geometric, cubic


def test_geometric_keep_docstring_and_formula():
  s = jaxprune.schedules.geometric_keep_targets(0.2, 0.8, 3)
  assert [round(v, 3) for v in s] == [0.2, 0.6, 0.8]
  s = jaxprune.schedules.geometric_keep_targets(0.0, 0.9, 4)
  keep = [1 - v for v in s]
  assert keep == pytest.approx([1.0, 0.1 ** (1 / 3), 0.1 ** (2 / 3), 0.1], rel=1e-12)


def test_cubic_docstring_and_formula():
  s = jaxprune.schedules.polynomial_targets(0.0, 0.8, 3)
  assert [round(v, 3) for v in s] == [0.0, 0.7, 0.8]
  s = jaxprune.schedules.polynomial_targets(0.1, 0.9, 5)
  assert list(s) == pytest.approx([0.9 - 0.8 * (1 - i / 4) ** 3 for i in range(5)], rel=1e-12)


@pytest.mark.parametrize("make", [jaxprune.schedules.geometric_keep_targets,
                                  jaxprune.schedules.polynomial_targets])
def test_geometric_and_cubic_bad_arguments(make):
  make(0.0, 0.5, 2)  # initial 0 is allowed here
  with pytest.raises(ValueError, match=re.escape("initial must be in [0, 1), got -0.5")):
    make(-0.5, 0.5, 2)
  with pytest.raises(ValueError, match=re.escape("final must be in [0, 1), got 1.0")):
    make(0.0, 1.0, 2)
  with pytest.raises(ValueError, match=re.escape("initial (0.6) must not exceed final (0.5)")):
    make(0.6, 0.5, 2)
  with pytest.raises(ValueError, match=re.escape("num_iterations must be an integer >= 1")):
    make(0.1, 0.5, 0)


@SETTINGS
@given(a=targets, b=targets, n=iterations,
       make=st.sampled_from([jaxprune.schedules.geometric_keep_targets,
                             jaxprune.schedules.polynomial_targets]))
def test_geometric_and_cubic_property(a, b, n, make):
  initial, final = min(a, b), max(a, b)
  values = list(make(initial, final, n))
  assert len(values) == n and values[-1] == final
  if n > 1:
    assert values[0] == initial
  # Non-decreasing and within [initial, final], up to rounding of the formula.
  assert all(x <= y + 1e-15 for x, y in itertools.pairwise(values))
  assert all(initial - 1e-15 <= v <= final + 1e-15 for v in values)


def test_polynomial_targets_take_a_power():
  s = jaxprune.schedules.polynomial_targets(0.2, 0.6, 3, power=1)
  assert list(s) == pytest.approx([0.2, 0.4, 0.6], rel=1e-12)
  s = jaxprune.schedules.polynomial_targets(0.2, 0.6, 3, power=2)
  assert s(1) == pytest.approx(0.6 - 0.4 * 0.25, rel=1e-12)
  for bad in (0, -1.0, True, "3"):
    with pytest.raises(ValueError, match=re.escape(f"power must be a number > 0, got {bad!r}")):
      jaxprune.schedules.polynomial_targets(0.0, 0.5, 3, power=bad)


# ----------------------------------------------------------------------------- step schedules
# A sparsity that moves with the step is an optax schedule (the docs' recipe): these
# pin the mapping the docs give for Zhu & Gupta's ramp and its use in-graph.


def zhu_gupta(initial, final, begin, end, power=3):
  return optax.polynomial_schedule(init_value=initial, end_value=final, power=power,
                                   transition_steps=end - begin, transition_begin=begin)


def test_optax_polynomial_schedule_is_zhu_and_gupta():
  s = zhu_gupta(0.0, 0.9, 100, 1100)
  assert float(s(600)) == pytest.approx(0.7875, rel=1e-6)
  assert float(s(0)) == 0.0 and float(s(100)) == 0.0
  assert float(s(1100)) == pytest.approx(0.9) and float(s(5000)) == pytest.approx(0.9)
  t = np.arange(0, 1300, 50)
  values = np.asarray([float(s(int(x))) for x in t])
  p = np.clip((t - 100) / 1000, 0, 1)
  np.testing.assert_allclose(values, 0.9 - 0.9 * (1 - p) ** 3, rtol=1e-6, atol=1e-7)
  assert np.all(np.diff(values) >= 0)


def test_a_step_schedule_is_a_traced_sparsity_under_jit():
  s = zhu_gupta(0.0, 0.8, 10, 30)
  w = {"fc1": jnp.arange(1.0, 11.0).reshape(2, 5)}
  masks = jax.jit(lambda p, t: jaxprune.ranked_masks(p, s(t), {"fc1": True}))(w, 30)
  assert int((~masks["fc1"]).sum()) == 8


@SETTINGS
@given(a=targets, b=targets, begin=st.integers(0, 100), length=st.integers(1, 100),
       power=st.sampled_from([1, 2, 3, 0.5]), step=st.integers(0, 300))
def test_zhu_gupta_property(a, b, begin, length, power, step):
  initial, final = min(a, b), max(a, b)
  s = zhu_gupta(initial, final, begin, begin + length, power=power)
  p = min(max((step - begin) / length, 0.0), 1.0)
  expected = final + (initial - final) * (1 - p) ** power
  got = float(s(step))
  assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)
  assert initial - 1e-6 <= got <= final + 1e-6


@pytest.mark.parametrize("value", [1.0, -0.25, float("nan")])
def test_pruned_refuses_a_step_schedule_starting_outside_0_1(value):
  with pytest.raises(ValueError, match=r"schedule\(0\) must be a scalar sparsity in \[0, 1\)"):
    jaxprune.gradually_pruned(optax.sgd(0.1), where={"w": True}, update_every=1,
                              schedule=optax.constant_schedule(value))

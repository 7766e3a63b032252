"""Issue 27, cases 8 and 9: patterns that match nothing and concrete values out of
range are refused before compute; messages name the argument, the value and what
it may be."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune

RNG = np.random.default_rng(0)
PARAMS = {"fc1": {"kernel": jnp.asarray(RNG.standard_normal((8, 16)), jnp.float32)},
          "fc2": {"kernel": jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)}}
WHERE = {"fc1": {"kernel": True}, "fc2": {"kernel": True}}


def _apply(p, x):
  return jnp.tanh(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]


def _pruned_counts(masks):
  return {k: int((~v["kernel"]).sum()) for k, v in masks.items()}


# Case 8: patterns and values that match nothing or are out of range.

@pytest.mark.parametrize("make", [jaxprune.distributions.erk, jaxprune.distributions.uniform],
                         ids=["erk", "uniform"])
def test_a_fixed_pattern_matching_no_leaf_is_refused(make):
  # Before: the typo was ignored and every leaf pruned to the target.
  target = jaxprune.Prune(0.5, distribution=make(fixed={"fc3/kernel": 0.0}))
  with pytest.raises(ValueError, match=re.escape(
      "fixed: the pattern 'fc3/kernel' matches no selected leaf (selected: fc1/kernel, "
      "fc2/kernel)")):
    target.masks(PARAMS, WHERE)


@pytest.mark.parametrize("value, shown", [
    (jnp.array(1.5), "1.5"), (jnp.array(jnp.nan), "nan"), (np.float64(1.5), "1.5"),
    (np.float32(np.nan), "nan"), (jnp.array(-0.1), "-0.1")])
def test_a_by_path_rule_returning_a_concrete_array_or_numpy_scalar_is_range_checked(value,
                                                                                   shown):
  # Before: a JAX array passed unchecked (1.5 pruned all, NaN none).
  target = jaxprune.Prune(0.5, distribution=jaxprune.distributions.by_path(lambda path, shape,
                                                                           s: value))
  with pytest.raises(ValueError, match=rf"by_path: the sparsity of fc1/kernel is {shown}\S*, "
                                       r"not in \[0, 1\]"):
    target.masks(PARAMS, WHERE)


def test_a_by_path_rule_returning_a_numpy_scalar_prunes_as_a_float():
  # Before: np.float32(0.5) was refused as "not a number".
  for value in (np.float32(0.5), np.int64(0), jnp.array(0.5), 0.5):
    rule = jaxprune.distributions.by_path(lambda path, shape, s, value=value: value)
    target = jaxprune.Prune(0.5, distribution=rule)
    half = float(value) == 0.5
    assert _pruned_counts(target.masks(PARAMS, WHERE)) == (
        {"fc1": 64, "fc2": 32} if half else {"fc1": 0, "fc2": 0}), value


@pytest.mark.parametrize("value", [jnp.array(1.5), jnp.array(jnp.nan), jnp.array(-1.0)])
def test_drop_and_grow_refuses_a_concrete_array_out_of_range(value):
  # Before: DropAndGrow(jnp.array(1.5)) was accepted. A traced fraction, or a
  # concrete one in range, still moves weights.
  start = jaxprune.ranked_masks(PARAMS, 0.5, WHERE)

  def kept(d):
    target = jaxprune.sparse_training.DropAndGrow(d, jaxprune.scores.random_score(1))
    moved = target.masks(PARAMS, WHERE, start)
    return jnp.sum(moved["fc1"]["kernel"])

  assert int(jax.jit(kept)(value)) == 64
  assert int(kept(jnp.array(0.25))) == int(kept(np.float32(0.25))) == 64
  with pytest.raises(ValueError, match=r"drop_fraction = Array\(.*: a fraction of the kept "
                                       r"weights in \[0, 1\]"):
    jaxprune.sparse_training.DropAndGrow(value, jaxprune.scores.random_score(0))


# Case 9: messages that name the argument and its valid values.

@pytest.mark.parametrize("sequential", [False, True], ids=["sparsegpt", "sparsegpt_sequential"])
@pytest.mark.parametrize("kwargs, message", [
    ({"block": 0}, "block (columns per lazy update) must be an integer >= 1, got 0"),
    ({"block": -8}, "block (columns per lazy update) must be an integer >= 1, got -8"),
    ({"block": 2.5}, "block (columns per lazy update) must be an integer >= 1, got 2.5"),
    ({"damp": "0.01"}, "damp (the dampening fraction of the mean Hessian diagonal) must be a "
                       "finite real number >= 0, e.g. 0.01, got '0.01'"),
    ({"damp": -1.0}, "damp (the dampening fraction of the mean Hessian diagonal) must be a "
                     "finite real number >= 0, e.g. 0.01, got -1.0"),
], ids=["block=0", "block=-8", "block=2.5", "damp='0.01'", "damp=-1"])
def test_sparsegpt_names_a_bad_block_or_damp_before_any_compute(kwargs, message, sequential):
  # Before: "range() arg 3 must not be zero", "Need at least one array to
  # concatenate", raw TypeErrors.
  def stage(p, x):
    raise AssertionError("a stage ran before the settings were checked")

  with pytest.raises(ValueError, match=re.escape(f"sparsegpt {message}")):
    if sequential:
      jaxprune.oneshot.sparsegpt_sequential([stage], PARAMS, [jnp.ones((4, 8))], 0.5, WHERE,
                                            **kwargs)
    else:
      stats = jaxprune.oneshot.input_statistics(_apply, PARAMS, [jnp.ones((4, 8))], WHERE,
                                                gram=True)
      jaxprune.oneshot.sparsegpt(PARAMS, stats, 0.5, WHERE, **kwargs)


def test_a_gradual_schedule_may_return_an_n_m_string():
  # Before: "could not convert string to float: '2:4'".
  tx = jaxprune.gradually_pruned(optax.sgd(0.1), where=WHERE, schedule=lambda count: "2:4",
                                 update_every=1)
  state = tx.init(PARAMS)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
  kept = np.asarray(jaxprune.get_masks(state)["fc1"]["kernel"]).reshape(2, 4, 16).sum(axis=1)
  assert (kept == 2).all()


@pytest.mark.parametrize("entry, message", [
    ("abc", "schedule(0) = 'abc' is neither a sparsity (a number), 'n:m', nor a target"),
    ("0.5", "schedule(0) = '0.5' is neither a sparsity (a number), 'n:m', nor a target"),
    ("3:2", "schedule(0) = '3:2': an N:M pattern needs 0 < n < m, got n=3, m=2"),
    (jaxprune.NM(3, 2), "schedule(0) = NM(n=3, m=2, axis=None, score=None): an N:M pattern "
                        "needs 0 < n < m, got n=3, m=2"),
], ids=["abc", "'0.5'", "'3:2'", "NM(3, 2)"])
def test_a_gradual_schedule_returning_a_bad_string_or_pattern_is_named(entry, message):
  # Before: "could not convert string to float", and NM(3, 2) reported as "got -0.5".
  with pytest.raises(ValueError, match=re.escape(message)):
    jaxprune.gradually_pruned(optax.sgd(0.1), where=WHERE, schedule=lambda count: entry,
                              update_every=1)


STRUCTURED = ("scope must be 'layer', 'global', 'row', jaxprune.blocks((b0, b1)) or "
              "jaxprune.channels(axis), got ")


@pytest.mark.parametrize("call, message", [
    (lambda: jaxprune.Prune(0.5, scope="rows"), STRUCTURED + "'rows'"),
    (lambda: jaxprune.ranked_masks(PARAMS, 0.5, WHERE, scope="glob"), STRUCTURED + "'glob'"),
    (lambda: jaxprune.gradually_pruned(optax.sgd(0.1), where=WHERE, update_every=1,
                                       schedule=lambda c: jaxprune.Prune(0.5, scope="rows")),
     STRUCTURED + "'rows'"),
], ids=["Prune", "ranked_masks", "pruned"])
def test_a_scope_typo_lists_the_scopes_of_its_entry_point(call, message):
  # Before: "scope must be 'layer' or 'global'" everywhere (Prune only when ranking).
  with pytest.raises(ValueError, match=re.escape(message)):
    call()


@pytest.mark.parametrize("seed, shown", [
    (0.5, "0.5 (float)"), (True, "True (bool)"), ("0", "'0' (str)"),
    (jnp.array(3.0), "Array(3., dtype=float32, weak_type=True) (ArrayImpl)")])
def test_random_score_refuses_a_seed_that_is_not_an_integer(seed, shown):
  # Before: "PRNG key seed must be an integer; got JitTracer(~float32[])". Integer
  # seeds (NumPy, JAX, traced) and keys are still taken.
  want = jax.random.key_data(jaxprune.scores.random_score(3).key)
  for good in (np.int32(3), jnp.array(3), jax.random.key(3)):
    np.testing.assert_array_equal(jax.random.key_data(jaxprune.scores.random_score(good).key), want)
  traced = jax.jit(lambda s: jax.random.key_data(jaxprune.scores.random_score(s).key))(jnp.int32(3))
  np.testing.assert_array_equal(traced, want)
  with pytest.raises(ValueError, match=re.escape(
      f"random_score's seed must be an integer or a PRNG key (jax.random.key(0)), got {shown}")):
    jaxprune.scores.random_score(seed)


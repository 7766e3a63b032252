"""Pruning methods as values: `Prune`, `NM`, the `Target` protocol, `as_target`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def make_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.zeros(16)},
          "fc2": {"kernel": jax.random.normal(k[1], (16, 4))}}


def assert_masks_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def mlp_loss(p, batch):
  return jnp.mean((jnp.tanh(batch @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]) ** 2)


def prune_retrain_counting_compiles(params, schedule):
  """`prune_retrain` on `mlp_loss` with one step per target: (result, compiled fun names)."""
  x = jax.random.normal(jax.random.key(5), (8, 8))
  compiled = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name", ""))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    result = jaxprune.prune_retrain(
        params, mlp_loss, lambda step: x, [x], optimizer=optax.adam(1e-3), targets=schedule,
        where=jaxprune.select(params), retrain_steps=1, hooks=[])
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return result, compiled


def test_targets_compute_what_the_pure_functions_compute():
  params = make_params()
  where = jaxprune.select(params)
  for scope in ("layer", "global"):
    assert_masks_equal(jaxprune.Prune(0.6, scope=scope).masks(params, where),
                       jaxprune.ranked_masks(params, 0.6, where, scope=scope))
  first = jaxprune.ranked_masks(params, 0.3, where)
  assert_masks_equal(jaxprune.NM(2, 4).masks(params, where, previous=first),
                     jaxprune.nm_masks(params, 2, 4, where, previous=first))
  assert_masks_equal(jaxprune.NM(1, 4, axis=-1).masks(params, where),
                     jaxprune.nm_masks(params, 1, 4, where, axis=-1))
  assert jaxprune.NM(2, 4).sparsity == 0.5 and jaxprune.NM(1, 8).sparsity == 0.875


@pytest.mark.parametrize("entry, expected", [
    (0.5, jaxprune.Prune(0.5)),
    (np.float32(0.25), jaxprune.Prune(0.25)),
    (0, jaxprune.Prune(0.0)),
    ("2:4", jaxprune.NM(2, 4)),
    (jaxprune.NM(1, 4, axis=-1), jaxprune.NM(1, 4, axis=-1)),
    (jaxprune.Prune(0.9, scope="global"), jaxprune.Prune(0.9, scope="global")),
])
def test_as_target(entry, expected):
  # A target entry of `prune_retrain` is read as the expected target: its name and
  # nominal sparsity in the history, and its masks.
  params = make_params()
  result, _ = prune_retrain_counting_compiles(params, [entry])
  record = result.history[0]
  assert (record.target, record.target_sparsity) == (str(expected), expected.sparsity)
  assert_masks_equal(result.masks, expected.masks(params, jaxprune.select(params)))


@pytest.mark.parametrize("entry, message", [
    ("0.5", "neither a sparsity"), (True, "neither a sparsity"), (None, "neither a sparsity"),
    (1.0, r"outside \[0, 1\)"), (-0.1, r"outside \[0, 1\)"), ("4:2", "0 < n < m"),
    ("2-4", "neither a sparsity"), ("a:b", "looks like '2:4'"),
    (jaxprune.Prune(1.5), r"outside \[0, 1\)"), (jaxprune.Prune("0.5"), "real number"),
    (jaxprune.NM(4, 4), "0 < n < m"),
])
def test_as_target_refuses_bad_entries_naming_them(entry, message):
  params = make_params()
  x = jnp.ones((8, 8))
  with pytest.raises(ValueError, match=message) as raised:
    jaxprune.prune_retrain(params, mlp_loss, lambda step: x, [x], optimizer=optax.sgd(0.1),
                           targets=[0.1, 0.2, 0.3, entry], where=jaxprune.select(params),
                           retrain_steps=1, hooks=[])
  assert "targets[3]" in str(raised.value)


def test_targets_are_pytrees_with_the_sparsity_traced():
  params = make_params()
  where = jaxprune.select(params)
  traces = []

  @jax.jit
  def masks_for(target):
    traces.append(1)
    return target.masks(params, where)

  for s in (0.25, 0.5, 0.75):
    got = masks_for(jaxprune.Prune(jnp.float32(s)))
    assert_masks_equal(got, jaxprune.ranked_masks(params, s, where))
  assert len(traces) == 1
  assert jax.tree.leaves(jaxprune.NM(2, 4)) == []


@dataclasses.dataclass(frozen=True)
class KeepFirstRows:
  """A user's own method (not a pytree): prune every row of each leaf past `rows`."""

  rows: int

  @property
  def sparsity(self) -> float:
    return 0.5

  def masks(self, params, where, previous=None):
    where = where(params) if callable(where) else where  # a bool tree, or a builder of one
    masks = jax.tree.map(
        lambda w, f: jnp.broadcast_to(jnp.arange(w.shape[0])[:, None] < self.rows, w.shape)
        if f else None, params, where)
    if previous is not None:
      masks = jax.tree.map(lambda a, b: a & b, masks, previous)
    return masks


def test_a_users_target_plugs_into_prune_step_and_the_loop():
  params = make_params()
  where = jaxprune.select(params)
  assert isinstance(KeepFirstRows(4), jaxprune.Target)
  opt_state = jaxprune.pruned(optax.sgd(0.1), jaxprune.ranked_masks(params, 0.0, where)).init(
      params)
  new, opt_state = jaxprune.prune_step(params, opt_state, KeepFirstRows(4), where)
  masks = jaxprune.get_masks(opt_state)
  assert int(masks["fc1"]["kernel"].sum()) == 4 * 16
  np.testing.assert_array_equal(new["fc1"]["kernel"][4:], 0.0)

  x = jax.random.normal(jax.random.key(5), (8, 8))
  result = jaxprune.prune_retrain(
      params, mlp_loss, lambda step: x, [x], optimizer=optax.adam(1e-3),
      targets=[0.25, KeepFirstRows(4)], where=where, retrain_steps=2, hooks=[])
  assert [r.target for r in result.history] == ["25.00%", str(KeepFirstRows(4))]
  kernel = np.asarray(result.params["fc1"]["kernel"])
  np.testing.assert_array_equal(kernel[4:], 0.0)


def test_loop_compiles_one_prune_step_for_every_magnitude_sparsity():
  result, compiled = prune_retrain_counting_compiles(
      make_params(), [0.2, jaxprune.Prune(0.4), 0.6, "1:4"])
  # One program for all three magnitude targets, one for the 1:4 pattern.
  assert compiled.count("jit(prune_step)") == 2
  assert compiled.count("jit(step)") == 1
  assert jaxprune.is_nm_sparse(result.masks, 1, 4)
  assert [r.target_sparsity for r in result.history] == [0.2, 0.4, 0.6, 0.75]


def test_gradual_pruned_takes_targets_from_its_schedule():
  params = make_params()
  where = jaxprune.select(params)
  poly = optax.polynomial_schedule(init_value=0.0, end_value=0.75, power=3, transition_steps=4)
  tx = jaxprune.gradually_pruned(optax.sgd(0.0), where=where, update_every=2,
                                 schedule=lambda c: jaxprune.Prune(poly(c), scope="global"))
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(tx.update)
  for _ in range(5):
    _, state = update(zeros, state, params)
  masks = jaxprune.get_masks(state)
  assert_masks_equal(masks, jaxprune.ranked_masks(params, 0.75, where, scope="global"))

  nm = jaxprune.gradually_pruned(optax.sgd(0.0), where=where, update_every=1,
                                 schedule=lambda c: jaxprune.NM(2, 4))
  _, nm_state = jax.jit(nm.update)(zeros, nm.init(params), params)
  assert jaxprune.is_nm_sparse(jaxprune.get_masks(nm_state), 2, 4)


def test_prune_step_under_jit_takes_a_traced_float_sparsity():
  params = make_params()
  where = jaxprune.select(params)
  state = jaxprune.pruned(optax.sgd(0.1), jaxprune.ranked_masks(params, 0.0, where)).init(
      params)
  step = jax.jit(lambda p, s, o: jaxprune.prune_step(p, o, s, where))
  for s in (0.25, 0.5):
    _, pruned_state = step(params, jnp.float32(s), state)
    assert_masks_equal(jaxprune.get_masks(pruned_state),
                       jaxprune.ranked_masks(params, s, where))
  # A concrete array sparsity is read as `Prune` of it (a traced one would be named so).
  record = prune_retrain_counting_compiles(params, [jnp.float32(0.5)])[0].history[0]
  assert (record.target, record.target_sparsity) == ("50.00%", 0.5)
  # Concrete sparsities are stored as Python floats (JSON-able history, exact fingerprints):
  # a `Prune` (here one that records what its masks are computed with) gets a float.
  seen = []

  class RecordingPrune(jaxprune.Prune):
    def masks(self, params, where, previous=None):
      seen.append(self.sparsity)
      return super().masks(params, where, previous)

  jaxprune.prune_step(params, state, RecordingPrune(np.float32(0.5)), where)
  assert [type(s) for s in seen] == [float]


def test_nm_targets_compile_once_across_iterations():
  _, compiled = prune_retrain_counting_compiles(make_params(), ["2:4", "2:4", jaxprune.NM(2, 4)])
  assert compiled.count("jit(prune_step)") == 1


def test_target_names_say_what_ranks():
  assert str(jaxprune.Prune(0.5, score=jaxprune.scores.random_score(0))) == "50.00% random"
  normalized = jaxprune.Prune(0.5, score=jaxprune.scores.normalized_score())
  assert str(normalized) == "50.00% normalized magnitude"
  assert str(jaxprune.NM(2, 4, score=jaxprune.scores.given_score({}))) == "2:4 given scores"
  assert str(jaxprune.sparse_training.DropAndGrow(0.3, jaxprune.scores.gradient_score())) == \
      "drop and grow 30%, regrown by |grad|"


def test_a_scope_where_the_score_goes_is_refused_naming_the_keyword():
  # `Magnitude(s, "global")` took the scope second; `Prune`'s second field is the score.
  with pytest.raises(TypeError, match=r"got 'global'; a scope is a keyword: Prune\(s, scope=...\)"):
    jaxprune.Prune(0.5, "global")

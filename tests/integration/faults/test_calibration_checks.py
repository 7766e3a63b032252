"""Issue 27, case 7: calibration statistics are checked against the params before
`sparsegpt`, `sparsegpt_sequential` or Wanda compute anything from them; each
refusal names the leaf (or stacked layer) and the offending value."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.oneshot import InputStatistics

RNG = np.random.default_rng(0)
PARAMS = {"fc": {"kernel": jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32)}}
WHERE = {"fc": {"kernel": True}}
X = jnp.asarray(RNG.standard_normal((16, 8)), jnp.float32)
LAYERS = {"stack": jnp.asarray(RNG.standard_normal((4, 8, 8)), jnp.float32)}


def _apply(p, x):
  return x @ p["fc"]["kernel"]


def _scanned(p, x):
  return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])[0]


def _stats(x):
  return jaxprune.oneshot.input_statistics(_apply, PARAMS, [x], WHERE, gram=True)


def _sparsegpt(params, stats, where):
  return jaxprune.oneshot.sparsegpt(params, stats, 0.5, where, block=4)


def _wanda(params, stats, where):
  return jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(params,
                                                                                          where)


def _wanda_jit(params, stats, where):
  target = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row")
  return jax.jit(lambda p, t: t.masks(p, where))(params, target)


METHODS = {"sparsegpt": _sparsegpt, "wanda": _wanda}


def _with(stats, path, **fields):
  return InputStatistics({path: stats.leaves[path]._replace(**fields)}, {})


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt_sequential", "wanda"])
def test_all_zero_inputs_are_refused_naming_the_leaf(method):
  # Before: sparsegpt returned a 100%-zero kernel with masks keeping 50%; Wanda
  # pruned by position. Real inputs still prune half.
  if method == "wanda":
    assert int(_wanda_jit(PARAMS, _stats(X), WHERE)["fc"]["kernel"].sum()) == 16
  else:
    new, masks = _sparsegpt(PARAMS, _stats(X), WHERE)
    assert int(masks["fc"]["kernel"].sum()) == int((new["fc"]["kernel"] != 0).sum()) == 16
  zeros = jnp.zeros((16, 8))
  with pytest.raises(ValueError, match=r"inputs of fc/kernel are all zero on the calibration "
                                       r"data \(sq_norms all 0\.0\)"):
    if method == "sparsegpt_sequential":
      jaxprune.oneshot.sparsegpt_sequential([lambda p, x: jnp.tanh(_apply(p, x))], PARAMS, [zeros],
                                    0.5, WHERE, block=4)
    else:
      METHODS[method](PARAMS, _stats(zeros), WHERE)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "wanda under jit"])
def test_a_batch_of_zero_rows_is_refused_naming_the_leaf(method):
  empty = _stats(jnp.zeros((0, 8)))
  assert empty.leaves["fc/kernel"].rows == 0
  run = {**METHODS, "wanda under jit": _wanda_jit}[method]
  with pytest.raises(ValueError, match=r"input statistics of fc/kernel saw 0 rows"):
    run(PARAMS, empty, WHERE)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "wanda under jit"])
@pytest.mark.parametrize("layers", [3, 1])
def test_statistics_of_another_stack_length_are_refused(method, layers):
  # Before: 3 layers of statistics on 4 reused layer 2's Gram for layer 3 (an index
  # clamp), and 1 layer was broadcast to all 4.
  stats = jaxprune.oneshot.input_statistics(_scanned, {"stack": LAYERS["stack"][:layers]}, [X],
                                    {"stack": True}, gram=True)
  run = {**METHODS, "wanda under jit": _wanda_jit}[method]
  with pytest.raises(ValueError, match=rf"input statistics of stack are of {layers} stacked "
                                       rf"layers \(sq_norms shape \({layers}, 8\)\), the leaf "
                                       rf"has 4 \(shape \(4, 8, 8\)"):
    run(LAYERS, stats, {"stack": True})


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_size_one_statistics_are_not_broadcast(method):
  stats = _stats(X)
  one = _with(stats, "fc/kernel", sq_norms=jnp.ones(1), gram=jnp.ones((1, 1)))
  with pytest.raises(ValueError, match=r"input statistics of fc/kernel do not fit it: sq_norms "
                                       r"has shape \(1,\), the leaf of shape \(8, 4\) needs "
                                       r"\(8,\) \(a statistic of size 1 is not broadcast\)"):
    METHODS[method](PARAMS, one, WHERE)


@pytest.mark.parametrize("method, field, shape", [
    ("sparsegpt", "sq_norms", (6,)), ("sparsegpt", "gram", (6, 6)), ("wanda", "sq_norms", (6,))])
def test_statistics_of_another_shape_are_refused_naming_the_leaf(method, field, shape):
  # Before: raw reshape or broadcasting errors that named no leaf.
  bad = _with(_stats(X), "fc/kernel", **{field: jnp.ones(shape)})
  want = {"sq_norms": (8,), "gram": (8, 8)}[field]
  with pytest.raises(ValueError, match=re.escape(
      f"input statistics of fc/kernel do not fit it: {field} has shape {shape}, the leaf of "
      f"shape (8, 4) needs {want}")):
    METHODS[method](PARAMS, bad, WHERE)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_one_stacked_layer_with_all_zero_inputs_is_named(method):
  stats = jaxprune.oneshot.input_statistics(_scanned, LAYERS, [X], {"stack": True}, gram=True)
  s = stats.leaves["stack"]
  dead = _with(stats, "stack", sq_norms=s.sq_norms.at[2].set(0.0), gram=s.gram.at[2].set(0.0))
  with pytest.raises(ValueError, match=r"inputs of stack\[2\] are all zero"):
    METHODS[method](LAYERS, dead, {"stack": True})


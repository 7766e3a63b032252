"""Row scope on each leaf's own input axes (issue 28, item 2).

Wanda's comparison group is one output neuron: the weights of every input feature
that neuron reads. On kernels of any layout (`(d, heads, head_dim)` q/k/v,
`(heads, head_dim, d)` attention outputs, gemma's `(2, hidden, d)` gating kernel
contracted on its last axis, `(in, out)` and `(out, in)` matrices) one call must
give every output neuron exactly `round(s * fan_in)` pruned inputs, the lowest
scores among them: checked against a NumPy reference per neuron, for Wanda (the
axes from its statistics) and for magnitudes ranked by `weight_layouts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_references import reference_row_masks

import jaxprune
from jaxprune.tree import weight_layouts

SHAPES = {"q": (8, 2, 4), "o": (2, 4, 8), "gating": (2, 16, 8), "linear": (16, 8),
          "eqx": (8, 8)}
INPUTS = {"q": (0,), "o": (0, 1), "gating": (2,), "linear": (0,), "eqx": (1,)}


def make_params(seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {name: jax.random.normal(k, shape) for k, (name, shape) in zip(keys, SHAPES.items())}


def apply_fn(p, x):
  h = jnp.einsum("td,dhk->thk", x, p["q"])
  x = x + jnp.einsum("thk,hkd->td", h, p["o"])
  g = jnp.einsum("td,chd->tch", x, p["gating"])
  x = x + (jax.nn.gelu(g[:, 0]) * g[:, 1]) @ p["linear"]
  return x @ p["eqx"].T


@pytest.fixture(scope="module")
def model():
  params = make_params()
  batches = [jax.random.normal(jax.random.key(10 + i), (16, 8)) for i in range(2)]
  where = jaxprune.select(params, include="*")
  return params, batches, where


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_wanda_rows_are_one_output_neuron_of_every_layout(model, sparsity):
  params, batches, where = model
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, batches, where)
  masks = jaxprune.Prune(sparsity, score=jaxprune.scores.wanda_score(stats), scope="row").masks(
      params, where)
  for name, inputs in INPUTS.items():
    assert stats.leaves[name].feature_axes == inputs
    w = np.asarray(params[name])
    norms = np.sqrt(np.asarray(stats.leaves[name].sq_norms))
    # The input axes are ascending here, so the norms broadcast in place.
    score = np.abs(w) * np.expand_dims(norms, tuple(d for d in range(w.ndim) if d not in inputs))
    want = reference_row_masks(w, score, inputs, sparsity)
    np.testing.assert_array_equal(np.asarray(masks[name]), want, err_msg=name)


def test_magnitude_rows_follow_the_layouts_read_from_the_program(model):
  params, batches, where = model
  layouts = weight_layouts(apply_fn, params, batches[0])
  masks = jaxprune.Prune(0.5, scope="row", axis=layouts).masks(params, where)
  for name, inputs in INPUTS.items():
    assert layouts[name].inputs == inputs
    w = np.asarray(params[name])
    want = reference_row_masks(w, np.abs(w), inputs, 0.5)
    np.testing.assert_array_equal(np.asarray(masks[name]), want, err_msg=name)


def test_one_axis_for_every_leaf_is_wrong_on_these_layouts(model):
  """What the README's old recipe did: `axis=-2` everywhere. The q kernel's rows
  then run along its heads axis, not its inputs: an output neuron loses other
  than half its inputs."""
  params, _, where = model
  masks = jaxprune.Prune(0.5, scope="row", axis=-2).masks(params, where)
  per_neuron = (~np.asarray(masks["q"])).sum(axis=0)  # pruned inputs per (head, dim)
  assert not np.all(per_neuron == 4)


def test_a_leaf_without_input_axes_is_refused_by_name():
  params = {"w": jnp.ones((4, 4)), "scale": jnp.ones(4)}
  layouts = weight_layouts(lambda p, x: (x * p["scale"]) @ p["w"], params,
                           jax.ShapeDtypeStruct((2, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"ranks scale along its input axes, but the program "
                                       r"uses it as 'elementwise'"):
    jaxprune.Prune(0.5, scope="row", axis=layouts).masks(params, {"w": True, "scale": True})


def reference_nm(w: np.ndarray, score: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
  """Keep the `n` largest of every `m` consecutive scores along `axis` (ties: earlier)."""
  moved = np.moveaxis(score, axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, m)
  order = np.argsort(-groups, axis=-1, kind="stable")
  kept = np.zeros_like(groups, bool)
  np.put_along_axis(kept, order[..., :n], True, axis=-1)
  return np.moveaxis(kept.reshape(moved.shape), -1, axis)


LAST_INPUT = {"q": 0, "o": 1, "gating": 2, "linear": 0, "eqx": 1}


def test_nm_groups_run_along_each_leafs_last_input_axis(model):
  params, batches, where = model
  layouts = weight_layouts(apply_fn, params, batches[0])
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, batches, where)
  by_layout = jaxprune.NM(2, 4, axis=layouts).masks(params, where)
  by_wanda = jaxprune.NM(2, 4, score=jaxprune.scores.wanda_score(stats)).masks(params, where)
  for name, axis in LAST_INPUT.items():
    w = np.asarray(params[name])
    np.testing.assert_array_equal(np.asarray(by_layout[name]),
                                  reference_nm(w, np.abs(w), axis, 2, 4), err_msg=name)
    assert jaxprune.nm_violations({name: by_wanda[name]}, 2, 4, axis=axis)[name] == 0

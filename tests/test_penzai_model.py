"""penzai's llama-like transformer, as a user would bring it (issue 28's zoo).

Its parameters are penzai `Parameter`s holding `NamedArray`s, named by labels
(`lm/block_0/attention/output.weights`), with norm scales named `weights` and an
attention output kernel `(heads, projection, embedding)`. The layouts are read
from its program; one Wanda call ranks every output neuron over its real inputs;
one SparseGPT call prunes every kernel (the two-input-axis attention output
included) and preserves the model's outputs better than magnitude pruning.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_references import reference_row_masks
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as llamalike

import jaxprune
from jaxprune.layouts import weight_layouts


@pytest.fixture(scope="module")
def llama():
  config = llamalike.LlamalikeTransformerConfig(
      num_kv_heads=2, query_head_multiplier=1, embedding_dim=16, projection_dim=8,
      mlp_hidden_dim=32, num_decoder_blocks=2, vocab_size=64, mlp_variant="swiglu",
      tie_embedder_and_logits=False)
  model = llamalike.build_llamalike_transformer(config, init_base_rng=jax.random.key(0),
                                                name="lm")
  unbound, parameters = pz.unbind_params(model)
  named = {p.label: p.value for p in parameters}
  params = {label: value.data_array for label, value in named.items()}

  def apply_fn(values, tokens):
    bound = [pz.Parameter(value=dataclasses.replace(named[k], data_array=v), label=k)
             for k, v in values.items()]
    return pz.bind_variables(unbound, bound)(tokens).unwrap("batch", "seq", "vocabulary")

  def tokens(seed):
    ids = jax.random.randint(jax.random.key(seed), (4, 16), 0, 64)
    return pz.nx.wrap(ids).tag("batch", "seq")

  return params, apply_fn, [tokens(s) for s in range(3)]


def test_penzai_layouts_are_read_from_its_program(llama):
  params, apply_fn, batches = llama
  layouts = weight_layouts(apply_fn, params, batches[0])
  assert layouts["lm/block_0/attention/output.weights"][:3] == ("dot_general", (0, 1), (2,))
  assert layouts["lm/block_0/attention/query.weights"][:3] == ("dot_general", (0,), (1, 2))
  assert layouts["lm/block_0/pre_attention_norm/scale.weights"].use == "elementwise"
  assert layouts["lm/embedder.embeddings"].use == "gather"
  # The name default picks the norm scales named `weights`; the program says what they are.
  assert sum(layout.use == "dot_general" for layout in layouts.values()) == 15


def _kernels(params):
  return {k: k.endswith(".weights") and v.ndim >= 2 for k, v in params.items()}


def _logit_error(apply_fn, dense, pruned, batches):
  return float(np.mean([jnp.mean((apply_fn(pruned, b) - apply_fn(dense, b)) ** 2)
                        for b in batches]))


def test_one_wanda_call_ranks_each_output_neuron(llama):
  params, apply_fn, batches = llama
  where = _kernels(params)
  stats = jaxprune.input_statistics(apply_fn, params, batches, where)
  masks = jaxprune.Prune(0.5, score=jaxprune.wanda_score(stats), scope="row").masks(
      params, where)
  for path, stat in stats.leaves.items():  # against NumPy, per output neuron
    w = np.asarray(params[path])
    others = tuple(d for d in range(w.ndim) if d not in stat.feature_axes)
    norms = np.expand_dims(np.sqrt(np.asarray(stat.sq_norms)), others)
    np.testing.assert_array_equal(np.asarray(masks[path]), reference_row_masks(
        w, np.abs(w) * norms, stat.feature_axes, 0.5), err_msg=path)
  out = np.asarray(masks["lm/block_0/attention/output.weights"])  # (heads, proj, embed)
  np.testing.assert_array_equal((~out).sum(axis=(0, 1)), np.full(16, 8))
  q = np.asarray(masks["lm/block_0/attention/query.weights"])  # (embed, heads, proj)
  np.testing.assert_array_equal((~q).sum(axis=0), np.full((2, 8), 8))


def test_one_sparsegpt_call_beats_magnitude_on_the_outputs(llama):
  params, apply_fn, batches = llama
  where = _kernels(params)
  stats = jaxprune.input_statistics(apply_fn, params, batches, where, gram=True)
  pruned, masks = jaxprune.sparsegpt(params, stats, 0.5, where)
  magnitude = jaxprune.apply_masks(params, jaxprune.magnitude_masks(params, 0.5, where))
  assert all(float((~m).mean()) == 0.5 for m in jax.tree.leaves(masks))
  assert _logit_error(apply_fn, params, pruned, batches) < _logit_error(
      apply_fn, params, magnitude, batches)


def test_sparsegpt_two_four_along_each_kernels_last_input_axis(llama):
  params, apply_fn, batches = llama
  where = _kernels(params)
  layouts = weight_layouts(apply_fn, params, batches[0])
  stats = jaxprune.input_statistics(apply_fn, params, batches, where, gram=True)
  pruned, masks = jaxprune.sparsegpt(params, stats, 0.0, where, nm=(2, 4))
  for path, mask in masks.items():
    if mask is not None:
      axis = layouts[path].inputs[-1]
      assert jaxprune.nm_violations({path: mask}, 2, 4, axis=axis)[path] == 0, path
  magnitude = jaxprune.apply_masks(params, jaxprune.NM(2, 4, axis=layouts).masks(params, where))
  assert _logit_error(apply_fn, params, pruned, batches) < _logit_error(
      apply_fn, params, magnitude, batches)

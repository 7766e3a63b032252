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
from numpy_references import reference_row_masks, zeroed_units
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as llamalike

import jaxprune
from jaxprune.tree import weight_layouts


def _llamalike(query_head_multiplier: int, seed: int):
  """penzai's model at a tiny config, its params as plain arrays by label, and
  `apply_fn(params, tokens)` binding them back into the model."""
  config = llamalike.LlamalikeTransformerConfig(
      num_kv_heads=2, query_head_multiplier=query_head_multiplier, embedding_dim=16,
      projection_dim=8, mlp_hidden_dim=32, num_decoder_blocks=2, vocab_size=64,
      mlp_variant="swiglu", tie_embedder_and_logits=False)
  model = llamalike.build_llamalike_transformer(config, init_base_rng=jax.random.key(seed),
                                                name="lm")
  unbound, parameters = pz.unbind_params(model)
  named = {p.label: p.value for p in parameters}

  def apply_fn(values, tokens):
    bound = [pz.Parameter(value=dataclasses.replace(named[k], data_array=v), label=k)
             for k, v in values.items()]
    return pz.bind_variables(unbound, bound)(tokens).unwrap("batch", "seq", "vocabulary")

  return {label: value.data_array for label, value in named.items()}, apply_fn


def _tokens(seed: int, batch: int = 4, length: int = 16):
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)
  return pz.nx.wrap(ids).tag("batch", "seq")


@pytest.fixture(scope="module")
def llama():
  params, apply_fn = _llamalike(query_head_multiplier=1, seed=0)
  return params, apply_fn, [_tokens(s) for s in range(3)]


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
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, batches, where)
  masks = jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(
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
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, batches, where, gram=True)
  pruned, masks = jaxprune.oneshot.sparsegpt(params, stats, 0.5, where)
  magnitude = jaxprune.apply_masks(params, jaxprune.ranked_masks(params, 0.5, where))
  assert all(float((~m).mean()) == 0.5 for m in jax.tree.leaves(masks))
  assert _logit_error(apply_fn, params, pruned, batches) < _logit_error(
      apply_fn, params, magnitude, batches)


def test_sparsegpt_two_four_along_each_kernels_last_input_axis(llama):
  params, apply_fn, batches = llama
  where = _kernels(params)
  layouts = weight_layouts(apply_fn, params, batches[0])
  stats = jaxprune.oneshot.input_statistics(apply_fn, params, batches, where, gram=True)
  pruned, masks = jaxprune.oneshot.sparsegpt(params, stats, 0.0, where, nm=(2, 4))
  for path, mask in masks.items():
    if mask is not None:
      axis = layouts[path].inputs[-1]
      assert jaxprune.nm_violations({path: mask}, 2, 4, axis=axis)[path] == 0, path
  magnitude = jaxprune.apply_masks(params, jaxprune.NM(2, 4, axis=layouts).masks(params, where))
  assert _logit_error(apply_fn, params, pruned, batches) < _logit_error(
      apply_fn, params, magnitude, batches)


@pytest.fixture(scope="module")
def llama_gqa():
  """Two query heads per KV head: grouped-query attention, penzai's way (the query
  kernel `(embedding, kv_heads, query_heads, projection)`)."""
  params, apply_fn = _llamalike(query_head_multiplier=2, seed=1)
  ids = _tokens(5, batch=2, length=8)
  return params, apply_fn, ids, jaxprune.structural.channel_groups(apply_fn, params, ids)


def _expected_block_groups(b: int) -> dict:
  """Written from penzai's llamalike code: what each kind must hold in block b."""
  M = jaxprune.structural.Member
  a, m = f"lm/block_{b}/attention/", f"lm/block_{b}/mlp/"
  return {
      ("kv_heads", 2): {M(a + "query.weights", 1), M(a + "key.weights", 1),
                        M(a + "value.weights", 1), M(a + "output.weights", 0)},
      ("heads", 2): {M(a + "query.weights", 2), M(a + "output.weights", 1)},
      # RoPE rotates the two halves of q and k into each other: 4 pairs of 8.
      ("head_dim", 4): {M(a + "query.weights", 3, 1, 0, 2), M(a + "key.weights", 2, 1, 0, 2)},
      ("head_dim", 8): {M(a + "value.weights", 2), M(a + "output.weights", 2)},
      ("mlp_hidden", 32): {M(m + "gating_linear.weights", 1), M(m + "value_linear.weights", 1),
                           M(m + "out_linear.weights", 0)},
  }


def test_penzai_gqa_groups_match_the_hand_written_ones(llama_gqa):
  *_, groups = llama_gqa
  found = [((g.kind, g.size), set(g.members)) for g in groups if g.prunable]
  expected = [item for b in range(2) for item in _expected_block_groups(b).items()]
  residual = {jaxprune.structural.Member("lm/embedder.embeddings", 1),
              jaxprune.structural.Member("lm/final_norm/scale.weights", 0),
              jaxprune.structural.Member("lm/lm_head.weights", 0)} | {
      jaxprune.structural.Member(f"lm/block_{b}/{name}", axis) for b in range(2) for name, axis in (
          ("pre_attention_norm/scale.weights", 0), ("pre_ffw_norm/scale.weights", 0),
          ("attention/query.weights", 0), ("attention/key.weights", 0),
          ("attention/value.weights", 0), ("attention/output.weights", 3),
          ("mlp/gating_linear.weights", 0), ("mlp/value_linear.weights", 0),
          ("mlp/out_linear.weights", 1))}
  expected.append((("residual", 16), residual))
  assert sorted(found, key=str) == sorted(expected, key=str)
  vocab = [g for g in groups if g.size == 64]
  assert vocab and not any(g.prunable for g in vocab)


@pytest.mark.parametrize("kind", ["kv_heads", "heads", "head_dim", "mlp_hidden"])
def test_penzai_shrunk_program_equals_zeroing(llama_gqa, kind):
  params, apply_fn, ids, groups = llama_gqa
  importance = jaxprune.structural.magnitude_importance(groups, params)
  keep = jaxprune.structural.keep_top(groups, importance, 0.5, kinds=(kind,))
  small = jaxprune.structural.shrink(params, groups, keep)
  out = jaxprune.structural.shrunk_program(groups, keep)(small, ids)
  reference = apply_fn(zeroed_units(params, groups, keep), ids)
  np.testing.assert_allclose(out, reference, atol=1e-4, rtol=1e-4)

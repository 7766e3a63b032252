"""The example LM (examples/lm_model.py) at a tiny size.

Its attention computes a fused `qkv` (D, 3 * D) and reshapes it to
(B, T, 3, HEADS, D // HEADS) with `num_heads` a Python constant, so the smaller
model comes from `shrunk_program`, not from `apply_fn` on shrunk params. Params
are `split_model`'s pure dict: `blocks/0/attn/qkv/kernel`, `.../output_proj/...`,
`blocks/0/mlp/fc1/...`, `token_embed/embedding`, `pos_embed/embedding`,
`ln_f/...`, `lm_head/...`; LayerNorms have a scale and a bias.
"""

from __future__ import annotations

import jax.numpy as jnp
import lm_model
import numpy as np
from flax import nnx

from . import random_params

CONFIG = lm_model.LMConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=24,
                           context=8)
BATCH = 2


def build():
  """`(apply_fn, params, (tokens,))` with tokens int32 (BATCH, context). Shapes and
  paths from the example's own model and `split_model`, traced abstractly
  (`nnx.eval_shape`); values from `random_params.fill` (LayerNorm scales around 1,
  biases around 0)."""
  abstract = nnx.eval_shape(lambda: lm_model.TransformerLM(CONFIG, rngs=nnx.Rngs(0)))
  graphdef, params, rest = lm_model.split_model(abstract)
  params = random_params.fill(params, seed=0)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (BATCH, CONFIG.context)), jnp.int32)
  return lm_model.make_apply_fn(graphdef, rest), params, (tokens,)

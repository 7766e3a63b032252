"""Multi-head self-attention laid out the way Keras' `MultiHeadAttention` (which
keras-hub's `CachedMultiHeadAttention` and transformer layers build on) lays out
its `EinsumDense` weights, reproduced by hand as a plain dict (no TF, no Keras):

* `query/kernel`, `key/kernel` (D, HEADS, KEY_DIM) with biases (HEADS, KEY_DIM),
  equation `'abc,cde->abde'`;
* `value/kernel` (D, HEADS, VALUE_DIM), bias (HEADS, VALUE_DIM);
* `attention_output/kernel` (HEADS, VALUE_DIM, D), equation `'abcd,cde->abe'`,
  bias (D,);
* scores `'aecd,abcd->acbe'` (key, query), a causal mask added as a large
  negative number, combine `'acbe,aecd->abcd'`.

KEY_DIM and VALUE_DIM differ (Keras allows it), so the two head-dim groups can be
told apart by size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

D, HEADS, KEY_DIM, VALUE_DIM, BATCH, SEQ = 8, 3, 4, 5, 2, 6


def _dense(p, eqn, x):
  return jnp.einsum(eqn, x, p["kernel"]) + p["bias"]


def apply_fn(params, x):
  query = _dense(params["query"], "abc,cde->abde", x)
  key = _dense(params["key"], "abc,cde->abde", x)
  value = _dense(params["value"], "abc,cde->abde", x)
  query = query * (1.0 / np.sqrt(float(KEY_DIM)))
  scores = jnp.einsum("aecd,abcd->acbe", key, query)  # (B, HEADS, T, S)
  t = x.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  scores = scores + (1.0 - causal.astype(scores.dtype)) * -1e9
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("acbe,aecd->abcd", probs, value)  # (B, T, HEADS, VALUE_DIM)
  return jnp.einsum("abcd,cde->abe", out, params["attention_output"]["kernel"]) + params[
      "attention_output"]["bias"]


def build():
  """`(apply_fn, params, (x,))` with `x` (BATCH, SEQ, D)."""
  r = np.random.default_rng(0)
  f32 = lambda *shape, s=0.5: jnp.asarray(s * r.normal(size=shape), jnp.float32)
  params = {
      "query": {"kernel": f32(D, HEADS, KEY_DIM), "bias": f32(HEADS, KEY_DIM, s=0.1)},
      "key": {"kernel": f32(D, HEADS, KEY_DIM), "bias": f32(HEADS, KEY_DIM, s=0.1)},
      "value": {"kernel": f32(D, HEADS, VALUE_DIM), "bias": f32(HEADS, VALUE_DIM, s=0.1)},
      "attention_output": {"kernel": f32(HEADS, VALUE_DIM, D), "bias": f32(D, s=0.1)},
  }
  return apply_fn, params, (f32(BATCH, SEQ, D, s=1.0),)

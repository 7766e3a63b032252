"""Attention and blocks laid out the way Google's `gemma` package writes them (Linen).

Reproduced by hand from `gemma/gm/nn/_modules.py`, `_layers.py` and
`gemma/gm/math/_positional_embeddings.py` (no dependency on the package):

* `Einsum` layers hold one param `w`; grouped-query attention (`num_kv_heads`
  neither 1 nor `num_heads`) has `q_einsum/w` (HEADS, D, HEAD_DIM) applied with
  `'BTD,NDH->BTNH'`, `kv_einsum/w` (2, KV_HEADS, D, HEAD_DIM) with
  `'BSD,CKDH->CBSKH'` unpacked into keys and values, and `attn_vec_einsum/w`
  (HEADS, HEAD_DIM, D) with `'BTNH,NHD->BTD'`;
* RoPE on queries and keys: the head dim split in halves (`jnp.split`), rotated
  pairwise `(i, i + HEAD_DIM / 2)` with frequencies from `jnp.arange(HEAD_DIM // 2)`,
  concatenated back;
* GQA by reshaping the query heads to (KV_HEADS, GROUP): query head `n = k * GROUP + g`
  reads KV head `k`;
* the MLP's `gating_einsum` (2, D, FFN) applied with `'...F,NFH->...NH'` (gate and
  up projections stacked on a leading axis of 2), `linear` (FFN, D);
* RMSNorm with a zero-initialised `scale` used as `(1 + scale)`.

Two blocks (`layer_0`, `layer_1`, a Python loop) and a final norm;
`apply_fn(params, x, positions, attn_mask)` with `x` (B, T, D) float, `positions`
(B, T) int and `attn_mask` (B, T, T) bool, as gemma's blocks take them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import random_params

D, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 8, 4, 2, 6, 5, 2
GROUP = HEADS // KV_HEADS
BATCH, SEQ = 2, 5
K_MASK = -2.3819763e38


class Einsum(nn.Module):
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn: str, x):
    w = self.param("w", nn.initializers.normal(0.5), self.shape)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed = x * jax.lax.rsqrt(var + 1e-06)
    return normed * (1 + jnp.expand_dims(scale, axis=range(len(x.shape) - 1)))


def apply_rope(inputs, positions, *, base_frequency: int = 10_000):
  head_dim = inputs.shape[-1]
  fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
  timescale = base_frequency**fraction
  sinusoid_inp = positions[..., jnp.newaxis] / timescale[jnp.newaxis, jnp.newaxis, :]
  sinusoid_inp = sinusoid_inp[..., jnp.newaxis, :]
  sin, cos = jnp.sin(sinusoid_inp), jnp.cos(sinusoid_inp)
  first_half, second_half = jnp.split(inputs, 2, axis=-1)
  first_part = first_half * cos - second_half * sin
  second_part = second_half * cos + first_half * sin
  return jnp.concatenate([first_part, second_part], axis=-1).astype(inputs.dtype)


class Attention(nn.Module):
  def setup(self):
    self.q_einsum = Einsum((HEADS, D, HEAD_DIM))
    self.kv_einsum = Einsum((2, KV_HEADS, D, HEAD_DIM))
    self.attn_vec_einsum = Einsum((HEADS, HEAD_DIM, D))

  def __call__(self, x, segment_pos, attn_mask):
    query_proj = self.q_einsum("BTD,NDH->BTNH", x)
    key_proj, value_proj = self.kv_einsum("BSD,CKDH->CBSKH", x)
    query_proj = apply_rope(query_proj, segment_pos)
    query_scaled = query_proj * HEAD_DIM**-0.5
    key_proj = apply_rope(key_proj, segment_pos)
    b, t, kg, h = query_scaled.shape
    query_scaled = query_scaled.reshape((b, t, KV_HEADS, int(kg / KV_HEADS), h))
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", query_scaled, key_proj)
    b, t, k, g, s = logits.shape
    logits = logits.reshape((b, t, k * g, s))
    padded_logits = jnp.where(jnp.expand_dims(attn_mask, -2), logits, K_MASK)
    probs = jax.nn.softmax(padded_logits, axis=-1).astype(key_proj.dtype)
    b, t, kg, h = probs.shape
    probs = probs.reshape((b, t, KV_HEADS, int(kg / KV_HEADS), h))
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value_proj)
    b, t, k, g, h = encoded.shape
    encoded = encoded.reshape((b, t, k * g, h))
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
  @nn.compact
  def __call__(self, x):
    w_gating = self.param("gating_einsum", nn.initializers.normal(0.5), (2, D, FFN))
    gate = jnp.einsum("...F,NFH->...NH", x, w_gating)
    activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    w_linear = self.param("linear", nn.initializers.normal(0.5), (FFN, D))
    return jnp.einsum("...H,HF->...F", activations, w_linear)


class Block(nn.Module):
  def setup(self):
    self.pre_attention_norm = RMSNorm()
    self.attn = Attention()
    self.pre_ffw_norm = RMSNorm()
    self.mlp = FeedForward()

  def __call__(self, x, segment_pos, attn_mask):
    attn_output = self.attn(self.pre_attention_norm(x), segment_pos, attn_mask)
    attn_output += x
    outputs = self.mlp(self.pre_ffw_norm(attn_output))
    outputs += attn_output
    return outputs


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, x, positions, attn_mask):
    for i in range(LAYERS):
      x = Block(name=f"layer_{i}")(x, positions, attn_mask)
    return RMSNorm(name="final_norm")(x)


def build():
  """`(apply_fn, params, (x, positions, attn_mask))`; a causal mask. Shapes and
  paths from Linen's init traced abstractly, values from `random_params.fill`."""
  model = Transformer()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, SEQ, D)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
  attn_mask = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool)), (BATCH, SEQ, SEQ))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, positions, attn_mask)
  params = random_params.fill(abstract["params"], seed=1, weight_std=0.5)
  # gemma's RMSNorm multiplies by (1 + scale): scales around 0.
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a - 1 if path[-1].key == "scale" else a, params)

  def apply_fn(params, x, positions, attn_mask):
    return model.apply({"params": params}, x, positions, attn_mask)

  return apply_fn, params, (x, positions, attn_mask)

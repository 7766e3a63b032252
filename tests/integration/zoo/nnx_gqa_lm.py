"""A tiny Flax NNX decoder LM with grouped-query attention and scanned layers.

The usual NNX stacking pattern: blocks are created under `nnx.vmap` (with
`nnx.split_rngs`), so every Param of a block is stacked `(LAYERS, ...)`, and run
with `nnx.scan` carrying the residual stream. Attention has separate bias-free
`wq` (D, HEADS * HEAD_DIM), `wk`/`wv` (D, KV_HEADS * HEAD_DIM) and `wo`
(HEADS * HEAD_DIM, D); keys and values are repeated to the query heads with
`jnp.repeat` (query head `h` reads KV head `h // GROUP`). RMSNorm before each
sublayer and before the unembedding; a gated (SwiGLU) MLP `w2(silu(w1 x) * w3 x)`.

Params are the pure dict of the Param state (`nnx.to_pure_dict`), paths such as
`blocks/attn/wq/kernel` (shape (LAYERS, D, HEADS * HEAD_DIM)).

The reshapes take `HEADS`, `KV_HEADS`, `HEAD_DIM` from the config (constants in
the program), while the model width `D` and `FFN` come from the arrays, so
`apply_fn` itself runs on params whose residual stream or MLP has been shrunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import random_params

VOCAB, D, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 11, 12, 4, 2, 3, 10, 2
GROUP = HEADS // KV_HEADS
BATCH, SEQ = 2, 5


class Attention(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.wq = linear(D, HEADS * HEAD_DIM)
    self.wk = linear(D, KV_HEADS * HEAD_DIM)
    self.wv = linear(D, KV_HEADS * HEAD_DIM)
    self.wo = linear(HEADS * HEAD_DIM, D)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    q = self.wq(x).reshape(b, t, HEADS, HEAD_DIM)
    k = self.wk(x).reshape(b, t, KV_HEADS, HEAD_DIM)
    v = self.wv(x).reshape(b, t, KV_HEADS, HEAD_DIM)
    k = jnp.repeat(k, GROUP, axis=2)  # (b, t, HEADS, HEAD_DIM)
    v = jnp.repeat(v, GROUP, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * HEAD_DIM ** -0.5
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, HEADS * HEAD_DIM)
    return self.wo(out)


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.w1, self.w3, self.w2 = linear(D, FFN), linear(D, FFN), linear(FFN, D)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = MLP(rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class GQALM(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.RMSNorm(D, rngs=rngs)
    self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block: Block, x: jax.Array) -> jax.Array:
      return block(x)

    x = run(self.blocks, self.embed(tokens))
    return self.lm_head(self.final_norm(x))


def build():
  """`(apply_fn, params, (tokens,))`: params a pure dict, tokens int32 (BATCH, SEQ).

  Shapes and paths from NNX's own init, traced abstractly (`nnx.eval_shape`);
  values from `random_params.fill` (norm scales around 1)."""
  abstract = nnx.eval_shape(lambda: GQALM(nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  params = random_params.fill(nnx.to_pure_dict(state), seed=0)
  rest = nnx.to_pure_dict(rest)

  def apply_fn(params, tokens):
    return nnx.merge(graphdef, params, rest)(tokens)

  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  return apply_fn, params, (tokens,)

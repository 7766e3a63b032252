"""A plain-dict mixture-of-experts residual block with `jax.vmap`ped experts.

`x (N, D) -> x + moe(rmsnorm(x) * norm_scale)`. The router is `router/kernel`
(D, E) plus `router/bias` (E,); each token goes to its TOP_K experts
(`jax.lax.top_k` on the router logits, softmax over the chosen logits), combined
through a one-hot gate (N, E). Experts are stacked: `experts/w1` (E, D, F),
`experts/b1` (E, F), `experts/w2` (E, F, D); every expert runs on every token
(`jax.vmap` over the expert axis) and the gate mixes their outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

D, E, F, TOP_K, TOKENS = 6, 5, 4, 2, 7


def _expert(w1, b1, w2, h):
  return jax.nn.gelu(h @ w1 + b1) @ w2


def apply_fn(params, x):
  h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * params["norm_scale"]
  logits = h @ params["router"]["kernel"] + params["router"]["bias"]
  top_logits, top_idx = jax.lax.top_k(logits, TOP_K)  # (N, K)
  weights = jax.nn.softmax(top_logits, axis=-1)
  gates = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(top_idx, E, dtype=weights.dtype))
  ex = params["experts"]
  outs = jax.vmap(_expert, in_axes=(0, 0, 0, None))(ex["w1"], ex["b1"], ex["w2"], h)  # (E, N, D)
  return x + jnp.einsum("ne,end->nd", gates, outs)


def build():
  """`(apply_fn, params, (x,))` with `x` (TOKENS, D)."""
  r = np.random.default_rng(0)
  f32 = lambda *shape, s=1.0: jnp.asarray(s * r.normal(size=shape), jnp.float32)
  params = {
      "norm_scale": 1 + f32(D, s=0.3),
      "router": {"kernel": f32(D, E), "bias": f32(E, s=0.1)},
      "experts": {"w1": f32(E, D, F, s=0.5), "b1": f32(E, F, s=0.1),
                  "w2": f32(E, F, D, s=0.5)},
  }
  return apply_fn, params, (f32(TOKENS, D),)

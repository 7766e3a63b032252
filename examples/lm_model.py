"""A small byte-level decoder-only Transformer language model in Flax NNX.

Parameter paths (from `split_model`) look like `blocks/0/attn/output_proj/kernel`,
`blocks/0/mlp/fc1/kernel`, `blocks/0/mlp/fc2/kernel`, so `PRUNE_TARGETS`
(`output_proj`, `fc*`, given to `jaxprune.select(params, include=...)`) picks out the
attention output projections and the MLP (or expert) weights; the library's default
would also take `qkv`, the router and `lm_head`. With `moe=True`, `blocks/i/mlp/fc1` and
`fc2` are stacked expert kernels of shape (E, d_model, d_ff) and (E, d_ff, d_model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

# The leaves the example prunes: attention output projections and MLP/expert kernels.
PRUNE_TARGETS = ("output_proj", "fc*")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model hyperparameters. `context` is the longest sequence the model accepts."""

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 512
  context: int = 128
  moe: bool = False
  num_experts: int = 4
  top_k: int = 2


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention: [B, T, D] -> [B, T, D]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if config.d_model % config.num_heads:
      raise ValueError(f"d_model={config.d_model} is not divisible by "
                       f"num_heads={config.num_heads}")
    self.num_heads = config.num_heads
    self.qkv = nnx.Linear(config.d_model, 3 * config.d_model, rngs=rngs)
    self.output_proj = nnx.Linear(config.d_model, config.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    B, T, D = x.shape
    qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, D/H]
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.output_proj(out.reshape(B, T, D))


class MLP(nnx.Module):
  """Position-wise feed-forward: [B, T, D] -> [B, T, D], GELU between `fc1` and `fc2`."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
    self.fc2 = nnx.Linear(config.d_ff, config.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class MoE(nnx.Module):
  """Top-k mixture of experts: [B, T, D] -> [B, T, D].

  `fc1` is (E, D, F) and `fc2` is (E, F, D). Every expert runs on every token (dense),
  and the outputs are mixed by a gate that is zero outside each token's top-k experts.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if not 1 <= config.top_k <= config.num_experts:
      raise ValueError(f"top_k={config.top_k} must be in [1, num_experts={config.num_experts}]")
    self.top_k = config.top_k
    E, D, F = config.num_experts, config.d_model, config.d_ff
    init = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.router = nnx.Linear(D, E, rngs=rngs)
    # No expert biases: 2-D (E, F) biases would match `jaxprune.select`'s `fc*` default
    # and get pruned as if they were weights.
    self.fc1 = nnx.Param(init(rngs.params(), (E, D, F)))
    self.fc2 = nnx.Param(init(rngs.params(), (E, F, D)))

  def gates(self, x: jax.Array) -> jax.Array:
    """Per-token expert weights [B, T, E]: softmax over the top-k router logits, else 0."""
    logits = self.router(x)
    top_logits, top_idx = jax.lax.top_k(logits, self.top_k)  # [B, T, k]
    weights = jax.nn.softmax(top_logits, axis=-1)
    one_hot = jax.nn.one_hot(top_idx, logits.shape[-1], dtype=weights.dtype)  # [B, T, k, E]
    return jnp.einsum("btk,btke->bte", weights, one_hot)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, self.fc1[...]))
    # Gating before fc2 folds the expert mix into fc2's contraction over (E, F), so no
    # [B, T, E, D] per-expert output is materialised.
    return jnp.einsum("btef,efd->btd", h * self.gates(x)[..., None], self.fc2[...])


class Block(nnx.Module):
  """Pre-LayerNorm Transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.attn = CausalSelfAttention(config, rngs=rngs)
    self.ln2 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.mlp = MoE(config, rngs=rngs) if config.moe else MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class TransformerLM(nnx.Module):
  """Byte-level decoder-only LM: int tokens [B, T] (T <= context) -> logits [B, T, vocab]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    small = nnx.initializers.normal(stddev=0.02)
    self.token_embed = nnx.Embed(config.vocab_size, config.d_model, embedding_init=small,
                                 rngs=rngs)
    self.pos_embed = nnx.Embed(config.context, config.d_model, embedding_init=small, rngs=rngs)
    # flax >= 0.12 rejects a plain list of modules as an attribute; nnx.List keeps the
    # `blocks/0/...` paths.
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
    # A small head makes the initial prediction near-uniform (loss ~ ln(vocab)).
    self.lm_head = nnx.Linear(config.d_model, config.vocab_size, kernel_init=small, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.config.context:
      raise ValueError(f"sequence length {length} exceeds context {self.config.context}")
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(length))
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Splits `model` into (graphdef, params, rest).

  `params` is a plain nested dict of arrays (`blocks -> 0 -> attn -> output_proj ->
  kernel`), ready for optax and jaxprune; `rest` holds any non-Param state (empty for
  this model) as a plain dict too.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def make_apply_fn(graphdef: nnx.GraphDef, rest: PyTree) -> ApplyFn:
  """`apply(params, tokens [B, T]) -> logits [B, T, vocab]`, a pure function (jittable)."""

  def apply(params: PyTree, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(tokens)

  return apply


def make_batch_apply_fn(graphdef: nnx.GraphDef, rest: PyTree) -> ApplyFn:
  """`apply(params, batch [B, T+1]) -> logits [B, T, vocab]` for `batch[:, :-1]`.

  Aligned with `make_loss_fn`'s targets, as distillation needs.
  """
  apply = make_apply_fn(graphdef, rest)
  return lambda params, batch: apply(params, batch[:, :-1])


def make_stages(graphdef: nnx.GraphDef, rest: PyTree,
                num_layers: int) -> list[Callable[[PyTree, jax.Array], jax.Array]]:
  """The model cut into `stage(params, x) -> x'` pieces for
  `jaxprune.oneshot.sparsegpt_sequential`: the embedding (of `batch[:, :-1]`, as
  `make_loss_fn` reads a batch [B, T+1]), then each block; the head (`ln_f`,
  `lm_head`) is not a stage, as the example prunes none of its kernels.
  """
  def embed(params: PyTree, batch: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params, rest)
    tokens = batch[:, :-1]
    return model.token_embed(tokens) + model.pos_embed(jnp.arange(tokens.shape[-1]))

  def block(k: int) -> Callable[[PyTree, jax.Array], jax.Array]:
    return lambda params, x: nnx.merge(graphdef, params, rest).blocks[k](x)

  return [embed] + [block(k) for k in range(num_layers)]


def next_token_loss(batch_apply: ApplyFn, *, with_logits: bool = False) -> Callable[..., Any]:
  """`loss(params, batch [B, T+1])`: mean next-token cross-entropy (nats/token) of
  `batch_apply(params, batch) -> logits [B, T, vocab]` against `batch[:, 1:]`.

  `with_logits`: the loss returns `(loss, {"logits": logits})`, so that
  `jaxprune.distillation_loss` reuses the student's forward pass instead of running it
  twice. Pure and jittable.
  """
  def loss_fn(params: PyTree, batch: jax.Array) -> Any:
    logits = batch_apply(params, batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[:, 1:]).mean()
    return (loss, {"logits": logits}) if with_logits else loss

  return loss_fn


def make_loss_fn(graphdef: nnx.GraphDef, rest: PyTree, *,
                 with_logits: bool = False) -> Callable[..., Any]:
  """`next_token_loss` of the model `(graphdef, rest)`: inputs `batch[:, :-1]`, targets
  `batch[:, 1:]`."""
  return next_token_loss(make_batch_apply_fn(graphdef, rest), with_logits=with_logits)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_tokens", "temperature"))
def _sample(apply_fn, params, window, filled, key, *, num_tokens, temperature):
  context = window.shape[0]

  def step(i, state):
    window, filled, out = state
    logits = apply_fn(params, window[None])[0, filled - 1].astype(jnp.float32)
    if temperature > 0:
      token = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
    else:
      token = jnp.argmax(logits)
    token = token.astype(jnp.int32)
    full = filled == context
    window = jnp.where(full, jnp.roll(window, -1), window)
    window = window.at[jnp.where(full, context - 1, filled)].set(token)
    return window, jnp.minimum(filled + 1, context), out.at[i].set(token)

  state = (window, filled, jnp.zeros(num_tokens, jnp.int32))
  return jax.lax.fori_loop(0, num_tokens, step, state)[2]


def generate(
    apply_fn: ApplyFn,
    params: PyTree,
    prompt: bytes,
    num_tokens: int,
    *,
    context: int,
    key: jax.Array,
    temperature: float = 0.8,
) -> bytes:
  """Samples `num_tokens` bytes continuing `prompt`; returns only the new bytes.

  The model always sees a window of exactly `context` tokens, so the sampler compiles
  once per (apply_fn, num_tokens, context, temperature), whatever the prompt: the prompt
  is left-aligned in the window with padding after it (invisible to a causal model)
  until the window fills, then the window slides. An empty prompt starts from `b"\\n"`;
  a prompt longer than `context` keeps its last `context` bytes. `temperature <= 0`
  means greedy decoding.
  """
  prompt = (prompt or b"\n")[-context:]
  window = np.zeros(context, np.int32)
  window[: len(prompt)] = np.frombuffer(prompt, np.uint8)
  out = _sample(apply_fn, params, jnp.asarray(window), jnp.int32(len(prompt)), key,
                num_tokens=num_tokens, temperature=float(temperature))
  return np.asarray(out, np.uint8).tobytes()


def keep_blocks(params: PyTree, kept: Sequence[int]) -> PyTree:
  """`params` (from `split_model`) with only the blocks `kept`, renumbered `0..k-1` in
  the order given (depth pruning): the params of `LMConfig(num_layers=len(kept))`.

  The blocks are a Python loop (no scan), so dropping one is dropping its subtree;
  the other leaves are shared, not copied.

  Raises:
    ValueError: `kept` is empty, repeats a block or names one the params lack.
  """
  blocks = params["blocks"]
  kept = [int(k) for k in kept]
  if not kept or len(set(kept)) != len(kept) or any(k not in blocks for k in kept):
    raise ValueError(f"kept blocks must be distinct indices among {sorted(blocks)}, "
                     f"at least one; got {kept}")
  return {**params, "blocks": {i: blocks[k] for i, k in enumerate(kept)}}


def param_count(params: PyTree) -> int:
  """Total number of scalars in a param pytree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))

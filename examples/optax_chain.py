"""Gradual pruning inside an ordinary optax chain: no prune-retrain driver.

    python examples/optax_chain.py --steps 800 --final-sparsity 0.8

The model trains from scratch with a hand-written jitted loop. The optimizer is

    jaxprune.gradually_pruned(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(warmup_cosine)),
        where=select(params), schedule=optax.polynomial_schedule(...), update_every=K,
    )

(it wraps the whole chain, so the clipping norm counts kept weights only)
so every K steps the masks are recomputed in-graph (Zhu & Gupta's cubic ramp) and
pruned weights are held at exactly zero. Sparsity and validation perplexity are
printed as training goes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data
import lm_model

import jaxprune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=None, help="UTF-8 text file; default: embedded corpus")
  p.add_argument("--max-bytes", type=int, default=2_000_000)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--final-sparsity", type=float, default=0.8)
  p.add_argument("--begin", type=float, default=0.25, help="pruning starts at this fraction")
  p.add_argument("--end", type=float, default=0.75, help="and reaches the target here")
  p.add_argument("--update-every", type=int, default=25)
  p.add_argument("--scope", choices=("layer", "global"), default="layer")
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--log-every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  text = lm_data.load_text(args.data, args.max_bytes)
  train_tokens, val_tokens = lm_data.train_val_split(lm_data.encode(text))
  config = lm_model.LMConfig(d_model=args.d_model, num_layers=args.layers,
                             d_ff=4 * args.d_model, context=args.context)
  graphdef, params, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(args.seed)))
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  batch_at = lm_data.make_train_batches(train_tokens, args.batch_size, args.context, args.seed)
  eval_batches = lm_data.make_eval_batches(val_tokens, args.batch_size, args.context,
                                           args.eval_batches)

  where = jaxprune.select(params, include=lm_model.PRUNE_TARGETS)
  begin, end = int(args.begin * args.steps), int(args.end * args.steps)
  lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps,
                                          end_value=args.lr * 0.05)
  # `pruned` wraps the whole chain: it zeroes pruned gradients before the clipping
  # norm is taken, so the norm counts kept weights only.
  # Zhu & Gupta's cubic ramp from `begin` to `end`; the target carries the scope.
  sparsity = optax.polynomial_schedule(init_value=0.0, end_value=args.final_sparsity, power=3,
                                       transition_steps=end - begin, transition_begin=begin)
  tx = jaxprune.gradually_pruned(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01)),
      where=where,
      schedule=lambda step: jaxprune.Prune(sparsity(step), scope=args.scope),
      update_every=args.update_every,
  )
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_at(step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_loss(params):
    return jnp.mean(jnp.stack([loss_fn(params, b) for b in eval_batches]))

  log = []
  for step in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, step)
    if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
      masks = jaxprune.get_masks(opt_state)
      held = jaxprune.sparsity_report(params, where).targeted_sparsity
      kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
      total = sum(m.size for m in jax.tree.leaves(masks))
      ppl = math.exp(float(eval_loss(params)))
      log.append({"step": step + 1, "train_loss": float(loss), "mask_sparsity": 1 - kept / total,
                  "weight_sparsity": held, "perplexity": ppl})
      print(f"step {step + 1:5d}  train loss {float(loss):.3f}  sparsity {1 - kept / total:6.2%} "
            f"(weights at zero {held:6.2%})  validation perplexity {ppl:.3f}")
  print(f"train step compiled {train_step._cache_size()} time(s)")
  print(jaxprune.sparsity_report(params, where))
  return {"log": log, "compilations": train_step._cache_size()}


if __name__ == "__main__":
  main()

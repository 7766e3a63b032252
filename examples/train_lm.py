"""Train a byte-level Transformer LM, then prune it with jaxprune's prune-retrain loop.

    python examples/train_lm.py                       # embedded corpus, no download
    python examples/train_lm.py --data ../shared/data/tinyshakespeare.txt --out runs/shakespeare

Dense pretraining (jitted, AdamW with warmup-cosine), then `jaxprune.prune_retrain`
over a sparsity schedule on `output_proj` + `fc*`, with orbax checkpoints in `--out`
(`--resume` continues a killed run). Prints the summary table, the per-layer report
and a text sample from the pruned model, and writes PNG plots and `results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data
import lm_model

import jaxprune

SCHEDULES = ("geometric", "exponential", "cubic", "oneshot")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=None,
                 help="UTF-8 text file (90/10 train/validation split). Default: the running "
                      "Python's standard library sources, no download.")
  p.add_argument("--max-bytes", type=int, default=2_000_000, help="cap on text read")
  p.add_argument("--steps", type=int, default=600, help="dense pretraining steps")
  p.add_argument("--retrain-steps", default="300",
                 help="total retraining steps across the schedule, spread by --last-share; "
                      "or a comma list with one budget per iteration")
  p.add_argument("--last-share", type=float, default=0.5,
                 help="share of the total retraining budget given to the last iteration "
                      "(the rest is split evenly); the measured default, see README")
  p.add_argument("--initial-sparsity", type=float, default=0.2)
  p.add_argument("--final-sparsity", type=float, default=0.8)
  p.add_argument("--iterations", type=int, default=5)
  p.add_argument("--schedule", default="geometric",
                 help=f"one of {', '.join(SCHEDULES)} (exponential is the literal "
                      "s0*(sf/s0)**(i/(N-1))), or a comma list of sparsities")
  p.add_argument("--scope", choices=("layer", "global"), default="layer")
  p.add_argument("--moe", action="store_true", help="mixture-of-experts feed-forward")
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (dense)")
  p.add_argument("--retrain-lr", type=float, default=3e-3,
                 help="peak retraining learning rate, rewound (warmup-cosine) every iteration")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--out", default="runs/demo", help="checkpoints, plots, results.json")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                 help="distill from the dense model while retraining, with this weight of "
                      "the KL term (0: off)")
  p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
  p.add_argument("--export", action="store_true",
                 help="write the dense and pruned models as compressed files (bitmask + "
                      "kept values) and print sizes and perplexities")
  p.add_argument("--quantize", choices=("none", "bfloat16", "int8"), default="none",
                 help="also export the pruned model with kept values in this format "
                      "(implies --export)")
  p.add_argument("--mesh", default=None,
                 help="device mesh such as 'data=8' (data parallel, params replicated) or "
                      "'data=2,fsdp=4' (params, optimizer state and masks FSDP-sharded). "
                      "On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 "
                      "host devices.")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-baseline", action="store_true",
                 help="skip the equal-budget dense baseline (the dense model trained for the "
                      "same retraining steps, which pruning is then compared with)")
  p.add_argument("--sample-bytes", type=int, default=240)
  return p.parse_args(argv)


def build_schedule(name: str, initial: float, final: float, iterations: int):
  """A schedule by name (see SCHEDULES), or explicit targets from a comma list."""
  if name == "exponential":
    return jaxprune.schedules.exponential_targets(initial, final, iterations)
  if name == "geometric":
    return jaxprune.schedules.geometric_keep_targets(initial, final, iterations)
  if name == "cubic":
    return jaxprune.schedules.polynomial_targets(initial, final, iterations)
  if name == "oneshot":
    return [final]
  try:
    return [float(s) for s in name.split(",")]
  except ValueError:
    raise SystemExit(f"--schedule: expected one of {SCHEDULES} or numbers, got {name!r}") from None


def retrain_budgets(spec: str, iterations: int, last_share: float) -> list[int]:
  """Per-iteration budgets: an explicit comma list, or a total spread by `last_share`."""
  parts = [int(v) for v in spec.split(",")]
  if len(parts) > 1:
    return parts
  total = parts[0]
  if iterations == 1:
    return [total]
  if not 0.0 <= last_share <= 1.0:
    raise SystemExit(f"--last-share must be in [0, 1], got {last_share}")
  last = round(total * last_share) if last_share else total // iterations
  each = (total - last) // (iterations - 1)
  return [each] * (iterations - 1) + [total - each * (iterations - 1)]


def warmup_cosine(peak: float, steps: int) -> optax.Schedule:
  warmup = max(1, min(100, steps // 10))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1),
                                            end_value=peak * 0.05)


def pretrain(params, loss_fn, batch_at, steps: int, lr: float, progress: bool = True):
  """Dense training with AdamW; returns (params, last loss). One compilation."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(warmup_cosine(lr, steps), weight_decay=0.01))
  step_fn = jaxprune.make_train_step(loss_fn, tx)
  opt_state = tx.init(params)
  rng = jax.random.key_data(jax.random.key(0))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc="dense pretraining", dynamic_ncols=True)
  loss = jnp.nan
  for step in range(steps):
    params, opt_state, loss = step_fn(params, opt_state, batch_at(step), rng, step)
    if bar is not None:
      bar.update(1)
      if (step + 1) % 50 == 0:
        bar.set_postfix(loss=f"{float(loss):.3f}")
  if bar is not None:
    bar.close()
  return params, float(loss)


def dense_params(args, params, loss_fn, batch_at) -> tuple[Any, float]:
  """Pretrained params from `--out/dense` when resuming, else trained and saved there."""
  path = os.path.abspath(os.path.join(args.out, "dense"))
  checkpointer = ocp.StandardCheckpointer()
  if args.resume and os.path.isdir(path):
    print(f"resuming: dense params from {path}")
    return checkpointer.restore(path, params), 0.0
  if os.path.exists(path):
    raise SystemExit(f"{path} exists: pass --resume to continue, or choose another --out")
  start = time.perf_counter()
  params, loss = pretrain(params, loss_fn, batch_at, args.steps, args.lr)
  seconds = time.perf_counter() - start
  print(f"dense pretraining: {args.steps} steps in {seconds:.0f}s, last train loss {loss:.3f}")
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  return params, seconds


def dense_baseline(params, loss_fn, batch_at, steps: int, lr: float, eval_batches) -> float:
  """Perplexity of the dense model trained `steps` more steps on the retraining batches.

  Retraining is also training: a pruned model compared with an under-trained dense
  one can look better than dense. This baseline gets the same extra steps, so the
  gap to it is what pruning itself costs.
  """
  trained, _ = pretrain(params, loss_fn, batch_at, steps, lr, progress=False)
  eval_step = jaxprune.training.make_eval_step(loss_fn, jaxprune.training.perplexity)
  return jaxprune.training.evaluate(eval_step, trained, eval_batches,
                                    jaxprune.training.perplexity).metric


def first_targeted(where) -> str:
  paths = jaxprune.tree.leaf_paths(where)
  return next(p for p, s in zip(paths, jax.tree.leaves(where)) if s)


def leaf_at(params, path: str):
  return dict(zip(jaxprune.tree.leaf_paths(params), jax.tree.leaves(params)))[path]


def export_table(args, dense, result, loss_fn, eval_batches) -> list[dict]:
  """Exports dense / pruned / pruned+quantized files, reloads each, and evaluates it."""
  eval_step = jaxprune.training.make_eval_step(loss_fn, jaxprune.training.perplexity)
  variants = [("dense", dense, None, "float32"), ("pruned", result.params, result.masks, "float32")]
  if args.quantize != "none":
    variants.append((f"pruned + {args.quantize}", result.params, result.masks, args.quantize))
  rows = []
  for name, tree, masks, values in variants:
    path = os.path.join(args.out, name.replace(" + ", "_") + ".jxp")
    info = jaxprune.export.export_compressed(path, tree, masks, values)
    loaded = jaxprune.export.load_compressed(path)
    ppl = jaxprune.training.evaluate(eval_step, loaded, eval_batches,
                                     jaxprune.training.perplexity).metric
    rows.append({"model": name, "path": path, "file_bytes": info.file_bytes,
                 "compression": info.compression, "perplexity": ppl})
  dense_ppl = rows[0]["perplexity"]
  print("\nend to end: export -> load -> evaluate")
  print(f"{'model':<18} {'file size':>12} {'vs dense':>9} {'perplexity':>11} {'change':>8}")
  for r in rows:
    print(f"{r['model']:<18} {r['file_bytes'] / 1e6:>9.3f} MB {r['compression']:>8.2f}x "
          f"{r['perplexity']:>11.3f} {r['perplexity'] / dense_ppl - 1:>+8.2%}")
  return rows


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("jaxprune").setLevel(logging.INFO)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {jax.device_count()} device(s)")

  text = lm_data.load_text(args.data, args.max_bytes)
  train_tokens, val_tokens = lm_data.train_val_split(lm_data.encode(text))
  source = args.data or "Python standard library sources (embedded default)"
  print(f"data: {source}: {len(train_tokens):,} train / {len(val_tokens):,} validation bytes")

  config = lm_model.LMConfig(d_model=args.d_model, num_layers=args.layers,
                             num_heads=args.heads, d_ff=4 * args.d_model,
                             context=args.context, moe=args.moe)
  model = lm_model.TransformerLM(config, rngs=nnx.Rngs(args.seed))
  graphdef, params, rest = lm_model.split_model(model)
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  print(f"model: {lm_model.param_count(params):,} parameters, {config}")

  host_batch_at = jax.jit(lm_data.make_train_batches(train_tokens, args.batch_size,
                                                     args.context, args.seed))
  batch_at = host_batch_at
  mesh, layout = None, "replicated"
  if args.mesh:
    mesh = jaxprune.sharding.make_mesh(args.mesh)
    layout = "fsdp" if "fsdp" in mesh.shape else "replicated"
    params = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, layout))
    batch_at = lambda step: jaxprune.sharding.place_batch(host_batch_at(step), mesh)
    print(f"mesh {dict(mesh.shape)}: params {layout}, batches split over all axes")
  eval_batches = lm_data.make_eval_batches(val_tokens, args.batch_size, args.context,
                                           args.eval_batches)
  params, pretrain_seconds = dense_params(args, params, loss_fn, batch_at)

  where = jaxprune.select(params, include=lm_model.PRUNE_TARGETS)
  schedule = build_schedule(args.schedule, args.initial_sparsity, args.final_sparsity,
                            args.iterations)
  budgets = retrain_budgets(args.retrain_steps, len(schedule), args.last_share)
  per_iteration = max(budgets)
  print(f"schedule ({args.schedule}): {[round(float(s), 4) for s in schedule]}, "
        f"retrain steps {budgets}, scope {args.scope}")

  # The retraining stream starts after the pretraining steps: fresh batches, placed
  # on the mesh like the pretraining ones.
  def retrain_batch(step):
    return batch_at(args.steps + step)

  retrain_loss, retrain_batches, evals = loss_fn, retrain_batch, eval_batches
  if mesh is not None:
    evals = [jaxprune.sharding.place_batch(b, mesh) for b in eval_batches]
  if args.distill:  # from the dense model, its logits riding on each retraining batch
    teacher_apply = lm_model.make_batch_apply_fn(graphdef, rest)
    retrain_loss = jaxprune.distillation_loss(loss_fn, teacher_apply, weight=args.distill,
                                              temperature=args.temperature)
    retrain_batches = jaxprune.training.with_teacher_logits(retrain_batch, teacher_apply,
                                                            params)
  start = time.perf_counter()
  result = jaxprune.prune_retrain(
      params, retrain_loss, retrain_batches, evals,
      optimizer=optax.adamw(warmup_cosine(args.retrain_lr, per_iteration), weight_decay=0.01),
      targets=[jaxprune.Prune(float(s), scope=args.scope) for s in schedule], where=where,
      retrain_steps=budgets, metric=jaxprune.training.perplexity,
      checkpointer=jaxprune.Checkpointer(os.path.join(args.out, "prune"), every=50,
                                         resume=args.resume),
  )
  prune_seconds = time.perf_counter() - start

  print("\n" + result.summary())
  print("\nper-layer sparsity of the pruned model:")
  print(result.report)
  apply_fn = lm_model.make_apply_fn(graphdef, rest)
  prompt = lm_data.decode(val_tokens[: min(64, args.context // 2)])
  sample = lm_model.generate(apply_fn, result.params, prompt.encode(), args.sample_bytes,
                             context=args.context, key=jax.random.key(args.seed))
  print(f"\nsample from the pruned model (prompt {prompt!r}):\n"
        f"{sample.decode('utf-8', errors='replace')}\n")
  print(f"perplexity degradation: {result.degradation:+.2%} at "
        f"{result.achieved_sparsity:.1%} sparsity of the targeted layers "
        f"({result.overall_sparsity:.1%} of the whole model), against the dense model "
        f"before retraining")
  baseline = None
  if not args.no_baseline:
    baseline = dense_baseline(params, loss_fn, lambda step: batch_at(args.steps + step),
                              sum(budgets), args.retrain_lr, eval_batches)
    print(f"equal-budget dense baseline ({sum(budgets)} more dense steps): perplexity "
          f"{baseline:.3f}; pruned vs it: {result.final.metric / baseline - 1:+.2%} "
          "(what pruning itself costs)")

  os.makedirs(args.out, exist_ok=True)
  exported = []
  if args.export or args.quantize != "none":
    exported = export_table(args, params, result, loss_fn, eval_batches)
  plots = []
  if not args.no_plots:
    import lm_plots

    name = first_targeted(where)
    plots = [
        lm_plots.plot_weight_histogram(leaf_at(params, name), leaf_at(result.params, name),
                                       name, os.path.join(args.out, "weights_histogram.png")),
        lm_plots.plot_layer_sparsity(result.report, os.path.join(args.out, "layer_sparsity.png")),
        lm_plots.plot_perplexity(result.history, result.dense.metric,
                                 os.path.join(args.out, "perplexity.png")),
    ]
    print("plots: " + ", ".join(plots))
  results = {
      "args": vars(args),
      "dense_perplexity": result.dense.metric,
      "final_perplexity": result.final.metric,
      "perplexity_degradation": result.degradation,
      "baseline_perplexity": baseline,
      "degradation_vs_baseline": None if baseline is None else (
          result.final.metric / baseline - 1),
      "achieved_sparsity": result.achieved_sparsity,
      "overall_sparsity": result.overall_sparsity,
      "history": [r.to_json() for r in result.history],
      "report": result.report.to_dict(),
      "pretrain_seconds": pretrain_seconds,
      "prune_retrain_seconds": prune_seconds,
      "sample": sample.decode("utf-8", errors="replace"),
      "plots": plots,
      "exported": exported,
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()

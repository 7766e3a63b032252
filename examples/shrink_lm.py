"""Shrink the byte-level LM into a smaller dense one, then let it recover by distillation.

    python examples/shrink_lm.py                      # embedded corpus, a few minutes on 2 cores
    python examples/shrink_lm.py --importance taylor --keep mlp_hidden=0.5,heads=0.5
    python examples/shrink_lm.py --drop-layers 1 --keep none      # depth only
    python examples/shrink_lm.py --params runs/demo/dense --out runs/shrink_demo

The dense model is trained as `examples/train_lm.py` trains it (or loaded with
`--params`: an orbax checkpoint such as `make demo`'s `runs/demo/dense`, or an `.npz`
of `bench_quality.py`'s cache, for a model of the same flags). Then:

1. `jaxprune.structural.channel_groups` reads the model's coupled axes from its program (MLP
   neurons, heads, head_dim, the residual stream) and prints them;
2. `--drop-layers N` removes the N blocks of lowest Block Influence
   (`jaxprune.structural.block_influence` over the model cut into stages) first;
3. the chosen importance (`--importance magnitude|taylor|activation`, Minitron's
   activations by default, from calibration batches of the training stream) ranks
   every group's units and `keep_top` keeps `--keep` of them (`mlp_hidden=0.5,heads=0.75`:
   half the MLP neurons and three heads of four in every block);
4. `shrink` slices the params and `shrunk_program` runs the smaller model (the LM writes
   its head count as a constant, so its own code cannot);
5. `jaxprune.train` distills the small model from the dense one
   (`jaxprune.distillation_loss`) for `--recovery-steps` (default a quarter of the dense
   steps), checkpointed in `--out/recover` (`--resume` continues a killed run).

Prints the parameters, the measured forward speed-up (jitted, medians of interleaved
rounds against the dense model in the same run) and the validation perplexity of the
dense model, the shrunk one before recovery and after; writes `recovery.png`,
`kept_widths.png` and `results.json` to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data
import lm_model
import train_lm

import jaxprune

PyTree = Any
IMPORTANCES = ("magnitude", "taylor", "activation")
DROP_BY = ("influence", "last")
CALIBRATION_OFFSET = 10_000_000  # calibration batches: far past any training step


# ----------------------------------------------------------------------------- shrinking


def parse_keep(spec: str) -> dict[str, float]:
  """`"mlp_hidden=0.5,heads=0.75"` -> `{"mlp_hidden": 0.5, "heads": 0.75}`; `"none"` -> {}."""
  if spec.strip().lower() in ("", "none"):
    return {}
  out = {}
  for part in spec.split(","):
    kind, sep, value = part.partition("=")
    try:
      if not sep:
        raise ValueError
      out[kind.strip()] = float(value)
    except ValueError:
      raise SystemExit(f"--keep: expected KIND=FRACTION[,KIND=FRACTION...] or 'none', got "
                       f"{spec!r}") from None
  return out


def lm_of(config: lm_model.LMConfig) -> tuple[Any, PyTree]:
  """(graphdef, rest) of the example LM at `config`, without initializing its arrays."""
  abstract = nnx.eval_shape(lambda: lm_model.TransformerLM(config, rngs=nnx.Rngs(0)))
  graphdef, _, rest = lm_model.split_model(abstract)
  return graphdef, rest


def blocks_to_keep(params: PyTree, config: lm_model.LMConfig, drop: int, batches: Sequence,
                   how: str = "influence") -> tuple[list[int], dict[int, float]]:
  """(the kept blocks in order, Block Influence per block): all but the `drop` blocks
  of lowest influence (`how="last"`: all but the last `drop`)."""
  if not 0 <= drop < config.num_layers:
    raise SystemExit(f"--drop-layers must be in [0, {config.num_layers - 1}], got {drop}")
  graphdef, rest = lm_of(config)
  stages = lm_model.make_stages(graphdef, rest, config.num_layers)
  influence = {stage - 1: bi for stage, bi in
               jaxprune.structural.block_influence(stages, params, batches).items()}
  if how == "last":
    kept = list(range(config.num_layers - drop))
  elif how == "influence":
    order = sorted(influence, key=lambda b: (-influence[b], b))
    kept = sorted(order[:config.num_layers - drop])
  else:
    raise ValueError(f"how must be one of {DROP_BY}, got {how!r}")
  return kept, influence


def width_importance(name: str, groups: Any, apply: Callable, params: PyTree,
                     batches: Sequence) -> dict[int, np.ndarray]:
  """The units' importance by `name` (`IMPORTANCES`), over the calibration `batches`."""
  if name == "magnitude":
    return jaxprune.structural.magnitude_importance(groups, params)
  if name == "taylor":
    grads = jaxprune.scores.mean_gradients(lm_model.next_token_loss(apply), params, batches)
    return jaxprune.structural.taylor_importance(groups, params, grads)
  if name == "activation":
    return jaxprune.structural.activation_importance(groups, apply, params, batches)
  raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}")


class Shrunk(NamedTuple):
  """A shrunk LM: its params, `apply(params, batch [B, T+1]) -> logits` and how it was cut."""

  params: PyTree
  apply: Callable[[PyTree, jax.Array], jax.Array]
  config: lm_model.LMConfig  # the depth-pruned config (widths as the dense model's)
  kept_blocks: list[int]  # dense block indices, in order
  influence: dict[int, float]  # Block Influence per dense block ({} without depth pruning)
  groups: Any  # channel groups of the depth-pruned model
  keep: dict[int, np.ndarray]  # group index -> kept units
  widths: dict[str, dict[int, tuple[int, int]]]  # kind -> dense block -> (kept, of)


def shrink_lm(params: PyTree, config: lm_model.LMConfig, fractions: dict[str, float],
              batches: Sequence, *, importance: str = "activation", drop_layers: int = 0,
              drop_by: str = "influence", round_to: int = 1, scope: str = "layer",
              importances: dict | None = None) -> Shrunk:
  """The dense LM with `drop_layers` blocks removed, then `fractions` of every group of
  those kinds kept by `importance` (calibrated on `batches`, each `[B, T+1]`).

  `importances`, if given, caches each importance by name for these params (a caller
  comparing estimators computes the depth cut and the groups once).
  """
  kept_blocks, influence = list(range(config.num_layers)), {}
  if drop_layers:
    kept_blocks, influence = blocks_to_keep(params, config, drop_layers, batches, drop_by)
  config = dataclasses.replace(config, num_layers=len(kept_blocks))
  params = lm_model.keep_blocks(params, kept_blocks)
  graphdef, rest = lm_of(config)
  apply = lm_model.make_batch_apply_fn(graphdef, rest)
  example = jax.ShapeDtypeStruct(np.shape(batches[0]), jnp.int32)
  groups = jaxprune.structural.channel_groups(apply, params, example)
  keep: dict[int, np.ndarray] = {}
  if fractions:
    cache = {} if importances is None else importances
    if importance not in cache:
      cache[importance] = width_importance(importance, groups, apply, params, batches)
    keep = jaxprune.structural.keep_top(groups, cache[importance], fractions, round_to=round_to,
                             scope=scope)
  small, small_apply = params, apply
  if keep:
    small = jaxprune.structural.shrink(params, groups, keep)
    small_apply = jaxprune.structural.shrunk_program(groups, keep)
  return Shrunk(small, small_apply, config, kept_blocks, influence, groups, keep,
                kept_widths(groups, keep, kept_blocks, config.num_layers + drop_layers))


def _block_of(group: Any) -> int | None:
  """The block whose params a group's members all belong to (None: several or none)."""
  found = {m.path.split("/")[1] for m in group.members if m.path.startswith("blocks/")}
  unblocked = any(not m.path.startswith("blocks/") for m in group.members)
  return int(found.pop()) if len(found) == 1 and not unblocked else None


def kept_widths(groups: Any, keep: dict, kept_blocks: list[int],
                dense_layers: int) -> dict[str, dict[int, tuple[int, int]]]:
  """kind -> dense block -> (units kept, of): a model-wide group (the residual stream)
  counts in every kept block; a dropped block keeps 0 of every kind."""
  widths: dict[str, dict[int, tuple[int, int]]] = {}
  for i, units in keep.items():
    g, block = groups[i], _block_of(groups[i])
    for b in kept_blocks if block is None else [kept_blocks[block]]:
      widths.setdefault(g.kind, {})[b] = (len(units), g.size)
  if not widths:
    widths["blocks"] = {b: (1, 1) for b in kept_blocks}
  for per in widths.values():
    of = next(iter(per.values()))[1]
    for b in range(dense_layers):
      per.setdefault(b, (0, of))
  return {kind: dict(sorted(per.items())) for kind, per in widths.items()}


# ----------------------------------------------------------------------------- recovery


def warmup_cosine(peak: float, steps: int) -> optax.Schedule:
  return train_lm.warmup_cosine(peak, steps)


def recovery_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """The dense recipe's optimizer (clip 1.0, AdamW wd 0.01) over the recovery steps."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(warmup_cosine(lr, steps), weight_decay=0.01))


def with_teacher(batch_at: Callable[[int], jax.Array], teacher_apply: Callable,
                 teacher_params: PyTree) -> Callable[[int], Any]:
  """`step -> TeacherBatch(batch, teacher logits)`: what `distillation_loss` reads."""
  return jaxprune.training.with_teacher_logits(batch_at, teacher_apply, teacher_params)


def recover(small: PyTree, small_apply: Callable, inputs_at: Callable[[int], Any], *,
            steps: int, lr: float, weight: float, temperature: float,
            eval_batches: Sequence, eval_every: int | None = None,
            checkpoint_dir: str | None = None, resume: bool = True, progress: bool = False,
            optimizer: optax.GradientTransformation | None = None,
            ) -> tuple[PyTree, list[tuple[int, float]]]:
  """`small` distilled for `steps` steps (`jaxprune.train` + `distillation_loss` with
  the teacher logits `inputs_at(step)` carries): (params, [(step, validation
  perplexity)] every `eval_every` steps and after the last)."""
  loss_fn = lm_model.next_token_loss(small_apply)
  eval_step = jaxprune.training.make_eval_step(loss_fn, jaxprune.training.perplexity)
  history: dict[int, float] = {}

  def evaluate(report) -> None:
    step = report.global_step + 1
    if eval_every and (step % eval_every == 0 or report.final) and step not in history:
      history[step] = jaxprune.training.evaluate(eval_step, report.state.params,
                                                 eval_batches).metric

  student_loss = lm_model.next_token_loss(small_apply, with_logits=True)
  train_loss = jaxprune.distillation_loss(student_loss, small_apply, weight=weight,
                                          temperature=temperature)
  hooks = [jaxprune.training.every(eval_every or steps, evaluate)]
  if progress:
    hooks.append(jaxprune.training.progress_bar())
  checkpointer = None if checkpoint_dir is None else jaxprune.Checkpointer(
      checkpoint_dir, every=eval_every or None, resume=resume)
  result = jaxprune.train(
      small, train_loss, inputs_at, optimizer=optimizer or recovery_optimizer(lr, steps),
      steps=steps, hooks=hooks, checkpointer=checkpointer)
  if not history or max(history) < steps:
    history[steps] = jaxprune.training.evaluate(eval_step, result.params, eval_batches).metric
  return result.params, sorted(history.items())


def validation_perplexity(apply: Callable, params: PyTree, eval_batches: Sequence) -> float:
  eval_step = jaxprune.training.make_eval_step(lm_model.next_token_loss(apply),
                                               jaxprune.training.perplexity)
  return jaxprune.training.evaluate(eval_step, params, eval_batches).metric


def forward_times(models: dict[str, tuple[Callable, PyTree]], batch: jax.Array,
                  rounds: int = 5, calls: int = 3) -> dict[str, list[float]]:
  """Seconds per forward of each `(apply, params)`, jitted, per round; the order rotates
  each round so that load on a shared machine falls on every model alike."""
  names, runs = list(models), {}
  for name, (apply, params) in models.items():
    runs[name] = jax.jit(apply)
    jax.block_until_ready(runs[name](params, batch))  # compile and warm up
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      params = models[name][1]
      start = time.perf_counter()
      jax.block_until_ready([runs[name](params, batch) for _ in range(calls)])
      times[name].append((time.perf_counter() - start) / calls)
  return times


def speedup(times: dict[str, list[float]], name: str, base: str = "dense") -> float:
  """The median over rounds of (base time / `name`'s time in the same round)."""
  return statistics.median(b / t for b, t in zip(times[base], times[name]))


# ----------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=None,
                 help="UTF-8 text file (90/10 train/validation split). Default: the running "
                      "Python's standard library sources, no download.")
  p.add_argument("--max-bytes", type=int, default=2_000_000, help="cap on text read")
  p.add_argument("--params", default=None,
                 help="dense params to shrink instead of training them: an orbax checkpoint "
                      "directory (train_lm.py's OUT/dense) or an .npz of leaves leaf_0.. "
                      "(bench_quality.py's cache), of a model with the same flags")
  p.add_argument("--steps", type=int, default=600,
                 help="dense pretraining steps (with --params: the steps it was trained for)")
  p.add_argument("--recovery-steps", type=int, default=None,
                 help="distillation steps of the shrunk model (default: a quarter of --steps)")
  p.add_argument("--importance", choices=IMPORTANCES, default="activation",
                 help="how units are ranked: weight norms, |w * grad| (Taylor), or Minitron's "
                      "input activation norms")
  p.add_argument("--keep", default="mlp_hidden=0.5,heads=0.75",
                 help="kept fraction per group kind, e.g. mlp_hidden=0.5,heads=0.75,"
                      "residual=0.75 ('none': depth only)")
  p.add_argument("--scope", choices=("layer", "global"), default="layer",
                 help="layer: the same width in every block; global: one ranking per kind "
                      "across blocks")
  p.add_argument("--round-to", type=int, default=1, help="kept widths rounded up to a multiple")
  p.add_argument("--drop-layers", type=int, default=0,
                 help="remove this many blocks first (depth pruning)")
  p.add_argument("--drop-by", choices=DROP_BY, default="influence",
                 help="which blocks go: lowest Block Influence, or the last ones")
  p.add_argument("--calibration-batches", type=int, default=8,
                 help="training-stream batches for the importances and Block Influence")
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (dense)")
  p.add_argument("--recovery-lr", type=float, default=3e-3,
                 help="peak learning rate of the recovery (warmup-cosine)")
  p.add_argument("--distill", type=float, default=0.5, metavar="WEIGHT",
                 help="weight of the KL term to the dense model (1: logits only)")
  p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--eval-every", type=int, default=25,
                 help="recovery steps between validation evaluations (the recovery plot)")
  p.add_argument("--timing-rounds", type=int, default=5, help="interleaved forward timing rounds")
  p.add_argument("--out", default="runs/shrink", help="checkpoints, plots, results.json")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-plots", action="store_true")
  args = p.parse_args(argv)
  if args.recovery_steps is None:
    args.recovery_steps = max(1, args.steps // 4)
  return args


def load_params(path: str, template: PyTree) -> PyTree:
  """Dense params from an orbax checkpoint directory or an `.npz` (`leaf_0`, `leaf_1`...)."""
  leaves, treedef = jax.tree.flatten(template)
  if path.endswith(".npz"):
    with np.load(path) as f:
      loaded = [jnp.asarray(f[f"leaf_{i}"]) for i in range(len(leaves))]
  else:
    import orbax.checkpoint as ocp
    loaded = jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.abspath(path), template))
  for a, b in zip(loaded, leaves):
    if a.shape != b.shape:
      raise SystemExit(f"{path}: a leaf of shape {a.shape} where the model has {b.shape}; "
                       "pass the flags the model was trained with (--d-model, --layers...)")
  return jax.tree.unflatten(treedef, loaded)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  fractions = parse_keep(args.keep)
  if not fractions and not args.drop_layers:
    raise SystemExit("nothing to shrink: give --keep fractions or --drop-layers")
  if args.recovery_steps > args.steps // 4:
    print(f"warning: {args.recovery_steps} recovery steps exceed a quarter of the "
          f"{args.steps} dense steps")
  started = time.perf_counter()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {jax.device_count()} device(s)")

  text = lm_data.load_text(args.data, args.max_bytes)
  train_tokens, val_tokens = lm_data.train_val_split(lm_data.encode(text))
  source = args.data or "Python standard library sources (embedded default)"
  print(f"data: {source}: {len(train_tokens):,} train / {len(val_tokens):,} validation bytes")
  config = lm_model.LMConfig(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                             d_ff=4 * args.d_model, context=args.context)
  graphdef, params, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(args.seed)))
  apply = lm_model.make_batch_apply_fn(graphdef, rest)
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  batch_at = jax.jit(lm_data.make_train_batches(train_tokens, args.batch_size, args.context,
                                                args.seed))
  eval_batches = lm_data.make_eval_batches(val_tokens, args.batch_size, args.context,
                                           args.eval_batches)
  dense_params = (load_params(args.params, params) if args.params
                  else train_lm.dense_params(args, params, loss_fn, batch_at)[0])
  if args.params:
    print(f"dense params: {args.params}")
  dense_ppl = validation_perplexity(apply, dense_params, eval_batches)
  print(f"dense model: {lm_model.param_count(dense_params):,} parameters, {config}; "
        f"validation perplexity {dense_ppl:.3f}")

  calibration = [batch_at(CALIBRATION_OFFSET + i) for i in range(args.calibration_batches)]
  start = time.perf_counter()
  shrunk = shrink_lm(dense_params, config, fractions, calibration, importance=args.importance,
                     drop_layers=args.drop_layers, drop_by=args.drop_by,
                     round_to=args.round_to, scope=args.scope)
  shrink_seconds = time.perf_counter() - start
  print(f"\nchannel groups of the {shrunk.config.num_layers}-block model:")
  print(shrunk.groups)
  if args.drop_layers:
    bi = ", ".join(f"{b}: {v:.4f}" for b, v in shrunk.influence.items())
    print(f"\nBlock Influence per block ({bi}); kept blocks {shrunk.kept_blocks}")
  print(f"\nkept ({args.importance} importance, scope {args.scope}):")
  for kind, per in shrunk.widths.items():
    print(f"  {kind}: " + ", ".join(f"block {b} {k}/{n}" for b, (k, n) in per.items()))
  print(f"shrinking took {shrink_seconds:.1f}s")

  before_ppl = validation_perplexity(shrunk.apply, shrunk.params, eval_batches)
  print(f"\nshrunk model: {lm_model.param_count(shrunk.params):,} parameters; validation "
        f"perplexity before recovery {before_ppl:.3f}")
  print(f"recovery: {args.recovery_steps} steps ({args.recovery_steps / args.steps:.0%} of the "
        f"{args.steps} dense steps), distillation weight {args.distill:g}, temperature "
        f"{args.temperature:g}, peak lr {args.recovery_lr:g}", flush=True)

  def recovery_batch(step):  # fresh batches, after the pretraining stream
    return batch_at(args.steps + step)

  start = time.perf_counter()
  recovered, history = recover(
      shrunk.params, shrunk.apply, with_teacher(recovery_batch, apply, dense_params),
      steps=args.recovery_steps, lr=args.recovery_lr, weight=args.distill,
      temperature=args.temperature, eval_batches=eval_batches,
      eval_every=args.eval_every, checkpoint_dir=os.path.join(args.out, "recover"),
      resume=args.resume, progress=True)
  recovery_seconds = time.perf_counter() - start
  after_ppl = history[-1][1]
  print("recovery: " + ", ".join(f"step {s}: {p:.3f}" for s, p in history))

  times = forward_times({"dense": (apply, dense_params), "shrunk": (shrunk.apply, recovered)},
                        eval_batches[0], rounds=args.timing_rounds)
  fwd = speedup(times, "shrunk")
  dense_ms, small_ms = (1e3 * statistics.median(times[n]) for n in ("dense", "shrunk"))
  n_dense, n_small = lm_model.param_count(dense_params), lm_model.param_count(recovered)
  print(f"\nforward of a [{args.batch_size}, {args.context}] batch, jitted, median of "
        f"{args.timing_rounds} interleaved rounds:")
  print("| model | params | forward ms | forward speed-up | validation perplexity |")
  print("|---|---:|---:|---:|---:|")
  print(f"| dense | {n_dense:,} | {dense_ms:.2f} | 1.00x | {dense_ppl:.3f} |")
  print(f"| shrunk, before recovery | {n_small:,} ({n_small / n_dense:.0%}) | {small_ms:.2f} | "
        f"{fwd:.2f}x | {before_ppl:.3f} |")
  print(f"| shrunk, after recovery ({args.recovery_steps} steps) | {n_small:,} "
        f"({n_small / n_dense:.0%}) | {small_ms:.2f} | {fwd:.2f}x | {after_ppl:.3f} |")
  print(f"after recovery vs dense: {after_ppl / dense_ppl - 1:+.2%} perplexity")

  os.makedirs(args.out, exist_ok=True)
  plots = []
  if not args.no_plots:
    import lm_plots

    plots = [
        lm_plots.plot_recovery(history, dense_ppl, before_ppl,
                               os.path.join(args.out, "recovery.png")),
        lm_plots.plot_kept_widths(shrunk.widths, os.path.join(args.out, "kept_widths.png")),
    ]
    print("plots: " + ", ".join(plots))
  results = {
      "args": vars(args),
      "config": dataclasses.asdict(config),
      "params": {"dense": n_dense, "shrunk": n_small},
      "kept_blocks": shrunk.kept_blocks,
      "block_influence": {str(b): v for b, v in shrunk.influence.items()},
      "widths": {k: {str(b): list(v) for b, v in per.items()} for k, per in
                 shrunk.widths.items()},
      "groups": [{"kind": g.kind, "size": g.size, "prunable": g.prunable}
                 for g in shrunk.groups],
      "perplexity": {"dense": dense_ppl, "before_recovery": before_ppl,
                     "after_recovery": after_ppl},
      "recovery_history": [{"step": s, "perplexity": p} for s, p in history],
      "forward_ms": {"dense": dense_ms, "shrunk": small_ms},
      "forward_speedup": fwd,
      "seconds": {"shrink": shrink_seconds, "recovery": recovery_seconds,
                  "total": time.perf_counter() - started},
      "plots": plots,
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()

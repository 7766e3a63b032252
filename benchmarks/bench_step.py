"""Step-time overhead of `jaxprune.pruned(adamw)` against plain `adamw`.

    python benchmarks/bench_step.py                  # ~5M-parameter transformer LM
    python benchmarks/bench_step.py --model mlp      # optimizer-bound 7.3M MLP, batch 64
    python benchmarks/bench_step.py --quick          # tiny model, smoke run
    python benchmarks/bench_step.py --json out.json  # also write the numbers

One jitted train step (loss, gradients, optimizer update, `apply_updates`; params
and optimizer state donated), compiled once per optimizer, for four optimizers on
the same model and batch in the same process:

* `adamw`: the baseline;
* `pruned(adamw)`: fixed masks;
* `gradual, no update`: `gradually_pruned(adamw, where=, schedule=, update_every=10**9)`, whose
  masks are recomputed at count 0 only (during warm-up), so every timed step is one
  that does not recompute them: the cost of carrying a gradual schedule;
* `gradual, update`: the same with `update_every=1`: every step recomputes the
  masks (the in-graph selection), reported separately.

Timing runs in interleaved rounds (the order rotates each round); each ratio is the
median over rounds of (variant's step time / `adamw`'s in the same round). Goals:
fixed masks <= 1.02, a gradual step that does not update <= 1.03. Wall-clock ratios
are noisy on a shared machine, so the deterministic ratios of the compiled (donated)
programs' "bytes accessed" (goal for fixed masks <= 1.01: JaxPruner's step is 1.015)
and FLOPs from XLA's cost analysis are printed too, with the mask memory (bytes per
targeted weight), optimizer-state bytes and the compiled scratch ("temp") size: on
CPU a scratch buffer over glibc's largest mmap threshold (32 MB) is mapped afresh,
page faults included, on every call (see docs/benchmarks.md). Masks: 80% sparsity, layer scope, on
`output_proj` + `fc*` kernels (LM) or every kernel (MLP).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import lm_model

import jaxprune

SPARSITY = 0.8
FULL = {"d_model": 256, "num_layers": 6, "num_heads": 8, "d_ff": 1024, "context": 128}
QUICK = {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 256, "context": 32}
MLP_FULL = (1024, 2048, 2048, 512)  # 7.34M parameters
MLP_QUICK = (64, 128, 32)
BASE, FIXED, STILL, UPDATE = "adamw", "pruned(adamw)", "gradual, no update", "gradual, update"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=("lm", "mlp"), default="lm",
                 help="the example Transformer LM (default) or an optimizer-bound MLP")
  p.add_argument("--quick", action="store_true", help="tiny model, 3 rounds x 3 steps")
  p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 8)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="batch size (default 8 sequences for the LM, 64 rows for the MLP)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH")
  p.add_argument("--sparse-training", action="store_true",
                 help="also SET, RigL (drop and grow) and straight_through steps, each "
                      "on a step that updates its masks and on one that does not")
  p.add_argument("--sync-dispatch", action="store_true",
                 help="turn off JAX's asynchronous dispatch on CPU "
                      "(jax_cpu_enable_async_dispatch=False): each call returns when done")
  args = p.parse_args(argv)
  full_batch = 8 if args.model == "lm" else 64
  quick_defaults = {"rounds": 3, "steps": 3, "batch_size": 2}
  full_defaults = {"rounds": 8, "steps": 20, "batch_size": full_batch}
  for name, value in (quick_defaults if args.quick else full_defaults).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("rounds", "steps", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cost(compiled: Any) -> dict[str, float]:
  """`bytes accessed` and `flops` of a compiled program (dict, or list of dicts)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  memory = compiled.memory_analysis()
  return {"bytes_accessed": float(analysis.get("bytes accessed", math.nan)),
          "flops": float(analysis.get("flops", math.nan)),
          "temp_bytes": math.nan if memory is None else float(memory.temp_size_in_bytes)}


def make_step(loss_fn, tx: optax.GradientTransformation):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def map_pruned_states(fn, opt_state: Any) -> Any:
  """`opt_state` with every `jaxprune.PrunedState` in it (nested ones too) replaced by
  `fn(state)`, outer ones first."""
  def visit(s):
    if not isinstance(s, jaxprune.PrunedState):
      return s
    new = fn(s)
    return new._replace(inner_state=map_pruned_states(fn, new.inner_state))

  return jax.tree.map(visit, opt_state, is_leaf=lambda s: isinstance(s, jaxprune.PrunedState))


def at_count(step, count: int):
  """`step` with every `PrunedState`'s update count fixed to the constant `count`: XLA
  folds the mask-update `cond` away, so the program is that count's path alone (the
  cost analysis of the real step counts both branches)."""
  def fixed(params, opt_state, batch):
    pinned = map_pruned_states(lambda s: s._replace(count=jnp.asarray(count, jnp.int32)),
                               opt_state)
    return step(params, pinned, batch)
  return fixed


def copy_tree(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def lm_problem(args: argparse.Namespace) -> dict[str, Any]:
  config = lm_model.LMConfig(**(QUICK if args.quick else FULL))
  graphdef, params, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(0)))
  batch = jax.random.randint(jax.random.key(1), (args.batch_size, config.context + 1), 0,
                             config.vocab_size, dtype=jnp.int32)
  described = {k: getattr(config, k) for k in
               ("d_model", "num_layers", "num_heads", "d_ff", "context", "vocab_size")}
  return {"params": params, "loss_fn": lm_model.make_loss_fn(graphdef, rest), "batch": batch,
          "where": jaxprune.select(params, include=lm_model.PRUNE_TARGETS),
          "config": {"model": "lm", **described}}


def mlp_problem(args: argparse.Namespace) -> dict[str, Any]:
  """A ReLU MLP on random regression data: its step is mostly the optimizer's."""
  widths = MLP_QUICK if args.quick else MLP_FULL
  keys = jax.random.split(jax.random.key(0), len(widths) + 1)
  params = {f"fc{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
                       "bias": jnp.zeros((b,))}
            for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}
  batch = (jax.random.normal(keys[-2], (args.batch_size, widths[0])),
           jax.random.normal(keys[-1], (args.batch_size, widths[-1])))

  def loss_fn(p, batch):
    h, y = batch
    for i in range(len(widths) - 1):
      h = h @ p[f"fc{i}"]["kernel"] + p[f"fc{i}"]["bias"]
      h = jax.nn.relu(h) if i < len(widths) - 2 else h
    return jnp.mean((h - y) ** 2)

  return {"params": params, "loss_fn": loss_fn, "batch": batch,
          "where": jaxprune.select(params, include="*kernel"),
          "config": {"model": "mlp", "widths": list(widths)}}


def adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-3, weight_decay=0.1)


def optimizers(params: Any, where: Any) -> dict[str, optax.GradientTransformation]:
  masks = jaxprune.ranked_masks(params, SPARSITY, where)
  schedule = optax.constant_schedule(SPARSITY)
  return {
      BASE: adamw(),
      FIXED: jaxprune.pruned(adamw(), masks),
      STILL: jaxprune.gradually_pruned(adamw(), where=where, schedule=schedule, update_every=10**9),
      UPDATE: jaxprune.gradually_pruned(adamw(), where=where, schedule=schedule, update_every=1),
  }


def sparse_training_optimizers(params: Any, where: Any) -> dict[str, optax.GradientTransformation]:
  """SET, RigL and STE, each with masks updated every step (`, update`) and never after
  the warm-up (`, no update`: update_every=10**9, the cost of carrying the mode)."""
  start = jaxprune.ranked_masks(params, SPARSITY, where, score=jaxprune.scores.random_score(0),
                                distribution=jaxprune.distributions.erk())
  out = {}
  for every, label in ((10**9, "no update"), (1, "update")):
    moved = functools.partial(jaxprune.sparse_training.drop_and_grow, adamw(), start,
                              update_every=every)
    out[f"SET, {label}"] = moved(schedule=jaxprune.sparse_training.set_schedule(0.3))
    out[f"RigL, {label}"] = moved(schedule=jaxprune.sparse_training.rigl_schedule(0.3))
    out[f"STE, {label}"] = jaxprune.sparse_training.straight_through(
        adamw(), where=where, schedule=optax.constant_schedule(SPARSITY), update_every=every)
  return out


def timed_rounds(steps: dict[str, Any], states: dict[str, Any], batch: Any,
                 args: argparse.Namespace) -> dict[str, list[float]]:
  """Seconds per step, per variant and round; the order rotates each round."""
  names = list(steps)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      p, s = states[name]
      start = time.perf_counter()
      for _ in range(args.steps):
        p, s, loss = steps[name](p, s, batch)
      jax.block_until_ready((p, s, loss))
      times[name].append((time.perf_counter() - start) / args.steps)
      states[name] = (p, s)
  return times


def held_at_zero(params: Any, opt_state: Any) -> bool:
  """Pruned weights exactly 0 in what the forward runs on."""
  masks = jaxprune.get_masks(opt_state)
  return all(bool(jnp.all(jnp.where(m, True, w == 0)))
             for m, w in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None),
                             jax.tree.leaves(params)) if m is not None)


def run(args: argparse.Namespace) -> dict[str, Any]:
  problem = (lm_problem if args.model == "lm" else mlp_problem)(args)
  params, batch = problem["params"], problem["batch"]
  variants = optimizers(params, problem["where"])
  if args.sparse_training:
    variants.update(sparse_training_optimizers(params, problem["where"]))
  steps, states, costs, state_bytes, paths = {}, {}, {}, {}, {}
  for name, tx in variants.items():
    opt_state = tx.init(params)
    state_bytes[name] = tree_bytes(opt_state)
    steps[name] = jax.jit(make_step(problem["loss_fn"], tx), donate_argnums=(0, 1))
    # Costed as it runs: donated, so state that passes through is not copied.
    costs[name] = cost(steps[name].lower(params, opt_state, batch).compile())
    if name != BASE and name != FIXED and "no update" in name:
      path = jax.jit(at_count(make_step(problem["loss_fn"], tx), 1), donate_argnums=(0, 1))
      paths[name] = cost(path.lower(params, opt_state, batch).compile())
    p, s = copy_tree(params), opt_state
    for _ in range(2):  # compile + warm up (the gradual masks are computed at count 0)
      p, s, loss = steps[name](p, s, batch)
    jax.block_until_ready(loss)
    states[name] = (p, s)
  times = timed_rounds(steps, states, batch, args)
  for name in steps:
    assert steps[name]._cache_size() == 1, f"{name}: step compiled more than once"

  masks = jaxprune.get_masks(states[FIXED][1])
  targeted = sum(int(m.size) for m in jax.tree.leaves(masks))
  held = jaxprune.tree.pack_masks(masks)
  return {
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
                f"{jax.device_count()} device(s)",
      "quick": args.quick,
      "config": problem["config"],
      "batch_size": args.batch_size,
      "rounds": args.rounds,
      "steps_per_round": args.steps,
      "async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
      "params": sum(int(x.size) for x in jax.tree.leaves(params)),
      "targeted_params": targeted,
      "sparsity": SPARSITY,
      "step_time_s": times,
      "median_step_time_s": {n: statistics.median(t) for n, t in times.items()},
      "time_ratios": time_stats(times),
      "bytes_accessed": {n: c["bytes_accessed"] for n, c in costs.items()},
      "bytes_accessed_ratio": {n: c["bytes_accessed"] / costs[BASE]["bytes_accessed"]
                               for n, c in costs.items()},
      "flops": {n: c["flops"] for n, c in costs.items()},
      # Steps that do not update their masks, as compiled for a count that does not.
      "non_update_bytes_accessed_ratio": {
          n: c["bytes_accessed"] / costs[BASE]["bytes_accessed"] for n, c in paths.items()},
      "flops_ratio": {n: c["flops"] / costs[BASE]["flops"] for n, c in costs.items()},
      "temp_bytes": {n: c["temp_bytes"] for n, c in costs.items()},
      "opt_state_bytes": state_bytes,
      "mask_bytes": tree_bytes(held),
      "mask_bytes_per_targeted_param": tree_bytes(held) / targeted,
      "pruned_weights_zero": {n: held_at_zero(*states[n]) for n in states if n != BASE},
      "goals": {"time_ratio": {FIXED: 1.02, STILL: 1.03}, "bytes_accessed_ratio": {FIXED: 1.01}},
  }


def time_stats(step_time_s: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
  """Per variant against `adamw`: the median of the per-round ratios (the headline),
  the ratio of the medians, and that of the fastest rounds (least disturbed by other
  load on a shared machine)."""
  base = step_time_s[BASE]
  out = {}
  for name, t in step_time_s.items():
    per_round = [y / x for x, y in zip(base, t)]
    out[name] = {
        "round_ratios": per_round,
        "median_of_round_ratios": statistics.median(per_round),
        "ratio_of_medians": statistics.median(t) / statistics.median(base),
        "ratio_of_fastest": min(t) / min(base),
    }
  return out


def describe(r: dict[str, Any]) -> str:
  c = r["config"]
  if c["model"] == "mlp":
    return f"MLP {' x '.join(map(str, c['widths']))}"
  return (f"Transformer LM (d_model {c['d_model']}, {c['num_layers']} layers, d_ff "
          f"{c['d_ff']}, context {c['context']})")


def table(r: dict[str, Any]) -> str:
  names = list(r["step_time_s"])
  ts, ba, bar, fr, st = (r["time_ratios"], r["bytes_accessed"], r["bytes_accessed_ratio"],
                         r["flops_ratio"], r["opt_state_bytes"])
  goal_t, goal_b = r["goals"]["time_ratio"], r["goals"]["bytes_accessed_ratio"]
  lines = [
      f"device: {r['device']}",
      f"model: {describe(r)}, {r['params'] / 1e6:.2f}M params, batch {r['batch_size']}; "
      f"{r['targeted_params'] / 1e6:.2f}M targeted at {r['sparsity']:.0%} sparsity; masks "
      f"held in {r['mask_bytes_per_targeted_param']:.3f} B per targeted weight",
      f"timing: {r['rounds']} interleaved rounds x {r['steps_per_round']} steps",
      f"pruned weights exactly zero after the run: {r['pruned_weights_zero']}",
      "",
      "| optimizer | median step (ms) | time ratio (median of rounds) | fastest-round ratio "
      "| bytes accessed (MB) | bytes ratio | FLOPs ratio | state (MB) | scratch (MB) | goal |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for n in names:
    goals = ([f"time <= {goal_t[n]}"] if n in goal_t else []) + (
        [f"bytes <= {goal_b[n]}"] if n in goal_b else [])
    lines.append(
        f"| {n} | {r['median_step_time_s'][n] * 1e3:.2f} | "
        f"{ts[n]['median_of_round_ratios']:.3f} | {ts[n]['ratio_of_fastest']:.3f} | "
        f"{ba[n] / 1e6:.1f} | {bar[n]:.4f} | {fr[n]:.4f} | {st[n] / 1e6:.2f} | "
        f"{r['temp_bytes'][n] / 1e6:.1f} | {', '.join(goals)} |")
  lines.append("\nbytes accessed of the non-update path alone (count fixed, cond folded), "
               "/ adamw's: " + ", ".join(f"{n} {v:.4f}" for n, v in
                                         r["non_update_bytes_accessed_ratio"].items()))
  ratios = ", ".join(f"{x:.3f}" for x in ts[FIXED]["round_ratios"])
  lines.append(f"\n{FIXED} per-round time ratios: {ratios}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.sync_dispatch:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  result = run(args)
  print(table(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
  return result


if __name__ == "__main__":
  main()

"""Quality of a shrunk LM after distillation (issue 30): estimators, scratch and masks.

    python benchmarks/bench_shrink_quality.py                  # docs/benchmarks.md (2 seeds)
    python benchmarks/bench_shrink_quality.py --quick          # smoke run (tiny sizes)
    python benchmarks/bench_shrink_quality.py --seeds 0,1,2 --rows mlp50+heads25 --json out.json

The example LM of `bench_quality.py` (d_model 128, 4 layers, 4 heads, d_ff 512,
context 128, batch 32; its data, AdamW warmup-cosine recipe, validation batches and
dense-params cache) is pretrained densely per seed (the seed draws its init and its
training stream) for bench_quality's 2000 steps (`--dense-steps 400`: a quick look at
a model still improving fast). Then it is shrunk three ways, each with every
estimator side by side:

* `mlp50+heads25`: 50% of every block's MLP neurons and 75% of its heads kept (the
  same widths in every block), ranked by magnitude, Taylor (|w * grad|) or Minitron's
  activation norms;
* `residual25`: 75% of the residual channels kept (the norms normalize over the kept
  channels), by the same three estimators;
* `layers25`: 25% of the blocks dropped, those of lowest Block Influence or the last.

Every shrunk model recovers by distillation from its dense model (`jaxprune.train` +
`jaxprune.distillation_loss`, `examples/shrink_lm.py`'s `recover`) for the same
recovery budget (`--recovery-steps`, a quarter of the dense steps), on the training
stream past the dense steps. Beside each row:

* (b) the same small architecture trained from scratch for dense + recovery steps (the
  same batches the dense model and its recovery saw, the dense recipe), from a fresh
  dense init shrunk to the same sizes;
* (c) unstructured magnitude masks (`jaxprune.ranked_masks`, global over the
  kernels `jaxprune.select` takes: qkv, output_proj, fc1, fc2, lm_head) leaving as many
  nonzero parameters as the shrunk model has, retrained by the same distillation for the
  same budget with the masks held: its dense kernels run at the dense cost.

Per row: parameters; validation perplexity before and after recovery, mean ± spread
(half the range) over `--seeds`; the ratio to the dense model, to (b) and to (c); and,
for the shrunk architecture, the measured forward and train-step speed-up against the
dense model (jitted, interleaved rounds, medians of per-round ratios) and XLA's FLOP
ratio. Goals (PASS/MISS as measured): `mlp50+heads25` by activations within +5% of the
dense perplexity after recovery and better than (b); activations at least as good as
magnitude; recovery at most 25% of the dense steps.

`--quick`: a 2-block model (d_model 32), 40 dense steps, 10 recovery steps; its
`layers25` drops 1 of the 2 blocks. Deterministic for a seed. On a 2-core CPU one row
with two seeds took 95 minutes (`--rows mlp50+heads25`), all three rows take about
4.5 hours (it prints its budget and a projection from a measured dense step); the
dense params are cached in `--cache`, and XLA's programs in `--xla-cache`, so a rerun
pays less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import bench_quality
import bench_shrink
import lm_data
import lm_model
import shrink_lm

import jaxprune

# bench_quality's model, data, recipe and dense budget.
FULL = bench_quality.Setup()
QUICK = bench_quality.Setup(d_model=32, layers=2, heads=4, d_ff=64, context=32, batch_size=8,
                            dense_steps=40, eval_batches=2)
ROWS = {
    "mlp50+heads25": {"fractions": {"mlp_hidden": 0.5, "heads": 0.75},
                      "methods": shrink_lm.IMPORTANCES},
    "residual25": {"fractions": {"residual": 0.75}, "methods": shrink_lm.IMPORTANCES},
    "layers25": {"drop": 0.25, "methods": ("influence", "last")},
}
METHOD_NAMES = {"influence": "block influence", "last": "last blocks"}
# Recovery: bench_quality's tuned retraining peak lr (3e-3 beat 1e-3 and 3e-4 here), half KL.
DISTILL_WEIGHT, TEMPERATURE, RECOVERY_LR = 0.5, 2.0, 3e-3
CALIBRATION_BATCHES = 8
SCRATCH_INIT_OFFSET = 1000  # the scratch baseline's init seed: seed + this
GOAL_DEGRADATION = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=bench_quality.DEFAULT_DATA,
                 help="text file (default: tinyshakespeare in ../shared/data; the embedded "
                      "corpus of examples/lm_data.py when absent)")
  p.add_argument("--cache", default=bench_quality.DEFAULT_CACHE, help="dense-params cache")
  p.add_argument("--seeds", default="0,1", help="comma list (default 0,1)")
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
  p.add_argument("--dense-steps", type=int, default=None,
                 help=f"default {FULL.dense_steps} (--quick: {QUICK.dense_steps})")
  p.add_argument("--recovery-steps", type=int, default=None,
                 help="per shrunk model (default: a quarter of the dense steps)")
  p.add_argument("--timing-rounds", type=int, default=None, help="default 5 (--quick: 2)")
  p.add_argument("--xla-cache", default=None,
                 help="XLA's persistent compilation cache (default CACHE/xla; 'none': off): "
                      "the estimators of a row and the seeds compile one program")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown or not args.rows or not args.seeds:
    p.error(f"--rows: expected some of {', '.join(ROWS)}; --seeds: at least one")
  if args.timing_rounds is None:
    args.timing_rounds = 2 if args.quick else 5
  return args


def spread(values: list[float]) -> dict[str, Any]:
  """Mean and half the range of per-seed values."""
  return {"per_seed": values, "mean": statistics.fmean(values),
          "spread": (max(values) - min(values)) / 2}


def dense_step_seconds(problem: bench_quality.Problem, setup: bench_quality.Setup,
                       steps: int = 5) -> float:
  """A dense pretraining step's median seconds (after a compiling step): for the budget."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),  # as bench_quality.pretrain's
                   optax.adamw(bench_quality.warmup_cosine(setup.dense_lr, setup.dense_steps),
                               weight_decay=0.01))
  step = jaxprune.make_train_step(problem.loss_fn, tx)
  params, state = problem.template, tx.init(problem.template)
  rng = jax.random.key_data(jax.random.key(0))
  jax.block_until_ready(step(params, state, problem.batch_at(0), rng, 0))
  times = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(params, state, problem.batch_at(i), rng, i))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def budget(setup: bench_quality.Setup, recovery: int, rows: list[str], seeds: int,
           step_s: float) -> dict[str, Any]:
  """Training steps per seed, and a projection in dense-step equivalents, with the
  costs measured on the default model (2-core CPU): a distilled step of a shrunk model
  ~0.75 of a dense step, of a masked dense one ~1.05, a from-scratch step of a shrunk
  model ~0.7, a forward (teacher logits once per seed, evaluations) ~0.3."""
  shrunk = sum(len(ROWS[r]["methods"]) for r in rows)
  units = setup.dense_steps + 0.3 * recovery  # dense pretraining, teacher logits
  units += shrunk * recovery * 0.75 + len(rows) * recovery * 1.05  # distilled recoveries
  units += len(rows) * (setup.dense_steps + recovery) * 0.7  # scratch baselines
  units += (shrunk + len(rows)) * 2 * setup.eval_batches * 0.3  # before / after evaluations
  return {"dense_steps": setup.dense_steps, "recovery_steps": recovery,
          "shrunk_recoveries": shrunk, "masked_recoveries": len(rows),
          "scratch_runs": len(rows), "scratch_steps": setup.dense_steps + recovery,
          "dense_step_s": step_s, "dense_step_equivalents_per_seed": units,
          "projected_minutes": units * seeds * step_s / 60}


# ----------------------------------------------------------------------------- one seed


def perplexity_of(apply, params, eval_batches) -> float:
  eval_step = jaxprune.training.make_eval_step(lm_model.next_token_loss(apply),
                                               jaxprune.training.perplexity)
  return jaxprune.training.evaluate(eval_step, params, eval_batches).metric


def scratch(problem: bench_quality.Problem, setup: bench_quality.Setup, recovery: int,
            shrunk: shrink_lm.Shrunk) -> float:
  """(b): a fresh dense init cut to the shrunk sizes, trained from scratch for dense +
  recovery steps on the batches those saw (`batch_at(0..)`), with the dense recipe."""
  fresh = lm_model.split_model(lm_model.TransformerLM(
      problem.config, rngs=nnx.Rngs(setup.seed + SCRATCH_INIT_OFFSET)))[1]
  fresh = lm_model.keep_blocks(fresh, shrunk.kept_blocks)
  if shrunk.keep:
    fresh = jaxprune.structural.shrink(fresh, shrunk.groups, shrunk.keep)
  steps = setup.dense_steps + recovery
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(bench_quality.warmup_cosine(setup.dense_lr, steps),
                               weight_decay=0.01))
  result = jaxprune.train(fresh, lm_model.next_token_loss(shrunk.apply), problem.batch_at,
                          optimizer=tx, steps=steps, hooks=[])
  return perplexity_of(shrunk.apply, result.params, problem.eval_batches)


def unstructured(params, apply, n_kept: int, inputs_at, recovery: int,
                 eval_batches) -> dict[str, Any]:
  """(c): global magnitude masks over the kernels (`select`'s default) leaving `n_kept`
  parameters in all, distilled for the recovery budget with the
  masks held (`pruned`)."""
  where = jaxprune.select(params)
  total = lm_model.param_count(params)
  targeted = sum(int(np.size(x)) for x, w in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(where)) if w)
  removed = total - n_kept
  if not 0 <= removed <= targeted:
    raise ValueError(f"cannot remove {removed} of the {targeted} targeted weights")
  masks = jaxprune.ranked_masks(params, removed / targeted, where, scope="global")
  masked = jaxprune.apply_masks(params, masks)
  pruned = sum(int(np.size(m) - np.sum(m)) for m in jax.tree.leaves(masks))
  before = perplexity_of(apply, masked, eval_batches)
  tx = jaxprune.pruned(shrink_lm.recovery_optimizer(RECOVERY_LR, recovery), masks)
  recovered, history = shrink_lm.recover(
      masked, apply, inputs_at, steps=recovery, lr=RECOVERY_LR, weight=DISTILL_WEIGHT,
      temperature=TEMPERATURE, eval_batches=eval_batches, optimizer=tx)
  revived = sum(int(np.sum(~np.asarray(m) & (np.asarray(p) != 0))) for p, m in zip(
      jax.tree.leaves(recovered), jax.tree.leaves(masks, is_leaf=lambda x: x is None))
      if m is not None)
  return {"params": total - pruned, "sparsity": pruned / targeted, "before": before,
          "after": history[-1][1], "history": history, "pruned_nonzero_after": revived}


def memoized(inputs_at):
  """`inputs_at` computing each step's batch and teacher logits once: every recovery of
  a seed reads the same steps (their logits stay in memory for the seed's rows)."""
  memo: dict[int, Any] = {}

  def at(step: int) -> Any:
    if step not in memo:
      memo[step] = inputs_at(step)
    return memo[step]

  return at


def run_seed(args, setup: bench_quality.Setup, recovery: int, seed: int,
             models: dict | None) -> dict[str, Any]:
  """Every row of one seed: `{"row|method": measured}`. With `models`, the dense model
  and each row's first shrunk model (recovered) go there, for timing."""
  setup = dataclasses.replace(setup, seed=seed)
  problem = bench_quality.load_problem(args.data, setup)
  key = bench_quality.cache_key(setup, args.data, problem.data_bytes)
  params, _ = bench_quality.dense_params(setup, problem.template, problem.loss_fn,
                                         problem.batch_at, args.cache, key)
  config, eval_batches, batch_at = problem.config, problem.eval_batches, problem.batch_at
  dense_apply = lm_model.make_batch_apply_fn(problem.graphdef, problem.rest)
  dense_ppl = perplexity_of(dense_apply, params, eval_batches)
  n_dense = lm_model.param_count(params)
  print(f"seed {seed}: dense model {n_dense:,} parameters, validation perplexity "
        f"{dense_ppl:.3f}", flush=True)
  # The recovery stream: the training stream past the dense steps, as in shrink_lm.py.
  inputs_at = memoized(shrink_lm.with_teacher(lambda s: batch_at(setup.dense_steps + s),
                                              dense_apply, params))
  calibration = [batch_at(shrink_lm.CALIBRATION_OFFSET + i) for i in range(CALIBRATION_BATCHES)]
  measured = {"dense|dense": {"params": n_dense, "after": dense_ppl}}
  if models is not None:
    models["dense"], models["batch"] = (dense_apply, params), eval_batches[0]
  importances: dict[str, Any] = {}  # of the dense params' groups, shared by the width rows
  for row in args.rows:
    spec, first = ROWS[row], None
    for method in spec["methods"]:
      start = time.perf_counter()
      if "drop" in spec:
        shrunk = shrink_lm.shrink_lm(params, config, {}, calibration, drop_by=method,
                                     drop_layers=max(1, round(spec["drop"] * config.num_layers)))
      else:
        shrunk = shrink_lm.shrink_lm(params, config, spec["fractions"], calibration,
                                     importance=method, importances=importances)
      before = perplexity_of(shrunk.apply, shrunk.params, eval_batches)
      recovered, history = shrink_lm.recover(
          shrunk.params, shrunk.apply, inputs_at, steps=recovery, lr=RECOVERY_LR,
          weight=DISTILL_WEIGHT, temperature=TEMPERATURE, eval_batches=eval_batches)
      n = lm_model.param_count(recovered)
      seconds = time.perf_counter() - start
      measured[f"{row}|{method}"] = {
          "params": n, "before": before, "after": history[-1][1], "history": history,
          "kept_blocks": shrunk.kept_blocks, "widths": {
              k: {str(b): list(v) for b, v in per.items()} for k, per in shrunk.widths.items()},
          "seconds": seconds}
      print(f"  {row} {method}: {n:,} params, perplexity {before:.3f} -> "
            f"{history[-1][1]:.3f} ({seconds:.0f}s)", flush=True)
      if first is None:
        first = shrunk
        if models is not None:
          models[row] = (shrunk.apply, recovered)
    start = time.perf_counter()
    ppl = scratch(problem, setup, recovery, first)
    n = lm_model.param_count(first.params)
    measured[f"{row}|scratch"] = {"params": n, "after": ppl,
                                  "steps": setup.dense_steps + recovery,
                                  "seconds": time.perf_counter() - start}
    print(f"  {row} (b) from scratch, {setup.dense_steps + recovery} steps: perplexity "
          f"{ppl:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    start = time.perf_counter()
    masked = unstructured(params, dense_apply, n, inputs_at, recovery, eval_batches)
    measured[f"{row}|masks"] = {**masked, "seconds": time.perf_counter() - start}
    print(f"  {row} (c) unstructured masks, {masked['params']:,} weights kept: perplexity "
          f"{masked['before']:.3f} -> {masked['after']:.3f} "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
  return measured


# ----------------------------------------------------------------------------- timing


def time_models(models: dict, batch: jax.Array, rounds: int) -> dict[str, dict[str, float]]:
  """Forward and train-step (loss, gradients, SGD) time and FLOPs of each model against
  the dense one, as bench_shrink.py measures them: name -> ratios."""
  variants = {}
  for name, (apply, params) in models.items():
    fwd, _ = bench_shrink.compiled_with_time(apply, params, batch)
    step, _ = bench_shrink.compiled_with_time(
        bench_shrink.make_train_step(lm_model.next_token_loss(apply)), params, batch, donate=(0,))
    variants[name] = {"params": params, "forward": fwd, "step": step,
                      "report": {"forward_flops": bench_shrink.flops(fwd),
                                 "train_step_flops": bench_shrink.flops(step)}}
  times = bench_shrink.timed_rounds(variants, {"inputs": batch, "batch": batch},
                                    argparse.Namespace(rounds=rounds, steps=3))
  out = {}
  for row in bench_shrink.summarize(variants, times):
    out[row["variant"]] = {k: row[k] for k in (
        "forward_time_ratio", "forward_flop_ratio", "train_step_time_ratio",
        "train_step_flop_ratio", "median_forward_s", "median_train_step_s")}
  return out


# ----------------------------------------------------------------------------- report


def aggregate(per_seed: list[dict[str, Any]], timing: dict) -> list[dict[str, Any]]:
  """One row per (row, method) over the seeds, with its ratios to dense, (b), (c)."""
  rows = []
  for key in per_seed[0]:
    row, method = key.split("|")
    values = [m[key] for m in per_seed]
    entry = {"row": row, "method": method, "params": values[0]["params"],
             "perplexity": spread([v["after"] for v in values])}
    if "before" in values[0]:
      entry["before_recovery"] = spread([v["before"] for v in values])
    for extra in ("steps", "sparsity", "kept_blocks"):
      if extra in values[0]:
        entry[extra] = values[0][extra]
    if method == "masks":
      entry["pruned_nonzero_after"] = [v["pruned_nonzero_after"] for v in values]
    entry["seconds"] = [v.get("seconds", 0.0) for v in values]
    speed = timing.get(row) if method != "masks" else timing.get("dense")
    if speed is not None:
      entry["speed"] = speed
    rows.append(entry)
  by = {(r["row"], r["method"]): r for r in rows}
  dense = by[("dense", "dense")]["perplexity"]["mean"]
  for r in rows:
    mean = r["perplexity"]["mean"]
    r["vs_dense"] = mean / dense - 1
    for base in ("scratch", "masks"):
      other = by.get((r["row"], base))
      if other is not None and r["method"] not in ("scratch", "masks"):
        r[f"vs_{base}"] = mean / other["perplexity"]["mean"] - 1
  return rows


def goals(rows: list[dict[str, Any]], setup, recovery: int) -> list[dict[str, Any]]:
  by = {(r["row"], r["method"]): r for r in rows}
  out = []
  act = by.get(("mlp50+heads25", "activation"))
  if act is not None:
    out.append({"id": "within_dense",
                "goal": f"mlp50+heads25 (activation) within +{GOAL_DEGRADATION:.0%} of dense "
                        "perplexity after recovery",
                "value": f"{act['vs_dense']:+.2%}", "pass": act["vs_dense"] <= GOAL_DEGRADATION})
    out.append({"id": "beats_scratch",
                "goal": "mlp50+heads25 (activation) better than (b) the same architecture "
                        "from scratch",
                "value": f"{act['vs_scratch']:+.2%} vs (b)", "pass": act["vs_scratch"] < 0})
  for row in ("mlp50+heads25", "residual25"):
    a, m = by.get((row, "activation")), by.get((row, "magnitude"))
    if a is not None and m is not None:
      a_ppl, m_ppl = a["perplexity"]["mean"], m["perplexity"]["mean"]
      out.append({"id": f"activation_vs_magnitude:{row}",
                  "goal": f"{row}: activation >= magnitude (perplexity after recovery)",
                  "value": f"{a_ppl:.3f} vs {m_ppl:.3f}", "pass": a_ppl <= m_ppl})
  out.append({"id": "recovery_budget", "goal": "recovery <= 25% of the dense steps",
              "value": f"{recovery} / {setup.dense_steps} = {recovery / setup.dense_steps:.0%}",
              "pass": recovery <= setup.dense_steps / 4})
  return out


def _pm(s: dict[str, Any]) -> str:
  return f"{s['mean']:.3f} ± {s['spread']:.3f}"


def _ratio(r: dict[str, Any], key: str) -> str:
  return f"{r[key]:+.1%}" if key in r else "—"


def markdown_table(rows: list[dict[str, Any]], recovery: int, dense_steps: int) -> str:
  lines = ["| row | method | params | training | perplexity before recovery | after "
           "(mean ± spread) | vs dense | vs (b) | vs (c) | fwd speed-up | step speed-up "
           "| FLOP ratio fwd / step |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    method = {"dense": "dense", "scratch": "(b) from scratch",
              "masks": "(c) unstructured masks, global"}.get(
                  r["method"], METHOD_NAMES.get(r["method"], r["method"]))
    training = {"dense": f"{dense_steps} dense steps",
                "scratch": f"{r.get('steps', 0)} steps"}.get(
                    r["method"], f"+{recovery} distilled")
    before = _pm(r["before_recovery"]) if "before_recovery" in r else "—"
    speed = r.get("speed")
    if r["method"] == "masks":
      fwd = step = "1.00 (dense kernels)"
      flop = "1.00 / 1.00"
    elif speed is not None:
      fwd, step = (f"{speed['forward_time_ratio']:.2f}x",
                   f"{speed['train_step_time_ratio']:.2f}x")
      flop = f"{speed['forward_flop_ratio']:.2f} / {speed['train_step_flop_ratio']:.2f}"
    else:
      fwd = step = flop = "—"
    dense_vs = "—" if r["method"] == "dense" else _ratio(r, "vs_dense")
    lines.append(f"| {r['row']} | {method} | {r['params'] / 1e6:.3f}M | {training} | {before} | "
                 f"{_pm(r['perplexity'])} | {dense_vs} | {_ratio(r, 'vs_scratch')} | "
                 f"{_ratio(r, 'vs_masks')} | {fwd} | {step} | {flop} |")
  return "\n".join(lines)


def data_path(path: str, cache: str) -> str:
  """`path`, or when it is absent the embedded corpus of examples/lm_data.py written
  once into the cache directory (so the cache key still names a file)."""
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  embedded = os.path.join(cache, "embedded_corpus.txt")
  if not os.path.exists(embedded):
    Path(embedded + ".tmp").write_text(lm_data.default_corpus_text(), encoding="utf-8")
    os.replace(embedded + ".tmp", embedded)
  print(f"{path} is absent: the embedded corpus (Python standard library sources) instead")
  return embedded


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  started = time.perf_counter()
  setup = QUICK if args.quick else FULL
  if args.dense_steps is not None:
    setup = dataclasses.replace(setup, dense_steps=args.dense_steps)
  recovery = args.recovery_steps or max(1, setup.dense_steps // 4)
  if recovery > setup.dense_steps / 4:
    print(f"warning: {recovery} recovery steps exceed a quarter of the {setup.dense_steps} "
          "dense steps")
  xla_cache = args.xla_cache or os.path.join(args.cache, "xla")
  if xla_cache != "none":
    jax.config.update("jax_compilation_cache_dir", xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s)")
  args.data = data_path(args.data, args.cache)
  probe = bench_quality.load_problem(args.data, dataclasses.replace(setup, seed=args.seeds[0]))
  plan = budget(setup, recovery, args.rows, len(args.seeds), dense_step_seconds(probe, setup))
  print(f"model: {probe.config}, batch {setup.batch_size}, {setup.eval_batches} validation "
        f"batches; seeds {args.seeds}; rows {args.rows}")
  print(f"budget per seed: {plan['dense_steps']} dense steps (cached in {args.cache}); "
        f"{plan['shrunk_recoveries']} shrunk + {plan['masked_recoveries']} masked models "
        f"distilled {recovery} steps each ({recovery / setup.dense_steps:.0%} of the dense "
        f"steps, weight {DISTILL_WEIGHT:g}, temperature {TEMPERATURE:g}, peak lr "
        f"{RECOVERY_LR:g}); {plan['scratch_runs']} from-scratch runs of "
        f"{plan['scratch_steps']} steps")
  print(f"a dense step takes {plan['dense_step_s'] * 1e3:.0f} ms here: about "
        f"{plan['dense_step_equivalents_per_seed']:,.0f} dense-step equivalents per seed, "
        f"projected {plan['projected_minutes']:.0f} min for {len(args.seeds)} seed(s) "
        "(less with the dense params cached)\n", flush=True)
  del probe

  models: dict[str, Any] = {}
  per_seed = []
  for i, seed in enumerate(args.seeds):
    per_seed.append(run_seed(args, setup, recovery, seed, models if i == 0 else None))
  print(f"\ntiming the first seed's models ({args.timing_rounds} interleaved rounds)...",
        flush=True)
  timing = time_models(models, models.pop("batch"), args.timing_rounds)
  rows = aggregate(per_seed, timing)
  checks = goals(rows, setup, recovery)
  seconds = time.perf_counter() - started
  out = {"device": f"{device.platform} ({device.device_kind})", "quick": args.quick,
         "setup": dataclasses.asdict(setup), "seeds": args.seeds, "rows_run": args.rows,
         "recovery_steps": recovery, "recipe": {
             "distill_weight": DISTILL_WEIGHT, "temperature": TEMPERATURE,
             "recovery_lr": RECOVERY_LR, "calibration_batches": CALIBRATION_BATCHES},
         "budget": plan, "timing": timing, "rows": rows, "goals": checks,
         "per_seed": per_seed, "seconds": seconds}
  print(f"\n{probe_line(setup, args, recovery)}\n")
  print(markdown_table(rows, recovery, setup.dense_steps))
  print("\nspread: half the range over the seeds; vs: perplexity after recovery relative to "
        "the dense model, to (b) and to (c); speed-ups: the first seed's recovered model "
        "against the dense one, medians of per-round ratios")
  for c in checks:
    print(f"{'PASS' if c['pass'] else 'MISS'}: {c['goal']}: {c['value']}")
  print(f"total {seconds / 60:.1f} min")
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    print(f"wrote {args.json}")
  return out


def probe_line(setup, args, recovery: int) -> str:
  return (f"LM d_model {setup.d_model}, {setup.layers} layers, {setup.heads} heads, d_ff "
          f"{setup.d_ff}, context {setup.context}, batch {setup.batch_size}; "
          f"{setup.dense_steps} dense steps, {recovery} recovery steps; seeds {args.seeds}; "
          f"data {os.path.basename(args.data)}")


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x)}")


if __name__ == "__main__":
  main()

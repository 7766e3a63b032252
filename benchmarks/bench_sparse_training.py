"""Sparse training from scratch on the example LM: static ERK, SET, RigL, STE.

    python benchmarks/bench_sparse_training.py                    # static, SET, RigL at 0.9
    python benchmarks/bench_sparse_training.py --methods rigl,ste
    python benchmarks/bench_sparse_training.py --quick            # smoke run (tiny sizes)

The model, data and validation batches are bench_quality's (`Setup`): the same
byte-level Transformer LM on tinyshakespeare, the `output_proj` + `fc*` kernels
targeted. Each method trains from the same random init for `dense_steps +
retrain_steps` steps (3,000 by default: the total of bench_quality's dense
pretraining plus its retraining budget, so a row here compares with a prune-retrain
row there at equal total steps), on the same batches (steps 0..2999 of the one
stream), with the dense pretraining optimizer (clip 1.0, AdamW wd 0.01,
warmup-cosine at 3e-3) wrapped:

* `static`: `pruned(opt, erk masks)`, random ERK masks at the target sparsity, held;
* `set`: `drop_and_grow(opt, same masks, schedule=set_schedule(0.3), update_every=100)`;
* `rigl`: `drop_and_grow(opt, same masks, schedule=rigl_schedule(0.3, end=75% of the steps),
  update_every=100)` (Evci et al. 2020's defaults);
* `ste`: `straight_through(opt, schedule=constant_schedule(s), update_every=100)`.

Runs through `jaxprune.train`; each row reports validation perplexity and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_quality
import lm_model

import jaxprune

METHODS = ("static", "set", "rigl", "ste")
UPDATE_EVERY = 100
DROP_FRACTION = 0.3
RIGL_END = 0.75


def optimizer_for(method: str, params: Any, where: Any, sparsity: float, steps: int,
                  lr: float, every: int) -> optax.GradientTransformation:
  inner = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(bench_quality.warmup_cosine(lr, steps), weight_decay=0.01))
  if method == "ste":
    return jaxprune.sparse_training.straight_through(inner, where=where, update_every=every,
                                     schedule=optax.constant_schedule(sparsity))
  start = jaxprune.ranked_masks(params, sparsity, where, score=jaxprune.scores.random_score(0),
                                distribution=jaxprune.distributions.erk())
  if method == "static":
    return jaxprune.pruned(inner, start)
  if method == "set":
    schedule = jaxprune.sparse_training.set_schedule(DROP_FRACTION, seed=0)
  else:
    end = max(1, round(RIGL_END * steps))
    schedule = jaxprune.sparse_training.rigl_schedule(DROP_FRACTION, end=end)
  return jaxprune.sparse_training.drop_and_grow(inner, start, schedule=schedule,
                                                update_every=every)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=bench_quality.DEFAULT_DATA, help="text file (default: "
                 "tinyshakespeare in ../shared/data relative to the repository root)")
  p.add_argument("--methods", default="static,set,rigl", help=f"comma list of {METHODS}")
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (default: bench_quality's dense + retrain steps, 3000)")
  p.add_argument("--json", default=None, help="write every row here (after each row)")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  args = p.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in args.methods:
    if m not in METHODS:
      p.error(f"unknown method {m!r}: one of {', '.join(METHODS)}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  setup = bench_quality.QUICK if args.quick else bench_quality.Setup()
  steps = args.steps or setup.dense_steps + setup.dense_steps // 2
  every = 10 if args.quick else UPDATE_EVERY
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  problem = bench_quality.load_problem(args.data, setup)
  params = problem.template
  where = jaxprune.select(params, include=lm_model.PRUNE_TARGETS)
  out: dict[str, Any] = {"setup": dataclasses.asdict(setup), "steps": steps,
                         "sparsity": args.sparsity, "update_every": every, "rows": []}
  print(f"{steps} steps from the random init at sparsity {args.sparsity:g}; "
        f"masks updated every {every} steps\n", flush=True)
  for method in args.methods:
    tx = optimizer_for(method, params, where, args.sparsity, steps, setup.dense_lr, every)
    start = time.perf_counter()
    result = jaxprune.train(params, problem.loss_fn, problem.batch_at, optimizer=tx,
                            steps=steps, eval_batches=problem.eval_batches,
                            metric=jaxprune.training.perplexity, hooks=[])
    # The masks' count (a kept weight may sit at 0: grown ones start there).
    report = jaxprune.sparsity_report(result.params, where)
    row = {"method": method, "perplexity": result.evaluation.metric,
           "loss": result.evaluation.loss,
           "targeted_sparsity": jaxprune.training.pruned_fraction(
               jaxprune.get_masks(result.opt_state)),
           "zeros_in_targeted": report.targeted_sparsity,
           "whole_model_sparsity": report.overall_sparsity,
           "seconds": time.perf_counter() - start}
    out["rows"].append(row)
    print(f"{method}: perplexity {row['perplexity']:.3f}, targeted "
          f"{100 * row['targeted_sparsity']:.2f}%, {row['seconds']:.0f}s", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
  print("\n| method | perplexity | targeted sparsity | seconds |\n|---|---:|---:|---:|")
  for r in out["rows"]:
    print(f"| {r['method']} | {r['perplexity']:.3f} | {100 * r['targeted_sparsity']:.2f}% | "
          f"{r['seconds']:.0f} |")
  assert all(np.isfinite(r["perplexity"]) for r in out["rows"])
  return out


if __name__ == "__main__":
  main()

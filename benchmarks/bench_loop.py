"""Throughput of `prune_retrain`'s retraining against a hand-written jitted optax loop.

    python benchmarks/bench_loop.py                  # small Transformer LM, 3 rounds
    python benchmarks/bench_loop.py --quick          # tiny sizes, smoke run
    python benchmarks/bench_loop.py --json out.json  # also write the numbers

Model and data: the example byte-level Transformer LM (`examples/lm_model.py`) on
`--data` (default: tinyshakespeare in ../shared/data next to the repository, else the
built-in corpus of `examples/lm_data.py`), `make_train_batches` (a pure step -> batch
function, the same one in every loop) and `make_eval_batches`; AdamW; the
`output_proj` + `fc*` kernels targeted.

1. Retraining throughput (goal: ratio >= 0.95). Each of `--rounds` rounds is one
   `prune_retrain` run: a schedule of `--iterations` targets, `--steps` retraining steps
   each, one tiny evaluation batch, no checkpoints, `progress=False`. The retraining
   phase of iteration i is timed from the moment the loop asks `train_batches` for the
   iteration's first batch to the moment it next asks for the evaluation batches
   (which comes after the loop's end-of-phase loss check, a host sync that waits for
   the last step); evaluation and pruning lie outside these windows.

   Right after each phase, inside that evaluation-batches request (so outside the
   timed windows, with the device idle), two hand-written loops run the same `--steps`
   steps on the same batches, in alternating order:

   * hand `pruned(adamw)`: `step = jax.jit(...)` (value_and_grad, the optimizer
     `prune_retrain` builds, apply_updates), compiled and warmed up beforehand, then
     `for g: params, opt_state, loss = step(params, opt_state, batch_fn(g))` and one
     `block_until_ready`. Same compiled math, so the ratio measures what the loop
     itself costs (per-step key and step arguments, loss bookkeeping, periodic checks).
   * hand `adamw`: the same without `pruned`, for reference (the masking cost itself
     is the subject of `bench_step.py`).

   Phase i >= 1 is compared with the mean speed of the hand loops run just before it
   (after phase i-1) and just after it: a paired, bracketed measurement, robust to
   the slow load changes of a shared machine. Phase 0 holds the train step's
   compilation and is only a bracket end. The table gives the median paired ratio.

2. Whole run: one `prune_retrain` with a realistic evaluation set and checkpoints
   (`--eval-batches` batches, a checkpoint every `--steps // 2` steps and at the end
   of each iteration), timed end to end (compilation included) and split into
   retraining phases (timed as above, iteration 0 included), checkpoint saves (the
   synchronous saves, timed by a `Checkpointer` subclass) and the rest (evaluation,
   pruning, compilation, setup). It is compared with the retraining steps alone: the
   hand `pruned(adamw)` loop's median step time (from part 1) times the run's total
   step count.

3. Checkpoint bytes: the last checkpoint of the whole run (params, AdamW state, packed
   masks, RNG, JSON meta) against the params alone saved with orbax `StandardSave`,
   both measured on disk (apparent bytes of the files, and allocated blocks as `du`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import lm_data  # noqa: E402
import lm_model  # noqa: E402

import jaxprune  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
FULL = {"d_model": 128, "num_layers": 2, "num_heads": 4, "d_ff": 512, "context": 64}
QUICK = {"d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64, "context": 16}
GOAL = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny model, 1 round, few steps")
  p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None,
                 help="text file (default: ../shared/data/tinyshakespeare.txt next to the "
                      "repository if it exists, else the built-in corpus)")
  p.add_argument("--rounds", type=int, default=None,
                 help="prune_retrain runs of part 1 (default 3)")
  p.add_argument("--iterations", type=int, default=None,
                 help="schedule length (default 4; iteration 0 is not compared)")
  p.add_argument("--steps", type=int, default=None, help="retraining steps per iteration "
                 "(default 30)")
  p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 8)")
  p.add_argument("--eval-batches", type=int, default=None,
                 help="evaluation batches of the whole-run measurement (default 8)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH")
  args = p.parse_args(argv)
  defaults = ({"rounds": 1, "iterations": 3, "steps": 5, "batch_size": 2, "eval_batches": 2}
              if args.quick else
              {"rounds": 3, "iterations": 4, "steps": 30, "batch_size": 8, "eval_batches": 8})
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("rounds", "steps", "batch_size", "eval_batches"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.iterations < 2:
    p.error("--iterations must be >= 2 (iteration 0 holds the compilation and is not timed)")
  return args


# ----------------------------------------------------------------------------- pieces


def schedule(n: int) -> list[float]:
  return [round(0.5 + 0.3 * i / (n - 1), 4) for i in range(n)]


class Timeline:
  """Wraps `train_batches` and `eval_batches` to time the retraining phases.

  `windows[i]`: seconds from the loop's request for iteration i's first batch to its
  next request for the evaluation batches. `after_phase(i)`, if given, runs inside
  that request, after the window has closed.
  """

  def __init__(self, batch_fn, eval_batches, first_steps: list[int], after_phase=None):
    self.batch_fn, self.eval_batches = batch_fn, eval_batches
    self.first_steps = set(first_steps)
    self.after_phase = after_phase
    self.windows: list[float] = []
    self._start: float | None = None

  def train(self, step: int):
    if step in self.first_steps:
      self._start = time.perf_counter()
    return self.batch_fn(step)

  def eval(self):
    if self._start is not None:
      self.windows.append(time.perf_counter() - self._start)
      self._start = None
      if self.after_phase is not None:
        self.after_phase(len(self.windows) - 1)
    return self.eval_batches


class TimedSaves(jaxprune.Checkpointer):
  """A `Checkpointer` timing each of its saves (synchronous: done on return)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.seconds: list[float] = []

  def save(self, state, meta):
    t = time.perf_counter()
    super().save(state, meta)
    self.seconds.append(time.perf_counter() - t)


def make_hand_step(loss_fn, tx: optax.GradientTransformation):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)


def hand_loop(step, params, opt_state, batch_fn, first: int, count: int) -> float:
  """Seconds for `count` steps from global step `first` (batches included)."""
  start = time.perf_counter()
  for g in range(first, first + count):
    params, opt_state, loss = step(params, opt_state, batch_fn(g))
  jax.block_until_ready((params, opt_state, loss))
  return time.perf_counter() - start


def disk_bytes(path: Path) -> tuple[int, int]:
  """(apparent bytes: sum of file sizes, allocated bytes: blocks as `du` counts them)."""
  apparent = allocated = 0
  for root, _, files in os.walk(path):
    for name in files:
      st = os.stat(os.path.join(root, name))
      apparent += st.st_size
      allocated += st.st_blocks * 512
  return apparent, allocated


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
  config = lm_model.LMConfig(**(QUICK if args.quick else FULL))
  text = lm_data.load_text(args.data)
  train_tokens, val_tokens = lm_data.train_val_split(lm_data.encode(text))
  batch_fn = lm_data.make_train_batches(train_tokens, args.batch_size, config.context, seed=0)
  tiny_eval = lm_data.make_eval_batches(val_tokens, 1, config.context, 1)
  full_eval = lm_data.make_eval_batches(val_tokens, args.batch_size, config.context,
                                        args.eval_batches)
  graphdef, params, rest = lm_model.split_model(lm_model.TransformerLM(config, rngs=nnx.Rngs(0)))
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  where = jaxprune.select(params, include=lm_model.PRUNE_TARGETS)
  targets = schedule(args.iterations)
  n, k = args.steps, args.iterations
  first_steps = [i * n for i in range(k)]

  def adamw():
    return optax.adamw(1e-3, weight_decay=0.1)

  # The hand loops: compiled and warmed up once, outside the rounds.
  masks = jaxprune.ranked_masks(params, targets[-1], where)
  pruned_params = jaxprune.apply_masks(params, masks)
  hand = {}
  for name, tx in (("pruned(adamw)", jaxprune.pruned(adamw(), masks)), ("adamw", adamw())):
    step, opt_state = make_hand_step(loss_fn, tx), tx.init(pruned_params)
    p, s, loss = step(pruned_params, opt_state, batch_fn(0))
    jax.block_until_ready(loss)
    hand[name] = (step, p, s)

  names = ["hand pruned(adamw)", "hand adamw"]
  samples: list[dict[str, Any]] = []
  hand_step_seconds: dict[str, list[float]] = {v: [] for v in names}
  for r in range(args.rounds):
    hand_sps: dict[str, list[float]] = {v: [] for v in names}

    def after_phase(i: int, r: int = r, hand_sps: dict = hand_sps) -> None:
      for name in names if (i + r) % 2 == 0 else names[::-1]:
        step, p, s = hand[name.removeprefix("hand ")]
        seconds = hand_loop(step, p, s, batch_fn, first_steps[i], n)
        hand_sps[name].append(n / seconds)
        hand_step_seconds[name].append(seconds / n)

    timeline = Timeline(batch_fn, tiny_eval, first_steps, after_phase)
    jaxprune.prune_retrain(
        params, loss_fn, timeline.train, timeline.eval, optimizer=adamw(), targets=targets,
        where=where, retrain_steps=n, hooks=[],
    )
    assert len(timeline.windows) == k
    for i in range(1, k):
      sample = {"round": r, "iteration": i, "prune_retrain": n / timeline.windows[i]}
      for name in names:
        sample[name] = (hand_sps[name][i - 1] + hand_sps[name][i]) / 2
        sample[f"ratio vs {name}"] = sample["prune_retrain"] / sample[name]
      samples.append(sample)
      print(f"round {r + 1}/{args.rounds} iteration {i}: " + ", ".join(
          f"{v} {sample[v]:.2f} steps/s" for v in ["prune_retrain", *names]),
          file=sys.stderr, flush=True)
  for name in ("pruned(adamw)", "adamw"):
    assert hand[name][0]._cache_size() == 1, f"hand {name} step compiled more than once"
  ratios = {v: [x[f"ratio vs {v}"] for x in samples] for v in names}

  # 2. The whole run, evaluation and checkpoints included; 3. checkpoint bytes.
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    timeline = Timeline(batch_fn, full_eval, first_steps)
    saves = TimedSaves(str(tmp / "ckpt"), every=max(1, n // 2))
    start = time.perf_counter()
    result = jaxprune.prune_retrain(
        params, loss_fn, timeline.train, timeline.eval, optimizer=adamw(),
        targets=targets, where=where, retrain_steps=n, checkpointer=saves, hooks=[],
    )
    whole = time.perf_counter() - start
    windows = timeline.windows
    hand_step_s = statistics.median(hand_step_seconds["hand pruned(adamw)"])
    steps_alone = hand_step_s * n * k

    latest = max(int(p.name) for p in (tmp / "ckpt").iterdir() if p.name.isdigit())
    ckpt_bytes = disk_bytes(tmp / "ckpt" / str(latest))
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(tmp / "params_only", args=ocp.args.StandardSave(result.params))
    params_bytes = disk_bytes(tmp / "params_only")

  targeted = sum(int(np.prod(x.shape)) for x, s in
                 zip(jax.tree.leaves(params), jax.tree.leaves(where)) if s)
  # The optimizer state without the packed masks it holds (counted on their own).
  opt_state_bytes = (tree_bytes(result.opt_state)
                     - tree_bytes(jaxprune.tree.pack_masks(result.masks)))
  return {
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
                f"{jax.device_count()} device(s), {os.cpu_count()} CPU(s)",
      "quick": args.quick,
      "data": args.data or "built-in corpus (examples/lm_data.default_corpus_text)",
      "config": {k_: getattr(config, k_) for k_ in
                 ("d_model", "num_layers", "num_heads", "d_ff", "context", "vocab_size")},
      "params": lm_model.param_count(params),
      "targeted_params": targeted,
      "batch_size": args.batch_size,
      "schedule": targets,
      "steps_per_iteration": n,
      "rounds": args.rounds,
      "samples": samples,
      "median_steps_per_s": {v: statistics.median(x[v] for x in samples)
                             for v in ["prune_retrain", *names]},
      "ratios": ratios,
      "ratio": {v: statistics.median(r) for v, r in ratios.items()},
      "goal": GOAL,
      "whole_run": {
          "eval_batches": args.eval_batches,
          "checkpoint_every": max(1, n // 2),
          "total_steps": n * k,
          "wall_s": whole,
          "retrain_phases_s": sum(windows),
          "retrain_phase_s_per_iteration": windows,
          # Iteration 0's phase beyond n steady-state steps: mostly the train step's compile.
          "iteration0_excess_s": windows[0] - n * hand_step_s,
          "checkpoint_saves": len(saves.seconds),
          "checkpoint_s": sum(saves.seconds),
          "other_s": whole - sum(windows) - sum(saves.seconds),
          "steps_alone_s": steps_alone,
          "wall_over_steps_alone": whole / steps_alone,
          "final_perplexity": result.final.metric,
          "achieved_sparsity": result.achieved_sparsity,
      },
      "checkpoint_bytes": {
          "checkpoint_apparent": ckpt_bytes[0],
          "checkpoint_allocated": ckpt_bytes[1],
          "params_only_apparent": params_bytes[0],
          "params_only_allocated": params_bytes[1],
          "ratio_apparent": ckpt_bytes[0] / params_bytes[0],
          "ratio_allocated": ckpt_bytes[1] / params_bytes[1],
          "params_array_bytes": tree_bytes(result.params),
          "opt_state_array_bytes": opt_state_bytes,
          "packed_mask_bytes": sum(-(-int(m.size) // 8) for m in jax.tree.leaves(result.masks)),
          "unpacked_mask_bytes": targeted,
      },
  }


def table(r: dict[str, Any]) -> str:
  c, w, b = r["config"], r["whole_run"], r["checkpoint_bytes"]
  sps, ratio = r["median_steps_per_s"], r["ratio"]
  kb = 1024
  lines = [
      f"device: {r['device']}",
      f"data: {r['data']}",
      f"model: {r['params'] / 1e6:.3f}M params (d_model {c['d_model']}, {c['num_layers']} "
      f"layers, d_ff {c['d_ff']}, context {c['context']}), batch {r['batch_size']}; "
      f"{r['targeted_params'] / 1e6:.3f}M targeted; schedule {r['schedule']}, "
      f"{r['steps_per_iteration']} steps per iteration",
      "",
      f"Retraining throughput: {len(r['samples'])} paired samples ({r['rounds']} "
      "prune_retrain runs x iterations 1..): a retraining phase of prune_retrain (from its "
      "first batch request to the evaluation request after its end-of-phase loss check) "
      "against hand-written jitted loops running the same steps on the same batches "
      "just before and just after it (mean of the two). Medians; evaluation, pruning "
      "and compilation excluded.",
      "",
      "| loop | steps/s (median) | prune_retrain / this (median) | min - max | goal |",
      "|---|---:|---:|---|---|",
      f"| prune_retrain | {sps['prune_retrain']:.2f} | - | - | - |",
  ]
  for ref in ("hand pruned(adamw)", "hand adamw"):
    goal = f">= {r['goal']}" if ref == "hand pruned(adamw)" else "(reference)"
    lo, hi = min(r["ratios"][ref]), max(r["ratios"][ref])
    lines.append(f"| {ref} | {sps[ref]:.2f} | {ratio[ref]:.3f} | {lo:.3f} - {hi:.3f} | "
                 f"{goal} |")
  lines.append("")
  lines.append("paired ratios vs hand pruned(adamw): " + ", ".join(
      f"{x:.3f}" for x in r["ratios"]["hand pruned(adamw)"]))
  lines += [
      "",
      f"Whole run ({w['total_steps']} steps, {w['eval_batches']} eval batches, a checkpoint "
      f"every {w['checkpoint_every']} steps and per iteration; compilation included):",
      "",
      "| part | seconds | share |",
      "|---|---:|---:|",
      f"| whole prune_retrain call | {w['wall_s']:.2f} | 100% |",
      f"| retraining phases (iteration 0 with its compile) | {w['retrain_phases_s']:.2f} | "
      f"{w['retrain_phases_s'] / w['wall_s']:.0%} |",
      f"| of which iteration 0 beyond {r['steps_per_iteration']} steady steps (compilation)"
      f" | {w['iteration0_excess_s']:.2f} | {w['iteration0_excess_s'] / w['wall_s']:.0%} |",
      f"| checkpoint saves ({w['checkpoint_saves']}) | {w['checkpoint_s']:.2f} | "
      f"{w['checkpoint_s'] / w['wall_s']:.0%} |",
      f"| other: evaluation, pruning (+ their compilation), setup | {w['other_s']:.2f} | "
      f"{w['other_s'] / w['wall_s']:.0%} |",
      f"| retraining steps alone (hand loop, {w['total_steps']} steps) | "
      f"{w['steps_alone_s']:.2f} | whole / this = {w['wall_over_steps_alone']:.2f}x |",
      "",
      "Checkpoint size (last checkpoint of the whole run vs params alone with orbax "
      "StandardSave):",
      "",
      "| | apparent KiB | allocated KiB (du) |",
      "|---|---:|---:|",
      f"| checkpoint (params, AdamW state, packed masks, RNG, meta) | "
      f"{b['checkpoint_apparent'] / kb:.1f} | {b['checkpoint_allocated'] / kb:.1f} |",
      f"| params only | {b['params_only_apparent'] / kb:.1f} | "
      f"{b['params_only_allocated'] / kb:.1f} |",
      f"| ratio | {b['ratio_apparent']:.2f}x | {b['ratio_allocated']:.2f}x |",
      "",
      "in-memory array bytes (orbax compresses on disk; pruned zeros compress well): params "
      f"{b['params_array_bytes'] / kb:.1f} KiB, optimizer state "
      f"{b['opt_state_array_bytes'] / kb:.1f} KiB, masks packed {b['packed_mask_bytes'] / kb:.1f}"
      f" KiB (1 bit/weight; unpacked bool would be {b['unpacked_mask_bytes'] / kb:.1f} KiB)",
      f"whole run: final perplexity {w['final_perplexity']:.3f}, achieved sparsity "
      f"{w['achieved_sparsity']:.2%}",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  result = run(args)
  print(table(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
  return result


if __name__ == "__main__":
  main()

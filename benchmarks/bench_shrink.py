"""How much faster a physically smaller model is (issue 29): channel groups, shrunk.

    python benchmarks/bench_shrink.py                  # example LM (d_model 256) + a CNN
    python benchmarks/bench_shrink.py --quick          # tiny models, smoke run (seconds)
    python benchmarks/bench_shrink.py --json out.json  # also write the numbers

Two models, each traced once by `channel_groups` and shrunk by `keep_top` (largest
unit norms) + `shrink` with 25%, 50% and 75% of its units removed:

* the example Transformer LM (`examples/lm_model.py`, 6 layers, d_model 256, 8 heads,
  d_ff 1024, context 128): `1 - f` of every `mlp_hidden` and every `heads` group is
  kept, residual and other groups whole. The small forward is `shrunk_program(groups,
  keep)`, the jaxpr re-interpreted with the new sizes (the model writes its head count
  as a constant in a reshape); the dense one is the model's own `apply_fn`;
* a plain-JAX CNN (3x3 convs, NHWC/HWIO, ReLU, two stride-2 convs, global average
  pool, a dense head; 32x32 inputs): `1 - f` of every `conv_channels` group kept. It
  takes its shapes from its arrays, so its own `apply_fn` runs the shrunk params.

Per variant: parameter count; XLA FLOPs (`cost_analysis` of the compiled forward and
train step); forward and train-step time (train step: loss, gradients and a plain SGD
update, params donated; LM loss on token batches, softmax cross-entropy for the CNN);
compile time. Timing runs in interleaved rounds (the variant order rotates each
round; jitted, `block_until_ready`); each time ratio is the median over rounds of
(dense time / variant's time in the same round), each FLOP ratio dense / variant.
`time / FLOP ratio` is time ratio / FLOP ratio; the goal is a time ratio within 1.25x
of the FLOP ratio, i.e. time / FLOP ratio >= 0.8 (PASS / MISS printed as measured),
and for the LM at 50% a forward >= 1.6x faster than the dense one.

Also: `channel_groups` end to end (trace + analysis) on a 32-layer LM (d_model 128),
goal <= 10 s; and the 50% LM's small forward exported for TPU
(`jax.export.export(jax.jit(f), platforms=["tpu"])`, which runs on CPU): its MLIR must
hold the shrunk shapes (the MLP activations `[B, T, d_ff_small]`, and when heads are
removed the per-head tensors `[B, T, heads_small, head_dim]`) and not the dense ones.
"""

from __future__ import annotations

import argparse
import json
import math
import re
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

from jaxprune.structural import (
  channel_groups,
  keep_top,
  magnitude_importance,
  shrink,
  shrunk_program,
)

FRACTIONS = (0.25, 0.5, 0.75)  # of the units removed
LM_KINDS = ("mlp_hidden", "heads")
CNN_KINDS = ("conv_channels",)
FULL = {"d_model": 256, "num_layers": 6, "num_heads": 8, "d_ff": 1024, "context": 128}
# d_ff 160 (not 128 or 256): its shrunk and dense sizes collide with no other LM width
# (64, 192, the vocabulary's 256), so the lowering check cannot pass by accident.
QUICK = {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 160, "context": 32}
CNN_FULL = (64, 64, 128, 256)  # conv widths (out-channels); convs 1 and 2 have stride 2
CNN_QUICK = (8, 8, 16, 16)
CNN_CLASSES = 10
TRACE_FULL = {"d_model": 128, "num_layers": 32, "num_heads": 4, "d_ff": 512, "context": 128}
TRACE_QUICK = {"d_model": 32, "num_layers": 32, "num_heads": 4, "d_ff": 64, "context": 16}
GOALS = {"time_over_flop_ratio": 1 / 1.25, "lm_forward_speedup_at_0.5": 1.6, "trace_s": 10.0}
SGD_LR = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds x 2 steps")
  p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
  p.add_argument("--steps", type=int, default=None, help="timed calls per round (default 3)")
  p.add_argument("--lm-batch", type=int, default=None,
                 help="LM sequences per batch (default 32: a dense forward of a few hundred "
                      "ms on a small CPU)")
  p.add_argument("--cnn-batch", type=int, default=None,
                 help="CNN images per batch (default 512: a dense forward of ~200 ms)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH")
  args = p.parse_args(argv)
  quick_defaults = {"rounds": 2, "steps": 2, "lm_batch": 2, "cnn_batch": 4}
  full_defaults = {"rounds": 6, "steps": 3, "lm_batch": 32, "cnn_batch": 512}
  for name, value in (quick_defaults if args.quick else full_defaults).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("rounds", "steps", "lm_batch", "cnn_batch"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def param_count(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (`cost_analysis` is a dict or a list)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", math.nan))


def compiled_with_time(fn, *args, donate: tuple[int, ...] = ()) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - start


def make_train_step(loss_fn):
  """loss + gradients + a plain SGD update (params donated by the caller's jit)."""
  def step(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    return jax.tree.map(lambda p, g: p - SGD_LR * g, params, grads), loss
  return step


# ----------------------------------------------------------------------------- models


def lm_problem(args: argparse.Namespace) -> dict[str, Any]:
  config = lm_model.LMConfig(**(QUICK if args.quick else FULL))
  graphdef, params, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(0)))
  apply = lm_model.make_apply_fn(graphdef, rest)
  batch = jax.random.randint(jax.random.key(1), (args.lm_batch, config.context + 1), 0,
                             config.vocab_size, dtype=jnp.int32)
  tokens = batch[:, :-1]

  def loss_of(forward):
    def loss_fn(params, batch):
      logits = forward(params, batch[:, :-1]).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss_fn

  groups = channel_groups(apply, params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
  described = {k: getattr(config, k) for k in
               ("d_model", "num_layers", "num_heads", "d_ff", "context", "vocab_size")}
  return {"name": "lm", "params": params, "groups": groups, "kinds": LM_KINDS,
          "dense_forward": apply, "small_forward": lambda keep: shrunk_program(groups, keep),
          "loss_of": loss_of, "inputs": tokens, "batch": batch,
          "config": {"model": "Transformer LM", **described, "batch_size": args.lm_batch}}


def cnn_params(widths: tuple[int, ...], key: jax.Array) -> dict[str, Any]:
  """HWIO 3x3 kernels 3 -> widths[0] -> ... -> widths[-1], a dense head to the classes."""
  keys = jax.random.split(key, len(widths) + 1)
  params = {}
  for i, (k, a, b) in enumerate(zip(keys, (3, *widths[:-1]), widths)):
    params[f"conv{i}"] = {"kernel": jax.random.normal(k, (3, 3, a, b)) * np.sqrt(2 / (9 * a)),
                          "bias": jnp.zeros((b,))}
  params["head"] = {"kernel": jax.random.normal(keys[-1], (widths[-1], CNN_CLASSES))
                    / np.sqrt(widths[-1]), "bias": jnp.zeros((CNN_CLASSES,))}
  return params


def cnn_apply(params: dict[str, Any], images: jax.Array) -> jax.Array:
  """images [N, 32, 32, 3] -> logits [N, classes]; convs 1 and 2 have stride 2."""
  x = images
  convs = sorted((k for k in params if k.startswith("conv")), key=lambda k: int(k[4:]))
  for i, name in enumerate(convs):
    stride = 2 if i in (1, 2) else 1
    x = jax.lax.conv_general_dilated(
        x, params[name]["kernel"], (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + params[name]["bias"])
  return x.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]


def cnn_problem(args: argparse.Namespace) -> dict[str, Any]:
  widths = CNN_QUICK if args.quick else CNN_FULL
  params = cnn_params(widths, jax.random.key(0))
  k1, k2 = jax.random.split(jax.random.key(1))
  images = jax.random.normal(k1, (args.cnn_batch, 32, 32, 3))
  labels = jax.random.randint(k2, (args.cnn_batch,), 0, CNN_CLASSES)

  def loss_of(forward):
    def loss_fn(params, batch):
      x, y = batch
      return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()
    return loss_fn

  groups = channel_groups(cnn_apply, params, jax.ShapeDtypeStruct(images.shape, images.dtype))
  return {"name": "cnn", "params": params, "groups": groups, "kinds": CNN_KINDS,
          "dense_forward": cnn_apply, "small_forward": lambda keep: cnn_apply,
          "loss_of": loss_of, "inputs": images, "batch": (images, labels),
          "config": {"model": "CNN", "widths": list(widths), "strides": [1, 2, 2, 1],
                     "image": [32, 32, 3], "classes": CNN_CLASSES,
                     "batch_size": args.cnn_batch}}


# ----------------------------------------------------------------------------- variants


def label(fraction: float) -> str:
  return "dense" if fraction == 0 else f"-{fraction:.0%}"


def build_variants(problem: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Per variant (dense first): params, kept units per kind, compiled forward and
  train step with their FLOPs and compile times."""
  groups, params = problem["groups"], problem["params"]
  out = {}
  for fraction in (0.0, *FRACTIONS):
    if fraction == 0:
      keep, small, forward = {}, params, problem["dense_forward"]
    else:
      importance = magnitude_importance(groups, params)
      keep = keep_top(groups, importance, 1 - fraction, kinds=problem["kinds"])
      small, forward = shrink(params, groups, keep), problem["small_forward"](keep)
    kept: dict[str, list[int]] = {}
    for i, units in keep.items():
      kept.setdefault(groups[i].kind, [0, 0])
      kept[groups[i].kind][0] += len(units)
      kept[groups[i].kind][1] += groups[i].size
    fwd, fwd_compile = compiled_with_time(forward, small, problem["inputs"])
    step, step_compile = compiled_with_time(make_train_step(problem["loss_of"](forward)),
                                            small, problem["batch"], donate=(0,))
    out[label(fraction)] = {
        "fraction_removed": fraction, "keep": keep, "params": small, "forward_fn": forward,
        "forward": fwd, "step": step,
        "report": {"fraction_removed": fraction, "params": param_count(small),
                   "kept_units": {k: {"kept": a, "of": b} for k, (a, b) in kept.items()},
                   "forward_flops": flops(fwd), "train_step_flops": flops(step),
                   "forward_compile_s": fwd_compile, "train_step_compile_s": step_compile}}
  return out


def timed_rounds(variants: dict[str, dict[str, Any]], problem: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
  """Seconds per forward and per train step, per variant and round; the variant
  order rotates each round."""
  names = list(variants)
  states = {}
  for n in names:  # warm up; each variant trains its own copy
    v = variants[n]
    jax.block_until_ready(v["forward"](v["params"], problem["inputs"]))
    p, loss = v["step"](jax.tree.map(jnp.copy, v["params"]), problem["batch"])
    states[n] = jax.block_until_ready(p)
  times = {n: {"forward": [], "train_step": []} for n in names}
  for r in range(args.rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      v = variants[n]
      start = time.perf_counter()
      outs = [v["forward"](v["params"], problem["inputs"]) for _ in range(args.steps)]
      jax.block_until_ready(outs)
      times[n]["forward"].append((time.perf_counter() - start) / args.steps)
      p = states[n]
      start = time.perf_counter()
      for _ in range(args.steps):
        p, loss = v["step"](p, problem["batch"])
      jax.block_until_ready((p, loss))
      times[n]["train_step"].append((time.perf_counter() - start) / args.steps)
      states[n] = p
  return times


def summarize(variants: dict[str, dict[str, Any]],
              times: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
  dense = variants["dense"]["report"]
  rows = []
  for n, v in variants.items():
    row = {"variant": n, **v["report"]}
    for what, flop_key in (("forward", "forward_flops"), ("train_step", "train_step_flops")):
      t, base = times[n][what], times["dense"][what]
      per_round = [b / x for b, x in zip(base, t)]
      time_ratio = statistics.median(per_round)
      flop_ratio = dense[flop_key] / v["report"][flop_key]
      row[f"{what}_s"] = t
      row[f"median_{what}_s"] = statistics.median(t)
      row[f"{what}_round_ratios"] = per_round
      row[f"{what}_time_ratio"] = time_ratio
      row[f"{what}_flop_ratio"] = flop_ratio
      row[f"{what}_time_over_flop_ratio"] = time_ratio / flop_ratio
      row[f"{what}_meets_goal"] = time_ratio / flop_ratio >= GOALS["time_over_flop_ratio"]
    rows.append(row)
  return rows


def group_summary(groups) -> dict[str, dict[str, int]]:
  out: dict[str, dict[str, int]] = {}
  for g in groups:
    entry = out.setdefault(g.kind, {"groups": 0, "prunable": 0})
    entry["groups"] += 1
    entry["prunable"] += int(g.prunable)
  return out


def run_model(problem: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  variants = build_variants(problem)
  times = timed_rounds(variants, problem, args)
  return {"config": problem["config"], "groups": group_summary(problem["groups"]),
          "rows": summarize(variants, times), "_variants": variants}


# ----------------------------------------------------------------------------- trace, TPU


def trace_time(args: argparse.Namespace) -> dict[str, Any]:
  """`channel_groups` end to end on a 32-layer LM: cold (the first call), then warm."""
  config = lm_model.LMConfig(**(TRACE_QUICK if args.quick else TRACE_FULL))
  graphdef, params, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(0)))
  apply = lm_model.make_apply_fn(graphdef, rest)
  tokens = jax.ShapeDtypeStruct((8, config.context), jnp.int32)
  seconds = []
  for _ in range(2 if args.quick else 3):
    start = time.perf_counter()
    groups = channel_groups(apply, params, tokens)
    seconds.append(time.perf_counter() - start)
  return {"num_layers": config.num_layers, "d_model": config.d_model,
          "params": param_count(params), "groups": len(groups), "first_s": seconds[0],
          "seconds": seconds, "goal_s": GOALS["trace_s"],
          "meets_goal": seconds[0] <= GOALS["trace_s"]}


def tensor_shapes(mlir: str) -> set[tuple[int, ...]]:
  """Every ranked tensor type's shape in MLIR text (`tensor<2x32x80xf32>`)."""
  return {tuple(int(d) for d in m.group(1).split("x")[:-1])
          for m in re.finditer(r"tensor<((?:\d+x)+)[a-z]\w*>", mlir)}


def tpu_lowering(lm: dict[str, Any], problem: dict[str, Any]) -> dict[str, Any]:
  """The 50% LM's small forward exported for TPU: the shrunk shapes, not the dense."""
  variant = lm["_variants"][label(0.5)]
  groups, config, keep = problem["groups"], problem["config"], variant["keep"]
  tokens = problem["inputs"]
  exported = jax.export.export(jax.jit(variant["forward_fn"]), platforms=["tpu"])(
      variant["params"], tokens)
  shapes = tensor_shapes(exported.mlir_module())
  B, T = tokens.shape
  checks = {}
  d_ff_small = {len(u) for i, u in keep.items() if groups[i].kind == "mlp_hidden"}
  for d_ff in sorted(d_ff_small):
    checks[f"[B, T, d_ff] = {[B, T, d_ff]} present"] = (B, T, d_ff) in shapes
  checks[f"dense {[B, T, config['d_ff']]} absent"] = (B, T, config["d_ff"]) not in shapes
  head_dim = config["d_model"] // config["num_heads"]
  heads_small = {len(u) for i, u in keep.items() if groups[i].kind == "heads"}
  for h in sorted(heads_small):
    shape = (B, T, h, head_dim)
    checks[f"[B, T, heads, head_dim] = {list(shape)} present"] = shape in shapes
  if heads_small:
    dense = (B, T, config["num_heads"], head_dim)
    checks[f"dense {list(dense)} absent"] = dense not in shapes
  return {"platforms": ["tpu"], "checks": checks, "heads_removed": bool(heads_small),
          "ok": bool(checks) and all(checks.values()),
          "mlir_chars": len(exported.mlir_module())}


def keep_all_difference(problem: dict[str, Any]) -> float:
  """Largest |logit difference| between the model and `shrunk_program` keeping every
  unit of the groups the benchmark shrinks: the re-interpreted program is the model."""
  groups, params = problem["groups"], problem["params"]
  chosen = keep_top(groups, magnitude_importance(groups, params), 1.0, kinds=problem["kinds"])
  every = {i: np.arange(groups[i].size) for i in chosen}
  same = jax.jit(problem["small_forward"](every))(shrink(params, groups, every), problem["inputs"])
  dense = jax.jit(problem["dense_forward"])(params, problem["inputs"])
  return float(jnp.max(jnp.abs(same - dense)))


# ----------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
  lm_prob = lm_problem(args)
  lm = run_model(lm_prob, args)
  lowering = tpu_lowering(lm, lm_prob)
  lm["keep_all_max_abs_diff"] = keep_all_difference(lm_prob)
  cnn = run_model(cnn_problem(args), args)
  trace = trace_time(args)
  models = {"lm": lm, "cnn": cnn}
  for m in models.values():
    m.pop("_variants")
  half = next(r for r in lm["rows"] if r["fraction_removed"] == 0.5)
  return {
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
                f"{jax.device_count()} device(s)",
      "quick": args.quick,
      "rounds": args.rounds,
      "steps_per_round": args.steps,
      "fractions_removed": list(FRACTIONS),
      "models": models,
      "lm_forward_speedup_at_0.5": half["forward_time_ratio"],
      "lm_forward_speedup_goal_met": half["forward_time_ratio"] >= GOALS[
          "lm_forward_speedup_at_0.5"],
      "trace": trace,
      "tpu_lowering": lowering,
      "goals": GOALS,
  }


def describe(c: dict[str, Any]) -> str:
  if c["model"] == "CNN":
    return (f"CNN, convs {' -> '.join(map(str, [3, *c['widths']]))} (strides "
            f"{c['strides']}), 32x32 images, {c['classes']} classes, batch {c['batch_size']}")
  return (f"Transformer LM (d_model {c['d_model']}, {c['num_layers']} layers, "
          f"{c['num_heads']} heads, d_ff {c['d_ff']}, context {c['context']}), "
          f"batch {c['batch_size']}")


def model_table(m: dict[str, Any]) -> list[str]:
  goal = GOALS["time_over_flop_ratio"]
  kinds = ", ".join(f"{k} {v['prunable']}/{v['groups']} prunable"
                    for k, v in m["groups"].items())
  lines = [f"{describe(m['config'])}", f"groups: {kinds}", "",
           "| variant | kept units | params (M) | fwd GFLOPs | fwd ms | fwd time ratio "
           "| fwd FLOP ratio | fwd time/FLOP | step GFLOPs | step ms | step time ratio "
           "| step FLOP ratio | step time/FLOP | compile fwd+step (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in m["rows"]:
    kept = ", ".join(f"{k} {v['kept']}/{v['of']}" for k, v in r["kept_units"].items()) or "all"
    cells = [r["variant"], kept, f"{r['params'] / 1e6:.3f}"]
    for what in ("forward", "train_step"):
      flop_key = "forward_flops" if what == "forward" else "train_step_flops"
      mark = ("" if r["fraction_removed"] == 0 else
              " PASS" if r[f"{what}_meets_goal"] else " MISS")
      cells += [f"{r[flop_key] / 1e9:.2f}", f"{r[f'median_{what}_s'] * 1e3:.1f}",
                f"{r[f'{what}_time_ratio']:.2f}", f"{r[f'{what}_flop_ratio']:.2f}",
                f"{r[f'{what}_time_over_flop_ratio']:.2f}{mark}"]
    cells.append(f"{r['forward_compile_s']:.1f}+{r['train_step_compile_s']:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append(f"(time/FLOP = time ratio / FLOP ratio; goal >= {goal:.2f}, i.e. the time "
               "ratio within 1.25x of the FLOP ratio)")
  return lines


def table(r: dict[str, Any]) -> str:
  t, low = r["trace"], r["tpu_lowering"]
  lines = [f"device: {r['device']}",
           f"timing: {r['rounds']} interleaved rounds x {r['steps_per_round']} calls; ratios "
           "are medians over rounds of dense / variant", ""]
  for m in r["models"].values():
    lines += model_table(m) + [""]
  goal = r["goals"]["lm_forward_speedup_at_0.5"]
  lines.append(f"LM forward speedup at 50% removed: {r['lm_forward_speedup_at_0.5']:.2f}x "
               f"(goal >= {goal}x: {'PASS' if r['lm_forward_speedup_goal_met'] else 'MISS'})")
  lines.append(f"channel_groups on a {t['num_layers']}-layer LM (d_model {t['d_model']}, "
               f"{t['params'] / 1e6:.1f}M params, {t['groups']} groups): first call "
               f"{t['first_s']:.2f} s, then {', '.join(f'{s:.2f}' for s in t['seconds'][1:])} s "
               f"(goal <= {t['goal_s']:.0f} s: {'PASS' if t['meets_goal'] else 'MISS'})")
  lines.append(f"LM: shrunk_program keeping every unit vs the model: max |logit difference| "
               f"{r['models']['lm']['keep_all_max_abs_diff']:.2e}")
  lines.append(f"TPU lowering of the 50% LM's shrunk forward holds the small shapes: "
               f"{low['ok']} (heads removed: {low['heads_removed']})")
  lines += [f"  {name}: {value}" for name, value in low["checks"].items()]
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

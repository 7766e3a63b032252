"""One-shot pruning without retraining: magnitude, Wanda and SparseGPT (issue 16).

    python benchmarks/bench_oneshot.py            # the table in docs/benchmarks.md
    python benchmarks/bench_oneshot.py --quick    # smoke run (tiny sizes)

The dense LM of `bench_quality.py` (same configuration, same cache: pretrained
once) is pruned on its `output_proj` + `fc*` kernels at each sparsity, with no
retraining, by

* magnitude: `Prune(s)` per leaf (`NM(2, 4)` for 2:4);
* Wanda: `Prune(s, score=wanda_score(stats), scope="row")` (`NM(2, 4, score=...)`);
* SparseGPT: `sparsegpt(params, stats, s, where)` (`nm=(2, 4)`), non-sequential;
* SparseGPT, sequential (the paper's mode): `sparsegpt_sequential(stages, ...)` over
  the example's embedding and blocks (`lm_model.make_stages`), each block calibrated
  on the outputs of the blocks before it as already pruned;

from `input_statistics` over `--calibration` sequences of the training text
(not the validation text). Reported: validation perplexity and its increase over
dense, and wall times of calibration and of each method's pruning (the first
call, compilation included) against one dense forward pass over the calibration
batches measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_quality as bq
import lm_data
import lm_model

import jaxprune

SPARSITIES = ("0.5", "0.6", "0.7", "2:4")


def methods(stats, stages, calibration) -> dict:
  wanda = jaxprune.scores.wanda_score(stats)

  def magnitude(params, where, s):
    target = jaxprune.NM(2, 4) if s == "2:4" else jaxprune.Prune(float(s))
    masks = target.masks(params, where)
    return jaxprune.apply_masks(params, masks), masks

  def wanda_fn(params, where, s):
    target = (jaxprune.NM(2, 4, score=wanda) if s == "2:4"
              else jaxprune.Prune(float(s), score=wanda, scope="row"))
    masks = target.masks(params, where)
    return jaxprune.apply_masks(params, masks), masks

  def sparsegpt(params, where, s):
    if s == "2:4":
      return jaxprune.oneshot.sparsegpt(params, stats, 0.0, where, nm=(2, 4))
    return jaxprune.oneshot.sparsegpt(params, stats, float(s), where)

  def sequential(params, where, s):
    if s == "2:4":
      return jaxprune.oneshot.sparsegpt_sequential(stages, params, calibration, 0.0, where, nm=(2,
                                                                                                4))
    return jaxprune.oneshot.sparsegpt_sequential(stages, params, calibration, float(s), where)

  return {"magnitude": magnitude, "wanda": wanda_fn, "sparsegpt": sparsegpt,
          "sparsegpt-seq": sequential}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=bq.DEFAULT_DATA)
  p.add_argument("--cache", default=bq.DEFAULT_CACHE)
  p.add_argument("--calibration", type=int, default=None,
                 help="calibration sequences (default 128; --quick: 8)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  setup = bq.QUICK if args.quick else bq.Setup()
  n_cal = args.calibration or (8 if args.quick else 128)
  params, graphdef, rest, loss_fn, batch_at, eval_batches = load_dense(args, setup)
  eval_step = jaxprune.training.make_eval_step(loss_fn)

  def ppl(p) -> float:
    return bq.perplexity(float(np.mean([float(eval_step(p, b)[0]) for b in eval_batches])))

  where = jaxprune.select(params, include=lm_model.PRUNE_TARGETS)
  # Calibration: windows of the training stream far past the pretraining steps.
  cal_batch = 8
  calibration = [batch_at(10_000_000 + i)[:cal_batch] for i in range(max(1, n_cal // cal_batch))]
  apply = lm_model.make_batch_apply_fn(graphdef, rest)
  forward = jax.jit(apply)
  forward_s = _seconds(lambda: [jax.block_until_ready(forward(params, b)) for b in calibration])
  start = time.perf_counter()
  stats = jaxprune.oneshot.input_statistics(apply, params, calibration, where, gram=True)
  calibration_s = time.perf_counter() - start
  dense = ppl(params)
  print(f"dense perplexity {dense:.3f}; calibration {len(calibration) * cal_batch} sequences: "
        f"{calibration_s:.1f}s (a dense forward over them: {forward_s:.2f}s); "
        f"unattributed: {stats.unattributed or 'none'}", flush=True)
  spread = feature_norm_spread(stats)
  print("input-feature norm spread, max / median of ||x_j|| per kernel (Wanda's signal): "
        + ", ".join(f"{p} {v:.1f}" for p, v in spread.items()), flush=True)
  stages = lm_model.make_stages(graphdef, rest, setup.layers)
  rows = [_measure(fn, name, s, params, where, dense, ppl)
          for s in SPARSITIES for name, fn in methods(stats, stages, calibration).items()]
  tokens = len(calibration) * cal_batch * setup.context
  layers = per_layer(params, stats, tokens)
  out = {"setup": dataclasses.asdict(setup), "dense_perplexity": dense,
         "calibration_sequences": len(calibration) * cal_batch, "calibration_s": calibration_s,
         "dense_forward_s": forward_s, "unattributed": stats.unattributed, "rows": rows,
         "feature_norm_spread": spread,
         "per_layer": layers}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


def _canonical(path: str) -> str:
  """A leaf's path without nnx's trailing `/value` (as a plain dict of the model names it)."""
  return path.removesuffix("/value")


def feature_norm_spread(stats) -> dict[str, float]:
  """Per kernel, max / median of its input features' norms `||x_j||`: how far Wanda's
  `|w_ij| * ||x_j||` can reorder magnitude's ranking (LLMs grow a few features of
  very large norm; a spread near 1 makes Wanda magnitude per row)."""
  out = {}
  for path, st in sorted(stats.leaves.items()):
    norms = np.sqrt(np.asarray(st.sq_norms, np.float64)).reshape(-1)
    out[_canonical(path)] = float(norms.max() / np.median(norms))
  return out


def _compiled_cost(fn, *args) -> dict:
  """Median seconds of 5 calls after compiling, and the compiled scratch and argument
  bytes (XLA's memory analysis: what the call holds at its peak beyond its outputs)."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  return {"seconds": float(np.median(times)),
          "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
          "argument_bytes": None if memory is None else int(memory.argument_size_in_bytes)}


def per_layer(params, stats, tokens: int) -> list[dict]:
  """For each targeted kernel shape: SparseGPT at 50% on it (from its Gram matrix)
  against that layer's dense forward over the calibration tokens, in the same run."""
  by_path = {_canonical(p): st for p, st in stats.leaves.items()}
  leaves = {_canonical(p): v for p, v in zip(jaxprune.tree.leaf_paths(params),
                                             jax.tree.leaves(params))}
  seen, out = set(), []
  for path, st in sorted(by_path.items()):
    w = leaves[path]
    if w.shape in seen:
      continue
    seen.add(w.shape)
    x = jax.random.normal(jax.random.key(0), (tokens, w.shape[0]), w.dtype)

    def sparsegpt(w, gram, sq_norms, st=st):
      stat = st._replace(gram=gram, sq_norms=sq_norms)
      stats = jaxprune.oneshot.InputStatistics({"k": stat}, {})
      return jaxprune.oneshot.sparsegpt({"k": w}, stats, 0.5, {"k": True})

    prune = _compiled_cost(sparsegpt, w, st.gram, st.sq_norms)
    forward = _compiled_cost(lambda a, b: a @ b, x, w)
    gram = _compiled_cost(lambda a: a.T @ a, x)
    row = {"path": path, "shape": list(w.shape), "sparsegpt": prune, "dense_forward": forward,
           "gram": gram, "time_ratio": prune["seconds"] / forward["seconds"]}
    out.append(row)
    print(f"  {path} {tuple(w.shape)}: SparseGPT 50% {1e3 * prune['seconds']:.1f} ms, scratch "
          f"{prune['temp_bytes'] / 1e6:.2f} MB; dense forward over {tokens:,} tokens "
          f"{1e3 * forward['seconds']:.1f} ms ({forward['temp_bytes'] / 1e6:.2f} MB scratch, "
          f"activations {forward['argument_bytes'] / 1e6:.1f} MB in): "
          f"{row['time_ratio']:.1f}x its time; its Gram {1e3 * gram['seconds']:.1f} ms",
          flush=True)
  return out


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _measure(fn, name: str, s: str, params, where, dense: float, ppl) -> dict:
  start = time.perf_counter()
  pruned_params, _ = fn(params, where, s)
  jax.block_until_ready(pruned_params)
  seconds = time.perf_counter() - start
  value = ppl(pruned_params)
  achieved = jaxprune.sparsity_report(pruned_params, where).targeted_sparsity
  print(f"  {s:>4} {name:>13}: perplexity {value:8.3f} ({100 * (value / dense - 1):+7.1f}%), "
        f"targeted sparsity {100 * achieved:.2f}%, prune {seconds:.2f}s", flush=True)
  return {"sparsity": s, "method": name, "perplexity": value, "increase": value / dense - 1.0,
          "prune_s": seconds, "achieved": achieved}


def load_dense(args, setup) -> tuple:
  """bench_quality's dense LM (from its cache) and what evaluating it takes."""
  with open(args.data, "rb") as f:
    data_bytes = f.read()
  train_tokens, val_tokens = lm_data.train_val_split(
      lm_data.encode(data_bytes.decode("utf-8", errors="replace")))
  config = lm_model.LMConfig(d_model=setup.d_model, num_layers=setup.layers,
                             num_heads=setup.heads, d_ff=setup.d_ff, context=setup.context)
  graphdef, template, rest = lm_model.split_model(
      lm_model.TransformerLM(config, rngs=nnx.Rngs(setup.seed)))
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  batch_at = jax.jit(lm_data.make_train_batches(train_tokens, setup.batch_size, setup.context,
                                                setup.seed))
  key = bq.cache_key(setup, args.data, data_bytes)
  params, _ = bq.dense_params(setup, template, loss_fn, batch_at, args.cache, key)
  eval_batches = lm_data.make_eval_batches(val_tokens, setup.batch_size, setup.context,
                                           setup.eval_batches)
  return params, graphdef, rest, loss_fn, batch_at, eval_batches


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing
  main()

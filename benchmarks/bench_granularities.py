"""Speed of every granularity, score and distribution against a sort-based reference.

    python benchmarks/bench_granularities.py            # 4096x4096 leaf + ~50M-param tree
    python benchmarks/bench_granularities.py --quick    # 1024x1024 leaf + ~3M-param tree

For each pruning method (`jaxprune.Prune(0.8, ...)`, N:M 2:4) on the shapes of
`bench_masks.py` (float32 standard-normal weights), the jitted `target.masks` is
timed against the same masks computed the way JaxPruner computes them: a stable
argsort of the scores (per leaf, of the concatenation for global scope, along
each row for row scope, of the pooled unit scores for blocks and channels, within
each group of 4 for N:M), the lowest `k` pruned. Rounds alternate the two,
medians are reported, with the ratio `reference / jaxprune` of the same run, and
the masks are checked identical (random draws hold no ties at the threshold that
the two tie rules would split differently... and if they do, the check says so).
Compile time is the first call's wall time minus the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_masks

import jaxprune

SPARSITY = 0.8


def methods() -> dict[str, Any]:
  return {
      "layer": jaxprune.Prune(SPARSITY),
      "global": jaxprune.Prune(SPARSITY, scope="global"),
      "ERK (layer)": jaxprune.Prune(SPARSITY, distribution=jaxprune.distributions.erk()),
      "row (axis -2)": jaxprune.Prune(SPARSITY, scope="row"),
      "blocks 4x4 mean": jaxprune.Prune(SPARSITY, scope=jaxprune.blocks((4, 4))),
      "channels (axis -1, l2)": jaxprune.Prune(SPARSITY, scope=jaxprune.channels(-1)),
      "N:M 2:4 (axis -2)": jaxprune.NM(2, 4),
  }


def _kept_lowest(scores: jax.Array, k: Any) -> jax.Array:
  """Kept mask of a flat score vector with its `k` lowest pruned (stable argsort)."""
  order = jnp.argsort(scores, stable=True)
  return jnp.ones(scores.shape, bool).at[order].set(jnp.arange(scores.size) >= k)


def reference(name: str, target: Any, paths: list[str], leaves: list[jax.Array]) -> list:
  """The sort-based masks of `target` (see the module docstring)."""
  mags = [jnp.abs(w) for w in leaves]
  if name == "global":
    flat = jnp.concatenate([m.ravel() for m in mags])
    return bench_masks.split_like(_kept_lowest(flat, round(SPARSITY * flat.size)), leaves)
  if name.startswith("row"):
    out = []
    for m in mags:
      k = round(SPARSITY * m.shape[-2])
      rank = jnp.argsort(jnp.argsort(m, axis=-2, stable=True), axis=-2, stable=True)
      out.append(rank >= k)
    return out
  if name.startswith("N:M"):
    out = []
    for m in mags:
      g = jnp.moveaxis(m, -2, -1).reshape(*m.shape[:-2], m.shape[-1], -1, 4)
      rank = jnp.argsort(jnp.argsort(-g, axis=-1, stable=True), axis=-1, stable=True)
      out.append(jnp.moveaxis((rank < 2).reshape(*m.shape[:-2], m.shape[-1], -1), -1, -2))
    return out
  if name.startswith(("blocks", "channels")):
    unit = target.scope
    out = []
    for m in mags:
      scores = unit.unit_scores(m)
      kept = _kept_lowest(scores.ravel(), round(SPARSITY * scores.size)).reshape(scores.shape)
      out.append(unit.expand(kept, m.shape))
    return out
  counts = (erk_counts(target, paths, [m.shape for m in mags])
            if name.startswith("ERK") else [round(SPARSITY * m.size) for m in mags])
  return [_kept_lowest(m.ravel(), c).reshape(m.shape) for m, c in zip(mags, counts)]


def erk_counts(target: Any, paths: list[str], shapes: list[tuple[int, ...]]) -> list[int]:
  """The ERK counts as Python ints (computed outside the traced reference)."""
  with jax.ensure_compile_time_eval():
    return [int(c) for c in target.distribution.prune_counts(paths, shapes, SPARSITY)]


def supported(name: str, shape: tuple[int, ...]) -> bool:
  if name.startswith("blocks"):
    return len(shape) >= 2 and shape[-2] % 4 == 0 and shape[-1] % 4 == 0
  if name.startswith(("row", "N:M")):
    return len(shape) >= 2 and (not name.startswith("N:M") or shape[-2] % 4 == 0)
  return True


def _time(fn: Callable, arg: Any) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(arg))
  return time.perf_counter() - start


def run_case(case: str, params: Any, rounds: int) -> list[dict]:
  rows = []
  leaves_all, treedef = jax.tree.flatten(params)
  paths = [jaxprune.tree.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for name, target in methods().items():
    where = jax.tree.unflatten(treedef, [supported(name, w.shape) for w in leaves_all])
    chosen = [i for i, w in enumerate(leaves_all) if supported(name, w.shape)]
    ours = jax.jit(lambda p, t=target, wh=where: t.masks(p, wh))
    ref = jax.jit(lambda p, nm=name, t=target, c=tuple(chosen): reference(
        nm, t, [paths[i] for i in c], [jax.tree.leaves(p)[i] for i in c]))
    first_ours, first_ref = _time(ours, params), _time(ref, params)
    t_ours, t_ref = [], []
    for r in range(rounds):
      pair = [(ours, t_ours), (ref, t_ref)]
      for fn, into in (pair if r % 2 == 0 else pair[::-1]):
        into.append(_time(fn, params))
    got = [m for m in jax.tree.leaves(ours(params)) if m is not None]
    want = ref(params)
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, want, strict=True))
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    rows.append({"case": case, "method": name, "params": int(sum(leaves_all[i].size
                                                                   for i in chosen)),
                 "jaxprune_s": mo, "reference_s": mr, "ratio": mr / mo,
                 "compile_s": first_ours - mo, "reference_compile_s": first_ref - mr,
                 "identical": same})
    print(f"{case:>10} {name:>24}: {1e3 * mo:9.1f} ms vs sort {1e3 * mr:9.1f} ms = "
          f"{mr / mo:6.1f}x (compile {first_ours - mo:.2f}s vs {first_ref - mr:.2f}s)"
          f"{'' if same else '  MASKS DIFFER'}", flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| case | method | jaxprune | sort reference | ratio | compile (ref) | identical |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['case']} | {r['method']} | {1e3 * r['jaxprune_s']:.1f} ms | "
                 f"{1e3 * r['reference_s']:.1f} ms | **{r['ratio']:.1f}×** | "
                 f"{r['compile_s']:.2f} s ({r['reference_compile_s']:.2f} s) | "
                 f"{'yes' if r['identical'] else 'NO'} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", default=None, metavar="PATH")
  args = p.parse_args(argv)
  side = 1024 if args.quick else 4096
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; sparsity {SPARSITY}")
  leaf = {"w": jax.random.normal(jax.random.key(0), (side, side))}
  tree = bench_masks.make_tree(bench_masks.tree_shapes(args.quick), 1)
  rows = run_case(f"{side}²", leaf, args.rounds) + run_case("tree", tree, args.rounds)
  print("\n" + markdown(rows))
  out = {"platform": jax.devices()[0].platform, "rows": rows}
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()

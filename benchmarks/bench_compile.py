"""Compile time and scratch memory of `ranked_masks` on trees of many leaves.

    python benchmarks/bench_compile.py                  # 16..512 leaves, 64x64 and 1024x1024
    python benchmarks/bench_compile.py --quick          # 4 and 16 leaves of 64x64
    python benchmarks/bench_compile.py --json out.json  # also write the numbers

A model with hundreds of targeted leaves has a few distinct shapes. `magnitude_rank`
runs the leaves of one shape as one loop (`jaxprune.leaf_groups`), so the program
holds one selection per distinct shape. This benchmark lowers and compiles
`jax.jit(lambda p: ranked_masks(p, 0.8, where, scope=...))` on trees of `--leaves`
leaves of each `--shapes` (abstract `jax.ShapeDtypeStruct`s: nothing is allocated, so
billion-parameter trees compile on a laptop) and reports, per tree and scope:

* trace + lower seconds and XLA compile seconds (a fresh function each time, so no
  cache is hit);
* extra bytes per parameter at peak: `memory_analysis().temp_size_in_bytes` of the
  compiled program over the number of ranked parameters;
* the same for the *unrolled* counterfactual, in the same run: as many leaves, each of
  its own shape (`rows x (cols + i)` for leaf `i`, so no two can share a loop: the
  program an engine without grouping builds), on trees up to `--baseline-max-leaves`
  leaves (its compile time grows too fast beyond that); its bytes are per its own
  parameters;
* the same for JaxPruner's method, in the same run (the reference the compile-time
  goal is measured against): a stable `jnp.argsort` of each leaf's magnitudes (layer)
  or of their concatenation, cut back into leaves (global), the first `k` of that
  order pruned.

Platform: whatever JAX runs on (the CPU lowering holds the radix-histogram engine,
accelerators the comparison-count one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jaxprune


def abstract_tree(n_leaves: int, shape: tuple[int, ...]) -> dict[str, Any]:
  return {f"layer{i:04d}": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
          for i in range(n_leaves)}


def distinct_shapes_tree(n_leaves: int, shape: tuple[int, ...]) -> dict[str, Any]:
  """The unrolled counterfactual: `n_leaves` leaves whose shapes all differ (the last
  axis grows by one per leaf), so every leaf is its own loop."""
  return {f"layer{i:04d}": {"kernel": jax.ShapeDtypeStruct((*shape[:-1], shape[-1] + i),
                                                           jnp.float32)}
          for i in range(n_leaves)}


def argsort_kept(flat: jax.Array) -> jax.Array:
  """JaxPruner's selection: the `k` first entries of a stable argsort are pruned."""
  k = round(0.8 * flat.size)
  order = jnp.argsort(flat, stable=True)
  return jnp.ones(flat.shape, bool).at[order[:k]].set(False)


def argsort_masks(params: Any, scope: str) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  magnitudes = [jnp.abs(w).ravel() for w in leaves]
  if scope == "layer":
    kept = [argsort_kept(m) for m in magnitudes]
  else:
    flat, kept, start = argsort_kept(jnp.concatenate(magnitudes)), [], 0
    for m in magnitudes:
      kept.append(flat[start:start + m.size])
      start += m.size
  return jax.tree.unflatten(treedef, [k.reshape(w.shape) for k, w in zip(kept, leaves)])


def measure(params: Any, scope: str, method: str) -> dict[str, float | None]:
  """`method`: "grouped" (jaxprune) or "argsort" (JaxPruner's). (The unrolled
  counterfactual is "grouped" on `distinct_shapes_tree`.)"""
  where = jax.tree.map(lambda _: True, params)
  jax.clear_caches()  # the library's inner jitted functions would reuse the last trace
  try:
    if method == "argsort":
      fn = jax.jit(lambda p: argsort_masks(p, scope))
    else:
      fn = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.8, where, scope=scope))
    start = time.perf_counter()
    lowered = fn.lower(params)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
  finally:
    jax.clear_caches()
  n = sum(x.size for x in jax.tree.leaves(params))
  stats = compiled.memory_analysis()
  return {
      "lower_s": lowered_at - start,
      "compile_s": compiled_at - lowered_at,
      "extra_bytes_per_param": None if stats is None else stats.temp_size_in_bytes / n,
  }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="4 and 16 leaves of 64x64")
  p.add_argument("--leaves", type=int, nargs="+", default=None)
  p.add_argument("--shapes", nargs="+", default=None, help="e.g. 64x64 1024x1024")
  p.add_argument("--baseline-max-leaves", type=int, default=None)
  p.add_argument("--json", default=None, metavar="PATH")
  args = p.parse_args(argv)
  args.leaves = args.leaves or ([4, 16] if args.quick else [16, 64, 256, 512])
  args.shapes = args.shapes or (["64x64"] if args.quick else ["64x64", "1024x1024"])
  args.baseline_max_leaves = args.baseline_max_leaves or (4 if args.quick else 64)
  return args


def _cell(d: dict | None, key: str, fmt: str) -> str:
  return "-" if d is None or d[key] is None else format(d[key], fmt)


def _total(d: dict | None) -> float | None:
  return None if d is None else d["lower_s"] + d["compile_s"]


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  # What is timed is compilation: a persistent cache (JAX_COMPILATION_CACHE_DIR) would
  # time its loads instead.
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  print(f"device: {jax.devices()[0].platform}; sparsity 0.8; times in seconds "
        "(lower + compile); ratio = jaxprune / argsort, same run")
  print("| leaves | shape | params | scope | lower | compile | extra B/param | "
        "argsort lower + compile | ratio | argsort B/param | unrolled lower + compile |")
  print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  for shape_text in args.shapes:
    shape = tuple(int(d) for d in shape_text.split("x"))
    for n in args.leaves:
      params = abstract_tree(n, shape)
      for scope in ("layer", "global"):
        row = {"leaves": n, "shape": shape_text, "scope": scope,
               "params": sum(x.size for x in jax.tree.leaves(params)),
               "grouped": measure(params, scope, "grouped"),
               "argsort": measure(params, scope, "argsort")}
        if n <= args.baseline_max_leaves:
          row["unrolled"] = measure(distinct_shapes_tree(n, shape), scope, "grouped")
        row["ratio_vs_argsort"] = _total(row["grouped"]) / _total(row["argsort"])
        rows.append(row)
        g, a, u = row["grouped"], row["argsort"], row.get("unrolled")
        print(f"| {n} | {shape_text} | {row['params']:,} | {scope} | {_cell(g, 'lower_s', '.2f')} "
              f"| {_cell(g, 'compile_s', '.2f')} | {_cell(g, 'extra_bytes_per_param', '.2f')} "
              f"| {_total(a):.2f} | {row['ratio_vs_argsort']:.2f} "
              f"| {_cell(a, 'extra_bytes_per_param', '.2f')} "
              f"| {'-' if u is None else format(_total(u), '.2f')} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].platform, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

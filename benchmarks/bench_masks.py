"""Speed and memory of `jaxprune.ranked_masks` against sort, top_k and np.partition.

    python benchmarks/bench_masks.py                  # 4096x4096 leaf + ~50M-param tree
    python benchmarks/bench_masks.py --quick          # 1024x1024 leaf + ~3M-param tree
    python benchmarks/bench_masks.py --json out.json  # also write the numbers

Cases, all at sparsity 0.8 on float32 standard-normal weights:

* one 4096x4096 leaf;
* a ~50M-parameter tree of mixed shapes (embedding, attention and MLP kernels, a
  4-d convolution kernel, an odd-sized head), pruned per leaf (`scope="layer"`) and
  across all leaves (`scope="global"`).

Methods (each jitted, timed to `block_until_ready`):

* `jaxprune`: `ranked_masks(params, 0.8, where, scope=...)` (two-pass radix select);
* `sort`: the textbook reference: `jnp.sort(|w|)` (of the concatenation, for global
  scope), threshold `t` at the k-th smallest, prune `|w| < t` and then ties at `t`
  in index order (a cumsum) until exactly k;
* `top_k`: `lax.top_k(|w|, n - k)` for the kept weights, scattered into a mask;
* `approx_max_k`: the same with `lax.approx_max_k` (recall target 0.95), approximate
  on TPU by design (its masks are compared, not required equal);
* `np.partition`: NumPy on the host: `np.partition(|w|, k - 1)` for the threshold,
  same tie rule (data already in host memory; single-threaded).

Rounds are interleaved (every method once per round, in rotating order) and the
median per method is reported. The sort, top_k and approx_max_k references on the big tree take
tens of seconds per call on a small CPU, so they run fewer rounds there
(`--slow-rounds`, default 2); the table and notes say so.

Every reference breaks ties by flat index like `jaxprune` (a stable argsort would):
16M float32 draws from N(0, 1) do hold repeated magnitudes (the count is printed), so
a bare `|w| > t` threshold would prune a few too many. Masks of all methods are
checked identical to the sort reference.

Peak extra memory is XLA's `memory_analysis().temp_size_in_bytes` of the compiled
function (scratch beyond its inputs and its bool-mask outputs) divided by the number
of ranked parameters.

Goals: >= 16x faster than the sort reference on both sizes, within 2.5x of
np.partition, <= 8 extra bytes per parameter at peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jaxprune

SPARSITY = 0.8
GOAL_VS_SORT = 16.0
GOAL_VS_PARTITION = 2.5
GOAL_BYTES_PER_PARAM = 8.0


# ----------------------------------------------------------------------------- inputs


def tree_shapes(quick: bool) -> dict[str, Any]:
  """Mixed shapes: embedding, attention/MLP kernels, a conv kernel, an odd head."""
  if quick:
    d, ff, vocab, layers = 256, 1024, 4000, 2
  else:
    d, ff, vocab, layers = 1024, 4096, 12000, 3
  blocks = [
      {
          "attn": {"qkv": {"kernel": (d, 3 * d)}, "output_proj": {"kernel": (d, d)}},
          "mlp": {"fc1": {"kernel": (d, ff)}, "fc2": {"kernel": (ff, d)}},
      }
      for _ in range(layers)
  ]
  return {
      "embed": {"embedding": (vocab, d)},
      "stem": {"conv": {"kernel": (3, 3, 64, 96)}},
      "blocks": blocks,
      "head": {"kernel": (d, 1001)},
  }


def make_tree(shapes: Any, seed: int) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, arrays)


# ----------------------------------------------------------------------------- methods


def prune_count(n: int) -> int:
  return round(SPARSITY * n)


def jaxprune_fn(where: Any, scope: str) -> Callable:
  return jax.jit(lambda p: jaxprune.ranked_masks(p, SPARSITY, where, scope=scope))


def split_like(flat: Any, leaves: list[Any]) -> list[Any]:
  """Cuts a flat array into pieces shaped like `leaves` (concatenation order)."""
  out, start = [], 0
  for w in leaves:
    out.append(flat[start : start + w.size].reshape(w.shape))
    start += w.size
  return out


def per_scope(rank: Callable, scope: str) -> Callable:
  """Applies `rank(flat magnitudes) -> flat kept mask` per leaf or to all leaves at once."""

  def layer(leaves):
    return [rank(jnp.abs(w).ravel()).reshape(w.shape) for w in leaves]

  def global_(leaves):
    return split_like(rank(jnp.concatenate([jnp.abs(w).ravel() for w in leaves])), leaves)

  fn = layer if scope == "layer" else global_
  return jax.jit(lambda params: jax.tree.unflatten(jax.tree.structure(params),
                                                   fn(jax.tree.leaves(params))))


def sort_fn(scope: str) -> Callable:
  """The jnp.sort reference, ties broken by index like `jaxprune`.

  t = sort(|w|)[k-1]; prune |w| < t, then the first (in flat order) entries equal
  to t until exactly k are pruned (what a stable argsort gives).
  """

  def kept(flat: jax.Array) -> jax.Array:
    k = prune_count(flat.size)
    t = jnp.sort(flat)[k - 1]
    below = flat < t
    equal = flat == t
    need = k - jnp.sum(below, dtype=jnp.int32)
    return ~(below | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= need)))

  return per_scope(kept, scope)


def top_k_fn(scope: str) -> Callable:
  """lax.top_k of the n - k largest magnitudes (the kept ones), scattered into a mask.

  top_k prefers the lower index among equal values; it runs on the reversed array so
  that ties keep the *higher* index, as in `jaxprune` (which prunes lower ones first).
  """

  def kept(flat: jax.Array) -> jax.Array:
    n = flat.size
    _, idx = lax.top_k(flat[::-1], n - prune_count(n))
    return jnp.zeros(n, jnp.bool_).at[n - 1 - idx].set(True)

  return per_scope(kept, scope)


def approx_max_k_fn(scope: str) -> Callable:
  """`lax.approx_max_k` (recall target 0.95) of the n - k largest magnitudes, scattered
  into a mask: approximate by design on TPU (the kept set may miss some of the true
  largest; exact top-k elsewhere), so its masks are compared, not required equal."""

  def kept(flat: jax.Array) -> jax.Array:
    n = flat.size
    _, idx = lax.approx_max_k(flat[::-1], n - prune_count(n), recall_target=0.95)
    return jnp.zeros(n, jnp.bool_).at[n - 1 - idx].set(True)

  return per_scope(kept, scope)


def partition_fn(scope: str) -> Callable:
  """NumPy on host arrays: np.partition for the k-th smallest, ties broken by index."""

  def kept(flat: np.ndarray) -> np.ndarray:
    k = prune_count(flat.size)
    t = np.partition(flat, k - 1)[k - 1]
    pruned = flat < t
    need = k - int(np.count_nonzero(pruned))
    pruned[np.flatnonzero(flat == t)[:need]] = True
    return ~pruned

  def layer(leaves: list[np.ndarray]) -> list[np.ndarray]:
    return [kept(np.abs(w).ravel()).reshape(w.shape) for w in leaves]

  def global_(leaves: list[np.ndarray]) -> list[np.ndarray]:
    return split_like(kept(np.concatenate([np.abs(w).ravel() for w in leaves])), leaves)

  return layer if scope == "layer" else global_


def temp_bytes(fn: Callable, params: Any) -> int | None:
  try:
    stats = fn.lower(params).compile().memory_analysis()
  except Exception:  # Not every backend reports it.
    return None
  return None if stats is None else int(stats.temp_size_in_bytes)


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_once(fn: Callable, arg: Any) -> float:
  start = time.perf_counter()
  block(fn(arg))
  return time.perf_counter() - start


SLOW = ("sort", "top_k", "approx_max_k")


def run_case(name: str, params: Any, scope: str, rounds: int, slow_rounds: int) -> dict:
  """Times every method on `params` in interleaved rounds; checks the masks."""
  leaves = jax.tree.leaves(params)
  n = sum(w.size for w in leaves)
  where = jax.tree.map(lambda _: True, params)
  host_leaves = [np.asarray(w) for w in leaves]
  methods = {
      "jaxprune": (jaxprune_fn(where, scope), params),
      "sort": (sort_fn(scope), params),
      "top_k": (top_k_fn(scope), params),
      "approx_max_k": (approx_max_k_fn(scope), params),
      "np.partition": (partition_fn(scope), host_leaves),
  }
  print(f"\n[{name}] {len(leaves)} leaves, {n:,} parameters, scope={scope}", flush=True)

  # Compile, warm up, and keep the first outputs for the checks.
  outputs, compile_s = {}, {}
  for m, (fn, arg) in methods.items():
    start = time.perf_counter()
    outputs[m] = block(fn(arg))
    compile_s[m] = time.perf_counter() - start
    print(f"  warm-up {m:<13} {compile_s[m]:8.2f} s (includes compilation)", flush=True)

  ours = [np.asarray(x) for x in jax.tree.leaves(outputs["jaxprune"])]
  ref = [np.asarray(x) for x in jax.tree.leaves(outputs["sort"])]
  pruned_ref = sum(int((~r).sum()) for r in ref)
  k_total = (
      sum(prune_count(w.size) for w in leaves) if scope == "layer" else prune_count(n)
  )
  if pruned_ref != k_total:
    raise SystemExit(f"{name}: the sort reference pruned {pruned_ref}, not {k_total}")
  flat_mags = np.concatenate([np.abs(w).ravel() for w in host_leaves])
  ties = flat_mags.size - np.unique(flat_mags).size
  del flat_mags
  identical = all(np.array_equal(a, b) for a, b in zip(ours, ref))
  others_identical = {
      m: all(np.array_equal(a, np.asarray(b)) for a, b in zip(ref, jax.tree.leaves(outputs[m])))
      for m in ("top_k", "approx_max_k", "np.partition")
  }
  del outputs, ours, ref
  print(f"  {ties:,} repeated magnitudes; masks identical to the sort reference: "
        f"jaxprune {identical}, "
        + ", ".join(f"{m} {ok}" for m, ok in others_identical.items()), flush=True)

  times: dict[str, list[float]] = {m: [] for m in methods}
  order = list(methods)
  for r in range(rounds):
    rotated = order[r % len(order) :] + order[: r % len(order)]
    for m in rotated:
      if m in SLOW and r >= slow_rounds:
        continue
      fn, arg = methods[m]
      times[m].append(time_once(fn, arg))
    summary = ", ".join(f"{m} {times[m][-1] * 1e3:.0f}" for m in order if len(times[m]) > r)
    print(f"  round {r + 1}/{rounds} (ms): {summary}", flush=True)

  median = {m: statistics.median(t) for m, t in times.items()}
  temps = {m: temp_bytes(methods[m][0], params) for m in ("jaxprune", "sort", "top_k")}
  return {
      "case": name,
      "scope": scope,
      "leaves": len(leaves),
      "params": n,
      "pruned": k_total,
      "median_s": median,
      "times_s": times,
      "rounds": {m: len(t) for m, t in times.items()},
      "warmup_s": compile_s,
      "speedup_vs_sort": median["sort"] / median["jaxprune"],
      "speedup_vs_top_k": median["top_k"] / median["jaxprune"],
      "speedup_vs_approx_max_k": median["approx_max_k"] / median["jaxprune"],
      "ratio_to_partition": median["jaxprune"] / median["np.partition"],
      "temp_bytes": temps,
      "extra_bytes_per_param": {m: (None if b is None else b / n) for m, b in temps.items()},
      "masks_identical_to_sort": identical,
      "masks_identical": others_identical,
      "tied_magnitudes": ties,
  }


# ----------------------------------------------------------------------------- report


def fmt_ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def fmt_bytes(b: float | None) -> str:
  return "n/a" if b is None else f"{b:.2f}"


def markdown(results: list[dict]) -> str:
  head = (
      "| case | params | jaxprune ms | sort ms | top_k ms | approx_max_k ms | np.partition ms "
      "| vs sort | vs top_k | vs approx_max_k | / np.partition "
      "| extra B/param (jaxprune / sort / top_k) | masks = sort (approx_max_k's) |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"
  )
  rows = []
  for r in results:
    med, rounds, extra = r["median_s"], r["rounds"], r["extra_bytes_per_param"]
    slow_ms = {}
    for m in SLOW:
      slow_ms[m] = fmt_ms(med[m])
      if rounds[m] < rounds["jaxprune"]:
        slow_ms[m] += f" ({rounds[m]} rnd)"
    rows.append(
        f"| {r['case']} | {r['params'] / 1e6:.1f}M | {fmt_ms(med['jaxprune'])} "
        f"| {slow_ms['sort']} | {slow_ms['top_k']} | {slow_ms['approx_max_k']} "
        f"| {fmt_ms(med['np.partition'])} "
        f"| {r['speedup_vs_sort']:.1f}x | {r['speedup_vs_top_k']:.1f}x "
        f"| {r['speedup_vs_approx_max_k']:.1f}x | {r['ratio_to_partition']:.2f}x "
        f"| {fmt_bytes(extra['jaxprune'])} / {fmt_bytes(extra['sort'])} / "
        f"{fmt_bytes(extra['top_k'])} | {'yes' if r['masks_identical_to_sort'] else 'NO'} "
        f"({'yes' if r['masks_identical']['approx_max_k'] else 'no'}) |"
    )
  return "\n".join([head, *rows])


def goals(results: list[dict]) -> list[str]:
  lines = []
  for r in results:
    extra = r["extra_bytes_per_param"]["jaxprune"]
    checks = [
        (f">= {GOAL_VS_SORT:.0f}x vs sort", r["speedup_vs_sort"] >= GOAL_VS_SORT),
        (f"<= {GOAL_VS_PARTITION:g}x np.partition",
         r["ratio_to_partition"] <= GOAL_VS_PARTITION),
        (f"<= {GOAL_BYTES_PER_PARAM:.0f} B/param", extra is not None
         and extra <= GOAL_BYTES_PER_PARAM),
        ("masks identical", r["masks_identical_to_sort"]),
    ]
    marks = ", ".join(f"{label}: {'met' if ok else 'MISSED'}" for label, ok in checks)
    lines.append(f"- {r['case']}: {marks}")
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="1024x1024 leaf and a ~3M-parameter tree (smoke run)")
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved timing rounds (default 7; 3 with --quick)")
  p.add_argument("--slow-rounds", type=int, default=None,
                 help="rounds of the sort, top_k and approx_max_k references on the tree\n"
                 "(default 2; all rounds with --quick)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the results to PATH")
  args = p.parse_args(argv)
  if args.rounds is None:
    args.rounds = 3 if args.quick else 7
  if args.slow_rounds is None:
    args.slow_rounds = args.rounds if args.quick else 2
  return args


def self_check() -> None:
  """All four methods agree, and prune exactly k, on small tie-heavy trees."""
  rng = np.random.default_rng(0)
  levels = np.array([0.0, -0.0, 0.5, -0.5, 1.0, 2.0], np.float32)
  tree = {"a": jnp.asarray(rng.choice(levels, size=(7, 9))),
          "b": jnp.asarray(rng.choice(levels, size=(5, 3, 2)))}
  where = jax.tree.map(lambda _: True, tree)
  host = [np.asarray(w) for w in jax.tree.leaves(tree)]
  for scope in ("layer", "global"):
    ref = [np.asarray(m) for m in jax.tree.leaves(sort_fn(scope)(tree))]
    got = {
        "jaxprune": jax.tree.leaves(jaxprune_fn(where, scope)(tree)),
        "top_k": jax.tree.leaves(top_k_fn(scope)(tree)),
        "np.partition": partition_fn(scope)(host),
    }
    for m, masks in got.items():
      if not all(np.array_equal(a, np.asarray(b)) for a, b in zip(ref, masks)):
        raise SystemExit(f"self-check: {m} ({scope}) differs from the sort reference on ties")
    expected = (prune_count(63) + prune_count(30)) if scope == "layer" else prune_count(93)
    if sum(int((~r).sum()) for r in ref) != expected:
      raise SystemExit(f"self-check: the sort reference ({scope}) pruned a wrong count")
  print("self-check on tie-heavy data: all methods identical", flush=True)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  self_check()
  side = 1024 if args.quick else 4096
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
      f"jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs (load average {load:.1f} at start); "
      f"sparsity {SPARSITY}, {args.rounds} interleaved rounds",
      flush=True,
  )
  leaf = make_tree({"fc": {"kernel": (side, side)}}, seed=0)
  tree = make_tree(tree_shapes(args.quick), seed=1)
  tree_n = sum(w.size for w in jax.tree.leaves(tree))
  tree_name = f"{tree_n / 1e6:.0f}M tree"

  results = [
      run_case(f"{side}x{side} leaf", leaf, "layer", args.rounds, args.rounds),
      run_case(f"{tree_name}, layer", tree, "layer", args.rounds, args.slow_rounds),
      run_case(f"{tree_name}, global", tree, "global", args.rounds, args.slow_rounds),
  ]

  print("\n" + markdown(results))
  notes = [
      f"Sparsity {SPARSITY}, float32 N(0, 1) weights, median of {args.rounds} interleaved "
      "rounds (jit, block_until_ready); np.partition runs on host arrays.",
  ]
  if args.slow_rounds < args.rounds:
    notes.append(
        f"The sort, top_k and approx_max_k references on the {tree_name} were timed over "
        f"{args.slow_rounds} round(s) only (they are slow on this CPU), marked (N rnd)."
    )
  notes.append(
      "extra B/param: XLA temp bytes of the compiled function / ranked parameters "
      "(np.partition: n/a)."
  )
  print("\n" + "\n".join(notes))
  print("\nGoals:\n" + "\n".join(goals(results)))
  for r in results:
    if not all(r["masks_identical"].values()):
      print(f"WARNING: {r['case']}: masks identical to the sort reference: "
            f"{r['masks_identical']}")

  if args.json:
    payload = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "sparsity": SPARSITY,
        "cpus": os.cpu_count(),
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
        "rounds": args.rounds,
        "slow_rounds_tree": args.slow_rounds,
        "results": results,
        "markdown": markdown(results),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
  ok = all(r["masks_identical_to_sort"] and all(r["masks_identical"].values())
           for r in results)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())

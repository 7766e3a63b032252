"""Mask computation on a sharded ~50M-parameter tree: 8 host devices against 1.

    python benchmarks/bench_sharding.py [--quick] [--json PATH]

Each device count runs in its own subprocess (XLA's host device count is fixed when
jax starts). The tree is FSDP-sharded over all devices; `ranked_masks` in global
scope runs under jit. Reported: median time over rounds (block_until_ready), the ratio
8-device / 1-device, and the per-device memory of the compiled program (arguments +
outputs + temporaries from `memory_analysis`, which XLA reports per device for SPMD
programs). On a CPU the 8 "devices" share the same cores, so the time ratio shows the
cost of partitioning and cross-device reductions, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def tree_shapes(quick: bool) -> list[tuple[int, int]]:
  if quick:
    return [(512, 512)] * 4
  # 8 blocks of a d=1024 transformer: output_proj 1024x1024, fc1 1024x2048, fc2 2048x1024
  # plus one fc1/fc2 pair at 1024x4096: 50.3M targeted parameters.
  return [(1024, 1024), (1024, 2048), (2048, 1024)] * 8 + [(1024, 4096), (4096, 1024)]


def measure(quick: bool, rounds: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxprune

  shapes = tree_shapes(quick)
  keys = jax.random.split(jax.random.key(0), len(shapes))
  params = {f"fc{i}": {"kernel": jax.random.normal(k, s)} for i, (k, s) in enumerate(
      zip(keys, shapes))}
  mesh = jaxprune.sharding.make_mesh({"fsdp": jax.device_count()})
  params = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  where = jaxprune.select(params)
  fn = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where, scope="global"))
  compiled = fn.lower(params, jnp.float32(0.8)).compile()
  mem = compiled.memory_analysis()
  jax.block_until_ready(fn(params, jnp.float32(0.8)))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, jnp.float32(0.8)))
    times.append(time.perf_counter() - start)
  n = sum(int(np.prod(s)) for s in shapes)
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes) if mem is not None else None
  return {"devices": jax.device_count(), "params": n, "median_s": float(np.median(times)),
          "per_device_bytes": per_device,
          "temp_bytes_per_device": None if mem is None else mem.temp_size_in_bytes}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--json", default=None)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args.quick, args.rounds)))
    return
  results = []
  for devices in (1, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))
  one = results[0]
  print(f"ranked_masks, global scope, {one['params'] / 1e6:.1f}M parameters, "
        f"FSDP over all devices, median of {args.rounds}\n")
  print("| devices | median time | time vs 1 device | per-device memory | per-device / 1-device |")
  print("|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['devices']} | {r['median_s'] * 1e3:.0f} ms | "
          f"{r['median_s'] / one['median_s']:.2f}x | {r['per_device_bytes'] / 2**20:.0f} MiB | "
          f"{r['per_device_bytes'] / one['per_device_bytes']:.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

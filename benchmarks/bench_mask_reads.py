"""What reading a held mask costs inside a streaming optimizer update.

    python benchmarks/bench_mask_reads.py                  # 2048x2048 float32
    python benchmarks/bench_mask_reads.py --quick          # 256x256, 3 rounds
    python benchmarks/bench_mask_reads.py --json out.json  # also write the numbers

One Adam first-moment update `mu' = 0.9 mu + 0.1 g'` with `g'` the gradient with its
pruned entries zeroed, jitted with `mu` donated (no allocation per call, as in a
train step), for each way of zeroing:

* `no mask`: `g' = g`, the baseline;
* `where, bool mask`: `where(m, g, 0)` on a 1-byte-per-weight bool mask;
* `where, packed`: the same on the mask unpacked (fused) from its 1-bit form;
* `AND, packed` (how `pruned` zeroes the gradients it hands its inner optimizer): `g`'s
  bits ANDed with a word unpacked to all ones where the mask keeps the weight;
* `multiply, packed`: `g * m` with `m` a 0/1 float (not bitwise `where`: a pruned
  NaN stays NaN and a negative gradient gives -0.0; shown for scale).

XLA's CPU code for this one fusion depends on the order of its operands: with the
donated `mu` as the first argument, every masked variant ran alike (1.15-1.3x the
plain update), with it second (as here) the select-based ones run 1.6-1.8x and the AND
1.15x. The train step itself, where the gradient zeroing moved from a `where` to the
AND, went from 1.087x to 1.005x plain AdamW (`bench_step.py --model mlp`): this
script shows the mechanism, bench_step the figure that counts.

Rounds are interleaved (every variant once per round, in rotating order), each round
times `--calls` calls; the ratio is the median over rounds of (variant / `no mask` in
the same round). Every variant's result is checked against `where, bool mask`
(bitwise for the AND, to float equality for the multiply).
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
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jaxprune


def kept_or_zero(held: jax.Array, g: jax.Array) -> jax.Array:
  """`where(unpack_mask(held), g, 0)` bit for bit, as `pruned` computes it for float
  gradients: `g`'s bits ANDed with a word of all ones where the mask keeps the weight
  and of zeros where not (a pruned NaN or -0.0 comes out +0.0)."""
  unsigned = jnp.dtype(f"uint{8 * g.dtype.itemsize}")
  words = jnp.zeros((), unsigned) - jaxprune.tree.unpack_mask(held).astype(unsigned)
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(g, unsigned) & words, g.dtype)


def zeroings() -> dict[str, tuple[Any, bool]]:
  """Name -> (how g' is made from (held mask, g), whether it reads the packed mask)."""
  return {
      "no mask": (lambda held, g: g, False),
      "where, bool mask": (lambda m, g: jnp.where(m, g, 0.0), False),
      "where, packed": (lambda held, g: jnp.where(jaxprune.tree.unpack_mask(held), g, 0.0), True),
      "AND, packed": (kept_or_zero, True),
      "multiply, packed": (lambda held, g: g * jaxprune.tree.unpack_mask(held).astype(g.dtype),
                           True),
  }


def moment_update(zero):
  return jax.jit(lambda held, mu, g: 0.9 * mu + 0.1 * zero(held, g), donate_argnums=1)


def run(size: int, rounds: int, calls: int) -> dict[str, Any]:
  k = jax.random.split(jax.random.key(0), 3)
  mu0, g = jax.random.normal(k[0], (size, size)), jax.random.normal(k[1], (size, size))
  mask = jax.random.uniform(k[2], (size, size)) > 0.8
  held = jaxprune.tree.pack_mask(mask)
  variants = {n: (moment_update(z), held if packed else mask)
              for n, (z, packed) in zeroings().items()}
  reference = variants["where, bool mask"][0](mask, jnp.copy(mu0), g)
  state, identical = {}, {}
  for name, (fn, m) in variants.items():
    out = fn(m, jnp.copy(mu0), g)
    identical[name] = bool(jnp.array_equal(out, reference))
    state[name] = out
  times: dict[str, list[float]] = {n: [] for n in variants}
  names = list(variants)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, m = variants[name]
      mu, start = state[name], time.perf_counter()
      for _ in range(calls):
        mu = fn(m, mu, g)
      jax.block_until_ready(mu)
      times[name].append((time.perf_counter() - start) / calls)
      state[name] = mu
  base = np.array(times["no mask"])
  return {"size": size, "rounds": rounds, "calls": calls,
          "results": {n: {"median_ms": 1e3 * float(np.median(t)),
                          "ratio": float(np.median(np.array(t) / base)),
                          "equals_where": identical[n]} for n, t in times.items()}}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="256x256, 3 rounds (smoke run)")
  p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30)")
  p.add_argument("--calls", type=int, default=10, help="calls timed per round (default 10)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH")
  args = p.parse_args(argv)
  rounds = args.rounds or (3 if args.quick else 30)
  report = run(256 if args.quick else 2048, rounds, args.calls)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; Adam moment update of a "
        f"{report['size']}x{report['size']} float32, donated, {rounds} rounds x {args.calls}\n")
  print("| zeroing | median | ratio to no mask | result = where |\n|---|---:|---:|:-:|")
  for name, r in report["results"].items():
    print(f"| {name} | {r['median_ms']:.3f} ms | {r['ratio']:.3f} | "
          f"{'yes' if r['equals_where'] else 'no'} |")
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()

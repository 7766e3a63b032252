"""What the checkpoint checks cost, against what they guard (issue 27's goal: <= 10%).

    python benchmarks/bench_checkpoint.py                  # 12 layers x 512 wide, 7 rounds
    python benchmarks/bench_checkpoint.py --quick          # 2 layers x 64 wide, 3 rounds
    python benchmarks/bench_checkpoint.py --json out.json  # also write the numbers

The state is a Transformer-shaped training state: `--layers` layers of four
`width x width` attention kernels and two `width x 4*width` MLP kernels (float32),
every kernel targeted by `pruned(adamw)` at 50% (packed masks), with AdamW's two
moments: what `train` and `prune_retrain` checkpoint. Each round, in turn:

1. **save**: `integrity` (the checksum and NaN/inf flags of every array, on the
   device: what `checkpointing.save` adds) against the orbax write itself (manager
   save, synchronous, to a temporary directory on this machine's disk);
2. **restore**: the same checksums recomputed on the restored state against the
   orbax read (`checkpointing.restore_state` does both);
3. **report-point guard**: `integrity.is_sound` (what `retrain` runs at every report
   point) against one jitted `pruned(adamw)` update of the same state, the least a
   training step does; the per-step overhead at `log_every=50` is the guard's time
   over 50 updates.

Figures are medians over `--rounds`, each ratio against its baseline measured in the
same round (all under jit, `block_until_ready`; the first round, which compiles, is
left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import jaxprune
from jaxprune._src.training import checkpointing, integrity
from jaxprune.training import LoopState


def make_state(layers: int, width: int) -> tuple[LoopState, optax.GradientTransformation]:
  """A Transformer-shaped `LoopState` under `pruned(adamw)`, masks at 50%."""
  keys = iter(jax.random.split(jax.random.key(0), 6 * layers))
  shapes = {"q": (width, width), "k": (width, width), "v": (width, width),
            "o": (width, width), "fc1": (width, 4 * width), "fc2": (4 * width, width)}
  params = {f"layer{i}": {name: {"kernel": 0.02 * jax.random.normal(next(keys), shape)}
                          for name, shape in shapes.items()} for i in range(layers)}
  masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
  tx = jaxprune.pruned(optax.adamw(1e-3), masks)
  return LoopState(params, tx.init(params), jnp.zeros(2, jnp.uint32)), tx


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def one_round(state: LoopState, tx, directory: Path, index: int) -> dict[str, float]:
  manager = checkpointing.open_manager(directory, keep=1)
  tree = {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  checks = _timed(lambda: [integrity.checksums(part) for part in tree.values()])
  write = _timed(lambda: (manager.save(index, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"step": index}))),
      manager.wait_until_finished()))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored = {}
  read = _timed(lambda: restored.setdefault("tree", manager.restore(
      index, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]))
  verify = _timed(lambda: [integrity.checksums(part) for part in restored["tree"].values()])
  manager.close()
  update = jax.jit(lambda p, s, g: tx.update(g, s, p))
  grads = jax.tree.map(jnp.ones_like, state.params)
  jax.block_until_ready(update(state.params, state.opt_state, grads))
  step = _timed(lambda: update(state.params, state.opt_state, grads))
  guard = _timed(lambda: integrity.is_sound(state.params, state.opt_state))
  return {"checksums_ms": 1e3 * checks, "orbax_write_ms": 1e3 * write,
          "orbax_read_ms": 1e3 * read, "verify_ms": 1e3 * verify,
          "update_ms": 1e3 * step, "guard_ms": 1e3 * guard}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="2 layers x 64 wide, 3 rounds")
  p.add_argument("--layers", type=int, default=None, help="layers (default 12)")
  p.add_argument("--width", type=int, default=None, help="model width (default 512)")
  p.add_argument("--rounds", type=int, default=None, help="rounds (default 7)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH")
  args = p.parse_args(argv)
  layers = args.layers or (2 if args.quick else 12)
  width = args.width or (64 if args.quick else 512)
  rounds = args.rounds or (3 if args.quick else 7)
  state, tx = make_state(layers, width)
  arrays = sum(x.size for x in jax.tree.leaves((state.params, state.opt_state)))
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds + 1):
      runs.append(one_round(state, tx, Path(tmp) / "ckpt", r))
  runs = runs[1:]  # the first round compiles
  median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
  ratios = {
      "checksums / orbax write": statistics.median(
          r["checksums_ms"] / r["orbax_write_ms"] for r in runs),
      "verify / orbax read": statistics.median(r["verify_ms"] / r["orbax_read_ms"] for r in runs),
      "guard / (50 updates)": statistics.median(
          r["guard_ms"] / (50 * r["update_ms"]) for r in runs),
  }
  print(f"state: {layers} layers x {width} wide, {arrays / 1e6:.1f}M values "
        f"(params + AdamW moments; masks packed), {rounds} rounds, {jax.devices()[0].platform}")
  for name, value in median.items():
    print(f"  {name:<16} {value:9.2f} ms")
  for name, value in ratios.items():
    print(f"  {name:<26} {value:7.3f}")
  if args.json:
    Path(args.json).write_text(json.dumps(
        {"layers": layers, "width": width, "values": arrays, "rounds": rounds,
         "platform": jax.devices()[0].platform, "median": median, "ratios": ratios,
         "runs": runs}, indent=1))


if __name__ == "__main__":
  main()

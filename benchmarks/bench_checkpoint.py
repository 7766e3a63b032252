"""What the checkpoint checks cost, against what they guard (goal: <= 10%).

    python benchmarks/bench_checkpoint.py                  # 12 layers x 512 wide, 7 rounds
    python benchmarks/bench_checkpoint.py --quick          # 2 layers x 64 wide, 3 rounds
    python benchmarks/bench_checkpoint.py --json out.json  # also write the numbers

The state is a Transformer-shaped training state: `--layers` layers of four
`width x width` attention kernels and two `width x 4*width` MLP kernels (float32),
every kernel targeted by `pruned(adamw)` at 50% (packed masks), with AdamW's two
moments: what `train` and `prune_retrain` checkpoint. Each round, in turn:

1. **save**: `jaxprune.Checkpointer.save` (the checksum and NaN/inf flags of every
   array, on the device, then the orbax write) against a plain orbax
   `CheckpointManager` writing the same tree (synchronous, to a temporary directory
   on this machine's disk); the checks' cost is the difference;
2. **restore**: `Checkpointer.resume` (the orbax read, then the same checksums
   recomputed and compared, and the meta's digest) against a plain orbax read;
3. **report-point guard**: the same checksum pass (what a run checks at every
   report point) against one jitted `pruned(adamw)` update of the same state, the
   least a training step does; the overhead of a guard every 50 steps is its time
   over 50 updates. It is read off the save's difference (the guard is that pass).

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
  tree = {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  options = ocp.CheckpointManagerOptions(max_to_keep=1)
  with ocp.CheckpointManager((directory / "orbax").absolute(), options=options) as manager:
    write = _timed(lambda: (manager.save(index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"step": index}))),
        manager.wait_until_finished()))
    read = _timed(lambda: manager.restore(
        index, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"])
  with jaxprune.Checkpointer(directory / "checked", keep=1) as ckpt:
    ckpt.resume(state, {})  # this run's settings (none), which every save records
    save = _timed(lambda: ckpt.save(state, {"step": index}))
  with jaxprune.Checkpointer(directory / "checked", keep=1) as ckpt:
    resume = _timed(lambda: ckpt.resume(state, {})[0])
  update = jax.jit(lambda p, s, g: tx.update(g, s, p))
  grads = jax.tree.map(jnp.ones_like, state.params)
  jax.block_until_ready(update(state.params, state.opt_state, grads))
  step = _timed(lambda: update(state.params, state.opt_state, grads))
  return {"checkpointer_save_ms": 1e3 * save, "orbax_write_ms": 1e3 * write,
          "checkpointer_resume_ms": 1e3 * resume, "orbax_read_ms": 1e3 * read,
          "update_ms": 1e3 * step}


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
  checks = [r["checkpointer_save_ms"] - r["orbax_write_ms"] for r in runs]
  ratios = {
      "checksums / orbax write": statistics.median(
          c / r["orbax_write_ms"] for c, r in zip(checks, runs)),
      "verify / orbax read": statistics.median(
          (r["checkpointer_resume_ms"] - r["orbax_read_ms"]) / r["orbax_read_ms"] for r in runs),
      "guard / (50 updates)": statistics.median(
          c / (50 * r["update_ms"]) for c, r in zip(checks, runs)),
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

"""The small runs the fault tests break: an 8 -> 16 -> 4 MLP, trained by `train`
or pruned by `prune_retrain`, with batches that are a pure function of the step.

`Batches(nan_grad_at=g)` gives step `g` a batch whose loss is finite but whose
gradient is NaN (`sqrt(z * |W|^2)` at `z = 0`: the value 0, the derivative
`inf * 0`), the fault a NaN-loss guard alone does not see.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune

TEACHER = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)


def make_params(seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  return {"fc1": {"kernel": jnp.asarray(r.normal(size=(8, 16)).astype(np.float32) * 0.5),
                  "bias": jnp.zeros((16,), jnp.float32)},
          "fc2": {"kernel": jnp.asarray(r.normal(size=(16, 4)).astype(np.float32) * 0.5)}}


def make_batch(seed: int, size: int = 8, z: float = 1.0) -> dict:
  x = np.random.default_rng(seed).normal(size=(size, 8)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ TEACHER, axis=-1).astype(np.int32),
          "z": np.float32(z)}


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return ce + 1e-3 * jnp.sqrt(batch["z"] * jnp.sum(params["fc1"]["kernel"] ** 2))


class Batches:
  """`train_batches(step)`, recording the steps asked for."""

  def __init__(self, nan_grad_at: int | None = None):
    self.steps: list[int] = []
    self.nan_grad_at = nan_grad_at

  def __call__(self, step: int) -> dict:
    self.steps.append(int(step))
    return make_batch(int(step), z=0.0 if step == self.nan_grad_at else 1.0)


EVAL_BATCHES = [make_batch(10_000 + i, 16) for i in range(2)]


def _seams(overrides: dict) -> dict:
  """The harness's checkpoint settings (`checkpoint_dir`, `checkpoint_every` 2 by
  default, `keep_checkpoints`, `resume`) as the driver's `checkpointer`, and
  `log_every` (2 by default) as the cadence of a hook that only marks report points."""
  directory = overrides.pop("checkpoint_dir", None)
  every = overrides.pop("checkpoint_every", 2)
  keep = overrides.pop("keep_checkpoints", 3)
  resume = overrides.pop("resume", True)
  log_every = overrides.pop("log_every", 2)
  if directory is not None:
    overrides.setdefault("checkpointer", jaxprune.Checkpointer(directory, every=every, keep=keep,
                                                              resume=resume))
  overrides.setdefault("hooks", [jaxprune.training.every(log_every, lambda report: None)])
  return overrides


def train(**overrides) -> jaxprune.training.TrainResult:
  """`jaxprune.train` of the MLP: 8 steps of Adam, saved every 2, unless overridden."""
  params = overrides.pop("params", None) or make_params()
  loss = overrides.pop("loss_fn", loss_fn)
  batches = overrides.pop("train_batches", None) or Batches()
  kwargs = dict(optimizer=optax.adam(1e-2), steps=8)
  kwargs.update(_seams(overrides))
  return jaxprune.train(params, loss, batches, **kwargs)


def prune_retrain(**overrides) -> jaxprune.training.PruneRetrainResult:
  """`jaxprune.prune_retrain` of the MLP: 0.5, 0.75 with 4 steps each, unless overridden."""
  params = overrides.pop("params", None) or make_params()
  loss = overrides.pop("loss_fn", loss_fn)
  batches = overrides.pop("train_batches", None) or Batches()
  eval_batches = overrides.pop("eval_batches", EVAL_BATCHES)
  kwargs = dict(optimizer=optax.adam(1e-2), targets=[0.5, 0.75], where=jaxprune.select(params),
                retrain_steps=4)
  kwargs.update(_seams(overrides))
  return jaxprune.prune_retrain(params, loss, batches, eval_batches, **kwargs)


def assert_bitwise_equal(a, b) -> None:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def checkpoint_indices(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def flip_a_bit_in_saved_params(directory: pathlib.Path, index: int, leaf: str) -> None:
  """One bit of `params[leaf][kernel]`'s first weight flipped in checkpoint `index`,
  its meta (and the checksums it holds) left as saved: damage the storage layer
  does not see. (Orbax compresses its chunks, so the bytes of a weight cannot be
  found in the files to flip them there: the array is rewritten through orbax.)"""
  import shutil

  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=10, create=True,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
  restored = manager.restore(index, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  manager.close()
  tree, meta = restored["state"], restored["meta"]
  kernel = np.array(tree["params"][leaf]["kernel"])
  kernel.view(np.uint32)[0, 0] ^= 1 << 3  # -0.23131377 -> -0.2313124, as the issue saw
  tree["params"][leaf]["kernel"] = kernel
  shutil.rmtree(directory / str(index))
  manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
  manager.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                              meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()

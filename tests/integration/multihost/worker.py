"""One process of the two-process test (`tests/test_multihost.py`): 4 CPU devices each.

    python tests/multihost/worker.py PROCESS_ID PORT CHECKPOINT_DIR

Computes global-scope masks on FSDP-sharded params and runs a short `prune_retrain`
with checkpoints over the 8 devices of both processes, and checks both against the
same computation on this process alone (one device, the global batch).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, checkpoint_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))
import jaxprune  # noqa: E402

GLOBAL_BATCH = 16


def make_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k[0], (8, 64)) * 0.5, "bias": jnp.zeros(64)},
          "fc2": {"kernel": jnp.round(jax.random.normal(k[1], (64, 16)) * 2) / 4},  # ties
          "out": {"kernel": jax.random.normal(k[2], (16, 4)) * 0.5}}


def global_batch(step):
  x = np.random.default_rng(step).normal(size=(GLOBAL_BATCH, 8)).astype(np.float32)
  return {"x": x, "y": (x.sum(-1) > 0).astype(np.int32)}


def local_batch(step):
  rows = GLOBAL_BATCH // jax.process_count()
  return jax.tree.map(lambda a: a[process_id * rows:(process_id + 1) * rows], global_batch(step))


def loss_fn(p, batch):
  h = jnp.tanh(batch["x"] @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  logits = jnp.tanh(h @ p["fc2"]["kernel"]) @ p["out"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def gathered(tree):
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def main():
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  params = make_params()
  where = jaxprune.select(params)
  mesh = jaxprune.sharding.make_mesh("fsdp=8")
  sharded = jax.device_put(params, jaxprune.sharding.param_shardings(params, mesh, "fsdp"))
  got = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.7, where, scope="global"))(sharded)
  want = jaxprune.ranked_masks(params, 0.7, where, scope="global")
  for a, b in zip(jax.tree.leaves(gathered(got)), jax.tree.leaves(want), strict=True):
    assert np.array_equal(a, np.asarray(b))

  common = dict(optimizer=optax.adam(1e-2), where=where, retrain_steps=6, hooks=[],
                targets=[jaxprune.Prune(s, scope="global") for s in (0.5, 0.8)])

  def placed_batch(step):  # this process's rows, assembled into one global batch on the mesh
    return jaxprune.sharding.place_batch(local_batch(step), mesh)

  evals = [global_batch(10_000)]
  multi = jaxprune.prune_retrain(
      sharded, loss_fn, placed_batch, [placed_batch(10_000)],
      checkpointer=jaxprune.Checkpointer(checkpoint_dir, every=3), **common)
  single = jaxprune.prune_retrain(params, loss_fn, global_batch, evals, **common)
  for a, b in zip(jax.tree.leaves(gathered(multi.masks)), jax.tree.leaves(single.masks),
                  strict=True):
    assert np.array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(gathered(multi.params)), jax.tree.leaves(single.params),
                  strict=True):
    np.testing.assert_allclose(a, np.asarray(b), atol=1e-5)
  assert abs(multi.final_loss - single.final_loss) < 1e-5
  # Resume from the checkpoints the two processes wrote: nothing left to run, same result.
  again = jaxprune.prune_retrain(
      sharded, loss_fn, placed_batch, [placed_batch(10_000)],
      checkpointer=jaxprune.Checkpointer(checkpoint_dir, every=3), **common)
  for a, b in zip(jax.tree.leaves(gathered(again.params)), jax.tree.leaves(gathered(multi.params))):
    assert np.array_equal(a, b)
  print(f"process {process_id}: multihost ok", flush=True)


if __name__ == "__main__":
  main()

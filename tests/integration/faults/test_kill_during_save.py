"""`train` SIGKILLed at a random moment inside random checkpoint saves, then resumed,
ends bitwise where an uninterrupted run ends (issue 27).

The run (RigL through `pruned`, 24 steps, a save every 3) is a script in its own
process that announces each save (`saving N`); the parent picks saves at random,
waits until orbax's temporary directory of that save appears, waits a random 0-20 ms
more and kills. The seed is printed in every failure (rerun it with
JAXPRUNE_KILL_SEED=<seed>).
"""

from __future__ import annotations

import os
import random
import textwrap
import time

from test_resume_kill import (
  REPO,
  assert_same_result,
  checkpoint_steps,
  run_to_end,
  run_until,
  start,
  unfinished,
)

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {repo!r})
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import jaxprune

    ckpt, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    params = {{"fc1": {{"kernel": jnp.asarray(rng.normal(size=(8, 32)).astype(np.float32))}},
               "fc2": {{"kernel": jnp.asarray(rng.normal(size=(32, 4)).astype(np.float32))}}}}
    where = jaxprune.select(params)
    start = jaxprune.ranked_masks(params, 0.8, where, score=jaxprune.scores.random_score(0))
    tx = jaxprune.sparse_training.drop_and_grow(
        optax.adam(1e-2), start, schedule=jaxprune.sparse_training.rigl_schedule(0.3),
        update_every=4)

    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["fc1"]["kernel"])
        return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)

    def train_batches(step):
        time.sleep(0.005)
        print(f"step {{step}}", flush=True)
        r = np.random.default_rng(step)
        return {{"x": r.normal(size=(16, 8)).astype(np.float32),
                 "y": r.normal(size=(16, 4)).astype(np.float32)}}

    class Announced(jaxprune.Checkpointer):  # the seam: every save goes through `save`
        def save(self, state, meta):
            print(f"saving {{meta['step']}}", flush=True)
            super().save(state, meta)

    result = jaxprune.train(params, loss_fn, train_batches, optimizer=tx, steps=24,
                            checkpointer=Announced(ckpt, every=3, keep=2), hooks=[])
    leaves = jax.tree_util.tree_flatten_with_path(
        {{"params": result.params, "opt_state": result.opt_state}})[0]
    np.savez(out + ".npz", **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    with open(out + ".json", "w") as f:
        json.dump({{"summary": ""}}, f)
    print("done", flush=True)
    """
)


def test_train_killed_inside_random_saves_resumes_bitwise(tmp_path):
  seed = int(os.environ.get("JAXPRUNE_KILL_SEED", time.time_ns() % 2**32))
  rng = random.Random(seed)
  script = tmp_path / "run_train.py"
  script.write_text(SCRIPT.format(repo=str(REPO)))
  reference = start(script, tmp_path / "ref_ckpt", tmp_path / "ref")
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  # Two kills, in saves drawn from the first and the second half of the run.
  for low, high in ((1, 3), (5, 7)):
    save_step = 3 * rng.randint(low, high)
    delay = rng.uniform(0.0, 0.02)
    steps = run_until(start(script, ckpt, out), f"saving {save_step}", ckpt=ckpt, delay=delay)
    assert steps and steps[-1] == save_step - 1, (seed, steps)
  steps = run_to_end(start(script, ckpt, out))
  assert steps and steps[-1] == 23 and steps[0] % 3 == 0, (seed, steps)
  assert not unfinished(ckpt), seed
  assert len(checkpoint_steps(ckpt)) == 2, seed
  assert run_to_end(reference) == list(range(24))
  assert_same_result(out, tmp_path / "ref")

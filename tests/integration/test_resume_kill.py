"""A prune-retrain run SIGKILLed mid-retrain and restarted ends bitwise where an
uninterrupted run ends.

The run is a script in its own process (JAX_PLATFORMS=cpu). Its `train_batches`
prints `step N` (flushed) whenever batch N is asked for, so the parent can follow
it and kill it at a chosen point:

* `PAUSE_AT=N`: the script stops in `train_batches(N)` (printing `paused N`) and
  waits to be killed. Batch N is asked for right after the checkpoint at step N is
  written (checkpoints are synchronous), so this kills just after a save.
* otherwise the parent kills on reading `step N`, while the script runs on: the
  kill lands in whatever comes next (a train step, a loss check, a save).

The script saves final params, masks and figures with `np.savez` / JSON, and the
parent compares them with the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGETS = [12, 12, 12]
CHECKPOINT_EVERY = 4

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import jaxprune

    ckpt, out = sys.argv[1], sys.argv[2]
    pause_at = int(os.environ.get("PAUSE_AT", "-1"))
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(8, 4)).astype(np.float32)
    params = {{
        "fc1": {{"kernel": jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32) * 0.5),
                 "bias": jnp.zeros((16,), jnp.float32)}},
        "fc2": {{"kernel": jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32) * 0.5),
                 "bias": jnp.zeros((4,), jnp.float32)}},
    }}

    def make_batch(seed, size):
        r = np.random.default_rng(seed)
        x = r.normal(size=(size, 8)).astype(np.float32)
        return {{"x": x, "y": np.argmax(x @ teacher, axis=-1).astype(np.int32)}}

    def loss_fn(params, batch, rng=None):
        x = batch["x"]
        if rng is not None:  # dropout on the inputs: the per-step key matters
            x = x * jax.random.bernoulli(rng, 0.9, x.shape) / 0.9
        h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
        logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def train_batches(step):
        time.sleep(0.01)  # slow enough for the parent to kill mid-retrain
        print(f"step {{step}}", flush=True)
        if step == pause_at:
            print(f"paused {{step}}", flush=True)
            time.sleep(600)
        return make_batch(step, 8)

    class Announced(jaxprune.Checkpointer):  # the seam: every save goes through `save`
        def save(self, state, meta):
            print(f"saving {{meta['phase']}} {{meta['iteration']}} {{meta['step']}}", flush=True)
            super().save(state, meta)

    eval_batches = [make_batch(10_000 + i, 16) for i in range(2)]
    lr = optax.linear_schedule(1e-2, 1e-3, transition_steps=36)
    result = jaxprune.prune_retrain(
        params, loss_fn, train_batches, eval_batches,
        optimizer=optax.inject_hyperparams(optax.adamw)(learning_rate=lr),
        targets=[0.5, 0.75, 0.875], where=jaxprune.select(params),
        retrain_steps={budgets!r}, checkpointer=Announced(ckpt, every={every!r}),
        restart_optimizer=False, hooks=[jaxprune.training.every(5, lambda report: None)],
    )
    leaves = jax.tree_util.tree_flatten_with_path(
        {{"params": result.params, "masks": result.masks,
          "opt_state": result.opt_state}})[0]
    np.savez(out + ".npz", **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    figures = {{
        "history": [r._replace(wall_seconds=None).to_json() for r in result.history],
        "dense_loss": result.dense_loss, "final_loss": result.final_loss,
        "dense_metric": result.dense.metric, "degradation": result.degradation,
        "achieved_sparsity": result.achieved_sparsity, "summary": result.summary(),
    }}
    with open(out + ".json", "w") as f:
        json.dump(figures, f)
    print("done", flush=True)
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("script") / "run_prune_retrain.py"
  path.write_text(SCRIPT.format(repo=str(REPO), budgets=BUDGETS, every=CHECKPOINT_EVERY))
  return path


def start(script: Path, ckpt: Path, out: Path, pause_at: int | None = None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("PAUSE_AT", None)
  if pause_at is not None:
    env["PAUSE_AT"] = str(pause_at)
  return subprocess.Popen(
      [sys.executable, str(script), str(ckpt), str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
  )


def run_until(proc, kill_on: str, ckpt: Path | None = None, timeout: float = 240.0,
              delay: float = 0.0):
  """Reads `proc`'s stdout until the line `kill_on`, then SIGKILLs it; the steps seen.

  With `ckpt`, the kill waits until orbax's temporary directory of the save that
  `kill_on` announces appears, then `delay` seconds more: the process dies in the
  middle of writing it (or, after a long delay, just after).
  """
  steps = []
  deadline = time.monotonic() + timeout
  for line in proc.stdout:
    line = line.strip()
    if line.startswith("step "):
      steps.append(int(line.split()[1]))
    if line == kill_on:
      while ckpt is not None and not unfinished(ckpt):
        if time.monotonic() > deadline or proc.poll() is not None:
          break
        time.sleep(0.0005)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"no {kill_on!r} within {timeout} s")
  else:
    proc.wait()
    pytest.fail(f"the run ended before {kill_on!r} (rc {proc.returncode}):\n"
                f"{proc.stderr.read()[-3000:]}")
  assert proc.wait(timeout=60) == -signal.SIGKILL
  proc.stdout.close()
  proc.stderr.close()
  return steps


def run_to_end(proc, timeout: float = 240.0) -> list[int]:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  assert out.strip().endswith("done")
  return [int(line.split()[1]) for line in out.splitlines() if line.startswith("step ")]


def checkpoint_steps(ckpt: Path) -> list[int]:
  """Finished orbax checkpoints (numbered directories; unfinished ones are tmp dirs)."""
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def unfinished(ckpt: Path) -> list[str]:
  """Orbax's temporary directories: saves begun and not finalized."""
  return [p.name for p in ckpt.iterdir() if "tmp" in p.name] if ckpt.exists() else []


def load(out: Path):
  with np.load(str(out) + ".npz") as z:
    arrays = {k: z[k] for k in z.files}
  with open(str(out) + ".json") as f:
    figures = json.load(f)
  return arrays, figures


def assert_same_result(out: Path, reference: Path) -> None:
  got, got_figures = load(out)
  want, want_figures = load(reference)
  assert got.keys() == want.keys()
  assert any("kernel" in k for k in got)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key
  # The summary shows wall seconds; every other figure must agree exactly.
  got_summary, want_summary = got_figures.pop("summary"), want_figures.pop("summary")
  assert got_summary.splitlines()[-3:] == want_summary.splitlines()[-3:]
  assert got_figures == want_figures


@pytest.fixture(scope="module")
def reference(script, tmp_path_factory):
  """The uninterrupted run, started at once (it runs alongside the first test's runs)."""
  base = tmp_path_factory.mktemp("reference")
  proc = start(script, base / "ckpt", base / "out")
  done = []

  def wait() -> Path:
    if not done:
      assert run_to_end(proc) == list(range(sum(BUDGETS)))
      done.append(base / "out")
    return done[0]

  yield wait
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_killed_three_times_and_resumed_is_bitwise_equal(script, reference, tmp_path):
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  # Global steps: iteration 0 is 0-11, 1 is 12-23, 2 is 24-35; saves every 4 steps
  # inside an iteration and at its end.

  # 1. Killed just after the checkpoint at step 8 (of iteration 0) was written.
  steps = run_until(start(script, ckpt, out, pause_at=8), "paused 8")
  assert steps == list(range(9))
  assert len(checkpoint_steps(ckpt)) == 2 and not unfinished(ckpt)

  # 2. Resumes at step 8 exactly; killed in the middle of writing the save at step 16.
  steps = run_until(start(script, ckpt, out), "saving retrain 1 4", ckpt=ckpt)
  assert steps[0] == 8 and steps[-1] == 15
  assert unfinished(ckpt), "the kill missed the save it aimed at"

  # 3. The half-written save is ignored: resumes from the end of iteration 0 (step 12:
  #    prunes again) and is killed while running on after step 22 (in the unsaved
  #    steps after the save at 20, or inside the end-of-iteration save at 24).
  steps = run_until(start(script, ckpt, out), "step 22")
  assert steps[0] == 12 and steps[-1] == 22

  # 4. Resumes (from 20 or 24) and runs to the end.
  steps = run_to_end(start(script, ckpt, out))
  assert steps[0] in (20, 24) and steps[-1] == sum(BUDGETS) - 1
  assert not unfinished(ckpt)
  assert_same_result(out, reference())


def test_killed_in_the_first_iteration_then_finished_run_resumed(script, reference, tmp_path):
  """Resumed inside iteration 0's retraining, so the dense baseline is never evaluated
  by the run that finishes: it must come from the checkpoint."""
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  steps = run_until(start(script, ckpt, out, pause_at=4), "paused 4")
  assert steps == list(range(5))
  steps = run_to_end(start(script, ckpt, out))
  assert steps[0] == 4
  assert_same_result(out, reference())
  # A finished run resumed again: nothing is retrained, the result is the same.
  steps = run_to_end(start(script, ckpt, tmp_path / "again"))
  assert steps == []
  assert_same_result(tmp_path / "again", out)


# ----------------------------------------------------------------------------- sparse training

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import jaxprune

    ckpt, out = sys.argv[1], sys.argv[2]
    pause_at = int(os.environ.get("PAUSE_AT", "-1"))
    rng = np.random.default_rng(0)
    params = {{"fc1": {{"kernel": jnp.asarray(rng.normal(size=(8, 32)).astype(np.float32))}},
               "fc2": {{"kernel": jnp.asarray(rng.normal(size=(32, 4)).astype(np.float32))}}}}
    where = jaxprune.select(params)
    start = jaxprune.ranked_masks(params, 0.8, where, score=jaxprune.scores.random_score(0),
                                  distribution=jaxprune.distributions.erk())
    method = os.environ["METHOD"]
    if method == "ste":
        tx = jaxprune.sparse_training.straight_through(optax.adam(1e-2), where=where,
                                                       update_every=3,
                                       schedule=optax.constant_schedule(0.8))
    else:
        schedule = (jaxprune.sparse_training.rigl_schedule(0.3, end=15) if method == "rigl"
                    else jaxprune.sparse_training.set_schedule(0.3, seed=1))
        tx = jaxprune.sparse_training.drop_and_grow(optax.adam(1e-2), start,
                                                    schedule=schedule, update_every=3)

    def loss_fn(params, batch, rng=None):
        x = batch["x"] * jax.random.bernoulli(rng, 0.9, batch["x"].shape) / 0.9
        h = jnp.tanh(x @ params["fc1"]["kernel"])
        return jnp.mean((h @ params["fc2"]["kernel"] - batch["y"]) ** 2)

    def train_batches(step):
        time.sleep(0.01)
        print(f"step {{step}}", flush=True)
        if step == pause_at:
            print(f"paused {{step}}", flush=True)
            time.sleep(600)
        r = np.random.default_rng(step)
        return {{"x": r.normal(size=(16, 8)).astype(np.float32),
                 "y": r.normal(size=(16, 4)).astype(np.float32)}}

    result = jaxprune.train(params, loss_fn, train_batches, optimizer=tx, steps=20,
                            checkpointer=jaxprune.Checkpointer(ckpt, every=4),
                            hooks=[jaxprune.training.every(2, lambda report: None)])
    leaves = jax.tree_util.tree_flatten_with_path(
        {{"params": result.params, "opt_state": result.opt_state,
          "masks": jaxprune.get_masks(result.opt_state)}})[0]
    np.savez(out + ".npz", **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    with open(out + ".json", "w") as f:
        json.dump({{"summary": "", "steps": 20}}, f)
    print("done", flush=True)
    """
)


# SET shares RigL's code path but for its random draws (fold_in(key, count): tested for
# repeatability in test_sparse_training); RigL and STE cover both wrappers' state.
@pytest.mark.parametrize("method", ["rigl", "ste"])
def test_sparse_training_killed_twice_and_resumed_is_bitwise_equal(method, tmp_path,
                                                                    monkeypatch):
  monkeypatch.setenv("METHOD", method)
  script = tmp_path / "run_train.py"
  script.write_text(TRAIN_SCRIPT.format(repo=str(REPO)))
  reference_proc = start(script, tmp_path / "ref_ckpt", tmp_path / "ref")
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  # Killed just after the checkpoint at step 8 was written, then while running on
  # after step 14 (drop-and-grow updates at steps 0, 3, ..., 18 lie on both sides).
  steps = run_until(start(script, ckpt, out, pause_at=8), "paused 8")
  assert steps == list(range(9)) and len(checkpoint_steps(ckpt)) == 2
  steps = run_until(start(script, ckpt, out), "step 14")
  assert steps[0] == 8
  steps = run_to_end(start(script, ckpt, out))
  assert steps[0] in (12, 16) and steps[-1] == 19
  assert run_to_end(reference_proc) == list(range(20))
  assert_same_result(out, tmp_path / "ref")

"""Tests of `prune_retrain` and its checkpoints.

A small two-layer MLP classifier: `fc1/kernel` is 8x16 (128 weights) and
`fc2/kernel` 16x4 (64 weights), so the schedule 0.5, 0.75, 0.875 prunes a whole
number of weights in each leaf and the achieved sparsities equal the targets
exactly. Training batches (size 8) are a pure function of the step; evaluation
batches have size 16, so a call of the loss can be told apart by its batch shape.

Every loss function here is wrapped in a plain Python counter: the loop only calls
it while tracing, so the counter also counts traces (and proves "no compute" in
the error cases).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxprune

SCHEDULE = (0.5, 0.75, 0.875)
TRAIN_SIZE, EVAL_SIZE = 8, 16
RNG = np.random.default_rng(0)
TEACHER = RNG.normal(size=(8, 4)).astype(np.float32)


def make_params(seed: int = 0, hidden: int = 16) -> dict:
  r = np.random.default_rng(seed)
  return {
      "fc1": {"kernel": jnp.asarray(r.normal(size=(8, hidden)).astype(np.float32) * 0.5),
              "bias": jnp.zeros((hidden,), jnp.float32)},
      "fc2": {"kernel": jnp.asarray(r.normal(size=(hidden, 4)).astype(np.float32) * 0.5),
              "bias": jnp.zeros((4,), jnp.float32)},
  }


def make_batch(seed: int, size: int) -> dict:
  r = np.random.default_rng(seed)
  x = r.normal(size=(size, 8)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ TEACHER, axis=-1).astype(np.int32)}


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


EVAL_BATCHES = [make_batch(10_000 + i, EVAL_SIZE) for i in range(2)]


class CountedLoss:
  """A plain-Python wrapper recording the batch size of every call (i.e. every trace)."""

  def __init__(self, fn=mlp_loss):
    self.fn = fn
    self.sizes: list[int] = []

  def __call__(self, params, batch):
    self.sizes.append(int(batch["x"].shape[0]))
    return self.fn(params, batch)

  @property
  def train_traces(self) -> int:
    return self.sizes.count(TRAIN_SIZE)

  @property
  def eval_traces(self) -> int:
    return self.sizes.count(EVAL_SIZE)


class Batches:
  """`train_batches(step)`: records the steps asked for; NaN inputs at `nan_at`."""

  def __init__(self, nan_at: int | None = None):
    self.steps: list[int] = []
    self.nan_at = nan_at

  def __call__(self, step: int) -> dict:
    self.steps.append(int(step))
    batch = make_batch(int(step), TRAIN_SIZE)
    if step == self.nan_at:
      batch["x"] = np.full_like(batch["x"], np.nan)
    return batch


def _seams(overrides: dict) -> dict:
  """The harness's shorthands as the driver's seams: `checkpoint_dir` (with
  `checkpoint_every`, `keep_checkpoints`, `resume`) as a `Checkpointer`, `progress`
  as a progress bar hook and `log_every` as its cadence (or a silent hook's)."""
  directory = overrides.pop("checkpoint_dir", None)
  every = overrides.pop("checkpoint_every", None)
  keep = overrides.pop("keep_checkpoints", 3)
  resume = overrides.pop("resume", True)
  if directory is not None:
    overrides["checkpointer"] = jaxprune.Checkpointer(directory, every=every, keep=keep,
                                                      resume=resume)
  progress, log_every = overrides.pop("progress", False), overrides.pop("log_every", None)
  if progress:
    overrides.setdefault("hooks", [jaxprune.training.progress_bar(every=log_every or 50)])
  elif log_every is not None:
    overrides.setdefault("hooks", [jaxprune.training.every(log_every, lambda report: None)])
  overrides.setdefault("hooks", [])
  return overrides


def run(**overrides):
  """`prune_retrain` on the MLP; returns (result, loss counter, batch recorder)."""
  loss = overrides.pop("loss_fn", None) or CountedLoss()
  batches = overrides.pop("train_batches", None) or Batches()
  params = overrides.pop("params", None) or make_params()
  kwargs = dict(
      optimizer=optax.adam(1e-2), targets=SCHEDULE, where=jaxprune.select(params),
      retrain_steps=4,
  )
  kwargs.update(_seams(overrides))
  eval_batches = kwargs.pop("eval_batches", EVAL_BATCHES)
  result = jaxprune.prune_retrain(params, loss, batches, eval_batches, **kwargs)
  return result, loss, batches


def reference_eval(params) -> float:
  return float(np.mean([float(mlp_loss(params, b)) for b in EVAL_BATCHES]))


def assert_trees_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a, is_leaf=lambda x: x is None)
  lb, tb = jax.tree.flatten(b, is_leaf=lambda x: x is None)
  assert ta == tb
  for x, y in zip(la, lb):
    if x is None or y is None:
      assert x is None and y is None
      continue
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def strip_wall(history):
  return [row._replace(wall_seconds=None) for row in history]


def dir_snapshot(path) -> dict:
  """Every file and directory under `path`: (mtime_ns, size, sha256 of contents)."""
  snap = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.stat(full)
      digest = None
      if os.path.isfile(full):
        with open(full, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      snap[os.path.relpath(full, path)] = (st.st_mtime_ns, st.st_size, digest)
  return snap


def latest_checkpoint(directory):
  """(index, meta, raw state tree, indices) of the latest checkpoint: the meta as the
  Checkpointer reads it, the arrays with plain orbax."""
  with jaxprune.Checkpointer(directory) as ckpt:
    indices = ckpt.indices()
    meta = ckpt.read_meta(indices[-1])
  return indices[-1], meta, raw_state(directory, indices[-1]), indices


def raw_state(directory, index):
  """Checkpoint `index`'s arrays, restored by orbax alone."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  try:
    return manager.restore(index, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                           )["state"]
  finally:
    manager.close()


@pytest.fixture(scope="module")
def base():
  return run()


# ----------------------------------------------------------------------------- result


def test_history_rows_and_result_values(base):
  result, _, batches = base
  params0 = make_params()
  where = jaxprune.select(params0)
  assert batches.steps == list(range(12))
  assert len(result.history) == 3
  for i, (row, target) in enumerate(zip(result.history, SCHEDULE)):
    assert isinstance(row, jaxprune.training.IterationRecord)
    assert row.iteration == i
    assert row.target_sparsity == target
    assert row.target == f"{target:.2%}"
    assert row.achieved_sparsity == target  # exact: 128 and 64 weights
    assert row.retrain_steps == 4
    assert 0 < row.wall_seconds < 600
    for phase in (row.before_prune, row.after_prune, row.after_retrain):
      assert math.isfinite(phase.loss)
      assert phase.metric == phase.loss  # the default metric is the loss
    # Retraining moved the params: the loss changed.
    assert row.after_retrain.loss != row.after_prune.loss
    if i:
      assert row.before_prune == result.history[i - 1].after_retrain

  # The figures are evaluations of the right params.
  first = result.history[0]
  assert first.before_prune.loss == pytest.approx(reference_eval(params0), rel=1e-5)
  pruned0 = jaxprune.apply_masks(params0, jaxprune.ranked_masks(params0, 0.5, where))
  assert first.after_prune.loss == pytest.approx(reference_eval(pruned0), rel=1e-5)
  assert result.final.loss == pytest.approx(reference_eval(result.params), rel=1e-5)

  assert result.dense == first.before_prune
  assert result.final == result.history[-1].after_retrain
  assert result.metric is jaxprune.training.loss_metric
  assert result.degradation == pytest.approx(
      result.final.loss / result.dense.loss - 1.0, rel=1e-12, abs=1e-15)
  assert result.achieved_sparsity == 0.875
  # Over the whole model, zeros count wherever they are (a bias can be exactly 0 too).
  zero_biases = sum(int((np.asarray(result.params[k]["bias"]) == 0).sum()) for k in ("fc1", "fc2"))
  assert result.overall_sparsity == (112 + 56 + zero_biases) / (128 + 16 + 64 + 4)
  assert isinstance(result.report, jaxprune.training.SparsityReport)

  # Masks: the final ones, held in the optimizer state, zero exactly the pruned weights.
  masks = result.masks
  assert masks["fc1"]["bias"] is None and masks["fc2"]["bias"] is None
  for name, pruned_count in (("fc1", 112), ("fc2", 56)):
    m = np.asarray(masks[name]["kernel"])
    w = np.asarray(result.params[name]["kernel"])
    assert m.dtype == np.bool_ and int((~m).sum()) == pruned_count
    assert np.all(w[~m] == 0.0) and np.all(w[m] != 0.0)
  assert_trees_bitwise_equal(jaxprune.get_masks(result.opt_state), masks)


def test_summary_contains_the_numbers(base):
  result, _, _ = base
  text = result.summary()
  assert "loss before" in text and "perplexity" not in text
  for row in result.history:
    assert f"{row.target_sparsity:.2%}" in text
    assert f"{row.achieved_sparsity:.2%}" in text
    for phase in (row.before_prune, row.after_prune, row.after_retrain):
      assert f"{phase.metric:.4f}" in text
  assert f"dense loss {result.dense.metric:.4f}" in text
  assert f"final {result.final.metric:.4f}" in text
  assert f"{result.degradation:+.2%}" in text
  assert f"{result.achieved_sparsity:.2%}" in text
  assert f"{result.overall_sparsity:.2%}" in text


def test_loss_with_aux_matches_scalar_loss(base):
  def with_aux(params, batch):
    loss = mlp_loss(params, batch)
    return loss, {"loss_copy": loss, "n": batch["x"].shape[0]}

  result, loss, _ = run(loss_fn=CountedLoss(with_aux))
  assert loss.train_traces == 1 and loss.eval_traces == 1
  for row, expected in zip(strip_wall(result.history), strip_wall(base[0].history)):
    got, want = jax.tree.leaves(row), jax.tree.leaves(expected)
    assert len(got) == len(want)
    for value, wanted in zip(got, want):
      assert value == (pytest.approx(wanted, rel=1e-6) if isinstance(value, float) else wanted)
  for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(base[0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_iterable_train_batches(base):
  consumed = []

  def generate():
    for step in range(100):
      consumed.append(step)
      yield make_batch(step, TRAIN_SIZE)

  result, _, _ = run(train_batches=generate())
  assert consumed == list(range(12))  # exactly one batch per step, in order
  assert strip_wall(result.history) == strip_wall(base[0].history)
  assert_trees_bitwise_equal(result.params, base[0].params)

  # A list is an iterable too; one that runs out is an error naming the step.
  with pytest.raises(ValueError, match="ran out at global step 5"):
    run(train_batches=[make_batch(s, TRAIN_SIZE) for s in range(5)])


def test_per_iteration_budgets():
  result, _, batches = run(retrain_steps=[3, 0, 2], progress=True, log_every=1)
  assert batches.steps == [0, 1, 2, 3, 4]
  assert [r.retrain_steps for r in result.history] == [3, 0, 2]
  # No retraining in iteration 1: the same params are evaluated twice.
  assert result.history[1].after_retrain.loss == result.history[1].after_prune.loss
  assert result.history[0].after_retrain.loss != result.history[0].after_prune.loss
  assert [r.achieved_sparsity for r in result.history] == list(SCHEDULE)


def _counts(opt_state):
  pruned_state = next(
      s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, jaxprune.PrunedState))
      if isinstance(s, jaxprune.PrunedState)
  )
  hyper = pruned_state.inner_state
  adam = hyper.inner_state[0]
  return int(pruned_state.count), int(hyper.count), int(adam.count), float(
      hyper.hyperparams["learning_rate"])


class CompileWatch:
  """Counts XLA compiles by the jitted function's name (jax.monitoring's events)."""

  def __init__(self):
    self.compiled: list[str] = []

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.compiled.append(kwargs.get("fun_name", ""))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def assert_compiled_once(self, loss: CountedLoss):
    """One prune_retrain run since the watch started: each step traced and compiled once."""
    # The loss is called only while tracing: one trace per step function.
    assert loss.train_traces == 1
    assert loss.eval_traces == 1
    assert self.compiled.count("jit(step)") == 1


def test_train_and_eval_steps_compile_once():
  with CompileWatch() as watch:
    loss = CountedLoss()
    result, _, batches = run(loss_fn=loss, retrain_steps=[3, 4, 2], log_every=2)
    assert len(result.history) == 3 and batches.steps == list(range(9))
    watch.assert_compiled_once(loss)

  # The counters do see a recompilation: training batches of another shape in the middle
  # of a run trace and compile the train step again.
  class MixedBatches(Batches):
    def __call__(self, step):
      return make_batch(step, EVAL_SIZE if step == 5 else TRAIN_SIZE)

  with CompileWatch() as watch:
    loss = CountedLoss()
    run(loss_fn=loss, train_batches=MixedBatches(), retrain_steps=[3, 4, 2])
    # train, eval, and train again at the other shape
    assert len(loss.sizes) == 3 and watch.compiled.count("jit(step)") == 2


@pytest.fixture(scope="module")
def restart_runs():
  lr = optax.linear_schedule(1e-2, 0.0, transition_steps=20)
  optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  budgets = [4, 3, 5]
  runs = {}
  for restart in (True, False):
    with CompileWatch() as watch:
      loss = CountedLoss()
      result, _, _ = run(loss_fn=loss, optimizer=optimizer, retrain_steps=budgets,
                         restart_optimizer=restart)
    runs[restart] = (result, loss, watch)
  return lr, runs


@pytest.mark.parametrize("restart_optimizer", [True, False])
def test_compile_once_with_either_optimizer_state(restart_runs, restart_optimizer):
  # A fresh `tx.init` state after every prune, or one carried through it: no recompile
  # (inject_hyperparams adds float hyperparameters to the state, a weak-type hazard).
  _, runs = restart_runs
  _, loss, watch = runs[restart_optimizer]
  watch.assert_compiled_once(loss)


def test_restart_optimizer_true_vs_false(restart_runs):
  lr, runs = restart_runs
  restarted, kept = runs[True][0], runs[False][0]
  # Restart: count and learning-rate schedule start again after every prune.
  # inject_hyperparams records the learning rate of the last update (count - 1).
  assert _counts(restarted.opt_state) == (5, 5, 5, pytest.approx(float(lr(4))))
  # One state for the whole run: the schedule continues across iterations.
  assert _counts(kept.opt_state) == (12, 12, 12, pytest.approx(float(lr(11))))
  # The first iteration is the same run; the later ones are not.
  assert strip_wall(restarted.history)[0] == strip_wall(kept.history)[0]
  assert restarted.history[1].after_retrain.loss != kept.history[1].after_retrain.loss


def test_rng_loss_gets_a_per_step_key(base):
  keys = []

  def noisy_with(seed):
    def noisy(params, batch, rng=None):
      keys.append(rng)
      if rng is None:  # evaluation: no noise
        return mlp_loss(params, batch)
      # Another stream: the loss folds its own seed into the loop's per-step key.
      noise = jax.random.normal(jax.random.fold_in(rng, seed), batch["x"].shape) * 0.1
      return mlp_loss(params, {"x": batch["x"] + noise, "y": batch["y"]})
    return noisy

  a, _, _ = run(loss_fn=noisy_with(0))
  assert sum(k is None for k in keys) == 1  # the eval step traced without a key
  assert sum(k is not None for k in keys) == 1  # the train step traced with one
  c, _, _ = run(loss_fn=noisy_with(1))
  assert not np.array_equal(a.params["fc1"]["kernel"], c.params["fc1"]["kernel"])
  # The noiseless loss (same data) trains to other params.
  assert not np.array_equal(a.params["fc1"]["kernel"], base[0].params["fc1"]["kernel"])
  # Evaluation is deterministic (no rng): the dense loss does not depend on the stream.
  assert a.dense_loss == c.dense_loss == base[0].dense_loss


def test_rng_without_default_gets_none_in_evaluation():
  seen = []

  def loss(params, batch, rng):
    seen.append(rng is None)
    return mlp_loss(params, batch)

  result, _, _ = run(loss_fn=loss)
  assert sorted(set(seen)) == [False, True]  # traced once for training, once for evaluation
  assert np.isfinite(result.final_loss)


# ----------------------------------------------------------------------------- errors


def _nothing_selected(params):
  return jax.tree.map(lambda _: False, params)


class HookEvery:
  """A user's hook class asking for a cadence."""

  def __init__(self, every):
    self.every = every

  def __call__(self, report):
    pass


ERROR_CASES = {
    "empty schedule": (dict(targets=[]), ValueError, "targets is empty"),
    "empty schedule array": (dict(targets=np.zeros((0,))), ValueError, "targets is empty"),
    "sparsity 1": (dict(targets=[0.5, 1.0]), ValueError, r"targets\[1\]"),
    "negative sparsity": (dict(targets=[-0.1]), ValueError, r"targets\[0\]"),
    "negative steps": (dict(retrain_steps=-1), ValueError, "retrain_steps"),
    "negative budget": (dict(retrain_steps=[1, -2, 1]), ValueError, r"retrain_steps\[1\]"),
    "fractional budget": (dict(retrain_steps=[1, 2.5, 1]), ValueError, r"retrain_steps\[1\]"),
    "budget count": (dict(retrain_steps=[1, 2]), ValueError, "2 entries for 3"),
    "empty eval": (dict(eval_batches=[]), ValueError, "eval_batches is empty"),
    "empty eval callable": (dict(eval_batches=lambda: []), ValueError, "eval_batches is empty"),
    "one-shot eval": (dict(eval_batches=iter(EVAL_BATCHES)), TypeError, "re-iterable"),
    "one-shot eval generator": (dict(eval_batches=(b for b in EVAL_BATCHES)), TypeError,
                                "re-iterable"),
    "where selects nothing": (dict(where=_nothing_selected(make_params())), ValueError,
                              "selects no leaf"),
    "callable where selects nothing": (dict(where=_nothing_selected), ValueError,
                                       "selects no leaf"),
    "a hook every 0": (dict(hooks=[HookEvery(0)]), ValueError,
                       r"hooks\[0\].every must be an integer >= 1, got 0"),
    "a hook every 2.5": (dict(hooks=[HookEvery(2.5)]), ValueError,
                         r"hooks\[0\].every must be an integer"),
    "hooks not a list": (dict(hooks=print), TypeError, "hooks must be a list"),
    "a scope keyword": (dict(scope="row"), TypeError, "scope"),
    "a checkpointer that is a path": (dict(checkpointer="ckpt"), TypeError,
                                      "checkpointer must be a jaxprune.Checkpointer"),
}


@pytest.mark.parametrize("settings, message", [
    (dict(every=0), "every must be an integer >= 1, got 0"),
    (dict(keep=0), "keep must be an integer >= 1, got 0"),
    (dict(resume="yes"), "resume must be True, False or 'with_changes'"),
])
def test_a_checkpointer_refuses_bad_settings_when_built(tmp_path, settings, message):
  with pytest.raises(ValueError, match=message):
    jaxprune.Checkpointer(tmp_path / "ckpt", **settings)
  for cadence in (0, 2.5):
    with pytest.raises(ValueError, match="every must be an integer"):
      jaxprune.training.every(cadence, print)
    with pytest.raises(ValueError, match="every must be an integer"):
      jaxprune.training.progress_bar(every=cadence)
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_before_any_compute(case, tmp_path):
  overrides, error, message = ERROR_CASES[case]
  loss, batches = CountedLoss(), Batches()
  params = make_params()
  kwargs = dict(optimizer=optax.adam(1e-2), targets=SCHEDULE, where=jaxprune.select(params),
                retrain_steps=2, checkpointer=jaxprune.Checkpointer(str(tmp_path / "ckpt")),
                hooks=[])
  kwargs.update(overrides)
  eval_batches = kwargs.pop("eval_batches", EVAL_BATCHES)
  with pytest.raises(error, match=message):
    jaxprune.prune_retrain(params, loss, batches, eval_batches, **kwargs)
  assert loss.sizes == [] and batches.steps == []
  assert not (tmp_path / "ckpt").exists()


def test_callable_eval_batches_may_return_a_generator():
  calls = []

  def eval_batches():
    calls.append(1)
    return (b for b in EVAL_BATCHES)  # a one-shot generator, made anew per evaluation

  result, _, _ = run(eval_batches=eval_batches)
  listed, _, _ = run()
  assert result.final_loss == listed.final_loss
  assert len(calls) > 2


# ----------------------------------------------------------------------------- NaN


class RecordingBar:
  instances: typing.ClassVar[list] = []

  def __init__(self, *args, **kwargs):
    self.closed = False
    RecordingBar.instances.append(self)

  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    self.closed = True


def test_nan_guard_closes_the_checkpoint_manager_and_the_bar(tmp_path, monkeypatch):
  closed = []

  class Watched(jaxprune.Checkpointer):
    def __exit__(self, *exc):
      super().__exit__(*exc)
      closed.append(True)

  monkeypatch.setattr("tqdm.auto.tqdm", RecordingBar)
  RecordingBar.instances = []
  with pytest.raises(FloatingPointError):
    run(train_batches=Batches(nan_at=1), retrain_steps=6, checkpointer=Watched(tmp_path / "c"),
        progress=True, log_every=1)
  assert closed == [True]
  assert RecordingBar.instances and all(bar.closed for bar in RecordingBar.instances)


@pytest.fixture(scope="module")
def clean_nan_reference():
  return run(retrain_steps=6)[0]


@pytest.mark.parametrize(
    "nan_at, iteration, step, last_good, then_resume",
    [
        # Found at the check before the save at step 4 of iteration 1.
        (9, 1, 3, (1, 2), False),
        # The save at step 2 came just before it.
        (8, 1, 2, (1, 2), False),
        # The last step of an iteration: caught before the end-of-iteration save. The
        # resume is inside iteration 0's retraining (dense loss from the saved row).
        (5, 0, 5, (0, 4), True),
    ],
)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, request, nan_at, iteration, step, last_good, then_resume
):
  ckpt = str(tmp_path / "ckpt")
  common = dict(retrain_steps=6, checkpointer=jaxprune.Checkpointer(ckpt, every=2))
  batches = Batches(nan_at=nan_at)
  message = rf"iteration {iteration}, step {step} \(global step {nan_at}\)"
  with pytest.raises(FloatingPointError, match=message):
    run(train_batches=batches, **common)
  assert max(batches.steps) < nan_at + 2  # stopped at the next check, no further

  _, meta, state, steps = latest_checkpoint(ckpt)
  assert (meta["phase"], meta["iteration"], meta["step"]) == ("retrain", *last_good)
  assert len(meta["history"]) == last_good[0]
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  # Every kept checkpoint is finite, not only the latest.
  for other in steps:
    tree = raw_state(ckpt, other)
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))

  if not then_resume:
    return
  # The kept checkpoint is good: resuming with clean data ends where a clean run ends.
  clean_nan_reference = request.getfixturevalue("clean_nan_reference")
  resumed_batches = Batches()
  resumed, _, _ = run(train_batches=resumed_batches, **common)
  good_global = last_good[0] * 6 + last_good[1]
  assert resumed_batches.steps[0] == good_global  # continued, did not start over
  assert_trees_bitwise_equal(resumed.params, clean_nan_reference.params)
  assert strip_wall(resumed.history) == strip_wall(clean_nan_reference.history)
  assert resumed.dense == clean_nan_reference.dense


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  ckpt = str(tmp_path_factory.mktemp("finished") / "ckpt")
  result, _, _ = run(retrain_steps=[2, 3, 2], checkpoint_dir=ckpt)
  return ckpt, result


def _wider_params():
  return make_params(hidden=32)


def _extra_leaf_params():
  params = make_params()
  params["fc3"] = {"kernel": jnp.ones((4, 4))}
  return params


MISMATCHES = {
    "targets": (dict(targets=(0.5, 0.75, 0.9)), "targets"),
    "budgets": (dict(retrain_steps=[2, 3, 3]), "retrain_steps"),
    "restart_optimizer": (dict(restart_optimizer=False), "restart_optimizer"),
    "metric": (dict(metric=jaxprune.training.perplexity), "metric"),
    "param shapes": (dict(params=_wider_params()), "params_layout"),
    "param structure": (dict(params=_extra_leaf_params()), "num_leaves"),
    "resume=False": (dict(resume=False), "already holds checkpoints"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_checkpoint_of_another_configuration(finished_run, case):
  ckpt, _ = finished_run
  overrides, message = MISMATCHES[case]
  overrides = dict(overrides)
  params = overrides.get("params") or make_params()
  overrides.setdefault("where", jaxprune.select(params))
  overrides.setdefault("retrain_steps", [2, 3, 2])
  before = dir_snapshot(ckpt)
  assert before
  loss, batches = CountedLoss(), Batches()
  with pytest.raises(ValueError, match=message):
    run(loss_fn=loss, train_batches=batches, checkpoint_dir=ckpt, **overrides)
  assert dir_snapshot(ckpt) == before
  assert loss.sizes == [] and batches.steps == []


def test_resume_after_completed_run_returns_same_result(finished_run):
  ckpt, first = finished_run
  loss, batches = CountedLoss(), Batches()
  again, _, _ = run(loss_fn=loss, train_batches=batches, retrain_steps=[2, 3, 2],
                    checkpoint_dir=ckpt)
  assert batches.steps == [] and loss.sizes == []  # nothing recomputed
  assert again.history == first.history
  assert_trees_bitwise_equal(again.params, first.params)
  assert_trees_bitwise_equal(again.masks, first.masks)
  assert_trees_bitwise_equal(again.opt_state, first.opt_state)
  assert again.dense == first.dense and again.final == first.final
  assert again.degradation == first.degradation
  assert again.summary() == first.summary()


def test_checkpoint_contents(finished_run):
  ckpt, first = finished_run
  _, meta, state, steps = latest_checkpoint(ckpt)
  assert len(steps) == 3  # keep_checkpoints=3 of the 3 saves
  assert (meta["phase"], meta["iteration"], meta["step"]) == ("prune", 3, 0)
  assert [jaxprune.training.IterationRecord.from_json(r) for r in meta["history"]] == first.history
  # Masks have one home, the pruned state inside opt_state, stored 1 bit per weight
  # where the last axis is a multiple of 8: fc1 (8, 16) packs to (8, 2); fc2 (16, 4)
  # stays bool.
  assert sorted(state) == ["opt_state", "params", "rng"]
  held = [np.asarray(x) for x in jax.tree.leaves(state["opt_state"])
          if np.asarray(x).dtype in (np.uint8, np.bool_)]
  assert [(m.dtype.name, m.shape) for m in held] == [("uint8", (8, 2)), ("bool", (16, 4))]
  for h, m in zip(held, jax.tree.leaves(first.masks), strict=True):
    np.testing.assert_array_equal(jaxprune.tree.unpack_mask(jnp.asarray(h)), m)
  assert_trees_bitwise_equal(state["params"], first.params)


def test_achieved_sparsity_means_the_fraction_the_masks_prune(base):
  result = base[0]
  assert result.achieved_sparsity == result.history[-1].achieved_sparsity
  masks = [np.asarray(m) for m in jax.tree.leaves(result.masks)]
  assert result.achieved_sparsity == sum(int((~m).sum()) for m in masks) / sum(
      m.size for m in masks)
  # A kept weight that is exactly zero is a zero in the report, not a pruned weight.
  params = {"fc": {"kernel": jnp.array([[0.0, 2.0], [3.0, 4.0]])}}
  masks = {"fc": {"kernel": jnp.array([[True, False], [True, True]])}}
  assert jaxprune.training.pruned_fraction(masks) == 0.25
  report = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks), {"fc": {"kernel": True}})
  assert report.targeted_sparsity == 0.5


def test_the_iteration_log_names_the_metric(caplog):
  with caplog.at_level(logging.INFO, logger="jaxprune"):
    run(targets=[0.5], retrain_steps=2, metric=jaxprune.training.perplexity)
  lines = [r.getMessage() for r in caplog.records if "iteration 0:" in r.getMessage()]
  assert len(lines) == 1 and "perplexity" in lines[0] and "metric" not in lines[0], lines

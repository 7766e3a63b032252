"""Checkpoints that cannot be poisoned or silently corrupted (issue 27, cases 1, 2, 4, 5,
8 and 9's damaged checkpoints).

Each run is `tiny_runs.train` (8 Adam steps, a checkpoint every 2: indices 0..3 hold
steps 2, 4, 6, 8) or `tiny_runs.prune_retrain`; a fault is injected, and the test
checks that the run either continues exactly from the last good checkpoint (bitwise
equal to an uninterrupted run) or refuses, naming the checkpoint.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tiny_runs
from tiny_runs import Batches, assert_bitwise_equal, checkpoint_indices

import jaxprune
from jaxprune._src.training import checkpointing  # forges a checkpoint around the checks
from jaxprune.training import LoopState


def _orbax(directory) -> ocp.CheckpointManager:
  """The run's checkpoints opened with orbax itself, to write around the library."""
  options = ocp.CheckpointManagerOptions(max_to_keep=10, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


@pytest.fixture(scope="module")
def clean_train():
  return tiny_runs.train()


@pytest.fixture(scope="module")
def clean_prune_retrain():
  return tiny_runs.prune_retrain()


# ----------------------------------------------------------------------------- case 1


def test_a_nan_update_behind_a_finite_loss_is_never_saved_and_resume_is_exact(
    tmp_path, clean_train):
  ckpt = tmp_path / "ckpt"
  batches = Batches(nan_grad_at=5)  # the update of step 5 makes fc1 NaN; its loss is finite
  with pytest.raises(FloatingPointError, match=r"params/fc1/kernel.*global step 5"):
    tiny_runs.train(train_batches=batches, checkpoint_dir=ckpt)
  assert max(batches.steps) == 5  # stopped at the report right after the bad update
  assert checkpoint_indices(ckpt) == [0, 1]  # steps 2 and 4: nothing after the NaN
  resumed = Batches()
  result = tiny_runs.train(train_batches=resumed, checkpoint_dir=ckpt)
  assert resumed.steps == [4, 5, 6, 7]
  assert_bitwise_equal((result.params, result.opt_state), (clean_train.params,
                                                           clean_train.opt_state))


def test_prune_retrain_stops_at_a_nan_update_and_resumes_exactly(tmp_path,
                                                                  clean_prune_retrain):
  ckpt = tmp_path / "ckpt"
  # Global step 5 is local step 1 of iteration 1: its loss is finite, and the save
  # due right after it would hold the NaN params.
  with pytest.raises(FloatingPointError,
                     match=r"params/fc1/kernel.*global step 5 \(iteration 1, step 2\)"):
    tiny_runs.prune_retrain(train_batches=Batches(nan_grad_at=5), checkpoint_dir=ckpt)
  resumed = Batches()
  result = tiny_runs.prune_retrain(train_batches=resumed, checkpoint_dir=ckpt)
  assert resumed.steps[0] == 4  # iteration 1 again, from the save at the end of iteration 0
  assert_bitwise_equal(result.params, clean_prune_retrain.params)
  assert [r._replace(wall_seconds=0) for r in result.history] == [
      r._replace(wall_seconds=0) for r in clean_prune_retrain.history]


def test_a_save_refuses_an_unsound_state_and_names_the_leaf(tmp_path):
  params = tiny_runs.make_params()
  params["fc2"]["kernel"] = params["fc2"]["kernel"].at[0, 0].set(jnp.inf)
  state = LoopState(params, {"mu": jnp.zeros(3)}, jnp.zeros(2, jnp.uint32))
  unsound = r"not saved \(step 3\): NaN or inf in params/fc2/kernel"
  with jaxprune.Checkpointer(tmp_path / "c") as ckpt, pytest.raises(
      FloatingPointError, match=unsound):
    ckpt.save(state, {"step": 3})
  assert checkpoint_indices(tmp_path / "c") == []
  # An inf in the optimizer state is a sentinel (optax's reduce_on_plateau), a NaN is not.
  sound = LoopState(tiny_runs.make_params(), {"best": jnp.inf}, jnp.zeros(2, jnp.uint32))
  with jaxprune.Checkpointer(tmp_path / "d") as ckpt:
    ckpt.save(sound, {"step": 3})
    with pytest.raises(FloatingPointError, match=r"not saved \(step 4\): NaN .*opt_state/best"):
      ckpt.save(sound._replace(opt_state={"best": jnp.nan}), {"step": 4})
  assert checkpoint_indices(tmp_path / "d") == [0]  # the sound save only


def test_resume_skips_a_checkpoint_whose_state_is_not_sound(tmp_path, clean_train):
  """A NaN state that reached the disk anyway (written around the check, with
  correct checksums) is skipped like a damaged one."""
  from jaxprune._src.training import integrity

  ckpt = tmp_path / "ckpt"
  tiny_runs.train(checkpoint_dir=ckpt, steps=8)
  with jaxprune.Checkpointer(ckpt) as c:
    meta = c.read_meta(3)
  manager = _orbax(ckpt)
  like = checkpointing.restore_state(manager, 3, LoopState(
      clean_train.params, clean_train.opt_state, jnp.zeros(2, jnp.uint32)))
  poisoned = like._replace(params=jax.tree.map(lambda x: x * jnp.nan, like.params))
  tree = {"params": poisoned.params, "opt_state": poisoned.opt_state, "rng": poisoned.rng}
  meta = {**meta, "integrity": {k: dict(zip(c.paths, c.sums)) for k, c in
                                ((k, integrity.checksums(v)) for k, v in tree.items())}}
  meta["step"] = 9
  meta["digest"] = checkpointing._meta_digest(meta)
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                          meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
  with jaxprune.Checkpointer(ckpt) as c:
    state, got = c.resume(like, meta["config"])
  assert got["step"] == 8
  assert integrity.is_sound(state.params, state.opt_state)


# ----------------------------------------------------------------------------- cases 2 and 4


@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_keep_checkpoints_below_one_is_refused_before_any_compute(tmp_path, driver):
  batches = Batches()
  with pytest.raises(ValueError, match=r"keep must be an integer >= 1, got 0"):
    driver(train_batches=batches, checkpoint_dir=tmp_path / "c", keep_checkpoints=0)
  assert batches.steps == [] and not (tmp_path / "c").exists()


def _a_file(tmp_path: pathlib.Path) -> pathlib.Path:
  (tmp_path / "file").write_text("not a directory")
  return tmp_path / "file"


DIRECTORIES = {
    "an existing file": (_a_file, r"exists and is not a directory"),
    "below a file": (lambda t: _a_file(t) / "ckpt", r"exists and is not a directory"),
    "not writable": (lambda t: pathlib.Path("/proc/jaxprune_ckpt"), r"cannot write in /proc"),
    "empty string": (lambda t: "", r"directory='' names no directory"),
}


@pytest.mark.parametrize("case", list(DIRECTORIES))
@pytest.mark.parametrize("driver", [tiny_runs.train, tiny_runs.prune_retrain])
def test_a_checkpoint_dir_that_cannot_hold_checkpoints_is_refused_before_compute(
    tmp_path, case, driver, monkeypatch):
  monkeypatch.chdir(tmp_path)
  directory, message = DIRECTORIES[case]
  batches = Batches()
  with pytest.raises(ValueError, match=message):
    driver(train_batches=batches, checkpoint_dir=directory(tmp_path))
  assert batches.steps == []
  assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["file"])


# ----------------------------------------------------------------------------- case 5, 9


def _finished(tmp_path: pathlib.Path):
  ckpt = tmp_path / "ckpt"
  result = tiny_runs.train(checkpoint_dir=ckpt)
  assert checkpoint_indices(ckpt) == [1, 2, 3]  # keep_checkpoints=3 of steps 2..8
  return ckpt, result


def _flip_in_latest(ckpt, result):
  tiny_runs.flip_a_bit_in_saved_params(ckpt, 3, "fc1")


def _truncate_meta(ckpt, result):
  meta = ckpt / "3" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])


def _edit_meta(ckpt, result):
  meta = ckpt / "3" / "meta" / "metadata"
  text = json.loads(meta.read_text())
  text["step"] = 7  # valid JSON, another position: only the digest can tell
  meta.write_text(json.dumps(text))


def _truncate_arrays(ckpt, result):
  for data in (ckpt / "3" / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:40])


def _empty_step_folder(ckpt, result):
  (ckpt / "4").mkdir()


# (damage, the checkpoint it hits, the reason named, the steps trained on resume)
DAMAGE = {
    "a flipped byte in an array": (_flip_in_latest, 3, r"params/fc1/kernel reads back with "
                                   r"checksum [0-9a-f:]+, saved [0-9a-f:]+", [6, 7]),
    "a truncated meta file": (_truncate_meta, 3, r"its meta does not read", [6, 7]),
    "an edited meta file": (_edit_meta, 3, r"does not match its digest", [6, 7]),
    "truncated array data": (_truncate_arrays, 3, r"its arrays do not read", [6, 7]),
    # A folder with nothing in it, newer than the finished run: that run is resumed.
    "an empty step folder": (_empty_step_folder, 4, r"its meta does not read", []),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, case, caplog,
                                                                    clean_train):
  damage, index, reason, trained = DAMAGE[case]
  ckpt, result = _finished(tmp_path)
  damage(ckpt, result)
  batches = Batches()
  with caplog.at_level(logging.WARNING, logger="jaxprune"):
    again = tiny_runs.train(train_batches=batches, checkpoint_dir=ckpt)
  skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(skipped) == 1, caplog.text
  assert f"skipped checkpoint {index}: " in skipped[0] and "resuming from checkpoint" in (
      skipped[0])
  assert re.search(reason, skipped[0]), skipped[0]
  assert batches.steps == trained  # from the newest good checkpoint
  assert_bitwise_equal((again.params, again.opt_state), (clean_train.params,
                                                         clean_train.opt_state))


def test_when_no_checkpoint_reads_back_resume_refuses_naming_each(tmp_path):
  ckpt, _ = _finished(tmp_path)
  for index in checkpoint_indices(ckpt):
    meta = ckpt / str(index) / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])
  batches = Batches()
  with pytest.raises(ValueError, match=r"no checkpoint in .* reads back intact.*checkpoint 3: "
                     r"its meta does not read.*checkpoint 2: .*checkpoint 1: "):
    tiny_runs.train(train_batches=batches, checkpoint_dir=ckpt)
  assert batches.steps == []
  assert checkpoint_indices(ckpt) == [1, 2, 3]  # nothing deleted


def test_a_checkpoint_of_an_older_format_is_refused_naming_the_format(tmp_path):
  ckpt = tmp_path / "ckpt"
  tiny_runs.train(checkpoint_dir=ckpt, steps=2)
  manager = _orbax(ckpt)
  restored = manager.restore(0, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  old_meta = {"step": 2, "config": {**restored["meta"]["config"], "format": 3}}
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(restored["state"]),
                                          meta=ocp.args.JsonSave(old_meta)))
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(ValueError, match=r"format is 3 there and 5 now"):
    tiny_runs.train(checkpoint_dir=ckpt, steps=2)

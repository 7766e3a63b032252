"""Tests for the example LM (examples/lm_model.py) and its data (examples/lm_data.py)."""

import math
import re

import jax
import jax.numpy as jnp
import lm_data
import lm_model
import numpy as np
import optax
import pytest
from flax import nnx

TINY = lm_model.LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, context=16)
TINY_MOE = lm_model.LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, context=16,
                             moe=True, num_experts=4, top_k=2)


def _paths(tree):
  return {
      "/".join(str(k.key) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope="module")
def dense():
  return lm_model.split_model(lm_model.TransformerLM(TINY, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def moe():
  return lm_model.split_model(lm_model.TransformerLM(TINY_MOE, rngs=nnx.Rngs(0)))


def test_param_paths(dense):
  paths = _paths(dense[1])
  for name in ("blocks/0/attn/output_proj/kernel", "blocks/0/attn/qkv/kernel",
               "blocks/0/mlp/fc1/kernel", "blocks/1/mlp/fc2/kernel", "lm_head/kernel"):
    assert name in paths, sorted(paths)
  assert paths["blocks/0/mlp/fc1/kernel"].shape == (32, 64)
  assert paths["blocks/0/mlp/fc2/kernel"].shape == (64, 32)


def test_moe_param_shapes(moe):
  paths = _paths(moe[1])
  assert paths["blocks/0/mlp/fc1"].shape == (4, 32, 64)
  assert paths["blocks/0/mlp/fc2"].shape == (4, 64, 32)
  assert paths["blocks/0/mlp/router/kernel"].shape == (32, 4)


def test_moe_gates_are_top_k_and_sum_to_one():
  model = lm_model.TransformerLM(TINY_MOE, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  gates = model.blocks[0].mlp.gates(x)
  assert gates.shape == (2, 5, 4)
  np.testing.assert_array_equal((gates > 0).sum(-1), 2)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_fresh_loss_near_uniform(which, request):
  graphdef, params, rest = request.getfixturevalue(which)
  batch = jax.random.randint(jax.random.key(0), (4, 17), 0, 256)
  loss = jax.jit(lm_model.make_loss_fn(graphdef, rest))(params, batch)
  assert abs(float(loss) - math.log(256)) < 0.5


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_causal(which, request):
  graphdef, params, rest = request.getfixturevalue(which)
  apply = jax.jit(lm_model.make_apply_fn(graphdef, rest))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
  a, b = apply(params, tokens), apply(params, changed)
  assert a.shape == (2, 16, 256)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
  assert not np.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_adam_lowers_loss(which, request):
  graphdef, params, rest = request.getfixturevalue(which)
  initial = params
  tokens = lm_data.encode("the quick brown fox jumps over the lazy dog. " * 40)
  batch_fn = lm_data.make_train_batches(tokens, batch_size=4, context=16, seed=0)
  loss_fn = lm_model.make_loss_fn(graphdef, rest)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, i):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_fn(i))
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, i)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 2.0, losses
  if which == "moe":  # the router learns too: gradients flow through the top-k gates
    router = params["blocks"][0]["mlp"]["router"]["kernel"]
    assert not np.allclose(router, initial["blocks"][0]["mlp"]["router"]["kernel"])


def test_train_batches_pure_in_step():
  tokens = np.arange(1000)
  batch_fn = lm_data.make_train_batches(tokens, batch_size=4, context=16, seed=3)
  a, b, c = batch_fn(5), batch_fn(5), batch_fn(6)
  assert a.shape == (4, 17) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Windows are contiguous slices of the text.
  np.testing.assert_array_equal(np.diff(np.asarray(a), axis=1), 1)
  np.testing.assert_array_equal(jax.jit(batch_fn)(jnp.int32(5)), a)


def test_train_batches_different_seeds_differ():
  tokens = np.arange(1000) % 256
  a = lm_data.make_train_batches(tokens, 4, 16, seed=0)(0)
  b = lm_data.make_train_batches(tokens, 4, 16, seed=1)(0)
  assert not np.array_equal(a, b)


def test_eval_batches():
  tokens = np.arange(2000)  # token value == position, so windows reveal their starts
  first = lm_data.make_eval_batches(tokens, batch_size=4, context=16, num_batches=3)
  again = lm_data.make_eval_batches(tokens, batch_size=4, context=16, num_batches=3)
  assert len(first) == 3
  for x, y in zip(first, again):
    assert x.shape == (4, 17) and x.dtype == jnp.int32
    np.testing.assert_array_equal(x, y)
  starts = np.concatenate([np.asarray(b[:, 0]) for b in first])
  assert starts[0] == 0 and starts[-1] == 2000 - 17
  assert np.all(np.diff(starts) >= 17), starts  # non-overlapping
  assert np.ptp(np.diff(starts)) <= 1, starts  # evenly spaced


def test_eval_batches_too_short():
  with pytest.raises(ValueError, match="context"):
    lm_data.make_eval_batches(np.zeros(16, np.uint8), 2, 16, 1)
  # Exactly context + 1 tokens is enough (the windows all coincide).
  assert lm_data.make_eval_batches(np.zeros(17, np.uint8), 2, 16, 1)[0].shape == (2, 17)


def test_split_and_roundtrip():
  text = "héllo wörld, " * 10
  tokens = lm_data.encode(text)
  assert lm_data.decode(tokens) == text
  train, val = lm_data.train_val_split(tokens, 0.1)
  assert len(train) + len(val) == len(tokens)
  assert len(val) == round(0.1 * len(tokens))
  np.testing.assert_array_equal(np.concatenate([train, val]), tokens)


def test_default_corpus():
  text = lm_data.default_corpus_text(max_bytes=50_000)
  assert 0 < len(text.encode("utf-8")) <= 50_000
  assert "def " in text
  assert lm_data.default_corpus_text(max_bytes=50_000) == text
  assert lm_data.load_text(None, max_bytes=1000) == lm_data.default_corpus_text(1000)


def test_load_text(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("abc déf", encoding="utf-8")
  assert lm_data.load_text(str(path)) == "abc déf"
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(OSError, match=re.escape(missing)):
    lm_data.load_text(missing)


def test_generate_length(dense):
  graphdef, params, rest = dense
  apply = lm_model.make_apply_fn(graphdef, rest)
  # The 20-byte prompt is longer than the context: the window must slide from the start.
  for prompt in (b"hi", b"x" * 20, b""):
    out = lm_model.generate(apply, params, prompt, 25, context=16, key=jax.random.key(0))
    assert isinstance(out, bytes) and len(out) == 25
  greedy = [lm_model.generate(apply, params, b"ab", 8, context=16, key=jax.random.key(i),
                              temperature=0.0) for i in range(2)]
  assert greedy[0] == greedy[1]


def test_generate_greedy_matches_naive_loop(dense):
  graphdef, params, rest = dense
  apply = lm_model.make_apply_fn(graphdef, rest)
  prompt = b"fifteen bytes.."  # the 16-token window fills, then slides
  out = lm_model.generate(apply, params, prompt, 4, context=16, key=jax.random.key(0),
                          temperature=0.0)
  seq, jit_apply = list(prompt), jax.jit(apply)
  for _ in range(4):
    logits = jit_apply(params, jnp.asarray(seq[-16:], jnp.int32)[None])
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert out == bytes(seq[len(prompt):])

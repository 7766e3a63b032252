"""Masks held packed to 1 bit per weight: exact round trips, the NumPy bit order, the
state `pruned` holds, and a fixed-mask step that reads 1/8 byte per weight per use."""

import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import jaxprune


@st.composite
def masks(draw):
  ndim = draw(st.integers(0, 3))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  if ndim and draw(st.booleans()):
    shape = (*shape[:-1], 8 * draw(st.integers(1, 4)))  # packable
  seed = draw(st.integers(0, 2**31 - 1))
  return np.random.default_rng(seed).random(shape) < draw(st.floats(0, 1))


@settings(max_examples=60, deadline=None)
@given(masks())
def test_packing_round_trips_exactly_in_numpy_packbits_order(mask):
  held = jaxprune.tree.pack_mask(mask)
  if mask.ndim and mask.shape[-1] % 8 == 0:
    assert held.dtype == jnp.uint8 and held.shape == (*mask.shape[:-1], mask.shape[-1] // 8)
    np.testing.assert_array_equal(held, np.packbits(mask, axis=-1))
  else:
    assert held.dtype == jnp.bool_ and held.shape == mask.shape
  assert jax.eval_shape(jaxprune.tree.unpack_mask, held).shape == mask.shape
  np.testing.assert_array_equal(jaxprune.tree.unpack_mask(held), mask)
  np.testing.assert_array_equal(jax.jit(jaxprune.tree.unpack_mask)(held), mask)


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k[0], (16, 64)), "bias": jnp.zeros(64)},
          "fc2": {"kernel": jax.random.normal(k[1], (64, 10))},  # 10: not a multiple of 8
          "scale": jnp.float32(2.0)}


def test_pruned_state_holds_bits_and_get_and_set_masks_speak_bool():
  params = _params()
  where = jaxprune.select(params, include="*kernel")
  masks = jaxprune.ranked_masks(params, 0.75, where)
  state = jaxprune.pruned(optax.adam(1e-2), masks).init(params)
  held = state.packed_masks
  assert held["fc1"]["kernel"].dtype == jnp.uint8 and held["fc1"]["kernel"].shape == (16, 8)
  assert held["fc2"]["kernel"].dtype == jnp.bool_ and held["fc2"]["kernel"].shape == (64, 10)
  assert held["fc1"]["bias"] is None and held["scale"] is None
  back = jaxprune.get_masks(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(masks), strict=True):
    assert a.dtype == jnp.bool_
    np.testing.assert_array_equal(a, b)
  fewer = jaxprune.ranked_masks(params, 0.9, where, previous=masks)
  state = jaxprune.set_masks(state, fewer)
  assert state.packed_masks["fc1"]["kernel"].dtype == jnp.uint8
  np.testing.assert_array_equal(jaxprune.get_masks(state)["fc1"]["kernel"], fewer["fc1"]["kernel"])
  with pytest.raises(ValueError, match=r"fc1/kernel: mask shape \(16, 8\) != parameter shape"):
    jaxprune.set_masks(state, {**fewer, "fc1": {"kernel": jnp.ones((16, 8), bool),
                                                 "bias": None}})


def test_gradual_masks_stay_packed_through_the_cond():
  params = _params()
  where = jaxprune.select(params, include="*kernel")
  tx = jaxprune.gradually_pruned(optax.adam(1e-2), where=where, update_every=2,
                                 schedule=optax.polynomial_schedule(init_value=0.0, end_value=0.8,
                                                                    power=3,
                                                          transition_steps=4))
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.tree.map(jnp.ones_like, p), s, p)))
  for _ in range(6):
    params, state = step(params, state)
  assert state.packed_masks["fc1"]["kernel"].dtype == jnp.uint8
  masks = jaxprune.get_masks(state)
  assert float(jnp.mean(~masks["fc1"]["kernel"])) == pytest.approx(0.8, abs=1 / 1024)
  assert bool(jnp.all(jnp.where(masks["fc1"]["kernel"], True, params["fc1"]["kernel"] == 0)))


def _mlp(widths=(256, 512, 512, 128)):
  keys = jax.random.split(jax.random.key(1), len(widths) - 1)
  return {f"fc{i}": {"kernel": jax.random.normal(k, (a, b)) * 0.05}
          for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}


def _compiled_update(tx, params):
  grads = jax.tree.map(jnp.ones_like, params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()


def _bytes(compiled):
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis["bytes accessed"]


def test_a_fixed_mask_adamw_step_reads_under_one_percent_more_than_adamw():
  # Bool masks read three times (twice in the moments, once in the final where) cost
  # ~3 of AdamW's ~40 bytes per weight here (1.075x); packed bits cost 3/8 of a byte.
  params = _mlp()
  masks = jaxprune.ranked_masks(params, 0.8, jaxprune.select(params))
  adamw = lambda: optax.adamw(1e-3, weight_decay=0.1)
  plain = _bytes(_compiled_update(adamw(), params))
  pruned = _compiled_update(jaxprune.pruned(adamw(), masks), params)
  assert _bytes(pruned) / plain <= 1.01
  # The bits are unpacked inside the fusions that read them: no bool mask the size
  # of a leaf is ever written.
  hlo = pruned.as_text()
  written = re.findall(r"= pred\[(\d+),(\d+)\]\{[^}]*\} fusion\(", hlo)
  assert not written, written
  # The bit shifts are an iota inside each fusion: fed in as a constant u8[8] operand
  # they kept XLA's CPU loops from vectorizing (the step took 1.7x as long).
  assert not re.search(r"= u8\[8\]\{0\} constant\(", hlo)


# Leaves of up to 2 * 2**18 entries are counted whole; larger ones a chunk of rows at a
# time (2**18 entries per chunk, the last one shorter here), packed and unpackable
# (a last axis of 5) alike.
SELECTION_SHAPES = {"whole": {"a": (12, 16), "b": (6, 5)},
                    "chunked": {"a": (1024, 1024), "b": (131_072, 5)}}


def _gradual(scope, sparsity, **kwargs):
  """`gradually_pruned` recomputing its masks by `|w|` at every update."""
  return jaxprune.gradually_pruned(
      optax.sgd(0.0), schedule=lambda count: jaxprune.Prune(sparsity, scope=scope),
      update_every=1, **kwargs)


@pytest.mark.parametrize("chunk", list(SELECTION_SHAPES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_gradual_update_selects_on_the_held_masks_like_on_bool_ones(scope, chunk):
  # `pruned`'s gradual update ranks with the packed masks as they are held; it
  # must give the bool selection's masks exactly, packed and unpackable leaves
  # (a last axis of 5) alike, counted whole or in chunks.
  rng = np.random.default_rng(3)
  shapes = SELECTION_SHAPES[chunk]
  params = {name: jnp.asarray(rng.integers(0, 4, shape) / 2, jnp.float32)
            for name, shape in shapes.items()}
  params["c"] = jnp.ones(3)
  where = {"a": True, "b": True, "c": False}
  previous = jaxprune.ranked_masks(params, 0.3, where, scope=scope)
  tx = _gradual(scope, 0.7, masks=previous, where=where)
  state = tx.init(params)
  held = state.packed_masks
  assert held["a"].dtype == jnp.uint8 and held["b"].dtype == jnp.bool_
  np.testing.assert_array_equal(held["a"], jaxprune.tree.pack_mask(previous["a"]))
  grads = jax.tree.map(jnp.zeros_like, params)
  got = jax.jit(tx.update)(grads, state, params)[1].packed_masks  # recomputed at count 0
  want = jaxprune.ranked_masks(params, 0.7, where, scope=scope, previous=previous)
  assert got["c"] is None and got["a"].dtype == jnp.uint8
  for name in ("a", "b"):
    np.testing.assert_array_equal(jaxprune.tree.unpack_mask(got[name]), want[name])


def test_the_gradual_update_writes_out_no_bool_mask():
  # Unpacked, the held masks were written out as operands of the selection, and the
  # new masks as its results (1.86 B/weight of scratch for these shapes): on a
  # 7.3M MLP that put a gradual step that does not update its masks at 1.43x a
  # plain AdamW step, against 1.01x now.
  shapes = {"fc1": (1024, 2048), "fc2": (2048, 2048), "fc3": (2048, 512)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  where = {k: True for k in shapes}
  n = sum(r * c for r, c in shapes.values())
  for scope in ("layer", "global"):
    tx = _gradual(scope, 0.8, where=where)
    state = jax.eval_shape(tx.init, params)
    assert jax.tree.map(lambda h: h.dtype, state.packed_masks) == {k: jnp.uint8 for k in shapes}
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes / n < 1.0, scope
    # No bool mask the size of a leaf is written (the selection reads and writes the
    # held bits; chunks of rows aside).
    written = re.findall(r"= pred\[(\d+),(\d+)\]\{[^}]*\} fusion\(", compiled.as_text())
    assert not {(int(r), int(c)) for r, c in written} & set(shapes.values()), (scope, written)


SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-30, -3.5], np.float32)

# An inner optimizer whose state is the last gradients it was given.
SEEN = optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                    lambda updates, state, params=None: (updates, updates))


def kept_or_zero(held, x):
  """What `pruned` hands its inner optimizer for gradients `x` under the held mask
  `held` (`where(unpack_mask(held), x, 0)`, read from the packed bits)."""
  mask = jaxprune.tree.unpack_mask(held)
  params = {"w": jnp.zeros(mask.shape, x.dtype)}
  tx = jaxprune.pruned(SEEN, {"w": mask})
  state = tx.init(params)
  assert state.packed_masks["w"].dtype == held.dtype  # held as given
  return tx.update({"w": x}, state, params)[1].inner_state["w"]


@settings(max_examples=60, deadline=None)
@given(masks(), st.sampled_from(["float32", "bfloat16", "float16", "int32"]),
       st.integers(0, 2**31 - 1))
def test_kept_or_zero_is_where_bit_for_bit(mask, dtype, seed):
  # NaN, infinities and -0.0 at pruned positions come out +0.0, as from `where`.
  rng = np.random.default_rng(seed)
  if dtype == "int32":
    x = jnp.asarray(rng.integers(-9, 9, mask.shape), jnp.int32)
  else:
    x = jnp.asarray(rng.choice(SPECIALS, mask.shape)).astype(dtype)
  held = jaxprune.tree.pack_mask(mask)
  expected = jnp.where(mask, x, jnp.zeros((), x.dtype))
  unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, unsigned))
  for got in (kept_or_zero(held, x), jax.jit(kept_or_zero)(held, x)):
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_kept_or_zero_differentiates_as_where():
  # A bitcast alone has no derivative: JAX would give 0 silently.
  mask = np.array([[True, False, True, True, False, False, True, False]] * 2)
  held, x = jaxprune.tree.pack_mask(mask), jnp.arange(16.0).reshape(2, 8)
  f = lambda x: jnp.sum(kept_or_zero(held, x) ** 2)
  g = lambda x: jnp.sum(jnp.where(mask, x, 0.0) ** 2)
  np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(g)(x))
  np.testing.assert_array_equal(jax.jvp(f, (x,), (jnp.ones_like(x),))[1],
                                jax.jvp(g, (x,), (jnp.ones_like(x),))[1])
  assert float(jnp.abs(jax.grad(f)(x)).sum()) > 0


def test_kept_or_zero_names_a_shape_mismatch():
  # Gradients of another shape than the mask held for their leaf.
  params = {"w": jnp.zeros((2, 8))}
  tx = jaxprune.pruned(SEEN, {"w": np.ones((2, 8), bool)})
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"shape \(2, 8\) cannot select an array of shape \(2, 16\)"):
    tx.update({"w": jnp.ones((2, 16))}, state, params)


def _primitives(jaxpr) -> list[str]:
  """Every primitive of `jaxpr`, nested jaxprs (jit, custom_jvp) included."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(str(eqn.primitive))
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out += _primitives(sub)
  return out


def test_pruned_zeroes_gradients_with_an_and_not_a_select():
  # A select on the unpacked bits ran XLA:CPU's streaming moment updates 1.4-1.8x
  # slower; the step keeps one `where` per leaf (the final one) and no more.
  params = _params()
  masks = jaxprune.ranked_masks(params, 0.75, jaxprune.select(params, include="*kernel"))
  def update_primitives(tx):
    update = lambda g, s, p: tx.update(g, s, p)
    return _primitives(jax.make_jaxpr(update)(params, tx.init(params), params).jaxpr)

  plain, prims = update_primitives(optax.adamw(1e-2)), update_primitives(
      jaxprune.pruned(optax.adamw(1e-2), masks))
  # Beyond adamw's: the final where(m, u, -w) of fc1 and fc2, and the count's increment.
  assert prims.count("select_n") == plain.count("select_n") + 2 + 1
  assert prims.count("and") >= 1 and prims.count("bitcast_convert_type") >= 2

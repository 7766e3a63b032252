"""The selection engine: both threshold paths exact, and what accelerators would run.

`magnitude_rank` finds the k-th smallest key either by a radix histogram
(scatter-add, chosen on CPU where it is faster) or by bisection with comparison
counts (every other platform, and Explicit-axis meshes). Both must give the sort
reference's threshold, count below and tie count for every k; the TPU and CUDA
lowerings of every selection the library runs must contain no scatter and no sort.

Through `ranked_masks`, the CPU runs the histogram (16-bit digits for rankings of
2**20 weights or more, 11-11-10 below) and arrays on an Explicit-axis mesh run the
comparison counts, so both run here, on one CPU device.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_references import exact_count

import jaxprune

SHAPES = [[(7,)], [(3, 5)], [(4, 4), (9,), (2, 3, 2)]]


def _explicit_mesh() -> jax.sharding.Mesh:
  """One CPU device as an Explicit-axis mesh: arrays placed on it carry their sharding
  in their type, and `ranked_masks` ranks them by comparison counts."""
  return jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])


def _ranked(engine: str, by: str):
  """`(params, sparsity, previous=None) -> masks` and its `lower`, jitted: `ranked_masks`
  of every leaf, all ranked together, by `|w|` or by the values themselves as given
  scores; on the CPU's histogram or, for `engine="counts"`, on arrays placed on an
  Explicit-axis mesh."""
  def masks(params, sparsity, previous):
    where = jax.tree.map(lambda _: True, params)
    score = jaxprune.scores.given_score(params) if by == "value" else None
    return jaxprune.ranked_masks(params, sparsity, where, scope="global", score=score,
                                 previous=previous)

  jitted = jax.jit(masks)
  if engine == "histogram":
    return (lambda params, sparsity, previous=None: jitted(params, sparsity, previous),
            lambda params, sparsity, previous=None: jitted.lower(params, sparsity, previous))
  mesh = _explicit_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))

  def on_mesh(fn):
    def run(params, sparsity, previous=None):
      with jax.set_mesh(mesh):
        return fn(jax.device_put(params, sharding), sparsity,
                  None if previous is None else jax.device_put(previous, sharding))
    return run

  return on_mesh(jitted), on_mesh(jitted.lower)


ENGINES = ("histogram", "counts")


def _values(shapes, high: int, seed: int) -> list[np.ndarray]:
  """float32 arrays: `high` levels (ties) of both signs, or (`high=2**32`) floats of
  random bit patterns, every exponent and sign (NaN, infinities and subnormals
  replaced by zeros: ranked inputs are finite)."""
  rng = np.random.default_rng(seed)
  out = []
  for s in shapes:
    if high < 2**32:
      out.append((rng.integers(0, high, size=s) - high // 2).astype(np.float32) / 4)
      continue
    x = rng.integers(0, 2**32, size=s, dtype=np.uint64).astype(np.uint32).view(np.float32)
    normal = np.isfinite(x) & ((x == 0) | (np.abs(x) >= np.finfo(np.float32).tiny))
    out.append(np.where(normal, x, np.float32(0)))
  return out


def _sort_reference(values: list[np.ndarray], k: int, by: str) -> list[np.ndarray]:
  """Kept masks: the `k` lowest of all values (of |values| by magnitude) pruned, ties by
  leaf order, then row-major (a stable sort)."""
  flat = np.concatenate([v.ravel() for v in values]).astype(np.float64)
  flat = np.abs(flat) if by == "magnitude" else flat
  pruned = np.zeros(flat.size, bool)
  pruned[np.argsort(flat, kind="stable")[:k]] = True
  out, start = [], 0
  for v in values:
    out.append(~pruned[start:start + v.size].reshape(v.shape))
    start += v.size
  return out


@pytest.mark.parametrize("by", ["magnitude", "value"])
@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_runs_where_it_is_meant_to(engine, by):
  # The CPU histogram is a scatter-add; the comparison counts have none.
  _, lower = _ranked(engine, by)
  params = {f"l{i}": jnp.ones(s) for i, s in enumerate(SHAPES[-1])}
  hlo = lower(params, jnp.float32(0.5)).compile().as_text()
  assert (" scatter(" in hlo) == (engine == "histogram")


RANKED = {(engine, by): _ranked(engine, by)[0] for engine in ENGINES
          for by in ("magnitude", "value")}


@settings(max_examples=60, deadline=None)
@given(shapes=st.sampled_from(SHAPES), high=st.sampled_from([2, 50, 2**32]),
       seed=st.integers(0, 2**31 - 1), fraction=st.floats(0, 1))
def test_both_threshold_engines_give_the_sort_reference_masks(shapes, high, seed, fraction):
  # The CPU histogram (11-11-10 bits at these sizes) and the comparison counts, ranking
  # |w| or signed values (every key bit), all leaves together: exactly
  # round(fraction * n) pruned, the sort reference's.
  values = _values(shapes, high, seed)
  params = {f"l{i}": jnp.asarray(v) for i, v in enumerate(values)}
  k = exact_count(fraction, sum(v.size for v in values))
  for (engine, by), ranked in RANKED.items():
    got = ranked(params, jnp.float32(fraction))
    want = _sort_reference(values, k, by)
    for i, w in enumerate(want):
      np.testing.assert_array_equal(np.asarray(got[f"l{i}"]), w, err_msg=f"{engine} {by}")


@pytest.mark.parametrize("high", [2, 50, 2**32])
@pytest.mark.parametrize("shapes", [[(1024, 1024)], [(1024, 600), (500, 900), (2, 3, 4)]],
                         ids=["one leaf", "three leaves"])
def test_the_wide_histogram_gives_the_sort_reference_masks(shapes, high):
  # 2**20 weights or more ranked together: the histogram's 16-bit digits.
  values = _values(shapes, high, seed=high)
  params = {f"l{i}": jnp.asarray(v) for i, v in enumerate(values)}
  ranked, _ = _ranked("histogram", "value")
  n = sum(v.size for v in values)
  assert n >= 2**20
  for fraction in (0.0, 0.37, 1.0):
    got = ranked(params, jnp.float32(fraction))
    for i, w in enumerate(_sort_reference(values, exact_count(fraction, n), "value")):
      np.testing.assert_array_equal(np.asarray(got[f"l{i}"]), w, err_msg=f"{fraction}")


def test_the_engines_at_the_extreme_keys_and_every_k():
  # The largest finite values of both signs, ties at both, zeros of both signs and
  # weights pruned before (ranked below everything), for every count.
  big = np.finfo(np.float32).max
  w = np.array([1.0, big, big, 0.0, -0.0, -big, -big, 1.0], np.float32)
  kept = np.array([False, True, True, True, True, True, True, False])
  for (engine, by), ranked in RANKED.items():
    # Pruned before first, then by the ranked value, ties by position.
    order = np.lexsort((np.arange(w.size), np.abs(w) if by == "magnitude" else w, kept))
    for k in range(w.size + 1):
      got = ranked({"w": jnp.asarray(w)}, jnp.float32(k / w.size), {"w": jnp.asarray(kept)})
      want = kept.copy()
      want[order[:k]] = False
      np.testing.assert_array_equal(np.asarray(got["w"]), want, err_msg=f"{engine} {by} k={k}")


def _modules(f, *args) -> dict[str, str]:
  return {p: jax.export.export(jax.jit(f), platforms=[p])(*args).mlir_module()
          for p in ("tpu", "cuda", "cpu")}


PARAMS = {"fc1": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)},
          "fc2": {"kernel": jnp.ones((32, 16))}, "out": {"kernel": jnp.ones((16, 3, 8))}}
WHERE = jaxprune.select(PARAMS)
GRADUAL = jaxprune.gradually_pruned(optax.adam(1e-3), where=WHERE, update_every=2,
                                    schedule=optax.polynomial_schedule(init_value=0.0,
                                                                       end_value=0.8,
                                                             power=3, transition_steps=10))
CASES = {
    "magnitude layer": (lambda p: jaxprune.ranked_masks(p, 0.7, WHERE), (PARAMS,)),
    "magnitude global": (lambda p: jaxprune.ranked_masks(p, 0.7, WHERE, scope="global"),
                         (PARAMS,)),
    "magnitude previous": (lambda p, m: jaxprune.ranked_masks(p, 0.9, WHERE, previous=m),
                           (PARAMS, jaxprune.ranked_masks(PARAMS, 0.5, WHERE))),
    "nm": (lambda p: jaxprune.nm_masks(p, 2, 4, jaxprune.select(p, exclude=("out",))),
           (PARAMS,)),
    "gradual pruned update": (lambda g, s, p: GRADUAL.update(g, s, p),
                              (PARAMS, GRADUAL.init(PARAMS), PARAMS)),
    "prune_step": (lambda p, s, o: jaxprune.prune_step(p, o, s, WHERE),
                   (PARAMS, jnp.float32(0.6), GRADUAL.init(PARAMS))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tpu_and_cuda_lowerings_have_no_scatter_and_no_sort(case):
  f, args = CASES[case]
  modules = _modules(f, *args)
  for platform in ("tpu", "cuda"):
    assert "stablehlo.scatter" not in modules[platform], platform
    assert "stablehlo.sort" not in modules[platform], platform
    assert "stablehlo.while" in modules[platform] or case == "nm", platform  # the bisection
  if case.startswith("magnitude"):
    # The CPU keeps its faster radix histogram: the choice is made per platform.
    assert "stablehlo.scatter" in modules["cpu"]


def sort_reference_masks(params, sparsity, scope):
  """Kept masks by a stable sort of |w| (ties by leaf order, then row-major)."""
  names = sorted(params)
  flats = [np.abs(np.asarray(params[n]["kernel"], np.float32)).ravel() for n in names]
  if scope == "layer":
    out = {}
    for n, f in zip(names, flats):
      pruned = np.zeros(f.size, bool)
      pruned[np.argsort(f, kind="stable")[:round(sparsity * f.size)]] = True
      out[n] = ~pruned.reshape(params[n]["kernel"].shape)
    return out
  flat = np.concatenate(flats)
  pruned = np.zeros(flat.size, bool)
  pruned[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = True
  out, start = {}, 0
  for n, f in zip(names, flats):
    out[n] = ~pruned[start:start + f.size].reshape(params[n]["kernel"].shape)
    start += f.size
  return out


SHAPE_CYCLE = [(6, 4), (5, 3), (6, 4), (2, 3, 4), (6, 4), (5, 3)]


def _leaf_stacks(lowered_text: str) -> list[str]:
  """The types of the concatenations of a lowered program that stack arrays of two or
  more axes (a group's leaves), e.g. `16x4x4xf32`; scalars stacked into vectors (a
  group's counts) aside."""
  types = re.findall(r"stablehlo\.concatenate.*-> tensor<([^>]*)>", lowered_text)
  return [t for t in types if t.count("x") >= 2]


# Groups of 16 equal leaves or more (up to 2**30 bytes) are stacked, smaller ones
# pick their members by `lax.switch`: 16 cycles give groups of 48, 32 and 16, 3 cycles
# groups of 9, 6 and 3.
CYCLES = {"stacked": 16, "switch": 3}


@pytest.mark.parametrize("grouping", list(CYCLES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_leaves_of_equal_shape_share_a_loop_and_stay_exact(scope, grouping):
  # Rounded weights: many ties, within and across grouped leaves, in an order that
  # interleaves the groups (ties are broken by leaf order, not group order). A group
  # over the stack limit picks its members by `lax.switch` instead of from a stack.
  params = {f"l{i:02d}": {"kernel": jnp.round(2 * jax.random.normal(jax.random.key(i), s))}
            for i, s in enumerate(SHAPE_CYCLE * CYCLES[grouping])}
  where = jaxprune.select(params)
  prune = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.55, where, scope=scope))
  stacks = _leaf_stacks(prune.lower(params).as_text())
  if grouping == "stacked":
    assert {"48x6x4xf32", "32x5x3xf32", "16x2x3x4xf32"} <= set(stacks), stacks
  else:
    assert not stacks, stacks
  got = prune(params)
  want = sort_reference_masks(params, 0.55, scope)
  for name in params:
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), want[name], err_msg=name)


def _stacks_of(members: int, shape: tuple[int, ...]) -> list[str]:
  """The leaf stacks of a global selection over `members` leaves of `shape` and a lone
  leaf of 3 weights (abstract: lowered only)."""
  params = {f"l{i:02d}": jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(members)}
  params["lone"] = jax.ShapeDtypeStruct((3,), jnp.float32)
  where = jax.tree.map(lambda _: True, params)
  return _leaf_stacks(jax.jit(lambda p: jaxprune.ranked_masks(p, 0.3, where, scope="global"))
                      .lower(params).as_text())


def test_a_group_is_stacked_within_its_limits_only():
  # 16 members of 64 bytes: one stack of the weights (none of the absent previous
  # masks, none of the lone leaf); exactly 2**30 bytes still stack, a row more does not;
  # 15 members switch.
  assert _stacks_of(16, (4, 4)) == ["16x4x4xf32"]
  assert _stacks_of(16, (4096, 4096)) == ["16x4096x4096xf32"]
  assert _stacks_of(16, (4097, 4096)) == []
  assert _stacks_of(15, (4, 4)) == []
  # The stacked group ranks exactly (ties across members and with the lone leaf).
  params = {f"l{i:02d}": {"kernel": jnp.round(2 * jax.random.normal(jax.random.key(i), (4, 4)))}
            for i in range(16)}
  params["lone"] = {"kernel": jnp.round(2 * jax.random.normal(jax.random.key(99), (3,)))}
  where = jax.tree.map(lambda _: True, params)
  got = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.3, where, scope="global"))(params)
  want = sort_reference_masks(params, 0.3, "global")
  for name in params:
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), want[name], err_msg=name)


def test_the_counting_passes_stack_a_group_once_not_per_pass():
  # The passes read the group through an optimization barrier; a stack built
  # behind it would be copied again in each of the 32 passes. (Arrays on an
  # Explicit-axis mesh take the comparison counts on CPU.)
  mesh = _explicit_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  ws = [jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding) for _ in range(32)]
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda ws: jaxprune.ranked_masks(ws, 1000 / (32 * 64 * 64), [True] * 32,
                                                   scope="global")).lower(ws).compile().as_text()
  assert " scatter(" not in hlo  # the comparison counts, not the histogram
  assert hlo.count(" concatenate(") == 1


def _program_size(n_leaves: int, scope: str, shapes=((16, 8),)) -> dict[str, int]:
  params = {f"l{i:03d}": {"kernel": jnp.ones(shapes[i % len(shapes)])} for i in range(n_leaves)}
  where = jaxprune.select(params)
  # The optimized HLO, after XLA has inlined every call: what is compiled.
  hlo = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.7, where, scope=scope)).lower(
      params).compile().as_text()
  return {op: hlo.count(op) for op in (" scatter(", " while(")}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_program_grows_with_distinct_shapes_not_with_leaves(scope):
  # One selection per distinct shape: 4 or 32 equal leaves lower to the same
  # number of histogram scatters and loops (compile time follows from it).
  assert _program_size(4, scope) == _program_size(32, scope)
  one_shape = _program_size(32, scope)
  assert one_shape[" scatter("] >= 2  # the CPU histogram's two passes are there
  two_shapes = _program_size(32, scope, shapes=((16, 8), (8, 8)))
  assert two_shapes[" scatter("] > one_shape[" scatter("]


def _slice_count(n_leaves: int, scope: str) -> int:
  ws = [jax.ShapeDtypeStruct((16, 8), jnp.float32) for _ in range(n_leaves)]
  hlo = jax.jit(lambda ws: jaxprune.ranked_masks(ws, 0.7, [True] * n_leaves,
                                                    scope=scope)).lower(ws).compile().as_text()
  return hlo.count(" slice(")


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("counts", [(4, 12), (16, 48)], ids=["switch", "stacked"])
def test_no_leaf_is_cut_out_of_a_stacked_result(scope, counts):
  # XLA's CPU backend compiles each slice of a stacked array as a kernel of its own
  # (6-15 ms each): per-leaf thresholds and cuts come out of the group's loop as
  # separate outputs (`map_scalars`), so the program holds no slice per leaf.
  few, many = counts
  assert _slice_count(few, scope) == _slice_count(many, scope)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_map_scalars_gives_each_member_its_own_result_in_order(scope):
  # Each leaf's threshold and tie cut is a scalar of its own, carried out of its
  # group's loop. Interleaved groups: 16 stacked members, a switched pair and a lone
  # 0-d member; leaf i's values lie in [i, i + 1) with ties, so a leaf given another's
  # threshold or cut would lose all or none of its weights.
  shapes = [(4,) if i in (1, 9) else () if i == 5 else (2, 3) for i in range(19)]
  rng = np.random.default_rng(0)
  params = {f"l{i:02d}": {"kernel": jnp.asarray(i + rng.integers(0, 3, s) / 4, jnp.float32)}
            for i, s in enumerate(shapes)}
  where = jax.tree.map(lambda _: True, params)
  prune = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.55, where, scope=scope))
  assert _leaf_stacks(prune.lower(params).as_text()) == ["16x2x3xf32"]
  got = prune(params)
  want = sort_reference_masks(params, 0.55, scope)
  for name in params:
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), want[name], err_msg=name)


def test_zero_dimensional_leaves_and_shard_map():
  params = {"a": jnp.float32(-0.5), "b": jnp.array([[3.0, 0.1], [0.2, 4.0]])}
  where = {"a": True, "b": True}
  for scope in ("layer", "global"):
    masks = jaxprune.ranked_masks(params, 0.6, where, scope=scope)
    assert masks["a"].shape == ()
  # 3 of 5 pruned globally: 0.1, 0.2 and |-0.5|.
  masks = jaxprune.ranked_masks(params, 0.6, where, scope="global")
  assert not bool(masks["a"]) and int(masks["b"].sum()) == 2
  # Inside shard_map (each shard selects on its own), the loops' carries are typed
  # like the data: one device is enough to check the types.
  mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  w = jax.random.normal(jax.random.key(0), (16, 8))
  for scope in ("layer", "global"):
    local = jax.shard_map(
        lambda w, s=scope: jaxprune.ranked_masks({"k": w, "j": w + 1}, 0.5,
                                                    {"k": True, "j": True}, scope=s)["k"],
        mesh=mesh, in_specs=jax.sharding.PartitionSpec("x"),
        out_specs=jax.sharding.PartitionSpec("x"))
    got = jax.jit(local)(w)
    want = jaxprune.ranked_masks({"k": w, "j": w + 1}, 0.5, {"k": True, "j": True},
                                    scope=scope)["k"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# Large enough to be read in chunks (more than 2 * 2**18 entries): rows, columns of an
# array of too few rows, single rows of a 3-d array, columns of a one-row array, a
# vector; each with its first row as a second leaf.
CHUNKED = {"rows": (1200, 500), "few rows": (2, 300_000), "3-d": (3, 500, 400),
           "one row": (1, 600_000), "vector": (600_001,)}


@functools.cache
def _chunked_ranking():
  return jax.jit(lambda p, m, s: jaxprune.ranked_masks(
      p, s, {"a": True, "b": True}, scope="global", previous=m))


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(list(CHUNKED.values())),
       levels=st.sampled_from([2, 5, 1000]), fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_chunked_counting_matches_the_sort_reference(shape, levels, fraction, seed):
  # On one device the CPU histogram and the tie-break read large arrays in chunks
  # (rows, or columns of an array of few rows).
  rng = np.random.default_rng(seed)
  w = (rng.integers(0, levels, size=shape) / 4).astype(np.float32)  # many ties
  kept = rng.random(shape) > 0.3
  n = w.size + w[:1].size
  k = exact_count(fraction, n)
  keys = np.concatenate([np.where(kept, np.abs(w).view(np.uint32).astype(np.int64) + 1, 0).ravel(),
                         np.abs(w[:1]).view(np.uint32).astype(np.int64).ravel() + 1])
  want = np.zeros(n, bool)
  want[np.argsort(keys, kind="stable")[:k]] = True
  want |= keys == 0  # pruned before: stays pruned
  # Leaf order: `w` ("a"), then its first row ("b", all kept before).
  params = {"a": jnp.asarray(w), "b": jnp.asarray(w[:1])}
  previous = {"a": jnp.asarray(kept), "b": jnp.ones(w[:1].shape, bool)}
  got = _chunked_ranking()(params, previous, jnp.float32(fraction))
  np.testing.assert_array_equal(
      ~np.concatenate([np.asarray(got["a"]).ravel(), np.asarray(got["b"]).ravel()]), want)


def test_a_large_leaf_is_ranked_in_bounded_scratch():
  # XLA's CPU backend materializes the scatter's operands and every reduction's
  # operand: counted whole, a 2048 x 2048 leaf held 6 bytes per weight (24 MB).
  w = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
  for scope in ("layer", "global"):
    compiled = jax.jit(lambda w, scope=scope: jaxprune.ranked_masks(
        {"w": w}, 3_000_000 / w.size, {"w": True}, scope=scope)).lower(w).compile()
    assert compiled.memory_analysis().temp_size_in_bytes / w.size < 1.0, scope

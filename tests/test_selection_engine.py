"""The selection engine: both threshold paths exact, and what accelerators would run.

`magnitude_rank` finds the k-th smallest key either by a radix histogram
(scatter-add, chosen on CPU where it is faster) or by bisection with comparison
counts (every other platform, and Explicit-axis meshes). Both must give the sort
reference's threshold, count below and tie count for every k; the TPU and CUDA
lowerings of every selection the library runs must contain no scatter and no sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune._src.engine import chunked_reads, radix_histogram
from jaxprune._src.engine import magnitude_rank as mr

SHAPES = [[(7,)], [(3, 5)], [(4, 4), (9,), (2, 3, 2)]]
JITTED = {
    "counts": jax.jit(lambda keys, k: mr._threshold_by_counts(
        mr.group_by_shape([(x,) for x in keys]), lambda x: x, k)),
    **{f"histogram {digits}": jax.jit(
        lambda keys, k, digits=digits: radix_histogram.threshold_by_histogram(
            mr.group_by_shape([(x,) for x in keys]), lambda x: x, k, digits))
       for digits in (radix_histogram.WIDE_DIGITS, radix_histogram.NARROW_DIGITS, (8, 8, 8, 8))},
}


def reference(keys: list[np.ndarray], k: int) -> tuple[int, int, int]:
  flat = np.sort(np.concatenate([x.ravel() for x in keys]).astype(np.int64))
  t = int(flat[k - 1]) if k else 0
  return t, int((flat < t).sum()), int((flat == t).sum())


@settings(max_examples=60, deadline=None)
@given(shapes=st.sampled_from(SHAPES), high=st.sampled_from([2, 50, 2**32]),
       seed=st.integers(0, 2**31 - 1), fraction=st.floats(0, 1))
def test_both_threshold_engines_match_the_sort_reference(shapes, high, seed, fraction):
  rng = np.random.default_rng(seed)
  keys = [rng.integers(0, high, size=s, dtype=np.uint64).astype(np.uint32) for s in shapes]
  n = sum(x.size for x in keys)
  k = int(round(fraction * n))
  want = reference(keys, k)
  for name, engine in JITTED.items():
    got = tuple(int(v) for v in engine([jnp.asarray(x) for x in keys], k))
    assert got == want, (name, k)


def test_extreme_keys_and_every_k():
  keys = [np.array([0, 2**32 - 1, 2**32 - 1, 1, 2**31, 0], np.uint32)]
  for k in range(len(keys[0]) + 1):
    for name, engine in JITTED.items():
      got = tuple(int(v) for v in engine([jnp.asarray(keys[0])], k))
      assert got == reference(keys, k), (name, k)


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


@pytest.mark.parametrize("stack_limit", [2**30, 0], ids=["stacked", "switch"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_leaves_of_equal_shape_share_a_loop_and_stay_exact(scope, stack_limit, monkeypatch):
  # Rounded weights: many ties, within and across grouped leaves, in an order that
  # interleaves the groups (ties are broken by leaf order, not group order). A group
  # over the stack limit picks its members by `lax.switch` instead of from a stack.
  from jaxprune._src.engine import leaf_groups

  monkeypatch.setattr(leaf_groups, "STACK_MIN_MEMBERS", 2)
  monkeypatch.setattr(leaf_groups, "STACK_LIMIT_BYTES", stack_limit)
  jax.clear_caches()  # the library's jitted selections would reuse the other trace
  params = {f"l{i:02d}": {"kernel": jnp.round(2 * jax.random.normal(jax.random.key(i), s))}
            for i, s in enumerate(SHAPE_CYCLE * 3)}
  where = jaxprune.select(params)
  got = jax.jit(lambda p: jaxprune.ranked_masks(p, 0.55, where, scope=scope))(params)
  want = sort_reference_masks(params, 0.55, scope)
  for name in params:
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), want[name], err_msg=name)


def test_a_group_is_stacked_within_its_limits_only(monkeypatch):
  from jaxprune._src.engine import leaf_groups

  monkeypatch.setattr(leaf_groups, "STACK_MIN_MEMBERS", 2)
  sources = [(jnp.ones((4, 4)), None), (jnp.zeros((4, 4)), None), (jnp.ones(3), None)]
  pair, lone = leaf_groups.group_by_shape(sources)
  assert pair.positions == (0, 1) and pair.stacked[0].shape == (2, 4, 4)
  assert pair.stacked[1] is None and lone.stacked is None
  monkeypatch.setattr(leaf_groups, "STACK_LIMIT_BYTES", 2 * 16 * 4 - 1)
  assert leaf_groups.group_by_shape(sources)[0].stacked is None
  monkeypatch.setattr(leaf_groups, "STACK_LIMIT_BYTES", 2**30)
  monkeypatch.setattr(leaf_groups, "STACK_MIN_MEMBERS", 3)  # a pair switches
  assert leaf_groups.group_by_shape(sources)[0].stacked is None


def test_the_counting_passes_stack_a_group_once_not_per_pass():
  # The passes read the group through an optimization barrier; a stack built
  # behind it would be copied again in each of the 32 passes.
  ws = [jax.ShapeDtypeStruct((64, 64), jnp.float32) for _ in range(32)]
  hlo = jax.jit(lambda ws: mr._threshold_by_counts(
      mr.group_by_shape([(w, None) for w in ws]), mr.magnitude_keys, jnp.int32(1000))).lower(
          ws).compile().as_text()
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


def test_map_scalars_gives_each_member_its_own_result_in_order(monkeypatch):
  from jaxprune._src.engine import leaf_groups

  monkeypatch.setattr(leaf_groups, "STACK_MIN_MEMBERS", 3)
  # Interleaved groups: four stacked members, a switched pair and a lone member.
  arrays = [jnp.full((2, 3), i, jnp.float32) if i % 3 == 0 else
            jnp.full((4,), i, jnp.float32) for i in range(7)]
  arrays[5] = jnp.float32(5.0)
  arrays[4] = jnp.full((2, 3), 4.0)
  groups = leaf_groups.group_by_shape([(a,) for a in arrays])
  assert sorted(len(g.sources) for g in groups) == [1, 2, 4]

  def fn(source, position):
    return {"sum": jnp.sum(source[0]), "position": jnp.asarray(position, jnp.int32)}

  got = jax.jit(lambda arrays: leaf_groups.map_scalars(
      leaf_groups.group_by_shape([(a,) for a in arrays]), fn))(arrays)
  assert [int(r["position"]) for r in got] == list(range(7))
  np.testing.assert_allclose([float(r["sum"]) for r in got], [float(jnp.sum(a)) for a in arrays])


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


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(9, 7), (2, 40), (3, 5, 4), (1, 50), (31,)]),
       levels=st.sampled_from([2, 5, 1000]), fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_chunked_counting_matches_the_sort_reference(shape, levels, fraction, seed):
  # On one device the CPU histogram and the tie-break read large arrays in chunks
  # (rows, or columns of a one-row array); 16-entry chunks make these arrays large.
  rng = np.random.default_rng(seed)
  w = (rng.integers(0, levels, size=shape) / 4).astype(np.float32)  # many ties
  kept = rng.random(shape) > 0.3
  ws, kepts = [w, w[:1]], [kept, None]
  n = w.size + w[:1].size
  k = int(round(fraction * n))
  keys = np.concatenate([np.where(kept, np.abs(w).view(np.uint32).astype(np.int64) + 1, 0).ravel(),
                         np.abs(w[:1]).view(np.uint32).astype(np.int64).ravel() + 1])
  want = np.zeros(n, bool)
  want[np.argsort(keys, kind="stable")[:k]] = True
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(chunked_reads, "CHUNK_ENTRIES", 8)
    assert chunked_reads.chunking((w, kept)) is not None or w.size <= 16
    got = jax.jit(lambda ws, ks: mr._select_smallest(list(zip(ws, ks)), mr.magnitude_keys, k))(
        ws, kepts)
  np.testing.assert_array_equal(np.concatenate([np.asarray(g).ravel() for g in got]), want)


def test_a_large_leaf_is_ranked_in_bounded_scratch():
  # XLA's CPU backend materializes the scatter's operands and every reduction's
  # operand: counted whole, a 2048 x 2048 leaf held 6 bytes per weight (24 MB).
  w = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
  compiled = jax.jit(lambda w: mr.smallest_magnitudes([w], [None], 3_000_000)).lower(w).compile()
  assert compiled.memory_analysis().temp_size_in_bytes / w.size < 1.0

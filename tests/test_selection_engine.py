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
from jaxprune import magnitude_rank as mr

SHAPES = [[(7,)], [(3, 5)], [(4, 4), (9,), (2, 3, 2)]]
ENGINES = {"counts": mr._threshold_by_counts, "histogram": mr._threshold_by_histogram}
JITTED = {name: jax.jit(lambda keys, k, f=f: f(lambda: list(keys), k))
          for name, f in ENGINES.items()}


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
GRADUAL = jaxprune.pruned(optax.adam(1e-3), where=WHERE, update_every=2,
                          schedule=jaxprune.polynomial_schedule(0.0, 0.8, 0, 10))
CASES = {
    "magnitude layer": (lambda p: jaxprune.magnitude_masks(p, 0.7, WHERE), (PARAMS,)),
    "magnitude global": (lambda p: jaxprune.magnitude_masks(p, 0.7, WHERE, scope="global"),
                         (PARAMS,)),
    "magnitude previous": (lambda p, m: jaxprune.magnitude_masks(p, 0.9, WHERE, previous=m),
                           (PARAMS, jaxprune.magnitude_masks(PARAMS, 0.5, WHERE))),
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

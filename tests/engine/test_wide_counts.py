"""Global rankings beyond 2**31 weights count in int64 (with 64-bit types enabled).

The 64-bit runs happen in a subprocess: `jax_enable_x64` is a start-up setting and
must not leak into the other tests.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jaxprune

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIG = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((32768, 16384), jnp.float32)} for i in range(5)}


def test_without_64_bit_types_a_ranking_beyond_int32_is_refused_by_name():
  where = jax.tree.map(lambda _: True, BIG)
  with pytest.raises(ValueError, match=r"ranking 2,684,354,560 weights together needs 64-bit"):
    jax.jit(lambda p: jaxprune.ranked_masks(p, 0.8, where, scope="global")).lower(BIG)
  # Per leaf (536M weights each) int32 suffices.
  jax.jit(lambda p: jaxprune.ranked_masks(p, 0.8, where)).lower(BIG)


SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    from fractions import Fraction
    import jax.numpy as jnp, numpy as np
    import jaxprune

    # The exact count of a traced fraction, beyond int32: round half up, as Python.
    rng = np.random.default_rng(0)
    fractions = list(rng.random(40).astype(np.float32)) + [0.5, 2.0**-30, 0.0, 0.999999]
    for n in [2**31, 2**31 + 7, 3 * 10**10, 2**40 - 1]:
      for f in map(np.float32, fractions):
        exact = Fraction(float(f)) * n
        want = int(exact) + (exact - int(exact) >= Fraction(1, 2))
        got = jaxprune.distributions.uniform().prune_counts(["w"], [(n,)], jnp.float32(f))[0]
        assert got.dtype == jnp.int64 and int(got) == want, (n, f, int(got), want)

    # The wide path forced on a small tie-heavy tree gives the int32 path's masks.
    # (Forced by the engine's private threshold: by default it takes 2**31 weights,
    # 8 GiB of float32 values, to reach it.)
    from jaxprune._src.engine import magnitude_rank as mr
    params = {f"l{i}": {"kernel": jnp.round(2 * jax.random.normal(jax.random.key(i), (6, 4)))}
              for i in range(5)}
    where = jaxprune.select(params)
    for scope in ("layer", "global"):
      narrow = jaxprune.ranked_masks(params, 0.55, where, scope=scope)
      mr._WIDE_FROM = 10
      wide = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where, scope=scope))(
          params, jnp.float32(0.55))
      mr._WIDE_FROM = 2**31
      for a, b in zip(jax.tree.leaves(narrow), jax.tree.leaves(wide), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), scope

    # 2.7 billion weights ranked together: lowered for TPU and compiled for the CPU,
    # with no memory allocated (abstract params).
    big = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((32768, 16384), jnp.float32)}
           for i in range(5)}
    where = jax.tree.map(lambda _: True, big)
    prune = jax.jit(lambda p, s: jaxprune.ranked_masks(p, s, where, scope="global"))
    sparsity = jax.ShapeDtypeStruct((), jnp.float32)
    module = jax.export.export(prune, platforms=["tpu"])(big, sparsity).mlir_module()
    assert "i64" in module and "stablehlo.scatter" not in module
    prune.lower(big, sparsity).compile()
    print("wide ok")
""")


def test_beyond_int32_with_64_bit_types():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and "wide ok" in proc.stdout, proc.stderr[-3000:]

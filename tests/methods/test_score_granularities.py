"""Every score on every structured granularity, against a NumPy stable-argsort reference
computed from the score's own values (ties by position, as jaxprune's rule)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_references import exact_count

import jaxprune

SHAPE = (8, 6)


def _score(kind: str, rng: np.random.Generator, w: np.ndarray):
  """The score object, and the values the selection ranks (signed for `given`)."""
  if kind == "saliency":
    g = (rng.integers(-3, 4, size=w.shape) / 4).astype(np.float32)
    return jaxprune.scores.saliency_score({"w": jnp.asarray(g)}), np.abs(w * g)
  if kind == "random":
    score = jaxprune.scores.random_score(int(rng.integers(0, 2**31)))
    (values,) = score.scores({"w": jnp.asarray(w)}, [0])
    return score, np.asarray(values)
  if kind == "given":
    s = (rng.integers(-6, 7, size=w.shape) / 4).astype(np.float32)
    return jaxprune.scores.given_score({"w": jnp.asarray(s)}), s
  score = jaxprune.scores.normalized_score()
  (values,) = score.scores({"w": jnp.asarray(w)}, [0])
  return score, np.asarray(values)


def _lowest(values: np.ndarray, k: int) -> np.ndarray:
  keep = np.ones(values.size, bool)
  keep[np.argsort(values.ravel(), kind="stable")[:k]] = False
  return keep.reshape(values.shape)


def _count(fraction: float, n: int) -> int:
  """`round(fraction * n)` as the library counts a traced float32 fraction (halves up)."""
  return exact_count(fraction, n)


def _reference(values: np.ndarray, granularity: str, fraction: float) -> np.ndarray:
  if granularity == "row":  # each column of an (in, out) kernel: rows along axis -2
    k = _count(fraction, values.shape[0])
    return np.stack([_lowest(values[:, j], k) for j in range(values.shape[1])], axis=1)
  if granularity == "blocks":
    tiles = values.reshape(4, 2, 3, 2).mean(axis=(1, 3))
    kept = _lowest(tiles, _count(fraction, tiles.size))
    return np.repeat(np.repeat(kept, 2, axis=0), 2, axis=1)
  norms = np.sqrt((values.astype(np.float32) ** 2).sum(axis=0))  # channels(-1), l2
  return np.broadcast_to(_lowest(norms, _count(fraction, norms.size))[None], values.shape)


SCOPES = {"row": "row", "blocks": jaxprune.blocks((2, 2)), "channels": jaxprune.channels(-1)}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["saliency", "random", "given", "normalized"]),
       granularity=st.sampled_from(list(SCOPES)), fraction=st.floats(0, 0.99),
       seed=st.integers(0, 2**31 - 1))
def test_every_score_on_every_granularity_matches_the_sort_reference(kind, granularity,
                                                                     fraction, seed):
  if kind == "normalized" and granularity != "row":
    return  # pooled float32 norms could round apart from NumPy's; ranks tested in rows
  rng = np.random.default_rng(seed)
  w = (rng.integers(-4, 5, size=SHAPE) / 4).astype(np.float32)  # ties
  score, values = _score(kind, rng, w)
  got = jax.jit(lambda p, f: jaxprune.ranked_masks(p, f, {"w": True}, score=score,
                                                   scope=SCOPES[granularity]))(
      {"w": jnp.asarray(w)}, fraction)
  np.testing.assert_array_equal(np.asarray(got["w"]), _reference(values, granularity, fraction))

"""NumPy references of the one-shot methods, written from the papers, shared by the
tests that check jaxprune's results against them."""

from fractions import Fraction
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxprune.tree import path_string


class Slots(NamedTuple):
  """A tree flattened with `None` counted as a leaf."""

  paths: list[str]
  leaves: list[Any]
  treedef: Any


def slots(tree) -> Slots:
  """The path strings (`jaxprune.tree.path_string`), leaves (`None` included) and
  treedef of `tree`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return Slots([path_string(p) for p, _ in flat], [x for _, x in flat], treedef)


def exact_count(fraction, n: int) -> int:
  """`round(fraction * n)` as the library counts a traced sparsity: exactly, for the
  float32 value of `fraction` clipped to [0, 1], exact halves rounded up."""
  f = Fraction(float(np.clip(np.float32(fraction), np.float32(0), np.float32(1))))
  return int(f * n + Fraction(1, 2))  # floor: the value is not negative


def sparsegpt_reference(w, gram, sparsity, nm=None, damp=0.01):
  """SparseGPT of `w` `(rows, cols)` (rows the output neurons) from the `(cols, cols)`
  Gram matrix of its inputs, in float64, no lazy blocks (they change no result).

  `H = 2G + λI` (λ = damp · mean diag; an input that never fires: `H_jj = 1`, its
  column zeroed); `U` the upper Cholesky factor of `H⁻¹`. Columns are visited left
  to right: column j's pruned weights leave the error `e = (w_j - q_j) / U_jj`,
  which the columns right of it absorb, `w_{j:} -= e U_{j, j:}` (the OBS update
  with the inverse Hessian of the inputs not yet visited). The mask: the
  `round(s · n)` smallest `w² / U_jj²` of the whole matrix (ties by position), or
  for N:M, when the sweep reaches a group of m columns, the n largest of each row.
  Returns `(weights, kept)`."""
  w = np.array(w, np.float64)
  rows, cols = w.shape
  h = 2.0 * np.array(gram, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(cols)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  d = np.diag(u)
  kept = np.ones((rows, cols), bool)
  if nm is None:
    order = np.argsort((w ** 2 / d ** 2).ravel(), kind="stable")
    kept.ravel()[order[:round(sparsity * w.size)]] = False
  for j in range(cols):
    if nm is not None and j % nm[1] == 0:
      group = w[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]] ** 2
      best = np.argsort(-group, axis=1, kind="stable")[:, :nm[0]]
      kept[:, j:j + nm[1]] = False
      np.put_along_axis(kept[:, j:j + nm[1]], best, True, axis=1)
    q = np.where(kept[:, j], w[:, j], 0.0)
    e = (w[:, j] - q) / u[j, j]
    w[:, j:] -= np.outer(e, u[j, j:])
    w[:, j] = q   # exactly: w_j - e · U_jj is q_j up to rounding
  return w, kept


def reference_row_masks(w: np.ndarray, score: np.ndarray, inputs: tuple[int, ...],
                        sparsity: float) -> np.ndarray:
  """Per output neuron (index over the other axes), its `round(s * fan_in)` lowest
  scores pruned, ties by the row-major position over `inputs`."""
  rest = [d for d in range(w.ndim) if d not in inputs]
  moved = np.transpose(score, (*rest, *inputs))
  rows = moved.reshape(-1, int(np.prod([w.shape[d] for d in inputs])))
  k = int(round(sparsity * rows.shape[1]))
  kept = np.ones_like(rows, bool)
  for r in range(rows.shape[0]):
    kept[r, np.argsort(rows[r], kind="stable")[:k]] = False
  back = kept.reshape(moved.shape)
  return np.transpose(back, np.argsort([*rest, *inputs]))


def zeroed_units(params, groups, keep):
  """`params` with every removed unit's member indices set to 0 (per layer too)."""
  theirs = slots(params)
  leaves = [np.array(x) for x in theirs.leaves]
  where = {p: i for i, p in enumerate(theirs.paths)}
  for key, units in keep.items():
    group, units = groups[key], np.asarray(units)
    rows = units if units.ndim == 2 else np.broadcast_to(units, (group.layers or 1, units.size))
    for layer, row in enumerate(rows):
      alive = np.isin(np.arange(group.size), row)
      for m in group.members:
        index = [slice(None)] * leaves[where[m.path]].ndim
        index[m.axis] = m.indices(group.size)[~alive].ravel()
        if group.layers:
          index[0] = layer
        leaves[where[m.path]][tuple(index)] = 0
  return jax.tree.unflatten(theirs.treedef, leaves)

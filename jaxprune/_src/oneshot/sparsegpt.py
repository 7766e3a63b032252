"""SparseGPT: one-shot pruning with weight reconstruction (Frantar & Alistarh, 2023).

For a kernel seen as `W` `(rows, cols)` — rows the output neurons, cols its input
features — and the Gram matrix `G = XᵀX` of its inputs (`input_statistics(...,
gram=True)`), SparseGPT solves the layer-wise problem
`min ||W X - Ŵ X||` over `Ŵ` with the chosen sparsity, column by column:

    H = 2 G + λ I               (λ = damp · mean(diag(2 G)); dead inputs: H_ii = 1, W_:i = 0)
    U = chol(H⁻¹)ᵀ              (upper Cholesky factor of the inverse)
    for each block of `block` columns, left to right:
      mask: score w² / U_jj² (exactly round(s · n) pruned over the whole kernel,
            spread over the blocks; or n of every m consecutive columns, i.e.
            along the flattened inputs, consecutive in the last input axis)
      for each column j of the block:
        q = w_j masked;  e = (w_j - q) / U_jj
        W[:, j:] -= e ⊗ U[j, j:]         (the remaining columns absorb the error)
      W[:, later blocks] -= E · U[block, later]    (lazy batched update)

Any kernel layout is seen so: for stack axes `S` (scanned layers, experts),
input-feature axes `F` (its statistics' contracted axes, in their recorded order)
and the other, output axes `O`, the kernel is transposed to `S + O + F` and
reshaped to `prod S` matrices `(prod O, prod F)` — `F` flattened in the order of
the Gram matrix's index (row-major over `F` as listed), so column `c` of the
matrix is row/column `c` of `G`. Each slice is solved alone and the weights and
masks are reshaped and transposed back. An attention output kernel
`(heads, head_dim, d)` contracting `(heads, head_dim)` is `W` `(d, heads·head_dim)`;
a q/k/v kernel `(d, heads, head_dim)` is `(heads·head_dim, d)`.

The returned weights are pruned *and updated*: kept weights move to compensate.
Counts are exact: block b prunes `round(s · rows · c_b) - round(s · rows · c_{b-1})`
(`c_b` the columns up to its end), so the kernel loses exactly `round(s · n)`.
Ties in the block scores go by position, as everywhere in jaxprune.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
  >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
  ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
  >>> batch = {"x": jax.random.normal(kx, (16, 8))}
  >>> where = jaxprune.select(params)
  >>> stats = jaxprune.oneshot.input_statistics(
  ...     lambda p, b: jnp.tanh(b["x"] @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"],
  ...     params, [batch], where, gram=True)
  >>> new_params, masks = jaxprune.oneshot.sparsegpt(params, stats, 0.5, where)
  >>> int((~masks["fc1"]["kernel"]).sum())      # exactly half of 64
  32
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._src.engine.magnitude_rank import smallest_magnitudes
from jaxprune._src.methods.masks import check_count, check_fraction
from jaxprune._src.methods.structured import check_nm
from jaxprune._src.oneshot.input_statistics import (
  InputStatistics,
  LeafStatistics,
  check_leaf_statistics,
  input_statistics,
)
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  canonical_path,
  masks_from,
  resolve_where,
  selected_leaves,
  slots,
  unflatten,
  where_tree,
)
from jaxprune._src.types import PyTree


def _inverse_factor(gram: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """`(U, dead)`: the upper Cholesky factor of the dampened `H⁻¹`, and the inputs
  that never fire (their columns are zeroed)."""
  h = 2.0 * gram.astype(jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  h = h + jnp.eye(h.shape[0], dtype=h.dtype) * (damp * jnp.mean(jnp.diagonal(h)))
  lower = jnp.linalg.cholesky(h)
  inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
  return jnp.linalg.cholesky(inverse).T, dead


def _sweep(w1: jax.Array, u1: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One block, column by column: (the pruned block, the scaled errors)."""
  cols = w1.shape[1]

  def column(j, carry):
    w, q, err = carry
    col = lax.dynamic_index_in_dim(w, j, 1, keepdims=False)
    d = u1[j, j]
    pruned = jnp.where(lax.dynamic_index_in_dim(kept, j, 1, keepdims=False), col, 0.0)
    e = (col - pruned) / d
    w = w - e[:, None] * u1[j][None, :]
    return (w, lax.dynamic_update_index_in_dim(q, pruned, j, 1),
            lax.dynamic_update_index_in_dim(err, e, j, 1))

  zeros = jnp.zeros_like(w1)
  _, q, err = lax.fori_loop(0, cols, column, (w1, zeros, zeros))
  return q, err


def _nm_sweep(w1: jax.Array, u1: jax.Array, n: int, m: int) -> tuple:
  """One block in groups of `m` columns: each group's mask keeps the `n` best
  `w² / U_jj²` of every row, chosen when the sweep reaches the group."""
  d2 = jnp.diagonal(u1) ** 2

  def group(g, carry):
    w, q, err, kept = carry
    start = g * m
    scores = lax.dynamic_slice_in_dim(w, start, m, 1) ** 2 / lax.dynamic_slice_in_dim(
        d2, start, m, 0)[None, :]
    rank = jnp.argsort(jnp.argsort(-scores, axis=1, stable=True), axis=1, stable=True)
    kept = lax.dynamic_update_slice_in_dim(kept, rank < n, start, 1)
    for k in range(m):  # m is small (4): unrolled
      j = start + k
      col = lax.dynamic_index_in_dim(w, j, 1, keepdims=False)
      pruned = jnp.where(lax.dynamic_index_in_dim(kept, j, 1, keepdims=False), col, 0.0)
      e = (col - pruned) / u1[j, j]
      w = w - e[:, None] * u1[j][None, :]
      q = lax.dynamic_update_index_in_dim(q, pruned, j, 1)
      err = lax.dynamic_update_index_in_dim(err, e, j, 1)
    return w, q, err, kept

  zeros = jnp.zeros_like(w1)
  _, q, err, kept = lax.fori_loop(0, w1.shape[1] // m, group,
                                  (w1, zeros, zeros, jnp.zeros(w1.shape, bool)))
  return q, err, kept


def sparsegpt_matrix(w: jax.Array, gram: jax.Array, sparsity: float, *, block: int = 128,
                     damp: float = 0.01, nm: tuple[int, int] | None = None) -> tuple:
  """SparseGPT on one `(rows, cols)` matrix with the `(cols, cols)` Gram matrix of its
  inputs: `(pruned and updated w, kept mask)` (see the module docstring). With
  `nm=(n, m)`, `sparsity` is ignored and every `m` consecutive inputs of a row
  keep `n`."""
  rows, cols = w.shape
  u, dead = _inverse_factor(gram, damp)
  w = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32))
  kept_all = []
  for start in range(0, cols, block):
    stop = min(start + block, cols)
    w1, u1 = w[:, start:stop], u[start:stop, start:stop]
    if nm is None:
      count = round(sparsity * rows * stop) - round(sparsity * rows * start)
      scores = w1 ** 2 / (jnp.diagonal(u1) ** 2)[None, :]
      kept = ~smallest_magnitudes([scores], [None], count, by="value")[0]
      q, err = _sweep(w1, u1, kept)
    else:
      q, err, kept = _nm_sweep(w1, u1, *nm)
    kept_all.append(kept)
    # Slice updates, not `.at[...]` (which lowers to a scatter on TPU and GPU).
    w = lax.dynamic_update_slice(w, q, (0, start))
    if stop < cols:
      w = lax.dynamic_update_slice(w, w[:, stop:] - err @ u[start:stop, stop:], (0, stop))
  return w, jnp.concatenate(kept_all, axis=1)


def sparsegpt(params: PyTree, stats: InputStatistics, sparsity: float, where: Where, *,
              block: int = 128, damp: float = 0.01,
              nm: tuple[int, int] | None = None) -> tuple[PyTree, PyTree]:
  """SparseGPT on every selected kernel, each from its own inputs' Gram matrix
  (non-sequential: `stats` from the dense model). Returns `(params, masks)`: the
  kernels pruned and updated, the masks (`True` = kept) for `pruned` or
  `prune_retrain`.

  A kernel's input axes are its statistics' feature axes, any number of them
  (0 for Flax `(in, out)`, 1 for Equinox `(out, in)`, `(0, 1)` for an attention
  output `(heads, head_dim, d)`, `(kh, kw, in)` of a conv kernel, whose Gram
  matrix is over its unfolded patches), flattened in the Gram matrix's order; its other
  axes, wherever they are, are flattened into the rows (see the module
  docstring); stacked axes (scanned layers, experts) are pruned slice by slice.
  `block` columns per lazy update (128 in the paper), `damp` the dampening
  fraction of the mean diagonal (1%). For `nm=(n, m)` the groups of `m` run
  along the flattened inputs (consecutive in the last input axis); the input
  count (the product over the input axes) must be a multiple of `m` and `block`
  a multiple of `m`.

  Raises:
    ValueError: `block` not an integer >= 1 or `damp` not a finite real >= 0
      (naming the argument and the value); a selected leaf without a Gram matrix
      in `stats` (naming it, and where `input_statistics` could not attribute it,
      its reason: the primitive and source line); statistics that do not fit the leaf (its shape,
      stack length or a size-1 statistic), saw 0 rows, or whose inputs are all
      zero (naming the leaf or layer `path[i]`, see `check_leaf_statistics`); a
      concrete sparsity outside [0, 1); an N:M pattern that does not fit (an
      input count, over all input axes, not a multiple of `m`); a Hessian not
      positive definite even dampened (naming the leaf).
  """
  sparsity = float(check_fraction("sparsity", sparsity))
  block, damp, nm = _check_settings(block, damp, nm)
  by_path = {canonical_path(p): s for p, s in stats.leaves.items()}
  chosen = selected_leaves(params, where)
  why = {canonical_path(p): r for p, r in stats.unattributed.items()}
  plans = [_plan(path, w, by_path, nm, why) for _, path, w, _ in chosen]
  solve = jax.jit(lambda w, g: sparsegpt_matrix(w, g, sparsity, block=block, damp=damp, nm=nm))
  new_leaves, masks = list(slots(params).leaves), {}
  for (slot, path, w, _), stat in zip(chosen, plans):
    new_w, kept = _per_slice(solve, w, stat)
    if not isinstance(new_w, jax.core.Tracer) and not bool(jnp.isfinite(new_w).all()):
      # A Cholesky of a matrix that is not positive definite gives NaN, not an error.
      raise ValueError(f"sparsegpt: the dampened Hessian of {path}'s inputs is not positive "
                       f"definite (damp={damp}); raise damp, or check its statistics")
    new_leaves[slot] = new_w.astype(w.dtype)
    masks[slot] = kept
  return unflatten(params, new_leaves), masks_from(params, masks)


def _check_settings(block: Any, damp: Any, nm: Any) -> tuple:
  """`(block, damp, nm)` checked, before any statistic is read or computed."""
  block = check_count("sparsegpt block (columns per lazy update)", block)
  if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (
      math.isfinite(damp) and damp >= 0):
    raise ValueError(f"sparsegpt damp (the dampening fraction of the mean Hessian diagonal) "
                     f"must be a finite real number >= 0, e.g. 0.01, got {damp!r}")
  if nm is not None:
    nm = check_nm(*nm)
    if block % nm[1]:
      raise ValueError(f"block ({block}) must be a multiple of m ({nm[1]})")
  return block, float(damp), nm


def _plan(path: str, w: Any, by_path: dict, nm: Any, why: dict) -> LeafStatistics:
  """`path`'s statistics, checked against the leaf `w` (and its input count
  against N:M's `m`) before anything is solved; `why`: the reason of each path
  the statistics could not attribute."""
  stat = by_path.get(canonical_path(path))
  if stat is None and canonical_path(path) in why:
    raise ValueError(f"sparsegpt cannot prune {path}: input_statistics recorded no inputs of "
                     f"it: {why[canonical_path(path)]}")
  if stat is None or stat.gram is None:
    raise ValueError(f"sparsegpt needs the Gram matrix of {path}'s inputs: run "
                     f"input_statistics(..., gram=True) with it selected"
                     f"{'' if stat is None else ' (these statistics have no gram)'}")
  shape = tuple(jnp.shape(w))
  check_leaf_statistics(path, stat, shape)
  inputs = math.prod(shape[a] for a in stat.feature_axes)
  if nm is not None and inputs % nm[1]:
    axes = stat.feature_axes
    span = (f"axis {axes[0]}" if len(axes) == 1 else
            f"axes {axes}: {'x'.join(str(shape[a]) for a in axes)} flattened")
    raise ValueError(f"sparsegpt {nm[0]}:{nm[1]}: {path} has {inputs} inputs "
                     f"({span}), not a multiple of {nm[1]}")
  return stat


def _to_matrices(w: jax.Array, stack: tuple[int, ...],
                 features: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
  """`(mats, order)`: `w` transposed by `order = S + O + F` (its stack axes, its
  other, output axes in their order, its input axes in the order given) and
  reshaped to `(prod S, prod O, prod F)`. Row-major, so input column `c` is index
  `c` of the Gram matrix, which `input_statistics` flattens over `F` in the same
  order (the kernel's contracted dims as its `dot_general` lists them)."""
  other = tuple(a for a in range(w.ndim) if a not in stack and a not in features)
  order = (*stack, *other, *features)
  sizes = [math.prod(w.shape[a] for a in axes) for axes in (stack, other, features)]
  return jnp.transpose(w, order).reshape(sizes), order


def _from_matrices(mats: jax.Array, order: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """The inverse of `_to_matrices`: `(prod S, prod O, prod F)` back to the kernel's
  `shape` (reshaped to the transposed shape, then the inverse permutation)."""
  moved = mats.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(moved, tuple(order.index(a) for a in range(len(shape))))


def _per_slice(solve, w: jax.Array, stat: Any) -> tuple[jax.Array, jax.Array]:
  """`solve` on each slice along the stack axes, with the kernel as `(rows, inputs)`
  (`_to_matrices`); the pruned weights and kept masks in the kernel's layout."""
  mats, order = _to_matrices(w, stat.stack_axes, stat.feature_axes)
  cols = mats.shape[-1]
  # One Gram matrix per slice: `check_leaf_statistics` refused any other count.
  grams = stat.gram.reshape(-1, cols, cols)
  outs = [solve(mats[i], grams[i]) for i in range(mats.shape[0])]
  new = jnp.stack([o[0] for o in outs])
  kept = jnp.stack([o[1] for o in outs])
  return _from_matrices(new, order, w.shape), _from_matrices(kept, order, w.shape)


def sparsegpt_sequential(stages: list, params: PyTree, batches: list, sparsity: float,
                         where: Where, *, block: int = 128, damp: float = 0.01,
                         nm: tuple[int, int] | None = None) -> tuple[PyTree, PyTree]:
  """SparseGPT as in the paper: stage by stage, each stage's kernels calibrated on
  the outputs of the stages before it *as already pruned*.

  `stages[k](params, x) -> x'` are the model cut into pieces (embedding, each
  block, the head); the first takes a calibration batch, each next the previous
  one's output. A selected kernel is pruned in the first stage whose products use
  it. Returns `(params, masks)` as `sparsegpt`.

  Raises:
    ValueError: as `sparsegpt` (`block` and `damp` checked before any stage
      runs); a selected leaf that no stage multiplies (naming it).
  """
  _check_settings(block, damp, nm)
  flags = resolve_where(where, params)
  paths = slots(params).paths
  remaining = {i for i, f in enumerate(flags) if f}
  xs, masks = list(batches), {}
  for stage in stages:
    if remaining:
      wanted = where_tree(params, [i in remaining for i in range(len(flags))])
      stats = input_statistics(stage, params, xs, wanted, gram=True)
      here = [i for i in sorted(remaining) if canonical_path(paths[i]) in
              {canonical_path(p) for p in stats.leaves}]
      if here:
        params, found = sparsegpt(params, stats, sparsity,
                                  where_tree(params, [i in here for i in range(len(flags))]),
                                  block=block, damp=damp, nm=nm)
        masks.update({i: slots(found).leaves[i] for i in here})
        remaining -= set(here)
    run = jax.jit(stage)
    xs = [run(params, x) for x in xs]
  if remaining:
    raise ValueError(f"sparsegpt_sequential: no stage multiplies "
                     f"{', '.join(paths[i] for i in sorted(remaining))}")
  return params, masks_from(params, masks)

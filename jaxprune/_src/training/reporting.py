"""Per-layer sparsity and the compression it buys."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.engine.stacked_layers import check_stacked, check_used, stacked_axes
from jaxprune._src.tree.leaf_selection import Where, select
from jaxprune._src.tree.mask_tree import resolve_where, slots
from jaxprune._src.types import PyTree


class LeafSparsity(NamedTuple):
  """One row of a `SparsityReport`."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  size: int
  zeros: int
  targeted: bool

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0

  @property
  def dense_bytes(self) -> int:
    return self.size * jnp.dtype(self.dtype).itemsize

  @property
  def compressed_bytes(self) -> int:
    """Bitmask (1 bit per weight) plus the nonzero values, for targeted leaves.

    `ceil(size / 8) + (size - zeros) * itemsize` at the leaf's own dtype: the bytes
    `export_compressed`'s default (`values=None`) stores for it when its mask keeps
    exactly its nonzeros.
    """
    if not self.targeted:
      return self.dense_bytes
    return -(-self.size // 8) + (self.size - self.zeros) * jnp.dtype(self.dtype).itemsize


def _ratio(a: float, b: float) -> float:
  """`a / b`; nothing over nothing is 1.0 (no leaf targeted compresses nothing)."""
  if b:
    return a / b
  return float("inf") if a else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Sparsity per leaf and for the model, and the compression it buys.

  Byte ratios are `dense bytes / (bitmask bytes + nonzero values)` at the leaves'
  own dtypes (untargeted leaves count as dense); parameter-count ratios are
  `parameters / nonzero parameters`. The two are kept apart: at 50% sparsity
  float32 weights give a 2x parameter ratio but only ~1.88x in bytes, bfloat16
  ones ~1.78x.

  The compressed bytes are what `export_compressed(path, params, masks)` writes
  with its default `values=None` (kept values at each leaf's own dtype), header
  aside, when the report targets the masked leaves and no kept weight is exactly
  zero: `info.file_bytes - info.header_bytes == total_compressed_bytes`. Other
  `values` ("float32", "bfloat16", "int8") store other byte counts.
  """

  leaves: tuple[LeafSparsity, ...]

  def _sum(self, attr: str, targeted_only: bool) -> int:
    return sum(getattr(r, attr) for r in self.leaves if r.targeted or not targeted_only)

  @property
  def targeted_params(self) -> int:
    return self._sum("size", True)

  @property
  def total_params(self) -> int:
    return self._sum("size", False)

  @property
  def targeted_sparsity(self) -> float:
    return _ratio(self._sum("zeros", True), self.targeted_params) if self.targeted_params else 0.0

  @property
  def overall_sparsity(self) -> float:
    return _ratio(self._sum("zeros", False), self.total_params) if self.total_params else 0.0

  @property
  def targeted_compression(self) -> float:
    return _ratio(self._sum("dense_bytes", True), self._sum("compressed_bytes", True))

  @property
  def overall_compression(self) -> float:
    return _ratio(self._sum("dense_bytes", False), self._sum("compressed_bytes", False))

  @property
  def targeted_param_ratio(self) -> float:
    return _ratio(self.targeted_params, self.targeted_params - self._sum("zeros", True))

  @property
  def overall_param_ratio(self) -> float:
    return _ratio(self.total_params, self.total_params - self._sum("zeros", False))

  def to_dict(self) -> dict[str, Any]:
    """Plain Python data (JSON-serialisable)."""
    return {
        "leaves": [
            {
                "path": r.path,
                "shape": list(r.shape),
                "dtype": r.dtype,
                "size": r.size,
                "zeros": r.zeros,
                "sparsity": r.sparsity,
                "targeted": r.targeted,
            }
            for r in self.leaves
        ],
        "targeted_params": self.targeted_params,
        "total_params": self.total_params,
        "targeted_sparsity": self.targeted_sparsity,
        "overall_sparsity": self.overall_sparsity,
        "targeted_dense_bytes": self._sum("dense_bytes", True),
        "targeted_compressed_bytes": self._sum("compressed_bytes", True),
        "total_dense_bytes": self._sum("dense_bytes", False),
        "total_compressed_bytes": self._sum("compressed_bytes", False),
        "targeted_compression": self.targeted_compression,
        "overall_compression": self.overall_compression,
        "targeted_param_ratio": self.targeted_param_ratio,
        "overall_param_ratio": self.overall_param_ratio,
    }

  def __str__(self) -> str:
    width = max([len(r.path) for r in self.leaves] + [4])
    lines = [f"{'leaf':<{width}}  {'shape':>14}  {'size':>10}  {'zeros':>10}  sparsity"]
    for r in self.leaves:
      mark = "" if r.targeted else "  (not targeted)"
      shape = "x".join(map(str, r.shape)) or "()"
      lines.append(
          f"{r.path:<{width}}  {shape:>14}  {r.size:>10,}  {r.zeros:>10,}  {r.sparsity:8.2%}{mark}"
      )
    if self.targeted_params:
      targeted = (
          f"targeted leaves: sparsity {self.targeted_sparsity:.2%} of {self.targeted_params:,} "
          f"params; compression {self.targeted_compression:.2f}x bytes "
          f"(bitmask + nonzeros), {self.targeted_param_ratio:.2f}x parameters")
    else:
      targeted = ("targeted leaves: none (no leaf was selected; pass `where=` from "
                  "jaxprune.select(params, include=...))")
    lines += [
        "",
        targeted,
        f"whole model:     sparsity {self.overall_sparsity:.2%} of {self.total_params:,} "
        f"params; compression {self.overall_compression:.2f}x bytes, "
        f"{self.overall_param_ratio:.2f}x parameters",
    ]
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=1)
def _zero_counts(leaves: list[jax.Array], slices: tuple[int, ...]) -> list[jax.Array]:
  """Zeros of each leaf, or of each of its `slices[i]` slices (a vector) if > 0."""
  return [jnp.sum(x == 0, dtype=jnp.int32) if not n
          else jnp.sum(x.reshape(n, -1) == 0, axis=1, dtype=jnp.int32)
          for x, n in zip(leaves, slices)]


def _rows(path: str, x: Any, flag: bool, zeros: Any, k: int) -> list[LeafSparsity]:
  shape = tuple(np.shape(x))
  # A Python scalar leaf has no dtype: count it as NumPy (and so `export_compressed`)
  # stores it, float64/int64, not as a float32 it may never become.
  dtype = str(np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype)
  if not k:
    return [LeafSparsity(path, shape, dtype, int(np.size(x)), int(zeros), flag)]
  n, size = math.prod(shape[:k]), math.prod(shape[k:])
  return [LeafSparsity(f"{path}[{i}]", shape[k:], dtype, size, int(z), flag)
          for i, z in enumerate(np.broadcast_to(np.asarray(zeros), (n,)))]


def sparsity_report(params: PyTree, where: Where | None = None, *,
                    stacked: Mapping[str, int] | None = None) -> SparsityReport:
  """Counts zeros per leaf and totals them.

  Args:
    params: the parameter pytree (arrays may be sharded; only scalars reach the host;
      `None` leaves are skipped).
    where: the targeted leaves (bool pytree from `select`, or a callable); None
      means `select(params)` with its defaults, or no leaf targeted when nothing
      matches them (the table then says so).
    stacked: `{path pattern: k}`: targeted leaves whose first `k` axes index
      stacked layers get one row per layer, `path[i]` (see `ranked_masks`'s `stacked`).

  Returns:
    A `SparsityReport`: per-leaf size, zeros and sparsity; sparsity of the targeted
    leaves and of the whole model; byte compression (bitmask + nonzero values)
    and parameter-count ratio for both. `str(report)` is a table, `report.to_dict()`
    plain data.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> print(jaxprune.sparsity_report(jaxprune.apply_masks(params, masks)))
    leaf                 shape        size       zeros  sparsity
    fc1/bias                 8           8           0     0.00%  (not targeted)
    fc1/kernel             8x8          64          32    50.00%
    fc2/kernel             8x4          32          16    50.00%
    <BLANKLINE>
    targeted leaves: sparsity 50.00% of 96 params; compression 1.88x bytes ...
    whole model:     sparsity 46.15% of 104 params; compression 1.76x bytes, 1.86x parameters
  """
  if where is None:
    try:
      where = select(params)
    except ValueError:  # No leaf of rank >= 2: none targeted, and the table says so.
      where = jax.tree.map(lambda _: False, params)
  flags = resolve_where(where, params, allow_empty=True)
  stacked = check_stacked(stacked)
  theirs = slots(params)
  rows_of = [(path, x, flag) for path, x, flag in zip(theirs.paths, theirs.leaves, flags)
             if x is not None]
  check_used(stacked, [path for path, _, flag in rows_of if flag])
  # Slices are reported for targeted leaves only: the others are not ranked by layer.
  axes = [stacked_axes(path, np.shape(x), stacked) if flag else 0 for path, x, flag in rows_of]
  counted = [i for i, (_, x, _) in enumerate(rows_of) if hasattr(x, "dtype") and np.size(x)]
  slices = tuple(math.prod(np.shape(rows_of[i][1])[:axes[i]]) if axes[i] else 0
                 for i in counted)
  zeros = dict(zip(counted, jax.device_get(_zero_counts([rows_of[i][1] for i in counted],
                                                        slices))))
  return SparsityReport(tuple(
      row for i, (path, x, flag) in enumerate(rows_of)
      for row in _rows(path, x, flag, zeros.get(i, 0), axes[i])))

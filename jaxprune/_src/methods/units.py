"""Structured granularities: prune whole blocks or whole channels, exactly in count.

A granularity value groups a leaf's weights into *units*, scores each unit from
its weights' scores, and expands a per-unit mask back to the leaf's shape. The
units of a leaf are ranked with the same exact selection as weights
(`magnitude_rank`), so a leaf loses exactly `round(s_i * units)` whole units.

* `blocks((b0, b1), pool="mean")`: tiles of `b0 x b1` on the last two axes (the
  leading axes index separate tiles, so a stacked `(L, in, out)` kernel is tiled
  per layer); the unit score is the mean (or max) of its weights' scores. The
  last two axes must be multiples of the block.
* `channels(axis=-1, norm="l2")`: whole slices along `axis` (output channels of
  a Flax kernel or conv for -1, neurons of an Equinox weight for -2), scored by
  the L2 (or L1) norm of their weights' scores.

A unit counts as already pruned when every weight of it is (`previous`); the
new mask keeps a weight when `previous` kept it and its unit is kept.

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> params = {"fc2": {"kernel": jnp.array([[2.0, 0.1, -0.3, 1.0]] * 8)}}  # column norms
  >>> where = jaxprune.select(params)
  >>> masks = jaxprune.ranked_masks(params, 0.5, where, scope=jaxprune.channels())
  >>> [int(c) for c in masks["fc2"]["kernel"].all(axis=0)]    # 2 of 4 output channels kept
  [1, 0, 0, 1]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.engine.explicit_sharding import merge_last_two, split_last_two


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiles of `shape` on the last two axes, scored by `pool` ("mean" or "max")."""

  shape: tuple[int, int]
  pool: str = "mean"

  def __str__(self) -> str:
    return f"blocks {self.shape[0]}x{self.shape[1]} {self.pool}"

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    b0, b1 = self.shape
    if len(shape) < 2 or shape[-2] % b0 or shape[-1] % b1:
      raise ValueError(f"blocks {self.shape}: {path} has shape {shape}, whose last two axes "
                       "are not multiples of the block")

  def _tiles(self, x: jax.Array) -> jax.Array:
    return split_last_two(x, *self.shape)

  def unit_scores(self, values: jax.Array) -> jax.Array:
    tiles = self._tiles(values.astype(jnp.float32))
    pool = jnp.mean if self.pool == "mean" else jnp.max
    return pool(tiles, axis=(-3, -1))

  def unit_kept(self, kept: jax.Array | None) -> jax.Array | None:
    return None if kept is None else jnp.any(self._tiles(kept), axis=(-3, -1))

  def expand(self, unit_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    b0, b1 = self.shape
    *lead, r, c = unit_mask.shape
    tiles = jnp.broadcast_to(unit_mask[..., :, None, :, None], (*lead, r, b0, c, b1))
    return merge_last_two(tiles).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Channels:
  """Whole slices along `axis`, scored by the `norm` ("l2" or "l1") of their scores."""

  axis: int = -1
  norm: str = "l2"

  def __str__(self) -> str:
    return f"channels axis {self.axis} {self.norm}"

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    if not -len(shape) <= self.axis < len(shape):
      raise ValueError(f"channels along axis {self.axis}: {path} has shape {shape}")

  def _others(self, ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != self.axis % ndim)

  def unit_scores(self, values: jax.Array) -> jax.Array:
    v = values.astype(jnp.float32)
    others = self._others(v.ndim)
    if self.norm == "l1":
      return jnp.sum(jnp.abs(v), axis=others)
    return jnp.sqrt(jnp.sum(v * v, axis=others))

  def unit_kept(self, kept: jax.Array | None) -> jax.Array | None:
    return None if kept is None else jnp.any(kept, axis=self._others(kept.ndim))

  def expand(self, unit_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.broadcast_to(jnp.expand_dims(unit_mask, self._others(len(shape))), shape)


Granularity = Blocks | Channels


def blocks(shape: tuple[int, int], pool: str = "mean") -> Blocks:
  """Whole `b0 x b1` tiles (see the module docstring)."""
  if (not isinstance(shape, tuple | list) or len(shape) != 2
      or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in shape)):
    raise ValueError(f"a block shape is two positive ints, got {shape!r}")
  if pool not in ("mean", "max"):
    raise ValueError(f"block pool must be 'mean' or 'max', got {pool!r}")
  return Blocks(tuple(int(b) for b in shape), pool)


def channels(axis: int = -1, norm: str = "l2") -> Channels:
  """Whole slices along `axis` (see the module docstring)."""
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise ValueError(f"channels axis must be an int, got {axis!r}")
  if norm not in ("l2", "l1"):
    raise ValueError(f"channel norm must be 'l2' or 'l1', got {norm!r}")
  return Channels(axis, norm)


def unit_count(granularity: Granularity, shape: tuple[int, ...]) -> int:
  """How many units a leaf of `shape` holds."""
  if isinstance(granularity, Blocks):
    b0, b1 = granularity.shape
    return int(np.prod(shape[:-2])) * (shape[-2] // b0) * (shape[-1] // b1)
  return shape[granularity.axis]


def is_granularity(scope: Any) -> bool:
  return isinstance(scope, Blocks | Channels)

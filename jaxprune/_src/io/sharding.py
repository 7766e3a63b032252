"""Placing params, masks and batches on a device mesh (data parallel and FSDP).

jaxprune computes on whatever shardings its inputs carry; this module only decides
them. Params are either replicated (pure data parallel) or FSDP-sharded: each leaf is
split along its largest axis that the `fsdp` mesh axis divides, and stays replicated
if none does. Masks always carry exactly the sharding of their params. Batches are
split along their leading axis over the data axes.

Use a mesh with `Auto` axis types (`jax.sharding.Mesh(devices, names)`, or
`jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * n)`): the magnitude
selection's histograms are scatter-adds whose partitioning XLA chooses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune._src.types import PyTree

ParamLayout = Literal["replicated", "fsdp"]


def make_mesh(spec: str | dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh from `"data=8"` or `"data=2,fsdp=4"` (axis sizes must multiply to the devices).

  On 8 devices, `make_mesh("data=2,fsdp=4")` is a 2 x 4 mesh (data parallel over 2,
  FSDP over 4). One `data` axis over every device works on any device count.

  Examples:
    >>> import jax
    >>> import jaxprune
    >>> mesh = jaxprune.sharding.make_mesh(f"data={jax.device_count()}")
    >>> mesh.axis_names, mesh.devices.size == jax.device_count()
    (('data',), True)
  """
  if isinstance(spec, str):
    try:
      axes = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
    except ValueError:
      raise ValueError(f"mesh spec must look like 'data=2,fsdp=4', got {spec!r}") from None
  else:
    axes = dict(spec)
  devices = list(jax.devices() if devices is None else devices)
  size = int(np.prod(list(axes.values())))
  if size != len(devices):
    raise ValueError(f"mesh {axes} needs {size} devices, {len(devices)} available")
  return Mesh(np.array(devices).reshape(tuple(axes.values())), tuple(axes))


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, axis_name: str,
               explicit: bool) -> PartitionSpec:
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % axis_size == 0 and shape[d] >= axis_size:
      # Written as a jitted step writes its outputs' specs (Explicit axes: one entry per
      # dimension; Auto: no trailing Nones), so the next step's inputs hit the same
      # compilation: `P('fsdp', None)` and `P('fsdp')` are different cache keys.
      spec = [None] * (len(shape) if explicit else d + 1)
      spec[d] = axis_name
      return PartitionSpec(*spec)
  return PartitionSpec()


def param_shardings(
    params: PyTree, mesh: Mesh, layout: ParamLayout = "replicated", fsdp_axis: str = "fsdp"
) -> PyTree:
  """A `NamedSharding` per leaf of `params`.

  `"replicated"`: every device holds every leaf. `"fsdp"`: each leaf is split along
  its largest axis divisible by the size of mesh axis `fsdp_axis` (replicated when
  none is), so params + masks take about 1/size of the memory per device.
  """
  if layout not in ("replicated", "fsdp"):
    raise ValueError(f"layout must be 'replicated' or 'fsdp', got {layout!r}")
  if layout == "fsdp" and fsdp_axis not in mesh.shape:
    raise ValueError(f"FSDP needs a mesh axis named {fsdp_axis!r}; mesh axes are "
                     f"{tuple(mesh.shape)}")

  explicit = layout == "fsdp" and dict(zip(mesh.axis_names, mesh.axis_types))[fsdp_axis] \
      == jax.sharding.AxisType.Explicit

  def spec(x):
    if layout == "replicated":
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), mesh.shape[fsdp_axis], fsdp_axis,
                                          explicit))

  return jax.tree.map(spec, params)


def mask_shardings(masks: PyTree, params: PyTree) -> PyTree:
  """The sharding of each mask: that of its parameter (`None` stays `None`)."""
  return jax.tree.map(lambda m, w: None if m is None else w.sharding, masks, params,
                      is_leaf=lambda m: m is None)


def place_masks(masks: PyTree, params: PyTree) -> PyTree:
  """`masks` moved onto their params' shardings."""
  return jax.tree.map(lambda m, w: None if m is None else jax.device_put(m, w.sharding),
                      masks, params, is_leaf=lambda m: m is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def place_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """A batch as global arrays split along the leading axis.

  Single process: `batch` is the global batch. Several processes: each passes its
  own slice, assembled with `jax.make_array_from_process_local_data`.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def onto_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
  """`tree` with every array not already spread over `mesh`'s devices replicated there.

  Optimizer states built by `tx.init` hold scalars (step counts) on one local
  device, and so does an RNG key: with several processes such an array is local to
  its process, which a global computation or an orbax checkpoint refuses. Arrays
  already on the mesh (sharded params, their moments) keep their sharding.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> mesh = jaxprune.sharding.make_mesh(f"data={jax.device_count()}")
    >>> placed = jaxprune.sharding.onto_mesh({"count": jnp.zeros((), jnp.int32)}, mesh)
    >>> placed["count"].sharding.spec
    P()
  """
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    if not isinstance(x, jax.Array) or (isinstance(x.sharding, NamedSharding)
                                        and set(x.sharding.device_set) == devices):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, replicated)
    # Every process holds the same value (built the same way): assemble it globally.
    return jax.make_array_from_callback(x.shape, replicated, lambda index: np.asarray(x)[index])

  return jax.tree.map(place, tree)


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
  """Bytes of `tree`'s arrays held on each device (from `addressable_shards`)."""
  out: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out

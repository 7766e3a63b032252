"""Several devices and hosts: meshes, shardings of params and masks, placement.
"""

from jaxprune._src.io.sharding import (
    bytes_per_device,
    make_mesh,
    mask_shardings,
    onto_mesh,
    param_shardings,
    place_batch,
    place_masks,
)

__all__ = [
    "bytes_per_device",
    "make_mesh",
    "mask_shardings",
    "onto_mesh",
    "param_shardings",
    "place_batch",
    "place_masks",
]

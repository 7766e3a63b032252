"""How masks and selections line up with params: paths, packed masks, and each
weight's layout read from the program.
"""

from jaxprune._src.oneshot.layouts import Layout, Layouts, weight_layouts
from jaxprune._src.tree.leaf_selection import leaf_paths, path_string
from jaxprune._src.tree.mask_tree import float_part
from jaxprune._src.tree.packed_masks import (
    pack_mask,
    pack_masks,
    unpack_mask,
    unpack_masks,
)

__all__ = [
    "Layout",
    "Layouts",
    "float_part",
    "leaf_paths",
    "pack_mask",
    "pack_masks",
    "path_string",
    "unpack_mask",
    "unpack_masks",
    "weight_layouts",
]

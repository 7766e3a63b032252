"""Sparse training: masks that move during training (SET, RigL) and straight-through
estimators (a dense copy trained through a sparse forward pass).
"""

from jaxprune._src.transforms.drop_grow import DropAndGrow, rigl_schedule, set_schedule
from jaxprune._src.transforms.recomputed_masks import drop_and_grow
from jaxprune._src.transforms.straight_through import DenseWeights, dense_weights, straight_through

__all__ = [
    "DenseWeights",
    "DropAndGrow",
    "dense_weights",
    "drop_and_grow",
    "rigl_schedule",
    "set_schedule",
    "straight_through",
]

"""Sparsity schedules: lists of per-iteration targets for `prune_retrain`, and
step -> sparsity functions for `pruned`.
"""

from jaxprune._src.methods.schedules import (
    constant_schedule,
    cubic_schedule,
    exponential_schedule,
    geometric_keep_schedule,
    polynomial_schedule,
)

__all__ = [
    "constant_schedule",
    "cubic_schedule",
    "exponential_schedule",
    "geometric_keep_schedule",
    "polynomial_schedule",
]

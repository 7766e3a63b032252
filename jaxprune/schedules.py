"""Target sequences for `prune_retrain`: the sparsity of each iteration, by a formula.

A sparsity that moves with the training step (gradual pruning in `pruned`,
straight-through training) is an optax schedule (`optax.schedules`):
`optax.polynomial_schedule(init_value=0.0, end_value=0.9, power=3,
transition_steps=1000)` is Zhu & Gupta's cubic ramp, `optax.constant_schedule(0.9)`
a fixed sparsity.
"""

from jaxprune._src.methods.schedules import (
    exponential_targets,
    geometric_keep_targets,
    polynomial_targets,
)

__all__ = [
    "exponential_targets",
    "geometric_keep_targets",
    "polynomial_targets",
]

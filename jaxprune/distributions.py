"""How much each leaf loses: per-leaf sparsities from one target sparsity.

A distribution is passed to a target (`jaxprune.Prune(s, distribution=...)`).
"""

from jaxprune._src.methods.distributions import (
    Distribution,
    by_path,
    erk,
    owl,
    uniform,
)

__all__ = [
    "Distribution",
    "by_path",
    "erk",
    "owl",
    "uniform",
]

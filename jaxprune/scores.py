"""What a weight is worth: the scores a selection ranks by (lowest pruned first).

A score is a value passed to a target (`jaxprune.Prune(s, score=...)`).
"""

from jaxprune._src.methods.scores import (
    Score,
    given_score,
    gradient_score,
    magnitude_score,
    mean_gradients,
    normalized_score,
    outlier_ratios,
    random_score,
    saliency_score,
    wanda_score,
)

__all__ = [
    "Score",
    "given_score",
    "gradient_score",
    "magnitude_score",
    "mean_gradients",
    "normalized_score",
    "outlier_ratios",
    "random_score",
    "saliency_score",
    "wanda_score",
]

"""One-shot pruning from calibration data of an unmodified model: input statistics,
Wanda (`jaxprune.scores.wanda_score`) and SparseGPT.
"""

from jaxprune._src.oneshot.input_statistics import InputStatistics, LeafStatistics, input_statistics
from jaxprune._src.oneshot.sparsegpt import sparsegpt, sparsegpt_sequential

__all__ = [
    "InputStatistics",
    "LeafStatistics",
    "input_statistics",
    "sparsegpt",
    "sparsegpt_sequential",
]

"""jaxprune: pruning for any JAX model (Flax NNX and Linen, Equinox, plain pytrees).

At the top, what most users need: pure functions over parameter pytrees (`select`,
`ranked_masks`, `apply_masks`, `sparsity_report`), pruning methods as values
(`Prune`, `NM`, `GivenMasks`, with granularities `blocks` and `channels`), the optax
wrapper that holds pruned weights at zero (`pruned`, and `gradually_pruned` whose
masks follow a schedule), and the training drivers
(`prune_step`, `prune_retrain`, `train`). Beside them, one namespace per concern:

* `jaxprune.scores`, `jaxprune.distributions`, `jaxprune.schedules`: what a target
  ranks by, how much each leaf loses, and the targets of `prune_retrain`'s
  iterations (a sparsity that moves with the step is an `optax.schedules` function).
* `jaxprune.sparse_training`: masks that move while training (SET, RigL) and
  straight-through estimators.
* `jaxprune.oneshot`: calibration statistics and SparseGPT (Wanda's score is
  `jaxprune.scores.wanda_score`).
* `jaxprune.structural`: coupled channel groups and a physically smaller model.
* `jaxprune.training`: steps, loops, hooks, results, reports, metrics,
  checkpoints, distillation.
* `jaxprune.sharding`, `jaxprune.export`, `jaxprune.tree`: devices and hosts, the
  compressed file format, and how masks line up with params.

The implementation lives in `jaxprune._src` (private: import from the namespaces).
"""

from jaxprune import (
    distributions,
    export,
    oneshot,
    schedules,
    scores,
    sharding,
    sparse_training,
    structural,
    training,
    tree,
)
from jaxprune._src.methods.masks import apply_masks, check_masks, ranked_masks, threshold_masks
from jaxprune._src.methods.structured import is_nm_sparse, nm_masks, nm_violations
from jaxprune._src.methods.targets import NM, GivenMasks, Prune, Target
from jaxprune._src.methods.units import blocks, channels
from jaxprune._src.transforms.optax_wrapper import PrunedState, get_masks, pruned, set_masks
from jaxprune._src.transforms.recomputed_masks import gradually_pruned
from jaxprune._src.tree.leaf_selection import select
from jaxprune.training import (
    Checkpointer,
    distillation_loss,
    make_train_step,
    prune_retrain,
    prune_step,
    sparsity_report,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "NM",
    "Checkpointer",
    "GivenMasks",
    "Prune",
    "PrunedState",
    "Target",
    "apply_masks",
    "blocks",
    "channels",
    "check_masks",
    "distillation_loss",
    "distributions",
    "export",
    "get_masks",
    "gradually_pruned",
    "is_nm_sparse",
    "make_train_step",
    "nm_masks",
    "nm_violations",
    "oneshot",
    "prune_retrain",
    "prune_step",
    "pruned",
    "ranked_masks",
    "schedules",
    "scores",
    "select",
    "set_masks",
    "sharding",
    "sparse_training",
    "sparsity_report",
    "structural",
    "threshold_masks",
    "train",
    "training",
    "tree",
]

"""jaxprune: pruning for any JAX model (Flax NNX and Linen, Equinox, plain pytrees).

At the top: pure functions over parameter pytrees (`select`, `ranked_masks`,
`apply_masks`, `sparsity_report`), pruning methods as values (`Prune`, `NM`,
`GivenMasks`), the optax wrapper that holds pruned weights at zero (`pruned`), and
the training drivers (`prune_retrain`, `train`). Beside them, one namespace per
concern:

* `jaxprune.scores`, `jaxprune.distributions`, `jaxprune.schedules`: what a target
  ranks by, how much each leaf loses, and how sparsity moves over time.
* `jaxprune.sparse_training`: masks that move while training (SET, RigL) and
  straight-through estimators.
* `jaxprune.oneshot`: calibration statistics, Wanda and SparseGPT.
* `jaxprune.structural`: coupled channel groups and a physically smaller model.
* `jaxprune.training`: steps, loops, hooks, results, metrics, checkpoints,
  distillation.
* `jaxprune.sharding`, `jaxprune.export`, `jaxprune.tree`: devices and hosts, the
  compressed file format, and how masks line up with params.

The implementation lives in `jaxprune._src` (private: import from the namespaces).
"""

from jaxprune._src.io.export import (
    CompressedFormatError,
    ExportInfo,
    export_compressed,
    export_info,
    load_compressed,
)
from jaxprune._src.io.sharding import (
    bytes_per_device,
    make_mesh,
    mask_shardings,
    onto_mesh,
    param_shardings,
    place_batch,
    place_masks,
)
from jaxprune._src.methods.distributions import Distribution, by_path, erk, owl, uniform
from jaxprune._src.methods.masks import (
    apply_masks,
    check_masks,
    magnitude_masks,
    ranked_masks,
    threshold_masks,
)
from jaxprune._src.methods.schedules import (
    constant_schedule,
    cubic_schedule,
    exponential_schedule,
    geometric_keep_schedule,
    polynomial_schedule,
)
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
from jaxprune._src.methods.structured import is_nm_sparse, nm_masks, nm_violations
from jaxprune._src.methods.targets import NM, GivenMasks, Magnitude, Prune, Target, as_target
from jaxprune._src.methods.units import blocks, channels
from jaxprune._src.oneshot.input_statistics import InputStatistics, LeafStatistics, input_statistics
from jaxprune._src.oneshot.sparsegpt import sparsegpt, sparsegpt_sequential
from jaxprune._src.structural.channel_groups import ChannelGroups, Group, Member, channel_groups
from jaxprune._src.structural.group_importance import (
    activation_importance,
    magnitude_importance,
    taylor_importance,
)
from jaxprune._src.structural.layer_importance import block_influence, layer_importance
from jaxprune._src.structural.shrinking import keep_top, shrink
from jaxprune._src.structural.shrunk_program import shrunk_program
from jaxprune._src.training.checkpointing import Checkpointer
from jaxprune._src.training.distillation import distillation_loss, kl_to_teacher
from jaxprune._src.training.loop import prune_retrain
from jaxprune._src.training.metrics import Metric, aux_metric, loss_metric, perplexity
from jaxprune._src.training.reporting import LeafSparsity, SparsityReport, sparsity_report
from jaxprune._src.training.results import (
    Evaluation,
    IterationRecord,
    PruneRetrainResult,
    evaluate,
    pruned_fraction,
)
from jaxprune._src.training.retraining import (
    LoopState,
    ProgressBar,
    StepReport,
    check_finite_losses,
    check_sound_state,
    log_losses,
    retrain,
)
from jaxprune._src.training.steps import (
    make_eval_step,
    make_gradient_step,
    make_train_step,
    prune_step,
)
from jaxprune._src.training.training_loop import TrainResult, train
from jaxprune._src.transforms.drop_grow import DropAndGrow, rigl_schedule, set_schedule
from jaxprune._src.transforms.forward_masks import (
    ForwardMasks,
    straight_through_masks,
    straight_through_view,
)
from jaxprune._src.transforms.optax_wrapper import PrunedState, get_masks, pruned, set_masks
from jaxprune._src.transforms.straight_through import DenseWeights, dense_weights, straight_through
from jaxprune._src.tree.leaf_selection import leaf_paths, path_string, select
from jaxprune._src.tree.packed_masks import pack_mask, pack_masks, unpack_mask, unpack_masks

__version__ = "0.1.0"

__all__ = [
    "NM",
    "ChannelGroups",
    "Checkpointer",
    "CompressedFormatError",
    "DenseWeights",
    "Distribution",
    "DropAndGrow",
    "Evaluation",
    "ExportInfo",
    "ForwardMasks",
    "GivenMasks",
    "Group",
    "InputStatistics",
    "IterationRecord",
    "LeafSparsity",
    "LeafStatistics",
    "LoopState",
    "Magnitude",
    "Member",
    "Metric",
    "ProgressBar",
    "Prune",
    "PruneRetrainResult",
    "PrunedState",
    "Score",
    "SparsityReport",
    "StepReport",
    "Target",
    "TrainResult",
    "activation_importance",
    "apply_masks",
    "as_target",
    "aux_metric",
    "block_influence",
    "blocks",
    "by_path",
    "bytes_per_device",
    "channel_groups",
    "channels",
    "check_finite_losses",
    "check_masks",
    "check_sound_state",
    "constant_schedule",
    "cubic_schedule",
    "dense_weights",
    "distillation_loss",
    "erk",
    "evaluate",
    "exponential_schedule",
    "export_compressed",
    "export_info",
    "geometric_keep_schedule",
    "get_masks",
    "given_score",
    "gradient_score",
    "input_statistics",
    "is_nm_sparse",
    "keep_top",
    "kl_to_teacher",
    "layer_importance",
    "leaf_paths",
    "load_compressed",
    "log_losses",
    "loss_metric",
    "magnitude_importance",
    "magnitude_masks",
    "magnitude_score",
    "make_eval_step",
    "make_gradient_step",
    "make_mesh",
    "make_train_step",
    "mask_shardings",
    "mean_gradients",
    "nm_masks",
    "nm_violations",
    "normalized_score",
    "onto_mesh",
    "outlier_ratios",
    "owl",
    "pack_mask",
    "pack_masks",
    "param_shardings",
    "path_string",
    "perplexity",
    "place_batch",
    "place_masks",
    "polynomial_schedule",
    "prune_retrain",
    "prune_step",
    "pruned",
    "pruned_fraction",
    "random_score",
    "ranked_masks",
    "retrain",
    "rigl_schedule",
    "saliency_score",
    "select",
    "set_masks",
    "set_schedule",
    "shrink",
    "shrunk_program",
    "sparsegpt",
    "sparsegpt_sequential",
    "sparsity_report",
    "straight_through",
    "straight_through_masks",
    "straight_through_view",
    "taylor_importance",
    "threshold_masks",
    "train",
    "uniform",
    "unpack_mask",
    "unpack_masks",
    "wanda_score",
]

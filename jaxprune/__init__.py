"""jaxprune: pruning for any JAX model (Flax NNX and Linen, Equinox, plain pytrees).

Pure functions over parameter pytrees (`select`, `magnitude_masks`, `ranked_masks`
with scores and distributions, `threshold_masks`, `apply_masks`,
`sparsity_report`), pruning methods as values (`Magnitude`, `Prune`, `NM`),
sparsity schedules, an optax
wrapper that holds pruned weights at zero (`pruned`), and a jitted prune-retrain
loop (`prune_retrain`); structural pruning to a physically smaller model
(`channel_groups`, `keep_top`, `shrink`, `shrunk_program`). How `where` and mask
trees line up with params (paths, `None` leaves, Equinox modules) is
`jaxprune.mask_tree`.
"""

from jaxprune.channel_groups import ChannelGroups, Group, Member, channel_groups
from jaxprune.checkpointing import Checkpointer
from jaxprune.distillation import distillation_loss, kl_to_teacher
from jaxprune.distributions import Distribution, by_path, erk, owl, uniform
from jaxprune.drop_grow import DropAndGrow, rigl_schedule, set_schedule
from jaxprune.export import (
    CompressedFormatError,
    ExportInfo,
    export_compressed,
    export_info,
    load_compressed,
)
from jaxprune.forward_masks import ForwardMasks, straight_through_masks, straight_through_view
from jaxprune.group_importance import (
    activation_importance,
    magnitude_importance,
    taylor_importance,
)
from jaxprune.input_statistics import InputStatistics, LeafStatistics, input_statistics
from jaxprune.layer_importance import block_influence, layer_importance
from jaxprune.leaf_selection import leaf_paths, path_string, select
from jaxprune.loop import prune_retrain
from jaxprune.masks import apply_masks, check_masks, magnitude_masks, ranked_masks, threshold_masks
from jaxprune.metrics import Metric, aux_metric, loss_metric, perplexity
from jaxprune.optax_wrapper import PrunedState, get_masks, pruned, set_masks
from jaxprune.packed_masks import pack_mask, pack_masks, unpack_mask, unpack_masks
from jaxprune.reporting import LeafSparsity, SparsityReport, sparsity_report
from jaxprune.results import (
    Evaluation,
    IterationRecord,
    PruneRetrainResult,
    evaluate,
    pruned_fraction,
)
from jaxprune.retraining import (
    LoopState,
    ProgressBar,
    StepReport,
    check_finite_losses,
    check_sound_state,
    log_losses,
    retrain,
)
from jaxprune.schedules import (
    constant_schedule,
    cubic_schedule,
    exponential_schedule,
    geometric_keep_schedule,
    polynomial_schedule,
)
from jaxprune.scores import (
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
from jaxprune.sharding import (
    bytes_per_device,
    make_mesh,
    mask_shardings,
    onto_mesh,
    param_shardings,
    place_batch,
    place_masks,
)
from jaxprune.shrinking import keep_top, shrink
from jaxprune.shrunk_program import shrunk_program
from jaxprune.sparsegpt import sparsegpt, sparsegpt_sequential
from jaxprune.steps import make_eval_step, make_gradient_step, make_train_step, prune_step
from jaxprune.straight_through import DenseWeights, dense_weights, straight_through
from jaxprune.structured import is_nm_sparse, nm_masks, nm_violations
from jaxprune.targets import NM, GivenMasks, Magnitude, Prune, Target, as_target
from jaxprune.training_loop import TrainResult, train
from jaxprune.units import blocks, channels

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

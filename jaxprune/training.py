"""Training: the jitted steps, the prune-retrain loop and `train`, their hooks,
results, sparsity reports, metrics, checkpoints and distillation.
"""

from jaxprune._src.training.checkpointing import Checkpointer
from jaxprune._src.training.distillation import distillation_loss, kl_to_teacher, teacher_logits_fn
from jaxprune._src.training.loop import prune_retrain
from jaxprune._src.training.metrics import (
    Metric,
    aux_metric,
    loss_metric,
    perplexity,
)
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

__all__ = [
    "Checkpointer",
    "Evaluation",
    "IterationRecord",
    "LeafSparsity",
    "LoopState",
    "Metric",
    "ProgressBar",
    "PruneRetrainResult",
    "SparsityReport",
    "StepReport",
    "TrainResult",
    "aux_metric",
    "check_finite_losses",
    "check_sound_state",
    "distillation_loss",
    "evaluate",
    "kl_to_teacher",
    "log_losses",
    "loss_metric",
    "make_eval_step",
    "make_gradient_step",
    "make_train_step",
    "perplexity",
    "prune_retrain",
    "prune_step",
    "pruned_fraction",
    "retrain",
    "sparsity_report",
    "teacher_logits_fn",
    "train",
]

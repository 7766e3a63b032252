"""Training: the drivers (`prune_retrain`, `train`), the jitted steps, the phase
engine and its hooks, checkpoints, results, sparsity reports, metrics and
distillation.
"""

from jaxprune._src.training.checkpointing import Checkpointer
from jaxprune._src.training.distillation import (
    TeacherBatch,
    distillation_loss,
    kl_to_teacher,
    with_teacher_logits,
)
from jaxprune._src.training.metrics import (
    Metric,
    aux_metric,
    loss_metric,
    perplexity,
)
from jaxprune._src.training.phases import (
    LoopState,
    ProgressBar,
    StepReport,
    check_finite_losses,
    check_sound_state,
    every,
    log_losses,
    progress_bar,
    retrain,
)
from jaxprune._src.training.prune_retrain import prune_retrain
from jaxprune._src.training.reporting import LeafSparsity, SparsityReport, sparsity_report
from jaxprune._src.training.results import (
    Evaluation,
    IterationRecord,
    PruneRetrainResult,
    evaluate,
    pruned_fraction,
)
from jaxprune._src.training.steps import (
    make_eval_step,
    make_gradient_step,
    make_train_step,
    prune_step,
)
from jaxprune._src.training.train import TrainResult, train

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
    "TeacherBatch",
    "TrainResult",
    "aux_metric",
    "check_finite_losses",
    "check_sound_state",
    "distillation_loss",
    "evaluate",
    "every",
    "kl_to_teacher",
    "log_losses",
    "loss_metric",
    "make_eval_step",
    "make_gradient_step",
    "make_train_step",
    "perplexity",
    "progress_bar",
    "prune_retrain",
    "prune_step",
    "pruned_fraction",
    "retrain",
    "sparsity_report",
    "train",
    "with_teacher_logits",
]

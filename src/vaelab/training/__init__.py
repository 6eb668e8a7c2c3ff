"""Training: a short loop over a pure step, with the run opened, resumed and saved by small units."""

from .callbacks import Callback, CheckpointInfo, RunInfo, StepInfo
from .loop import TrainResult, beta_at, epoch_order, fit, train
from .session import Session, make_optimizer, open_session
from .step import Meters, StepResult, TrainState, guard_nonfinite, train_step

__all__ = [
    "Callback",
    "CheckpointInfo",
    "Meters",
    "RunInfo",
    "Session",
    "StepInfo",
    "StepResult",
    "TrainResult",
    "TrainState",
    "beta_at",
    "epoch_order",
    "fit",
    "guard_nonfinite",
    "make_optimizer",
    "open_session",
    "train",
    "train_step",
]

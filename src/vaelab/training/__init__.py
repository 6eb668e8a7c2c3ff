"""Training: the loop, checkpoints, run directories and the run lock."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .lock import RunLock
from .loop import TrainResult, TrainState, complete_config, evaluate_elbo, train
from .rundir import RunDir

__all__ = [
    "Checkpoint",
    "RunDir",
    "RunLock",
    "TrainResult",
    "TrainState",
    "complete_config",
    "evaluate_elbo",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

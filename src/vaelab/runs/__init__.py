"""Runs: the run directory, its lock, crash-safe checkpoints, and :class:`Run`, a trained run opened
for use (config, data description, model and condition loaded once, data lazily)."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .lock import RunLock
from .pretrained import Pretrained, from_pretrained, is_export, load_pretrained
from .run import Run, load_run
from .rundir import RunDir

__all__ = ["Checkpoint", "Pretrained", "Run", "RunDir", "RunLock", "from_pretrained", "is_export", "load_checkpoint",
           "load_pretrained", "load_run", "save_checkpoint"]

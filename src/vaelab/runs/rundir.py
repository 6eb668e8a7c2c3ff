"""The run directory, the one place a training run writes to:

    RUN/
      config.json                 the full RunConfig (data, model, train), human-readable
      metrics.jsonl               one JSON object per epoch (train and validation terms, timings)
      checkpoints/latest.safetensors   model + optimizer + RNG states + config + counters
      checkpoints/best.safetensors     the same, at the best validation ELBO so far
      .lock                       held (flock) by the one process training into RUN
      eval/                       outputs of `vaelab evaluate` (JSON)
      *.png, *.npy                outputs of sample / reconstruct / interpolate / manifold / encode
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..safeio import dumps_json
from .checkpoint import TMP_SUFFIX, atomic_write, remove_stale_temps


@dataclass(frozen=True)
class RunDir:
    root: Path

    @staticmethod
    def of(path: str | os.PathLike[str]) -> RunDir:
        return RunDir(Path(path))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest.safetensors"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def remove(self) -> None:
        """Remove the run in ``root`` and nothing else (call holding the run lock; ``train(...,
        overwrite=True)``): its config, metrics, checkpoints, evaluations and TensorBoard events, and the
        temporary files of interrupted writes; the user's own files stay, and a folder left empty goes."""
        folders = {self.checkpoints: ("latest.safetensors", "best.safetensors", f".*{TMP_SUFFIX}"),
                   self.eval: ("*.json", f".*{TMP_SUFFIX}"), self.root / "tb": ("events.out.tfevents.*",)}
        try:
            for path in (self.config, self.metrics):
                path.unlink(missing_ok=True)
            remove_stale_temps(self.root)
            for folder, patterns in folders.items():
                if not folder.is_dir() or folder.is_symlink():
                    continue
                for p in (p for pattern in patterns for p in folder.glob(pattern)):
                    if p.is_file() or p.is_symlink():
                        p.unlink()
                if not any(folder.iterdir()):
                    folder.rmdir()
        except OSError as e:
            raise CheckpointError(f"{self.root}: could not remove the old run to start afresh (overwrite=True): "
                                  f"{e.strerror or e}") from e

    def checkpoint(self, which: str = "best") -> Path:
        """Path of the ``best`` or ``latest`` checkpoint (``best`` falls back to ``latest``), or a file."""
        if which in ("best", "latest"):
            p = self.best if which == "best" and self.best.exists() else self.latest
            if not p.exists():
                raise CheckpointError(f"{self.root}: no checkpoint found (looked for {self.best} and {self.latest})")
            return p
        return Path(which)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    break  # a torn last line from a crash: ignore it and what follows
                if not isinstance(row, dict):
                    break
                out.append(row)
        return out

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row (fsync'ed). A failed write is a :class:`CheckpointError` naming the file; a
        torn line it may leave is dropped by :meth:`read_metrics` and :meth:`truncate_metrics`."""
        try:
            with open(self.metrics, "a") as fh:
                fh.write(dumps_json(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise CheckpointError(f"could not append to {self.metrics}: {e.strerror or e}") from e

    def truncate_metrics(self, max_step: int) -> None:
        """Keep only rows up to ``max_step`` (after resuming from a checkpoint taken at that step),
        dropping a torn last line; the file is rewritten (atomically) only if that changes it."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= max_step]
        text = "".join(dumps_json(r) + "\n" for r in rows)
        try:
            current = self.metrics.read_text() if self.metrics.exists() else ""
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            atomic_write(self.metrics, text.encode())


def check_run_target(root: str | os.PathLike[str]) -> None:
    """Refuse, before any work, to train into a non-empty folder of other things (as ``vaelab export``
    refuses for its folder). A run (config.json, metrics.jsonl or checkpoints/ in it, the user's own
    files beside them) or what a start that failed before training leaves (``.lock``, a temporary
    file) is taken."""
    root = Path(root)
    if not root.is_dir() or any((root / m).exists() for m in ("config.json", "metrics.jsonl", "checkpoints")):
        return
    started = lambda name: name == ".lock" or (name.startswith(".") and name.endswith(TMP_SUFFIX))  # noqa: E731
    if not all(started(p.name) for p in root.iterdir()):  # (a file being written by rank 0 of a torchrun job)
        raise ConfigError(f"{root}: is not empty and holds no vaelab run (no config.json or checkpoints/); "
                          "choose a new or empty folder for the run (--run)")

"""One writer per run directory: an advisory ``flock`` on ``RUN/.lock``.

The kernel releases a flock when its process dies, however it dies, so a lock left by a killed
process is stale by construction and is simply taken over; a live holder is refused with its pid.
Taking the lock is also where a run directory is first written to: a path that is a file (or lies
under one) and a full or read-only disk are reported there, as one line naming the folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from ..errors import CheckpointError, RunLockedError

try:  # POSIX; elsewhere (Windows) the lock is taken with the `filelock` package that torch installs
    import fcntl
except ImportError:  # pragma: no cover - not reached on POSIX
    fcntl = None  # type: ignore[assignment]


class RunLock:
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None
        self._other = None

    def _prepare(self) -> None:
        folder = self.path.parent
        for parent in (folder, *folder.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    where = "is" if parent == folder else f"lies under {parent}, which is"
                    raise CheckpointError(f"{folder}: cannot be a run directory: it {where} a file, not a folder")
                break

    def acquire(self) -> RunLock:
        self._prepare()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fcntl is None:  # pragma: no cover
                return self._acquire_portable()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"{self.path.parent}: cannot create the run directory or its lock file "
                                  f"{self.path.name}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: another vaelab process is training into this run ({holder}); "
                "wait for it to finish or choose another run directory"
            ) from None
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"{self.path}: cannot take the run lock: {e.strerror or e}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            os.fsync(fd)
        except OSError as e:  # a full disk: the lock is ours but its note of who holds it is not written
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise CheckpointError(f"{self.path}: cannot write the run lock: {e.strerror or e}; "
                                  "free some space and re-run the same command") from None
        self._fd = fd
        return self

    def _acquire_portable(self) -> RunLock:  # pragma: no cover - only without fcntl
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path) + ".flock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunLockedError(f"{self.path.parent}: another vaelab process is training into this run; "
                                 "wait for it to finish or choose another run directory") from None
        self._other = lock
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._other is not None:  # pragma: no cover
            self._other.release()
            self._other = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

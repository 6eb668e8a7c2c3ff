"""Kernel decisions made once per machine and torch, persisted, and shared by every process.

A product's speed on oneDNN and on ATen is measured the first time any vaelab process on this machine
needs it, and the answer is written to ``~/.cache/vaelab/kernels/<machine>.json`` (``$XDG_CACHE_HOME``
respected), keyed by what decides those speeds: the CPU (model name and instruction-set flags), the
torch version and build, and the thread count. Later processes read it, so the same command takes the
same kernels whatever the machine's load at the moment. Writes are atomic (a temporary file renamed
over the old) and serialised by a lock file, so concurrent first runs agree: the second waits, then
takes the first one's answers. A run records the plan it took in its config (``train.kernels``), so
re-running from a run's own ``config.json`` reproduces it even where this cache was cleared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

VERSION = 1  # of the file's format
MAX_BYTES = 1 << 20


def cpu_description() -> str:
    """The CPU's model name and instruction-set flags (Linux: /proc/cpuinfo; elsewhere what
    ``platform`` knows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")[:1 << 16]
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = " ".join(sorted(set((fields.get("flags") or fields.get("Features") or "").split())))
    return f"{fields.get('model name') or platform.processor() or platform.machine()} | {flags}"


def machine_key() -> str:
    """What decides the kernels' speeds here, hashed: CPU, torch version and build, threads."""
    parts = [cpu_description(), torch.__version__, torch.__config__.show()[:4000], str(torch.get_num_threads())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaelab" / "kernels" / f"{machine_key()}.json"


def _read(path: Path) -> dict[str, int]:
    """The decisions in ``path``; an absent, unreadable or malformed file holds none (it is rewritten)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_BYTES + 1)[:MAX_BYTES])
    except (OSError, ValueError):
        return {}
    got = data.get("decisions") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(got, dict):
        return {}
    return {k: v for k, v in got.items() if isinstance(k, str) and type(v) is int and 0 <= v <= 7}


def _write(path: Path, decisions: dict[str, int]) -> None:
    """Atomically: a temporary file in the same folder, flushed, renamed over the old one."""
    body = {"version": VERSION, "cpu": cpu_description()[:200], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "decisions": dict(sorted(decisions.items()))}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive use of ``path``'s decisions among this machine's processes (where ``fcntl`` exists)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes alone
        yield
        return
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def decisions(shapes: list[tuple[int, int, int]], measure: Callable[[int, int, int], int],
              say: Callable[[str], None] | None = None) -> dict[tuple[int, int, int], int]:
    """The machine's decision for each (rows, in, out): read from its cache, or measured now (all the
    missing ones at once, under the lock) and added to it. Where the cache cannot be written (a
    read-only home), the decisions are measured and used, and one line says they were not kept."""
    key = lambda s: "x".join(map(str, s))  # noqa: E731
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            known = _read(path)
            missing = [s for s in shapes if key(s) not in known]
            if missing:
                known.update({key(s): measure(*s) for s in missing})
                _write(path, known)
    except OSError as e:
        if say is not None:
            say(f"vaelab: could not keep the kernel decisions in {path} ({e.strerror or e}); measured for this run only")
        known = {key(s): measure(*s) for s in shapes}
    return {s: known[key(s)] for s in shapes}

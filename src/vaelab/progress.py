"""Progress that reaches the user wherever the output goes: a live bar on a terminal (or in a
notebook); in a log file, a CI job, a pipe or a batch scheduler, one plain line every ``every``
seconds (``$VAELAB_PROGRESS_EVERY``, default 30), with the rate and the time left."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

DEFAULT_EVERY = 30.0


def _every() -> float:
    try:
        v = float(os.environ.get("VAELAB_PROGRESS_EVERY", DEFAULT_EVERY))
    except ValueError:
        return DEFAULT_EVERY
    return v if v > 0 and math.isfinite(v) else DEFAULT_EVERY


def interactive(stream: TextIO) -> bool:
    """A terminal or a notebook: somewhere a live bar can redraw itself."""
    try:
        return stream.isatty() or "ipykernel" in sys.modules
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """4 s, 2 min 05 s, 1 h 03 min."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """``total`` units of work named ``desc``; ``update()`` after each one. Disabled: silent."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0,
                 every: float | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.every = _every() if every is None else every
        self.postfix = ""
        self.bar = None
        if enabled and interactive(self.stream):
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)
        self.t0 = self.last = time.monotonic()
        self.start = initial

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        done = self.n - self.start
        left = elapsed / done * (self.total - self.n) if done > 0 else math.nan
        pct = 100.0 * self.n / self.total if self.total else 100.0
        extra = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%), {duration(elapsed)} elapsed, "
                f"about {duration(left)} left{extra}")

    def estimate(self) -> float:
        """Seconds the remaining work should take at the rate so far (NaN before the first unit)."""
        done = self.n - self.start
        return (time.monotonic() - self.t0) / done * (self.total - self.n) if done > 0 else math.nan

    def note(self, msg: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

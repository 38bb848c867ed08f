"""Progress output for commands that move hundreds of MiB (``bundle export|import``).

On a terminal: one line redrawn in place (a bar). Otherwise (CI logs, ``2> file``): plain lines,
one per 10 % and one per member larger than that, so a log shows the transfer advancing without
thousands of lines. Always on stderr: stdout stays clean for scripts.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Progress:
    def __init__(self, verb: str, total: int, stream: Optional[TextIO] = None,
                 width: int = 30) -> None:
        self.verb = verb
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.done = 0
        self._last_step = -1
        self._last_draw = 0.0
        self._started = time.monotonic()

    def _pct(self) -> int:
        return 100 if not self.total else min(100, self.done * 100 // self.total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._last_draw = now
                filled = self._pct() * self.width // 100
                bar = "#" * filled + "-" * (self.width - filled)
                self.stream.write(f"\r{self.verb} [{bar}] {self._pct():3d}% "
                                  f"{human(self.done)}/{human(self.total)}")
                self.stream.flush()
            return
        step = self._pct() // 10
        if step != self._last_step:
            self._last_step = step
            self.stream.write(f"{self.verb}: {self._pct()}% ({human(self.done)} of "
                              f"{human(self.total)})\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (a member starts, a step finishes)."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, text: str) -> None:
        secs = time.monotonic() - self._started
        rate = self.done / secs if secs > 0 else 0
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"{text} ({human(self.done)} in {secs:.1f}s, {human(rate)}/s)\n")
        self.stream.flush()

"""Progress that also reaches a log file. Rich draws a live bar on a terminal and nothing until the end
otherwise, so a fine-tuning run or a long evaluation written to a log looked silent for minutes; when the
console is not a terminal, plain lines say where the work is: one at the start, then one at most every
``RETROFIT_PROGRESS_SECONDS`` (30 by default), and one at the end."""

from __future__ import annotations

import os
import time

from rich.console import Console


class PlainProgress:
    def __init__(self, console: Console, what: str, total: int):
        self.console, self.what, self.total = console, what, total
        self.every = float(os.environ.get("RETROFIT_PROGRESS_SECONDS", "30"))
        self.active = not console.is_terminal
        self.start = self.last = time.monotonic()
        self.first_done: int | None = None
        if self.active:
            self._say(f"{what}: {total} to do")

    def update(self, done: int, detail: str = "") -> None:
        if not self.active:
            return
        now = time.monotonic()
        if self.first_done is None:
            self.first_done, self.start = done - 1, now  # a resumed run starts mid-way: rate from here
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = (done - self.first_done) / max(now - self.start, 1e-9)
        eta = f", ETA {(self.total - done) / rate:.0f} s" if rate > 0 and done < self.total else ""
        self._say(f"{self.what}: {done}/{self.total}{', ' + detail if detail else ''}{eta}")

    def _say(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

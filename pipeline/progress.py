"""The one progress protocol of every stage: ``progress(event, **kw)``, or None for silence.

Events: ``start(desc=str, total=int)`` · ``advance(n=int)`` · ``log(message=str)`` · ``end()``.
The CLI passes a rich progress bar (cli/ui.py); tests pass a plain function. :class:`Ticker`
turns "k of total done" counts into start/advance/end events for loops that count.
"""
from __future__ import annotations

from typing import Callable, Optional

Progress = Optional[Callable[..., None]]


class Ticker:
    """Report a counted loop: ``t = Ticker(progress, "check images", total); t.to(k); t.done()``."""

    def __init__(self, progress: Progress, desc: str, total: int, every: int = 256):
        self.progress, self.total, self.every, self.at = progress, int(total), int(every), 0
        if progress:
            progress("start", desc=desc, total=self.total)

    def to(self, k: int) -> None:
        """k items are done (reported every `every` items and at the end)."""
        if self.progress and (k - self.at >= self.every or k == self.total) and k > self.at:
            self.progress("advance", n=k - self.at)
            self.at = k

    def done(self) -> None:
        if self.progress:
            self.to(self.total)
            self.progress("end")

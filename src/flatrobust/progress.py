"""Progress reporting, one rule for every long loop (training, evaluation, AutoAttack, trust checks,
landscape, flatness, pseudo-labeling):

* stderr is a terminal: a tqdm bar (redrawn in place, removed when done);
* stderr is not a terminal (a log file, a pipe, CI, a notebook): one heartbeat line every
  `HEARTBEAT_S` seconds (30) while the loop runs, e.g.
  `[flatrobust] eval autoattack: 1/2 batch (attack 6 of 6), 12 min 5 s, about 2 min 3 s left in eval autoattack
  (stage 2/4: apgd-t)`: the count and the estimate are the current phase's (one attack, at its own pace),
  written from a timer thread so that one long step (an AutoAttack batch) is not silent either; a loop
  shorter than that writes nothing. Never a bar frame in a file.

`enabled=False` writes nothing at all. The decision is taken when the bar is created, from the stream
it writes to (`sys.stderr` at that moment unless `stream` is given).

    >>> with progress(total=len(batches), desc="eval pgd20", unit="batch") as bar:
    ...     for b in batches:
    ...         ...
    ...         bar.update()
"""
from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import Any, Iterable, Iterator, TextIO

__all__ = ["HEARTBEAT_S", "Progress", "format_duration", "is_terminal", "progress"]

HEARTBEAT_S = 30.0  # seconds between two heartbeat lines when stderr is not a terminal


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """'4.9 s', '42 s', '3 min 5 s', '2 h 7 min' (tenths below 10 s, so a short run never reads '0 s')."""
    if seconds < 9.95:
        return f"{max(seconds, 0):.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """A tqdm-like counter (`update`, `set_description`, `set_postfix_str`, `set_postfix`, `close`, iteration,
    `with`) that draws a bar on a terminal and writes heartbeat lines elsewhere; see the module docstring."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, enabled: bool = True, stream: TextIO | None = None, interval: float | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""
        self.stream = stream if stream is not None else sys.stderr
        self.interval = HEARTBEAT_S if interval is None else interval
        self._start, self._initial = time.monotonic(), initial
        self._phase_start, self._phase_n = self._start, initial  # the time left is estimated per description
        self._phase_first, self._phase_total, self._phase = initial, None, None  # set_description(phase_total=...)
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mode = "off" if not enabled else "bar" if is_terminal(self.stream) else "heartbeat"
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, leave=False,
                             dynamic_ncols=True)
        elif self.mode == "heartbeat":
            # The thread holds the bar only weakly: a bar dropped without close() stops beating.
            self._thread = threading.Thread(target=_beat, args=(weakref.ref(self), self._stop, self.interval),
                                            name="flatrobust-heartbeat", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the tqdm-like interface
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str, *, phase_total: int | None = None, phase: str | None = None) -> None:
        """A new description starts a new phase (e.g. the next attack: its items may cost quite differently).
        With `phase_total` (the phase's items) the heartbeat counts the phase's items, names `phase` ("attack 2
        of 6") and estimates the time left in this phase from its own pace, never from another phase's."""
        if desc != self.desc or phase_total is not None:
            self._phase_start, self._phase_n = time.monotonic(), self.n
            self._phase_first, self._phase_total, self._phase = self.n, phase_total, phase
            if self._bar is not None and phase_total is not None:
                self._bar.reset(total=phase_total)  # the bar, its rate and its time left: this phase's
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def skip(self, n: int) -> None:
        """Count `n` items that cost nothing (results read back from disk): they do not enter the pace."""
        self.update(n)
        self._phase_start, self._phase_n = time.monotonic(), self.n

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def set_postfix(self, **values: Any) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("Progress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ heartbeat
    def line(self) -> str:
        """The heartbeat line for the current state (without the newline)."""
        now = time.monotonic()
        elapsed = now - self._start
        done = self.n - self._phase_n  # in the current phase, whose pace predicts the rest
        if self._phase_total:  # count and estimate within the phase (one attack of an evaluation)
            k, left = self.n - self._phase_first, self._phase_first + self._phase_total - self.n
            text = f"{self.desc}: {k}/{self._phase_total} {self.unit}" + (f" ({self._phase})" if self._phase else "")
            text += f", {format_duration(elapsed)}"
            if left > 0:
                text += (f", about {format_duration((now - self._phase_start) / done * left)} left in {self.desc}" if done > 0
                         else f", no estimate until its first {self.unit} ends")
        elif self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {format_duration(elapsed)}"
            if done > 0 and self.n < self.total:
                text += f", about {format_duration((now - self._phase_start) / done * (self.total - self.n))} left"
        else:
            text = f"{self.desc}: {self.n} {self.unit}, {format_duration(elapsed)}"
        if self.postfix:
            text += f" ({self.postfix})"
        return f"[flatrobust] {text}"


def _beat(ref: "weakref.ref[Progress]", stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        bar = ref()
        if bar is None:
            return
        try:
            bar.stream.write(bar.line() + "\n")
            bar.stream.flush()
        except (OSError, ValueError):  # the stream went away: stop quietly
            return
        del bar


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Progress:
    """`Progress(iterable, **kwargs)`: a bar on a terminal, heartbeat lines otherwise, nothing if enabled=False."""
    return Progress(iterable, **kwargs)

"""Progress of long loops: a tqdm bar on a terminal, dated lines in a log, nothing when turned off.

    from minigpt2.progress import progress
    chunks = range(3)
    for chunk in progress(chunks, "edge patching", "chunk", enabled=True):
        ...
    with progress(total=5, desc="tpp build", unit="part") as bar:   # or steps of unequal kinds
        bar.update(1, "train examples")                            # what just finished

Where it goes (stderr unless ``stream`` says otherwise):

- a terminal (or a Jupyter kernel): tqdm (tqdm.auto), as train.py, the sweep and the search show it;
- anything else (a log file, a pipe, CI): one line per step, ``desc: n/total unit, 12.3 s elapsed,
  ~40 s left [what]``, at most one every ``interval`` seconds (LOG_INTERVAL; the first and the
  last step always print), plus a line when the loop starts, so that a long first step is never a
  silence and a log of thousands of fast steps stays short;
- off: ``enabled=False`` (``python -m tpp build --no-progress``; train.py's ``--no-progress`` turns off
  its trainer's bar), or for the whole process :func:`set_enabled` (circuits.py calls it for
  ``--no-progress``, which so reaches every stage of every command) or the environment variable
  ``MINIGPT2_PROGRESS=0``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator

LOG_INTERVAL = 10.0  # seconds between two log lines of one loop (a terminal's bar redraws as tqdm does)
ENV = "MINIGPT2_PROGRESS"  # "0", "off", "false" or "no" turns every progress display off
_enabled: bool | None = None  # set_enabled's choice; None: the environment's


def set_enabled(enabled: bool | None) -> None:
    """Turn every progress display of this process off (False) or back on (True); None: follow
    MINIGPT2_PROGRESS again. What ``--no-progress`` does."""
    global _enabled
    _enabled = enabled


def setting() -> bool | None:
    """What :func:`set_enabled` set last (None: MINIGPT2_PROGRESS decides), for a caller that restores it."""
    return _enabled


def globally_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def interactive(stream) -> bool:
    """A terminal, or a notebook (whose stderr is no TTY, but tqdm.auto draws a widget there)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return True
    return stream is sys.stderr and "ipykernel" in sys.modules


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """A loop's progress (see the module docstring); iterate over it, or call ``update``.

    ``update(n=1, what="")``: n more steps done; ``what`` names them in the log line (or the bar's
    postfix). ``set_postfix(**values)``: numbers shown beside the count (tqdm's call). ``close()``
    (or leaving a ``with`` block) ends the bar, and prints the last line if the loop stopped early.
    """

    def __init__(self, items: Iterable | None = None, desc: str = "", unit: str = "step", total: int | None = None,
                 enabled: bool = True, stream=None, interval: float = LOG_INTERVAL):
        self.items = items
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled) and globally_enabled()
        self.n, self.postfix = 0, ""
        self._bar = None
        self._start = self._last = time.perf_counter()
        self._printed = -1  # the step count of the last log line
        if not self.enabled:
            return
        if interactive(self.stream):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        else:
            size = f" ({self.total} {_plural(unit, self.total)})" if self.total is not None else ""
            self._write(f"{desc}: started{size}")

    # --- the loop ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.items is None:
            raise TypeError("this Progress has no items to iterate over; call update() instead")
        try:
            for item in self.items:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, what: str = "") -> None:
        self.n += n
        if what:
            self.postfix = what
        if not self.enabled:
            return
        if self._bar is not None:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self._printed < 1 or now - self._last >= self.interval or self.n == self.total:
            self._log_line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._printed != self.n and self.n > 0:
            self._log_line(time.perf_counter())
        self.enabled = False  # a second close (or update after it) prints nothing

    # --- log lines --------------------------------------------------------------------------------
    def _log_line(self, now: float) -> None:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", ~{_duration(elapsed / self.n * (self.total - self.n))} left"
        what = f" [{self.postfix}]" if self.postfix else ""
        unit = _plural(self.unit, self.total if self.total is not None else self.n)
        self._write(f"{self.desc}: {count} {unit}, {_duration(elapsed)} elapsed{left}{what}")
        self._last, self._printed = now, self.n

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def progress(items: Iterable | None = None, desc: str = "", unit: str = "step", enabled: bool = True,
             total: int | None = None, stream=None, interval: float = LOG_INTERVAL) -> Progress:
    """A :class:`Progress` over ``items`` (or of ``total`` steps counted by ``update``)."""
    return Progress(items, desc, unit, total, enabled, stream, interval)

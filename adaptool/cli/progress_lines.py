"""Progress as plain lines on stderr, for logs and CI (a pipe, ``NO_COLOR``, ``TERM=dumb``).

A line every ``interval`` seconds (default 5; ``ADAPTOOL_PROGRESS_INTERVAL``, 0 = a line per update) or each
time another tenth of the bytes is done, but never two within ``min_gap`` seconds (1 s, or the interval if
shorter), and a last line at 100 % when the work is done. A line names the phase and gives the percent, bytes
done and total, rate and ETA; no ANSI escape, no carriage return. Lines are written as progress is reported
(per tensor or module), so a single slow tensor gets no line of its own. The clock is a parameter, so tests
drive it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping

from adaptool.errors import AdaptoolError

INTERVAL_ENV = "ADAPTOOL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0
MIN_GAP = 1.0
STEP = 0.1
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def wants_plain_lines(stream=None, environ: Mapping[str, str] | None = None) -> bool:
    """Plain lines, not a progress bar: ``stream`` (stderr) is not a terminal, or ``NO_COLOR`` is set (to
    anything but the empty string), or ``TERM=dumb``."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    return not tty or bool(environ.get("NO_COLOR")) or environ.get("TERM") == "dumb"


def interval_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between time-driven lines: ``ADAPTOOL_PROGRESS_INTERVAL`` (0 = a line per update), else 5."""
    raw = (os.environ if environ is None else environ).get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise AdaptoolError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds",
                            f"set it to 0 or more (e.g. {INTERVAL_ENV}=5), or unset it")
    return value


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal; plain bytes without)."""
    n = float(n)
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {UNITS[-1]}"  # not reached


def human_duration(seconds: float) -> str:
    """95 -> '1m35s', 3725 -> '1h02m', 27.4 -> '27s', 7.25 -> '7.2s'."""
    seconds = max(seconds, 0.0)
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def write_stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not fail the run
        pass


class ProgressLines:
    """Rate-limited progress lines: pass ``start`` and ``advance`` as a command's ``on_start`` / ``on_progress``,
    call ``finish`` when the work is done.

    Args:
        label (str): the phase ("Writing", "Merging" …), first on every line.
        write (Callable[[str], None]): takes one line without its newline. Default: stderr.
        clock (Callable[[], float]): seconds, monotonic. Default: ``time.monotonic``.
        interval (float): at most this many seconds between lines while progress is reported. Default: 5.
        min_gap (float): never two lines closer than this (capped at ``interval``). Default: 1.
        step (float): also a line each time this share of the total is passed. Default: 0.1.
    """

    def __init__(self, label: str, write: Callable[[str], None] = write_stderr,
                 clock: Callable[[], float] = time.monotonic, interval: float = DEFAULT_INTERVAL,
                 min_gap: float = MIN_GAP, step: float = STEP):
        self.label, self.write, self.clock = label, write, clock
        self.interval, self.min_gap = interval, min(min_gap, interval)
        self.steps = max(1, round(1 / step)) if step > 0 else 0  # in integers: 0.3 / 0.1 is 2.9999…
        self.total = 0
        self.done = 0
        self.started_at: float | None = None
        self.last_line_at = 0.0
        self.last_step = 0
        self.lock = threading.Lock()

    def start(self, n_items: int, n_bytes: int) -> None:
        """The work's size is known (no line yet: a run that fails in its first second prints only its error)."""
        with self.lock:
            self.total = int(n_bytes or 0)
            self.started_at = self.last_line_at = self.clock()

    def advance(self, n: int) -> None:
        """``n`` more bytes done; a line if the interval has passed or another step was crossed."""
        with self.lock:
            now = self.clock()
            if self.started_at is None:
                self.started_at = self.last_line_at = now
            self.done += int(n)
            since = now - self.last_line_at
            if self.total and self.done >= self.total:
                return  # the last line is finish()'s
            step = self.done * self.steps // self.total if self.total else 0
            if since >= self.interval or (step > self.last_step and since >= self.min_gap):
                self.last_step = max(step, self.last_step)
                self.last_line_at = now
                self.write(self.line(now))

    def finish(self) -> None:
        """The work is done: the line at 100 % (nothing if the work never started, as in a dry run)."""
        with self.lock:
            if self.started_at is None:
                return
            self.total = self.done or self.total
            self.write(self.line(self.clock(), final=True))

    def line(self, now: float, final: bool = False) -> str:
        """``Writing: 42% 640.0 MiB of 1.5 GiB, 85.3 MiB/s, ETA 10s``."""
        elapsed = now - (self.started_at if self.started_at is not None else now)
        rate = self.done / elapsed if elapsed > 0 else None
        if self.total:
            percent = 100 if final else min(self.done * 100 // self.total, 99)  # floored: 100 % is the last line's
            what = f"{percent}% {human_bytes(self.done)} of {human_bytes(self.total)}"
        else:
            what = f"{human_bytes(self.done)}"
        speed = f"{human_bytes(rate)}/s" if rate is not None else "-/s"
        if final:
            eta = "ETA 0.0s"
        elif rate and self.total:
            eta = f"ETA {human_duration(max(self.total - self.done, 0) / rate)}"
        else:
            eta = "ETA -"
        tail = f", done in {human_duration(elapsed)}" if final else ""
        return f"{self.label}: {what}, {speed}, {eta}{tail}"

"""What the user sees while the pipeline runs: stage headers, one live progress line per stage, the
verdict and the summary. Everything else — Ray's and Tune's own output, worker prints, C++ log lines,
warnings of libraries — goes to a log file whose path is printed (``--verbose`` shows it all).

The quiet mode redirects the process's file descriptors 1 and 2 into the log file, so output written
by any thread, native code or library lands there; the console keeps a duplicate of the original
stdout. On a terminal a progress line is redrawn in place; elsewhere (``ray job logs``, CI, a pipe) it
is printed at most every ``interval_s`` and once at the end, so logs stay short.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Console:
    """The user's console. ``quiet`` sends everything but this object's own lines to ``log_path``."""

    def __init__(
        self,
        log_path: str | None = None,
        verbose: bool = False,
        stream: TextIO | None = None,
        interval_s: float = 60.0,
        clock=time.time,
    ):
        self.log_path, self.verbose, self.interval_s, self.clock = log_path, verbose, interval_s, clock
        self._stream = stream or sys.stdout
        self._saved_fds: tuple[int, int] | None = None
        self._log: TextIO | None = None
        self._lock = threading.Lock()
        self._live: ProgressLine | None = None  # the line being redrawn in place (terminal only)

    # ---- redirection ----------------------------------------------------------------------------
    def __enter__(self) -> Console:
        if self.log_path:
            os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
            self._log = open(self.log_path, "a", buffering=1)
        if self.log_path and not self.verbose:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved_fds = (os.dup(1), os.dup(2))
            self._stream = os.fdopen(os.dup(self._saved_fds[0]), "w", buffering=1)
            os.dup2(self._log.fileno(), 1)
            os.dup2(self._log.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        self.end_live()
        with self._lock:  # a late line from another thread lands before or after, never on a closed file
            if self._saved_fds is not None:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(self._saved_fds[0], 1)
                os.dup2(self._saved_fds[1], 2)
                for fd in self._saved_fds:
                    os.close(fd)
                self._saved_fds = None
                self._stream.close()
                self._stream = sys.stdout
            if self._log is not None:
                self._log.close()
                self._log = None

    @property
    def interactive(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())

    # ---- lines ----------------------------------------------------------------------------------
    def _to_log(self, text: str) -> None:
        if self._log is not None and not self._log.closed:
            self._log.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")

    def _write(self, text: str) -> None:
        with self._lock:
            if self._live is not None and self.interactive:
                self._stream.write("\r\033[K")  # the next line replaces the live one, which is redrawn below
            self._stream.write(text + "\n")
            if self._live is not None and self.interactive:
                self._stream.write(self._live.text())
            self._stream.flush()
            self._to_log(text)  # the log file holds the console's lines too

    def info(self, text: str) -> None:
        """A line for the user."""
        self._write(text)

    def __call__(self, text: str) -> None:  # usable wherever a ``log`` callable is expected
        self.info(text)

    def stage(self, title: str) -> None:
        self._write(f"== {title}")

    def detail(self, text: str) -> None:
        """A line for the log file (and the console with --verbose)."""
        if self.verbose:
            self._write(text)
        else:
            with self._lock:
                self._to_log(text)

    def note(self, text: str) -> None:
        """A library's message: warnings for the user, the rest for the log."""
        (self.info if text.startswith("warning:") else self.detail)(text)

    def progress(self, name: str, total: float, unit: str = "tok") -> ProgressLine:
        return ProgressLine(self, name, total, unit)

    def end_live(self) -> None:
        with self._lock:
            if self._live is not None and self.interactive:
                self._stream.write("\n")
                self._stream.flush()
            self._live = None


class ProgressLine:
    """``name  42% 82.0k/196.6k tok  1.2k tok/s  loss 6.123  ETA 1:05  world 2`` — redrawn in place on a
    terminal, else printed every ``interval_s`` and once when done."""

    def __init__(self, console: Console, name: str, total: float, unit: str):
        self.console, self.name, self.total, self.unit = console, name, max(float(total), 1.0), unit
        self.done, self.rate, self.loss, self.world, self.note = 0.0, None, None, None, ""
        self.started = console.clock()
        self._last_print = self.started
        self._first: tuple[float, float] | None = None  # (time, done) of the first update
        self._last_update = self.started
        self._closed = False

    def text(self) -> str:
        frac = min(self.done / self.total, 1.0)
        parts = [f"{self.name:<9} {frac:4.0%} {fmt_count(self.done)}/{fmt_count(self.total)} {self.unit}"]
        rate = self.rate or self._average_rate()
        if rate:
            parts.append(f"{fmt_count(rate)} {self.unit}/s")
            if frac < 1:
                parts.append(f"ETA {fmt_duration((self.total - self.done) / rate)}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.world:
            parts.append(f"world {self.world}")
        if frac >= 1:
            parts.append(f"in {fmt_duration(self._last_update - self.started)}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _average_rate(self) -> float | None:
        """Tokens per second since the first update: steadier than a per-interval rate, which swings
        with evaluations and checkpoints."""
        if self._first is None:
            return None
        t0, d0 = self._first
        dt = self._last_update - t0
        return (self.done - d0) / dt if dt > 0.5 and self.done > d0 else None

    def update(
        self,
        done: float,
        *,
        rate: float | None = None,
        loss: float | None = None,
        world: int | None = None,
        note: str | None = None,
    ) -> None:
        if self._closed:
            return
        now = self.console.clock()
        if self._first is None:
            self._first = (now, float(done))
        if float(done) > self.done or self._last_update == self.started:  # progress, not a repeated poll
            self._last_update = now
        self.done = max(self.done, float(done))
        self.rate = rate if rate else self.rate
        self.loss = loss if loss is not None else self.loss
        self.world = world or self.world
        self.note = note if note is not None else self.note
        c = self.console
        if c.interactive:
            with c._lock:
                c._live = self
                c._stream.write("\r\033[K" + self.text())
                c._stream.flush()
        elif now - self._last_print >= c.interval_s and self.done < self.total:
            self._last_print = now
            c._write(self.text())

    def close(self, note: str | None = None) -> None:
        """The final line (printed once, also when the stage ends short of its total)."""
        if self._closed:
            return
        if note is not None:
            self.note = note
        c = self.console
        if c.interactive:
            with c._lock:
                c._stream.write("\r\033[K")
                c._live = None
        self._closed = True
        c._write(self.text())

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.close(note="(stopped)")

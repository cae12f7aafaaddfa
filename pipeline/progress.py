"""Progress a person can read while a step runs, and the run's log file.

``StepProgress`` follows one step's worker tasks (``run_shards``, ``run_calls``): tasks done of total,
rows done, rows/s, elapsed and an ETA from the rate so far. On a terminal it draws a live tqdm bar; on
anything else (CI, a file, ``ray job submit``) it writes one plain line at about every tenth of the
tasks and at the end, so a step of 10,000 shards leaves about ten lines in a log rather than 10,000.
The plain lines also go to ``RunLog``, ``<run>/run.log``, which the driver alone appends to: one header
per invocation, each step's start and result, these lines, and a failure's pointer to ``_error.json``.
"""
from __future__ import annotations

import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

LOG_FILE = "run.log"
# plain lines per step: at each tenth of its tasks (fewer when it has fewer tasks than that)
PLAIN_LINES = 10


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def clock(seconds: float) -> str:
    """``h:mm:ss``: long steps run for hours, and a bare count of seconds is hard to read at a glance."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLog:
    """Appends time-stamped lines to a run's log file; ``RunLog(None)`` writes nothing (benchmarks,
    direct calls of the executor). The file is opened per line: a killed driver loses no line that was
    written, and the lines are few (a handful per step)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, line: str) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{_now()} {line}\n")
        except OSError as e:  # a log that cannot be written must never stop the run it describes
            print(f"warning: could not write {self.path}: {e}", file=sys.stderr)
            self.path = None


class StepProgress:
    """Counts a step's finished tasks and rows and reports them (see the module docstring).

    ``live`` defaults to whether ``stream`` is a terminal; ``clock_fn`` is injectable so a test can drive
    the object without waiting."""

    def __init__(self, step: str, total: int, what: str = "shard", stream: TextIO | None = None,
                 live: bool | None = None, log: RunLog | None = None,
                 clock_fn: Callable[[], float] = time.monotonic):
        self.step, self.total, self.what = step, total, what
        self.stream = stream if stream is not None else sys.stderr
        self.log = log or RunLog(None)
        self._clock = clock_fn
        self.t0 = clock_fn()
        self.done = 0
        self.rows: int | None = None  # None while no task reported rows (calls return other things)
        self.marks = sorted({math.ceil(total * k / PLAIN_LINES) for k in range(1, PLAIN_LINES + 1)})
        self._next_mark = 0
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = self._bar() if (is_tty if live is None else live) and total > 0 else None

    def _bar(self):
        from tqdm import tqdm

        return tqdm(total=self.total, desc=f"  [{self.step}] {self.what}s", unit=self.what, file=self.stream,
                    dynamic_ncols=True, leave=True)

    def update(self, rows: int | None = None) -> None:
        """One task finished, with the rows it wrote (None where a task has no rows)."""
        self.done += 1
        if rows is not None:
            self.rows = (self.rows or 0) + rows
        if self.bar is not None:
            if self.rows is not None:
                self.bar.set_postfix_str(f"{self.rows} rows, {self._rate():.0f} rows/s", refresh=False)
            self.bar.update(1)
        if self._next_mark < len(self.marks) and self.done >= self.marks[self._next_mark]:
            while self._next_mark < len(self.marks) and self.done >= self.marks[self._next_mark]:
                self._next_mark += 1
            self._emit(self.line())

    def _elapsed(self) -> float:
        return max(self._clock() - self.t0, 0.0)

    def _rate(self) -> float:
        elapsed = self._elapsed()
        return (self.rows or 0) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The plain progress line as it stands now."""
        elapsed = self._elapsed()
        pct = 100 * self.done // self.total if self.total else 100
        parts = [f"  [{self.step}] {self.what}s {self.done}/{self.total} ({pct}%)"]
        rest = []
        if self.rows is not None:
            rest += [f"{self.rows:,} rows", f"{self._rate():,.0f} rows/s"]
        rest.append(f"elapsed {clock(elapsed)}")
        if self.done < self.total:
            rest.append(f"ETA {clock(elapsed * (self.total - self.done) / self.done)}" if self.done else "ETA ?")
        return parts[0] + ": " + ", ".join(rest)

    def _emit(self, line: str) -> None:
        self.log.write(line.strip())
        if self.bar is None:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

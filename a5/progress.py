"""Progress and messages: a bar on a terminal, periodic plain lines in a log file; number formatting.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from tqdm import tqdm


# ======================================================================================
# Progress and messages: a bar on a terminal, periodic plain lines in a log file
# ======================================================================================

# Set by `main()`: messages then name command-line flags ("--no-amp") instead of Python
# arguments ("amp=False").
_CLI_ACTIVE = [False]


def _arg_name(python: str, flag: str) -> str:
    """`flag` when the command line is running, else the Python spelling `python`."""
    return flag if _CLI_ACTIVE[0] else python


# Python spellings in messages of fcos.py / two_stage_detector.py -> command-line flags.
_PYTHON_TO_FLAG = {"pretrained=False": "--no-pretrained", "backbone='mobilenet_v2'": "--backbone mobilenet_v2",
                   "freeze_backbone=True": "--frozen-backbone", "amp=False": "--no-amp"}


def _with_flags(err: Exception) -> Exception:
    """The same error, its message naming command-line flags instead of Python arguments."""
    text = str(err)
    for python, flag in _PYTHON_TO_FLAG.items():
        text = text.replace(python, flag)
    if text == str(err):
        return err
    new = type(err)(text) if isinstance(err, (RuntimeError, ValueError)) else RuntimeError(text)
    new.__cause__ = err
    return new


def plural(count: int, word: str, plural_form: Optional[str] = None) -> str:
    """`"1 detection"`, `"2 detections"` (`plural_form` for irregular words)."""
    return f"{count} {word if count == 1 else (plural_form or word + 's')}"


def format_bytes(size: float) -> str:
    """ "512 B", "3.4 MB", "1.9 GB" (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 999.5 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2g} {unit}" if size < 10 else f"{size:.0f} {unit}"
        size /= 1000.0
    return f"{size} TB"  # unreachable


def format_duration(seconds: float) -> str:
    """Short human duration: "45 s", "3.2 min", "1 h 05 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes:02d} min"


def _format_rate(rate: float, unit: str) -> str:
    if rate <= 0 or not math.isfinite(rate):
        return f"? {unit}/s"
    if rate >= 1:
        return f"{rate:.3g} {unit}/s"
    return f"{1 / rate:.3g} s/{unit}"


def _format_stat(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def machine_load() -> Optional[Tuple[float, int]]:
    """`(1-minute load average, number of CPUs)`, or None where the OS has no load average."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def _in_jupyter() -> bool:
    """True inside a Jupyter kernel (not merely when ipykernel is importable or imported)."""
    if "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except AttributeError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _use_bar() -> bool:
    """A progress bar only where carriage returns redraw in place: a terminal or Jupyter."""
    if _in_jupyter():
        return True
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_mode(progress: Union[bool, str], when_false: str = "off") -> str:
    """`progress` argument of the long functions -> "auto" | "bar" | "lines" | "off"."""
    if progress is True:
        return "auto"
    if progress is False or progress is None:
        return when_false
    if progress not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"progress must be True, False, 'auto', 'bar', 'lines' or 'off', not {progress!r}")
    return progress


class ProgressReporter:
    """Progress of one long phase (cache build, training, evaluation).

    On a terminal (or in Jupyter) it is a tqdm bar. Otherwise (output to a log file, or
    `mode="lines"`) it prints a plain line now and then, which `less` and `grep` read:

        train: iter 500/3500 (14%), loss 1.12, 9.8 it/s, ETA 5.1 min

    A line comes after at least `every` steps and `min_seconds` seconds (default
    `$A5_PROGRESS_SECONDS`, else 10) since the previous one, and at the first step;
    `close()` prints the phase's total time. Once the speed is known (after
    `announce_after` seconds) one line says how long the rest should take. When the speed
    drops, or the machine is busy (1-minute load average above the number of CPUs, see
    `machine_load`), the lines say so: that is the usual reason for a sudden long ETA.

    Args:
        total: number of steps of the phase (iterations, images).
        desc: the phase's name, the start of every line.
        count_format: how the count reads, with `{n}` and `{total}`, e.g. "iter {n}/{total}"
            or "{n}/{total} images".
        unit: the unit of the speed ("it" -> "9.8 it/s", below 1/s "1.6 s/it").
        noun: what a step is, for the expected-time line ("iteration", "image").
        mode: "auto" (bar on a terminal, else lines), "bar", "lines" or "off".
        initial: steps already done (a resumed run).
        clock, load: injectable time source and `machine_load` replacement (tests).
    """

    def __init__(self, total: int, desc: str, *, count_format: str = "{n}/{total}", unit: str = "it",
                 noun: str = "step", mode: str = "auto", initial: int = 0, every: int = 1,
                 min_seconds: Optional[float] = None,
                 announce_after: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 load: Callable[[], Optional[Tuple[float, int]]] = machine_load, stream: Optional[Any] = None):
        if mode == "auto":
            mode = "bar" if _use_bar() else "lines"
        self.mode, self.total, self.desc, self.unit = mode, int(total), desc, unit
        self.count_format, self.noun, self.every = count_format, noun, max(1, int(every))
        if min_seconds is None:
            min_seconds = float(os.environ.get("A5_PROGRESS_SECONDS", 10))
        self.min_seconds, self.announce_after = min_seconds, announce_after
        self.clock, self.load, self.stream = clock, load, stream
        self.initial = self.n = int(initial)
        self.stats: Dict[str, Any] = {}
        self.start = clock()
        self.samples: List[Tuple[float, int]] = []  # (time, n) after each update, for the recent speed
        self.last_line: Optional[Tuple[float, int]] = None
        self.best_rate = 0.0
        self.announced = False
        self.busy_noted = False
        self.closed = False
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, dynamic_ncols=True, unit=unit)

    # -- output -------------------------------------------------------------------------
    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=self.stream or sys.stdout, flush=True)

    # -- speed --------------------------------------------------------------------------
    def rate(self, window: float = 60.0) -> float:
        """Steps per second over the last `window` seconds (the first step, which pays
        for warm-up, is left out); 0.0 while unknown."""
        if len(self.samples) < 2:
            return 0.0
        t_now, n_now = self.samples[-1]
        old = next(((t, n) for t, n in self.samples if t_now - t <= window), self.samples[0])
        if old == self.samples[-1]:
            old = self.samples[-2]
        dt = t_now - old[0]
        return (n_now - old[1]) / dt if dt > 0 else 0.0

    def eta(self) -> Optional[float]:
        rate = self.rate()
        return (self.total - self.n) / rate if rate > 0 else None

    def slowdown_note(self) -> str:
        """Why it is slow, when that can be told: "" on an idle machine at full speed."""
        rate = self.rate()
        slowed = self.best_rate > 0 and 0 < rate < 0.6 * self.best_rate
        load = self.load() if self.load is not None else None
        busy = load is not None and load[0] > load[1]
        parts = []
        if slowed:
            parts.append(f"slower than the earlier {_format_rate(self.best_rate, self.unit)}")
        if busy:
            parts.append(f"machine busy: load average {load[0]:.1f} on {plural(load[1], 'CPU')}")
        return "; ".join(parts)

    # -- steps --------------------------------------------------------------------------
    def set_stats(self, **stats: Any) -> None:
        """Values shown with the progress, e.g. `loss=1.12`."""
        self.stats.update(stats)
        if self.bar is not None:
            self.bar.set_postfix({k: _format_stat(v) for k, v in self.stats.items()}, refresh=False)

    def line(self) -> str:
        """The plain progress line for the current state."""
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: " + self.count_format.format(n=self.n, total=self.total) + f" ({pct:.0f}%)"]
        parts += [f"{k} {_format_stat(v)}" for k, v in self.stats.items()]
        rate = self.rate()
        if rate > 0:
            parts.append(_format_rate(rate, self.unit))
            eta = self.eta()
            if eta is not None and self.n < self.total:
                parts.append(f"ETA {format_duration(eta)}")
        note = self.slowdown_note()
        return ", ".join(parts) + (f" ({note})" if note else "")

    def update(self, n: int = 1, **stats: Any) -> None:
        if stats:
            self.set_stats(**stats)
        self.n += n
        now = self.clock()
        self.samples.append((now, self.n))
        while len(self.samples) > 2 and now - self.samples[1][0] > 120.0:
            self.samples.pop(0)
        if self.bar is not None:
            self.bar.update(n)
        if self.mode == "off":
            return
        first = self.last_line is None
        due = (not first and self.n - self.last_line[1] >= self.every
               and now - self.last_line[0] >= self.min_seconds and self.n < self.total)
        if due or (first and self.n < self.total):
            rate = self.rate()
            if self.mode == "lines":
                self.write(self.line())
            elif not self.busy_noted:  # the bar shows the speed; say once why it is slow
                note = self.slowdown_note()
                if "busy" in note:
                    self.write(f"{self.desc}: {note}; it will run slower than on an idle machine")
                    self.busy_noted = True
            self.best_rate = max(self.best_rate, rate)
            self.last_line = (now, self.n)
        if (not self.announced and self.n < self.total and now - self.start >= self.announce_after
                and len(self.samples) >= 3):
            self.announced = True
            eta = self.eta()
            if eta is not None:
                finish = time.strftime("%H:%M", time.localtime(time.time() + eta))
                self.write(f"{self.desc}: {_format_rate(self.rate(), self.unit)}, so the remaining "
                           f"{plural(self.total - self.n, self.noun)} should take about {format_duration(eta)} "
                           f"(until about {finish})")

    def close(self) -> float:
        """End the phase; prints (lines mode) and returns its duration in seconds."""
        if self.closed:
            return self.clock() - self.start
        self.closed = True
        seconds = self.clock() - self.start
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            done = self.n - self.initial
            speed = f", {_format_rate(done / seconds, self.unit)}" if seconds > 0 and done > 0 else ""
            stats = "".join(f", {k} {_format_stat(v)}" for k, v in self.stats.items())
            state = "done in" if self.n >= self.total else "stopped after"
            self.write(f"{self.desc}: " + self.count_format.format(n=self.n, total=self.total)
                       + f" {state} {format_duration(seconds)}{speed}{stats}")
        return seconds

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None and not self.closed:
            self.bar.close()
            self.closed = True

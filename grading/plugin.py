"""The pytest plugin that grades one test file of one submission (``-p grading.plugin``).

``tools/grade.py`` runs every test file in its own pytest process with this plugin. The
plugin

* keeps only the tests of the requested student parts (``--a5-parts``; tests marked
  ``part("provided")`` or unmarked only with ``--a5-provided``);
* streams one JSON line per event to ``--a5-events`` (``collected``, ``collect_error``,
  ``start``, ``result``, ``finished``), flushed at once, so that grade.py knows what was
  done even if the process is killed or crashes in the middle of a test;
* enforces the per-test time limit ``--a5-timeout`` (setup + call + teardown): SIGALRM
  raises :class:`TimeLimitExceeded` in the test (not an ``Exception``, so a student's
  ``except Exception`` cannot swallow it); a watchdog thread records the test and ends
  the process when the test is stuck in native code past the limit plus a grace period;
  the remaining tests of a part that ran out of time are not run;
* makes the forbidden names of the part under test (``grading/points.toml``) raise
  :class:`ForbiddenCall` when called directly from the submission's student code (a
  function of a student module that is not provided code of the reference); the test is
  reported as ``forbidden`` with the name, even if the student code caught the error.

Outcomes: passed, failed, not_implemented, skipped, timeout, forbidden.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


class TimeLimitExceeded(BaseException):
    """A test ran past its time limit (BaseException: ``except Exception`` won't catch it)."""


class ForbiddenCall(RuntimeError):
    """Student code called a library function that its part must implement."""


# --------------------------------------------------------------------------------------
# Event stream
# --------------------------------------------------------------------------------------


class _Events:
    def __init__(self, path: Optional[str]):
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1) if path else None

    def write(self, event: str, timeout: float = -1, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"event": event, **fields}) + "\n"
        if self._lock.acquire(timeout=timeout):
            try:
                self._file.write(line)
                self._file.flush()
            finally:
                self._lock.release()


def _part_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("part")
    if marker and marker.args:
        return str(marker.args[0])
    if item.path.suffix == ".ipynb":
        return f"notebook:{item.path.name}"
    return "provided"


def _short(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2:]


# --------------------------------------------------------------------------------------
# Forbidden calls
# --------------------------------------------------------------------------------------


class _Forbidden:
    """Wraps the forbidden names once per process; a wrapper raises only while a test of
    a part that forbids the name runs, and only for calls from student code."""

    def __init__(self, by_part: Dict[str, List[str]], student_files: Dict[str, frozenset]):
        self.by_part = {part: list(dict.fromkeys(names)) for part, names in by_part.items()}
        self.student_files = student_files  # realpath -> provided qualnames
        self.active: List[str] = []
        self.part: Optional[str] = None
        self.violations: List[str] = []
        self.installed: List[str] = []
        every = [name for names in self.by_part.values() for name in names]
        for name in dict.fromkeys(every):
            if self._install(name):
                self.installed.append(name)

    # -- who is calling ----------------------------------------------------------------
    def _student_caller(self, frame) -> bool:
        if frame is None:
            return False
        provided = self.student_files.get(os.path.realpath(frame.f_code.co_filename))
        if provided is None:
            return False
        qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        return qualname.split(".<locals>.")[0] not in provided and qualname not in provided

    def _check(self, names: Set[str], frame) -> None:
        """Raise if the part under test forbids one of ``names`` (the names of one wrapped
        object) and the caller is student code; report the part's first such name."""
        hits = [name for name in self.active if name in names]
        if hits and self._student_caller(frame):
            self.violations.append(hits[0])
            raise ForbiddenCall(f"part {self.part!r} uses forbidden {hits[0]}: implement it yourself")

    # -- installing ------------------------------------------------------------------
    @staticmethod
    def _resolve(name: str):
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except Exception:  # no such module (e.g. a5.kernels before it exists)
                continue
            owner = obj
            try:
                for attr in parts[split:]:
                    owner, obj = obj, getattr(obj, attr)
            except AttributeError:
                return None
            return owner, parts[-1], obj
        return None

    def _install(self, name: str) -> bool:
        resolved = self._resolve(name)
        if resolved is None:
            return False
        owner, attr, original = resolved
        check = self._check
        if isinstance(original, type):
            init = original.__init__
            if getattr(init, "_a5_forbidden", None) is not None:
                init._a5_forbidden.add(name)
                return True
            names = {name}

            @functools.wraps(init)
            def guarded_init(self, *args, **kwargs):
                check(names, sys._getframe(1))
                return init(self, *args, **kwargs)

            guarded_init._a5_forbidden = names
            original.__init__ = guarded_init
            return True
        if not callable(original):
            return False
        if getattr(original, "_a5_forbidden", None) is not None:
            original._a5_forbidden.add(name)
            return True
        names = {name}

        def guarded(*args, **kwargs):
            check(names, sys._getframe(1))
            return original(*args, **kwargs)

        try:
            functools.update_wrapper(guarded, original)
        except Exception:
            pass
        guarded._a5_forbidden = names
        guarded.__wrapped__ = original
        try:
            setattr(owner, attr, guarded)
        except Exception:
            return False
        # Re-bind every module-level alias (``from torchvision.ops import nms`` done before).
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                if value is original:
                    namespace[key] = guarded
        return True

    def begin(self, part: str) -> None:
        self.part = part
        self.active = self.by_part.get(part, [])
        self.violations = []

    def end(self) -> None:
        self.part = None
        self.active = []


# --------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------


class GradingPlugin:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.events = _Events(config.getoption("a5_events"))
        parts = config.getoption("a5_parts")
        self.parts = {p for p in parts.split(",") if p} if parts else None
        self.provided = config.getoption("a5_provided")
        self.timeout = float(config.getoption("a5_timeout") or 0)
        self.grace = max(10.0, 0.5 * self.timeout)
        self.outcome: Dict[str, Dict[str, Any]] = {}
        self.timed_out_parts: Set[str] = set()
        self.current: Optional[pytest.Item] = None
        self.deadline: Optional[float] = None
        self.forbidden: Optional[_Forbidden] = None
        self._setup_forbidden(config.getoption("a5_config"))
        if self.timeout > 0 and hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._on_alarm)
            threading.Thread(target=self._watchdog, name="a5-watchdog", daemon=True).start()

    # -- configuration ---------------------------------------------------------------
    def _setup_forbidden(self, config_path: Optional[str]) -> None:
        submission = os.environ.get("A5_SUBMISSION")
        if not config_path or not submission:
            return
        sys.path.insert(0, str(REPO_ROOT))
        try:
            from grading.config import load_config, provided_functions
        finally:
            sys.path.remove(str(REPO_ROOT))
        cfg = load_config(Path(config_path), REPO_ROOT, check_parts=False)
        student_files = {}
        for module in cfg.student_modules:
            student_files[os.path.realpath(Path(submission) / module)] = provided_functions(REPO_ROOT / module)
        by_part = {name: list(part.forbidden) for name, part in cfg.parts.items() if part.forbidden}
        self.forbidden = _Forbidden(by_part, student_files)

    # -- collection ------------------------------------------------------------------
    def _wanted(self, part: str) -> bool:
        if part.startswith("notebook:"):
            return True
        if part == "provided":
            return self.provided
        return self.parts is None or part in self.parts

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            (keep if self._wanted(_part_of(item)) else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        for item in items:
            self.events.write("collected", nodeid=item.nodeid, part=_part_of(item), **self._cell_info(item))

    @staticmethod
    def _cell_info(item: pytest.Item) -> Dict[str, Any]:
        cell = getattr(item, "cell", None)
        if cell is None:
            return {}
        source = cell.get("source", "") if isinstance(cell, dict) else getattr(cell, "source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        return {"checked": "NBVAL_CHECK_OUTPUT" in source}

    def pytest_collectreport(self, report):
        if report.failed:
            self.events.write("collect_error", nodeid=report.nodeid, message=_short(str(report.longrepr), 4000))

    # -- time limit ------------------------------------------------------------------
    def _on_alarm(self, signum, frame):
        if self.current is not None:
            raise TimeLimitExceeded(f"time limit exceeded ({self.timeout:g} s per test)")

    def _arm(self) -> None:
        if self.deadline is None or not hasattr(signal, "setitimer"):
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeLimitExceeded(f"time limit exceeded ({self.timeout:g} s per test)")
        signal.setitimer(signal.ITIMER_REAL, remaining, 1.0)

    @staticmethod
    def _disarm() -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _watchdog(self) -> None:
        while True:
            time.sleep(0.5)
            item, deadline = self.current, self.deadline
            if item is None or deadline is None or time.monotonic() < deadline + self.grace:
                continue
            # Stuck where SIGALRM cannot interrupt (native code): record it and end the
            # process; grade.py runs the remaining tests in a new one.
            self.events.write("result", timeout=5, nodeid=item.nodeid, part=_part_of(item), outcome="timeout",
                              message=f"time limit exceeded ({self.timeout:g} s per test; the test did not stop "
                                      f"and its process was ended)", duration=time.monotonic() - deadline + self.timeout)
            os._exit(75)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        self._arm()
        try:
            part = _part_of(item)
            if part in self.timed_out_parts:
                raise TimeLimitExceeded(f"not run: an earlier test of part {part!r} exceeded the time limit")
            return (yield)
        finally:
            self._disarm()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        self._arm()
        try:
            return (yield)
        finally:
            self._disarm()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        self._arm()
        try:
            return (yield)
        finally:
            self._disarm()

    # -- per test --------------------------------------------------------------------
    def pytest_runtest_logstart(self, nodeid, location):
        self.events.write("start", nodeid=nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item
        self.deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        self.started = time.monotonic()
        if self.forbidden is not None:
            self.forbidden.begin(_part_of(item))
        self.outcome[item.nodeid] = {"outcome": "passed", "message": ""}
        return None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        record = self.outcome.setdefault(item.nodeid, {"outcome": "passed", "message": ""})
        if record["outcome"] != "passed":
            return report  # the first phase that did not pass decides
        excinfo = call.excinfo
        if report.skipped and call.when != "teardown":
            record["outcome"] = "skipped"
            longrepr = report.longrepr
            record["message"] = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        elif report.failed:
            if self.forbidden is not None and self.forbidden.violations:
                record["outcome"] = "forbidden"
                record["message"] = f"uses forbidden {self.forbidden.violations[0]}"
            elif excinfo is not None and excinfo.errisinstance(TimeLimitExceeded):
                record["outcome"] = "timeout"
                record["message"] = str(excinfo.value)
                self.timed_out_parts.add(_part_of(item))
            elif excinfo is not None and excinfo.errisinstance(NotImplementedError):
                record["outcome"] = "not_implemented"
                record["message"] = _short(excinfo.exconly(), 300)
            else:
                record["outcome"] = "failed"
                record["message"] = self._failure_message(report, excinfo)
        elif self.forbidden is not None and self.forbidden.violations:
            # The student code caught the ForbiddenCall and carried on: still forbidden.
            record["outcome"] = "forbidden"
            record["message"] = f"uses forbidden {self.forbidden.violations[0]}"
        return report

    @staticmethod
    def _failure_message(report, excinfo) -> str:
        if excinfo is None:
            return _short(getattr(report, "longreprtext", "") or "failed")
        where = ""
        try:
            entry = excinfo.traceback[-1]
            where = f" ({Path(str(entry.path)).name}:{entry.lineno + 1})"
        except Exception:
            pass
        return _short(excinfo.exconly()) + where

    def pytest_runtest_logfinish(self, nodeid, location):
        item = self.current
        record = self.outcome.get(nodeid, {"outcome": "failed", "message": "no report"})
        self.events.write("result", nodeid=nodeid, part=_part_of(item) if item is not None else "",
                          outcome=record["outcome"], message=record["message"],
                          duration=round(time.monotonic() - getattr(self, "started", time.monotonic()), 3))
        self.current = None
        self.deadline = None
        if self.forbidden is not None:
            self.forbidden.end()

    def pytest_sessionfinish(self, session, exitstatus):
        self.events.write("finished", exitstatus=int(exitstatus))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("a5-grading", "grading (tools/grade.py)")
    group.addoption("--a5-events", default=None, help="append one JSON line per grading event to this file")
    group.addoption("--a5-parts", default=None, help="comma-separated student parts to run (default: all)")
    group.addoption("--a5-provided", action="store_true", help="also run the tests of provided code")
    group.addoption("--a5-timeout", type=float, default=0.0, help="seconds per test (0: no limit)")
    group.addoption("--a5-config", default=None, help="grading/points.toml: forbidden names per part")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(GradingPlugin(config), "a5-grading")

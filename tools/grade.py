#!/usr/bin/env python3
"""Grade a checkout of the assignment, or a folder of them (a class).

Usage::

    python tools/grade.py CHECKOUT [--json grade.json] [--gradescope results.json]
                          [--parts nms,iou] [--timeout 60] [--submission-timeout 1200]
                          [--notebooks [NOTEBOOK ...]] [--provided]
    python tools/grade.py --batch SUBMISSIONS_DIR --csv class.csv [--json-dir DIR] [...]

For every student part (``# BEGIN SOLUTION (part)`` regions of the reference; points in
``grading/points.toml``) it runs this repository's public tests (``tests/test_*.py``, the
ones the release ships) and hidden tests (``tests/hidden/test_*.py``, never shipped)
with the submission's ``fcos.py`` and ``two_stage_detector.py``, and prints one row per
part: points, public and hidden tests passed, and a status (``ok``, ``wrong``, ``not
implemented``, ``time limit exceeded``, ``uses forbidden NAME``, ``error: ...``).

How a submission is graded:

* on temporary copies: the submission's student modules (the provided modules and
  packages always come from this reference), and this grader's tests, configuration and
  reference modules, so that nothing the student code does can change the grader's files;
* in pytest processes of their own (``grading/plugin.py`` streams one event per test):
  a test file that cannot be collected (syntax or import error, ``sys.exit`` at import)
  costs only its own tests; a process that dies in a test (``os._exit``, a segfault) has
  that test failed with the reason and the remaining tests run in a new process. A
  module that does not import is replaced by the reference where a file grades other
  modules' parts (e.g. the two-stage parts with our own ``fcos.py`` as plumbing);
* a time limit per test (``--timeout``) and per submission (``--submission-timeout``);
  a test over the limit fails as "time limit exceeded" and grading goes on;
* forbidden calls: while a part's tests run, the library functions that the part must
  implement (``forbidden`` in points.toml) raise when the student code calls them; the
  part scores 0 and reads "uses forbidden NAME".

The table is always printed and the files always written, whatever the submission does.
Exit status: 0 when grading ran (whatever the score), 2 for a usage or configuration error.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from grading.config import CONFIG_PATH, Config, ConfigError, load_config  # noqa: E402

PUBLIC_GLOB = ("tests", "test_*.py")
HIDDEN_GLOB = ("tests/hidden", "test_*.py")
PART_RE = re.compile(r"""mark\.part\(\s*["']([\w.-]+)["']\s*\)""")
# Not copied into the grader's temporary copy (nor into the Gradescope bundle).
_TOP_LEVEL_IGNORE = {".git", ".venv", "venv", "runs", "data", "cache", "release", ".whl", ".gl", "docs", ".ci"}
_EVERYWHERE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ipynb_checkpoints", "*.pt",
                                            "*.pth", "*.zip")


def _GRADER_IGNORE(directory: str, names: List[str]) -> set:
    """copytree ``ignore`` for the grader's copy: instructor-only tests, VCS, environments,
    runs, data and checkpoints."""
    ignored = set(_EVERYWHERE_IGNORE(directory, names))
    here = Path(directory).resolve()
    if here == REPO_ROOT:
        ignored |= _TOP_LEVEL_IGNORE & set(names)
    if here == REPO_ROOT / "tests":
        ignored |= {"instructor"} & set(names)
    return ignored


OUTCOMES = ("passed", "failed", "not_implemented", "skipped", "timeout", "forbidden", "error")


def _default_env() -> Dict[str, str]:
    """Environment of the graded processes: offline data and weights as absolute paths
    (the repository's defaults: ../shared next to it), quick notebooks, no windows."""
    shared = REPO_ROOT.parent / "shared"
    env = dict(os.environ)
    env.pop("A5_SUBMISSION", None)
    env["VOC_ROOT"] = str(Path(env.get("VOC_ROOT", shared / "data")).resolve())
    env["TORCH_HOME"] = str(Path(env.get("TORCH_HOME", shared / "weights")).resolve())
    env.setdefault("QUICK", "1")
    env["MPLBACKEND"] = env.get("MPLBACKEND", "Agg")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    return env


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class TestResult:
    nodeid: str
    part: str
    kind: str  # "public", "hidden" or "notebook"
    outcome: str
    message: str = ""
    duration: float = 0.0
    checked: bool = False  # notebooks: a cell whose output is compared

    def as_dict(self) -> dict:
        return {"nodeid": self.nodeid, "part": self.part, "set": self.kind, "outcome": self.outcome,
                "message": self.message, "duration": round(self.duration, 3),
                **({"checked": self.checked} if self.kind == "notebook" else {})}


@dataclass
class Grade:
    submission: str
    config: Config
    parts: Sequence[str]
    tests: List[TestResult] = field(default_factory=list)
    notes: Dict[str, List[str]] = field(default_factory=dict)  # part -> notes
    notebooks_run: bool = False
    duration: float = 0.0

    # -- per part ----------------------------------------------------------------------
    def part_rows(self, include_provided: bool = False) -> "OrderedDict[str, dict]":
        rows: "OrderedDict[str, dict]" = OrderedDict()
        names = list(self.parts)
        if include_provided and any(t.part == "provided" for t in self.tests):
            names.append("provided")
        for name in names:
            tests = [t for t in self.tests if t.part == name and t.kind != "notebook"]
            counts = {o: sum(t.outcome == o for t in tests) for o in OUTCOMES}
            graded = [t for t in tests if t.outcome != "skipped"]
            passed = counts["passed"]
            max_points = self.config.parts[name].points if name in self.config.parts else 0.0
            forbidden = next((t.message for t in tests if t.outcome == "forbidden"), None)
            error = next((t.message for t in tests if t.outcome == "error"), None)
            if forbidden:
                status, points = forbidden, 0.0
            else:
                points = max_points * passed / len(graded) if graded else 0.0
                if error:
                    status = "error: " + error.splitlines()[0][:200] if not error.startswith("error:") else error
                elif counts["timeout"]:
                    status = "time limit exceeded"
                elif counts["not_implemented"] and not passed:
                    status = "not implemented"
                elif not tests:
                    status = "no tests"
                elif not graded:
                    status = "skipped"
                elif passed == len(graded):
                    status = "ok"
                else:
                    status = "wrong"
            row = {
                "points": round(points, 2),
                "max_points": max_points,
                "status": status,
                "public": self._counts(tests, "public"),
                "hidden": self._counts(tests, "hidden"),
                **counts,
                "notes": self.notes.get(name, []),
            }
            rows[name] = row
        return rows

    @staticmethod
    def _counts(tests: Iterable[TestResult], kind: str) -> dict:
        tests = [t for t in tests if t.kind == kind and t.outcome != "skipped"]
        return {"passed": sum(t.outcome == "passed" for t in tests), "total": len(tests)}

    def notebook_summary(self) -> Optional[dict]:
        if not self.notebooks_run:
            return None
        cells = [t for t in self.tests if t.kind == "notebook"]
        checks = [t for t in cells if t.checked and t.outcome != "skipped"]
        errors = [t for t in cells if not t.checked and t.outcome not in ("passed", "skipped")]
        passed = sum(t.outcome == "passed" for t in checks)
        points = self.config.notebook_points * passed / len(checks) if checks else 0.0
        skipped = [t for t in cells if t.outcome == "skipped"]
        return {"checks_passed": passed, "checks": len(checks), "cell_errors": len(errors),
                "points": round(points, 2), "max_points": self.config.notebook_points,
                "skipped": skipped[0].message if skipped and not checks else ""}

    @property
    def total(self) -> float:
        rows = self.part_rows()
        nb = self.notebook_summary()
        return round(sum(r["points"] for r in rows.values()) + (nb["points"] if nb else 0.0), 2)

    @property
    def max_total(self) -> float:
        return sum(self.config.parts[p].points for p in self.parts) + (
            self.config.notebook_points if self.notebooks_run else 0.0)

    # -- outputs -----------------------------------------------------------------------
    def table(self, include_provided: bool = False) -> str:
        rows = self.part_rows(include_provided)
        width = max([24] + [len(p) + 2 for p in rows])
        out = [f"grade of {self.submission}",
               f"{'part':<{width}}{'points':>14}{'public':>9}{'hidden':>9}  status"]
        for name, row in rows.items():
            pts = f"{row['points']:.2f} / {row['max_points']:g}"
            pub = f"{row['public']['passed']}/{row['public']['total']}"
            hid = f"{row['hidden']['passed']}/{row['hidden']['total']}"
            out.append(f"{name:<{width}}{pts:>14}{pub:>9}{hid:>9}  {row['status']}")
            for note in row["notes"]:
                out.append(f"{'':<{width}}  note: {note}")
        nb = self.notebook_summary()
        if nb is not None:
            text = (f"{nb['checks_passed']}/{nb['checks']} checks passed, {nb['cell_errors']} other cells failed"
                    if nb["checks"] else f"not run: {nb['skipped'] or 'no checked cells'}")
            out.append(f"{'notebooks':<{width}}{nb['points']:>8.2f} / {nb['max_points']:g}  {text}")
        out.append(f"{'total':<{width}}{self.total:>8.2f} / {self.max_total:g}")
        return "\n".join(out)

    def as_json(self, include_provided: bool = False) -> dict:
        return {
            "submission": self.submission,
            "config": str(self.config.path),
            "total": self.total,
            "max": self.max_total,
            "parts": self.part_rows(include_provided),
            "notebooks": self.notebook_summary(),
            "tests": [t.as_dict() for t in self.tests],
            "duration_s": round(self.duration, 1),
        }

    def gradescope(self) -> dict:
        """Gradescope's results format: one entry per part and test set (public, hidden)."""
        entries = []
        rows = self.part_rows()
        for name, row in rows.items():
            tests = [t for t in self.tests if t.part == name and t.kind in ("public", "hidden")]
            graded = [t for t in tests if t.outcome != "skipped"]
            for kind in ("public", "hidden"):
                mine = [t for t in graded if t.kind == kind]
                if not mine:
                    continue
                max_score = row["max_points"] * len(mine) / len(graded)
                passed = sum(t.outcome == "passed" for t in mine)
                score = 0.0 if row["status"].startswith("uses forbidden") else max_score * passed / len(mine)
                lines = [f"status of part {name}: {row['status']}", f"{passed}/{len(mine)} {kind} tests passed"]
                lines += [f"note: {n}" for n in row["notes"]]
                for t in mine:
                    if kind == "public":
                        detail = f": {t.message}" if t.outcome != "passed" and t.message else ""
                        lines.append(f"{t.outcome.upper():<16}{t.nodeid}{detail}")
                    else:  # hidden: the verdict only, not the test's code or values
                        reason = t.message if t.outcome in ("timeout", "forbidden", "error") else ""
                        lines.append(f"{t.outcome.upper():<16}hidden test {t.nodeid.split('::')[-1]}"
                                     + (f": {reason}" if reason else ""))
                entries.append({
                    "name": f"{name} ({kind} tests)",
                    "score": round(score, 4),
                    "max_score": round(max_score, 4),
                    "output": "\n".join(lines),
                    "visibility": "visible" if kind == "public" else self.config.hidden_visibility,
                })
        nb = self.notebook_summary()
        if nb is not None:
            cells = [t for t in self.tests if t.kind == "notebook"]
            lines = [f"{t.outcome.upper():<16}{t.nodeid}" + (" (checked output)" if t.checked else "")
                     + (f": {t.message[:300]}" if t.outcome != "passed" and t.message else "") for t in cells]
            entries.append({"name": "notebook checks", "score": nb["points"], "max_score": nb["max_points"],
                            "output": "\n".join([f"{nb['checks_passed']}/{nb['checks']} checks passed"] + lines),
                            "visibility": "visible"})
        return {
            "score": self.total,
            "output": self.table(),
            "visibility": "visible",
            "stdout_visibility": "hidden",
            "tests": entries,
        }

    def problems(self) -> str:
        return "; ".join(f"{p}: {r['status']}" for p, r in self.part_rows().items() if r["status"] != "ok")


# --------------------------------------------------------------------------------------
# Temporary copies
# --------------------------------------------------------------------------------------


def _make_read_only(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(root.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _rmtree(root: Path) -> None:
    def make_writable(func, path, _exc):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(root, onerror=make_writable)


def copy_grader(dest: Path) -> Path:
    """This grader (tests, grading/, reference modules, notebooks) into ``dest``, read-only."""
    shutil.copytree(REPO_ROOT, dest, ignore=_GRADER_IGNORE)
    _make_read_only(dest)
    return dest


def locate_checkout(folder: Path, config: Config) -> Path:
    """The folder that holds the student modules: ``folder`` or the shallowest folder below
    it that does (Gradescope and zip files often nest a submission one level or more)."""
    names = [Path(m).name for m in config.student_modules]
    if any((folder / n).is_file() for n in names):
        return folder
    best = None
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX", "__pycache__")))
        depth = len(Path(dirpath).relative_to(folder).parts)
        if depth > 4:
            dirnames[:] = []
            continue
        if any(n in filenames for n in names) and (best is None or depth < best[0]):
            best = (depth, Path(dirpath))
    return best[1] if best else folder


def copy_submission(checkout: Path, grader: Path, dest: Path, config: Config,
                    reference_modules: Iterable[str] = ()) -> Tuple[Path, List[str]]:
    """The graded folder: the submission's student modules (or, for ``reference_modules``,
    the reference's), every provided module and the ``a5`` package from the grader.
    Returns it and the student modules that are missing from the submission."""
    dest.mkdir(parents=True)
    missing = []
    for module in config.provided_modules:
        if (grader / module).is_file():
            (dest / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(grader / module, dest / module)
    if (grader / "a5").is_dir():
        shutil.copytree(grader / "a5", dest / "a5", ignore=_GRADER_IGNORE)
    for module in config.student_modules:
        target = dest / module
        target.parent.mkdir(parents=True, exist_ok=True)
        if module in reference_modules:
            shutil.copy2(grader / module, target)
        elif (checkout / module).is_file():
            shutil.copy2(checkout / module, target)
        else:
            missing.append(module)
            # Never fall through to the reference module that sits in the grader's folder.
            target.write_text(f"raise ImportError({f'{module} is missing from the submission'!r})\n")
    for path in dest.rglob("*"):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dest, missing


# --------------------------------------------------------------------------------------
# Running pytest
# --------------------------------------------------------------------------------------


def test_files(grader: Path, parts: Sequence[str], provided: bool) -> List[Tuple[Path, str]]:
    """``(file, "public" | "hidden")`` of the test files that grade any of ``parts``."""
    found = []
    for (folder, pattern), kind in ((PUBLIC_GLOB, "public"), (HIDDEN_GLOB, "hidden")):
        for path in sorted((grader / folder).glob(pattern)):
            marked = set(PART_RE.findall(path.read_text()))
            if marked & set(parts) or (provided and "provided" in marked):
                found.append((path, kind))
    return found


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _read_events(path: Path) -> List[dict]:
    events = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


@dataclass
class Run:
    """What one or more pytest processes did with a list of test files."""

    collected: "OrderedDict[str, dict]" = field(default_factory=OrderedDict)
    results: Dict[str, dict] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)  # test file -> why it could not be collected
    died_collecting: Optional[str] = None  # the process ended before collecting anything
    log: str = ""


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _record_events(run: Run, events: List[dict], timed_out_parts: Dict[str, str]) -> Tuple[Optional[str], bool]:
    """Adds one process's ``events`` to ``run`` (and the parts with a timed-out test to
    ``timed_out_parts``); returns the test started but not finished, and whether the
    process reached its end."""
    started = None
    finished = False
    for event in events:
        kind = event["event"]
        if kind == "collected":
            run.collected.setdefault(event["nodeid"], event)
        elif kind == "collect_error":
            run.errors.setdefault(_file_of(event["nodeid"]), _collect_error_summary(event.get("message", "")))
        elif kind == "start":
            started = event["nodeid"]
        elif kind == "result":
            run.results[event["nodeid"]] = event
            if event["outcome"] == "timeout":
                timed_out_parts.setdefault(event.get("part", ""), event.get("message", ""))
            if event["nodeid"] == started:
                started = None
        elif kind == "finished":
            finished = True
    return started, finished


def _fail_started_test(run: Run, started: Optional[str], reason: str, killed: bool,
                       timed_out_parts: Dict[str, str]) -> None:
    """The test that was running when its process died fails with ``reason``."""
    if started is None or started in run.results:
        return
    part = run.collected.get(started, {}).get("part", "")
    run.results[started] = {"nodeid": started, "part": part,
                            "outcome": "timeout" if killed else "error", "message": reason}
    if killed:
        timed_out_parts.setdefault(part, reason)


def _pending_after_timeouts(run: Run, timed_out_parts: Dict[str, str]) -> List[str]:
    """The collected tests still to run; those of a part with a timed-out test are not run
    (they fail as timed out) and are left out."""
    pending = []
    for nodeid in [n for n in run.collected if n not in run.results]:
        part = run.collected[nodeid].get("part", "")
        if part in timed_out_parts:
            run.results[nodeid] = {"nodeid": nodeid, "part": part, "outcome": "timeout",
                                   "message": f"not run: an earlier test of part {part!r} exceeded "
                                              "the time limit"}
        else:
            pending.append(nodeid)
    return pending


class Grader:
    def __init__(self, config: Config, parts: Sequence[str], timeout: float, submission_timeout: float,
                 provided: bool = False, verbose: bool = False):
        self.config = config
        self.parts = list(parts)
        self.timeout = timeout
        self.submission_timeout = submission_timeout
        self.provided = provided
        self.verbose = verbose
        self.env = _default_env()
        self._reference_tests: Dict[str, "OrderedDict[str, dict]"] = {}

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    # -- one pytest process ------------------------------------------------------------
    def _pytest(self, grader: Path, targets: List[str], events: Path, env: Dict[str, str], timeout: float,
                extra: Sequence[str] = (), collect_only: bool = False) -> Tuple[Optional[int], bool, str]:
        """Run pytest; returns (exit status or None when killed at ``timeout``, killed, log tail)."""
        command = [sys.executable, "-m", "pytest", *targets, "-p", "grading.plugin", "-p", "no:cacheprovider",
                   "-q", "-o", "addopts=", "--rootdir", str(grader), "-c", str(grader / "pytest.ini"),
                   "--a5-events", str(events), "--a5-config", str(grader / "grading" / "points.toml"),
                   "-W", "ignore::pytest.PytestUnknownMarkWarning", *extra]
        if self.parts is not None:
            command += ["--a5-parts", ",".join(self.parts)]
        if self.provided:
            command.append("--a5-provided")
        if collect_only:
            command.append("--collect-only")
        log_path = events.with_suffix(".log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, cwd=grader, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
                killed = False
            except subprocess.TimeoutExpired:
                rc, killed = None, True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also children (data loader workers)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.is_file() else ""
        return rc, killed, tail

    def reference_tests(self, grader: Path, keys: List[str], scratch: Path) -> "OrderedDict[str, dict]":
        """The tests of the files ``keys`` as collected with the reference modules (to count
        the tests of files that a submission could not even collect); one process."""
        todo = [key for key in keys if key not in self._reference_tests]
        if todo:
            events = scratch / f"reference-{len(list(scratch.glob('reference-*')))}.jsonl"
            env = dict(self.env)
            env.pop("A5_SUBMISSION", None)
            self._pytest(grader, todo, events, env, timeout=600, collect_only=True,
                         extra=["--continue-on-collection-errors"])
            for key in todo:
                self._reference_tests[key] = OrderedDict()
            for event in _read_events(events):
                if event["event"] == "collected" and _file_of(event["nodeid"]) in self._reference_tests:
                    self._reference_tests[_file_of(event["nodeid"])][event["nodeid"]] = event
        found: "OrderedDict[str, dict]" = OrderedDict()
        for key in keys:
            found.update(self._reference_tests[key])
        return found

    def _recover(self, grader: Path, checkout: Path, scratch: Path, deadline: float, files: List[str], run: Run,
                 grade: Grade) -> None:
        """Files that could not be collected: grade them again with the reference module
        where the module that does not import is not the one they grade; fail the tests of
        the others with the reason (counted from the reference's collection)."""
        failed = [key for key in files if key in run.errors]
        if not failed:
            return
        broken: Optional[Dict[str, str]] = None
        retry: Dict[Tuple[str, ...], List[str]] = OrderedDict()
        for key in failed:
            if run.errors[key].startswith("time limit") or time.monotonic() >= deadline:
                continue
            if broken is None:
                broken = self.syntax_errors(checkout) or self.probe_modules(grader, checkout, scratch)
            owners = {self.config.parts[p].module for p in PART_RE.findall((grader / key).read_text())
                      if p in self.config.parts and p in self.parts}
            others = tuple(sorted(set(broken) - owners))
            owner_errors = [broken[m] for m in sorted(owners) if m in broken]
            if owner_errors:
                run.errors[key] = owner_errors[0]
            elif others:
                retry.setdefault(others, []).append(key)
        for others, keys in retry.items():
            fallback_dir = scratch / f"fallback-{len(list(scratch.glob('fallback-*')))}"
            fallback, _ = copy_submission(checkout, grader, fallback_dir, self.config, reference_modules=others)
            self.log(f"  {', '.join(keys)}: graded again with the reference {', '.join(others)}")
            rerun = self.run_tests(grader, keys, fallback, scratch, deadline)
            note = (f"graded with the reference {', '.join(others)} (the submission's does not import: "
                    f"{'; '.join(broken[m] for m in others)})")
            for key in keys:
                if key in rerun.errors or rerun.died_collecting:
                    continue
                for nodeid in [n for n in run.results if _file_of(n) == key]:
                    del run.results[nodeid]
                for nodeid, event in rerun.results.items():
                    if _file_of(nodeid) == key:
                        run.results[nodeid] = event
                        part = event.get("part", "")
                        if note not in grade.notes.get(part, []):
                            grade.notes.setdefault(part, []).append(note)
                del run.errors[key]
        failed = [key for key in files if key in run.errors]
        if not failed:
            return
        for nodeid, event in self.reference_tests(grader, failed, scratch).items():
            error = run.errors[_file_of(nodeid)]
            timeout = error.startswith("time limit")
            run.results.setdefault(nodeid, {"nodeid": nodeid, "part": event.get("part", ""),
                                            "outcome": "timeout" if timeout else "error",
                                            "message": error if timeout else "error: " + error})

    def syntax_errors(self, checkout: Path) -> Dict[str, str]:
        """``{student module: syntax error}``, found by compiling (no process needed)."""
        found = {}
        for module in self.config.student_modules:
            path = checkout / module
            if not path.is_file():
                continue
            try:
                compile(path.read_bytes(), str(path), "exec")
            except SyntaxError as exc:
                found[module] = f"{type(exc).__name__}: {exc.msg} ({Path(module).name}, line {exc.lineno})"
            except ValueError as exc:  # e.g. null bytes
                found[module] = f"{module} cannot be compiled: {exc}"
        return found

    def run_tests(self, grader: Path, files: List[str], submission: Path, scratch: Path, deadline: float) -> Run:
        """The tests of ``files`` in one pytest process, and more when a test kills its
        process (the tests not done yet run in a new one)."""
        events_path = scratch / f"run-{len(list(scratch.glob('run-*.jsonl')))}.jsonl"
        env = dict(self.env, A5_SUBMISSION=str(submission))
        run = Run()
        targets = list(files)
        timed_out_parts: Dict[str, str] = {}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            seen = len(_read_events(events_path))
            rc, killed, run.log = self._pytest(grader, targets, events_path, env, remaining,
                                               ["--a5-timeout", str(self.timeout), "--continue-on-collection-errors"])
            started, finished = _record_events(run, _read_events(events_path)[seen:], timed_out_parts)
            if finished and not killed:
                break
            # The process died (or was killed at the submission limit) before the end.
            reason = self._death_reason(rc, killed)
            _fail_started_test(run, started, reason, killed, timed_out_parts)
            if not run.collected:
                run.died_collecting = reason + " while collecting the tests"
                break
            if killed:
                break
            pending = _pending_after_timeouts(run, timed_out_parts)
            if not pending:
                break
            self.log(f"  {reason}; running the {len(pending)} remaining tests in a new process")
            targets = pending
        self._time_out_unrun(run)
        return run

    def _death_reason(self, rc: Optional[int], killed: bool) -> str:
        """Why a pytest process ended before its ``finished`` event, in words."""
        if killed:
            return f"time limit exceeded (the submission's {self.submission_timeout:g} s)"
        if rc is not None and rc < 0:
            return f"the test process crashed ({_signal_name(rc)})"
        return (f"the test process exited with status {rc} (sys.exit / os._exit in the code?)" if rc != 75
                else "a test did not stop at its time limit; its process was ended")

    def _time_out_unrun(self, run: Run) -> None:
        """Every collected test still without a result fails: the submission's time is up."""
        for nodeid, event in run.collected.items():
            if nodeid not in run.results:
                run.results[nodeid] = {"nodeid": nodeid, "part": event.get("part", ""), "outcome": "timeout",
                                       "message": f"not run: time limit exceeded (the submission's "
                                                  f"{self.submission_timeout:g} s)"}

    # -- import probes -----------------------------------------------------------------
    def probe_modules(self, grader: Path, checkout: Path, scratch: Path) -> Dict[str, str]:
        """``{student module: why it does not import}``, each imported on its own with the
        reference's other modules."""
        broken = {}
        for module in self.config.student_modules:
            others = [m for m in self.config.student_modules if m != module]
            probe = scratch / f"probe-{Path(module).stem}"
            if probe.exists():
                _rmtree(probe)
            copy_submission(checkout, grader, probe, self.config, reference_modules=others)
            name = module[:-3].replace("/", ".")
            try:
                result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=probe, env=self.env,
                                        capture_output=True, text=True, timeout=max(60.0, self.timeout),
                                        start_new_session=True)
            except subprocess.TimeoutExpired:
                broken[module] = f"importing {module} does not finish"
                continue
            if result.returncode != 0:
                broken[module] = _import_error_summary(module, result.returncode, result.stderr)
        return broken

    # -- one submission ----------------------------------------------------------------
    def grade(self, checkout: Path, notebooks: Optional[Sequence[str]] = None) -> Grade:
        start = time.monotonic()
        deadline = start + self.submission_timeout
        checkout = locate_checkout(checkout.resolve(), self.config)
        grade = Grade(str(checkout), self.config, self.parts)
        tmp = Path(tempfile.mkdtemp(prefix="a5-grade-"))
        try:
            grader = copy_grader(tmp / "grader")
            scratch = tmp / "scratch"
            scratch.mkdir()
            submission, missing = copy_submission(checkout, grader, tmp / "submission", self.config)
            for module in missing:
                for part in self._parts_of_module(module):
                    grade.notes.setdefault(part, []).append(f"{module} is missing from the submission")
            files = OrderedDict((f.relative_to(grader).as_posix(), kind)
                                for f, kind in test_files(grader, self.parts, self.provided))
            self.log(f"grading {checkout}: {', '.join(files)}")
            run = self.run_tests(grader, list(files), submission, scratch, deadline)
            if run.died_collecting and len(files) > 1 and time.monotonic() < deadline:
                # Something ends the process at import: grade each file in its own.
                self.log(f"  {run.died_collecting}; one process per test file")
                run = Run()
                for key in files:
                    one = self.run_tests(grader, [key], submission, scratch, deadline)
                    run.collected.update(one.collected)
                    run.results.update(one.results)
                    run.errors.update(one.errors)
                    if one.died_collecting:
                        run.errors[key] = one.died_collecting
            elif run.died_collecting:
                run.errors.update({key: run.died_collecting for key in files})
            self._recover(grader, checkout, scratch, deadline, list(files), run, grade)
            for nodeid, event in run.results.items():
                kind = files.get(_file_of(nodeid), "hidden" if nodeid.startswith(HIDDEN_GLOB[0]) else "public")
                grade.tests.append(TestResult(nodeid, event.get("part") or "provided", kind, event["outcome"],
                                              event.get("message", ""), float(event.get("duration") or 0.0)))
            if notebooks is not None:
                grade.notebooks_run = True
                grade.tests += self.run_notebooks(grader, submission, scratch, notebooks, deadline)
        finally:
            _rmtree(tmp)
        grade.duration = time.monotonic() - start
        return grade

    def _parts_of_module(self, module: str) -> List[str]:
        return [p for p in self.parts if self.config.parts[p].module == module]

    # -- notebooks ---------------------------------------------------------------------
    def run_notebooks(self, grader: Path, submission: Path, scratch: Path, names: Sequence[str],
                      deadline: float) -> List[TestResult]:
        """The reference notebooks' cells, run by nbval (lax, quick mode) in the submission's
        folder so that they import its modules; every ``# NBVAL_CHECK_OUTPUT`` cell is a check."""
        results = []
        voc = Path(self.env["VOC_ROOT"]) / "VOCdevkit" / "VOC2007"
        for name in names or self.config.notebooks:
            source = grader / name if (grader / name).is_file() else Path(name).resolve()
            nodeid = source.name
            if not source.is_file():
                results.append(TestResult(nodeid, f"notebook:{nodeid}", "notebook", "skipped", f"{name} not found"))
                continue
            notebook_text = source.read_text()
            if not voc.is_dir() and "VOC_ROOT" in notebook_text:
                results.append(TestResult(nodeid, f"notebook:{nodeid}", "notebook", "skipped",
                                          f"the notebooks need PASCAL VOC2007 at VOC_ROOT={self.env['VOC_ROOT']}"))
                continue
            target = submission / source.name
            target.write_text(notebook_text)
            events = scratch / f"notebook-{source.stem}.jsonl"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                results.append(TestResult(nodeid, f"notebook:{nodeid}", "notebook", "timeout",
                                          "not run: the submission's time limit was exceeded"))
                continue
            sanitize = grader / "tests" / "nbval_sanitize.cfg"
            extra = ["--nbval-lax", "--a5-timeout", "0",
                     "--nbval-cell-timeout", str(int(max(self.config.notebook_cell_timeout, 1)))]
            if sanitize.is_file():
                extra += ["--nbval-sanitize-with", str(sanitize)]
            env = dict(self.env, A5_SUBMISSION=str(submission))
            rc, killed, log = self._pytest(grader, [str(target)], events, env, remaining, extra)
            collected = OrderedDict((e["nodeid"], e) for e in _read_events(events) if e["event"] == "collected")
            done = {e["nodeid"]: e for e in _read_events(events) if e["event"] == "result"}
            errors = [e for e in _read_events(events) if e["event"] == "collect_error"]
            if not collected:
                message = _collect_error_summary(errors[0]["message"]) if errors else f"nbval did not run: {log[-300:]}"
                results.append(TestResult(nodeid, f"notebook:{nodeid}", "notebook", "error", message))
            for cell_id, event in collected.items():
                result = done.get(cell_id)
                if result is None:
                    result = {"outcome": "timeout" if killed else "error",
                              "message": "time limit exceeded" if killed else f"the notebook run ended (status {rc})"}
                results.append(TestResult(f"{source.name}::{cell_id.split('::')[-1]}", event["part"], "notebook",
                                          result["outcome"],
                                          result.get("message", ""), float(result.get("duration") or 0.0),
                                          checked=bool(event.get("checked"))))
        return results


def _collect_error_summary(text: str) -> str:
    """The exception line of a collection error (``E   SyntaxError: ...``)."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = [line for line in lines if line and not line.startswith(("File ", "^"))]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line) or ":" in line:
            return line[:300]
    tail = [line for line in text.strip().splitlines() if line.strip()]
    return (tail[-1] if tail else "the test file could not be collected")[:300]


def _import_error_summary(module: str, returncode: int, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines or not lines[-1][:1].isalpha() or "Traceback" not in stderr and "Error" not in lines[-1]:
        return f"{module} ends the interpreter (status {returncode}) when imported"
    last = lines[-1].strip()
    where = ""
    for line in reversed(lines):
        match = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if match and Path(match.group(1)).name == Path(module).name:
            where = f" ({Path(module).name}, line {match.group(2)})"
            break
    return f"{last[:250]}{where}"


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _submissions(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _argument_parser() -> argparse.ArgumentParser:
    """grade.py's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Grading configuration: grading/points.toml. Instructors: see README.md, "
               "'Instructors: grading a class'.")
    parser.add_argument("checkout", type=Path, nargs="?", help="folder holding the submission's fcos.py and "
                        "two_stage_detector.py (or a folder above it)")
    parser.add_argument("--batch", type=Path, metavar="SUBMISSIONS_DIR",
                        help="grade every sub-folder of this folder (one submission each)")
    parser.add_argument("--csv", type=Path, help="with --batch: one row per submission, one column per part")
    parser.add_argument("--json", type=Path, help="write the grade (parts, tests, total) as JSON")
    parser.add_argument("--json-dir", type=Path, help="with --batch: one JSON grade per submission here")
    parser.add_argument("--gradescope", type=Path, metavar="RESULTS_JSON",
                        help="write Gradescope's results.json for this submission")
    parser.add_argument("--parts", help="comma-separated parts to grade (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds per test (default: points.toml, sized for a CPU)")
    parser.add_argument("--submission-timeout", type=float, help="seconds per submission (default: points.toml)")
    parser.add_argument("--notebooks", nargs="*", metavar="NOTEBOOK",
                        help="also run the reference notebooks' checked cells (nbval, quick mode) with the "
                             "submission's modules (default: [notebooks].files of points.toml)")
    parser.add_argument("--provided", action="store_true", help="also run the tests of provided code (0 points)")
    parser.add_argument("--config", type=Path, default=CONFIG_PATH, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress to stderr")
    return parser


def _selected_parts(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config) -> List[str]:
    """The parts to grade, in points.toml's order: ``--parts`` or all (an unknown part is a
    usage error)."""
    parts = list(config.parts)
    if args.parts:
        wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in config.parts]
        if unknown:
            parser.error(f"unknown parts {', '.join(unknown)} (parts: {', '.join(config.parts)})")
        parts = [p for p in parts if p in wanted]
    return parts


def _batch_row(folder: Path, grade: Grade, parts: List[str], notebooks: bool) -> dict:
    """One submission's row of the class CSV: points per part (and notebooks), total, problems."""
    part_rows = grade.part_rows()
    row = {"submission": folder.name, **{p: part_rows[p]["points"] for p in parts}}
    if notebooks:
        row["notebooks"] = grade.notebook_summary()["points"]
    row.update(total=grade.total, max=grade.max_total, problems=grade.problems())
    return row


def _grade_batch(parser: argparse.ArgumentParser, args: argparse.Namespace, grader: Grader,
                 parts: List[str]) -> int:
    """``--batch``: grades every sub-folder, prints its table, writes the JSON grades and the CSV."""
    folders = _submissions(args.batch)
    if not folders:
        parser.error(f"{args.batch} has no sub-folders")
    rows = []
    for folder in folders:
        grade = grader.grade(folder, args.notebooks)
        print(grade.table(args.provided), flush=True)
        print()
        if args.json_dir:
            _write(args.json_dir / f"{folder.name}.json", json.dumps(grade.as_json(args.provided), indent=2))
        rows.append(_batch_row(folder, grade, parts, args.notebooks is not None))
        if args.csv:  # rewritten after every submission: a long batch keeps what is done
            _write_csv(args.csv, rows)
    print(f"graded {len(rows)} submissions" + (f"; wrote {args.csv}" if args.csv else ""))
    return 0


def _grade_checkout(parser: argparse.ArgumentParser, args: argparse.Namespace, grader: Grader) -> int:
    """One checkout: prints its table, writes ``--json`` and ``--gradescope``."""
    if not args.checkout.is_dir():
        parser.error(f"{args.checkout} is not a folder")
    grade = grader.grade(args.checkout, args.notebooks)
    print(grade.table(args.provided))
    if args.json:
        _write(args.json, json.dumps(grade.as_json(args.provided), indent=2))
    if args.gradescope:
        _write(args.gradescope, json.dumps(grade.gradescope(), indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _argument_parser()
    args = parser.parse_args(argv)

    if (args.checkout is None) == (args.batch is None):
        parser.error("give either a CHECKOUT or --batch SUBMISSIONS_DIR")
    if args.batch is not None and (args.json or args.gradescope):
        parser.error("with --batch use --csv and --json-dir")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"grade.py: {exc}", file=sys.stderr)
        return 2
    parts = _selected_parts(parser, args, config)
    grader = Grader(config, parts, args.timeout or config.timeout,
                    args.submission_timeout or config.submission_timeout, provided=args.provided,
                    verbose=args.verbose)
    if args.batch is not None:
        return _grade_batch(parser, args, grader, parts)
    return _grade_checkout(parser, args, grader)


def _write_csv(path: Path, rows: List[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())

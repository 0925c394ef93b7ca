"""Test-suite setup and the autograder.

The same tests grade any checkout of the assignment:

* ``A5_SUBMISSION=/path/to/checkout pytest tests`` imports ``fcos``,
  ``two_stage_detector`` and ``a5_helper`` from that folder instead of this one
  (``tools/grade.py`` wraps this in one command).
* Every test is marked ``@pytest.mark.part("name")`` with the student part it grades.
  At the end of the run a table lists, per part, how many tests passed, failed, or
  stopped at ``NotImplementedError`` (the untouched student release), and a total.
  ``--grade-json PATH`` also writes that table as JSON.

Shared paths: ``VOC_ROOT`` (default ``../shared/data``) and ``TORCH_HOME`` (default
``../shared/weights``), both relative to the repository root.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMISSION = Path(os.environ.get("A5_SUBMISSION", REPO_ROOT)).resolve()

# The graded code goes first on sys.path so that `import fcos` finds the submission.
sys.path.insert(0, str(SUBMISSION))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tests/ helpers (isolation.py)

import isolation  # noqa: E402

# VOC_ROOT and TORCH_HOME defaults (../shared/data, ../shared/weights) are set by the
# repository's root conftest.py, which pytest loads first.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--grade-json",
        default=None,
        help="write the per-part grade table to this JSON file",
    )
    parser.addoption(
        "--part",
        action="append",
        default=[],
        help="run only the tests of this part (repeatable), e.g. --part nms",
    )


def pytest_collection_modifyitems(config, items):
    """``--part NAME``: keep only the tests marked ``@pytest.mark.part(NAME)``."""
    wanted = set(config.getoption("--part"))
    if not wanted:
        return
    selected = [item for item in items if _part_of(item) in wanted]
    config.hook.pytest_deselected(items=[item for item in items if _part_of(item) not in wanted])
    items[:] = selected


@pytest.fixture(autouse=True)
def _other_parts_from_the_reference(request, monkeypatch):
    """Grade every part on its own.

    When a submission is graded from the instructor's repository (``A5_SUBMISSION`` set,
    the reference solution beside these tests), every student part other than the one
    a test grades is replaced, for that test, by the reference implementation. A test
    of the loss then fails only for mistakes in the loss, not in the matcher it calls.
    In a student's own copy there is no reference: the tests run on the student's code
    as it is (a later part's tests then also need the earlier parts).
    """
    reference = isolation.reference_modules(REPO_ROOT, SUBMISSION)
    if reference is None:
        return
    test_module = getattr(request.node, "module", None)
    isolation.patch_other_parts(monkeypatch, reference, keep_part=_part_of(request.node), test_module=test_module)


# --------------------------------------------------------------------------------------
# Fixtures shared by the module tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: faster and steadier on a
    shared machine (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def voc_root() -> Path:
    """The offline VOC2007 folder, or a skip that says how to provide it."""
    root = Path(os.environ["VOC_ROOT"])
    if not (root / "VOCdevkit" / "VOC2007").is_dir():
        pytest.skip(f"VOC2007 data not found at VOC_ROOT={root} (set VOC_ROOT to use it)")
    return root


@pytest.fixture
def mobilenet_weights_available() -> Path:
    """Skip unless torchvision's ImageNet MobileNetV2 file is in the TORCH_HOME cache."""
    path = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        pytest.skip(f"MobileNetV2 weights not cached at {path} (set TORCH_HOME to use them)")
    return path


# --------------------------------------------------------------------------------------
# Autograder: outcome per part
# --------------------------------------------------------------------------------------

_OUTCOMES = ("passed", "failed", "not_implemented", "skipped")
_results: Dict[str, Dict[str, int]] = defaultdict(lambda: dict.fromkeys(_OUTCOMES, 0))


def _part_of(item: pytest.Item) -> Optional[str]:
    marker = item.get_closest_marker("part")
    return marker.args[0] if marker and marker.args else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    part = _part_of(item)
    if part is None:
        return
    # One outcome per test: the first failing phase, else the call phase.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            kind = "skipped"
        elif report.passed:
            kind = "passed"
        elif call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError):
            kind = "not_implemented"
        else:
            kind = "failed"
        _results[part][kind] += 1


def _grade_table() -> Dict[str, Dict[str, object]]:
    table = {}
    for part in sorted(_results, key=lambda p: (p == "provided", p)):
        counts = _results[part]
        graded = counts["passed"] + counts["failed"] + counts["not_implemented"]
        if counts["not_implemented"] and not counts["passed"]:
            status = "not implemented"
        elif graded == 0:
            status = "skipped"
        elif counts["passed"] == graded:
            status = "ok"
        else:
            status = "wrong"
        score = counts["passed"] / graded if graded else 0.0
        table[part] = {**counts, "score": round(score, 4), "status": status}
    return table


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _results:
        return
    table = _grade_table()
    write = terminalreporter.write_line
    terminalreporter.section(f"grade of {SUBMISSION}")
    write(f"{'part':<24}{'passed':>7}{'failed':>7}{'not impl':>9}{'skipped':>8}  {'score':>6}  status")
    student = {p: row for p, row in table.items() if p != "provided"}
    for part, row in table.items():
        write(
            f"{part:<24}{row['passed']:>7}{row['failed']:>7}{row['not_implemented']:>9}"
            f"{row['skipped']:>8}  {row['score']:>6.2f}  {row['status']}"
        )
    total = sum(row["score"] for row in student.values())
    write(f"total (student parts): {total:.2f} / {len(student)}")
    path = config.getoption("--grade-json")
    if path:
        Path(path).write_text(json.dumps({"submission": str(SUBMISSION), "parts": table,
                                          "total": total, "max": len(student)}, indent=2))

"""Grade many (checkout, part) jobs in one Python process (instructor tests only).

Usage: ``python tests/instructor/batch_grade.py JOBS.json``, where the file lists
``{"checkout", "part", "files", "junit", "grade_json", "stop_at_first_failure"}`` jobs.

Each job is one ``pytest.main`` run with ``A5_SUBMISSION`` set to its checkout. Between
jobs the graded modules, the test modules and the conftests are dropped from
``sys.modules``, so each run imports the checkout's code afresh; torch and torchvision
are imported once for all jobs, which is most of the cost of a separate process.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_GRADED = {"fcos", "two_stage_detector", "a5_helper", "a5", "conftest", "isolation", "checks", "support"}


def _forget_graded_modules() -> None:
    tests_dir = str(REPO_ROOT / "tests")
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if (name.split(".")[0] in _GRADED or name.startswith(("_reference_", "test_"))
                or file.startswith(tests_dir)):
            del sys.modules[name]


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    os.chdir(REPO_ROOT)
    base_path = list(sys.path)
    for job in jobs:
        _forget_graded_modules()
        sys.path[:] = base_path
        os.environ["A5_SUBMISSION"] = job["checkout"]
        args = [*job["files"], "--part", job["part"], "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                "--junitxml", job["junit"], "--grade-json", job["grade_json"]]
        if job.get("stop_at_first_failure"):
            args.append("-x")
        pytest.main(args)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

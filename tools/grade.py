#!/usr/bin/env python3
"""Grade a checkout of the assignment (a student's, the release, or this reference).

Usage::

    python tools/grade.py CHECKOUT [--json grade.json] [-- extra pytest args]

Runs this repository's tests (``tests/``) with ``fcos``, ``two_stage_detector`` and
``a5_helper`` imported from CHECKOUT, and prints one row per student part (passed,
failed, not implemented) plus the total. The tests use inputs that the notebooks never
print, so a submission cannot pass by matching printed values. Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="folder holding fcos.py, two_stage_detector.py, a5_helper.py")
    parser.add_argument("--json", type=Path, default=None, help="also write the grade table here")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args()

    checkout = args.checkout.resolve()
    missing = [n for n in ("fcos.py", "two_stage_detector.py", "a5_helper.py") if not (checkout / n).is_file()]
    if missing:
        parser.error(f"{checkout} has no {', '.join(missing)}")
    env = dict(os.environ, A5_SUBMISSION=str(checkout))
    command = [sys.executable, "-m", "pytest", str(REPO_ROOT / "tests"), "-q", "-p", "no:cacheprovider",
               "--rootdir", str(REPO_ROOT), "-o", "addopts="]
    if args.json:
        command += ["--grade-json", str(args.json.resolve())]
    command += args.pytest_args
    return subprocess.call(command, env=env, cwd=REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write the student version of the assignment from this reference solution.

Usage::

    python tools/make_release.py OUT_DIR [--force]

Every region of the reference code wrapped as::

        # BEGIN SOLUTION (part_name): what the student implements.
        ...reference code...
        # END SOLUTION

becomes, at the same indentation, the TODO text wrapped at 100 columns and a raise::

        # TODO (part_name): what the student implements, wrapped over as many
        # comment lines as it needs.
        raise NotImplementedError("part_name: not written yet (see the TODO above)")

Docstrings, signatures and provided code are kept. The release holds what a student
needs and nothing an instructor keeps to themselves:

* the modules (student regions replaced), the provided ``a5/`` package and ``compat/``;
* the notebooks, with outputs, execution counts and execution timestamps removed;
* the public tests (``tests/``, without ``tests/instructor/`` and the hidden ``tests/hidden/``);
* ``docs/STUDENT_README.md`` as its ``README.md``, a student ``pytest.ini`` (unit tests
  only; the notebooks run with ``--nbval-lax`` on demand), requirements, conftest.

Never copied: ``grading/`` (hidden tests, points, mutations), ``tools/``, ``benchmarks/``,
``.ci/``, ``tests/instructor/``, ``tests/hidden/``, the instructor README.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Iterable, List, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]

# Python modules whose solution regions are replaced.
MODULES = ("fcos.py", "two_stage_detector.py", "a5_helper.py")
NOTEBOOKS = ("fcos.ipynb", "faster_rcnn.ipynb")
# Copied as they are.
VERBATIM = ("requirements.txt", "conftest.py", ".gitignore")
# Folders copied as they are (packages of provided code, the public tests).
VERBATIM_DIRS = ("a5", "compat", "tests")
# Instructor-only material inside the copied folders: the hidden tests, the instructor
# tests, and the tests of the reference's own notebooks (recorded outputs), benchmarks and
# code layout (which scans tools/, grading/ and benchmarks/ too).
EXCLUDED = ("instructor", "hidden", "test_notebooks.py", "test_benchmarks.py", "test_layout.py")
STUDENT_README = Path("docs") / "STUDENT_README.md"
# The release's pytest.ini: the unit tests only; the notebooks are run on demand.
STUDENT_PYTEST_INI = """[pytest]
# `pytest` runs the unit tests (a table per part at the end). Run a notebook's checks with
# `pytest --nbval-lax fcos.ipynb` once its parts are written.
testpaths = tests
addopts = -p no:cacheprovider
markers =
    part(name): the part of the assignment that this test grades ("provided" for given code)
    slow: a test that takes more than a few seconds
filterwarnings =
    ignore::DeprecationWarning:jupyter_client.*
"""
TODO_WIDTH = 100

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION \((?P<part>[\w.-]+)\):\s*(?P<what>.*?)\s*$")
END = re.compile(r"^[ \t]*# END SOLUTION\s*$")


class MarkerError(ValueError):
    """A malformed solution region (unclosed, nested, or an END without BEGIN)."""


def strip_solutions(source: str, filename: str = "<source>", keep: Iterable[str] = ()) -> Tuple[str, List[str]]:
    """Replace every solution region of ``source`` by a TODO block.

    Args:
        source: Reference source with solution regions.
        filename: For error messages.
        keep: Parts whose regions stay as they are (markers removed): a release with
            only these parts solved, which the instructor tests use to check that each
            part is graded on its own.

    Returns:
        The student source, and the part names of the replaced regions in order.

    Raises:
        MarkerError: naming ``filename`` and the line of a malformed region.
    """
    keep = set(keep)
    out: List[str] = []
    parts: List[str] = []
    open_line = None
    keeping = False
    for lineno, line in enumerate(source.splitlines(keepends=True), start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_line is not None:
                raise MarkerError(f"{filename}:{lineno}: BEGIN SOLUTION inside the region opened at line {open_line}")
            open_line = lineno
            indent, part, what = begin["indent"], begin["part"], begin["what"]
            keeping = part in keep
            if keeping:
                continue
            out += todo_lines(indent, part, what)
            out.append(f'{indent}raise NotImplementedError("{part}: not written yet (see the TODO above)")\n')
            parts.append(part)
        elif end:
            if open_line is None:
                raise MarkerError(f"{filename}:{lineno}: END SOLUTION without a BEGIN SOLUTION")
            open_line, keeping = None, False
        elif open_line is None or keeping:
            out.append(line)
    if open_line is not None:
        raise MarkerError(f"{filename}:{open_line}: BEGIN SOLUTION is never closed")
    return "".join(out), parts


def todo_lines(indent: str, part: str, what: str) -> List[str]:
    """The TODO comment of a region, wrapped so that no line is longer than 100 columns."""
    lines = textwrap.wrap(
        f"TODO ({part}): {what}",
        width=TODO_WIDTH,
        initial_indent=f"{indent}# ",
        subsequent_indent=f"{indent}#   ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [line + "\n" for line in lines]


# Cell metadata written by the instructor's runs (timestamps, collapsed/scrolled state).
_RUN_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def clear_notebook(text: str) -> str:
    """Return the notebook JSON without outputs, execution counts or run metadata."""
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        for key in _RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    notebook.get("metadata", {}).pop("widgets", None)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def make_release(out_dir: Path, force: bool = False) -> List[str]:
    """Write the student release into ``out_dir``; return the replaced part names."""
    out_dir = out_dir.resolve()
    if out_dir == REPO_ROOT:
        raise SystemExit(f"refusing to write the release over the reference in {out_dir}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise SystemExit(f"{out_dir} is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    replaced: List[str] = []
    for name in MODULES:
        source = (REPO_ROOT / name).read_text()
        student, parts = strip_solutions(source, name)
        # The student file must still be valid Python.
        compile(student, str(out_dir / name), "exec")
        (out_dir / name).write_text(student)
        replaced += parts
    for name in NOTEBOOKS:
        if (REPO_ROOT / name).exists():
            (out_dir / name).write_text(clear_notebook((REPO_ROOT / name).read_text()))
    for name in VERBATIM:
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, out_dir / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", *EXCLUDED)
    for name in VERBATIM_DIRS:
        if (REPO_ROOT / name).exists():
            shutil.copytree(REPO_ROOT / name, out_dir / name, ignore=ignore)
    shutil.copy2(REPO_ROOT / STUDENT_README, out_dir / "README.md")
    (out_dir / "pytest.ini").write_text(STUDENT_PYTEST_INI)
    return replaced


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the student version into")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    parts = make_release(args.out_dir, force=args.force)
    print(f"wrote the student release to {args.out_dir} ({len(parts)} regions: {', '.join(sorted(set(parts)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

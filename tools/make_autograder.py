#!/usr/bin/env python3
"""Build the Gradescope autograder bundle (a zip to upload as "Zip file upload").

Usage::

    python tools/make_autograder.py OUT.zip [--force]

The zip holds, at its root:

* ``setup.sh``: run once by Gradescope when it builds the image (it has internet): makes
  ``/autograder/venv``, installs ``requirements.txt`` (CPU torch), caches the ImageNet
  weights in ``/autograder/shared/weights``;
* ``run_autograder``: run for every submission; grades ``/autograder/submission`` with
  ``tools/grade.py`` and writes ``/autograder/results/results.json`` (Gradescope's format:
  one test entry per part and test set, hidden tests with the visibility of
  ``grading/points.toml``) and ``grade.json``;
* ``requirements.txt``, ``tools/grade.py``, ``grading/`` (points, the grading plugin, the
  hidden tests), the public ``tests/``, the pytest configuration, and the reference
  modules ``fcos.py``, ``two_stage_detector.py``, ``a5_helper.py`` (and the ``a5/``
  package when there is one) and notebooks, which grade.py uses for parts graded in
  isolation and for modules that do not import. Gradescope never shows the bundle to
  students. Instructor-only tests (``tests/instructor``), ``.git``, virtual environments,
  runs, data and checkpoints are left out.

The configuration is validated first: a points.toml that does not match the reference's
student parts stops the build.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
import zipfile
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from grading.config import ConfigError, load_config  # noqa: E402

TEMPLATES = REPO_ROOT / "grading" / "autograder"
# What the bundle must contain for run_autograder to work.
REQUIRED = ("setup.sh", "run_autograder", "requirements.txt", "tools/grade.py", "tools/make_release.py",
            "grading/points.toml", "grading/plugin.py", "grading/config.py", "conftest.py", "pytest.ini",
            "tests/conftest.py")


def bundle_files() -> List[Path]:
    """The repository files that go into the bundle (relative paths), as grade.py copies them."""
    import grade  # tools/grade.py: the same selection as the grader's temporary copy

    files = []
    for dirpath, dirnames, filenames in os.walk(REPO_ROOT):
        here = Path(dirpath)
        ignored = grade._GRADER_IGNORE(dirpath, dirnames + filenames)
        dirnames[:] = sorted(d for d in dirnames if d not in ignored)
        for name in sorted(filenames):
            if name in ignored:
                continue
            path = here / name
            if path.stat().st_size > 20 * 1024 * 1024:  # stray large files (checkpoints, caches)
                continue
            files.append(path.relative_to(REPO_ROOT))
    return files


def make_autograder(out: Path, force: bool = False) -> List[str]:
    """Write the bundle to ``out``; return the names in it."""
    out = out.resolve()
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    load_config()  # refuse to ship a configuration that does not match the parts
    entries = {}
    for rel in bundle_files():
        entries[rel.as_posix()] = REPO_ROOT / rel
    entries["setup.sh"] = TEMPLATES / "setup.sh"
    entries["run_autograder"] = TEMPLATES / "run_autograder"
    missing = [name for name in REQUIRED if name not in entries]
    if missing:
        raise SystemExit(f"cannot build the autograder: missing {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, path in sorted(entries.items()):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            executable = name in ("setup.sh", "run_autograder") or os.access(path, os.X_OK)
            info.external_attr = ((0o755 if executable else 0o644) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            bundle.writestr(info, path.read_bytes())
    tmp.replace(out)
    return sorted(entries)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the zip file to write (e.g. autograder.zip)")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        names = make_autograder(args.out, args.force)
    except ConfigError as exc:
        print(f"make_autograder.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(names)} files); upload it in Gradescope: Configure Autograder -> "
          "Zip file upload")
    return 0


if __name__ == "__main__":
    sys.exit(main())

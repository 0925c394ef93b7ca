"""The Gradescope bundle (tools/make_autograder.py) and its run_autograder, offline.

run_autograder runs in a temporary folder laid out as Gradescope lays out a submission
(``source/`` = the unzipped bundle, ``submission/``, ``results/``), with this virtual
environment's Python instead of the one setup.sh would install (setup.sh needs internet
and is not run here).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from grading.config import load_config  # noqa: E402

pytestmark = [
    pytest.mark.part("provided"),
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

CONFIG = load_config()
PARTS = ("nms", "iou")  # fast parts: the plumbing is the same for all


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "autograder.zip"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_autograder.py"), str(out)],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return out


def test_bundle_has_the_entry_points_hidden_tests_and_reference(bundle):
    with zipfile.ZipFile(bundle) as z:
        names = set(z.namelist())
        modes = {info.filename: info.external_attr >> 16 for info in z.infolist()}
    for name in ("setup.sh", "run_autograder", "requirements.txt", "tools/grade.py", "grading/points.toml",
                 "grading/plugin.py", "tests/conftest.py", "pytest.ini",
                 *CONFIG.student_modules, *CONFIG.provided_modules):
        assert name in names, name
    assert any(n.startswith("tests/hidden/test_") for n in names)
    assert not any(n.startswith(("tests/instructor/", ".git/", ".venv/")) or "__pycache__" in n for n in names)
    for name in ("setup.sh", "run_autograder"):
        assert modes[name] & stat.S_IXUSR, name


def gradescope_run(bundle: Path, root: Path, checkout: Path) -> dict:
    """Lay out ``root`` as Gradescope does and run ``run_autograder`` there."""
    with zipfile.ZipFile(bundle) as z:
        z.extractall(root / "source")
    for name in ("run_autograder", "setup.sh"):  # zipfile does not restore modes
        (root / "source" / name).chmod(0o755)
    shutil.copy2(root / "source" / "run_autograder", root / "run_autograder")
    # A submission as students upload it: the files, one folder down, plus clutter.
    shutil.copytree(checkout, root / "submission" / "a5", ignore=shutil.ignore_patterns("tests", "tools", ".ci"))
    (root / "submission" / "notes.txt").write_text("hi\n")
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), A5_PYTHON=sys.executable,
               A5_GRADE_ARGS=f"--parts {','.join(PARTS)}")
    env.pop("A5_SUBMISSION", None)
    result = subprocess.run(["bash", str(root / "run_autograder")], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = root / "results" / "results.json"
    assert results.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return {"results": json.loads(results.read_text()), "stdout": result.stdout,
            "grade": json.loads((root / "results" / "grade.json").read_text())}


def test_reference_scores_full_in_gradescope(bundle, tmp_path):
    checkout = tmp_path / "reference"
    checkout.mkdir()
    for module in CONFIG.student_modules + CONFIG.provided_modules:
        shutil.copy2(REPO_ROOT / module, checkout / module)
    out = gradescope_run(bundle, tmp_path / "autograder", checkout)
    results = out["results"]
    full = sum(CONFIG.parts[p].points for p in PARTS)
    assert results["score"] == pytest.approx(full), out["stdout"][-3000:]
    assert sum(t["max_score"] for t in results["tests"]) == pytest.approx(full)
    names = {t["name"]: t for t in results["tests"]}
    for part in PARTS:
        assert names[f"{part} (public tests)"]["visibility"] == "visible"
        assert names[f"{part} (hidden tests)"]["visibility"] == CONFIG.hidden_visibility
        assert names[f"{part} (hidden tests)"]["score"] > 0
    assert out["grade"]["submission"].endswith("/submission/a5")


def test_untouched_release_scores_zero_in_gradescope(bundle, tmp_path):
    release = tmp_path / "release"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_release.py"), str(release)],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    out = gradescope_run(bundle, tmp_path / "autograder", release)
    results = out["results"]
    assert results["score"] == 0
    assert all(t["score"] == 0 for t in results["tests"])
    assert all("not implemented" in t["output"] for t in results["tests"]), results["tests"]

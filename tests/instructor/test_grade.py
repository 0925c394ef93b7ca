"""tools/grade.py end to end, on temporary checkouts (instructor-only; never shipped).

Each case grades a temporary checkout: the reference, the untouched student release
(tools/make_release.py), and copies of the reference with a fault appended at the end of
a module (a redefinition wins over the original, whatever the module looks like above).
Most cases grade a few fast parts (``--parts``) to keep the suite short on a CPU; the
reference is graded in full once.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from grading.config import ConfigError, load_config  # noqa: E402

pytestmark = [
    pytest.mark.part("provided"),
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

GRADE = REPO_ROOT / "tools" / "grade.py"
CONFIG = load_config()
FAST_FCOS, FAST_TWO_STAGE = "nms", "iou"  # parts whose tests take a few seconds

FORBIDDEN_NMS = (
    "\n\ndef nms(boxes, scores, iou_threshold=0.5):\n"
    "    import torchvision\n"
    "    return torchvision.ops.nms(boxes, scores, iou_threshold)\n"
)
ENDLESS_NMS = "\n\ndef nms(*args, **kwargs):\n    while True:\n        pass\n"
SYNTAX_ERROR = "\n\ndef broken(:\n    pass\n"


def make_checkout(root: Path, appends: Optional[Dict[str, str]] = None) -> Path:
    """A copy of the reference's modules in ``root`` with ``appends[module]`` appended."""
    root.mkdir(parents=True, exist_ok=True)
    for module in CONFIG.student_modules + CONFIG.provided_modules:
        (root / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / module, root / module)
    for module, text in (appends or {}).items():
        with open(root / module, "a") as f:
            f.write(text)
    return root


def grade(checkout: Path, tmp_path: Path, *options: str, timeout: float = 900) -> dict:
    """Run grade.py with --json and --gradescope; returns the JSON, results.json, stdout."""
    out_json, out_gs = tmp_path / "grade.json", tmp_path / "results.json"
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(GRADE), str(checkout), "--json", str(out_json),
                             "--gradescope", str(out_gs), *options],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out_json.is_file() and out_gs.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return {"json": json.loads(out_json.read_text()), "gradescope": json.loads(out_gs.read_text()),
            "stdout": result.stdout, "seconds": time.monotonic() - start}


def table_row(stdout: str, part: str) -> str:
    return next(line for line in stdout.splitlines() if line.split()[:1] == [part])


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def test_points_cover_every_student_part_and_total_100():
    import make_release  # noqa: F401  (grading.config put tools/ on sys.path)

    from grading.config import student_parts

    marked = {p for parts in student_parts().values() for p in parts}
    assert set(CONFIG.parts) == marked
    assert sum(p.points for p in CONFIG.parts.values()) + CONFIG.notebook_points == 100
    assert "torchvision.ops.nms" in CONFIG.parts["nms"].forbidden


def test_config_naming_wrong_parts_is_refused(tmp_path):
    text = (REPO_ROOT / "grading" / "points.toml").read_text()
    bad = tmp_path / "points.toml"
    name = next(iter(CONFIG.parts))
    module = CONFIG.parts[name].module
    bad.write_text(text.replace(f"[parts.{name}]", f"[parts.{name}_renamed]"))
    with pytest.raises(ConfigError, match=rf"(?s)without points.*{name} \({module}\).*no module marks: {name}_renamed"):
        load_config(bad)
    bad.write_text(re.sub(r"(?m)^points = (\d+)", lambda m: f"points = {int(m.group(1)) + 1}", text, count=1))
    with pytest.raises(ConfigError, match="total 101"):
        load_config(bad)


# --------------------------------------------------------------------------------------
# Whole checkouts
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_grade(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    return grade(make_checkout(tmp / "checkout"), tmp)


def test_reference_gets_full_points_in_table_json_and_gradescope(reference_grade):
    data, gs, stdout = reference_grade["json"], reference_grade["gradescope"], reference_grade["stdout"]
    assert data["total"] == data["max"] == 100, stdout
    for name, part in CONFIG.parts.items():
        row = data["parts"][name]
        assert row["status"] == "ok" and row["points"] == part.points, (name, row)
        assert row["public"]["total"] + row["hidden"]["total"] > 0, name
        assert f"{part.points:.2f} / {part.points:g}" in table_row(stdout, name)
    assert data["parts"]["nms"]["hidden"]["total"] >= 3 and data["parts"]["iou"]["hidden"]["total"] >= 3
    assert "100.00 / 100" in stdout.splitlines()[-1]
    # Gradescope: the total, and one entry per part and test set adding up to the points.
    assert gs["score"] == 100
    assert sum(t["max_score"] for t in gs["tests"]) == pytest.approx(100)
    assert sum(t["score"] for t in gs["tests"]) == pytest.approx(100)
    for entry in gs["tests"]:
        assert set(entry) >= {"name", "score", "max_score", "output", "visibility"}
        expected = "visible" if "(public tests)" in entry["name"] else CONFIG.hidden_visibility
        assert entry["visibility"] == expected, entry["name"]
    assert {t["set"] for t in data["tests"]} == {"public", "hidden"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "release"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_release.py"), str(out)],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return out


def test_untouched_release_scores_zero_on_student_parts(release, tmp_path):
    result = grade(release, tmp_path)
    data = result["json"]
    assert data["total"] == 0 and data["max"] == 100
    for name in CONFIG.parts:
        row = data["parts"][name]
        assert row["status"] == "not implemented" and row["points"] == 0, (name, row)
        assert row["passed"] == 0 and row["public"]["total"] > 0, (name, row)
    assert result["gradescope"]["score"] == 0
    assert "not implemented" in table_row(result["stdout"], "nms")


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


def test_syntax_error_in_two_stage_detector_keeps_fcos_parts(tmp_path):
    checkout = make_checkout(tmp_path / "checkout", {"two_stage_detector.py": SYNTAX_ERROR})
    result = grade(checkout, tmp_path, "--parts", f"{FAST_FCOS},locations,{FAST_TWO_STAGE},anchors")
    parts = result["json"]["parts"]
    for name in (FAST_FCOS, "locations"):
        assert parts[name]["status"] == "ok" and parts[name]["points"] == CONFIG.parts[name].points, parts[name]
    for name in (FAST_TWO_STAGE, "anchors"):
        assert parts[name]["points"] == 0, parts[name]
        assert parts[name]["status"].startswith("error: SyntaxError"), parts[name]
        assert "two_stage_detector.py, line" in parts[name]["status"]
    assert "error: SyntaxError" in table_row(result["stdout"], FAST_TWO_STAGE)


def test_endless_loop_ends_by_the_time_limit_and_grading_goes_on(tmp_path):
    checkout = make_checkout(tmp_path / "checkout", {"fcos.py": ENDLESS_NMS})
    result = grade(checkout, tmp_path, "--parts", f"{FAST_FCOS},{FAST_TWO_STAGE}", "--timeout", "4", timeout=300)
    parts = result["json"]["parts"]
    assert parts[FAST_FCOS]["status"] == "time limit exceeded" and parts[FAST_FCOS]["points"] == 0
    assert parts[FAST_TWO_STAGE]["status"] == "ok"
    assert "time limit exceeded" in table_row(result["stdout"], FAST_FCOS)
    messages = [t["message"] for t in result["json"]["tests"] if t["part"] == FAST_FCOS]
    assert "time limit exceeded (4 s per test)" in messages
    # One test ran into the limit; the part's other tests were not run.
    assert sum(t["duration"] > 3 for t in result["json"]["tests"]) == 1


def test_submission_time_limit_still_writes_the_table(tmp_path):
    checkout = make_checkout(tmp_path / "checkout", {"fcos.py": ENDLESS_NMS})
    result = grade(checkout, tmp_path, "--parts", FAST_FCOS, "--timeout", "600", "--submission-timeout", "25",
                   timeout=300)
    row = result["json"]["parts"][FAST_FCOS]
    assert row["status"] == "time limit exceeded" and row["points"] == 0
    assert any("the submission's 25 s" in t["message"] for t in result["json"]["tests"])
    assert result["seconds"] < 120


def test_batch_of_three_submissions_gives_one_csv(tmp_path):
    """A folder of submissions (one nested a level deeper, as zips often are): the
    reference, a forbidden call (scores 0 on its part only), a syntax error in fcos.py
    (the two-stage parts are graded with the reference fcos.py)."""
    batch = tmp_path / "submissions"
    make_checkout(batch / "alice")
    make_checkout(batch / "bob", {"fcos.py": FORBIDDEN_NMS})
    make_checkout(batch / "carol" / "a5-main", {"fcos.py": SYNTAX_ERROR})
    out_csv, json_dir = tmp_path / "class.csv", tmp_path / "grades"
    parts = f"{FAST_FCOS},{FAST_TWO_STAGE}"
    result = subprocess.run([sys.executable, str(GRADE), "--batch", str(batch), "--csv", str(out_csv),
                             "--json-dir", str(json_dir), "--parts", parts],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["submission"] for r in rows] == ["alice", "bob", "carol"]
    assert list(rows[0])[:3] == ["submission", FAST_FCOS, FAST_TWO_STAGE] and "total" in rows[0]
    full_nms, full_iou = CONFIG.parts[FAST_FCOS].points, CONFIG.parts[FAST_TWO_STAGE].points
    by_name = {r["submission"]: r for r in rows}
    assert float(by_name["alice"]["total"]) == full_nms + full_iou
    # bob: the forbidden call scores 0 on nms, iou is untouched.
    assert float(by_name["bob"][FAST_FCOS]) == 0 and float(by_name["bob"][FAST_TWO_STAGE]) == full_iou
    bob = json.loads((json_dir / "bob.json").read_text())["parts"][FAST_FCOS]
    assert bob["status"] == "uses forbidden torchvision.ops.nms", bob
    assert "uses forbidden torchvision.ops.nms" in by_name["bob"]["problems"]
    # carol: fcos.py does not compile; iou still graded (with our fcos.py as plumbing).
    assert float(by_name["carol"][FAST_FCOS]) == 0 and float(by_name["carol"][FAST_TWO_STAGE]) == full_iou
    carol = json.loads((json_dir / "carol.json").read_text())["parts"]
    assert carol[FAST_FCOS]["status"].startswith("error: SyntaxError"), carol[FAST_FCOS]
    assert any("graded with the reference fcos.py" in note for note in carol[FAST_TWO_STAGE]["notes"])


def test_notebook_checks_run_with_the_submission_modules(tmp_path):
    """--notebooks runs a notebook's cells in the submission's folder; every checked cell
    (``# NBVAL_CHECK_OUTPUT``) is one check, compared with its recorded output."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.v4.new_notebook()
    cells = [
        ("import fcos\nprint(fcos.__file__.endswith('checkout/fcos.py'))  # NBVAL_CHECK_OUTPUT", "False\n"),
        ("x = 6 * 7", None),
        ("# NBVAL_CHECK_OUTPUT\nprint(x)", "42\n"),
        ("# NBVAL_CHECK_OUTPUT\nprint(x + 1)", "42\n"),  # recorded output differs: fails
    ]
    for count, (source, output) in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(source, execution_count=count)
        if output is not None:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
        notebook.cells.append(cell)
    path = tmp_path / "tiny.ipynb"
    nbformat.write(notebook, str(path))
    checkout = make_checkout(tmp_path / "checkout")
    result = grade(checkout, tmp_path, "--parts", FAST_TWO_STAGE, "--notebooks", str(path))
    summary = result["json"]["notebooks"]
    # The first check passes: the kernel imported the graded copy, not the checkout or the grader.
    assert summary["checks"] == 3 and summary["checks_passed"] == 2, result["json"]["tests"]
    cells = [t for t in result["json"]["tests"] if t["set"] == "notebook"]
    assert [t["outcome"] for t in cells] == ["passed", "passed", "passed", "failed"], cells
    assert "2/3 checks passed" in result["stdout"]

"""The student release and the autograder, end to end.

The release is generated into a temporary folder and graded there by the same tests: the
untouched release must score zero on every student part (each stops at
``NotImplementedError``, none crashes the run) while the provided parts still pass. The
reference itself scores full marks in the main run of this suite (its grade table is
printed at the end).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_release  # noqa: E402

pytestmark = [
    pytest.mark.part("provided"),
    # When this suite grades another checkout, do not recurse into releasing that checkout.
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

STUDENT_PARTS = {
    "fcos.py": {"fpn", "locations", "fcos_head", "fcos_deltas", "centerness", "nms", "fcos_loss", "fcos_inference"},
    "two_stage_detector.py": {"rpn_head", "anchors", "iou", "rcnn_deltas", "rpn", "rpn_proposals", "faster_rcnn",
                              "faster_rcnn_inference"},
}


def test_strip_solutions_replaces_regions_at_their_indentation():
    source = (
        "def f(x):\n"
        '    """Doc."""\n'
        "    y = 1\n"
        "    # BEGIN SOLUTION (part_a): add \"one\" to x.\n"
        "    y = x + 1\n"
        "    # END SOLUTION\n"
        "    return y\n"
    )
    student, parts = make_release.strip_solutions(source)
    assert parts == ["part_a"]
    assert '    # TODO (part_a): add "one" to x.\n' in student
    assert '    raise NotImplementedError("part_a: add \\"one\\" to x.")\n' in student
    assert "x + 1" not in student and '"""Doc."""' in student
    namespace = {}
    exec(compile(student, "<student>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="part_a"):
        namespace["f"](1)


@pytest.mark.parametrize("source, problem", [
    ("# BEGIN SOLUTION (a): x\n# BEGIN SOLUTION (b): y\n# END SOLUTION\n", "inside the region opened at line 1"),
    ("x = 1\n# END SOLUTION\n", "END SOLUTION without"),
    ("# BEGIN SOLUTION (a): x\nx = 1\n", "never closed"),
])
def test_malformed_markers_are_reported_with_file_and_line(source, problem):
    with pytest.raises(make_release.MarkerError, match=f"mod.py:.*{problem}"):
        make_release.strip_solutions(source, "mod.py")


def test_reference_marks_every_student_part():
    for name, expected in STUDENT_PARTS.items():
        _, parts = make_release.strip_solutions((REPO_ROOT / name).read_text(), name)
        assert set(parts) == expected, f"{name}: marked {sorted(set(parts))}"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_release.py"), str(out), "--force"],
                   check=True, cwd=REPO_ROOT)
    return out


def test_release_keeps_docstrings_and_imports_cleanly(release):
    for name in ("fcos.py", "two_stage_detector.py", "a5_helper.py"):
        reference_tree = ast.parse((REPO_ROOT / name).read_text())
        student_tree = ast.parse((release / name).read_text())

        def docstrings(tree):
            """Docstrings of module-level functions and classes and of their methods
            (helpers nested inside a solution region go away with it)."""
            found = {}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    found[node.name] = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef):
                            found[f"{node.name}.{item.name}"] = ast.get_docstring(item)
            return found

        assert docstrings(student_tree) == docstrings(reference_tree), name
        lines = (release / name).read_text().splitlines()
        assert not any(make_release.BEGIN.match(line) or make_release.END.match(line) for line in lines), name
    code = "import fcos, two_stage_detector, a5_helper; fcos.hello_fcos()"
    result = subprocess.run([sys.executable, "-c", code], cwd=release, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for notebook in ("fcos.ipynb", "faster_rcnn.ipynb"):
        cells = json.loads((release / notebook).read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), notebook


def test_untouched_release_scores_zero_on_student_parts(release, tmp_path):
    grade_json = tmp_path / "grade.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "grade.py"), str(release), "--json", str(grade_json)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert grade_json.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    grade = json.loads(grade_json.read_text())
    parts = grade["parts"]
    expected_parts = set().union(*STUDENT_PARTS.values())
    graded_parts = set(parts) - {"provided"}
    assert graded_parts <= expected_parts, graded_parts - expected_parts
    # Every student part is graded by at least one test, and none passes on the release.
    assert graded_parts == expected_parts, expected_parts - graded_parts
    for name, row in parts.items():
        if name == "provided":
            assert row["failed"] == 0 and row["not_implemented"] == 0, row
            assert row["passed"] > 0
        else:
            assert row["status"] == "not implemented", (name, row)
            assert row["passed"] == 0 and row["failed"] == 0, (name, row)
    assert grade["total"] == 0
    assert "not implemented" in result.stdout

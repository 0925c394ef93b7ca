"""The student release, end to end (instructor only: never released).

* ``tools/make_release.py`` turns every solution region into a wrapped TODO and a
  ``NotImplementedError``, keeps docstrings, and copies only what a student needs.
* Round trip, for every part: graded from this repository (other parts from the
  reference), the untouched release scores zero on every student part and passes every
  provided test; a release with only one part restored scores that part fully.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import support
from support import REPO_ROOT, make_release

pytestmark = [
    pytest.mark.part("provided"),
    # When the tests grade another checkout, do not recurse into releasing that checkout.
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

# The parts of the assignment, in source order (the chapters' order).
STUDENT_PARTS = {
    "fcos.py": ["fpn", "locations", "fcos_head", "fcos_match_inside", "fcos_match_scale", "fcos_match_smallest",
                "fcos_deltas", "centerness", "fcos_loss_cls", "fcos_loss_box", "nms", "fcos_inference",
                "fcos_normalizer"],
    "two_stage_detector.py": ["rpn_head", "anchors", "iou", "rcnn_match", "rcnn_low_quality", "rcnn_deltas",
                              "rpn_loss", "rpn_proposals", "roi_losses", "roi_head", "roi_sampling",
                              "faster_rcnn_inference"],
}
ALL_PARTS = [(module, part) for module, parts in STUDENT_PARTS.items() for part in parts]


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
    assert '    raise NotImplementedError("part_a: not written yet (see the TODO above)")\n' in student
    assert "x + 1" not in student and '"""Doc."""' in student
    namespace = {}
    exec(compile(student, "<student>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="part_a"):
        namespace["f"](1)
    # keep=: that part's code stays (without markers).
    kept, parts = make_release.strip_solutions(source, keep=["part_a"])
    assert parts == [] and "y = x + 1" in kept and "SOLUTION" not in kept


def test_todo_text_is_wrapped_at_100_columns():
    what = " ".join(["word"] * 60)
    lines = make_release.todo_lines("        ", "p", what)
    assert len(lines) > 2 and all(len(line.rstrip("\n")) <= 100 for line in lines)
    assert lines[0].startswith("        # TODO (p): word") and all(l.startswith("        #") for l in lines)
    for name in STUDENT_PARTS:
        student, _ = make_release.strip_solutions((REPO_ROOT / name).read_text(), name)
        todo_block = [l for l in student.splitlines() if l.lstrip().startswith(("# TODO", "#   "))]
        assert todo_block and all(len(l) <= 100 for l in todo_block), name


@pytest.mark.parametrize("source, problem", [
    ("# BEGIN SOLUTION (a): x\n# BEGIN SOLUTION (b): y\n# END SOLUTION\n", "inside the region opened at line 1"),
    ("x = 1\n# END SOLUTION\n", "END SOLUTION without"),
    ("# BEGIN SOLUTION (a): x\nx = 1\n", "never closed"),
])
def test_malformed_markers_are_reported_with_file_and_line(source, problem):
    with pytest.raises(make_release.MarkerError, match=f"mod.py:.*{problem}"):
        make_release.strip_solutions(source, "mod.py")


def test_reference_marks_every_student_part_in_source_order():
    assert support.parts_by_module() == STUDENT_PARTS


def test_student_regions_are_learner_sized():
    """At most ~40 lines of reference code per region (most 5-25)."""
    for name in STUDENT_PARTS:
        lines = (REPO_ROOT / name).read_text().splitlines()
        start = None
        for number, line in enumerate(lines, start=1):
            if make_release.BEGIN.match(line):
                start = number
            elif make_release.END.match(line):
                assert number - start - 1 <= 40, f"{name}:{start}: region of {number - start - 1} lines"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_release.py"), str(out), "--force"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return out


def test_release_holds_the_student_side_only(release):
    names = {p.relative_to(release).as_posix() for p in release.rglob("*") if "__pycache__" not in p.parts}
    for required in ("fcos.py", "two_stage_detector.py", "a5_helper.py", "a5/kernels.py", "fcos.ipynb",
                     "faster_rcnn.ipynb", "README.md", "requirements.txt", "pytest.ini", "tests/test_fcos.py",
                     "tests/checks.py", "tests/isolation.py"):
        assert required in names, required
    for forbidden in ("tools", "grading", "benchmarks", ".ci", "tests/instructor", "tests/hidden", "docs",
                      "tests/test_notebooks.py", "tests/test_benchmarks.py", "tests/test_layout.py"):
        assert not any(n == forbidden or n.startswith(forbidden + "/") for n in names), forbidden
    readme = (release / "README.md").read_text()
    assert "TODO" in readme and "pytest" in readme and "graded" in readme
    assert "Instructors" not in readme
    assert "testpaths = tests" in (release / "pytest.ini").read_text()


def test_release_keeps_docstrings_and_imports_cleanly(release):
    for name in ("fcos.py", "two_stage_detector.py", "a5_helper.py"):
        reference_tree = ast.parse((REPO_ROOT / name).read_text())
        student_tree = ast.parse((release / name).read_text())

        def docstrings(tree):
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


def test_released_notebooks_have_no_outputs_or_run_metadata(release):
    import nbformat

    for notebook in ("fcos.ipynb", "faster_rcnn.ipynb"):
        nb = nbformat.read(release / notebook, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            assert "execution" not in cell.metadata, notebook
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, notebook


def test_release_collects_in_the_students_copy(release):
    """The student runs `pytest` in the release: every test collects (no instructor file
    is missing); the per-part table shows every part not implemented."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=release,
                            capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                 if k != "A5_SUBMISSION"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.lower().split("\n")[-2], result.stdout[-2000:]


def _untouched_grade(release: Path, tmp_path: Path) -> dict:
    grade_json = tmp_path / "grade.json"
    files = ["tests/test_fcos.py", "tests/test_two_stage_detector.py", "tests/test_kernels.py",
             *[f for f in ("tests/hidden/test_fcos_hidden.py", "tests/hidden/test_two_stage_hidden.py")
               if (REPO_ROOT / f).is_file()]]
    env = dict(os.environ, A5_SUBMISSION=str(release))
    subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                    "--grade-json", str(grade_json)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    return json.loads(grade_json.read_text())


def test_untouched_release_scores_zero_and_passes_the_provided_tests(release, tmp_path):
    grade = _untouched_grade(release, tmp_path)
    parts = grade["parts"]
    assert set(parts) - {"provided"} == {part for _, part in ALL_PARTS}
    for name, row in parts.items():
        if name == "provided":
            assert row["failed"] == 0 and row["not_implemented"] == 0 and row["passed"] > 0, row
        else:
            assert row["status"] == "not implemented" and row["passed"] == 0 and row["failed"] == 0, (name, row)
    assert grade["total"] == 0


@pytest.fixture(scope="module")
def single_part_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_parts")
    jobs = [(support.make_checkout(root / part, keep=[part]), part, module) for module, part in ALL_PARTS]
    results = support.grade_many(jobs, workers=2)
    return {part: result for (_, part, _), result in zip(jobs, results)}


@pytest.mark.parametrize("module, part", ALL_PARTS, ids=[part for _, part in ALL_PARTS])
def test_each_part_restored_alone_scores_fully(module, part, single_part_results):
    result = single_part_results[part]
    assert result.passed > 0 and result.failed == 0 and result.not_implemented == 0, (
        f"{part} restored alone: {result.passed} passed, {result.failed} failed, "
        f"{result.not_implemented} not implemented\n" + "\n".join(result.messages) + result.output[-2000:])

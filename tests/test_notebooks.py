"""The committed notebooks are valid nbformat (so `jupyter nbconvert --execute` and
papermill accept them), carry the recorded outputs of their checked cells only, and no
execution timestamps. nbval executes them in the main test run (pytest.ini)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("fcos.ipynb", "faster_rcnn.ipynb")
MARK = "# NBVAL_CHECK_OUTPUT"


@pytest.mark.part("provided")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_nbformat_with_recorded_checks_only(name):
    notebook = nbformat.read(REPO_ROOT / name, as_version=4)
    nbformat.validate(notebook)
    checks = 0
    for cell in notebook.cells:
        assert "execution" not in cell.metadata, f"{name}: execution timestamps in a cell's metadata"
        if cell.cell_type != "code":
            continue
        if cell.source.lstrip().startswith(MARK):
            checks += 1
            assert cell.outputs and cell.execution_count is not None, f"{name}: a check cell without its output"
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert "WRONG" not in text, f"{name}: a recorded check says WRONG:\n{text}"
        else:
            assert not cell.outputs, f"{name}: outputs recorded in an unchecked cell:\n{cell.source[:200]}"
    assert checks >= 8, f"{name}: {checks} check cells"


@pytest.mark.part("provided")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_student_part_is_named_in_a_notebook(name):
    """Each section that needs a student part says which function to write."""
    text = (REPO_ROOT / name).read_text()
    assert text.count("**Your part.**") >= 5
    module = "fcos.py" if name == "fcos.ipynb" else "two_stage_detector.py"
    import re

    parts = set(re.findall(r"^\s*# BEGIN SOLUTION \((\w+)\)", (REPO_ROOT / module).read_text(), re.MULTILINE))
    missing = [part for part in parts if f"`{part}`" not in text]
    assert not missing, f"{name} never names the parts {missing}"

#!/usr/bin/env python3
"""Re-record the expected outputs of the notebooks' sanity-check cells.

Usage::

    QUICK=1 python tools/refresh_notebook_checks.py fcos.ipynb faster_rcnn.ipynb

Runs each notebook top to bottom (quick mode), then stores the outputs of the cells marked
``# NBVAL_CHECK_OUTPUT`` (the values nbval compares exactly under ``pytest``) and clears
every other output, so the committed notebooks stay small and carry only fixed, checked
values. Run it after changing a check cell, and read the diff: every check must say OK.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MARK = "# NBVAL_CHECK_OUTPUT"


def refresh(path: Path, timeout: int) -> int:
    """Execute ``path`` and keep only the check cells' outputs; return their count."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    kept = 0
    for cell in notebook.cells:
        # Execution timestamps of this run: noise in diffs and in the student release.
        cell.metadata.pop("execution", None)
    for number, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        cell.execution_count = None
        if cell.source.lstrip().startswith(MARK):
            # nbval compares only cells that were run: a recorded cell keeps a count, and
            # nbformat requires the same count on its execute_result outputs.
            cell.execution_count = number + 1
            for output in cell.outputs:
                if output.get("output_type") == "execute_result":
                    output["execution_count"] = number + 1
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            if "WRONG" in text:
                raise SystemExit(f"{path}: a sanity check failed:\n{text}")
            kept += 1
        else:
            cell.outputs = []
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    if os.environ.get("QUICK") != "1":
        parser.error("set QUICK=1: the recorded outputs must come from the quick mode that CI runs")
    for path in args.notebooks:
        print(f"{path}: kept the outputs of {refresh(path, args.timeout)} check cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Repository-wide pytest setup (applies to the unit tests and to the notebooks).

Notebooks run under nbval in their quick mode (small data, few iterations) unless the
caller says otherwise, so that `pytest` on a laptop CPU finishes in minutes. The notebook
kernels inherit this process's environment, which is why the defaults live here.
"""
import os
from pathlib import Path

os.environ.setdefault("QUICK", "1")
# Headless plotting for kernels and tests; a user who wants windows sets MPLBACKEND.
os.environ.setdefault("MPLBACKEND", "Agg")
# Offline data and weights next to the repository (this project's CI layout), unless set.
_shared = Path(__file__).resolve().parent.parent / "shared"
os.environ.setdefault("VOC_ROOT", str(_shared / "data"))
os.environ.setdefault("TORCH_HOME", str(_shared / "weights"))

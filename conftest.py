"""Repository-wide pytest setup (applies to the unit tests and to the notebooks).

Notebooks run under nbval in their quick mode (small data, few iterations) unless the
caller says otherwise, so that `pytest` on a laptop CPU finishes in minutes. The notebook
kernels inherit this process's environment, which is why the defaults live here.
"""
import os

os.environ.setdefault("QUICK", "1")
# Headless plotting for kernels and tests; a user who wants windows sets MPLBACKEND.
os.environ.setdefault("MPLBACKEND", "Agg")

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


def pytest_collection_modifyitems(config, items):
    """Skip the notebooks, with the reason, when the VOC2007 data is not there.

    They load real images; without data (and without internet, the download fails)
    they cannot run. The unit tests make their own tiny datasets and still run.
    """
    import pytest

    voc = Path(os.environ["VOC_ROOT"]) / "VOCdevkit" / "VOC2007"
    if voc.is_dir():
        return
    skip = pytest.mark.skip(
        reason=f"the notebooks need PASCAL VOC2007 at VOC_ROOT={os.environ['VOC_ROOT']} "
        "(set VOC_ROOT to a VOCdevkit copy, or run them in Colab, which downloads it)"
    )
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(skip)

"""The course's ``common`` module (EECS 498/598 A4), served by our ``fcos.py``.

Put this folder first on ``sys.path`` (or copy its files beside the course notebooks);
see ``README.md`` in this folder.
"""
import os
import sys

# Make the repository root (the parent of this folder, or $A5_REPO) importable.
_ROOT = os.environ.get("A5_REPO") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "fcos.py")) and _ROOT not in sys.path:
    sys.path.append(_ROOT)

from fcos import (  # noqa: E402
    DetectorBackboneWithFPN,
    TensorDict,
    class_spec_nms,
    get_fpn_location_coords,
    nms,
)


def hello_common() -> None:
    print("Hello from common.py!")


__all__ = [
    "hello_common",
    "DetectorBackboneWithFPN",
    "get_fpn_location_coords",
    "nms",
    "class_spec_nms",
    "TensorDict",
]

"""The course's ``one_stage_detector`` module (EECS 498/598 A4), served by our ``fcos.py``.

Like the course module it also exposes what it imported: the ``a4_helper`` names,
``DetectorBackboneWithFPN``, ``class_spec_nms``, ``get_fpn_location_coords``,
``sigmoid_focal_loss`` and ``default_collate``. See ``README.md`` in this folder for
what differs from the course on purpose.
"""
import os
import sys

_ROOT = os.environ.get("A5_REPO") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "fcos.py")) and _ROOT not in sys.path:
    sys.path.append(_ROOT)

from torch.utils.data._utils.collate import default_collate  # noqa: E402,F401
from torchvision.ops import sigmoid_focal_loss  # noqa: E402,F401

from a4_helper import *  # noqa: E402,F401,F403
from common import DetectorBackboneWithFPN, class_spec_nms, get_fpn_location_coords  # noqa: E402,F401
from fcos import (  # noqa: E402
    FCOS,
    FCOSPredictionNetwork,
    TensorDict,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
)


def hello_one_stage_detector() -> None:
    print("Hello from one_stage_detector.py!")

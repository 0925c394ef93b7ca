"""The course's ``a4_helper`` module (EECS 498/598 A4), served by our ``a5_helper.py``.

``from a4_helper import *`` gives, as in the course, the helpers below and the
``eecs598`` package (``eecs598.utils.detection_visualizer``...). See ``README.md`` in
this folder for what differs from the course on purpose.
"""
import os
import sys
import time  # noqa: F401 (the course module exposed it to `import *`)

_ROOT = os.environ.get("A5_REPO") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "a5_helper.py")) and _ROOT not in sys.path:
    sys.path.append(_ROOT)

import torch  # noqa: E402,F401
from torchvision import transforms  # noqa: E402,F401

import eecs598  # noqa: E402,F401
from a5_helper import (  # noqa: E402,F401
    VOC2007DetectionTiny,
    detection_visualizer,
    inference_with_detector,
    infinite_loader,
    train_detector,
)


def hello_helper() -> None:
    print("Hello from a4_helper.py!")

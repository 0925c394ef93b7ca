"""``eecs598.utils`` (course): the helpers that the A4 notebooks use."""
import os
import sys

import torch

_ROOT = os.environ.get("A5_REPO") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.isfile(os.path.join(_ROOT, "a5_helper.py")) and _ROOT not in sys.path:
    sys.path.append(_ROOT)

from a5_helper import detection_visualizer, reset_seed  # noqa: E402,F401


def tensor_to_image(tensor: torch.Tensor):
    """A ``(3, H, W)`` tensor with values in [0, 1] as an ``(H, W, 3)`` uint8 numpy array."""
    scaled = (tensor.detach().float().cpu() * 255.0).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()

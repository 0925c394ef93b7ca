"""The part of the course's ``eecs598`` package that the A4 notebooks use, served by
our ``a5_helper.py``: ``reset_seed``, ``grad.rel_error``, ``utils.detection_visualizer``,
``utils.tensor_to_image``."""
from . import grad, utils  # noqa: F401
from .utils import reset_seed, tensor_to_image  # noqa: F401

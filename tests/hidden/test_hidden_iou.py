"""Hidden tests of ``iou`` (never shipped): touching and nested boxes, zero areas,
dtypes, empty inputs, against ``torchvision.ops.box_iou``."""
from __future__ import annotations

import pytest
import torch
import torchvision

from two_stage_detector import iou

pytestmark = pytest.mark.part("iou")


def test_touching_nested_and_identical_boxes():
    boxes1 = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 8.0, 4.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 4.0, 6.0, 6.0], [0.0, 0.0, 8.0, 4.0]])
    expected = torch.tensor([
        [1.0, 0.0, 0.5],      # identical; touching at a corner; half of the wide box
        [0.25, 0.0, 0.125],   # nested: 4 / 16 and 4 / 32
        [0.0, 0.0, 0.5],      # touching along an edge; the other half
    ])
    torch.testing.assert_close(iou(boxes1, boxes2), expected)
    torch.testing.assert_close(iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_boxes_shapes_and_dtype(dtype):
    gen = torch.Generator().manual_seed(17)
    xy1 = torch.rand(33, 2, generator=gen, dtype=dtype) * 50
    xy2 = torch.rand(9, 2, generator=gen, dtype=dtype) * 50
    boxes1 = torch.cat([xy1, xy1 + 1 + torch.rand(33, 2, generator=gen, dtype=dtype) * 30], dim=1)
    boxes2 = torch.cat([xy2, xy2 + 1 + torch.rand(9, 2, generator=gen, dtype=dtype) * 30], dim=1)
    result = iou(boxes1, boxes2)
    assert result.shape == (33, 9) and result.dtype == dtype
    torch.testing.assert_close(result, torchvision.ops.box_iou(boxes1, boxes2))
    assert iou(boxes1[:0], boxes2).shape == (0, 9)
    assert iou(boxes1, boxes2[:0]).shape == (33, 0)

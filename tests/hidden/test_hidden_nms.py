"""Hidden tests of ``nms`` (never shipped): ties, thresholds hit exactly, odd inputs.

Each case compares with ``torchvision.ops.nms``, the oracle (the tests may call it; the
student's code may not while the ``nms`` part is graded).
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from fcos import nms

pytestmark = pytest.mark.part("nms")


def _grid_boxes(n_side: int, size: float, step: float, dtype=torch.float32) -> torch.Tensor:
    """Boxes of side ``size`` on a grid of pitch ``step``: neighbours overlap by exact
    binary fractions, so many IoUs equal the threshold exactly."""
    coords = torch.arange(n_side, dtype=dtype) * step
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([x, y, x + size, y + size], dim=1)


@pytest.mark.parametrize("iou_threshold", [1 / 3, 0.5, 0.25])
def test_all_scores_tied_on_a_grid(iou_threshold):
    # Side 4, pitch 2: a horizontal neighbour overlaps 8 of 24 (IoU 1/3 exactly),
    # a diagonal one 4 of 28 (1/7). Every score ties: torchvision keeps index order.
    boxes = _grid_boxes(12, 4.0, 2.0)
    scores = torch.ones(len(boxes))
    expected = torchvision.ops.nms(boxes, scores, iou_threshold)
    kept = nms(boxes, scores, iou_threshold)
    assert kept.dtype == torch.int64
    assert torch.equal(kept, expected)


def test_few_distinct_scores_and_duplicates():
    gen = torch.Generator().manual_seed(15)
    boxes = _grid_boxes(10, 8.0, 4.0, dtype=torch.float64)
    boxes = torch.cat([boxes, boxes[::3]])  # exact duplicates, later indices
    scores = torch.randint(0, 3, (len(boxes),), generator=gen).to(torch.float64) / 2
    for threshold in (0.5, 1 / 3, 0.6):
        assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


def test_input_not_modified_and_permutation_consistent():
    gen = torch.Generator().manual_seed(16)
    boxes = _grid_boxes(8, 6.0, 3.0)
    scores = torch.rand(len(boxes), generator=gen)
    boxes_before, scores_before = boxes.clone(), scores.clone()
    kept = nms(boxes, scores, 0.4)
    assert torch.equal(boxes, boxes_before) and torch.equal(scores, scores_before)
    perm = torch.randperm(len(boxes), generator=gen)
    kept_perm = nms(boxes[perm], scores[perm], 0.4)
    assert torch.equal(perm[kept_perm], kept)  # distinct scores: same boxes, same order

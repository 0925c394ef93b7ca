"""Test-time flip (a5/tta.py): mirroring, merging, and predict_with_flip on a toy detector."""
import pytest
import torch
from torch import nn

from a5 import tta


def _out(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "scores": torch.tensor(scores)}


def test_mirror_boxes_values_and_involution():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 20.0], [0.0, 0.0, 224.0, 224.0]])
    mirrored = tta.mirror_boxes(boxes, 224)
    assert mirrored.tolist() == [[194.0, 5.0, 214.0, 20.0], [0.0, 0.0, 224.0, 224.0]]
    assert torch.equal(tta.mirror_boxes(mirrored, 224), boxes)


def test_merge_keeps_one_of_two_matching_boxes_and_adds_the_missed_one():
    # Image 0: the same object in both views (mirrored box 194..214 is 10..30) and an
    # object only the mirrored view finds. Image 1: detections in one view only.
    outputs = [_out([[10, 5, 30, 20]], [3], [0.9]), _out([[50, 50, 100, 100]], [1], [0.4])]
    mirrored = [_out([[194, 5, 214, 20], [20, 60, 40, 90], [0, 0, 0, 0]], [3, 7, -1], [0.8, 0.6, 0.0]),
                _out([], [], [])]
    merged = tta.merge_mirrored(outputs, mirrored, 224, nms_thresh=0.5)
    assert merged[0]["labels"].tolist() == [3, 7]
    assert merged[0]["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert merged[0]["boxes"].tolist() == [[10, 5, 30, 20], [184, 60, 204, 90]]
    assert merged[1]["labels"].tolist() == [1] and merged[1]["boxes"].tolist() == [[50, 50, 100, 100]]


def test_merge_other_classes_do_not_suppress_and_max_per_image_applies():
    outputs = [_out([[10, 10, 50, 50], [10, 10, 50, 50]], [0, 1], [0.9, 0.8])]
    mirrored = [_out([[174, 10, 214, 50]], [2], [0.7])]
    merged = tta.merge_mirrored(outputs, mirrored, 224, nms_thresh=0.5, max_per_image=2)
    assert merged[0]["labels"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="mirrored outputs"):
        tta.merge_mirrored(outputs, [], 224, 0.5)


class _BrightSpotDetector(nn.Module):
    """Finds one 'object': a 16-px box around the brightest column of the left half.
    Not mirror-symmetric on purpose, so that the two views disagree."""

    def predict(self, images, score_thresh=0.0, nms_thresh=0.5):
        outputs = []
        for image in images:
            half = image.shape[-1] // 2
            col = int(image[0, 0, :half].argmax())
            outputs.append(_out([[col, 0, col + 16, 16]], [0], [0.5 + col / 1000]))
        return outputs


def test_predict_with_flip_finds_objects_in_both_halves():
    images = torch.zeros(1, 3, 32, 64)
    images[0, :, 0, 10] = 1.0  # left half: seen directly
    images[0, :, 0, 50] = 2.0  # right half: seen only in the mirror image (column 13)
    merged = tta.predict_with_flip(_BrightSpotDetector(), images, 0.0, 0.5)
    boxes = sorted(merged[0]["boxes"].tolist())
    assert boxes == [[10, 0, 26, 16], [64 - 29, 0, 64 - 13, 16]]


def test_features_need_their_mirror_and_width_comes_from_c3():
    feats = {"c3": torch.zeros(2, 8, 28, 30), "c4": torch.zeros(2, 8, 14, 15), "c5": torch.zeros(2, 8, 7, 8)}
    assert tta.input_width(feats) == 240
    with pytest.raises(TypeError, match="flip"):
        tta.predict_with_flip(_BrightSpotDetector(), feats, 0.0, 0.5)


def test_width_can_be_given_for_sizes_that_are_not_multiples_of_8():
    class Fixed(nn.Module):
        def predict(self, images, score_thresh=0.0, nms_thresh=0.5):
            return [_out([[0, 0, 10, 10]], [0], [0.9]) for _ in range(len(images["c3"]))]

    feats = {"c3": torch.zeros(1, 8, 38, 38)}  # a 300-px input: c3 is 38 wide, 8 * 38 = 304
    merged = tta.predict_with_flip(Fixed(), feats, 0.0, 0.5, mirrored=feats, width=300)
    assert sorted(merged[0]["boxes"].tolist()) == [[0, 0, 10, 10], [290, 0, 300, 10]]

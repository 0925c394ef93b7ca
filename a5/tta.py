"""Test-time flip: detect on an image and on its mirror image, and merge the two.

A detector trained with flipped copies of its images (the feature cache's "flip" variant,
or random flips) still sees an image and its mirror image slightly differently. Running
both and keeping the best boxes of the union (class-wise NMS) recovers objects that one
of the two views misses, at twice the inference cost. The merge works on final
detections, so it applies unchanged to both detectors.

Images are mirrored with ``torch.flip`` along the width. Cached features cannot be
mirrored that way (a CNN is not exactly mirror-symmetric): for them the caller passes the
features of the mirrored image, e.g. the "flip" variant of a feature cache.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch import nn

from a5.kernels import select_detections

TensorDict = Dict[str, torch.Tensor]
ImagesOrFeatures = Union[torch.Tensor, TensorDict]


def mirror_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """XYXY boxes ``(N, 4)`` of an image of the given width, mirrored left-right
    (``x -> width - x``; x1 and x2 swap roles so that x1 <= x2 still holds)."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=1)


def mirror_images(images: ImagesOrFeatures) -> torch.Tensor:
    """The mirror images ``(B, 3, H, W)`` of an image batch. Feature dicts raise a
    ``TypeError``: pass the features of the mirrored images instead."""
    if isinstance(images, dict):
        raise TypeError("test-time flip of cached features needs the features of the mirrored images "
                        "(the cache's 'flip' variant), passed as `mirrored`")
    return torch.flip(images, dims=[-1])


def input_width(images: ImagesOrFeatures) -> int:
    """Width in pixels of the network input that ``images`` stands for: ``W`` of an image
    batch, ``8 * W_c3`` of a dict of c3/c4/c5 features (c3 has stride 8; exact when the
    width is a multiple of 8, else pass the width to ``predict_with_flip``)."""
    if isinstance(images, dict):
        return 8 * int(images["c3"].shape[-1])
    return int(images.shape[-1])


def merge_mirrored(
    outputs: List[TensorDict],
    mirrored_outputs: List[TensorDict],
    width: float,
    nms_thresh: float,
    max_per_image: Optional[int] = 100,
) -> List[TensorDict]:
    """
    Merge the detections of images with those of their mirror images.

    Args:
        outputs: ``B`` dicts with "boxes" ``(N_i, 4)``, "labels" ``(N_i,)``, "scores"
            ``(N_i,)`` (a detector's ``predict`` output; labels ``-1`` mark padding).
        mirrored_outputs: The same for the mirror images, boxes in mirrored pixels.
        width: Width of the network input (where the mirror axis lies).
        nms_thresh: IoU threshold of the class-wise NMS that removes duplicates.
        max_per_image: Most detections kept per image (``None``: all).

    Returns:
        ``B`` dicts like ``outputs``, boxes in the original images' pixels, by decreasing
        score.
    """
    if len(outputs) != len(mirrored_outputs):
        raise ValueError(f"expected as many mirrored outputs as outputs, got {len(mirrored_outputs)} "
                         f"and {len(outputs)}")
    boxes, scores, labels, image_ids = [], [], [], []
    for i, (out, mir) in enumerate(zip(outputs, mirrored_outputs)):
        for part, flipped in ((out, False), (mir, True)):
            keep = part["labels"] >= 0
            b = part["boxes"][keep].float()
            boxes.append(mirror_boxes(b, float(width)) if flipped else b)
            scores.append(part["scores"][keep].float())
            labels.append(part["labels"][keep].long())
            image_ids.append(torch.full((int(keep.sum()),), i, dtype=torch.long, device=b.device))
    return select_detections(torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(image_ids),
                             len(outputs), nms_thresh, max_per_image)


def predict_with_flip(
    detector: nn.Module,
    images: ImagesOrFeatures,
    score_thresh: float,
    nms_thresh: float,
    mirrored: Optional[ImagesOrFeatures] = None,
    max_per_image: Optional[int] = 100,
    width: Optional[float] = None,
) -> List[TensorDict]:
    """``detector.predict`` on ``images`` and on their mirror images, merged.

    Args:
        detector: Ours or any detector with ``predict(images, score_thresh=, nms_thresh=)``.
        images: ``(B, 3, H, W)`` images or a dict of their cached features.
        score_thresh, nms_thresh: As for ``predict`` (the NMS threshold also merges).
        mirrored: The mirrored input; computed with ``torch.flip`` for images, required
            for features.
        max_per_image: Most detections kept per image.
        width: Width of the network input, where the mirror axis lies (default:
            ``input_width(images)``).

    Returns:
        ``B`` dicts with "boxes", "labels", "scores", as ``predict`` returns them.
    """
    if mirrored is None:
        mirrored = mirror_images(images)
    outputs = detector.predict(images, score_thresh=score_thresh, nms_thresh=nms_thresh)
    mirrored_outputs = detector.predict(mirrored, score_thresh=score_thresh, nms_thresh=nms_thresh)
    width = input_width(images) if width is None else width
    return merge_mirrored(outputs, mirrored_outputs, width, nms_thresh, max_per_image)

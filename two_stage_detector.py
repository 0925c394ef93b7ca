"""Two-stage object detection: Faster R-CNN with a Feature Pyramid Network.

Faster R-CNN (Ren et al., 2015) detects objects in two stages:

1. The **Region Proposal Network (RPN)** slides a small conv net over every FPN level
   and, at every location, scores ``A`` *anchor boxes* (one per aspect ratio) for
   "is there any object here?" (objectness) and regresses how to move/stretch each
   anchor onto that object. The best few hundred transformed anchors, after NMS, are
   the *proposals* (a.k.a. regions of interest, RoIs).
2. The **second stage** (the "RoI head") crops a fixed-size feature grid for every
   proposal with RoI Align from the FPN level that suits the proposal's size (Lin et
   al., 2017), classifies it into ``num_classes + 1`` classes (background included)
   and, as in the paper, refines its box with class-specific box deltas. (The course
   version of this assignment only classifies proposals.)

This file reuses the backbone + FPN, the locations and the box clipping of ``fcos.py``; the
fast NMS and RoI Align behind training and inference are provided in ``a5/kernels.py``.

Conventions shared with ``fcos.py``:

* Boxes are ``XYXY`` in absolute pixels of the input image.
* Batched ground truth is a ``(B, N, 5)`` tensor with rows ``x1, y1, x2, y2, class``,
  padded with rows of ``-1``. Anchors matched to background get a row of ``-1`` and
  *neutral* anchors (ignored by the losses) a row of ``-1e8``.
* Feature dicts are keyed ``"p3", "p4", "p5"`` (strides 8, 16, 32). The detectors
  also accept a dict of backbone features ``"c3", "c4", "c5"`` in place of images
  (training from a feature cache with a frozen backbone).
* The classifier of the second stage predicts ``num_classes + 1`` logits where logit
  0 is background; GT class ``c`` (0-based) is logit ``c + 1``. Predicted labels are
  returned 0-based, like the GT.

Box parametrisation (R-CNN, Girshick et al. 2014): an anchor/proposal with centre
``(px, py)`` and size ``(pw, ph)`` is moved onto a box ``(bx, by, bw, bh)`` by
``dx = (bx - px) / pw, dy = (by - py) / ph, dw = log(bw / pw), dh = log(bh / ph)``.
The RPN uses these plain deltas. The second stage multiplies them by the usual
weights ``(10, 10, 5, 5)`` (Fast R-CNN / torchvision / detectron2), which scales the
small offsets of already well-placed proposals to a range where an L1 loss is useful.

Parts that students implement are wrapped in ``# BEGIN SOLUTION (part): ...`` /
``# END SOLUTION`` markers (see ``tools/make_release.py``); everything else is
provided.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from a5.kernels import nms_topk_per_image, roi_align, select_detections
from fcos import (
    TensorDict,
    _cat_across_fpn_levels,
    as_image_batch,
    at_least_float32,
    clip_boxes,
    clip_to_image_sizes,
    float32_or_wider,
    get_fpn_location_coords,
    image_size_of,
)

# Value of the rows of neutral anchors / proposals (ignored in training), and of their
# box deltas. Background rows are -1 (see the module docstring).
NEUTRAL = -1e8

# Largest allowed `dw, dh` when decoding: a box can grow at most 1000/16 times its
# anchor. Without a cap, `exp` of a wild prediction early in training overflows to inf.
_SCALE_CLAMP = math.log(1000.0 / 16)

# Level-assignment rule of the FPN paper, Eq. (1): a 224 x 224 RoI (ImageNet
# pre-training size) goes to level k0 = 4; half the size, one level lower.
_CANONICAL_BOX_SIZE = 224.0
_CANONICAL_LEVEL = 4


def hello_two_stage_detector() -> None:
    print("Hello from two_stage_detector.py!")


def _as_channel_list(stem_channels: Union[int, Sequence[int]]) -> List[int]:
    """Accept `stem_channels` as one int (a single layer) or a list of ints."""
    if isinstance(stem_channels, int):
        return [stem_channels]
    return list(stem_channels)


##############################################################################
# First stage: Region Proposal Network                                       #
##############################################################################


class RPNPredictionNetwork(nn.Module):
    """
    RPN prediction head, shared by all FPN levels. A *stem* of 3x3 convs (with
    ReLU) is followed by two 1x1 convs: one predicts ``A`` objectness logits per
    location (one per anchor), the other ``4 * A`` box deltas.

    Unlike FCOS, there is no classification: the RPN only answers "object or not",
    the second stage tells which class.
    """

    def __init__(self, in_channels: int, stem_channels: Union[int, List[int]], num_anchors: int = 3):
        """
        Args:
            in_channels: Number of channels of the FPN features (the same at all levels).
            stem_channels: Output channels of each 3x3 conv of the stem, e.g. ``[64, 64]``
                makes two layers. An int means a single layer.
            num_anchors: Number of anchors per location (``A``), usually the number of
                aspect ratios.
        """
        super().__init__()
        self.num_anchors = num_anchors
        stem_channels = _as_channel_list(stem_channels)
        # BEGIN SOLUTION (rpn_head): build `self.stem_rpn` (3x3 conv + ReLU per entry of stem_channels) and the 1x1 convs `self.pred_obj` (A channels) and `self.pred_box` (4A channels); He-initialise the stem convs, N(0, 0.01) the 1x1 convs, zero biases.
        stem_rpn = []
        prev_channels = in_channels
        for out_channels in stem_channels:
            stem_rpn += [nn.Conv2d(prev_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
            prev_channels = out_channels
        self.stem_rpn = nn.Sequential(*stem_rpn)
        self.pred_obj = nn.Conv2d(prev_channels, num_anchors, 1)
        self.pred_box = nn.Conv2d(prev_channels, 4 * num_anchors, 1)
        # Stem: He (fan-out) init. The paper's N(0, 0.01) suits its single conv, but
        # each extra N(0, 0.01) conv shrinks the features ~10x, and the objectness
        # loss then sits at log(2) for hundreds of iterations.
        # Predictors: small random weights and zero biases (as in the paper): the
        # initial objectness is 0.5 everywhere and the initial deltas are ~0, so
        # training starts from the anchors themselves.
        for layer in self.stem_rpn:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        for layer in (self.pred_obj, self.pred_box):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
        # END SOLUTION

    def forward(self, feats_per_fpn_level: TensorDict) -> List[TensorDict]:
        """
        Get objectness logits and box deltas for every anchor of every FPN level.

        Args:
            feats_per_fpn_level: Features keyed ``"p3", "p4", "p5"``, each of shape
                ``(B, in_channels, H, W)`` (``H, W`` differ per level).

        Returns:
            ``[obj_logits, boxreg_deltas]``, two dicts with the same keys:
            ``obj_logits[level]`` has shape ``(B, H * W * A)`` and
            ``boxreg_deltas[level]`` has shape ``(B, H * W * A, 4)``.
            Entries are ordered by location (row-major, x fastest, like
            ``get_fpn_location_coords``) and the ``A`` anchors of one location are
            contiguous: entry ``(y * W + x) * A + a`` is anchor ``a`` at ``(x, y)``,
            matching ``generate_fpn_anchors``.
        """
        object_logits: TensorDict = {}
        boxreg_deltas: TensorDict = {}
        # BEGIN SOLUTION (rpn_head): run the stem and both 1x1 convs on every level and flatten the outputs to (B, H*W*A) and (B, H*W*A, 4) with the anchors of one location contiguous.
        for level_name, feats in feats_per_fpn_level.items():
            batch_size = feats.shape[0]
            stem_out = self.stem_rpn(feats)
            # (B, A, H, W) -> (B, H, W, A) -> (B, H*W*A): anchors of a location stay together.
            obj = self.pred_obj(stem_out)
            object_logits[level_name] = obj.permute(0, 2, 3, 1).reshape(batch_size, -1)
            # (B, 4A, H, W) -> (B, H, W, 4A) -> (B, H*W*A, 4): channel 4a + k is delta k of anchor a.
            box = self.pred_box(stem_out)
            boxreg_deltas[level_name] = box.permute(0, 2, 3, 1).reshape(batch_size, -1, 4)
        # END SOLUTION
        return [object_logits, boxreg_deltas]


@torch.no_grad()
def generate_fpn_anchors(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Dict[str, int],
    stride_scale: float,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> TensorDict:
    """
    Generate multiple anchor boxes at every location of every FPN level. Anchor
    boxes are centred at the locations; they all have the same area at one level,
    ``(stride * stride_scale) ** 2``, and differ in aspect ratio (height / width):
    a ratio of 2 is a tall box, 0.5 a wide box.

    For area ``S`` and ratio ``r``: ``width = sqrt(S / r)``, ``height = r * width``
    (so that ``width * height = S`` and ``height / width = r``).

    Args:
        locations_per_fpn_level: Centres of the feature locations, keyed by level,
            each of shape ``(H * W, 2)`` giving ``(x, y)`` (see
            ``fcos.get_fpn_location_coords``).
        strides_per_fpn_level: Stride of each level, e.g. ``{"p3": 8, ...}``.
        stride_scale: Anchor side length (for ratio 1) in units of the stride.
        aspect_ratios: Height / width of the anchors at each location.

    Returns:
        Anchor boxes ``(x1, y1, x2, y2)`` keyed by level, each of shape
        ``(H * W * A, 4)``; the ``A`` anchors of one location are contiguous and
        in the order of ``aspect_ratios``.
    """
    anchors_per_fpn_level: TensorDict = {}
    # BEGIN SOLUTION (anchors): for every level, build the A anchors of every location (area (stride * stride_scale)^2, height / width = aspect ratio) and return them as (H*W*A, 4).
    for level_name, locations in locations_per_fpn_level.items():
        level_stride = strides_per_fpn_level[level_name]
        area = float(level_stride * stride_scale) ** 2
        ratios = torch.as_tensor(aspect_ratios, dtype=locations.dtype, device=locations.device)
        widths = torch.sqrt(area / ratios)
        heights = ratios * widths
        half_sizes = torch.stack([widths, heights], dim=1) / 2  # (A, 2)
        centers = locations[:, None, :]  # (H*W, 1, 2), broadcast over the A anchors
        anchors = torch.cat([centers - half_sizes, centers + half_sizes], dim=2)  # (H*W, A, 4)
        anchors_per_fpn_level[level_name] = anchors.reshape(-1, 4)
    # END SOLUTION
    return anchors_per_fpn_level


def iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """
    Compute the intersection-over-union of every box of ``boxes1`` with every box
    of ``boxes2``. Vectorised: no loops.

    Args:
        boxes1: Tensor of shape ``(M, 4)``, boxes ``(x1, y1, x2, y2)``.
        boxes2: Tensor of shape ``(N, 4)``.

    Returns:
        Tensor of shape ``(M, N)``; entry ``(i, j)`` is the IoU of ``boxes1[i]`` and
        ``boxes2[j]``, in ``[0, 1]``. Two empty boxes (union 0) have IoU 0.
    """
    # BEGIN SOLUTION (iou): compute the (M, N) matrix of pairwise IoUs with broadcasting (intersection / union).
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # (M,)
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # (N,)
    # Intersection rectangle of every pair: (M, N, 2) corners.
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    # Disjoint boxes give negative widths/heights: clamp them to an empty intersection.
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area1[..., :, None] + area2[..., None, :] - inter
    iou_matrix = inter / union.clamp(min=torch.finfo(union.dtype).tiny)
    # END SOLUTION
    return iou_matrix


def rcnn_match_by_threshold(
    ious: torch.Tensor, iou_thresholds: Tuple[float, float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Anchor matching, step 1: every anchor takes the GT box it overlaps most, and its
    best IoU decides what it is:

    * ``>= iou_thresholds[1]``: foreground (state ``1``), it regresses that box;
    * ``< iou_thresholds[0]``: background (state ``0``);
    * in between: neutral (state ``-1``), ambiguous, ignored in training.

    Args:
        ious: ``(B, A, N)`` IoU of every anchor with every GT box of its image
            (padding boxes have IoU ``-1``).
        iou_thresholds: ``(low, high)``, e.g. ``(0.3, 0.7)`` in the paper.

    Returns:
        ``(matched_idx, state)``, both ``(B, A)`` int64: the index of each anchor's
        best GT box (the first one among equal IoUs) and its state.
    """
    low, high = iou_thresholds
    # BEGIN SOLUTION (rcnn_match): Take each anchor's best IoU and its GT index (max over boxes), then set the state to 1 where best >= high, 0 where best < low and -1 in between.
    best_iou, matched_idx = ious.max(dim=2)
    state = torch.full_like(matched_idx, -1)
    state[best_iou >= high] = 1
    state[best_iou < low] = 0
    # END SOLUTION
    return matched_idx, state


def rcnn_low_quality_matches(ious: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Anchor matching, step 2 (Faster R-CNN's "low-quality matches"): a GT box whose
    anchors all have a low IoU (a very small or thin object) would get no anchor. So the
    anchor(s) with the highest IoU for each GT box (ties included) are foreground for
    it too, whatever that IoU, as long as it is above 0. An anchor that is the best
    anchor of several GT boxes takes the one it overlaps most.

    Args:
        ious: ``(B, A, N)`` IoUs, as in step 1.

    Returns:
        ``(promoted, best_gt_idx)``, both ``(B, A)``: bool, True for the anchors that
        are the best anchor of some GT box, and int64, the GT box each of them takes
        (any value where ``promoted`` is False).
    """
    # BEGIN SOLUTION (rcnn_low_quality): Find each GT box's highest IoU over anchors (max over dim 1), mark the anchors that reach it (and > 0), and let each marked anchor take the marked GT box it overlaps most.
    best_iou_per_gt = ious.max(dim=1, keepdim=True).values  # (B, 1, N)
    is_best = (ious == best_iou_per_gt) & (best_iou_per_gt > 0)
    best_quality, best_gt_idx = ious.masked_fill(~is_best, -1.0).max(dim=2)
    promoted = best_quality > 0
    # END SOLUTION
    return promoted, best_gt_idx


@torch.no_grad()
def rcnn_match_anchors_to_gt(
    anchor_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_thresholds: Tuple[float, float],
    allow_low_quality_matches: bool = True,
) -> torch.Tensor:
    """
    Match anchor boxes (or proposals) with GT boxes by IoU, as in Faster R-CNN:
    provided glue around ``iou`` and the two steps you write
    (``rcnn_match_by_threshold``, ``rcnn_low_quality_matches``). Foreground anchors get
    the row of their GT box, background anchors a row of ``-1`` and neutral anchors a
    row of ``-1e8``.

    This function is batched: with ``gt_boxes`` of shape ``(B, N, 5)`` every image is
    matched at once (padding rows with class ``-1`` never match).

    Args:
        anchor_boxes: Anchors ``(A, 4)`` shared by all images, or one set per image
            ``(B, A, 4)``.
        gt_boxes: GT boxes of one image ``(N, 5)`` or of a batch ``(B, N, 5)``, rows
            ``(x1, y1, x2, y2, class)``, padded with rows of ``-1``.
        iou_thresholds: ``(low, high)`` thresholds; ``(0.3, 0.7)`` in the paper.
        allow_low_quality_matches: Also make each GT box's best anchors foreground.

    Returns:
        Matched GT boxes, ``(A, 5)`` (or ``(B, A, 5)`` for batched ``gt_boxes``): for
        every anchor, the row of its GT box, ``-1`` (background) or ``-1e8`` (neutral).
    """
    batched = gt_boxes.dim() == 3
    gt = gt_boxes if batched else gt_boxes[None]
    num_images = gt.shape[0]
    anchors = anchor_boxes if anchor_boxes.dim() == 3 else anchor_boxes[None].expand(num_images, -1, -1)
    num_anchors = anchors.shape[1]
    if gt.shape[1] == 0:
        # No GT boxes at all: everything is background.
        matched = gt.new_full((num_images, num_anchors, 5), -1.0)
        return matched if batched else matched[0]

    # One call of your 2-D `iou` for the whole batch: every anchor against every GT box of
    # every image, then each image's block (shared anchors: a reshape; per-image anchors:
    # the diagonal blocks).
    all_gt = gt[..., :4].reshape(-1, 4)  # (B * N, 4)
    if anchor_boxes.dim() == 2:
        ious = iou(anchor_boxes, all_gt).view(num_anchors, num_images, -1).transpose(0, 1)  # (B, A, N)
    else:
        blocks = iou(anchors.reshape(-1, 4), all_gt).view(num_images, num_anchors, num_images, -1)
        image = torch.arange(num_images, device=blocks.device)
        ious = blocks[image, :, image]  # (B, A, N)
    ious = ious.masked_fill(gt[:, None, :, 4] == -1, -1.0)  # padding rows never match
    matched_idx, state = rcnn_match_by_threshold(ious, iou_thresholds)
    if allow_low_quality_matches:
        promoted, best_gt_idx = rcnn_low_quality_matches(ious)
        promoted &= state != 1  # foreground anchors keep their own best box
        matched_idx = torch.where(promoted, best_gt_idx, matched_idx)
        state = torch.where(promoted, torch.ones_like(state), state)

    matched = torch.gather(gt, 1, matched_idx[..., None].expand(num_images, num_anchors, 5))
    matched = matched.masked_fill(state[..., None] == 0, -1.0).masked_fill(state[..., None] == -1, NEUTRAL)
    return matched if batched else matched[0]


def rcnn_get_deltas_from_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """
    Get box regression deltas that transform ``anchors`` into ``gt_boxes`` (the
    R-CNN parametrisation):

        dx = wx * (gx - ax) / aw        dw = ww * log(gw / aw)
        dy = wy * (gy - ay) / ah        dh = wh * log(gh / ah)

    where ``(ax, ay, aw, ah)`` are the anchor centre and size, ``(gx, gy, gw, gh)``
    those of the GT box and ``(wx, wy, ww, wh) = weights`` (all 1 for the RPN,
    ``(10, 10, 5, 5)`` for the second stage).

    Background (``-1``) and neutral (``-1e8``) GT rows have no box: their deltas are
    ``-1e8`` so that a loss can tell them apart.

    Args:
        anchors: ``(..., 4)`` anchor boxes ``(x1, y1, x2, y2)``.
        gt_boxes: ``(..., 4)`` or ``(..., 5)`` matched GT boxes (class column ignored).
        weights: Multipliers of ``(dx, dy, dw, dh)``.

    Returns:
        Deltas ``(..., 4)``.
    """
    # BEGIN SOLUTION (rcnn_deltas): encode every GT box relative to its anchor as weighted (dx, dy, dw, dh); background (-1) and neutral (-1e8) rows get deltas of -1e8.
    wx, wy, ww, wh = weights
    gt = gt_boxes[..., :4]
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_x = anchors[..., 0] + 0.5 * anchor_w
    anchor_y = anchors[..., 1] + 0.5 * anchor_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_x = gt[..., 0] + 0.5 * gt_w
    gt_y = gt[..., 1] + 0.5 * gt_h
    deltas = torch.stack(
        [
            wx * (gt_x - anchor_x) / anchor_w,
            wy * (gt_y - anchor_y) / anchor_h,
            ww * torch.log(gt_w / anchor_w),
            wh * torch.log(gt_h / anchor_h),
        ],
        dim=-1,
    )
    # Rows without a box (log of a zero/negative size above) get the -1e8 marker.
    no_box = (gt == -1).all(dim=-1) | (gt == NEUTRAL).all(dim=-1)
    deltas = torch.where(no_box[..., None], torch.full_like(deltas, NEUTRAL), deltas)
    # END SOLUTION
    return deltas


def rcnn_apply_deltas_to_anchors(
    deltas: torch.Tensor,
    anchors: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """
    Inverse of ``rcnn_get_deltas_from_anchors``: move and stretch ``anchors`` by
    ``deltas`` to get boxes.

    ``dw, dh`` (after dividing by their weights) are clamped at
    ``log(1000 / 16)`` so that ``exp`` cannot overflow for wild predictions. Rows of
    ``-1e8`` deltas (background / neutral) decode to boxes of ``-1e8`` (never NaN).
    The input tensors are not modified.

    Args:
        deltas: ``(..., 4)`` deltas ``(dx, dy, dw, dh)``.
        anchors: ``(..., 4)`` boxes ``(x1, y1, x2, y2)`` (broadcastable to ``deltas``).
        weights: The weights used to encode the deltas.

    Returns:
        Boxes ``(..., 4)``, ``(x1, y1, x2, y2)``.
    """
    # BEGIN SOLUTION (rcnn_deltas): decode the weighted deltas back to XYXY boxes (clamping dw, dh at log(1000/16)); rows of -1e8 deltas give boxes of -1e8.
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_x = anchors[..., 0] + 0.5 * anchor_w
    anchor_y = anchors[..., 1] + 0.5 * anchor_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=_SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=_SCALE_CLAMP)
    center_x = anchor_x + dx * anchor_w
    center_y = anchor_y + dy * anchor_h
    half_w = 0.5 * anchor_w * torch.exp(dw)
    half_h = 0.5 * anchor_h * torch.exp(dh)
    boxes = torch.stack([center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h], dim=-1)
    no_box = (deltas == NEUTRAL).all(dim=-1)
    boxes = torch.where(no_box[..., None], torch.full_like(boxes, NEUTRAL), boxes)
    # END SOLUTION
    return boxes


@torch.no_grad()
def sample_rpn_training(
    gt_boxes: torch.Tensor, num_samples: int, fg_fraction: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Randomly pick foreground and background anchors (or proposals) to train on.
    There are far more background anchors than foreground ones; sampling a fixed
    number with a fixed foreground fraction keeps the loss balanced.

    At most ``int(num_samples * fg_fraction)`` foreground anchors (class ``>= 0``)
    are picked; when fewer exist, all of them are taken and background anchors
    (class ``-1``) fill the rest, up to ``num_samples`` in total (fewer if there are
    not enough). Neutral anchors (``-1e8``) are never picked.

    Batched use: with ``gt_boxes`` of shape ``(B, N, 5)``, each image gets its own
    ``num_samples`` (no per-image Python loop: random scores + ``topk`` per row), and
    the returned indices point into the flattened ``(B * N)`` anchors, so that
    ``x.flatten(0, 1)[idx]`` selects them and ``idx // N`` is their image.

    Args:
        gt_boxes: Matched GT boxes, ``(N, 5)`` or ``(B, N, 5)`` (output of
            ``rcnn_match_anchors_to_gt``).
        num_samples: Number of anchors to sample (per image when batched).
        fg_fraction: Largest fraction of foreground anchors in a sample.

    Returns:
        ``fg_idx, bg_idx``: 1D ``int64`` tensors of the sampled foreground and
        background indices, sorted.
    """
    labels = gt_boxes[..., 4]
    if labels.dim() == 1:
        labels = labels[None]
    num_images, num_anchors = labels.shape
    is_fg = labels >= 0
    is_bg = labels == -1
    max_fg = int(num_samples * fg_fraction)
    num_fg = is_fg.sum(dim=1).clamp(max=max_fg)  # (B,)
    num_bg = num_samples - num_fg  # (B,)
    k = min(num_samples, num_anchors)
    offsets = torch.arange(num_images, device=labels.device)[:, None] * num_anchors

    def pick(candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Random score in [0, 1) for candidates, -1 for the rest: the top `counts[b]`
        # of row b are a uniform random subset of its candidates.
        scores = torch.rand(candidates.shape, device=candidates.device)
        scores = scores.masked_fill(~candidates, -1.0)
        top_scores, top_idx = scores.topk(k, dim=1)
        rank = torch.arange(k, device=candidates.device)[None, :]
        keep = (rank < counts[:, None]) & (top_scores >= 0)
        return torch.sort((top_idx + offsets)[keep]).values

    return pick(is_fg, num_fg), pick(is_bg, num_bg)


def assign_fpn_levels(
    boxes: torch.Tensor,
    fpn_level_ids: Sequence[int] = (3, 4, 5),
) -> torch.Tensor:
    """
    FPN level of every box by Eq. (1) of the FPN paper:
    ``k = floor(k0 + log2(sqrt(w * h) / 224))`` with ``k0 = 4``, clamped to the
    available levels. Small boxes pool from high-resolution levels, large boxes
    from coarse ones.

    Args:
        boxes: ``(K, 4)`` boxes (any leading shape works).
        fpn_level_ids: Available level ids, e.g. ``(3, 4, 5)`` for p3-p5.

    Returns:
        ``int64`` tensor of level ids, shape ``boxes.shape[:-1]``.
    """
    widths = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    heights = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    sizes = torch.sqrt(widths * heights)
    # The small epsilon keeps exact powers of two (e.g. a 112 x 112 box) on their
    # level despite rounding, and log2(0) finite for empty boxes.
    levels = torch.floor(_CANONICAL_LEVEL + torch.log2(sizes / _CANONICAL_BOX_SIZE + 1e-6))
    levels = levels.clamp(min=min(fpn_level_ids), max=max(fpn_level_ids))
    return levels.to(torch.int64)


@torch.no_grad()
def reassign_proposals_to_fpn_levels(
    proposals_per_image: List[torch.Tensor],
    gt_boxes: Optional[torch.Tensor] = None,
    fpn_level_ids: Sequence[int] = (3, 4, 5),
) -> Dict[str, List[torch.Tensor]]:
    """
    The RPN gives proposals of many sizes. The second stage crops features for
    each proposal from the FPN level suited to its size (``assign_fpn_levels``).
    This function splits the proposals of every image by level. During training,
    the GT boxes are added to the proposals first (so that the second stage always
    sees some perfect foreground RoIs).

    Args:
        proposals_per_image: List of ``B`` tensors ``(P_i, 4)``. Not modified.
        gt_boxes: Optional ``(B, N, 5)`` GT boxes, padded with rows of ``-1``;
            padding rows are not added.
        fpn_level_ids: Available level ids.

    Returns:
        Dict keyed ``"p3", "p4", "p5"``; each value is a list of ``B`` tensors, the
        ``(P_i_level, 4)`` proposals of image ``i`` assigned to that level (in their
        original order).
    """
    proposals_per_fpn_level: Dict[str, List[torch.Tensor]] = {f"p{_id}": [] for _id in fpn_level_ids}
    for image_idx, proposals in enumerate(proposals_per_image):
        if gt_boxes is not None:
            image_gt = gt_boxes[image_idx]
            image_gt = image_gt[image_gt[:, 4] != -1]
            proposals = torch.cat([proposals, image_gt[:, :4].to(proposals)], dim=0)
        levels = assign_fpn_levels(proposals, fpn_level_ids)
        for level_id in fpn_level_ids:
            proposals_per_fpn_level[f"p{level_id}"].append(proposals[levels == level_id])
    return proposals_per_fpn_level


def multiscale_roi_align(
    feats_per_fpn_level: TensorDict,
    strides_per_fpn_level: Dict[str, int],
    boxes: torch.Tensor,
    batch_idx: torch.Tensor,
    output_size: Tuple[int, int],
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """
    RoI Align of every box from the FPN level that suits its size.

    Row ``k`` of the output is always the pooled features of ``boxes[k]`` in image
    ``batch_idx[k]``, whatever the levels and the batch size: the rows of each
    level are scattered back to the positions of their boxes. So features stay in
    the order of the RoIs (and of their labels and regression targets) by
    construction. (The course version concatenated pooled features level by level
    while the labels were image by image, which mixed up images in batches of more
    than one.)

    ``torchvision.ops.roi_align`` is called once per level for the whole batch,
    with ``aligned=True`` (pixel-exact half-pixel offsets) and ``sampling_ratio``
    sampling points per bin side (2, like torchvision's ``MultiScaleRoIAlign``).
    On CPU its gradient is computed by ``a5.kernels.roi_align``'s sparse backward (same
    values, much faster than torchvision's serial loop).

    Args:
        feats_per_fpn_level: ``(B, C, H, W)`` features keyed ``"p3", "p4", "p5"``.
        strides_per_fpn_level: Stride of each level.
        boxes: ``(K, 4)`` RoIs in image pixels.
        batch_idx: ``(K,)`` image index of each RoI.
        output_size: ``(h, w)`` of the pooled grid, e.g. ``(7, 7)``.
        sampling_ratio: Sampling points per bin side.

    Returns:
        ``(K, C, h, w)`` pooled features.
    """
    # Long: the docstring states every argument's shape (the course style); the code is 26 lines.
    level_names = list(feats_per_fpn_level.keys())
    level_ids = [int(name[1:]) for name in level_names]
    levels = assign_fpn_levels(boxes, level_ids)
    # Pooling interpolates at sub-pixel positions: done in float32 even when the
    # features are half precision (autocast), which also keeps the fast CPU backward.
    any_feats = feats_per_fpn_level[level_names[0]]
    dtype = float32_or_wider(any_feats.dtype)
    pooled = any_feats.new_zeros((boxes.shape[0], any_feats.shape[1], *output_size), dtype=dtype)
    rois = torch.cat([batch_idx[:, None].to(boxes), boxes], dim=1)  # roi_align's (K, 5) format
    for level_name, level_id in zip(level_names, level_ids):
        idx = torch.nonzero(levels == level_id).squeeze(1)
        if idx.numel() == 0:
            continue
        level_pooled = roi_align(
            at_least_float32(feats_per_fpn_level[level_name]),
            rois[idx].to(pooled),
            output_size,
            1.0 / strides_per_fpn_level[level_name],
            sampling_ratio,
        )
        pooled = pooled.index_copy(0, idx, level_pooled)
    if pooled.device.type == "cpu":
        # Same values, channels-last memory layout: oneDNN runs the convs of the RoI
        # head ~25% faster on it (as fcos.py does for the backbone).
        pooled = pooled.contiguous(memory_format=torch.channels_last)
    return pooled


def rpn_losses(
    obj_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    fg_idx: torch.Tensor,
    bg_idx: torch.Tensor,
    fg_gt_deltas: torch.Tensor,
    batch_size_per_image: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The two RPN losses, on the sampled anchors only (``sample_rpn_training`` picked
    them):

    * objectness: binary cross-entropy (with logits) of the sampled foreground anchors
      (target 1) and background anchors (target 0);
    * box regression: L1 loss between the predicted deltas of the sampled foreground
      anchors and their GT deltas (background anchors have no box).

    Both are sums divided by ``batch_size_per_image * B``: the nominal number of
    samples (as the course and detectron2 do), so that an image with few anchors does
    not weigh more.

    Args:
        obj_logits: ``(B, A)`` objectness logits of all anchors of all levels.
        box_deltas: ``(B, A, 4)`` predicted deltas.
        fg_idx, bg_idx: int64 indices of the sampled foreground / background anchors
            in the flattened ``(B * A)`` anchors (``obj_logits.reshape(-1)[fg_idx]``).
        fg_gt_deltas: ``(len(fg_idx), 4)`` GT deltas of the foreground anchors.
        batch_size_per_image: Anchors sampled per image.

    Returns:
        ``(loss_obj, loss_box)``, two scalars.
    """
    num_images = obj_logits.shape[0]
    # BEGIN SOLUTION (rpn_loss): BCE-with-logits (sum) of the sampled logits against 1 (fg) / 0 (bg), L1 (sum) of the fg predicted deltas against fg_gt_deltas, both divided by batch_size_per_image * B.
    sampled_logits = obj_logits.reshape(-1)[torch.cat([fg_idx, bg_idx])]
    targets = torch.cat([torch.ones_like(fg_idx), torch.zeros_like(bg_idx)]).to(sampled_logits)
    loss_obj = F.binary_cross_entropy_with_logits(sampled_logits, targets, reduction="sum")
    fg_pred_deltas = box_deltas.reshape(-1, 4)[fg_idx]
    loss_box = F.l1_loss(fg_pred_deltas, fg_gt_deltas, reduction="sum")
    total_samples = batch_size_per_image * num_images
    loss_obj, loss_box = loss_obj / total_samples, loss_box / total_samples
    # END SOLUTION
    return loss_obj, loss_box


def rpn_select_top_anchors(
    obj_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Proposals, step 1, on one FPN level: keep the ``k = min(topk, A)`` anchors of highest
    objectness of every image (a cheap pre-filter before decoding and NMS, which are
    costly), with their predicted deltas.

    Args:
        obj_logits: ``(B, A)`` objectness logits of the level's anchors.
        box_deltas: ``(B, A, 4)`` their predicted deltas.
        anchors: ``(A, 4)`` the level's anchors (the same for every image).
        topk: Anchors kept per image.

    Returns:
        ``(scores, deltas, anchors)``: ``(B, k)`` logits by decreasing value, and the
        ``(B, k, 4)`` deltas and anchors of the same anchors.
    """
    # BEGIN SOLUTION (rpn_proposals): topk of the logits per image (dim 1), then gather the deltas and index the anchors with the same indices.
    k = min(topk, obj_logits.shape[1])
    scores, top_idx = obj_logits.topk(k, dim=1)  # (B, k)
    deltas = torch.gather(box_deltas, 1, top_idx[..., None].expand(-1, -1, 4))
    top_anchors = anchors[top_idx]
    # END SOLUTION
    return scores, deltas, top_anchors


class RPN(nn.Module):
    """
    Region Proposal Network: the first stage of Faster R-CNN. It predicts
    objectness and box deltas for the anchors of every FPN level, turns the best
    ones into proposals and, in training, computes its two losses.
    """

    def __init__(
        self,
        fpn_channels: int,
        stem_channels: Union[int, List[int]],
        batch_size_per_image: int,
        anchor_stride_scale: float = 8,
        anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_iou_thresholds: Tuple[float, float] = (0.3, 0.6),
        nms_thresh: float = 0.7,
        pre_nms_topk: int = 400,
        post_nms_topk: int = 100,
        fg_fraction: float = 0.5,
        min_proposal_size: float = 1e-3,
    ):
        """
        Args:
            fpn_channels: Channels of the FPN features.
            stem_channels: Channels of the 3x3 convs of the prediction head's stem.
            batch_size_per_image: Anchors sampled per image for the losses.
            anchor_stride_scale: Anchor side (for ratio 1) in units of the level stride.
            anchor_aspect_ratios: Aspect ratios (height / width) of the anchors.
            anchor_iou_thresholds: ``(background, foreground)`` IoU thresholds of
                anchor matching; IoUs in between are neutral.
            nms_thresh: IoU threshold of the NMS over each image's proposals.
            pre_nms_topk: Proposals kept *per level* (per image) before NMS.
            post_nms_topk: Proposals kept per image after NMS.
            fg_fraction: Largest fraction of foreground anchors per sample.
            min_proposal_size: Proposals narrower or lower than this (pixels, after
                clipping to the image) are dropped.
        """
        super().__init__()
        self.pred_net = RPNPredictionNetwork(
            fpn_channels, _as_channel_list(stem_channels), num_anchors=len(anchor_aspect_ratios)
        )
        self.batch_size_per_image = batch_size_per_image
        self.anchor_stride_scale = anchor_stride_scale
        self.anchor_aspect_ratios = list(anchor_aspect_ratios)
        self.anchor_iou_thresholds = tuple(anchor_iou_thresholds)
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.fg_fraction = fg_fraction
        self.min_proposal_size = min_proposal_size

    def forward(
        self,
        feats_per_fpn_level: TensorDict,
        strides_per_fpn_level: Dict[str, int],
        gt_boxes: Optional[torch.Tensor] = None,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Union[List[torch.Tensor], torch.Tensor]]:
        """
        Args:
            feats_per_fpn_level: FPN features ``(B, C, H, W)`` keyed ``"p3", "p4", "p5"``.
            strides_per_fpn_level: Stride of each level.
            gt_boxes: ``(B, N, 5)`` GT boxes padded with ``-1`` rows; needed in training.
            image_size: ``(height, width)`` of the input images, to clip proposals.
                Defaults to ``stride * size`` of the p3 features (as
                ``fcos.image_size_of`` does for cached features).

        Returns:
            Dict with ``"proposals"``: a list of ``B`` tensors ``(P_i, 4)`` (detached,
            ``P_i <= post_nms_topk``, in decreasing objectness). In training, also
            ``"loss_rpn_obj"`` (binary cross-entropy of the sampled anchors) and
            ``"loss_rpn_box"`` (L1 loss of the deltas of the sampled foreground
            anchors), both normalised by ``batch_size_per_image * B``.
        """
        # Long: the docstring states every argument's shape (the course style); the code is 45 lines.
        p3 = feats_per_fpn_level["p3"]
        num_images = p3.shape[0]
        if image_size is None:
            image_size = (p3.shape[-2] * strides_per_fpn_level["p3"], p3.shape[-1] * strides_per_fpn_level["p3"])

        # Anchors, proposals and losses in float32 even under autocast.
        pred_obj_logits, pred_boxreg_deltas = (
            {name: at_least_float32(pred) for name, pred in level_dict.items()}
            for level_dict in self.pred_net(feats_per_fpn_level)
        )
        shapes = {name: feats.shape for name, feats in feats_per_fpn_level.items()}
        dtype = float32_or_wider(p3.dtype)
        locations = get_fpn_location_coords(shapes, strides_per_fpn_level, dtype=dtype, device=p3.device)
        anchors_per_fpn_level = generate_fpn_anchors(
            locations, strides_per_fpn_level, self.anchor_stride_scale, self.anchor_aspect_ratios
        )

        output_dict: Dict[str, Union[List[torch.Tensor], torch.Tensor]] = {
            "proposals": self.predict_proposals(
                anchors_per_fpn_level, pred_obj_logits, pred_boxreg_deltas, image_size
            )
        }
        if not self.training:
            return output_dict
        if gt_boxes is None:
            raise ValueError("RPN needs `gt_boxes` in training mode")

        anchor_boxes = _cat_across_fpn_levels(anchors_per_fpn_level, dim=0)  # (A_total, 4)
        obj_logits = _cat_across_fpn_levels(pred_obj_logits, dim=1)  # (B, A_total)
        box_deltas = _cat_across_fpn_levels(pred_boxreg_deltas, dim=1)  # (B, A_total, 4)
        num_anchors = anchor_boxes.shape[0]
        # Match all anchors of all images at once (B, A_total, 5), then sample
        # batch_size_per_image of them per image; indices point into the flattened
        # (B * A_total) anchors.
        matched_gt_boxes = rcnn_match_anchors_to_gt(anchor_boxes, gt_boxes.to(anchor_boxes), self.anchor_iou_thresholds)
        fg_idx, bg_idx = sample_rpn_training(matched_gt_boxes, self.batch_size_per_image, self.fg_fraction)
        fg_gt_deltas = rcnn_get_deltas_from_anchors(
            anchor_boxes[fg_idx % num_anchors], matched_gt_boxes.reshape(-1, 5)[fg_idx]
        )
        loss_obj, loss_box = rpn_losses(
            obj_logits, box_deltas, fg_idx, bg_idx, fg_gt_deltas, self.batch_size_per_image
        )
        output_dict["loss_rpn_obj"] = loss_obj
        output_dict["loss_rpn_box"] = loss_box
        return output_dict

    @torch.no_grad()
    def predict_proposals(
        self,
        anchors_per_fpn_level: TensorDict,
        pred_obj_logits: TensorDict,
        pred_boxreg_deltas: TensorDict,
        image_size: Union[int, Tuple[int, int]],
    ) -> List[torch.Tensor]:
        """
        Turn the RPN predictions into proposals, for all images at once:

        1. per level and image, keep the ``pre_nms_topk`` anchors of highest
           objectness (a cheap pre-filter: NMS is costly);
        2. apply their deltas, clip the boxes to the image, drop tiny boxes;
        3. NMS (``nms_thresh``) over all levels of each image;
        4. keep the ``post_nms_topk`` best proposals of each image.

        Args:
            anchors_per_fpn_level: ``(H*W*A, 4)`` anchors keyed by level.
            pred_obj_logits: ``(B, H*W*A)`` objectness logits keyed by level.
            pred_boxreg_deltas: ``(B, H*W*A, 4)`` deltas keyed by level.
            image_size: ``(height, width)`` (or one int for square images).

        Returns:
            List of ``B`` tensors ``(P_i, 4)``, proposals in decreasing objectness.
        """
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        boxes_per_level, scores_per_level = [], []
        for level_name, level_anchors in anchors_per_fpn_level.items():
            scores, deltas, anchors = rpn_select_top_anchors(
                pred_obj_logits[level_name], pred_boxreg_deltas[level_name], level_anchors, self.pre_nms_topk
            )
            boxes = rcnn_apply_deltas_to_anchors(deltas, anchors)
            boxes_per_level.append(clip_boxes(boxes, image_size))
            scores_per_level.append(scores)
        boxes = torch.cat(boxes_per_level, dim=1)  # (B, K, 4)
        scores = torch.cat(scores_per_level, dim=1)  # (B, K); logits rank like probabilities
        # Degenerate boxes (e.g. squashed by clipping) are useless RoIs.
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths > self.min_proposal_size) & (heights > self.min_proposal_size)
        # NMS within each image, all images in one call (a5.kernels).
        proposals = nms_topk_per_image(boxes, scores, valid, self.nms_thresh, self.post_nms_topk)
        return proposals


def roi_losses(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    gt_classes: torch.Tensor,
    gt_deltas: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The two losses of the second stage, on ``S`` sampled RoIs:

    * classification: cross-entropy over ``C + 1`` logits, where logit 0 is background
      and GT class ``c`` (0-based) is logit ``c + 1``;
    * box regression (class-specific, as in the paper): for every **foreground** RoI,
      the L1 loss between the 4 deltas predicted *for its GT class* and its GT deltas.

    Both are sums divided by ``S`` (at least 1).

    Args:
        cls_logits: ``(S, C + 1)`` class logits.
        box_deltas: ``(S, C, 4)`` predicted deltas, one set per class.
        gt_classes: ``(S,)`` int64 GT class of each RoI, ``-1`` for background.
        gt_deltas: ``(S, 4)`` GT deltas (rows of background RoIs are ``-1e8``: unused).

    Returns:
        ``(loss_cls, loss_box)``, two scalars.
    """
    num_rois = max(cls_logits.shape[0], 1)
    # BEGIN SOLUTION (roi_losses): Cross-entropy (sum) with targets gt_classes + 1; for foreground RoIs pick box_deltas[row, class] and take the L1 (sum) against gt_deltas; divide both by max(S, 1).
    loss_cls = F.cross_entropy(cls_logits, gt_classes + 1, reduction="sum") / num_rois
    fg_rows = torch.nonzero(gt_classes >= 0).squeeze(1)
    fg_pred_deltas = box_deltas[fg_rows, gt_classes[fg_rows]]  # (F, 4)
    loss_box = F.l1_loss(fg_pred_deltas, gt_deltas[fg_rows], reduction="sum") / num_rois
    # END SOLUTION
    return loss_cls, loss_box


##############################################################################
# Faster R-CNN                                                               #
##############################################################################


class FasterRCNN(nn.Module):
    """
    Faster R-CNN: backbone + FPN, RPN (first stage) and an RoI head (second stage)
    that classifies every proposal into ``num_classes + 1`` classes (0 is
    background) and regresses one box per class (class-specific deltas with the
    weights ``box_reg_weights``).

    The RoI head: RoI Align (``roi_size``) from the proposal's FPN level, a stem of
    3x3 convs (``stem_channels``, with ReLU), flatten, then two linear layers on the
    same flattened features: ``cls_pred`` (``num_classes + 1`` logits) and
    ``box_pred`` (``num_classes * 4`` deltas).
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        stem_channels: Union[int, List[int]],
        num_classes: int,
        batch_size_per_image: int,
        roi_size: Tuple[int, int] = (7, 7),
        fg_fraction: float = 0.25,
        roi_iou_threshold: float = 0.5,
        box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        detections_per_image: int = 100,
        test_score_thresh: float = 0.3,
        test_nms_thresh: float = 0.5,
    ):
        """
        Args:
            backbone: ``DetectorBackboneWithFPN`` (anything whose ``forward`` maps
                images or a c3/c4/c5 dict to p3/p4/p5 features, with ``fpn_strides``
                and ``out_channels``).
            rpn: The ``RPN``.
            stem_channels: Channels of the 3x3 convs of the RoI head's stem.
            num_classes: Number of object classes (background excluded).
            batch_size_per_image: RoIs sampled per image to train the RoI head.
            roi_size: Size of the RoI Align output grid.
            fg_fraction: Largest fraction of foreground RoIs per sample.
            roi_iou_threshold: IoU with a GT box from which a proposal is foreground
                (below it is background; no neutral band).
            box_reg_weights: Weights of the second stage's box deltas.
            detections_per_image: Most detections returned per image.
            test_score_thresh: Default score threshold at inference.
            test_nms_thresh: Default NMS IoU threshold at inference.
        """
        # Long: the course's arguments then one keyword per option, each documented; the code is 39 lines.
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.num_classes = num_classes
        self.roi_size = tuple(roi_size)
        self.batch_size_per_image = batch_size_per_image
        self.fg_fraction = fg_fraction
        self.roi_iou_threshold = roi_iou_threshold
        self.box_reg_weights = tuple(float(w) for w in box_reg_weights)
        self.detections_per_image = detections_per_image
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        stem_channels = _as_channel_list(stem_channels)
        in_channels = backbone.out_channels

        # BEGIN SOLUTION (roi_head): Build self.roi_stem (3x3 conv + ReLU per entry of stem_channels, then Flatten), self.cls_pred (Linear to num_classes + 1) and self.box_pred (Linear to num_classes * 4); He-init the stem convs.
        roi_stem = []
        prev_channels = in_channels
        for out_channels in stem_channels:
            roi_stem += [nn.Conv2d(prev_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
            prev_channels = out_channels
        roi_stem.append(nn.Flatten())
        self.roi_stem = nn.Sequential(*roi_stem)
        flat_features = prev_channels * self.roi_size[0] * self.roi_size[1]
        self.cls_pred = nn.Linear(flat_features, num_classes + 1)
        self.box_pred = nn.Linear(flat_features, num_classes * 4)
        # He (fan-out) init for the stem, as in the RPN: N(0, 0.01) convs in a row
        # shrink the RoI features ~10x per layer, and the linear layers above then
        # learn very slowly (3 AP50 lower on VOC07 with the CPU recipe). Torchvision
        # and detectron2 init this head the same way.
        for layer in self.roi_stem:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        # Small initial predictions: uniform class scores, boxes = proposals.
        nn.init.normal_(self.cls_pred.weight, mean=0.0, std=0.01)
        nn.init.normal_(self.box_pred.weight, mean=0.0, std=0.001)
        nn.init.zeros_(self.cls_pred.bias)
        nn.init.zeros_(self.box_pred.bias)
        # END SOLUTION

    def forward(
        self,
        images: Union[torch.Tensor, TensorDict],
        gt_boxes: Optional[torch.Tensor] = None,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
    ):
        """
        Args:
            images: ``(B, 3, H, W)`` images, or a dict of backbone features
                ``"c3", "c4", "c5"`` (the backbone is then skipped).
            gt_boxes: ``(B, N, 5)`` GT boxes padded with ``-1`` rows (training).
            test_score_thresh, test_nms_thresh: Inference thresholds (default: the
                constructor's).

        Returns:
            Training: dict of scalar losses ``loss_rpn_obj, loss_rpn_box, loss_cls,
            loss_box`` (their sum is the total loss).
            Evaluation (one image): ``(pred_boxes (M, 4), pred_classes (M,),
            pred_scores (M,))``. Use ``predict`` for batches.
        """
        feats_per_fpn_level = self.backbone(images)
        strides = self.backbone.fpn_strides
        image_size = image_size_of(images)
        num_images = feats_per_fpn_level["p3"].shape[0]

        if not self.training:
            if num_images != 1:
                raise ValueError(f"forward() in eval mode takes one image, got {num_images}: use predict()")
            proposals = self.rpn(feats_per_fpn_level, strides, image_size=image_size)["proposals"]
            detections = self.postprocess(
                feats_per_fpn_level,
                proposals,
                image_size,
                self.test_score_thresh if test_score_thresh is None else test_score_thresh,
                self.test_nms_thresh if test_nms_thresh is None else test_nms_thresh,
            )[0]
            return detections["boxes"], detections["labels"], detections["scores"]

        if gt_boxes is None:
            raise ValueError("FasterRCNN needs `gt_boxes` in training mode")
        output_dict = self.rpn(feats_per_fpn_level, strides, gt_boxes, image_size=image_size)
        proposals_per_image = output_dict.pop("proposals")
        losses = {name: value for name, value in output_dict.items()}

        # Anchors, RoIs and their targets in float32 even under autocast.
        p3 = feats_per_fpn_level["p3"]
        gt_boxes = gt_boxes.to(device=p3.device, dtype=float32_or_wider(p3.dtype))
        rois, roi_batch_idx, roi_targets = self.sample_rois(proposals_per_image, gt_boxes)
        roi_feats = multiscale_roi_align(feats_per_fpn_level, strides, rois, roi_batch_idx, self.roi_size)
        flat_feats = self.roi_stem(roi_feats)
        cls_logits = at_least_float32(self.cls_pred(flat_feats))  # (S, C + 1)
        box_deltas = at_least_float32(self.box_pred(flat_feats)).reshape(-1, self.num_classes, 4)  # (S, C, 4)
        # -1e8 rows for background RoIs: they have no box to regress to.
        gt_deltas = rcnn_get_deltas_from_anchors(rois, roi_targets, self.box_reg_weights)  # (S, 4)
        losses["loss_cls"], losses["loss_box"] = roi_losses(
            cls_logits, box_deltas, roi_targets[:, 4].long(), gt_deltas
        )
        return losses

    @torch.no_grad()
    def sample_rois(
        self, proposals_per_image: List[torch.Tensor], gt_boxes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Choose the RoIs that train the second stage, for all images at once:

        1. the candidates of image ``i`` are its proposals followed by its GT boxes
           (so that the second stage always sees some perfect foreground RoIs); the
           images have different numbers of proposals, so pad them to a ``(B, P, 4)``
           tensor and keep a ``(B, P + N)`` mask of the real entries;
        2. match the candidates to their own image's GT (``rcnn_match_anchors_to_gt``
           with both thresholds ``roi_iou_threshold``: no neutral band, and no
           low-quality matches since every GT box is a candidate itself);
        3. make the padding entries neutral (``-1e8``), so the sampler never picks them;
        4. sample ``batch_size_per_image`` per image, at most ``fg_fraction`` of them
           foreground (``sample_rpn_training``).

        Args:
            proposals_per_image: ``B`` tensors ``(P_i, 4)`` (from the RPN).
            gt_boxes: ``(B, N, 5)`` GT boxes padded with rows of ``-1``.

        Returns:
            ``(rois, roi_batch_idx, roi_targets)``: the ``S`` sampled RoIs ``(S, 4)``,
            their image index ``(S,)`` and their matched GT rows ``(S, 5)`` (``-1`` for
            background), foreground first.
        """
        # BEGIN SOLUTION (roi_sampling): Pad the proposals (pad_sequence), append the GT boxes, build the validity mask, match with (roi_iou_threshold, roi_iou_threshold) and no low-quality matches, make padding neutral, sample, and gather rois / image indices / targets with the sampled indices.
        num_proposals = torch.tensor([len(p) for p in proposals_per_image], device=gt_boxes.device)
        padded = nn.utils.rnn.pad_sequence(proposals_per_image, batch_first=True).to(gt_boxes)  # (B, P, 4)
        is_proposal = torch.arange(padded.shape[1], device=gt_boxes.device)[None, :] < num_proposals[:, None]
        candidates = torch.cat([padded, gt_boxes[..., :4]], dim=1)  # (B, P + N, 4)
        valid = torch.cat([is_proposal, gt_boxes[..., 4] != -1], dim=1)
        threshold = (self.roi_iou_threshold, self.roi_iou_threshold)
        matched = rcnn_match_anchors_to_gt(candidates, gt_boxes, threshold, allow_low_quality_matches=False)
        matched = torch.where(valid[..., None], matched, torch.full_like(matched, NEUTRAL))
        fg_idx, bg_idx = sample_rpn_training(matched, self.batch_size_per_image, self.fg_fraction)
        # Indices into the flattened (B * (P + N)) candidates.
        sampled_idx = torch.cat([fg_idx, bg_idx])
        rois = candidates.reshape(-1, 4)[sampled_idx]
        roi_batch_idx = sampled_idx // candidates.shape[1]
        roi_targets = matched.reshape(-1, 5)[sampled_idx]
        # END SOLUTION
        return rois, roi_batch_idx, roi_targets

    @torch.no_grad()
    def predict(
        self,
        images: Union[torch.Tensor, TensorDict],
        score_thresh: Optional[float] = None,
        nms_thresh: Optional[float] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """
        Detect objects in a batch of images (or cached c3/c4/c5 features). Runs in
        eval mode and restores the previous mode afterwards. The thresholds default to
        the constructor's ``test_score_thresh`` and ``test_nms_thresh``. A list of
        ``(3, H_i, W_i)`` images of any sizes is padded into one batch (boxes clipped to
        each image); an empty batch gives ``[]``.

        Returns:
            One dict per image with ``"boxes"`` ``(M, 4)``, ``"labels"`` ``(M,)``
            (0-based classes) and ``"scores"`` ``(M,)``, in decreasing score,
            ``M <= detections_per_image``.
        """

        images, sizes = as_image_batch(images)  # lists of any sizes; empty batches
        if images is None:
            return []
        was_training = self.training
        self.eval()
        try:
            feats_per_fpn_level = self.backbone(images)
            image_size = image_size_of(images)
            strides = self.backbone.fpn_strides
            proposals = self.rpn(feats_per_fpn_level, strides, image_size=image_size)["proposals"]
            score_thresh = self.test_score_thresh if score_thresh is None else score_thresh
            nms_thresh = self.test_nms_thresh if nms_thresh is None else nms_thresh
            results = self.postprocess(feats_per_fpn_level, proposals, image_size, score_thresh, nms_thresh)
        finally:
            self.train(was_training)
        return clip_to_image_sizes(results, sizes)

    @torch.no_grad()
    def postprocess(
        self,
        feats_per_fpn_level: TensorDict,
        proposals_per_image: List[torch.Tensor],
        image_size: Tuple[int, int],
        score_thresh: float,
        nms_thresh: float,
    ) -> List[Dict[str, torch.Tensor]]:
        """
        Second stage at inference, for a batch: every (proposal, class) pair is a
        candidate detection with the softmax probability of that class and the box
        decoded from that class's deltas. Background is dropped, candidates below
        ``score_thresh`` or with empty boxes are dropped, class-specific NMS runs
        per image and the best ``detections_per_image`` of each image are kept.

        Returns:
            One dict per image, as ``predict``.
        """
        num_images = len(proposals_per_image)
        device = feats_per_fpn_level["p3"].device
        rois = torch.cat(proposals_per_image, dim=0)  # (R, 4), image by image
        num_proposals = torch.tensor([len(p) for p in proposals_per_image], device=device)
        roi_batch_idx = torch.repeat_interleave(torch.arange(num_images, device=device), num_proposals)
        roi_feats = multiscale_roi_align(feats_per_fpn_level, self.backbone.fpn_strides, rois, roi_batch_idx, self.roi_size)
        flat_feats = self.roi_stem(roi_feats)
        cls_logits = at_least_float32(self.cls_pred(flat_feats))  # (R, C + 1)
        box_deltas = at_least_float32(self.box_pred(flat_feats)).reshape(-1, self.num_classes, 4)  # (R, C, 4)
        boxes, scores, labels, keep = self.roi_candidates(rois, cls_logits, box_deltas, image_size, score_thresh)
        image_ids = roi_batch_idx.repeat_interleave(self.num_classes)  # (R * C,)
        return select_detections(
            boxes[keep], scores[keep], labels[keep], image_ids[keep], num_images, nms_thresh, self.detections_per_image
        )

    @torch.no_grad()
    def inference(
        self,
        images: Union[torch.Tensor, TensorDict],
        proposals: Union[Dict[str, List[torch.Tensor]], List[torch.Tensor], torch.Tensor],
        pred_cls_logits: Optional[torch.Tensor] = None,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
        *,
        pred_box_deltas: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The course's second-stage inference for a single image (batch size 1).

        Args:
            images: The ``(1, 3, H, W)`` image (or its c3/c4/c5 feature dict).
            proposals: The image's RPN proposals, in any of the course's forms: a dict
                ``{"p3": [P3_0], "p4": [P4_0], "p5": [P5_0]}`` of per-image lists
                (``reassign_proposals_to_fpn_levels``; the levels are concatenated in
                the dict's order), a list with one ``(P, 4)`` tensor (our RPN's
                output), or a ``(P, 4)`` / ``(1, P, 4)`` tensor.
            pred_cls_logits: ``(P, num_classes + 1)`` logits of these proposals, in
                the same order (logit 0: background). ``None``: computed here.
            test_score_thresh, test_nms_thresh: Thresholds (``None``: the
                constructor's ``test_score_thresh`` / ``test_nms_thresh``).
            pred_box_deltas: ``(P, num_classes * 4)`` class-specific box deltas
                (our second stage also refines the boxes; the course's does not).
                ``None``: computed from ``images`` and the proposals.

        Returns:
            ``(pred_boxes (M, 4), pred_classes (M,), pred_scores (M,))``: absolute
            XYXY boxes, 0-based classes (never background) and softmax scores, by
            decreasing score, as ``forward`` in eval mode.
        """
        # Long: the docstring states every argument's shape (the course style); the code is 43 lines.
        if isinstance(proposals, dict):
            per_level = [level_props[0] for level_props in proposals.values() if len(level_props) > 0]
            rois = torch.cat(per_level, dim=0) if per_level else torch.zeros(0, 4)
        elif isinstance(proposals, (list, tuple)):
            if len(proposals) != 1:
                raise ValueError(f"inference() takes one image, got proposals for {len(proposals)}: use predict()")
            rois = proposals[0]
        else:
            rois = proposals[0] if proposals.dim() == 3 else proposals
        need_head = pred_cls_logits is None or pred_box_deltas is None
        feats_per_fpn_level = self.backbone(images) if need_head else None
        device = feats_per_fpn_level["p3"].device if need_head else pred_cls_logits.device
        rois = at_least_float32(rois.to(device=device))
        if need_head:
            if feats_per_fpn_level["p3"].shape[0] != 1:
                raise ValueError("inference() takes one image: use predict() for batches")
            roi_batch_idx = torch.zeros(rois.shape[0], dtype=torch.long, device=device)
            roi_feats = multiscale_roi_align(
                feats_per_fpn_level, self.backbone.fpn_strides, rois, roi_batch_idx, self.roi_size
            )
            flat_feats = self.roi_stem(roi_feats)
            if pred_cls_logits is None:
                pred_cls_logits = self.cls_pred(flat_feats)
            if pred_box_deltas is None:
                pred_box_deltas = self.box_pred(flat_feats)
        cls_logits = at_least_float32(pred_cls_logits)
        if cls_logits.shape != (rois.shape[0], self.num_classes + 1):
            raise ValueError(
                f"pred_cls_logits has shape {tuple(cls_logits.shape)}, expected "
                f"({rois.shape[0]}, {self.num_classes + 1}) for {rois.shape[0]} proposals"
            )
        box_deltas = at_least_float32(pred_box_deltas).reshape(-1, self.num_classes, 4)
        rois = rois.to(cls_logits)
        score_thresh = self.test_score_thresh if test_score_thresh is None else test_score_thresh
        nms_thresh = self.test_nms_thresh if test_nms_thresh is None else test_nms_thresh
        boxes, scores, labels, keep = self.roi_candidates(
            rois, cls_logits, box_deltas, image_size_of(images), score_thresh
        )
        image_ids = torch.zeros_like(labels)
        det = select_detections(
            boxes[keep], scores[keep], labels[keep], image_ids[keep], 1, nms_thresh, self.detections_per_image
        )[0]
        return det["boxes"], det["labels"], det["scores"]

    def roi_candidates(
        self,
        rois: torch.Tensor,
        cls_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        image_size: Tuple[int, int],
        score_thresh: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Second stage at inference: every (RoI, class) pair is a candidate detection,
        scored by the softmax probability of that class, with the box decoded from that
        class's deltas (``rcnn_apply_deltas_to_anchors`` with ``box_reg_weights``) and
        clipped to the image (``clip_boxes``). Background is not a candidate.

        Args:
            rois: ``(R, 4)`` proposals.
            cls_logits: ``(R, C + 1)`` class logits (logit 0: background).
            box_deltas: ``(R, C, 4)`` deltas per class.
            image_size: ``(height, width)`` for clipping.
            score_thresh: Keep candidates with a larger score.

        Returns:
            ``(boxes, scores, labels, keep)`` over the ``R * C`` candidates, entry
            ``r * C + c`` = (RoI ``r``, class ``c``): boxes ``(R*C, 4)``, scores
            ``(R*C,)``, 0-based labels ``(R*C,)``, and the bool ``keep`` ``(R*C,)`` that
            is True for a score above ``score_thresh`` and a box of positive width
            and height.
        """
        # BEGIN SOLUTION (faster_rcnn_inference): Softmax over C + 1 classes and drop column 0; decode every class's box from its RoI with box_reg_weights and clip it; flatten (R, C) to R * C; keep = score > thresh and positive width and height.
        probs = F.softmax(cls_logits, dim=1)[:, 1:]  # (R, C), background dropped
        boxes = rcnn_apply_deltas_to_anchors(box_deltas, rois[:, None, :], self.box_reg_weights)  # (R, C, 4)
        boxes = clip_boxes(boxes, image_size).reshape(-1, 4)
        scores = probs.reshape(-1)
        labels = torch.arange(self.num_classes, device=rois.device).repeat(rois.shape[0])
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (scores > score_thresh) & (widths > 0) & (heights > 0)
        # END SOLUTION
        return boxes, scores, labels, keep

"""torchvision's FCOS and Faster R-CNN, configured like ours and wrapped in our interface.

The benchmarks compare our detectors with what a user would pick instead: torchvision's
``FCOS`` and ``FasterRCNN``. For the comparison to mean something both sides must be the
same network doing the same work, so the builders here configure torchvision's models the
way ours are configured:

* the *same backbone body*: a copy (same weights) of our ``DetectorBackboneWithFPN.backbone``
  feature extractor returning ``{"c3", "c4", "c5"}``;
* torchvision's ``FeaturePyramidNetwork`` of the same width on those three levels, with no
  extra P6/P7 block (so three levels, strides 8/16/32, like ours), starting from a copy of
  our FPN's weights (the layers are the same, so both FPNs compute the same features);
* the same head depth (FCOS: ``num_convs = len(stem_channels)``; RPN: ``conv_depth =
  len(stem_channels)``; RoI head: the same conv stem, then one linear layer), the same
  anchors, IoU thresholds, sample sizes and top-k's;
* ``GeneralizedRCNNTransform`` replaced by :class:`FixedSizeTransform`, which neither resizes
  nor normalises: our data pipeline already delivers normalised, fixed-size images, and our
  detectors do no resizing either.

Torchvision keeps its own conventions where they are part of "its" detector: FCOS anchor
points sit at ``x * stride`` (ours at ``(x + 0.5) * stride``), its FCOS head has GroupNorm
(``head_norm="groupnorm"``, configurable), and its RoI head always regresses boxes.

:class:`TorchvisionDetector` wraps either model in *our* interface so that our training loop
and evaluation run it unchanged: ``forward(x, gt_boxes)`` with ``x`` an image batch
``(B, 3, H, W)`` or a feature dict ``{"c3", "c4", "c5"}`` (frozen-backbone feature-cache
mode) and ``gt_boxes`` padded ``(B, N, 5)`` rows ``x1, y1, x2, y2, class`` (-1 padding);
training returns a dict of scalar losses, ``predict`` returns one dict per image with
``boxes``, ``labels`` (0-based classes) and ``scores``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

TensorDict = Dict[str, torch.Tensor]
LEVELS = ("p3", "p4", "p5")
STRIDES = (8, 16, 32)


# --------------------------------------------------------------------------------------
# Shared pieces: backbone + FPN, a transform that does nothing, GT format conversion
# --------------------------------------------------------------------------------------


class TorchvisionBackboneFPN(nn.Module):
    """Our backbone body followed by torchvision's ``FeaturePyramidNetwork`` (3 levels).

    Args:
        body: a module mapping images ``(B, 3, H, W)`` to ``{"c3", "c4", "c5"}`` (strides 8,
            16, 32); the benchmarks pass a deep copy of our ``DetectorBackboneWithFPN.backbone``
            so that both detectors start from identical backbone weights.
        in_channels: channels of c3, c4, c5.
        out_channels: FPN width (same as ours).
        freeze_body: run the body under ``no_grad`` and keep it in eval mode (frozen-backbone
            mode, like ours with ``freeze_backbone=True``).
        tune_last_stage: with ``freeze_body``, train the body's c4 -> c5 stage all the same
            and recompute c5 from c4 (like ours with ``tune_last_stage=True``).

    ``forward`` takes images or an already computed ``{"c3", "c4", "c5"}`` dict (feature
    cache) and returns an ``OrderedDict`` ``{"p3", "p4", "p5"}``; torchvision's detectors read
    ``self.out_channels``.
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int,
                 freeze_body: bool = False, tune_last_stage: bool = False) -> None:
        super().__init__()
        self.body = body
        # extra_blocks=None: no LastLevelMaxPool / P6P7, so exactly three output levels.
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=None)
        self.out_channels = out_channels
        self.freeze_body = freeze_body
        if freeze_body:
            self.body.requires_grad_(False)
            self.body.eval()
        from fcos import last_stage_of, unfreeze_except_batchnorm  # (lazy, like BACKBONE_SPECS below)

        if tune_last_stage and not freeze_body:
            raise ValueError("tune_last_stage=True trains the last stage of a frozen body: pass freeze_body=True")

        self.tune_last_stage = tune_last_stage
        # The body's own c4 -> c5 layers (shared weights), outside the registered children.
        self.__dict__["_last_stage"] = last_stage_of(body) if tune_last_stage else None
        if tune_last_stage:
            unfreeze_except_batchnorm(self._last_stage)

    @classmethod
    def from_ours(cls, ours_backbone: nn.Module, freeze_body: Optional[bool] = None,
                  copy_fpn: bool = True) -> "TorchvisionBackboneFPN":
        """Copy the body (weights included) of our ``DetectorBackboneWithFPN``.

        ``copy_fpn``: also copy our FPN's weights into torchvision's FPN (same layers: 1x1
        laterals, nearest top-down upsampling + sum, 3x3 outputs), so that both detectors
        start from the same backbone *and* FPN; the heads are initialised by each library.
        The channels of c3/c4/c5 come from our backbone spec table, else from a dummy
        forward pass.
        """
        body = copy.deepcopy(ours_backbone.backbone)
        in_channels = _body_channels(ours_backbone, body)
        if freeze_body is None:
            freeze_body = bool(getattr(ours_backbone, "freeze_backbone", False))
        module = cls(body, in_channels, ours_backbone.out_channels, freeze_body=freeze_body,
                     tune_last_stage=bool(getattr(ours_backbone, "tune_last_stage", False)))
        fpn_params = getattr(ours_backbone, "fpn_params", None)
        if copy_fpn and fpn_params is not None:
            module.copy_fpn_from(fpn_params)
        return module

    @torch.no_grad()
    def copy_fpn_from(self, fpn_params: nn.Module) -> bool:
        """Copy ``lateral_c{3,4,5}`` / ``output_p{3,4,5}`` convs (the course's names) into
        torchvision's ``inner_blocks`` / ``layer_blocks``; False (nothing copied) when the
        names or shapes differ."""
        pairs = []
        for i, level in enumerate(("3", "4", "5")):
            for ours_name, theirs in ((f"lateral_c{level}", self.fpn.inner_blocks[i][0]),
                                      (f"output_p{level}", self.fpn.layer_blocks[i][0])):
                ours = fpn_params[ours_name] if ours_name in fpn_params else None
                if not isinstance(ours, nn.Conv2d) or ours.weight.shape != theirs.weight.shape:
                    return False
                pairs.append((ours, theirs))
        for ours, theirs in pairs:
            theirs.weight.copy_(ours.weight)
            if ours.bias is not None and theirs.bias is not None:
                theirs.bias.copy_(ours.bias)
        return True

    def train(self, mode: bool = True) -> "TorchvisionBackboneFPN":
        super().train(mode)
        if self.freeze_body:
            self.body.eval()  # frozen BatchNorm statistics, like our frozen backbone
        return self

    def forward(self, x: Union[torch.Tensor, TensorDict]) -> "OrderedDict[str, torch.Tensor]":
        if isinstance(x, dict):
            feats = x
        elif self.freeze_body:
            with torch.no_grad():
                feats = self.body(x)
        else:
            feats = self.body(x)
        if self.tune_last_stage:
            feats = {**feats, "c5": self._last_stage(feats["c4"])}
        out = self.fpn(OrderedDict((k, feats[k]) for k in ("c3", "c4", "c5")))
        return OrderedDict(zip(LEVELS, out.values()))


def _body_channels(ours_backbone: nn.Module, body: nn.Module) -> List[int]:
    """Channels of c3, c4, c5 of our backbone body."""
    try:
        from fcos import BACKBONE_SPECS  # provided table: name -> spec with .channels

        channels = BACKBONE_SPECS[ours_backbone.backbone_name].channels
        return [int(channels[k]) for k in ("c3", "c4", "c5")]
    except (ImportError, AttributeError, KeyError):
        param = next(body.parameters())
        was_training = body.training
        body.eval()
        with torch.no_grad():
            feats = body(torch.zeros(1, 3, 64, 64, dtype=param.dtype, device=param.device))
        body.train(was_training)
        return [int(feats[k].shape[1]) for k in ("c3", "c4", "c5")]


class FixedSizeTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` with resizing and normalisation switched off.

    Our pipeline feeds fixed-size images already normalised with the ImageNet mean/std, and
    our detectors neither resize nor normalise, so torchvision's must not either (otherwise
    it would do extra work and see different pixels). Batching into an ``ImageList``
    (padding to a multiple of ``size_divisible``; a no-op copy for 224 px batches) is kept:
    it is part of how torchvision's detectors take their input.
    """

    def __init__(self, image_size: int, size_divisible: int = 32) -> None:
        super().__init__(image_size, image_size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=size_divisible)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None):
        return image, target


def padded_gt_to_targets(gt_boxes: torch.Tensor, label_offset: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Our padded GT ``(B, N, 5)`` -> torchvision's list of ``{"boxes", "labels"}``.

    Padding rows have class -1. ``label_offset`` is 1 for Faster R-CNN, whose label 0 is
    background in torchvision; 0 for FCOS (sigmoid classes 0..C-1).
    """
    targets = []
    for gt in gt_boxes:  # one small dict per image: this is torchvision's input format
        keep = gt[:, 4] >= 0
        targets.append({"boxes": gt[keep, :4], "labels": gt[keep, 4].long() + label_offset})
    return targets


def _image_list_for(x: Union[torch.Tensor, TensorDict]) -> Tuple[ImageList, int]:
    """An ``ImageList`` describing the image batch behind features ``x`` (no pixels needed).

    torchvision's anchor generators only read ``image_list.tensors.shape[-2:]`` and
    ``image_list.image_sizes``, so for cached features an expanded zero-size view suffices.
    """
    if isinstance(x, dict):
        c3 = x["c3"]
        batch, height, width = c3.shape[0], 8 * c3.shape[-2], 8 * c3.shape[-1]
        tensors = c3.new_zeros(()).expand(batch, 1, height, width)
    else:
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        tensors = x
    return ImageList(tensors, [(int(height), int(width))] * batch), batch


# --------------------------------------------------------------------------------------
# Builders: torchvision's detectors configured like ours
# --------------------------------------------------------------------------------------


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


def build_tv_fcos(
    backbone_fpn: TorchvisionBackboneFPN,
    num_classes: int,
    num_convs: int,
    image_size: int,
    *,
    center_sampling_radius: float = 1.5,
    score_thresh: float = 0.2,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    head_norm: str = "groupnorm",
) -> TVFCOS:
    """``torchvision.models.detection.FCOS`` on three FPN levels with a ``num_convs`` head.

    Anchors: one square anchor per location of size = stride, as torchvision's FCOS expects
    (its scale ranges [4 * size, 8 * size] then equal ours [4 * stride, 8 * stride]).
    ``head_norm``: "groupnorm" (torchvision's default head) or "none" (plain conv + ReLU
    stems, architecturally identical to the course head).
    """
    fpn_channels = backbone_fpn.out_channels
    if head_norm == "groupnorm":
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=num_convs)
    elif head_norm == "none":
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, num_convs, norm_layer=_no_norm)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, num_convs, norm_layer=_no_norm)
    else:
        raise ValueError(f"head_norm must be 'groupnorm' or 'none', got {head_norm!r}")
    anchors = AnchorGenerator(sizes=tuple((s,) for s in STRIDES), aspect_ratios=((1.0,),) * len(STRIDES))
    model = TVFCOS(
        backbone_fpn, num_classes, min_size=image_size, max_size=image_size, anchor_generator=anchors,
        head=head, center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
        nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates,
    )
    model.transform = FixedSizeTransform(image_size)
    return model


def build_tv_faster_rcnn(
    backbone_fpn: TorchvisionBackboneFPN,
    num_classes: int,
    image_size: int,
    *,
    rpn_conv_depth: int = 2,
    anchor_stride_scale: float = 8,
    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_iou_thresholds: Tuple[float, float] = (0.3, 0.6),
    rpn_batch_size_per_image: int = 16,
    rpn_positive_fraction: float = 0.5,
    rpn_nms_thresh: float = 0.7,
    rpn_pre_nms_topk: int = 400,
    rpn_post_nms_topk: int = 300,
    roi_stem_channels: Sequence[int] = (64, 64),
    roi_size: Tuple[int, int] = (7, 7),
    roi_sampling_ratio: int = -1,
    roi_iou_thresholds: Tuple[float, float] = (0.5, 0.5),
    roi_batch_size_per_image: int = 32,
    roi_positive_fraction: float = 0.25,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> TVFasterRCNN:
    """``torchvision.models.detection.FasterRCNN`` configured like the course's Faster R-CNN.

    * RPN anchors: per level one size ``stride * anchor_stride_scale`` and the given aspect
      ratios (height / width, the same convention as ours); RPN head with ``rpn_conv_depth``
      3x3 convs of the FPN width. ``rpn_pre_nms_topk`` is per level in both implementations;
      ``rpn_post_nms_topk`` is torchvision's total per image (pass ours per-level value
      times 3 levels for the same number of proposals).
    * RoI head: ``MultiScaleRoIAlign`` over p3-p5, then the same conv stem as ours
      (``FastRCNNConvFCHead`` with no FC layer), then torchvision's ``FastRCNNPredictor``
      (a linear classifier over ``num_classes + 1`` classes, background = label 0, and a
      linear box regressor, which torchvision always has).
    """
    fpn_channels = backbone_fpn.out_channels
    anchors = AnchorGenerator(
        sizes=tuple((int(round(s * anchor_stride_scale)),) for s in STRIDES),
        aspect_ratios=(tuple(float(a) for a in anchor_aspect_ratios),) * len(STRIDES),
    )
    rpn_head = RPNHead(fpn_channels, len(anchor_aspect_ratios), conv_depth=rpn_conv_depth)
    roi_pool = MultiScaleRoIAlign(list(LEVELS), output_size=list(roi_size), sampling_ratio=roi_sampling_ratio)
    box_head = FastRCNNConvFCHead((fpn_channels, roi_size[0], roi_size[1]), list(roi_stem_channels), [])
    box_predictor = FastRCNNPredictor(roi_stem_channels[-1] * roi_size[0] * roi_size[1], num_classes + 1)
    model = TVFasterRCNN(
        backbone_fpn, num_classes=None, min_size=image_size, max_size=image_size,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_topk, rpn_pre_nms_top_n_test=rpn_pre_nms_topk,
        rpn_post_nms_top_n_train=rpn_post_nms_topk, rpn_post_nms_top_n_test=rpn_post_nms_topk,
        rpn_nms_thresh=rpn_nms_thresh, rpn_fg_iou_thresh=rpn_iou_thresholds[1],
        rpn_bg_iou_thresh=rpn_iou_thresholds[0], rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_positive_fraction=rpn_positive_fraction,
        box_roi_pool=roi_pool, box_head=box_head, box_predictor=box_predictor,
        box_score_thresh=score_thresh, box_nms_thresh=nms_thresh, box_detections_per_img=detections_per_img,
        box_fg_iou_thresh=roi_iou_thresholds[1], box_bg_iou_thresh=roi_iou_thresholds[0],
        box_batch_size_per_image=roi_batch_size_per_image, box_positive_fraction=roi_positive_fraction,
    )
    model.transform = FixedSizeTransform(image_size)
    return model


# --------------------------------------------------------------------------------------
# Our interface around torchvision's detectors
# --------------------------------------------------------------------------------------


class TorchvisionDetector(nn.Module):
    """Wraps torchvision's ``FCOS`` or ``FasterRCNN`` in our detectors' interface.

    * ``forward(x, gt_boxes)`` in training mode returns torchvision's loss dict (scalars; the
      sum is the training loss; names get a ``loss_`` prefix where they lack "loss"), for
      ``x`` an image batch or a c3/c4/c5 feature dict.
    * ``predict(x, score_thresh, nms_thresh)`` / ``forward`` in eval mode returns one
      ``{"boxes", "labels", "scores"}`` per image with 0-based class labels.

    Image batches go through torchvision's own ``forward`` (list of images, targets as
    dicts). Feature dicts (our frozen-backbone feature cache) skip the transform and the
    body and call the same torchvision components the full forward would call: FPN, head,
    anchor generator, loss or post-processing.
    """

    def __init__(self, detector: Union[TVFCOS, TVFasterRCNN]) -> None:
        super().__init__()
        self.detector = detector
        self.kind = "fcos" if isinstance(detector, TVFCOS) else "faster_rcnn"
        # torchvision's Faster R-CNN reserves label 0 for background.
        self.label_offset = 0 if self.kind == "fcos" else 1

    # The benchmarks (and a5_helper's feature cache) look for `.backbone`.
    @property
    def backbone(self) -> TorchvisionBackboneFPN:
        return self.detector.backbone

    def forward(self, x: Union[torch.Tensor, TensorDict], gt_boxes: Optional[torch.Tensor] = None,
                test_score_thresh: Optional[float] = None, test_nms_thresh: Optional[float] = None):
        if not self.training:
            return self.predict(x, score_thresh=test_score_thresh, nms_thresh=test_nms_thresh)
        if gt_boxes is None:
            raise ValueError("gt_boxes are required in training mode")
        targets = padded_gt_to_targets(gt_boxes, self.label_offset)
        if not isinstance(x, dict):
            losses = self.detector(list(x), targets)
        elif self.kind == "fcos":
            losses = self._fcos_features(x, targets)
        else:
            losses = self._rcnn_features(x, targets)
        # Our training loop sums the entries whose name contains "loss"; torchvision's
        # FCOS names them "classification", "bbox_regression", "bbox_ctrness".
        return {(k if "loss" in k else f"loss_{k}"): v for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, x: Union[torch.Tensor, TensorDict], score_thresh: Optional[float] = None,
                nms_thresh: Optional[float] = None) -> List[Dict[str, torch.Tensor]]:
        """Detections per image; thresholds default to the wrapped model's own settings."""
        owner = self.detector if self.kind == "fcos" else self.detector.roi_heads
        saved = (owner.score_thresh, owner.nms_thresh)
        if score_thresh is not None:
            owner.score_thresh = score_thresh
        if nms_thresh is not None:
            owner.nms_thresh = nms_thresh
        was_training = self.training
        self.eval()
        try:
            if not isinstance(x, dict):
                detections = self.detector(list(x))
            elif self.kind == "fcos":
                detections = self._fcos_features(x, None)
            else:
                detections = self._rcnn_features(x, None)
        finally:
            owner.score_thresh, owner.nms_thresh = saved
            self.train(was_training)
        for det in detections:
            det["labels"] = det["labels"] - self.label_offset
        return detections

    def _fcos_features(self, feats: TensorDict, targets: Optional[List[Dict[str, torch.Tensor]]]):
        """torchvision ``FCOS.forward`` after the transform and body, on cached features."""
        model = self.detector
        image_list, _ = _image_list_for(feats)
        features = list(model.backbone(feats).values())
        head_outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        if targets is not None:
            return model.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        return model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)

    def _rcnn_features(self, feats: TensorDict, targets: Optional[List[Dict[str, torch.Tensor]]]):
        """torchvision ``GeneralizedRCNN.forward`` after the transform and body."""
        model = self.detector
        image_list, _ = _image_list_for(feats)
        features = model.backbone(feats)
        proposals, proposal_losses = model.rpn(image_list, features, targets)
        detections, detector_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
        if targets is not None:
            return {**detector_losses, **proposal_losses}
        return detections

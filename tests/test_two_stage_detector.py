"""Tests of two_stage_detector.py: Faster R-CNN with FPN.

Every test is marked with the one part of the assignment it grades: a student part
(``rpn_head``, ``anchors``, ``iou``, ``rcnn_match``, ``rcnn_low_quality``,
``rcnn_deltas``, ``rpn_loss``, ``rpn_proposals``, ``roi_head``, ``roi_sampling``,
``roi_losses``, ``faster_rcnn_inference``) or ``provided`` (given code and whole-model
tests). When the instructor grades a submission, every other student part comes from the
reference (``tests/isolation.py``), so a test of one part fails only for mistakes in it.

Expected values of the student parts are computed by hand for tiny inputs (the
arithmetic is in the comments) or by torchvision. Student functions are called through
the module (``tsd.iou``) so that the grading isolation applies. Models are tiny random
conv nets on 64 px images, so every test takes at most a few seconds on a CPU.
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import two_stage_detector as tsd
from checks import check_close, check_dtype, check_equal, check_shape
from fcos import DetectorBackboneWithFPN
from two_stage_detector import (
    RPN,
    FasterRCNN,
    assign_fpn_levels,
    multiscale_roi_align,
    rcnn_match_anchors_to_gt,
    reassign_proposals_to_fpn_levels,
    sample_rpn_training,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
LN2, LN3, LN4, LN6 = math.log(2.0), math.log(3.0), math.log(4.0), math.log(6.0)


# Tiny tensors: one intra-op thread is faster and steadier (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def check_same(what: str, computed, expected) -> None:
    """``computed == expected`` for plain Python values (layer lists, sizes)."""
    if computed != expected:
        raise AssertionError(f"{what}: expected {expected!r},\n  computed {computed!r}")


def check_he_init(what: str, weight: torch.Tensor) -> None:
    """He (Kaiming normal) init of a conv weight: std sqrt(2 / fan), with fan_out or
    fan_in (both accepted), within 15%. Biases are checked separately."""
    receptive = weight[0, 0].numel()
    fan_out, fan_in = weight.shape[0] * receptive, weight.shape[1] * receptive
    stds = (math.sqrt(2.0 / fan_out), math.sqrt(2.0 / fan_in))
    computed = weight.detach().double().std().item()
    if not any(abs(computed - s) <= 0.15 * s for s in stds):
        raise AssertionError(
            f"{what}: expected He init, a weight std of sqrt(2 / fan_out) = {stds[0]:.4f} "
            f"(or sqrt(2 / fan_in) = {stds[1]:.4f}), computed std {computed:.4f}"
        )


def conv_specs(module: nn.Module) -> List[tuple]:
    """(in, out, kernel, padding) of every Conv2d of ``module``, in order."""
    return [
        (m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in module.modules() if isinstance(m, nn.Conv2d)
    ]


class TinyBackbone(nn.Module):
    """A small random conv net with the interface of ``fcos.DetectorBackboneWithFPN``.

    ``forward`` takes images ``(B, 3, H, W)`` or a dict of c3/c4/c5 features and returns
    p3/p4/p5 features of strides 8/16/32 (the "FPN" is the identity: enough for tests).
    """

    def __init__(self, out_channels: int = 16):
        super().__init__()
        self.out_channels = out_channels

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

        self.to_c3 = nn.Sequential(block(3, 16), block(16, 16), block(16, out_channels))
        self.to_c4 = block(out_channels, out_channels)
        self.to_c5 = block(out_channels, out_channels)

    @property
    def fpn_strides(self) -> Dict[str, int]:
        return dict(STRIDES)

    def extract_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        c3 = self.to_c3(images)
        c4 = self.to_c4(c3)
        return {"c3": c3, "c4": c4, "c5": self.to_c5(c4)}

    def forward(self, x):
        feats = x if isinstance(x, dict) else self.extract_features(x)
        return {"p3": feats["c3"], "p4": feats["c4"], "p5": feats["c5"]}


class FixedFeatureBackbone(nn.Module):
    """Returns given p3/p4/p5 features whatever the input (images only fix the size)."""

    def __init__(self, feats: Dict[str, torch.Tensor]):
        super().__init__()
        self.feats = feats
        self.out_channels = feats["p3"].shape[1]

    @property
    def fpn_strides(self) -> Dict[str, int]:
        return dict(STRIDES)

    def forward(self, x):
        return dict(self.feats)


def small_faster_rcnn(num_classes: int = 3, channels: int = 16, backbone: nn.Module = None, **rpn_options):
    backbone = TinyBackbone(channels) if backbone is None else backbone
    rpn_kwargs = dict(batch_size_per_image=16, anchor_stride_scale=4, pre_nms_topk=50, post_nms_topk=20)
    rpn_kwargs.update(rpn_options)
    rpn = RPN(backbone.out_channels, [channels], **rpn_kwargs)
    return FasterRCNN(backbone, rpn, [channels], num_classes, batch_size_per_image=16)


def roi_head_model(num_classes: int = 3, channels: int = 8, **kwargs) -> FasterRCNN:
    """A FasterRCNN whose backbone is never run (for tests of one second-stage method)."""
    backbone = TinyBackbone(channels)
    rpn = RPN(channels, [channels], batch_size_per_image=16)
    return FasterRCNN(backbone, rpn, [channels], num_classes, **kwargs)


def random_boxes(n: int, size: float = 100.0, generator=None, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def fpn_feats(batch: int, channels: int, image: int = 64, fill=None) -> Dict[str, torch.Tensor]:
    feats = {}
    for name, stride in STRIDES.items():
        shape = (batch, channels, image // stride, image // stride)
        feats[name] = torch.randn(shape) if fill is None else torch.full(shape, float(fill))
    return feats


# --------------------------------------------------------------------------------------
# rpn_head: RPNPredictionNetwork
# --------------------------------------------------------------------------------------


@pytest.mark.part("rpn_head")
def test_rpn_head_layers_and_initialisation():
    torch.manual_seed(0)
    head = tsd.RPNPredictionNetwork(in_channels=32, stem_channels=[64, 48], num_anchors=3)
    kinds = [type(m).__name__ for m in head.stem_rpn]
    check_same("layers of stem_rpn (a 3x3 conv + ReLU per entry of stem_channels)", kinds,
               ["Conv2d", "ReLU", "Conv2d", "ReLU"])
    # (in, out, kernel, padding): 3x3 convs with padding 1 keep the map size.
    check_same("convs of stem_rpn (in, out, kernel, padding)", conv_specs(head.stem_rpn),
               [(32, 64, (3, 3), (1, 1)), (64, 48, (3, 3), (1, 1))])
    check_same("pred_obj (in, out, kernel, padding)", conv_specs(head.pred_obj), [(48, 3, (1, 1), (0, 0))])
    check_same("pred_box (in, out, kernel, padding)", conv_specs(head.pred_box), [(48, 12, (1, 1), (0, 0))])

    # He init for the stem: std sqrt(2 / (64 * 9)) = 0.059 for the first conv (fan_out).
    for i, conv in enumerate(m for m in head.stem_rpn if isinstance(m, nn.Conv2d)):
        check_he_init(f"weights of stem conv {i}", conv.weight)
        check_close(f"bias of stem conv {i}", conv.bias, torch.zeros_like(conv.bias))
    # Predictors: N(0, 0.01) weights, zero biases (initial objectness 0.5, deltas ~0).
    for name in ("pred_obj", "pred_box"):
        layer = getattr(head, name)
        check_close(f"std of the {name} weights (N(0, 0.01) init)", layer.weight.std(), 0.01, rtol=0.25)
        check_close(f"mean of the {name} weights (N(0, 0.01) init)", layer.weight.mean(), 0.0, atol=0.005)
        check_close(f"bias of {name}", layer.bias, torch.zeros_like(layer.bias))


def _identity_rpn_head(num_anchors: int = 2) -> nn.Module:
    """An RPN head with hand-set weights, float64: the stem passes channel 0 through (ReLU
    keeps it, it is >= 0) and channel 1 (all -1) is zeroed by the ReLU; then
    obj[a] = 10 * ch0 + a - 100 * ch1 and box[4a + k] = 10 * ch0 + 4a + k - 100 * ch1."""
    head = tsd.RPNPredictionNetwork(in_channels=2, stem_channels=[2], num_anchors=num_anchors).double()
    conv = next(m for m in head.stem_rpn if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # centre tap: identity
        conv.weight[1, 1, 1, 1] = 1.0
        for layer in (head.pred_obj, head.pred_box):
            layer.weight.zero_()
            layer.weight[:, 0, 0, 0] = 10.0
            layer.weight[:, 1, 0, 0] = 100.0  # only reached if the stem has no ReLU
            layer.bias.copy_(torch.arange(layer.out_channels, dtype=torch.float64))
    return head


@pytest.mark.part("rpn_head")
def test_rpn_head_hand_computed_output_layout():
    head = _identity_rpn_head(num_anchors=2)
    # Channel 0 = location index y * W + x (+ 100 in image 1), channel 1 = -1.
    p3 = torch.zeros(2, 2, 2, 3, dtype=torch.float64)  # H = 2, W = 3
    p3[:, 0] = torch.arange(6, dtype=torch.float64).reshape(2, 3) + torch.tensor([0.0, 100.0])[:, None, None]
    p3[:, 1] = -1.0
    p4 = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    p4[:, 0] = torch.tensor([[[0.0, 1.0]], [[100.0, 101.0]]])
    p4[:, 1] = -1.0
    obj, box = head({"p3": p3, "p4": p4})
    check_same("levels of the objectness dict", sorted(obj), ["p3", "p4"])
    check_same("levels of the box delta dict", sorted(box), ["p3", "p4"])
    check_shape("objectness of p3 (B, H*W*A)", obj["p3"], (2, 12))
    check_shape("box deltas of p3 (B, H*W*A, 4)", box["p3"], (2, 12, 4))
    check_dtype("objectness (float64 model and features)", obj["p3"], torch.float64)
    # Entry (y * W + x) * A + a is anchor a at location (x, y): 10 * location + a.
    check_equal(
        "objectness of p3, image 0 (entry (y*W + x)*A + a = 10 * location + a)",
        obj["p3"][0], [0.0, 1, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        hint="the A anchors of one location must be contiguous: permute (B, A, H, W) to (B, H, W, A) first",
    )
    check_equal("objectness of p3, image 1 (1000 + 10 * location + a)", obj["p3"][1],
                [1000.0, 1001, 1010, 1011, 1020, 1021, 1030, 1031, 1040, 1041, 1050, 1051])
    check_equal("objectness of p4 (1 x 2 map)", obj["p4"], [[0.0, 1, 10, 11], [1000.0, 1001, 1010, 1011]])
    # Delta k of anchor a at location l is channel 4a + k: 10 * l + 4a + k.
    check_equal(
        "box deltas of p3, image 0, locations 0 and 1",
        box["p3"][0, :4],
        [[0.0, 1, 2, 3], [4.0, 5, 6, 7], [10.0, 11, 12, 13], [14.0, 15, 16, 17]],
        hint="channel 4a + k of pred_box is delta k of anchor a: reshape (B, H, W, 4A) to (B, H*W*A, 4)",
    )
    check_equal("box deltas of p3, image 1, last location (x=2, y=1)", box["p3"][1, -2:],
                [[1050.0, 1051, 1052, 1053], [1054.0, 1055, 1056, 1057]])
    check_equal("box deltas of p4, image 1", box["p4"][1],
                [[1000.0, 1001, 1002, 1003], [1004.0, 1005, 1006, 1007],
                 [1010.0, 1011, 1012, 1013], [1014.0, 1015, 1016, 1017]])


# --------------------------------------------------------------------------------------
# anchors: generate_fpn_anchors
# --------------------------------------------------------------------------------------


@pytest.mark.part("anchors")
def test_anchors_hand_computed_two_levels():
    # Aspect ratios 1/4, 1, 4 give whole numbers. p5 (stride 32, stride_scale 2): side
    # 64, area 4096. Ratio 1/4: w = sqrt(4096 / 0.25) = 128, h = 32; ratio 4: w = 32, h = 128.
    locations = {
        "p3": torch.tensor([[4.0, 4.0]]),
        "p5": torch.tensor([[16.0, 16.0], [48.0, 16.0]]),
    }
    anchors = tsd.generate_fpn_anchors(locations, {"p3": 8, "p5": 32}, stride_scale=2,
                                       aspect_ratios=[0.25, 1.0, 4.0])
    check_same("levels of the anchors", sorted(anchors), ["p3", "p5"])
    check_shape("anchors of p5 (H*W*A, 4)", anchors["p5"], (6, 4))
    expected_p5 = [
        [-48.0, 0.0, 80.0, 32.0],  # (16, 16), ratio 1/4: 16 -+ 64, 16 -+ 16
        [-16.0, -16.0, 48.0, 48.0],  # (16, 16), ratio 1: 16 -+ 32
        [0.0, -48.0, 32.0, 80.0],  # (16, 16), ratio 4: 16 -+ 16, 16 -+ 64
        [-16.0, 0.0, 112.0, 32.0],  # (48, 16), ratio 1/4
        [16.0, -16.0, 80.0, 48.0],  # (48, 16), ratio 1
        [32.0, -48.0, 64.0, 80.0],  # (48, 16), ratio 4
    ]
    check_close("anchors of p5 (the 3 anchors of location (16, 16), then those of (48, 16))",
                anchors["p5"], expected_p5,
                hint="width = sqrt(S / r), height = r * width; the A anchors of a location are contiguous")
    # p3 (stride 8, stride_scale 2): side 16. Ratio 1/4: 32 x 8; ratio 4: 8 x 32.
    check_close("anchors of p3 at (4, 4)", anchors["p3"],
                [[-12.0, 0.0, 20.0, 8.0], [-4.0, -4.0, 12.0, 12.0], [0.0, -12.0, 8.0, 20.0]])


@pytest.mark.part("anchors")
def test_anchors_default_ratios_float64_and_empty_level():
    # p4 (stride 16), stride_scale 1.5: side 24, area 576, default ratios (0.5, 1, 2).
    locations = {
        "p4": torch.tensor([[8.0, 24.0], [24.0, 24.0]], dtype=torch.float64),
        "p5": torch.zeros(0, 2, dtype=torch.float64),
    }
    anchors = tsd.generate_fpn_anchors(locations, {"p4": 16, "p5": 32}, stride_scale=1.5)
    p4 = anchors["p4"]
    check_dtype("anchors of float64 locations", p4, torch.float64)
    check_shape("anchors of p4 (2 locations x 3 default ratios, 4)", p4, (6, 4))
    check_shape("anchors of an empty level", anchors["p5"], (0, 4))
    widths, heights = p4[:, 2] - p4[:, 0], p4[:, 3] - p4[:, 1]
    check_close("anchor areas (24^2 = 576)", widths * heights, [576.0] * 6)
    check_close("anchor aspect ratios height / width (default 0.5, 1, 2)", heights / widths,
                [0.5, 1.0, 2.0, 0.5, 1.0, 2.0])
    check_close("anchor centres", (p4[:, :2] + p4[:, 2:]) / 2, [[8.0, 24.0]] * 3 + [[24.0, 24.0]] * 3)
    # Ratio 1 at (8, 24): 8 -+ 12, 24 -+ 12. Ratio 0.5: w = sqrt(1152) = 33.941, h = 16.971.
    check_close("ratio-1 anchor at (8, 24)", p4[1], [-4.0, 12.0, 20.0, 36.0])
    check_close("ratio-0.5 anchor at (24, 24)", p4[3],
                [24 - 16.970563, 24 - 8.485281, 24 + 16.970563, 24 + 8.485281])


# --------------------------------------------------------------------------------------
# iou
# --------------------------------------------------------------------------------------


@pytest.mark.part("iou")
def test_iou_hand_computed():
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [2.0, 4.0, 6.0, 12.0]])
    boxes2 = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 5.0, 20.0], [30.0, 0.0, 40.0, 5.0],
         [20.0, 20.0, 30.0, 30.0]]
    )
    expected = torch.tensor(
        [
            # Areas 100 and 100: identical 1; touching corner 0; [0,0,5,10] = 50 / (100 + 100 - 50);
            # disjoint in x only (-20 x 5) 0; disjoint in x and y (-10 x -10, a positive product) 0.
            [1.0, 0.0, 1.0 / 3.0, 0.0, 0.0],
            # [5,5,10,10] = 25 / (100 + 100 - 25) = 1/7, the same with [10,10,15,15]; the rest touch or miss.
            [1.0 / 7.0, 1.0 / 7.0, 0.0, 0.0, 0.0],
            # 4 x 8 box, area 32: [2,4,6,10] = 24 / (32 + 100 - 24) = 2/9; [2,4,5,12] = 24 / 108 = 2/9.
            [2.0 / 9.0, 0.0, 2.0 / 9.0, 0.0, 0.0],
        ]
    )
    check_close("IoU matrix", tsd.iou(boxes1, boxes2), expected,
                hint="clamp the intersection width and height at 0 before multiplying them")


@pytest.mark.part("iou")
def test_iou_matches_torchvision_float32_and_float64():
    gen = torch.Generator().manual_seed(0)
    boxes1, boxes2 = random_boxes(40, generator=gen), random_boxes(25, generator=gen)
    result = tsd.iou(boxes1, boxes2)
    check_shape("IoU of 40 and 25 boxes", result, (40, 25))
    check_close("IoU of random boxes (torchvision.ops.box_iou)", result, torchvision.ops.box_iou(boxes1, boxes2))
    b64 = random_boxes(7, generator=gen, dtype=torch.float64)
    result64 = tsd.iou(b64, b64[:5])
    check_dtype("IoU of float64 boxes", result64, torch.float64)
    check_close("IoU of float64 boxes", result64, torchvision.ops.box_iou(b64, b64[:5]), rtol=1e-10, atol=1e-12)


@pytest.mark.part("iou")
def test_iou_empty_inputs_and_degenerate_boxes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 8.0]])
    check_shape("IoU with no boxes in boxes1", tsd.iou(torch.zeros(0, 4), boxes), (0, 2))
    check_shape("IoU with no boxes in boxes2", tsd.iou(boxes, torch.zeros(0, 4)), (2, 0))
    # Zero-area boxes: union 0 for a point with itself -> IoU 0, never NaN; a point or a
    # line inside a box has intersection 0 -> 0.
    points = torch.tensor([[5.0, 5.0, 5.0, 5.0], [3.0, 1.0, 3.0, 9.0]])
    check_close("IoU of zero-area boxes with themselves (union 0 -> IoU 0)", tsd.iou(points, points),
                torch.zeros(2, 2))
    check_close("IoU of zero-area boxes with real boxes", tsd.iou(points, boxes), torch.zeros(2, 2))


# --------------------------------------------------------------------------------------
# rcnn_match: rcnn_match_by_threshold
# --------------------------------------------------------------------------------------


@pytest.mark.part("rcnn_match")
def test_match_by_threshold_hand_computed():
    # Thresholds (0.25, 0.75); IoUs are multiples of 1/16 (exact in float32).
    # Columns: GT 0, GT 1, a padding box (-1).
    ious = torch.tensor(
        [
            [
                [0.75, 0.5, -1.0],  # best 0.75 (GT 0) >= 0.75 -> foreground
                [0.625, 0.125, -1.0],  # best 0.625 -> neutral
                [0.25, 0.0, -1.0],  # best 0.25: not < 0.25 -> neutral
                [0.125, 0.1875, -1.0],  # best 0.1875 (GT 1) < 0.25 -> background
                [0.5, 0.875, -1.0],  # best 0.875 (GT 1) -> foreground
                [0.375, 0.375, -1.0],  # tie: the first GT (0); neutral
            ]
        ]
    )
    matched_idx, state = tsd.rcnn_match_by_threshold(ious, (0.25, 0.75))
    check_shape("matched_idx (B, A)", matched_idx, (1, 6))
    check_dtype("matched_idx", matched_idx, torch.int64)
    check_dtype("state", state, torch.int64)
    check_equal("matched_idx (best GT per anchor, first among ties)", matched_idx, [[0, 0, 0, 1, 1, 0]])
    check_equal("state (1 fg: best >= high, 0 bg: best < low, -1 neutral in between)", state,
                [[1, -1, -1, 0, 1, -1]])


@pytest.mark.part("rcnn_match")
def test_match_by_threshold_batch_float64_and_image_without_gt():
    # Image 0: two GT boxes; image 1: only padding (IoU -1 everywhere) -> all background.
    ious = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.5], [0.25, 0.25], [0.0, 0.0]],
            [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]],
        ],
        dtype=torch.float64,
    )
    matched_idx, state = tsd.rcnn_match_by_threshold(ious, (0.3, 0.5))
    check_shape("state (B, A)", state, (2, 4))
    check_dtype("state", state, torch.int64)
    # Image 0: 1.0 -> fg (GT 0); 0.5 >= 0.5 -> fg (GT 1); 0.25 < 0.3 -> bg; 0 -> bg.
    check_equal("state of image 0, thresholds (0.3, 0.5)", state[0], [1, 1, 0, 0])
    check_equal("matched_idx of image 0", matched_idx[0], [0, 1, 0, 0])
    check_equal("state of an image without GT boxes (IoUs -1)", state[1], [0, 0, 0, 0])
    # Equal thresholds (the second stage's (0.5, 0.5)): no neutral band.
    _, state = tsd.rcnn_match_by_threshold(ious[:1], (0.5, 0.5))
    check_equal("state with thresholds (0.5, 0.5)", state, [[1, 1, 0, 0]])


# --------------------------------------------------------------------------------------
# rcnn_low_quality: rcnn_low_quality_matches
# --------------------------------------------------------------------------------------


@pytest.mark.part("rcnn_low_quality")
def test_low_quality_matches_hand_computed():
    # Columns: GT 0..3 and a padding box (-1). Best anchor per GT (max over anchors):
    # GT 0: 0.25 at anchors 0 and 2 (a tie: both); GT 1: 0.5 at anchor 1; GT 2: 0.625 at
    # anchor 1; GT 3: 0 everywhere (no anchor overlaps it: nobody is promoted for it).
    ious = torch.tensor(
        [
            [
                [0.25, 0.0, 0.0, 0.0, -1.0],  # best anchor of GT 0 -> promoted, GT 0
                [0.125, 0.5, 0.625, 0.0, -1.0],  # best of GT 1 and GT 2 -> takes GT 2 (0.625 > 0.5)
                [0.25, 0.25, 0.0, 0.0, -1.0],  # ties for GT 0 -> promoted, GT 0
                [0.0, 0.375, 0.5, 0.0, -1.0],  # best of nobody
                [0.0, 0.0, 0.0, 0.0, -1.0],  # overlaps nothing
            ]
        ]
    )
    promoted, best_gt_idx = tsd.rcnn_low_quality_matches(ious)
    check_shape("promoted (B, A)", promoted, (1, 5))
    check_dtype("promoted", promoted, torch.bool)
    check_dtype("best_gt_idx", best_gt_idx, torch.int64)
    check_equal("promoted (best anchors of each GT box, ties included, IoU > 0)", promoted,
                [[True, True, True, False, False]])
    check_equal("best_gt_idx of the promoted anchors 0, 1, 2 (the GT box they overlap most)",
                best_gt_idx[promoted], [0, 2, 0])


@pytest.mark.part("rcnn_low_quality")
def test_low_quality_matches_batch_float64_and_padding():
    ious = torch.tensor(
        [
            # Image 0, columns GT 0..2. GT 0's best is 0.5 (anchors 0 and 1, a tie), GT 1's
            # best 0.9 (anchors 0 and 1), GT 2's best 0.05 (anchor 1). Anchors 0 and 1 both
            # take GT 1 (0.9 is their largest marked IoU); anchor 2 is best of nobody.
            [[0.5, 0.9, 0.0], [0.5, 0.9, 0.05], [0.1, 0.0, 0.0]],
            # Image 1: GT 0 overlaps nothing, GT 1 and 2 are padding (-1): nobody is promoted.
            [[0.0, -1.0, -1.0], [0.0, -1.0, -1.0], [0.0, -1.0, -1.0]],
        ],
        dtype=torch.float64,
    )
    promoted, best_gt_idx = tsd.rcnn_low_quality_matches(ious)
    check_shape("promoted (B, A)", promoted, (2, 3))
    check_shape("best_gt_idx (B, A)", best_gt_idx, (2, 3))
    check_equal("promoted, image 0", promoted[0], [True, True, False])
    check_equal("best_gt_idx of the promoted anchors 0 and 1 of image 0", best_gt_idx[0, :2], [1, 1])
    check_equal("promoted, image whose GT overlaps nothing (IoU 0) or is padding (-1)", promoted[1],
                [False, False, False])


# --------------------------------------------------------------------------------------
# rcnn_deltas: rcnn_get_deltas_from_anchors, rcnn_apply_deltas_to_anchors
# --------------------------------------------------------------------------------------

# Anchor 0: centre (5, 10), size 10 x 20; its GT: centre (15, 20), size 20 x 20
#   -> dx = (15 - 5) / 10 = 1, dy = (20 - 10) / 20 = 0.5, dw = log(20 / 10) = log 2, dh = log 1 = 0.
# Anchor 1: centre (20, 15), size 20 x 10; its GT: centre (25, 25), size 20 x 40
#   -> dx = 5 / 20 = 0.25, dy = 10 / 10 = 1, dw = 0, dh = log(40 / 10) = log 4.
_DELTA_ANCHORS = [[0.0, 0.0, 10.0, 20.0], [10.0, 10.0, 30.0, 20.0]]
_DELTA_GT = [[5.0, 10.0, 25.0, 30.0, 3.0], [15.0, 5.0, 35.0, 45.0, 1.0]]
_DELTAS = [[1.0, 0.5, LN2, 0.0], [0.25, 1.0, 0.0, LN4]]
# With weights (10, 10, 5, 5): (10 dx, 10 dy, 5 dw, 5 dh).
_WEIGHTED_DELTAS = [[10.0, 5.0, 5 * LN2, 0.0], [2.5, 10.0, 0.0, 5 * LN4]]


@pytest.mark.part("rcnn_deltas")
def test_get_deltas_hand_computed():
    anchors, gt = torch.tensor(_DELTA_ANCHORS), torch.tensor(_DELTA_GT)
    check_close("deltas (dx, dy, dw, dh), weights 1", tsd.rcnn_get_deltas_from_anchors(anchors, gt), _DELTAS,
                hint="dx, dw use the anchor width, dy, dh its height; dw = log(gt_w / anchor_w)")
    check_close("deltas with weights (10, 10, 5, 5)",
                tsd.rcnn_get_deltas_from_anchors(anchors, gt, weights=(10.0, 10.0, 5.0, 5.0)), _WEIGHTED_DELTAS)
    # GT rows without the class column, and leading batch dimensions (3, 2, 4), float64.
    batched = tsd.rcnn_get_deltas_from_anchors(
        anchors.double().expand(3, 2, 4), gt[:, :4].double().expand(3, 2, 4), weights=(10.0, 10.0, 5.0, 5.0)
    )
    check_dtype("deltas of float64 boxes", batched, torch.float64)
    check_close("deltas of (3, 2, 4) anchors and 4-column GT boxes", batched,
                torch.tensor(_WEIGHTED_DELTAS, dtype=torch.float64).expand(3, 2, 4))


@pytest.mark.part("rcnn_deltas")
def test_apply_deltas_hand_computed_and_clamp():
    anchors = torch.tensor(_DELTA_ANCHORS)
    gt_boxes = torch.tensor(_DELTA_GT)[:, :4]
    check_close("boxes decoded from deltas (weights 1)", tsd.rcnn_apply_deltas_to_anchors(torch.tensor(_DELTAS), anchors),
                gt_boxes, atol=1e-4)
    check_close("boxes decoded from weighted deltas (divide by the weights (10, 10, 5, 5))",
                tsd.rcnn_apply_deltas_to_anchors(torch.tensor(_WEIGHTED_DELTAS), anchors, (10.0, 10.0, 5.0, 5.0)),
                gt_boxes, atol=1e-4)
    # dw = 100 / 5 = 20 and dh = 50 / 5 = 10 are clamped at log(1000 / 16) *after* dividing by
    # the weights: the 10 x 10 anchor at centre (5, 5) becomes 625 x 625 -> 5 -+ 312.5.
    wild = tsd.rcnn_apply_deltas_to_anchors(
        torch.tensor([[0.0, 0.0, 100.0, 50.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]), (10.0, 10.0, 5.0, 5.0)
    )
    check_close("box of wild deltas (dw, dh clamped at log(1000 / 16))", wild, [[-307.5, -307.5, 317.5, 317.5]])
    # Negative deltas shrink and move: dx = -0.5, dw = -log 2 on anchor 0 (centre (5, 10),
    # 10 x 20) -> centre (0, 10), size 5 x 20.
    check_close("box of negative deltas", tsd.rcnn_apply_deltas_to_anchors(
        torch.tensor([[-0.5, 0.0, -LN2, 0.0]]), anchors[:1]), [[-2.5, 0.0, 2.5, 20.0]], atol=1e-5)


@pytest.mark.part("rcnn_deltas")
def test_deltas_background_neutral_rows_and_inputs_unchanged():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.5, 0.5], [5.0, 5.0, 25.0, 15.0]],
                           dtype=torch.float64)
    gt = torch.tensor([[-1.0] * 5, [-1e8] * 5, [5.0, 5.0, 25.0, 15.0, 0.0]], dtype=torch.float64)
    anchors_copy, gt_copy = anchors.clone(), gt.clone()
    deltas = tsd.rcnn_get_deltas_from_anchors(anchors, gt)
    check_dtype("deltas of float64 boxes", deltas, torch.float64)
    # Background (-1) and neutral (-1e8) rows: deltas -1e8; the GT equal to its anchor: 0.
    check_close("deltas of a background row, a neutral row and a perfect match", deltas,
                [[-1e8] * 4, [-1e8] * 4, [0.0] * 4])
    boxes = tsd.rcnn_apply_deltas_to_anchors(deltas, anchors)
    check_close("boxes decoded from -1e8 deltas (rows of -1e8) and from zero deltas (the anchor)", boxes,
                [[-1e8] * 4, [-1e8] * 4, [5.0, 5.0, 25.0, 15.0]])
    check_equal("anchors after both calls (not modified)", anchors, anchors_copy)
    check_equal("GT boxes after both calls (not modified)", gt, gt_copy)


# --------------------------------------------------------------------------------------
# rpn_loss: rpn_losses
# --------------------------------------------------------------------------------------


def _rpn_loss_inputs(dtype=torch.float32):
    # 2 images x 3 anchors, flattened indices 0..5. Sampled: fg 0, 4; bg 1, 3; 2 and 5 not.
    obj_logits = torch.tensor([[LN3, 0.0, 2.0], [LN3, -LN3, 5.0]], dtype=dtype)
    box_deltas = torch.full((2, 3, 4), 7.0, dtype=dtype)  # unsampled / background: never used
    box_deltas[0, 0] = torch.tensor([1.0, 2.0, 0.0, -1.0])  # fg index 0
    box_deltas[1, 1] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # fg index 4
    fg_idx, bg_idx = torch.tensor([0, 4]), torch.tensor([1, 3])
    fg_gt_deltas = torch.tensor([[1.0, 1.5, 0.25, -1.0], [0.0, 0.0, 0.0, 0.25]], dtype=dtype)
    return obj_logits, box_deltas, fg_idx, bg_idx, fg_gt_deltas


@pytest.mark.part("rpn_loss")
def test_rpn_losses_hand_computed():
    obj_logits, box_deltas, fg_idx, bg_idx, fg_gt_deltas = _rpn_loss_inputs()
    loss_obj, loss_box = tsd.rpn_losses(obj_logits, box_deltas, fg_idx, bg_idx, fg_gt_deltas, batch_size_per_image=4)
    check_shape("RPN objectness loss (a scalar)", loss_obj, ())
    check_shape("RPN box loss (a scalar)", loss_box, ())
    # BCE with logits: target 1 -> log(1 + e^-x), target 0 -> log(1 + e^x).
    # fg logit ln 3 -> log(4/3); fg logit -ln 3 -> log 4; bg logit 0 -> log 2; bg logit ln 3 -> log 4.
    # Sum log(4/3 * 4 * 2 * 4) = log(128/3), divided by batch_size_per_image * B = 4 * 2 = 8.
    check_close("RPN objectness loss", loss_obj, math.log(128.0 / 3.0) / 8.0,
                hint="sum over the sampled anchors (fg target 1, bg target 0), divided by batch_size_per_image * B")
    # L1 of the fg rows: |0| + |0.5| + |-0.25| + |0| + |0.5| + |0| + |0| + |-0.25| = 1.5, / 8.
    check_close("RPN box loss", loss_box, 1.5 / 8.0,
                hint="L1 (sum) of the foreground anchors' deltas only, divided by batch_size_per_image * B")


@pytest.mark.part("rpn_loss")
def test_rpn_losses_without_foreground_float64_and_gradient():
    obj_logits, box_deltas, _, bg_idx, _ = _rpn_loss_inputs(torch.float64)
    obj_logits.requires_grad_()
    box_deltas.requires_grad_()
    no_fg = torch.zeros(0, dtype=torch.int64)
    loss_obj, loss_box = tsd.rpn_losses(obj_logits, box_deltas, no_fg, bg_idx, torch.zeros(0, 4, dtype=torch.float64),
                                        batch_size_per_image=2)
    check_dtype("RPN objectness loss of float64 inputs", loss_obj, torch.float64)
    # bg logits 0 and ln 3: (log 2 + log 4) / (2 * 2) = 3 log 2 / 4.
    check_close("RPN objectness loss, background only", loss_obj, 3 * LN2 / 4)
    check_close("RPN box loss without foreground anchors", loss_box, 0.0, atol=0)
    (loss_obj + loss_box).backward()
    # d/dx BCE = sigmoid(x) - target, / 4: sigmoid(0) = 1/2 -> 0.125, sigmoid(ln 3) = 3/4 -> 0.1875;
    # 0 at the anchors that were not sampled.
    check_close("gradient of the objectness loss w.r.t. the logits (sampled anchors only)", obj_logits.grad,
                [[0.0, 0.125, 0.0], [0.1875, 0.0, 0.0]])
    grad = box_deltas.grad
    check_close("gradient of the box loss w.r.t. the deltas (no foreground: none)",
                torch.zeros_like(box_deltas) if grad is None else grad, torch.zeros_like(box_deltas))


# --------------------------------------------------------------------------------------
# rpn_proposals: rpn_select_top_anchors
# --------------------------------------------------------------------------------------


def _delta_of(b: int, a: int) -> List[float]:
    """Predicted deltas of anchor a of image b in the tests below: (b, a, 10 b + a, -a)."""
    return [float(b), float(a), 10.0 * b + a, -float(a)]


_TOP_ANCHORS = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0], [0.0, 20.0, 10.0, 30.0]]


@pytest.mark.part("rpn_proposals")
def test_select_top_anchors_hand_computed_per_image():
    obj_logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [4.0, -2.0, 1.0, 0.0], [-1.0, -0.5, 0.25, 6.0]])
    box_deltas = torch.tensor([[_delta_of(b, a) for a in range(4)] for b in range(3)])
    anchors = torch.tensor(_TOP_ANCHORS)
    scores, deltas, top_anchors = tsd.rpn_select_top_anchors(obj_logits, box_deltas, anchors, topk=2)
    check_shape("scores (B, k)", scores, (3, 2))
    check_shape("deltas (B, k, 4)", deltas, (3, 2, 4))
    check_shape("anchors (B, k, 4)", top_anchors, (3, 2, 4))
    # Top 2 per image: image 0 anchors 1 (3.0), 3 (2.0); image 1: 0 (4.0), 2 (1.0); image 2: 3 (6.0), 2 (0.25).
    check_close("scores (the 2 best logits of each image, decreasing)", scores, [[3.0, 2.0], [4.0, 1.0], [6.0, 0.25]],
                hint="topk over the anchors of each image: dim 1")
    check_close("deltas of the selected anchors", deltas,
                [[_delta_of(0, 1), _delta_of(0, 3)], [_delta_of(1, 0), _delta_of(1, 2)],
                 [_delta_of(2, 3), _delta_of(2, 2)]])
    a = _TOP_ANCHORS
    check_close("anchors of the selected anchors", top_anchors, [[a[1], a[3]], [a[0], a[2]], [a[3], a[2]]],
                hint="index the (A, 4) anchors with the same (B, k) indices as the deltas")


@pytest.mark.part("rpn_proposals")
def test_select_top_anchors_topk_larger_than_anchors_float64():
    obj_logits = torch.tensor([[0.5, -3.0, 2.0, 1.0]], dtype=torch.float64)
    box_deltas = torch.tensor([[_delta_of(0, a) for a in range(4)]], dtype=torch.float64)
    anchors = torch.tensor(_TOP_ANCHORS, dtype=torch.float64)
    try:
        scores, deltas, top_anchors = tsd.rpn_select_top_anchors(obj_logits, box_deltas, anchors, topk=10)
    except NotImplementedError:
        raise
    except (RuntimeError, IndexError) as error:
        raise AssertionError(
            "rpn_select_top_anchors with topk = 10 and only 4 anchors: expected k = min(topk, A) = 4 anchors "
            f"per image, computed an error: {error}"
        ) from error
    # k = min(10, 4) = 4: all anchors, by decreasing logit: 2, 3, 0, 1.
    check_dtype("scores of float64 logits", scores, torch.float64)
    check_close("scores (all 4 anchors, decreasing)", scores, [[2.0, 1.0, 0.5, -3.0]])
    check_close("deltas (all 4 anchors, by decreasing logit)", deltas,
                [[_delta_of(0, 2), _delta_of(0, 3), _delta_of(0, 0), _delta_of(0, 1)]])
    a = _TOP_ANCHORS
    check_close("anchors (all 4, by decreasing logit)", top_anchors, [[a[2], a[3], a[0], a[1]]])


# --------------------------------------------------------------------------------------
# roi_head: FasterRCNN.__init__ (the RoI head layers)
# --------------------------------------------------------------------------------------


@pytest.mark.part("roi_head")
def test_roi_head_layers_and_shapes():
    torch.manual_seed(0)
    model = roi_head_model(num_classes=3, channels=16, batch_size_per_image=16, roi_size=(5, 4))
    check_same("layers of roi_stem (3x3 conv + ReLU, then Flatten)", [type(m).__name__ for m in model.roi_stem],
               ["Conv2d", "ReLU", "Flatten"])
    check_same("convs of roi_stem (in, out, kernel, padding)", conv_specs(model.roi_stem), [(16, 16, (3, 3), (1, 1))])

    model = FasterRCNN(TinyBackbone(16), RPN(16, [16], batch_size_per_image=16), [64, 32], 3,
                       batch_size_per_image=16, roi_size=(5, 4))
    check_same("layers of roi_stem with stem_channels [64, 32]", [type(m).__name__ for m in model.roi_stem],
               ["Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten"])
    check_same("convs of roi_stem (in, out, kernel, padding)", conv_specs(model.roi_stem),
               [(16, 64, (3, 3), (1, 1)), (64, 32, (3, 3), (1, 1))])
    # Flattened features: 32 channels x 5 x 4 RoI grid = 640.
    check_same("cls_pred (in_features, out_features): num_classes + 1 = 4 logits",
               (model.cls_pred.in_features, model.cls_pred.out_features), (640, 4))
    check_same("box_pred (in_features, out_features): 4 deltas per class = 12",
               (model.box_pred.in_features, model.box_pred.out_features), (640, 12))
    feats = torch.randn(6, 16, 5, 4)
    flat = model.roi_stem(feats)
    check_shape("roi_stem output for 6 RoIs of 16 x 5 x 4 features", flat, (6, 640))
    check_close("negative part of the roi_stem output (ReLU after the last conv)", flat.clamp(max=0),
                torch.zeros(6, 640))
    check_shape("cls_pred output", model.cls_pred(flat), (6, 4))
    check_shape("box_pred output", model.box_pred(flat), (6, 12))


@pytest.mark.part("roi_head")
def test_roi_head_he_init_of_the_stem():
    torch.manual_seed(0)
    model = FasterRCNN(TinyBackbone(16), RPN(16, [16], batch_size_per_image=16), [64, 32], 3,
                       batch_size_per_image=16)
    convs = [m for m in model.roi_stem if isinstance(m, nn.Conv2d)]
    check_same("number of convs in roi_stem", len(convs), 2)
    for i, conv in enumerate(convs):
        check_he_init(f"weights of RoI stem conv {i}", conv.weight)
        check_close(f"bias of RoI stem conv {i}", conv.bias, torch.zeros_like(conv.bias))


# --------------------------------------------------------------------------------------
# roi_sampling: FasterRCNN.sample_rois
# --------------------------------------------------------------------------------------


def _sampling_inputs():
    """Image 0: GT g0 = [0,0,20,20] (class 1), g1 = [40,40,60,60] (class 2); 4 proposals.
    Image 1: GT h0 = [10,10,30,30] (class 0) and a padding row; 1 proposal."""
    gt = torch.tensor(
        [
            [[0.0, 0.0, 20.0, 20.0, 1.0], [40.0, 40.0, 60.0, 60.0, 2.0]],
            [[10.0, 10.0, 30.0, 30.0, 0.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        ],
        dtype=torch.float64,
    )
    proposals = [
        torch.tensor(
            [
                [0.0, 0.0, 20.0, 16.0],  # p0: IoU 320 / 400 = 0.8 with g0 -> foreground
                [0.0, 0.0, 20.0, 11.0],  # p1: IoU 220 / 400 = 0.55 -> foreground (>= 0.5)
                [0.0, 0.0, 20.0, 8.0],  # p2: IoU 160 / 400 = 0.4 -> background (no neutral band)
                [100.0, 100.0, 120.0, 120.0],  # p3: IoU 0 -> background
            ]
        ),
        torch.tensor([[10.0, 10.0, 30.0, 20.0]]),  # q0: IoU 200 / 400 = 0.5 with h0 -> foreground
    ]
    return proposals, gt


@pytest.mark.part("roi_sampling")
def test_sample_rois_hand_computed_everything_sampled():
    torch.manual_seed(0)
    # 64 samples per image, up to 100% foreground: every candidate that is not neutral is
    # taken, so the result is deterministic (foreground first, then background, each in
    # the order image 0 proposals, image 0 GT, image 1 proposals, image 1 GT).
    model = roi_head_model(batch_size_per_image=64, fg_fraction=1.0, roi_iou_threshold=0.5)
    proposals, gt = _sampling_inputs()
    rois, batch_idx, targets = model.sample_rois(proposals, gt)
    g0, g1, h0 = gt[0, 0].tolist(), gt[0, 1].tolist(), gt[1, 0].tolist()
    p, q0 = proposals[0].tolist(), proposals[1][0].tolist()
    # Candidates: image 0 = p0..p3, g0, g1; image 1 = q0, 3 padding rows (neutral), h0, the
    # padding GT row (not a candidate). Foreground: p0, p1, g0, g1, q0, h0; background: p2, p3.
    check_shape("sampled RoIs (everything but neutral and padding: 6 fg + 2 bg)", rois, (8, 4))
    check_dtype("RoIs (the dtype of the GT boxes)", rois, torch.float64)
    check_close("sampled RoIs (foreground first, GT boxes appended to the proposals)", rois,
                [p[0], p[1], g0[:4], g1[:4], q0, h0[:4], p[2], p[3]],
                hint="candidates = proposals padded to (B, P, 4) followed by the GT boxes; padding is neutral")
    check_equal("image index of each sampled RoI", batch_idx, [0, 0, 0, 0, 1, 1, 0, 0])
    check_close("matched GT rows of the sampled RoIs (-1 for background)", targets,
                [g0, g0, g0, g1, h0, h0, [-1.0] * 5, [-1.0] * 5],
                hint="one threshold, roi_iou_threshold, for both foreground and background (no neutral band)")


@pytest.mark.part("roi_sampling")
def test_sample_rois_quotas_and_image_without_proposals():
    torch.manual_seed(0)
    # 4 samples per image, at most 4 * 0.5 = 2 foreground.
    model = roi_head_model(batch_size_per_image=4, fg_fraction=0.5, roi_iou_threshold=0.5)
    proposals, gt = _sampling_inputs()
    proposals = [proposals[0], torch.zeros(0, 4)]  # image 1 has no proposals
    g0, g1, h0 = gt[0, 0].tolist(), gt[0, 1].tolist(), gt[1, 0].tolist()
    p = proposals[0].tolist()
    # Image 0: foreground candidates p0, p1, g0, g1 (2 of them are drawn), background p2, p3
    # (both drawn). Image 1: its GT box h0 only (foreground); the padded proposals are not
    # candidates (neutral), nor is the padding GT row.
    target_of = {tuple(p[0]): g0, tuple(p[1]): g0, tuple(g0[:4]): g0, tuple(g1[:4]): g1, tuple(h0[:4]): h0,
                 tuple(p[2]): [-1.0] * 5, tuple(p[3]): [-1.0] * 5}
    for _ in range(3):  # a few random draws
        rois, batch_idx, targets = model.sample_rois(proposals, gt)
        fg = targets[:, 4] >= 0
        check_equal("number of foreground RoIs per image", torch.bincount(batch_idx[fg], minlength=2), [2, 1])
        check_equal("number of background RoIs per image", torch.bincount(batch_idx[~fg], minlength=2), [2, 0],
                    hint="padding entries (proposals and GT rows) must be made neutral so that they are never sampled")
        check_equal("image index of the sampled RoIs (foreground first, image by image)", batch_idx,
                    [0, 0, 1, 0, 0])
        for roi, target in zip(rois.tolist(), targets.tolist()):
            check_same(f"matched GT row of the RoI {roi}", target, target_of.get(tuple(roi), "not a candidate"))


# --------------------------------------------------------------------------------------
# roi_losses
# --------------------------------------------------------------------------------------


def _roi_loss_inputs(dtype=torch.float32):
    # 3 RoIs, C = 3 classes (4 logits, background first): RoI 0 is class 1, RoI 1 background,
    # RoI 2 class 0.
    cls_logits = torch.tensor([[0.0, 0.0, LN3, 0.0], [LN3, 0.0, 0.0, 0.0], [0.0, LN6, 0.0, 0.0]], dtype=dtype)
    gt_classes = torch.tensor([1, -1, 0])
    box_deltas = torch.tensor(
        [
            [[9.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0], [8.0, 8.0, 8.0, 8.0]],  # RoI 0: class 1's deltas
            [[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]],  # background: unused
            [[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]],  # RoI 2: class 0's deltas
        ],
        dtype=dtype,
    )
    gt_deltas = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1e8] * 4, [0.5, -0.5, 0.0, 1.0]], dtype=dtype)
    return cls_logits, box_deltas, gt_classes, gt_deltas


@pytest.mark.part("roi_losses")
def test_roi_losses_hand_computed():
    cls_logits, box_deltas, gt_classes, gt_deltas = _roi_loss_inputs()
    loss_cls, loss_box = tsd.roi_losses(cls_logits, box_deltas, gt_classes, gt_deltas)
    check_shape("RoI classification loss (a scalar)", loss_cls, ())
    # Targets gt_classes + 1 = (2, 0, 1). e^logits: RoI 0 (1, 1, 3, 1) -> p = 3/6, -log p = log 2;
    # RoI 1 (3, 1, 1, 1) -> 3/6, log 2; RoI 2 (1, 6, 1, 1) -> 6/9, log(3/2). Sum log 6, / S = 3.
    check_close("RoI classification loss", loss_cls, math.log(6.0) / 3.0,
                hint="logit 0 is background: the target of GT class c is c + 1 (background -1 -> 0)")
    # RoI 0, class 1: |1-1| + |2-1| + |3-1| + |4-1| = 6; RoI 2, class 0: 0.5 + 0.5 + 0 + 1 = 2.
    # Background RoI 1: no box. (6 + 2) / S = 3.
    check_close("RoI box loss", loss_box, 8.0 / 3.0,
                hint="foreground RoIs only, deltas of their GT class (box_deltas[row, class]), sum / S")


@pytest.mark.part("roi_losses")
def test_roi_losses_no_foreground_no_rois_float64_and_gradient():
    cls_logits, box_deltas, gt_classes, gt_deltas = _roi_loss_inputs(torch.float64)
    box_deltas.requires_grad_()
    loss_cls, loss_box = tsd.roi_losses(cls_logits, box_deltas, gt_classes, gt_deltas)
    check_dtype("RoI box loss of float64 inputs", loss_box, torch.float64)
    loss_box.backward()
    # d|x - t| / dx = sign(x - t) / S at the used (RoI, class) deltas only.
    expected_grad = torch.zeros(3, 3, 4, dtype=torch.float64)
    expected_grad[0, 1] = torch.tensor([0.0, 1.0, 1.0, 1.0]) / 3  # sign(0), sign(1), sign(2), sign(3)
    expected_grad[2, 0] = torch.tensor([-1.0, 1.0, 0.0, -1.0]) / 3  # sign(-0.5), sign(0.5), sign(0), sign(-1)
    check_close("gradient of the RoI box loss w.r.t. the predicted deltas", box_deltas.grad, expected_grad)

    # Only background RoIs: box loss exactly 0 (their -1e8 targets are never used).
    loss_cls, loss_box = tsd.roi_losses(cls_logits[1:2], box_deltas[1:2].detach(), gt_classes[1:2], gt_deltas[1:2])
    check_close("RoI classification loss of one background RoI (e^logits (3, 1, 1, 1): log 2, / 1)", loss_cls, LN2)
    check_close("RoI box loss without foreground RoIs", loss_box, 0.0, atol=0)
    # No RoIs at all: both 0, not NaN.
    loss_cls, loss_box = tsd.roi_losses(cls_logits[:0], box_deltas[:0].detach(), gt_classes[:0], gt_deltas[:0])
    check_close("RoI classification loss without RoIs", loss_cls, 0.0, atol=0)
    check_close("RoI box loss without RoIs", loss_box, 0.0, atol=0)


# --------------------------------------------------------------------------------------
# faster_rcnn_inference: FasterRCNN.roi_candidates
# --------------------------------------------------------------------------------------


@pytest.mark.part("faster_rcnn_inference")
def test_roi_candidates_hand_computed():
    torch.manual_seed(0)
    model = roi_head_model(num_classes=3, batch_size_per_image=16)  # box_reg_weights (10, 10, 5, 5)
    rois = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 16.0, 16.0], [40.0, 40.0, 60.0, 60.0]])
    # Softmax over the 4 logits (background first), then drop the background column:
    # RoI 0: e^logits (2, 4, 1, 1) / 8 -> classes 0.5, 0.125, 0.125
    # RoI 1: (1, 1, 1, 1) / 4 -> 0.25 each (= score_thresh: not kept)
    # RoI 2: (1, 1, 6, 6) / 14 -> 1/14, 3/7, 3/7
    cls_logits = torch.tensor([[LN2, LN4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, LN6, LN6]])
    box_deltas = torch.zeros(3, 3, 4)
    # RoI 0 (centre (20, 40), 20 x 40), class 0: (dx, dy, dw) = (1/10, -2/10, 5 log 2 / 5)
    #   -> centre (22, 32), size 40 x 40 -> [2, 12, 42, 52].
    box_deltas[0, 0] = torch.tensor([1.0, -2.0, 5 * LN2, 0.0])
    # RoI 0, class 2: dw = -log 2, dh = log 2 -> 10 x 80 at (20, 40) -> [15, 0, 25, 80] -> y2 clipped to 56.
    box_deltas[0, 2] = torch.tensor([0.0, 0.0, -5 * LN2, 5 * LN2])
    # RoI 1 (centre (8, 8), 16 x 16), class 0: dx = 0.2, dy = 0.1, dw = log 2 -> centre (11.2, 9.6),
    #   32 x 16 -> [-4.8, 1.6, 27.2, 17.6] -> x1 clipped to 0.
    box_deltas[1, 0] = torch.tensor([2.0, 1.0, 5 * LN2, 0.0])
    # RoI 2 (centre (50, 50), 20 x 20), class 1: dx = 10 -> [240, 40, 260, 60] -> clipped to
    #   [64, 40, 64, 56]: width 0. Class 2: dy = -10 -> [40, -160, 60, -140] -> [40, 0, 60, 0]: height 0.
    box_deltas[2, 1] = torch.tensor([100.0, 0.0, 0.0, 0.0])
    box_deltas[2, 2] = torch.tensor([0.0, -100.0, 0.0, 0.0])
    boxes, scores, labels, keep = model.roi_candidates(rois, cls_logits, box_deltas, (56, 64), score_thresh=0.25)
    check_shape("candidate boxes (R * C, 4)", boxes, (9, 4))
    check_close("candidate scores (softmax over C + 1, background dropped; entry r * C + c)", scores,
                [0.5, 0.125, 0.125, 0.25, 0.25, 0.25, 1 / 14, 3 / 7, 3 / 7],
                hint="softmax over all C + 1 logits, then drop column 0 (background)")
    check_equal("candidate labels (0-based class of entry r * C + c)", labels, [0, 1, 2, 0, 1, 2, 0, 1, 2])
    check_close(
        "candidate boxes (decoded with box_reg_weights, clipped to the 56 x 64 image)",
        boxes,
        [[2.0, 12.0, 42.0, 52.0], [10.0, 20.0, 30.0, 56.0], [15.0, 0.0, 25.0, 56.0],
         [0.0, 1.6, 27.2, 17.6], [0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0],
         [40.0, 40.0, 60.0, 56.0], [64.0, 40.0, 64.0, 56.0], [40.0, 0.0, 60.0, 0.0]],
        atol=1e-4,
        hint="rcnn_apply_deltas_to_anchors(deltas, rois, self.box_reg_weights), then fcos.clip_boxes",
    )
    check_equal("keep (score > 0.25 and positive width and height)", keep,
                [True, False, False, False, False, False, False, False, False])


@pytest.mark.part("faster_rcnn_inference")
def test_roi_candidates_no_rois_and_float64():
    model = roi_head_model(num_classes=3, batch_size_per_image=16).double()
    boxes, scores, labels, keep = model.roi_candidates(
        torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64),
        torch.zeros(0, 3, 4, dtype=torch.float64), (64, 64), 0.1)
    check_shape("boxes without RoIs", boxes, (0, 4))
    check_shape("scores without RoIs", scores, (0,))
    check_shape("labels without RoIs", labels, (0,))
    check_shape("keep without RoIs", keep, (0,))
    rois = torch.tensor([[8.0, 8.0, 24.0, 40.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, 0.0, LN2, LN4]], dtype=torch.float64)  # (1, 1, 2, 4) / 8
    boxes, scores, labels, keep = model.roi_candidates(rois, logits, torch.zeros(1, 3, 4, dtype=torch.float64),
                                                       (64, 64), 0.1)
    check_dtype("boxes of float64 inputs", boxes, torch.float64)
    check_dtype("scores of float64 inputs", scores, torch.float64)
    check_dtype("labels", labels, torch.int64)
    check_dtype("keep", keep, torch.bool)
    check_close("scores", scores, [0.125, 0.25, 0.5], rtol=1e-12, atol=1e-12)
    check_close("boxes (zero deltas: the RoI itself)", boxes, [rois[0].tolist()] * 3)
    check_equal("keep (scores 0.125, 0.25, 0.5 > 0.1)", keep, [True, True, True])


# --------------------------------------------------------------------------------------
# Provided code: matching glue, sampler, FPN levels, multi-scale RoI Align
# --------------------------------------------------------------------------------------


@pytest.mark.part("provided")
def test_hello(capsys):
    tsd.hello_two_stage_detector()
    assert "two_stage_detector" in capsys.readouterr().out


@pytest.mark.part("provided")
def test_match_foreground_neutral_background():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0, 2.0]])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1    -> foreground
            [0.0, 0.0, 10.0, 7.0],  # IoU 0.7  -> foreground
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5  -> neutral
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2  -> background
            [20.0, 20.0, 30.0, 30.0],  # IoU 0  -> background
        ]
    )
    matched = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6))
    assert matched.shape == (5, 5)
    torch.testing.assert_close(matched[0], gt[0])
    torch.testing.assert_close(matched[1], gt[0])
    assert (matched[2] == -1e8).all()
    assert (matched[3] == -1).all() and (matched[4] == -1).all()


@pytest.mark.part("provided")
def test_match_low_quality_matches():
    # A small GT box whose best anchor has IoU 0.25 only (below the background threshold).
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0, 1.0], [50.0, 50.0, 60.0, 60.0, 0.0]])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 8.0, 8.0],  # IoU 0.25 with GT 0: its best anchor
            [2.0, 2.0, 10.0, 10.0],  # IoU 4/76 with GT 0
            [50.0, 50.0, 60.0, 60.0],  # IoU 1 with GT 1
            [50.0, 50.0, 60.0, 65.0],  # IoU 2/3 with GT 1 -> foreground by threshold
        ]
    )
    with_lq = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.7))
    torch.testing.assert_close(with_lq[0], gt[0])  # promoted, matched with its GT box
    assert (with_lq[1] == -1).all()
    torch.testing.assert_close(with_lq[2], gt[1])
    assert (with_lq[3] == -1e8).all()  # 2/3 is in the neutral band (0.3, 0.7)

    without_lq = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.7), allow_low_quality_matches=False)
    assert (without_lq[0] == -1).all()
    torch.testing.assert_close(without_lq[2], gt[1])

    # Ties: both anchors that reach the best IoU of a GT box become foreground.
    tie_anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [-4.0, -4.0, 4.0, 4.0], [20.0, 20.0, 30.0, 30.0]])
    tied = rcnn_match_anchors_to_gt(tie_anchors, gt[:1], (0.3, 0.7))
    torch.testing.assert_close(tied[:2], gt[:1].expand(2, 5))
    assert (tied[2] == -1).all()


@pytest.mark.part("provided")
def test_match_no_gt_padding_and_batches():
    anchors = random_boxes(30, generator=torch.Generator().manual_seed(0))
    padded = torch.full((3, 5), -1.0)
    assert (rcnn_match_anchors_to_gt(anchors, padded, (0.3, 0.7)) == -1).all()
    assert (rcnn_match_anchors_to_gt(anchors, padded[:0], (0.3, 0.7)) == -1).all()

    # A batch (padded GT) gives the same as matching image by image; padding never matches.
    gt0 = torch.cat([anchors[[3, 7]] + 1.0, torch.tensor([[0.0], [4.0]])], dim=1)
    gt1 = torch.cat([anchors[[11]] - 2.0, torch.tensor([[2.0]])], dim=1)
    batch = torch.full((2, 2, 5), -1.0)
    batch[0], batch[1, :1] = gt0, gt1
    matched = rcnn_match_anchors_to_gt(anchors, batch, (0.3, 0.7))
    assert matched.shape == (2, 30, 5)
    torch.testing.assert_close(matched[0], rcnn_match_anchors_to_gt(anchors, gt0, (0.3, 0.7)))
    torch.testing.assert_close(matched[1], rcnn_match_anchors_to_gt(anchors, gt1, (0.3, 0.7)))
    assert set(matched[1, :, 4].tolist()) <= {2.0, -1.0, -1e8}
    # Per-image anchors (B, A, 4) work as well.
    per_image = rcnn_match_anchors_to_gt(anchors.expand(2, 30, 4), batch, (0.3, 0.7))
    torch.testing.assert_close(per_image, matched)


def _matched_labels(num_fg: int, num_bg: int, num_neutral: int, seed: int = 0) -> torch.Tensor:
    """(N, 5) matched GT rows in a random order: class 1 (fg), -1 (bg) or -1e8 (neutral)."""
    labels = torch.cat([torch.ones(num_fg), -torch.ones(num_bg), torch.full((num_neutral,), -1e8)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    rows = torch.zeros(len(labels), 5)
    rows[:, :4] = torch.where(labels[:, None] == 1, torch.tensor([1.0, 2.0, 3.0, 4.0]), labels[:, None])
    rows[:, 4] = labels
    return rows


@pytest.mark.part("provided")
def test_sampler_counts_and_fractions():
    torch.manual_seed(0)
    rows = _matched_labels(num_fg=10, num_bg=100, num_neutral=50)
    fg_idx, bg_idx = sample_rpn_training(rows, num_samples=32, fg_fraction=0.25)
    assert len(fg_idx) == 8 and len(bg_idx) == 24
    assert (rows[fg_idx, 4] == 1).all() and (rows[bg_idx, 4] == -1).all()
    assert len(set(fg_idx.tolist())) == 8 and len(set(bg_idx.tolist())) == 24

    # Not enough foreground: all of it, and background fills the sample.
    fg_idx, bg_idx = sample_rpn_training(_matched_labels(3, 100, 50), num_samples=32, fg_fraction=0.5)
    assert len(fg_idx) == 3 and len(bg_idx) == 29
    # Not enough of either: everything that is not neutral, never a neutral row.
    rows = _matched_labels(3, 5, 50)
    fg_idx, bg_idx = sample_rpn_training(rows, num_samples=32, fg_fraction=0.5)
    assert len(fg_idx) == 3 and len(bg_idx) == 5
    assert (rows[torch.cat([fg_idx, bg_idx]), 4] != -1e8).all()

    # Random: repeated draws cover all the foreground, not always the same subset.
    rows = _matched_labels(10, 100, 0)
    seen = set()
    for _ in range(20):
        seen |= set(sample_rpn_training(rows, num_samples=8, fg_fraction=0.5)[0].tolist())
    assert seen == set(torch.nonzero(rows[:, 4] == 1).squeeze(1).tolist())


@pytest.mark.part("provided")
def test_sampler_batched_per_image():
    torch.manual_seed(0)
    rows = torch.stack([_matched_labels(20, 60, 20, seed=1), _matched_labels(2, 90, 8, seed=2)])
    fg_idx, bg_idx = sample_rpn_training(rows, num_samples=16, fg_fraction=0.5)
    flat = rows.reshape(-1, 5)
    assert (flat[fg_idx, 4] == 1).all() and (flat[bg_idx, 4] == -1).all()
    # Each image gets its own sample of 16: 8 + 8 for image 0, 2 + 14 for image 1.
    assert torch.bincount(fg_idx // 100, minlength=2).tolist() == [8, 2]
    assert torch.bincount(bg_idx // 100, minlength=2).tolist() == [8, 14]


@pytest.mark.part("provided")
def test_assign_fpn_levels_by_size():
    sizes = torch.tensor([20.0, 111.0, 112.0, 150.0, 223.0, 224.0, 300.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], dim=1) + 5.0
    # floor(4 + log2(size / 224)), clamped to 3..5.
    assert assign_fpn_levels(boxes).tolist() == [3, 3, 3, 3, 3, 4, 4, 5, 5]
    # The rule uses sqrt(area): a 112 x 448 box is "224" -> level 4.
    assert assign_fpn_levels(torch.tensor([[0.0, 0.0, 112.0, 448.0]])).tolist() == [4]
    assert assign_fpn_levels(boxes, fpn_level_ids=(2, 3, 4, 5, 6)).tolist() == [2, 2, 3, 3, 3, 4, 4, 5, 6]


@pytest.mark.part("provided")
def test_reassign_proposals_to_fpn_levels():
    small, medium, large = [0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 250.0, 250.0], [0.0, 0.0, 500.0, 500.0]
    proposals = [torch.tensor([small, large, small]), torch.tensor([medium])]
    copies = [p.clone() for p in proposals]
    gt = torch.tensor([[medium + [1.0], [-1.0] * 5], [[-1.0] * 5, [-1.0] * 5]])

    per_level = reassign_proposals_to_fpn_levels(proposals, gt)
    assert set(per_level) == {"p3", "p4", "p5"}
    assert all(len(v) == 2 for v in per_level.values())
    assert per_level["p3"][0].tolist() == [small, small]
    assert per_level["p4"][0].tolist() == [medium]  # the GT box was added, not the padding
    assert per_level["p5"][0].tolist() == [large]
    assert per_level["p4"][1].tolist() == [medium] and per_level["p3"][1].shape == (0, 4)
    for p, c in zip(proposals, copies):
        assert torch.equal(p, c)  # inputs are not modified

    no_gt = reassign_proposals_to_fpn_levels(proposals)
    assert no_gt["p4"][0].shape == (0, 4)


@pytest.mark.part("provided")
def test_multiscale_roi_align_keeps_roi_order():
    # Constant features whose value tells the image and the level: 10 * image + level.
    image_size, num_images = 512, 3
    feats = {}
    for name, stride in STRIDES.items():
        value = 10.0 * torch.arange(num_images, dtype=torch.float32)[:, None, None, None] + int(name[1])
        feats[name] = value.expand(num_images, 2, image_size // stride, image_size // stride).contiguous()
    # Box sizes 20, 60, 120 -> p3; 230, 300 -> p4; 460 -> p5.
    sizes = torch.tensor([20.0, 60.0, 230.0, 120.0, 460.0, 300.0])
    boxes = torch.stack([torch.ones(6), torch.ones(6), sizes + 1, sizes + 1], dim=1)
    batch_idx = torch.tensor([2, 0, 1, 1, 0, 2])  # levels and images interleaved
    expected_level = torch.tensor([3.0, 3.0, 4.0, 3.0, 5.0, 4.0])
    pooled = multiscale_roi_align(feats, STRIDES, boxes, batch_idx, (3, 3))
    assert pooled.shape == (6, 2, 3, 3)
    expected = 10.0 * batch_idx + expected_level
    torch.testing.assert_close(pooled, expected[:, None, None, None].expand(6, 2, 3, 3))

    # The same as one torchvision roi_align call (aligned, sampling ratio 2) for one box.
    rand_feats = {name: torch.randn(2, 4, 128 // s, 128 // s) for name, s in STRIDES.items()}
    box = torch.tensor([[8.0, 16.0, 60.0, 90.0]])
    direct = torchvision.ops.roi_align(
        rand_feats["p3"], torch.tensor([[1.0, 8.0, 16.0, 60.0, 90.0]]), (7, 7), 1 / 8, 2, aligned=True
    )
    torch.testing.assert_close(multiscale_roi_align(rand_feats, STRIDES, box, torch.tensor([1]), (7, 7)), direct)


@pytest.mark.part("provided")
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_multiscale_roi_align_gradient_equals_torchvision(sampling_ratio):
    # The CPU backward of multiscale_roi_align is computed by the module (faster than
    # torchvision's loop): it must give torchvision's gradient, also for boxes that
    # stick out of the feature map and for tiny boxes.
    gen = torch.Generator().manual_seed(sampling_ratio)
    feats = {
        name: torch.randn(3, 4, 96 // s, 80 // s, generator=gen, dtype=torch.float64) for name, s in STRIDES.items()
    }
    xy = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 120 - 20
    wh = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 200 + 0.01
    boxes = torch.cat([xy, xy + wh], dim=1)
    # One box per level at least, two of them partly outside the map.
    boxes[:3] = torch.tensor([[-10.0, -12.0, 20.0, 30.0], [10.0, 5.0, 250.0, 260.0], [-30.0, 0.0, 500.0, 480.0]])
    batch_idx = torch.randint(0, 3, (30,), generator=gen)
    grad_out = torch.randn(30, 4, 5, 6, generator=gen, dtype=torch.float64)

    ours = {k: v.clone().requires_grad_() for k, v in feats.items()}
    pooled = multiscale_roi_align(ours, STRIDES, boxes, batch_idx, (5, 6), sampling_ratio=sampling_ratio)
    pooled.backward(grad_out)

    reference = {k: v.clone().requires_grad_() for k, v in feats.items()}
    levels = assign_fpn_levels(boxes)
    assert len(set(levels.tolist())) == 3
    rois = torch.cat([batch_idx[:, None].double(), boxes], dim=1)
    expected = torch.zeros_like(pooled)
    for name, stride in STRIDES.items():
        at_level = levels == int(name[1])
        expected[at_level] = torchvision.ops.roi_align(
            reference[name], rois[at_level], (5, 6), 1 / stride, sampling_ratio, aligned=True
        )
    expected.backward(grad_out)
    torch.testing.assert_close(pooled, expected)
    for name in STRIDES:
        torch.testing.assert_close(ours[name].grad, reference[name].grad)

    # No RoIs: zero gradient, no error.
    empty = multiscale_roi_align(ours, STRIDES, boxes[:0], batch_idx[:0], (5, 6))
    assert empty.shape == (0, 4, 5, 6)


# --------------------------------------------------------------------------------------
# Provided code: the RPN, proposals and the whole detector
# --------------------------------------------------------------------------------------


def _rpn_with_constant_predictions(obj_value: float, box_value: float, **kwargs) -> RPN:
    rpn = RPN(8, [8], **kwargs)
    with torch.no_grad():
        for layer, value in [(rpn.pred_net.pred_obj, obj_value), (rpn.pred_net.pred_box, box_value)]:
            layer.weight.zero_()
            layer.bias.fill_(value)
    return rpn


@pytest.mark.part("provided")
def test_rpn_forward_losses_hand_computed():
    torch.manual_seed(0)
    # Anchors of side 8 * stride_scale=1: the GT box equals the ratio-1 p3 anchor at
    # (28, 28); its ratio-0.5/2 anchors are neutral (IoU 0.55), everything else background.
    rpn = _rpn_with_constant_predictions(0.0, 1.0, batch_size_per_image=16, anchor_stride_scale=1)
    rpn.train()
    gt = torch.tensor([[[24.0, 24.0, 32.0, 32.0, 4.0]]])
    out = rpn(fpn_feats(1, 8), STRIDES, gt)
    assert set(out) == {"proposals", "loss_rpn_obj", "loss_rpn_box"}
    # 16 sampled anchors with logit 0: BCE = log 2 each, / (16 * 1 image).
    torch.testing.assert_close(out["loss_rpn_obj"], torch.tensor(math.log(2.0)))
    # One foreground anchor with target deltas 0 and predictions 1: |1| * 4 / 16.
    torch.testing.assert_close(out["loss_rpn_box"], torch.tensor(0.25))


@pytest.mark.part("provided")
def test_rpn_no_objects_and_gradients():
    torch.manual_seed(0)
    rpn = RPN(8, [8], batch_size_per_image=16, anchor_stride_scale=4)
    rpn.train()
    feats = {k: v.requires_grad_() for k, v in fpn_feats(2, 8).items()}
    gt = torch.full((2, 2, 5), -1.0)
    out = rpn(feats, STRIDES, gt)
    assert torch.isfinite(out["loss_rpn_obj"]) and out["loss_rpn_obj"] > 0
    assert out["loss_rpn_box"] == 0

    gt[1, 0] = torch.tensor([10.0, 12.0, 40.0, 50.0, 1.0])
    out = rpn(feats, STRIDES, gt)
    assert torch.isfinite(out["loss_rpn_box"]) and out["loss_rpn_box"] > 0
    (out["loss_rpn_obj"] + out["loss_rpn_box"]).backward()
    for name, param in rpn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert feats["p3"].grad.abs().sum() > 0


@pytest.mark.part("provided")
def test_predict_proposals_hand_computed():
    rpn = RPN(4, [4], batch_size_per_image=16, nms_thresh=0.7, pre_nms_topk=5, post_nms_topk=10)
    anchors = {
        "p3": torch.tensor(
            [
                [0.0, 0.0, 20.0, 20.0],  # logit 5: kept
                [1.0, 1.0, 21.0, 21.0],  # logit 4: IoU 0.82 with the first -> suppressed
                [30.0, 30.0, 45.0, 45.0],  # logit 3: dw = log 2 -> [22.5, 30, 52.5, 45] -> clipped x2 = 50
                [40.0, 40.0, 80.0, 80.0],  # logit 2: clipped to [40, 40, 50, 50]
                [60.0, 60.0, 70.0, 70.0],  # logit 6: empty after clipping -> dropped
                [0.0, 0.0, 5.0, 5.0],  # logit -10: not in the top 5 of its level
            ]
        ),
        "p4": torch.tensor([[22.0, 0.0, 40.0, 12.0]]),  # logit -20, but the best of its level
    }
    logits = {"p3": torch.tensor([[5.0, 4.0, 3.0, 2.0, 6.0, -10.0]]), "p4": torch.tensor([[-20.0]])}
    deltas = {"p3": torch.zeros(1, 6, 4), "p4": torch.zeros(1, 1, 4)}
    deltas["p3"][0, 2, 2] = math.log(2.0)
    expected = torch.tensor([[0.0, 0.0, 20.0, 20.0], [22.5, 30.0, 50.0, 45.0], [40.0, 40.0, 50.0, 50.0],
                             [22.0, 0.0, 40.0, 12.0]])

    def sort_rows(x):
        return x[torch.argsort(x[:, 0] * 1000 + x[:, 1])]

    proposals = rpn.predict_proposals(anchors, logits, deltas, (50, 50))
    assert len(proposals) == 1
    torch.testing.assert_close(sort_rows(proposals[0]), sort_rows(expected))

    # post_nms_topk keeps the best ones; the batch dimension is independent per image.
    rpn.post_nms_topk = 2
    batch_logits = {"p3": torch.cat([logits["p3"], -logits["p3"]]), "p4": torch.tensor([[-20.0], [30.0]])}
    batch_deltas = {k: v.expand(2, -1, -1) for k, v in deltas.items()}
    proposals = rpn.predict_proposals(anchors, batch_logits, batch_deltas, (50, 50))
    assert len(proposals) == 2
    torch.testing.assert_close(sort_rows(proposals[0]), sort_rows(expected[:2]))
    # Image 1: p4 anchor (30), then the best of the p3 top-5 ([0, 0, 5, 5] at 10).
    torch.testing.assert_close(sort_rows(proposals[1]), sort_rows(torch.tensor([[22.0, 0, 40, 12], [0.0, 0, 5, 5]])))


@pytest.mark.part("provided")
def test_rpn_eval_proposals_per_image():
    torch.manual_seed(0)
    rpn = RPN(8, [8], batch_size_per_image=16, anchor_stride_scale=4, pre_nms_topk=30, post_nms_topk=12).double()
    for layer in (rpn.pred_net.pred_obj, rpn.pred_net.pred_box):
        nn.init.normal_(layer.weight, std=0.3)
    rpn.eval()
    feats = {k: v.double() for k, v in fpn_feats(2, 8, image=96).items()}
    out = rpn(feats, STRIDES, image_size=(90, 96))
    assert set(out) == {"proposals"} and len(out["proposals"]) == 2
    for b, proposals in enumerate(out["proposals"]):
        assert proposals.dtype == torch.float64 and 0 < proposals.shape[0] <= 12
        assert (proposals[:, [0, 2]] >= 0).all() and (proposals[:, [0, 2]] <= 96).all()
        assert (proposals[:, [1, 3]] >= 0).all() and (proposals[:, [1, 3]] <= 90).all()
        assert (proposals[:, 2] > proposals[:, 0]).all() and (proposals[:, 3] > proposals[:, 1]).all()
        overlaps = torchvision.ops.box_iou(proposals, proposals) - torch.eye(len(proposals), dtype=torch.float64)
        assert overlaps.max() <= 0.7 + 1e-9
        # The same proposals as for this image alone.
        alone = rpn({k: v[b: b + 1] for k, v in feats.items()}, STRIDES, image_size=(90, 96))["proposals"][0]
        torch.testing.assert_close(proposals, alone)
    # Default image size: stride * size of p3.
    default = rpn(feats, STRIDES)["proposals"]
    assert all((p <= 96).all() for p in default)


@pytest.mark.part("provided")
def test_rpn_proposals_when_the_best_boxes_are_duplicates():
    """Proposals = the first post_nms_topk survivors of NMS over *all* candidates of each
    image, even when the best-scored boxes suppress each other (so that NMS on a short
    prefix of the candidates, a valid shortcut, is not enough), image by image."""
    rpn = RPN(4, [4], batch_size_per_image=16, nms_thresh=0.7, pre_nms_topk=100, post_nms_topk=5).double()
    duplicates = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(50, 1)
    distinct = torch.stack([torch.tensor([60.0 + 12 * i, 60.0, 70.0 + 12 * i, 70.0]) for i in range(10)])
    anchors = {"p3": torch.cat([duplicates, distinct]).double()}  # 60 anchors
    rank = torch.arange(60, dtype=torch.float64)
    logits = {"p3": torch.stack([
        10.0 - 0.01 * rank,  # image 0: the 50 duplicates first, then the distinct boxes
        torch.cat([-rank[:50], 100.0 - rank[:10]]),  # image 1: the distinct boxes first
    ])}
    deltas = {"p3": torch.zeros(2, 60, 4, dtype=torch.float64)}
    proposals = rpn.predict_proposals(anchors, logits, deltas, (200, 200))
    # Image 0: one of the duplicates survives, then the 4 best distinct boxes.
    torch.testing.assert_close(proposals[0], torch.cat([duplicates[:1], distinct[:4]]).double())
    # Image 1: the 5 best distinct boxes.
    torch.testing.assert_close(proposals[1], distinct[:5].double())


# --------------------------------------------------------------------------------------
# Faster R-CNN
# --------------------------------------------------------------------------------------


def _two_images_gt() -> torch.Tensor:
    """GT of two 64 px images with different objects: class 0 in image 0, class 2 in image 1."""
    return torch.tensor(
        [
            [[4.0, 4.0, 20.0, 20.0, 0.0], [10.0, 24.0, 60.0, 62.0, 0.0], [30.0, 2.0, 50.0, 14.0, 0.0]],
            [[30.0, 30.0, 62.0, 62.0, 2.0], [2.0, 2.0, 40.0, 60.0, 2.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        ]
    )


@pytest.mark.part("provided")
def test_faster_rcnn_roi_targets_come_from_their_own_image(monkeypatch):
    """Regression test: pooled features, labels and box targets stay aligned in batches.

    Features encode the image (channel 0 = 1 + image index); image 0 has objects of class 0
    only and image 1 of class 2 only. Every foreground RoI's label must be the class of the
    image its features were pooled from.
    """
    torch.manual_seed(0)
    feats = fpn_feats(2, 8)
    for level in feats.values():
        level[:, 0] = torch.tensor([1.0, 2.0])[:, None, None]
    model = small_faster_rcnn(backbone=FixedFeatureBackbone(feats), channels=8)
    model.train()

    pooled: List[torch.Tensor] = []
    targets: List[torch.Tensor] = []
    model.roi_stem.register_forward_pre_hook(lambda module, args: pooled.append(args[0].detach()))
    real_cross_entropy = F.cross_entropy

    def spy_cross_entropy(logits, target, *args, **kwargs):
        targets.append(target.detach())
        return real_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy_cross_entropy)
    for _ in range(3):  # a few random samples
        pooled.clear(), targets.clear()
        losses = model(torch.zeros(2, 3, 64, 64), _two_images_gt())
        assert len(pooled) == 1 and len(targets) == 1
        image_of_roi = pooled[0][:, 0].mean(dim=(1, 2)).round().long() - 1
        labels = targets[0]
        assert labels.shape[0] == image_of_roi.shape[0]
        fg = labels > 0
        assert (image_of_roi[fg] == 0).any() and (image_of_roi[fg] == 1).any()
        # Class c is logit c + 1: image 0 -> 1, image 1 -> 3.
        assert torch.equal(labels[fg], torch.where(image_of_roi[fg] == 0, 1, 3))
        assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.part("provided")
def test_faster_rcnn_losses_without_objects():
    torch.manual_seed(0)
    model = small_faster_rcnn(channels=8)
    model.train()
    images = torch.rand(2, 3, 64, 64)
    losses = model(images, torch.full((2, 3, 5), -1.0))
    assert set(losses) == {"loss_rpn_obj", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_box"] == 0 and losses["loss_box"] == 0
    assert losses["loss_cls"] > 0
    sum(losses.values()).backward()

    # One image with objects, one without.
    gt = _two_images_gt()
    gt[1] = -1
    losses = model(images, gt)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box"] > 0


@pytest.mark.part("provided")
def test_faster_rcnn_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = small_faster_rcnn(channels=8)
    assert model.cls_pred.out_features == 4 and model.box_pred.out_features == 3 * 4
    model.train()
    losses = model(torch.rand(2, 3, 64, 64), _two_images_gt())
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.part("provided")
def test_autocast_keeps_anchors_rois_and_losses_in_float32(monkeypatch):
    """Under bfloat16 autocast (CPU; float16 on GPUs) only the convs and linears
    run in half precision: bfloat16 steps by a whole pixel above 128 px, so
    anchors, GT, proposals, RoI pooling, losses and boxes stay float32."""
    torch.manual_seed(0)
    model = small_faster_rcnn(channels=8).train()
    matched_dtypes = []
    real_match = tsd.rcnn_match_anchors_to_gt

    def recording_match(anchors, gt, *args, **kwargs):
        matched_dtypes.append((anchors.dtype, gt.dtype))
        return real_match(anchors, gt, *args, **kwargs)

    # The RPN (provided) looks the matcher up in this module; sample_rois in the module it
    # was defined in (the reference's when the tests grade another part).
    for namespace in (tsd.__dict__, inspect.unwrap(FasterRCNN.sample_rois).__globals__):
        monkeypatch.setitem(namespace, "rcnn_match_anchors_to_gt", recording_match)
    images = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.backbone(images)["p3"].dtype == torch.bfloat16  # the autocast is real
        losses = model(images, _two_images_gt())
        model.eval()
        detections = model.predict(images, score_thresh=0.0)
    assert matched_dtypes == [(torch.float32, torch.float32)] * 2  # RPN anchors, then RoIs
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float32 for d in detections)

    # Pooling half-precision features equals pooling their float32 copy.
    feats = {name: f.to(torch.bfloat16) for name, f in fpn_feats(2, 4).items()}
    boxes, batch_idx = random_boxes(12, size=50), torch.tensor([0, 1] * 6)
    pooled = multiscale_roi_align(feats, STRIDES, boxes, batch_idx, (3, 3))
    expected = multiscale_roi_align({k: f.float() for k, f in feats.items()}, STRIDES, boxes, batch_idx, (3, 3))
    assert pooled.dtype == torch.float32 and torch.equal(pooled, expected)


@pytest.fixture
def frozen_regnet() -> DetectorBackboneWithFPN:
    """A random, frozen RegNetX-400MF backbone with FPN. Built per test, after the grading
    isolation has put the reference FPN in place (a module-scoped fixture would be built
    before it, from the submission's FPN)."""
    torch.manual_seed(0)
    return DetectorBackboneWithFPN(16, backbone="regnet_x_400mf", pretrained=False, freeze_backbone=True)


def _frozen_regnet_model(backbone: DetectorBackboneWithFPN, num_classes: int = 3) -> FasterRCNN:
    backbone.zero_grad(set_to_none=True)
    rpn = RPN(16, [16], batch_size_per_image=16, anchor_stride_scale=4, pre_nms_topk=50, post_nms_topk=20)
    return FasterRCNN(backbone, rpn, [16], num_classes, batch_size_per_image=16)


@pytest.mark.part("provided")
def test_faster_rcnn_training_on_cached_features(frozen_regnet):
    torch.manual_seed(0)
    model = _frozen_regnet_model(frozen_regnet)
    model.train()
    images = torch.rand(2, 3, 64, 64)
    cached = model.backbone.extract_features(images)
    assert set(cached) == {"c3", "c4", "c5"}
    torch.manual_seed(1)
    from_images = model(images, _two_images_gt())
    torch.manual_seed(1)  # same random samples
    from_cache = model(cached, _two_images_gt())
    for name in from_images:
        torch.testing.assert_close(from_cache[name], from_images[name])
    sum(from_cache.values()).backward()
    assert all(p.grad is None for p in model.backbone.backbone.parameters())
    assert model.cls_pred.weight.grad.abs().sum() > 0


def _drawn_images() -> tuple:
    """Two 64 px images with coloured rectangles (red = class 0, green = class 1)."""
    gt = torch.tensor(
        [
            [[6.0, 8.0, 34.0, 30.0, 0.0], [36.0, 34.0, 60.0, 60.0, 1.0]],
            [[4.0, 30.0, 28.0, 60.0, 1.0], [30.0, 4.0, 60.0, 28.0, 0.0]],
        ]
    )
    images = torch.full((2, 3, 64, 64), 0.1)
    for b in range(2):
        for x1, y1, x2, y2, c in gt[b].long().tolist():
            images[b, :, y1:y2, x1:x2] = 0.0
            images[b, c, y1:y2, x1:x2] = 1.0
    return images, gt


@pytest.mark.part("provided")
def test_faster_rcnn_overfits_two_images():
    torch.manual_seed(0)
    images, gt = _drawn_images()
    model = small_faster_rcnn(num_classes=2, channels=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    history = []
    # Tiny tensors: one thread is as fast, and much faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(100):
            losses = model(images, gt)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append(total.item())
    finally:
        torch.set_num_threads(threads)
    assert sum(history[-10:]) / 10 < 0.5 * sum(history[:5]) / 5

    detections = model.predict(images, score_thresh=0.5, nms_thresh=0.5)
    assert model.training  # predict restores the mode
    for b in range(2):
        boxes, labels = detections[b]["boxes"], detections[b]["labels"]
        for x1, y1, x2, y2, c in gt[b].tolist():
            overlaps = torchvision.ops.box_iou(torch.tensor([[x1, y1, x2, y2]]), boxes)[0]
            assert ((overlaps > 0.5) & (labels == int(c))).any(), (b, c, detections[b])


# --------------------------------------------------------------------------------------
# Faster R-CNN inference
# --------------------------------------------------------------------------------------


class _FixedProposals(nn.Module):
    """Stands in for the RPN: returns given proposals."""

    def __init__(self, proposals: List[torch.Tensor]):
        super().__init__()
        self.proposals = proposals

    def forward(self, feats, strides, gt_boxes=None, image_size=None):
        return {"proposals": [p.clone() for p in self.proposals]}


@pytest.mark.part("provided")
def test_inference_hand_computed_class_specific_boxes():
    torch.manual_seed(0)
    model = small_faster_rcnn(num_classes=3, channels=8)
    proposals = [torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    model.rpn = _FixedProposals(proposals)
    wx, wy, ww, wh = model.box_reg_weights
    with torch.no_grad():
        model.cls_pred.weight.zero_()
        model.cls_pred.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # class 1 wins
        model.box_pred.weight.zero_()
        model.box_pred.bias.zero_()
        # Deltas of class 1 only: dx = 0.1, dy = -0.2, dw = log 2, dh = 0.
        model.box_pred.bias[4:8] = torch.tensor([wx * 0.1, wy * -0.2, ww * math.log(2.0), 0.0])
    detections = model.predict(torch.zeros(2, 3, 64, 64), score_thresh=0.3, nms_thresh=0.5)
    score = math.exp(5) / (3 + math.exp(5))
    # Proposal 0: centre (20, 40), size 20 x 40 -> centre (22, 32), size 40 x 40.
    torch.testing.assert_close(detections[0]["boxes"], torch.tensor([[2.0, 12.0, 42.0, 52.0]]))
    # Proposal 1: centre (8, 8), size 16 -> centre (9.6, 4.8), size 32 x 16, clipped at 0.
    torch.testing.assert_close(detections[1]["boxes"], torch.tensor([[0.0, 0.0, 25.6, 12.8]]))
    for det in detections:
        assert det["labels"].tolist() == [1]
        torch.testing.assert_close(det["scores"], torch.tensor([score]))

    # Eval forward on one image returns (boxes, classes, scores); thresholds apply.
    model.eval()
    model.rpn = _FixedProposals(proposals[:1])
    boxes, classes, scores = model(torch.zeros(1, 3, 64, 64), test_score_thresh=0.3, test_nms_thresh=0.5)
    torch.testing.assert_close(boxes, detections[0]["boxes"])
    assert classes.tolist() == [1]
    boxes, classes, scores = model(torch.zeros(1, 3, 64, 64), test_score_thresh=0.99, test_nms_thresh=0.5)
    assert boxes.shape == (0, 4) and classes.shape == (0,) and scores.shape == (0,)


@pytest.mark.part("provided")
def test_predict_batch_equals_single_images():
    torch.manual_seed(0)
    model = small_faster_rcnn(num_classes=3, channels=8, pre_nms_topk=40, post_nms_topk=30).double()
    nn.init.normal_(model.cls_pred.weight, std=0.2)
    nn.init.normal_(model.box_pred.weight, std=0.05)
    model.detections_per_image = 15
    images = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    batch = model.predict(images, score_thresh=0.2, nms_thresh=0.5)
    assert len(batch) == 3
    for b, det in enumerate(batch):
        assert 0 < len(det["boxes"]) <= 15
        assert det["boxes"].shape == (len(det["labels"]), 4) and det["scores"].shape == det["labels"].shape
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        assert (det["scores"] > 0.2).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 64).all()
        for c in range(3):  # class-specific NMS
            same = det["boxes"][det["labels"] == c]
            overlaps = torchvision.ops.box_iou(same, same) - torch.eye(len(same), dtype=torch.float64)
            assert overlaps.numel() == 0 or overlaps.max() <= 0.5 + 1e-9
        alone = model.predict(images[b: b + 1], score_thresh=0.2, nms_thresh=0.5)[0]
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(det[key], alone[key])


@pytest.mark.part("provided")
def test_predict_on_cached_features_equals_images(frozen_regnet):
    torch.manual_seed(0)
    model = _frozen_regnet_model(frozen_regnet)
    nn.init.normal_(model.cls_pred.weight, std=0.2)
    images = torch.rand(2, 3, 64, 64)
    cached = model.backbone.extract_features(images)
    from_images = model.predict(images, score_thresh=0.1)
    from_cache = model.predict(cached, score_thresh=0.1)
    assert sum(len(d["boxes"]) for d in from_images) > 0
    for a, b in zip(from_images, from_cache):
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(a[key], b[key])
    model.eval()
    single = model(images[:1], test_score_thresh=0.1, test_nms_thresh=0.5)
    torch.testing.assert_close(single[0], from_images[0]["boxes"])

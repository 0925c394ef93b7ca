"""Hidden tests of fcos.py (instructor only: ``tools/make_release.py`` never copies them).

Randomised comparisons of every FCOS part with straightforward loop re-implementations
written from the definitions, and the detector's whole training loss against a loop over
images and levels. Same conventions as the public tests (parts, ``tests/checks.py``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fcos
from checks import check_close, check_equal
from fcos import (
    FCOS,
    DetectorBackboneWithFPN,
    fcos_apply_deltas_to_locations,
    fcos_box_and_centerness_losses,
    fcos_candidates_in_scale_range,
    fcos_candidates_inside_boxes,
    fcos_classification_loss,
    fcos_get_deltas_from_locations,
    fcos_level_candidates,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
    fcos_pick_smallest_box,
    get_fpn_location_coords,
    nms,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}


# Tiny tensors: one intra-op thread is faster and steadier (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def loop_locations(height: int, width: int) -> Dict[str, torch.Tensor]:
    """Cell (i, j) of stride s is at (s * (j + 0.5), s * (i + 0.5)), x varying fastest."""
    out = {}
    for name, s in STRIDES.items():
        rows, cols = math.ceil(height / s), math.ceil(width / s)
        out[name] = torch.tensor([[s * (j + 0.5), s * (i + 0.5)] for i in range(rows) for j in range(cols)])
    return out


def random_gt(batch: int, size: int, num_classes: int, max_boxes: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    gt = torch.full((batch, max_boxes, 5), -1.0)
    for b in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=gen))
        wh = 8 + torch.rand(n, 2, generator=gen) * (size / 1.5 - 8)
        xy = torch.rand(n, 2, generator=gen) * (size - wh)
        cls = torch.randint(0, num_classes, (n, 1), generator=gen).float()
        gt[b, :n] = torch.cat([xy, xy + wh, cls], dim=1)
    return gt


@pytest.mark.part("locations")
@pytest.mark.parametrize("size", [(64, 64), (100, 75), (33, 130)])
def test_locations_equal_a_loop(size):
    shapes = {name: (2, 4, math.ceil(size[0] / s), math.ceil(size[1] / s)) for name, s in STRIDES.items()}
    locations = get_fpn_location_coords(shapes, STRIDES)
    for name, expected in loop_locations(*size).items():
        check_close(f"{name} locations of a {size[0]}x{size[1]} image", locations[name], expected)


@pytest.mark.part("fpn")
def test_fpn_equals_the_definition_with_random_weights():
    """p5 = out5(lat5(c5)), p4 = out4(lat4(c4) + up(m5)), p3 = out3(lat3(c3) + up(m4))."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(6, backbone="mobilenet_v2", pretrained=False).eval()
    convs = [m for m in model.fpn_params.modules() if isinstance(m, nn.Conv2d)]
    lateral = {m.in_channels: m for m in convs if m.kernel_size == (1, 1)}
    feats = {"c3": torch.randn(1, 32, 10, 9), "c4": torch.randn(1, 96, 5, 5), "c5": torch.randn(1, 1280, 3, 3)}
    with torch.no_grad():
        p = model(feats)
        m5 = lateral[1280](feats["c5"])
        m4 = lateral[96](feats["c4"]) + F.interpolate(m5, size=(5, 5), mode="nearest")
        m3 = lateral[32](feats["c3"]) + F.interpolate(m4, size=(10, 9), mode="nearest")
        # Which output conv belongs to which level is not known by name: each p_i must
        # be one of the 3x3 convs applied to its merged map.
        for name, merged in (("p5", m5), ("p4", m4), ("p3", m3)):
            candidates = [conv(merged) for conv in convs if conv.kernel_size == (3, 3)]
            if not any(torch.allclose(p[name], c, atol=1e-5) for c in candidates):
                check_close(f"{name} (a 3x3 output conv on the merged map)", p[name], candidates[0], atol=1e-5)


def loop_inside(locations, gt, strides, radius):
    out = torch.zeros(gt.shape[0], locations.shape[0], gt.shape[1], dtype=torch.bool)
    for b in range(gt.shape[0]):
        for i, (x, y) in enumerate(locations.tolist()):
            for n, (x1, y1, x2, y2, c) in enumerate(gt[b].tolist()):
                ok = c >= 0 and x1 < x < x2 and y1 < y < y2
                if radius is not None:
                    r = radius * float(strides[i])
                    ok = ok and abs(x - (x1 + x2) / 2) < r and abs(y - (y1 + y2) / 2) < r
                out[b, i, n] = ok
    return out


@pytest.mark.part("fcos_match_inside")
@pytest.mark.parametrize("radius", [None, 1.0, 1.5])
def test_inside_boxes_equals_a_loop(radius):
    locations = torch.cat(list(loop_locations(96, 96).values()))
    strides = torch.cat([torch.full((len(v),), float(STRIDES[k])) for k, v in loop_locations(96, 96).items()])
    gt = random_gt(2, 96, num_classes=3, max_boxes=4, seed=int((radius or 0) * 10))
    check_equal(f"candidates inside boxes (radius {radius})",
                fcos_candidates_inside_boxes(locations, gt, strides, radius), loop_inside(locations, gt, strides, radius))


@pytest.mark.part("fcos_match_scale")
def test_scale_range_equals_a_loop():
    gen = torch.Generator().manual_seed(4)
    locations = torch.rand(60, 2, generator=gen) * 200
    gt = random_gt(2, 200, num_classes=3, max_boxes=5, seed=3)
    lower = torch.randint(0, 3, (60,), generator=gen).float() * 32
    upper = lower + 64
    upper[::7] = float("inf")
    expected = torch.zeros(2, 60, 5, dtype=torch.bool)
    for b in range(2):
        for i, (x, y) in enumerate(locations.tolist()):
            for n, (x1, y1, x2, y2, _) in enumerate(gt[b].tolist()):
                largest = max(x - x1, y - y1, x2 - x, y2 - y)
                expected[b, i, n] = float(lower[i]) < largest < float(upper[i])
    check_equal("scale-range mask", fcos_candidates_in_scale_range(locations, gt, lower, upper), expected)


@pytest.mark.part("fcos_match_smallest")
def test_pick_smallest_equals_a_loop():
    gen = torch.Generator().manual_seed(5)
    gt = random_gt(3, 100, num_classes=5, max_boxes=6, seed=5)
    gt[1, 2, :4] = gt[1, 1, :4]  # two boxes of equal area
    is_candidate = (torch.rand(3, 40, 6, generator=gen) < 0.4) & (gt[:, None, :, 4] >= 0)
    expected = torch.full((3, 40, 5), -1.0)
    for b in range(3):
        for i in range(40):
            best = None
            for n in range(6):
                if is_candidate[b, i, n]:
                    x1, y1, x2, y2 = gt[b, n, :4].tolist()
                    area = (x2 - x1) * (y2 - y1)
                    if best is None or area < best[0]:
                        best = (area, n)
            if best is not None:
                expected[b, i] = gt[b, best[1]]
    check_equal("smallest candidate box per location", fcos_pick_smallest_box(is_candidate, gt), expected)


@pytest.mark.part("fcos_deltas")
def test_deltas_random_round_trip_and_stride_tensor():
    gen = torch.Generator().manual_seed(6)
    locations = torch.rand(2, 30, 2, generator=gen) * 100
    sides = torch.rand(2, 30, 4, generator=gen) * 50 + 0.5
    boxes = torch.cat([locations - sides[..., :2], locations + sides[..., 2:], torch.ones(2, 30, 1)], dim=-1)
    boxes[0, ::5] = -1  # background rows
    strides = torch.tensor([8.0, 16.0, 32.0]).repeat(10)[:, None]
    deltas = fcos_get_deltas_from_locations(locations, boxes, strides)
    expected = torch.where(boxes[..., :1] == -1, torch.full_like(sides, -1.0), sides / strides)
    check_close("deltas of random boxes with per-location strides", deltas, expected, rtol=1e-5)
    decoded = fcos_apply_deltas_to_locations(sides / strides, locations, strides)
    check_close("boxes decoded from random deltas", decoded, boxes[..., :4].where(boxes[..., :1] != -1,
                torch.cat([locations - sides[..., :2], locations + sides[..., 2:]], dim=-1)), rtol=1e-5, atol=1e-4)


@pytest.mark.part("centerness")
def test_centerness_random_equals_the_formula():
    gen = torch.Generator().manual_seed(7)
    deltas = torch.rand(3, 50, 4, generator=gen, dtype=torch.float64) * 10 + 0.01
    deltas[1, ::4] = -1.0
    left, top, right, bottom = deltas.unbind(-1)
    expected = torch.sqrt(torch.minimum(left, right) / torch.maximum(left, right)
                          * torch.minimum(top, bottom) / torch.maximum(top, bottom))
    expected[1, ::4] = -1.0
    check_close("centerness of random deltas", fcos_make_centerness_targets(deltas), expected, rtol=1e-9)


@pytest.mark.part("nms")
def test_nms_ties_thresholds_and_empty_boxes():
    gen = torch.Generator().manual_seed(8)
    for trial in range(30):
        n = int(torch.randint(2, 300, (1,), generator=gen))
        # Boxes on an integer grid: many exact IoU values such as 1/3, 1/2, 1/7.
        xy = torch.randint(0, 20, (n, 2), generator=gen).float()
        wh = torch.randint(0, 8, (n, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + wh], dim=1)
        scores = torch.randint(0, 3, (n,), generator=gen).float()
        for threshold in (0.2, 1 / 3, 0.5):
            check_equal(f"kept indices on an integer grid (trial {trial}, threshold {threshold:.3f})",
                        nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("fcos_loss_cls")
def test_classification_loss_random():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 70, 6, generator=gen) * 2
    classes = torch.randint(-1, 6, (3, 70), generator=gen)
    targets = torch.zeros(3, 70, 6)
    for b in range(3):
        for i in range(70):
            if classes[b, i] >= 0:
                targets[b, i, classes[b, i]] = 1.0
    expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.3, gamma=1.5, reduction="sum")
    check_close("focal loss of random logits", fcos_classification_loss(logits, classes, 0.3, 1.5), expected, rtol=1e-5)


@pytest.mark.part("fcos_loss_box")
def test_box_losses_random():
    gen = torch.Generator().manual_seed(10)
    xy = torch.rand(40, 2, generator=gen) * 50
    pred = torch.cat([xy, xy + torch.rand(40, 2, generator=gen) * 30 + 1], dim=1)
    gt = torch.cat([xy + 3, xy + torch.rand(40, 2, generator=gen) * 30 + 5], dim=1)
    ctr_logits = torch.randn(40, generator=gen)
    ctr = torch.rand(40, generator=gen)
    loss_box, loss_ctr = fcos_box_and_centerness_losses(pred, gt, ctr_logits, ctr, centerness_weighted=True)
    giou = torchvision.ops.generalized_box_iou_loss(pred, gt)
    check_close("weighted GIoU loss of random boxes", loss_box, (giou * ctr / ctr.mean()).sum(), rtol=1e-5)
    check_close("centerness loss of random logits", loss_ctr,
                F.binary_cross_entropy_with_logits(ctr_logits, ctr, reduction="sum"), rtol=1e-5)


@pytest.mark.part("fcos_normalizer")
def test_normalizer_over_many_steps():
    gen = torch.Generator().manual_seed(11)
    model = FCOS(num_classes=2, fpn_channels=8, stem_channels=[8], pretrained=False).train()
    model.normalizer_momentum = 0.8
    ema = None
    for step in range(6):
        foreground = torch.rand(4, 30, generator=gen) < 0.1 * (step + 1)
        count = float(foreground.sum()) / 4
        ema = count if ema is None else 0.8 * ema + 0.2 * count
        normalizer = model.update_normalizer(foreground)
        check_close(f"EMA after step {step}", model._normalizer, torch.tensor(ema), rtol=1e-5)
        check_close(f"normaliser after step {step}", normalizer, torch.tensor(max(ema * 4, 1.0)), rtol=1e-5)


@pytest.mark.part("fcos_inference")
def test_level_candidates_equal_a_sort():
    gen = torch.Generator().manual_seed(12)
    cls_logits = torch.randn(2, 25, 4, generator=gen)
    ctr_logits = torch.randn(2, 25, 1, generator=gen)
    scores, location_idx, labels = fcos_level_candidates(cls_logits, ctr_logits, topk=17)
    for b in range(2):
        pairs = sorted(
            ((math.sqrt(torch.sigmoid(cls_logits[b, i, c]) * torch.sigmoid(ctr_logits[b, i, 0])), i, c)
             for i in range(25) for c in range(4)),
            key=lambda item: -item[0],
        )[:17]
        check_close(f"image {b} top-17 scores", scores[b], [p[0] for p in pairs], rtol=1e-5)
        check_equal(f"image {b} top-17 locations", location_idx[b], [p[1] for p in pairs])
        check_equal(f"image {b} top-17 classes", labels[b], [p[2] for p in pairs])


def loop_losses(model: FCOS, locations, cls_logits, box_deltas, ctr_logits, gt, normalizer_before: Optional[float]):
    """FCOS losses with a loop over images and levels and torchvision's loss ops."""
    num_images = gt.shape[0]
    loss_cls = loss_box = loss_ctr = 0.0
    num_fg = 0
    giou_losses, centernesses = [], []
    for b in range(num_images):
        matched = fcos_match_locations_to_gt(locations, STRIDES, gt[b], model.center_sampling_radius)
        for name, locs in locations.items():
            m, s = matched[name], STRIDES[name]
            fg = m[:, 4] >= 0
            num_fg += int(fg.sum())
            target = torch.zeros_like(cls_logits[name][b])
            target[fg, m[fg, 4].long()] = 1.0
            loss_cls = loss_cls + torchvision.ops.sigmoid_focal_loss(cls_logits[name][b], target, reduction="sum")
            x, y = locs[fg, 0], locs[fg, 1]
            ltrb = torch.stack([x - m[fg, 0], y - m[fg, 1], m[fg, 2] - x, m[fg, 3] - y], dim=1)
            pred = box_deltas[name][b][fg]
            if model.box_loss == "giou":
                d = pred.clamp(min=0) * s
                pred_boxes = torch.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], dim=1)
                giou_losses.append(torchvision.ops.generalized_box_iou_loss(pred_boxes, m[fg, :4]))
            else:
                loss_box = loss_box + 0.25 * (pred - ltrb / s).abs().sum()
            l, t, r, bb = ltrb.unbind(1)
            centerness = torch.sqrt(torch.minimum(l, r) / torch.maximum(l, r) * torch.minimum(t, bb) / torch.maximum(t, bb))
            centernesses.append(centerness)
            loss_ctr = loss_ctr + F.binary_cross_entropy_with_logits(ctr_logits[name][b][fg, 0], centerness, reduction="sum")
            # Reported above its floor, the entropy of the soft targets.
            entropy = -(centerness * centerness.log() + (1 - centerness) * (1 - centerness).log())
            loss_ctr = loss_ctr - torch.nan_to_num(entropy, nan=0.0).sum()
    if model.box_loss == "giou":
        giou, centerness = torch.cat(giou_losses), torch.cat(centernesses)
        weights = centerness / centerness.mean() if model.centerness_weighted_box_loss else 1.0
        loss_box = (weights * giou).sum()
    per_image = num_fg / num_images
    ema = per_image if normalizer_before is None else 0.9 * normalizer_before + 0.1 * per_image
    normalizer = max(ema * num_images, 1.0)
    return {"loss_cls": loss_cls / normalizer, "loss_box": loss_box / normalizer, "loss_ctr": loss_ctr / normalizer}


@pytest.mark.part("provided")
@pytest.mark.parametrize("box_loss,radius,weighted", [("giou", 1.5, True), ("giou", 1.5, False), ("l1", None, True)])
def test_detector_losses_equal_a_loop(box_loss, radius, weighted):
    torch.manual_seed(0)
    model = FCOS(num_classes=4, fpn_channels=16, stem_channels=[16], pretrained=False, box_loss=box_loss,
                 center_sampling_radius=radius, centerness_weighted_box_loss=weighted).train()
    images = torch.randn(3, 3, 128, 96)
    gt = random_gt(3, 96, num_classes=4, max_boxes=4, seed=2)
    locations, cls_logits, box_deltas, ctr_logits = model._run_network(images)
    for step, before in enumerate((None, "ema")):
        start = None if before is None else float(model._normalizer)
        losses = model.compute_losses(locations, cls_logits, box_deltas, ctr_logits, gt)
        expected = loop_losses(model, locations, cls_logits, box_deltas, ctr_logits, gt, start)
        for key in expected:
            check_close(f"{key} of the detector (step {step})", losses[key], expected[key], rtol=1e-4, atol=1e-7)

"""Hidden tests of two_stage_detector.py (instructor only: ``tools/make_release.py`` never
copies them).

Randomised comparisons of every two-stage part with straightforward loop
re-implementations written from the definitions, one part per test. Same conventions as
the public tests (parts, ``tests/checks.py``, student functions called through the module).
"""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import two_stage_detector as tsd
from checks import check_close, check_dtype, check_equal, check_shape
from two_stage_detector import RPN, FasterRCNN


# Tiny tensors: one intra-op thread is faster and steadier (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


class _Backbone(nn.Module):
    """Never run: only ``out_channels`` and ``fpn_strides`` are read by the constructors."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.fpn_strides = {"p3": 8, "p4": 16, "p5": 32}


def _model(num_classes: int = 3, channels: int = 4, **kwargs) -> FasterRCNN:
    return FasterRCNN(_Backbone(channels), RPN(channels, [channels], batch_size_per_image=8), [channels],
                      num_classes, **kwargs)


def _random_boxes(gen, n: int, size: float = 80.0, dtype=torch.float64) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * size / 2 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def _loop_box_iou(a: List[float], b: List[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------- rpn_head


@pytest.mark.part("rpn_head")
def test_hidden_rpn_head_equals_a_loop_over_locations_and_anchors():
    torch.manual_seed(3)
    head = tsd.RPNPredictionNetwork(in_channels=5, stem_channels=[6, 4], num_anchors=3).double()
    for m in head.modules():  # non-trivial biases, so that every term shows
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.bias, std=0.5)
            nn.init.normal_(m.weight, std=0.3)
    feats = {"p3": torch.randn(2, 5, 3, 4, dtype=torch.float64), "p4": torch.randn(2, 5, 2, 1, dtype=torch.float64)}
    obj, box = head(feats)
    convs = [m for m in head.stem_rpn if isinstance(m, nn.Conv2d)]
    for level, x in feats.items():
        for conv in convs:  # 3x3 conv, padding 1, ReLU
            x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
        raw_obj = F.conv2d(x, head.pred_obj.weight, head.pred_obj.bias)  # (B, A, H, W)
        raw_box = F.conv2d(x, head.pred_box.weight, head.pred_box.bias)  # (B, 4A, H, W)
        batch, _, height, width = raw_obj.shape
        expected_obj = torch.zeros(batch, height * width * 3, dtype=torch.float64)
        expected_box = torch.zeros(batch, height * width * 3, 4, dtype=torch.float64)
        for b in range(batch):
            for y in range(height):
                for xx in range(width):
                    for a in range(3):
                        expected_obj[b, (y * width + xx) * 3 + a] = raw_obj[b, a, y, xx]
                        expected_box[b, (y * width + xx) * 3 + a] = raw_box[b, 4 * a: 4 * a + 4, y, xx]
        check_close(f"objectness of {level}", obj[level], expected_obj, rtol=1e-9, atol=1e-9)
        check_close(f"box deltas of {level}", box[level], expected_box, rtol=1e-9, atol=1e-9)


@pytest.mark.part("rpn_head")
def test_hidden_rpn_head_single_int_stem_and_init_statistics():
    torch.manual_seed(0)
    head = tsd.RPNPredictionNetwork(in_channels=64, stem_channels=96, num_anchors=5)
    convs = [m for m in head.stem_rpn if isinstance(m, nn.Conv2d)]
    check_equal("number of stem convs for stem_channels=96", torch.tensor(len(convs)), 1)
    check_shape("pred_obj weight", head.pred_obj.weight, (5, 96, 1, 1))
    check_shape("pred_box weight", head.pred_box.weight, (20, 96, 1, 1))
    check_close("std of the pred_box weights (N(0, 0.01))", head.pred_box.weight.std(), 0.01, rtol=0.1)
    fan_out, fan_in = 96 * 9, 64 * 9
    std = convs[0].weight.std().item()
    ok = any(abs(std - math.sqrt(2 / f)) < 0.1 * math.sqrt(2 / f) for f in (fan_out, fan_in))
    if not ok:
        raise AssertionError(f"std of the stem conv weights: expected He init sqrt(2 / {fan_out}) = "
                             f"{math.sqrt(2 / fan_out):.4f}, computed {std:.4f}")


# ---------------------------------------------------------------------------- anchors


@pytest.mark.part("anchors")
def test_hidden_anchors_equal_a_loop():
    gen = torch.Generator().manual_seed(1)
    strides = {"p3": 8, "p4": 16, "p5": 32}
    locations = {name: torch.rand(n, 2, generator=gen, dtype=torch.float64) * 200
                 for name, n in (("p3", 7), ("p4", 4), ("p5", 2))}
    ratios = [0.3, 1.0, 1.7, 3.0]
    anchors = tsd.generate_fpn_anchors(locations, strides, stride_scale=2.5, aspect_ratios=ratios)
    for name, locs in locations.items():
        expected = []
        side = strides[name] * 2.5
        for cx, cy in locs.tolist():
            for r in ratios:
                w = math.sqrt(side * side / r)
                h = r * w
                expected.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        check_close(f"anchors of {name}", anchors[name], torch.tensor(expected, dtype=torch.float64),
                    rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- iou


@pytest.mark.part("iou")
def test_hidden_iou_equals_a_loop_with_degenerate_boxes():
    gen = torch.Generator().manual_seed(2)
    boxes1 = _random_boxes(gen, 30)
    boxes2 = torch.cat([_random_boxes(gen, 20), boxes1[:5], torch.tensor([[10.0, 10.0, 10.0, 30.0],
                                                                         [5.0, 5.0, 5.0, 5.0]],
                                                                        dtype=torch.float64)])
    boxes1[-1] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    result = tsd.iou(boxes1, boxes2)
    expected = torch.tensor([[_loop_box_iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()],
                            dtype=torch.float64)
    check_close("IoU of random and degenerate boxes", result, expected, rtol=1e-9, atol=1e-12)
    result32 = tsd.iou(boxes1.float(), boxes2.float())
    check_dtype("IoU of float32 boxes", result32, torch.float32)
    check_close("IoU of float32 boxes", result32, expected.float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- rcnn_match


def _quantised_ious(gen, batch: int, anchors: int, boxes: int, padding_per_image: List[int]) -> torch.Tensor:
    ious = torch.randint(0, 9, (batch, anchors, boxes), generator=gen).double() / 8  # ties and exact hits
    for b, pad in enumerate(padding_per_image):
        if pad:
            ious[b, :, boxes - pad:] = -1.0
    return ious


@pytest.mark.part("rcnn_match")
def test_hidden_match_by_threshold_equals_a_loop():
    gen = torch.Generator().manual_seed(4)
    ious = _quantised_ious(gen, 3, 40, 5, [0, 2, 5])
    for low, high in [(0.25, 0.75), (0.5, 0.5), (0.375, 0.625)]:
        matched_idx, state = tsd.rcnn_match_by_threshold(ious, (low, high))
        expected_idx = torch.zeros(3, 40, dtype=torch.int64)
        expected_state = torch.zeros(3, 40, dtype=torch.int64)
        for b in range(3):
            for a in range(40):
                row = ious[b, a].tolist()
                best = max(row)
                expected_idx[b, a] = row.index(best)
                expected_state[b, a] = 1 if best >= high else (0 if best < low else -1)
        check_equal(f"state, thresholds ({low}, {high})", state, expected_state)
        check_equal(f"matched_idx, thresholds ({low}, {high})", matched_idx, expected_idx)


# ---------------------------------------------------------------------------- rcnn_low_quality


@pytest.mark.part("rcnn_low_quality")
def test_hidden_low_quality_matches_equal_a_loop():
    gen = torch.Generator().manual_seed(5)
    ious = _quantised_ious(gen, 3, 12, 6, [1, 3, 6]) * 0.5  # sparse high values: more low-quality cases
    ious[0, :, 0] = 0.0  # a GT box that overlaps nothing
    promoted, best_gt_idx = tsd.rcnn_low_quality_matches(ious)
    for b in range(3):
        columns = ious[b].T.tolist()  # per GT box: IoU with every anchor
        best_per_gt = [max(col) for col in columns]
        for a in range(12):
            marked = [n for n in range(6) if best_per_gt[n] > 0 and columns[n][a] == best_per_gt[n]]
            check_equal(f"promoted[{b}, {a}]", promoted[b, a], bool(marked))
            if marked:
                best = max(columns[n][a] for n in marked)
                expected = next(n for n in marked if columns[n][a] == best)
                check_equal(f"best_gt_idx[{b}, {a}] (of the GT boxes it is best for, the one it overlaps most)",
                            best_gt_idx[b, a], expected)


# ---------------------------------------------------------------------------- rcnn_deltas


@pytest.mark.part("rcnn_deltas")
def test_hidden_deltas_equal_the_formula_both_ways():
    gen = torch.Generator().manual_seed(6)
    anchors, boxes = _random_boxes(gen, 25), _random_boxes(gen, 25)
    gt = torch.cat([boxes, torch.randint(0, 5, (25, 1), generator=gen).double()], dim=1)
    gt[3], gt[7] = -1.0, -1e8
    weights = (7.0, 3.0, 2.0, 4.0)
    deltas = tsd.rcnn_get_deltas_from_anchors(anchors, gt, weights)
    expected = []
    for (ax1, ay1, ax2, ay2), (gx1, gy1, gx2, gy2, _c) in zip(anchors.tolist(), gt.tolist()):
        if _c in (-1.0, -1e8) and gx1 == _c:
            expected.append([-1e8] * 4)
            continue
        aw, ah, gw, gh = ax2 - ax1, ay2 - ay1, gx2 - gx1, gy2 - gy1
        expected.append([7 * ((gx1 + gw / 2) - (ax1 + aw / 2)) / aw, 3 * ((gy1 + gh / 2) - (ay1 + ah / 2)) / ah,
                         2 * math.log(gw / aw), 4 * math.log(gh / ah)])
    check_close("weighted deltas of random boxes", deltas, torch.tensor(expected, dtype=torch.float64),
                rtol=1e-9, atol=1e-9)
    # Decoding random deltas (some beyond the clamp) with the formula.
    pred = torch.randn(25, 4, generator=gen, dtype=torch.float64) * 3
    pred[0, 2], pred[1, 3] = 30.0, 25.0  # / 2 = 15, / 4 = 6.25: both above log(1000/16) = 4.135
    decoded = tsd.rcnn_apply_deltas_to_anchors(pred, anchors, weights)
    clamp = math.log(1000.0 / 16)
    expected = []
    for (ax1, ay1, ax2, ay2), (dx, dy, dw, dh) in zip(anchors.tolist(), pred.tolist()):
        aw, ah = ax2 - ax1, ay2 - ay1
        cx, cy = ax1 + aw / 2 + dx / 7 * aw, ay1 + ah / 2 + dy / 3 * ah
        w, h = aw * math.exp(min(dw / 2, clamp)), ah * math.exp(min(dh / 4, clamp))
        expected.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    check_close("boxes decoded from random weighted deltas", decoded, torch.tensor(expected, dtype=torch.float64),
                rtol=1e-9, atol=1e-7)


# ---------------------------------------------------------------------------- rpn_loss


@pytest.mark.part("rpn_loss")
def test_hidden_rpn_losses_equal_a_loop():
    gen = torch.Generator().manual_seed(7)
    batch, anchors, per_image = 3, 40, 12
    logits = torch.randn(batch, anchors, generator=gen, dtype=torch.float64) * 3
    deltas = torch.randn(batch, anchors, 4, generator=gen, dtype=torch.float64)
    order = torch.randperm(batch * anchors, generator=gen)
    fg_idx, bg_idx = order[:7].sort().values, order[7:30].sort().values
    fg_gt = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    loss_obj, loss_box = tsd.rpn_losses(logits, deltas, fg_idx, bg_idx, fg_gt, per_image)
    flat_logits, flat_deltas = logits.reshape(-1).tolist(), deltas.reshape(-1, 4).tolist()
    expected_obj = sum(math.log1p(math.exp(-flat_logits[i])) for i in fg_idx.tolist())
    expected_obj += sum(math.log1p(math.exp(flat_logits[i])) for i in bg_idx.tolist())
    expected_box = sum(abs(p - t) for i, row in zip(fg_idx.tolist(), fg_gt.tolist())
                       for p, t in zip(flat_deltas[i], row))
    check_close("RPN objectness loss of random samples", loss_obj, expected_obj / (per_image * batch), rtol=1e-9)
    check_close("RPN box loss of random samples", loss_box, expected_box / (per_image * batch), rtol=1e-9)


# ---------------------------------------------------------------------------- rpn_proposals


@pytest.mark.part("rpn_proposals")
def test_hidden_select_top_anchors_equals_sorting():
    gen = torch.Generator().manual_seed(8)
    batch, num_anchors, k = 4, 30, 9
    logits = torch.stack([torch.randperm(num_anchors, generator=gen) for _ in range(batch)]).double() / 7 - 2
    deltas = torch.randn(batch, num_anchors, 4, generator=gen, dtype=torch.float64)
    anchors = _random_boxes(gen, num_anchors)
    scores, top_deltas, top_anchors = tsd.rpn_select_top_anchors(logits, deltas, anchors, k)
    for b in range(batch):
        ranked = sorted(range(num_anchors), key=lambda a: -logits[b, a].item())[:k]
        check_close(f"scores of image {b}", scores[b], logits[b, ranked])
        check_close(f"deltas of image {b}", top_deltas[b], deltas[b, ranked])
        check_close(f"anchors of image {b}", top_anchors[b], anchors[ranked])


# ---------------------------------------------------------------------------- roi_head


@pytest.mark.part("roi_head")
def test_hidden_roi_head_equals_manual_layers():
    torch.manual_seed(9)
    model = FasterRCNN(_Backbone(6), RPN(6, [6], batch_size_per_image=8), [5, 7, 3], 4, batch_size_per_image=8,
                       roi_size=(3, 6)).double()
    convs = [m for m in model.roi_stem if isinstance(m, nn.Conv2d)]
    check_equal("number of convs in the RoI stem for stem_channels [5, 7, 3]", torch.tensor(len(convs)), 3)
    x = torch.randn(4, 6, 3, 6, dtype=torch.float64)
    flat = model.roi_stem(x)
    manual = x
    for conv in convs:
        manual = F.relu(F.conv2d(manual, conv.weight, conv.bias, padding=1))
    manual = manual.flatten(1)
    check_close("roi_stem output (3x3 conv + ReLU per entry, then flatten)", flat, manual, rtol=1e-9, atol=1e-9)
    check_shape("cls_pred output (num_classes + 1 = 5 logits)", model.cls_pred(flat), (4, 5))
    check_shape("box_pred output (4 deltas x 4 classes)", model.box_pred(flat), (4, 16))
    head_params = sum(p.numel() for name, p in model.named_parameters()
                      if name.split(".")[0] in ("roi_stem", "cls_pred", "box_pred"))
    expected = (6 * 5 * 9 + 5) + (5 * 7 * 9 + 7) + (7 * 3 * 9 + 3) + (54 * 5 + 5) + (54 * 16 + 16)
    check_equal("number of parameters of the RoI head", torch.tensor(head_params), expected)


# ---------------------------------------------------------------------------- roi_sampling


@pytest.mark.part("roi_sampling")
def test_hidden_sample_rois_everything_sampled_equals_a_loop():
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = _model(batch_size_per_image=200, fg_fraction=1.0, roi_iou_threshold=0.6)
    gt = torch.full((3, 4, 5), -1.0, dtype=torch.float64)
    for b, n in enumerate([4, 1, 3]):
        gt[b, :n, :4] = _random_boxes(gen, n, size=40)
        gt[b, :n, 4] = torch.randint(0, 3, (n,), generator=gen).double()
    proposals = []
    for b, n in enumerate([9, 0, 5]):
        # Jittered GT boxes (many foreground) and random boxes.
        near = gt[b, torch.randint(0, 1, (n,), generator=gen), :4] + torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3
        proposals.append(torch.where(torch.rand(n, 1, generator=gen) < 0.5, near, _random_boxes(gen, n, size=40)).float())
    rois, batch_idx, targets = model.sample_rois(proposals, gt)
    num_candidates = max(len(p) for p in proposals) + gt.shape[1]
    fg, bg = [], []  # (flat index, roi, image, target)
    for b in range(3):
        real_gt = [row for row in gt[b].tolist() if row[4] != -1]
        cands = [(j, box) for j, box in enumerate(proposals[b].double().tolist())]
        cands += [(max(len(p) for p in proposals) + j, row[:4]) for j, row in enumerate(real_gt)]
        for j, box in cands:
            overlaps = [_loop_box_iou(box, row[:4]) for row in real_gt]
            best = max(overlaps) if overlaps else 0.0
            entry = (b * num_candidates + j, box, b)
            if best >= 0.6:
                fg.append(entry + (real_gt[overlaps.index(best)],))
            else:
                bg.append(entry + ([-1.0] * 5,))
    expected = sorted(fg) + sorted(bg)
    check_shape("sampled RoIs (every candidate that is not padding)", rois, (len(expected), 4))
    check_close("sampled RoIs", rois, torch.tensor([e[1] for e in expected], dtype=torch.float64), rtol=1e-6, atol=1e-5)
    check_equal("image index of the sampled RoIs", batch_idx, torch.tensor([e[2] for e in expected]))
    check_close("GT rows of the sampled RoIs", targets, torch.tensor([e[3] for e in expected], dtype=torch.float64))


# ---------------------------------------------------------------------------- roi_losses


@pytest.mark.part("roi_losses")
def test_hidden_roi_losses_equal_a_loop():
    gen = torch.Generator().manual_seed(11)
    rois, classes = 17, 5
    logits = torch.randn(rois, classes + 1, generator=gen, dtype=torch.float64) * 2
    deltas = torch.randn(rois, classes, 4, generator=gen, dtype=torch.float64)
    gt_classes = torch.randint(-1, classes, (rois,), generator=gen)
    gt_deltas = torch.randn(rois, 4, generator=gen, dtype=torch.float64)
    gt_deltas[gt_classes < 0] = -1e8
    loss_cls, loss_box = tsd.roi_losses(logits, deltas, gt_classes, gt_deltas)
    expected_cls, expected_box = 0.0, 0.0
    for r in range(rois):
        row = logits[r].tolist()
        log_sum = math.log(sum(math.exp(v) for v in row))
        c = int(gt_classes[r])
        expected_cls += log_sum - row[c + 1]
        if c >= 0:
            expected_box += sum(abs(p - t) for p, t in zip(deltas[r, c].tolist(), gt_deltas[r].tolist()))
    check_close("RoI classification loss of random RoIs", loss_cls, expected_cls / rois, rtol=1e-9)
    check_close("RoI box loss of random RoIs", loss_box, expected_box / rois, rtol=1e-9)


# ---------------------------------------------------------------------------- faster_rcnn_inference


@pytest.mark.part("faster_rcnn_inference")
def test_hidden_roi_candidates_equal_a_loop():
    gen = torch.Generator().manual_seed(12)
    num_classes, num_rois, image_size = 4, 7, (50, 70)
    model = _model(num_classes=num_classes, batch_size_per_image=8, box_reg_weights=(8.0, 6.0, 4.0, 3.0))
    rois = _random_boxes(gen, num_rois, size=60)
    logits = torch.randn(num_rois, num_classes + 1, generator=gen, dtype=torch.float64) * 2
    deltas = torch.randn(num_rois, num_classes, 4, generator=gen, dtype=torch.float64) * 4
    boxes, scores, labels, keep = model.roi_candidates(rois, logits, deltas, image_size, 0.15)
    height, width = image_size
    exp_boxes, exp_scores, exp_labels, exp_keep = [], [], [], []
    clamp = math.log(1000.0 / 16)
    for r in range(num_rois):
        exps = [math.exp(v) for v in logits[r].tolist()]
        x1, y1, x2, y2 = rois[r].tolist()
        aw, ah = x2 - x1, y2 - y1
        for c in range(num_classes):
            dx, dy, dw, dh = deltas[r, c].tolist()
            cx, cy = x1 + aw / 2 + dx / 8 * aw, y1 + ah / 2 + dy / 6 * ah
            w, h = aw * math.exp(min(dw / 4, clamp)), ah * math.exp(min(dh / 3, clamp))
            box = [min(max(cx - w / 2, 0), width), min(max(cy - h / 2, 0), height),
                   min(max(cx + w / 2, 0), width), min(max(cy + h / 2, 0), height)]
            score = exps[c + 1] / sum(exps)
            exp_boxes.append(box)
            exp_scores.append(score)
            exp_labels.append(c)
            exp_keep.append(score > 0.15 and box[2] > box[0] and box[3] > box[1])
    check_close("candidate scores", scores, torch.tensor(exp_scores, dtype=torch.float64), rtol=1e-9)
    check_close("candidate boxes", boxes, torch.tensor(exp_boxes, dtype=torch.float64), rtol=1e-9, atol=1e-7)
    check_equal("candidate labels", labels, torch.tensor(exp_labels))
    check_equal("keep", keep, torch.tensor(exp_keep))

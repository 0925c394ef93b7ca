"""Tests of a5/evaluation.py: VOC mAP (devkit rules), the pycocotools cross-check,
`evaluate_detector`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import a5_helper as h
from helpers import ColorOracle, N_VAL, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_voc_map_perfect_and_empty():
    gts = {"a": [("car", [0, 0, 9, 9], False), ("dog", [20, 20, 40, 50], False)], "b": [("car", [5, 5, 30, 30], False)],
           "c": []}
    dets = [("a", "car", 0.9, [0, 0, 9, 9]), ("a", "dog", 0.8, [20, 20, 40, 50]), ("b", "car", 0.7, [5, 5, 30, 30])]
    res = h.compute_voc_map(gts, dets, ["car", "dog", "cat"])
    assert res["mAP"] == pytest.approx(1.0) and res["per_class"]["car"] == pytest.approx(1.0)
    assert math.isnan(res["per_class"]["cat"])  # no ground truth: excluded from the mean
    assert set(res) == {"mAP", "per_class"}
    none = h.compute_voc_map(gts, [], ["car", "dog", "cat"])
    assert none["mAP"] == 0.0 and none["per_class"]["car"] == 0.0


def test_voc_map_duplicate_is_false_positive():
    gts = {"a": [("car", [0, 0, 9, 9], False)], "b": [("car", [0, 0, 9, 9], False)]}
    dets = [("a", "car", 0.9, [0, 0, 9, 9]), ("a", "car", 0.8, [0, 0, 9, 9]), ("b", "car", 0.7, [0, 0, 9, 9])]
    # recall 0.5, 0.5, 1; precision 1, 0.5, 2/3
    assert h.compute_voc_map(gts, dets, ["car"])["mAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert h.compute_voc_map(gts, dets, ["car"], use_07_metric=True)["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_map_difficult_is_ignored():
    gts = {"a": [("car", [0, 0, 9, 9], False)], "b": [("car", [0, 0, 9, 9], True)]}
    dets = [("b", "car", 0.95, [0, 0, 9, 9]), ("a", "car", 0.9, [0, 0, 9, 9])]
    assert h.compute_voc_map(gts, dets, ["car"])["mAP"] == pytest.approx(1.0)  # not penalised
    assert h.compute_voc_map(gts, dets[1:], ["car"])["mAP"] == pytest.approx(1.0)  # not counted
    # a class whose only objects are difficult has no AP
    assert math.isnan(h.compute_voc_map({"b": gts["b"]}, [], ["car"])["per_class"]["car"])


def test_voc_map_11_point_vs_all_point_and_threshold():
    gts = {k: [("dog", [0, 0, 9, 9], False)] for k in "abc"}
    dets = [("a", "dog", 0.9, [0, 0, 9, 9]), ("a", "dog", 0.8, [50, 50, 60, 60]),
            ("b", "dog", 0.7, [0, 0, 9, 9]), ("b", "dog", 0.6, [50, 50, 60, 60])]
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2
    res = h.compute_voc_map(gts, dets, ["dog"], return_curves=True)
    assert res["mAP"] == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    assert res["curves"]["dog"]["recall"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert h.compute_voc_map(gts, dets, ["dog"], use_07_metric=True)["mAP"] == pytest.approx((4 + 3 * 2 / 3) / 11)
    # +1 pixel areas: [0,0,9,4] covers exactly half of [0,0,9,9] -> IoU 0.5, not > 0.5
    assert h.compute_voc_map({"a": gts["a"]}, [("a", "dog", 1.0, [0, 0, 9, 4])], ["dog"])["mAP"] == 0.0
    assert h.compute_voc_map({"a": gts["a"]}, [("a", "dog", 1.0, [0, 0, 9, 5])], ["dog"])["mAP"] == 1.0
    assert h.compute_voc_map({"a": gts["a"]}, [("a", "dog", 1.0, [0, 0, 9, 5])], ["dog"], iou_threshold=0.7)["mAP"] == 0.0


def _random_case(rng: np.random.RandomState, n_images=25, classes=("car", "dog", "cat")):
    """Objects in separate quadrants of 400x400 images (each detection overlaps at most one
    object, so the VOC and COCO matching rules agree), jittered detections, duplicates
    and false positives."""
    gts, dets = {}, []
    for i in range(n_images):
        image_id = f"im{i}"
        objs = []
        for q in range(4):
            if rng.rand() < 0.3:
                continue
            ox, oy = (q % 2) * 200, (q // 2) * 200
            x1, y1 = ox + rng.uniform(20, 60), oy + rng.uniform(20, 60)
            box = [x1, y1, x1 + rng.uniform(40, 110), y1 + rng.uniform(40, 110)]
            cls = classes[rng.randint(len(classes))]
            objs.append((cls, box, False))
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # detections of it, some duplicates
                jitter = rng.normal(0, 12, 4)
                dets.append((image_id, cls if rng.rand() < 0.85 else classes[rng.randint(len(classes))],
                             float(rng.rand()), [b + j for b, j in zip(box, jitter)]))
        for _ in range(rng.randint(0, 3)):  # false positives away from objects' quadrants
            q = rng.randint(4)
            ox, oy = (q % 2) * 200, (q // 2) * 200
            x1, y1 = ox + rng.uniform(150, 160), oy + rng.uniform(150, 160)
            dets.append((image_id, classes[rng.randint(len(classes))], float(rng.rand()), [x1, y1, x1 + 30, y1 + 30]))
        gts[image_id] = objs
    return gts, dets


def test_voc_map_agrees_with_pycocotools_on_random_cases():
    rng = np.random.RandomState(0)
    classes = ["car", "dog", "cat"]
    for _ in range(6):
        gts, dets = _random_case(rng)
        ours = h.compute_voc_map(gts, dets, classes)["mAP"]
        coco = h.compute_coco_map(gts, dets, classes)
        # only the interpolation differs: exact area vs COCO's 101 recall points
        assert abs(ours - coco["AP50"]) < 0.01, (ours, coco)
        assert coco["mAP"] <= coco["AP50"] + 1e-9
    perfect = {"a": [("car", [0, 0, 50, 50], False)]}
    assert h.compute_coco_map(perfect, [("a", "car", 0.9, [0, 0, 50, 50])], classes)["mAP"] == pytest.approx(1.0)
    assert h.compute_coco_map(perfect, [], classes)["AP50"] == 0.0


def test_evaluate_detector_oracle_counts_every_image(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    res = h.evaluate_detector(ColorOracle(), ds, batch_size=3, progress=False, return_curves=True)
    assert res["num_images"] == N_VAL  # also the empty image and images without detections
    present = {c for i in range(len(ds)) for c, _, d in ds.get_annotation(i) if not d}
    assert res["mAP"] > 0.99 and all(res["per_class"][c] > 0.99 for c in present)
    assert res["coco_AP50"] > 0.99 and 0.3 < res["coco_mAP"] <= 1.0
    assert set(res["curves"]) == set(h.VOC_CLASSES)
    # A detector that finds only cars: other classes get AP 0 (their objects still count).
    only_car = h.evaluate_detector(ColorOracle(["car"]), ds, batch_size=4, progress=False)
    assert only_car["num_images"] == N_VAL
    assert only_car["per_class"]["car"] > 0.99 and all(only_car["per_class"][c] == 0.0 for c in present - {"car"})
    # The evaluation uses the whole image even when given an augmenting dataset / a Subset.
    aug = Subset(h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64, augment=True), [0, 1])
    assert h.evaluate_detector(ColorOracle(), aug, coco=False, progress=False)["mAP"] > 0.99


class _LeftHalfOracle(ColorOracle):
    """ColorOracle blind to the right half of every image: test-time flip lets it see the
    objects there in the mirror image."""

    def predict(self, images, score_thresh=0.3, nms_thresh=0.5):
        results = super().predict(images, score_thresh, nms_thresh)
        half = images.shape[-1] / 2
        return [{k: v[r["boxes"][:, 2] <= half] for k, v in r.items()} for r in results]


def test_evaluate_detector_with_test_time_flip(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    plain = h.evaluate_detector(ColorOracle(), ds, batch_size=3, progress=False, coco=False)
    flipped = h.evaluate_detector(ColorOracle(), ds, batch_size=3, progress=False, coco=False, test_flip=True)
    # A mirror-symmetric detector: the mirrored boxes land on the same objects and merge.
    assert flipped["mAP"] > 0.99 and flipped["num_detections"] == plain["num_detections"]
    half_blind = h.evaluate_detector(_LeftHalfOracle(), ds, batch_size=3, progress=False, coco=False)
    half_flipped = h.evaluate_detector(_LeftHalfOracle(), ds, batch_size=3, progress=False, coco=False,
                                       test_flip=True)
    assert half_flipped["mAP"] > half_blind["mAP"] and half_flipped["num_detections"] > half_blind["num_detections"]


def test_test_time_flip_needs_a_batched_predict(tiny_voc):
    class CourseInterfaceOnly(torch.nn.Module):
        def forward(self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None):
            raise AssertionError("not called")

    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    with pytest.raises(TypeError, match="test_flip needs .*CourseInterfaceOnly"):
        h.collect_predictions(CourseInterfaceOnly(), ds, progress=False, test_flip=True)

"""The course's API, exactly: ``compat/`` serves the EECS 498/598 A4 module names.

These tests drive our code the way the A4 notebooks do, through the names of the
course's modules (``common``, ``one_stage_detector``, ``two_stage_detector``,
``a4_helper``, ``eecs598``), with tiny random models on small images:

* every public A4 name is importable, with a call-compatible signature: the course's
  parameters in the course's order, any extra parameter optional (``COURSE_API``,
  written down from the course's files);
* the hello functions, the backbone's ``forward(images=...)``, FCOS with an injected
  backbone class that has the course's constructor, ``FCOS.inference`` and
  ``FasterRCNN.inference`` called with the course's arguments, and
  ``inference_with_detector`` over lists and generators of batches.

``two_stage_detector`` is our own module: the course's module has the same name, so
``compat/`` has no copy of it.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

pytestmark = pytest.mark.part("provided")

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPAT_DIR = REPO_ROOT / "compat"
COURSE_MODULES = ("common", "one_stage_detector", "a4_helper", "eecs598", "eecs598.grad", "eecs598.utils")

# The course's public API (WI2022 / FA2022 A4 with the FA2022 errata), parameter names
# in order, ``self`` left out. "Class.method" entries are methods; a class entry is
# its constructor.
COURSE_API: Dict[str, Dict[str, List[str]]] = {
    "common": {
        "hello_common": [],
        "DetectorBackboneWithFPN": ["out_channels"],
        "DetectorBackboneWithFPN.forward": ["images"],
        "get_fpn_location_coords": ["shape_per_fpn_level", "strides_per_fpn_level", "dtype", "device"],
        "nms": ["boxes", "scores", "iou_threshold"],
        "class_spec_nms": ["boxes", "scores", "class_ids", "iou_threshold"],
    },
    "one_stage_detector": {
        "hello_one_stage_detector": [],
        "FCOSPredictionNetwork": ["num_classes", "in_channels", "stem_channels"],
        "FCOSPredictionNetwork.forward": ["feats_per_fpn_level"],
        "fcos_match_locations_to_gt": ["locations_per_fpn_level", "strides_per_fpn_level", "gt_boxes"],
        "fcos_get_deltas_from_locations": ["locations", "gt_boxes", "stride"],
        "fcos_apply_deltas_to_locations": ["deltas", "locations", "stride"],
        "fcos_make_centerness_targets": ["deltas"],
        "FCOS": ["num_classes", "fpn_channels", "stem_channels"],
        "FCOS.forward": ["images", "gt_boxes", "test_score_thresh", "test_nms_thresh"],
        "FCOS.inference": [
            "images", "locations_per_fpn_level", "pred_cls_logits", "pred_boxreg_deltas",
            "pred_ctr_logits", "test_score_thresh", "test_nms_thresh",
        ],
        "FCOS._cat_across_fpn_levels": ["dict_with_fpn_levels", "dim"],
    },
    "two_stage_detector": {
        "hello_two_stage_detector": [],
        "RPNPredictionNetwork": ["in_channels", "stem_channels", "num_anchors"],
        "RPNPredictionNetwork.forward": ["feats_per_fpn_level"],
        "generate_fpn_anchors": ["locations_per_fpn_level", "strides_per_fpn_level", "stride_scale", "aspect_ratios"],
        "iou": ["boxes1", "boxes2"],
        "rcnn_match_anchors_to_gt": ["anchor_boxes", "gt_boxes", "iou_thresholds"],
        "rcnn_get_deltas_from_anchors": ["anchors", "gt_boxes"],
        "rcnn_apply_deltas_to_anchors": ["deltas", "anchors"],
        "sample_rpn_training": ["gt_boxes", "num_samples", "fg_fraction"],
        "reassign_proposals_to_fpn_levels": ["proposals_per_image", "gt_boxes", "fpn_level_ids"],
        "RPN": [
            "fpn_channels", "stem_channels", "batch_size_per_image", "anchor_stride_scale",
            "anchor_aspect_ratios", "anchor_iou_thresholds", "nms_thresh", "pre_nms_topk", "post_nms_topk",
        ],
        "RPN.forward": ["feats_per_fpn_level", "strides_per_fpn_level", "gt_boxes"],
        "RPN.predict_proposals": ["anchors_per_fpn_level", "pred_obj_logits", "pred_boxreg_deltas", "image_size"],
        "FasterRCNN": ["backbone", "rpn", "stem_channels", "num_classes", "batch_size_per_image", "roi_size"],
        "FasterRCNN.forward": ["images", "gt_boxes", "test_score_thresh", "test_nms_thresh"],
        "FasterRCNN.inference": ["images", "proposals", "pred_cls_logits", "test_score_thresh", "test_nms_thresh"],
    },
    "a4_helper": {
        "hello_helper": [],
        "VOC2007DetectionTiny": ["dataset_dir", "split", "download", "image_size"],
        "infinite_loader": ["loader"],
        "train_detector": [
            "detector", "train_loader", "learning_rate", "weight_decay", "max_iters", "log_period", "device",
        ],
        "inference_with_detector": [
            "detector", "test_loader", "idx_to_class", "score_thresh", "nms_thresh", "output_dir", "dtype", "device",
        ],
    },
    "eecs598": {"reset_seed": ["number"], "tensor_to_image": ["tensor"]},
    "eecs598.grad": {"rel_error": ["x", "y", "eps"]},
    "eecs598.utils": {
        "reset_seed": ["number"],
        "detection_visualizer": ["img", "idx_to_class", "bbox", "pred", "points"],
    },
}

# Parameters that the course gives a default (so that the notebooks may leave them out).
COURSE_DEFAULTS = {
    "common.DetectorBackboneWithFPN": set(),
    "common.get_fpn_location_coords": {"dtype", "device"},
    "common.nms": {"iou_threshold"},
    "common.class_spec_nms": {"iou_threshold"},
    "one_stage_detector.FCOS.forward": {"gt_boxes", "test_score_thresh", "test_nms_thresh"},
    "one_stage_detector.FCOS.inference": {"test_score_thresh", "test_nms_thresh"},
    "one_stage_detector.FCOS._cat_across_fpn_levels": {"dim"},
    "two_stage_detector.RPNPredictionNetwork": {"num_anchors"},
    "two_stage_detector.generate_fpn_anchors": {"aspect_ratios"},
    "two_stage_detector.reassign_proposals_to_fpn_levels": {"gt_boxes", "fpn_level_ids"},
    "two_stage_detector.RPN": {
        "anchor_stride_scale", "anchor_aspect_ratios", "anchor_iou_thresholds", "nms_thresh",
        "pre_nms_topk", "post_nms_topk",
    },
    "two_stage_detector.RPN.forward": {"gt_boxes"},
    "two_stage_detector.FasterRCNN": {"roi_size"},
    "two_stage_detector.FasterRCNN.forward": {"gt_boxes", "test_score_thresh", "test_nms_thresh"},
    # WI2022 gave the thresholds defaults (0.3, 0.5), FA2022 did not.
    "two_stage_detector.FasterRCNN.inference": {"test_score_thresh", "test_nms_thresh"},
    "a4_helper.VOC2007DetectionTiny": {"split", "download", "image_size"},
    "a4_helper.train_detector": {"learning_rate", "weight_decay", "max_iters", "log_period", "device"},
    "a4_helper.inference_with_detector": {"score_thresh", "nms_thresh", "output_dir", "dtype", "device"},
    "eecs598.grad.rel_error": {"eps"},
    "eecs598.utils.detection_visualizer": {"bbox", "pred", "points"},
}

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@pytest.fixture(scope="module")
def course():
    """The course's modules, imported from ``compat/`` (first on ``sys.path``, as beside
    the notebooks). ``two_stage_detector`` is ours. Restores ``sys.path`` and
    ``sys.modules`` afterwards."""
    saved_path = list(sys.path)
    saved = {name: sys.modules.pop(name) for name in COURSE_MODULES if name in sys.modules}
    sys.path.insert(0, str(COMPAT_DIR))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add latency
    try:
        modules = {name: importlib.import_module(name) for name in COURSE_MODULES}
        modules["two_stage_detector"] = importlib.import_module("two_stage_detector")
        yield modules
    finally:
        torch.set_num_threads(threads)
        sys.path[:] = saved_path
        for name in COURSE_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


class CourseBackbone(nn.Module):
    """A stand-in with the course's backbone interface: ``__init__(out_channels)``,
    ``forward(images) -> {"p3", "p4", "p5"}``, ``fpn_strides``, ``out_channels``."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.stem = nn.Conv2d(3, out_channels, kernel_size=8, stride=8)
        self.down = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(2)])

    @property
    def fpn_strides(self) -> Dict[str, int]:
        return {"p3": 8, "p4": 16, "p5": 32}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        p3 = self.stem(images)
        p4 = self.down[0](p3)
        return {"p3": p3, "p4": p4, "p5": self.down[1](p4)}


def _gt_boxes() -> torch.Tensor:
    """(1, 4, 5) GT of a 64 x 64 image, padded with a row of -1."""
    return torch.tensor([[[4.0, 6.0, 40.0, 50.0, 2.0], [30.0, 20.0, 62.0, 60.0, 0.0],
                          [10.0, 10.0, 26.0, 30.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]]])


# --------------------------------------------------------------------------------------
# Names and signatures
# --------------------------------------------------------------------------------------


def _resolve(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
    return obj


def _parameters(obj) -> List[inspect.Parameter]:
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return params


@pytest.mark.parametrize(
    "module_name, name",
    [(m, n) for m, names in COURSE_API.items() for n in names],
)
def test_course_name_has_a_call_compatible_signature(course, module_name, name):
    obj = _resolve(course[module_name], name)
    params = _parameters(obj)
    expected = COURSE_API[module_name][name]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in positional[: len(expected)]] == expected, (
        f"{module_name}.{name}: the course's parameters {expected} must come first, in order; "
        f"ours are {[p.name for p in params]}"
    )
    course_defaults = COURSE_DEFAULTS.get(f"{module_name}.{name}", set())
    for p in positional[: len(expected)]:
        if p.name in course_defaults:
            assert p.default is not p.empty, f"{module_name}.{name}: '{p.name}' must stay optional, as in the course"
    extra = [p for p in params if p.name not in expected and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in extra if p.default is p.empty]
    assert not required, f"{module_name}.{name}: extra parameters {required} must be optional"


def test_star_imports_give_what_the_notebooks_use(course):
    namespace: Dict[str, object] = {}
    exec("from a4_helper import *", namespace)
    for name in ("VOC2007DetectionTiny", "train_detector", "inference_with_detector", "infinite_loader",
                 "hello_helper", "eecs598", "torch"):
        assert name in namespace, name
    # Notebook cells call `eecs598.utils.detection_visualizer(...)` after `from a4_helper import *`.
    assert namespace["eecs598"].utils.detection_visualizer is course["eecs598.utils"].detection_visualizer
    namespace = {}
    exec("from one_stage_detector import *", namespace)
    for name in ("FCOS", "FCOSPredictionNetwork", "DetectorBackboneWithFPN", "get_fpn_location_coords",
                 "class_spec_nms", "hello_one_stage_detector", "VOC2007DetectionTiny"):
        assert name in namespace, name


def test_hello_functions(course, capsys):
    course["common"].hello_common()
    course["one_stage_detector"].hello_one_stage_detector()
    course["two_stage_detector"].hello_two_stage_detector()
    course["a4_helper"].hello_helper()
    assert capsys.readouterr().out.splitlines() == [
        "Hello from common.py!",
        "Hello from one_stage_detector.py!",
        "Hello from two_stage_detector.py!",
        "Hello from a4_helper.py!",
    ]


def test_compat_re_exports_our_objects(course):
    import a5_helper
    import fcos

    assert course["common"].DetectorBackboneWithFPN is fcos.DetectorBackboneWithFPN
    assert course["common"].nms is fcos.nms
    assert course["one_stage_detector"].FCOS is fcos.FCOS
    assert course["a4_helper"].train_detector is a5_helper.train_detector
    assert course["eecs598.grad"].rel_error is a5_helper.rel_error


# --------------------------------------------------------------------------------------
# The notebooks' calls
# --------------------------------------------------------------------------------------


def test_backbone_forward_takes_images(course):
    backbone = course["common"].DetectorBackboneWithFPN(out_channels=8, pretrained=False)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        by_keyword = backbone(images=images)
        by_position = backbone(images)
        from_features = backbone(images=backbone.extract_features(images))
    assert list(by_keyword) == ["p3", "p4", "p5"]
    for level, stride in backbone.fpn_strides.items():
        assert by_keyword[level].shape == (2, 8, 64 // stride, 96 // stride)
        torch.testing.assert_close(by_keyword[level], by_position[level])
        torch.testing.assert_close(by_keyword[level], from_features[level])


def test_notebook_sanity_checks(course):
    common, osd = course["common"], course["one_stage_detector"]
    rel_error = course["eecs598.grad"].rel_error
    shapes = {"p3": (2, 64, 28, 28), "p4": (2, 64, 14, 14), "p5": (2, 64, 7, 7)}
    locations = common.get_fpn_location_coords(shapes, {"p3": 8, "p4": 16, "p5": 32})
    assert rel_error(locations["p3"][:3], torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]])) < 1e-6
    boxes = torch.tensor([[10.0, 15, 100, 115, 1], [30, 20, 40, 30, 1], [-1, -1, -1, -1, -1]])
    points = torch.tensor([[30.0, 40], [32, 29], [125, 150]])
    deltas = osd.fcos_get_deltas_from_locations(points, boxes, stride=8)
    centerness = osd.fcos_make_centerness_targets(deltas)
    assert rel_error(centerness, torch.tensor([0.30860671401, 0.1666666716, -1.0])) < 1e-6
    restored = osd.fcos_apply_deltas_to_locations(deltas[:2], points[:2], stride=8)
    assert rel_error(restored, boxes[:2, :4]) < 1e-6
    # One image's (N, 5) GT, as the notebook passes it.
    matched = osd.fcos_match_locations_to_gt(locations, {"p3": 8, "p4": 16, "p5": 32}, _gt_boxes()[0])
    assert {level: m.shape for level, m in matched.items()} == {
        level: (loc.shape[0], 5) for level, loc in locations.items()
    }


def test_fcos_with_an_injected_course_backbone_class(course):
    FCOS = course["one_stage_detector"].FCOS
    torch.manual_seed(0)
    detector = FCOS(num_classes=3, fpn_channels=8, stem_channels=[8], backbone=CourseBackbone)
    assert isinstance(detector.backbone, CourseBackbone) and detector.backbone.out_channels == 8
    images = torch.randn(2, 3, 64, 64)
    losses = detector(images, _gt_boxes().repeat(2, 1, 1))
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    sum(losses.values()).backward()
    assert detector.backbone.stem.weight.grad is not None
    detector.eval()
    boxes, classes, scores = detector(images[:1], test_score_thresh=0.0, test_nms_thresh=0.5)
    assert boxes.shape == (len(classes), 4) and scores.shape == classes.shape

    # An instance works too; its channels must match.
    instance = CourseBackbone(8)
    assert FCOS(3, 8, [8], backbone=instance).backbone is instance
    with pytest.raises(ValueError, match="out_channels"):
        FCOS(3, 16, [8], backbone=instance)


def test_fcos_inference_with_the_course_arguments(course):
    common = course["common"]
    torch.manual_seed(0)
    detector = course["one_stage_detector"].FCOS(num_classes=4, fpn_channels=8, stem_channels=[8], backbone=CourseBackbone)
    detector.eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        # What the course's FCOS.forward does before it calls `self.inference`:
        fpn_feats = detector.backbone(images)
        pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits = detector.pred_net(fpn_feats)
        shapes = {level: feat.shape for level, feat in fpn_feats.items()}
        locations = common.get_fpn_location_coords(shapes, detector.backbone.fpn_strides)
        boxes, classes, scores = detector.inference(
            images, locations, pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits,
            test_score_thresh=0.05, test_nms_thresh=0.6,
        )
        expected = detector(images, test_score_thresh=0.05, test_nms_thresh=0.6)
        defaults = detector.inference(images, locations, pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits)
    assert len(scores) > 0
    for ours, theirs in zip((boxes, classes, scores), expected):
        torch.testing.assert_close(ours, theirs)
    assert ((classes >= 0) & (classes < 4)).all()
    assert (scores[:-1] >= scores[1:]).all()
    assert (boxes[:, 0::2] <= 96).all() and (boxes[:, 1::2] <= 64).all() and (boxes >= 0).all()
    assert (defaults[2] > 0.3).all()
    assert torch.equal(detector._cat_across_fpn_levels(locations, dim=0), torch.cat(list(locations.values())))


def _tiny_faster_rcnn(tsd, torch_seed: int = 0):
    torch.manual_seed(torch_seed)
    backbone = CourseBackbone(8)
    rpn = tsd.RPN(fpn_channels=8, stem_channels=[8], batch_size_per_image=16, pre_nms_topk=40, post_nms_topk=12)
    return tsd.FasterRCNN(backbone, rpn, num_classes=3, stem_channels=[8], batch_size_per_image=16, roi_size=(7, 7))


def test_faster_rcnn_inference_with_the_course_arguments(course):
    import torchvision

    tsd = course["two_stage_detector"]
    detector = _tiny_faster_rcnn(tsd)
    losses = detector(torch.randn(2, 3, 64, 64), _gt_boxes().repeat(2, 1, 1))
    assert {"loss_rpn_obj", "loss_rpn_box", "loss_cls"} <= set(losses)
    detector.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # What the course's FasterRCNN.forward (FA2022 errata) does before `self.inference`:
        feats = detector.backbone(images)
        proposals_per_image = detector.rpn(feats, detector.backbone.fpn_strides)["proposals"]
        proposals_per_fpn_level = tsd.reassign_proposals_to_fpn_levels(proposals_per_image)
        roi_feats = torch.cat([
            torchvision.ops.roi_align(
                feats[level], proposals_per_fpn_level[level], output_size=detector.roi_size,
                spatial_scale=1 / detector.backbone.fpn_strides[level], sampling_ratio=2, aligned=True,
            )
            for level in feats
        ])
        pred_cls_logits = detector.cls_pred(detector.roi_stem(roi_feats))
        course_call = detector.inference(
            images, proposals_per_fpn_level, pred_cls_logits, test_score_thresh=0.2, test_nms_thresh=0.5
        )
        computed_logits = detector.inference(images, proposals_per_fpn_level, None, 0.2, 0.5)
        from_list = detector.inference(images, proposals_per_image, test_score_thresh=0.2, test_nms_thresh=0.5)
        from_tensor = detector.inference(images, proposals_per_image[0], None, 0.2, 0.5)
        forward = detector(images, test_score_thresh=0.2, test_nms_thresh=0.5)
    boxes, classes, scores = course_call
    assert len(scores) > 0 and boxes.shape == (len(scores), 4) and classes.shape == scores.shape
    assert ((classes >= 0) & (classes < 3)).all() and (scores > 0.2).all()
    for ours, theirs in zip(course_call, computed_logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for result in (from_tensor, forward):
        for ours, theirs in zip(from_list, result):
            torch.testing.assert_close(ours, theirs)
    # The level order only permutes the candidates: same detections up to ties.
    torch.testing.assert_close(course_call[2].sort().values, from_list[2].sort().values, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pred_cls_logits"):
        detector.inference(images, proposals_per_fpn_level, pred_cls_logits[:-1], 0.2, 0.5)


# --------------------------------------------------------------------------------------
# inference_with_detector over any iterable of batches
# --------------------------------------------------------------------------------------


def _write_tiny_voc(root: Path, num_images: int = 3) -> Path:
    """A VOCdevkit layout with a few small images (one coloured box each), val split."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(num_images):
        image_id = f"{i + 1:06d}"
        ids.append(image_id)
        image = Image.new("RGB", (80, 64), (0, 0, 0))
        image.paste((200, 40, 40), (10, 8, 50, 40))
        image.save(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>80</width><height>64</height>"
            "<depth>3</depth></size><object><name>car</name><difficult>0</difficult><bndbox>"
            "<xmin>10</xmin><ymin>8</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>"
        )
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


class FixedDetector(nn.Module):
    """The course's detector interface only (no ``predict``): one detection per image."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None):
        assert images.shape[0] == 1
        self.calls += 1
        return torch.tensor([[8.0, 8.0, 40.0, 32.0]]), torch.tensor([6]), torch.tensor([0.9])


@pytest.fixture(scope="module")
def tiny_val(course, tmp_path_factory):
    root = _write_tiny_voc(tmp_path_factory.mktemp("compat_voc"))
    return course["a4_helper"].VOC2007DetectionTiny(root, "val", image_size=64)


@pytest.mark.parametrize("kind", ["dataloader", "dataset", "list_of_batches", "generator", "list_of_items"])
def test_inference_with_detector_over_any_iterable(course, tiny_val, tmp_path, kind):
    helper = course["a4_helper"]
    items = [tiny_val[i] for i in range(len(tiny_val))]
    loader = DataLoader(tiny_val, batch_size=1)
    test_loader = {
        "dataloader": loader,
        "dataset": tiny_val,
        "list_of_batches": list(loader),
        "generator": (batch for batch in loader),
        "list_of_items": items,
    }[kind]
    detector = FixedDetector()
    helper.inference_with_detector(
        detector, test_loader, tiny_val.idx_to_class, score_thresh=0.4, nms_thresh=0.6,
        output_dir=str(tmp_path), dtype=torch.float32, device="cpu",
    )
    assert detector.calls == len(items)
    names = [f"{i + 1:06d}.txt" for i in range(len(items))]
    assert sorted(p.name for p in (tmp_path / "detection-results").glob("*.txt")) == names
    assert sorted(p.name for p in (tmp_path / "ground-truth").glob("*.txt")) == names
    for name in names:
        label, score, *box = (tmp_path / "detection-results" / name).read_text().split()
        assert label == "car" and float(score) == pytest.approx(0.9)
        assert (tmp_path / "ground-truth" / name).read_text().startswith("car ")


def test_inference_with_detector_shows_a_generator_of_batches(course, tiny_val, tmp_path, monkeypatch):
    monkeypatch.setenv("A5_PLOT_DIR", str(tmp_path))
    pictures = []
    monkeypatch.setattr(
        sys.modules["a5.plots"], "detection_visualizer",
        lambda image, idx_to_class, bbox=None, pred=None, points=None: pictures.append((image.shape, pred.shape)),
    )
    loader = DataLoader(tiny_val, batch_size=2)
    course["a4_helper"].inference_with_detector(
        FixedDetector(), (batch for batch in loader), tiny_val.idx_to_class, score_thresh=0.4, nms_thresh=0.6
    )
    assert pictures == [((3, 64, 64), (1, 6))] * len(tiny_val)


def test_eecs598_utilities(course):
    eecs598 = course["eecs598"]
    eecs598.reset_seed(0)
    first = torch.rand(3)
    eecs598.utils.reset_seed(0)
    assert torch.equal(first, torch.rand(3))
    assert eecs598.grad.rel_error(first, first) == 0.0
    image = eecs598.tensor_to_image(torch.ones(3, 4, 5) * 0.5)
    assert image.shape == (4, 5, 3) and image.dtype.name == "uint8" and int(image[0, 0, 0]) == 128

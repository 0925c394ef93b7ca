"""Test helpers shared by several test files: a tiny generated VOC dataset (solid coloured
rectangles on black, one colour per class, in VOC XML and course JSON format), stand-in
detectors that honour the detector contract, and the fixtures that go with them.

A test file uses a fixture from here by importing it (`from helpers import tiny_voc`);
`one_thread` is autouse: import it to run that file's tests on one torch thread.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

import a5_helper as h


CLASS_COLORS = {
    "car": (230, 30, 30),
    "dog": (30, 200, 30),
    "person": (40, 40, 230),
    "cat": (230, 220, 30),
    "bird": (200, 40, 200),  # only ever a "difficult" object
}


SIZES = [(96, 64), (64, 96), (80, 80), (120, 72)]


N_TRAIN, N_VAL = 6, 4


def _image_spec(i: int):
    """(width, height, [(class, [x1, y1, x2, y2], difficult)]) of generated image i.

    Two side-by-side objects; the right one touches the right border (a centre crop
    would cut it). Every third image's right object is a difficult "bird". The last
    val image is empty.
    """
    if i == N_TRAIN + N_VAL:
        return 80, 64, []
    rng = random.Random(i)
    W, H = SIZES[i % len(SIZES)]
    names = ["car", "dog", "person", "cat"]
    left = names[i % 4]
    right = "bird" if i % 3 == 0 else names[(i + 1) % 4]
    objs = []
    y1 = rng.randint(2, H // 3)
    y2 = rng.randint(H // 2 + 4, H - 2)
    objs.append((left, [float(rng.randint(1, 6)), float(y1), float(W // 2 - 3), float(y2)], False))
    y1 = rng.randint(1, H // 3)
    y2 = rng.randint(H // 2 + 4, H)
    objs.append((right, [float(W // 2 + 3), float(y1), float(W), float(y2)], right == "bird"))
    return W, H, objs


def _write_xml(path: Path, image_id: str, W: int, H: int, objs) -> None:
    objects = "".join(
        f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin>"
        f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
        for c, b, d in objs
    )
    path.write_text(
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>{objects}</annotation>"
    )


def make_tiny_voc(root: Path) -> Path:
    """Write the VOCdevkit layout and the course JSON split files under `root`."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    splits: Dict[str, List[str]] = {"train": [], "val": []}
    json_splits: Dict[str, list] = {"train": [], "val": []}
    for i in range(1, N_TRAIN + N_VAL + 1):
        image_id = f"{i:06d}"
        W, H, objs = _image_spec(i)
        img = Image.new("RGB", (W, H), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        for c, b, _ in objs:
            # Fill pixels x1..x2-1: the box edges are the continuous coordinates.
            draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], fill=CLASS_COLORS[c])
        img.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        _write_xml(voc / "Annotations" / f"{image_id}.xml", image_id, W, H, objs)
        split = "train" if i <= N_TRAIN else "val"
        splits[split].append(image_id)
        json_splits[split].append(
            [f"./here/VOCdevkit/VOC2007/JPEGImages/{image_id}.jpg",
             [{"name": c, "xyxy": b} for c, b, d in objs if not d]]
        )
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (root / f"voc07_{split}.json").write_text(json.dumps(json_splits[split]))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """These tests use tiny tensors: torch's intra-op threads only add latency (a lot on a
    busy 2-core machine). ``single_thread`` (tests/conftest.py) does the work."""
    yield


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory) -> Path:
    return make_tiny_voc(tmp_path_factory.mktemp("tiny_voc"))


class TinyBackbone(nn.Module):
    """Mimics DetectorBackboneWithFPN: c3/c4/c5 at strides 8/16/32, FPN 1x1 convs."""

    def __init__(self, out_channels: int = 8, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = nn.ModuleDict({"c3": nn.Conv2d(3, 6, 1), "c4": nn.Conv2d(6, 10, 1), "c5": nn.Conv2d(10, 12, 1)})
        self.fpn_params = nn.ModuleDict({k: nn.Conv2d(c, out_channels, 1) for k, c in (("c3", 6), ("c4", 10), ("c5", 12))})
        self.backbone_name, self.weights_name = "tiny", "random"
        self.out_channels = out_channels
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def _features(self, images):
        c3 = torch.tanh(self.backbone["c3"](F.avg_pool2d(images, 8)))
        c4 = torch.tanh(self.backbone["c4"](F.avg_pool2d(c3, 2)))
        c5 = torch.tanh(self.backbone["c5"](F.avg_pool2d(c4, 2)))
        return {"c3": c3, "c4": c4, "c5": c5}

    def extract_features(self, images):
        if self.freeze_backbone:
            with torch.no_grad():
                return self._features(images)
        return self._features(images)

    def forward(self, x):
        feats = x if isinstance(x, dict) else self.extract_features(x)
        return {"p" + k[1]: self.fpn_params[k](feats[k]) for k in ("c3", "c4", "c5")}


class TinyDetector(nn.Module):
    """Training: multi-label class loss + mean-box regression (with dropout, so that
    the global RNG matters); predict: one box per confident class."""

    def __init__(self, num_classes: int = 20, freeze_backbone: bool = False, dropout: float = 0.2, **unused):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = TinyBackbone(8, freeze_backbone)
        self.head = nn.Linear(24, num_classes + 4)
        self.dropout = nn.Dropout(dropout)
        self.calls = 0
        self.nan_at: Optional[int] = None  # training call (1-based) that returns NaN
        self.fail_at: Optional[int] = None  # training call (1-based) that crashes

    @staticmethod
    def _size(x):
        if isinstance(x, dict):
            return 8 * x["c3"].shape[-2], 8 * x["c3"].shape[-1]
        return x.shape[-2], x.shape[-1]

    def _pooled(self, x):
        p = self.backbone(x)
        return torch.cat([p[k].mean((2, 3)) for k in ("p3", "p4", "p5")], dim=1)

    def forward(self, x, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None):
        if not self.training:
            out = self.predict(x, test_score_thresh or 0.3, test_nms_thresh or 0.5)[0]
            return out["boxes"], out["labels"], out["scores"]
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("simulated crash")
        out = self.head(self.dropout(self._pooled(x)))
        H, W = self._size(x)
        valid = gt_boxes[..., 4] >= 0
        target = torch.zeros(len(gt_boxes), self.num_classes, dtype=out.dtype, device=out.device)
        b_idx, o_idx = valid.nonzero(as_tuple=True)
        target[b_idx, gt_boxes[b_idx, o_idx, 4].long()] = 1.0
        loss_cls = F.binary_cross_entropy_with_logits(out[:, : self.num_classes], target)
        norm = gt_boxes.new_tensor([W, H, W, H])
        boxes = (gt_boxes[..., :4] / norm) * valid[..., None]
        mean_box = boxes.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        loss_box = F.smooth_l1_loss(torch.sigmoid(out[:, self.num_classes :]), mean_box)
        if self.nan_at is not None and self.calls == self.nan_at:
            loss_box = loss_box * float("nan")
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    @torch.no_grad()
    def predict(self, x, score_thresh=0.3, nms_thresh=0.5):
        out = self.head(self._pooled(x))
        H, W = self._size(x)
        scores = torch.sigmoid(out[:, : self.num_classes])
        raw = torch.sigmoid(out[:, self.num_classes :]) * out.new_tensor([W, H, W, H])
        box = torch.stack([torch.minimum(raw[:, 0], raw[:, 2]), torch.minimum(raw[:, 1], raw[:, 3]),
                           torch.maximum(raw[:, 0], raw[:, 2]), torch.maximum(raw[:, 1], raw[:, 3])], dim=1)
        results = []
        for i in range(len(out)):
            labels = (scores[i] > score_thresh).nonzero().flatten()
            results.append({"boxes": box[i].expand(len(labels), 4).clone(), "labels": labels, "scores": scores[i, labels]})
        return results


class ColorOracle(nn.Module):
    """Finds each class's coloured rectangle in the (normalised) image: a perfect
    detector for the generated data, to test evaluation end to end."""

    def __init__(self, classes=None):
        super().__init__()
        self.classes = list(classes or CLASS_COLORS)

    def predict(self, images, score_thresh=0.3, nms_thresh=0.5):
        rgb = torch.stack([h.unnormalize_image(im.float().cpu()) for im in images]) * 255
        results = []
        for img in rgb:
            boxes, labels = [], []
            for name in self.classes:
                color = torch.tensor(CLASS_COLORS[name], dtype=img.dtype).view(3, 1, 1)
                mask = (img - color).abs().amax(0) < 60
                if mask.sum() >= 4:
                    ys, xs = mask.nonzero(as_tuple=True)
                    boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
                    labels.append(h.VOC_CLASSES.index(name))
            results.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.long),
                            "scores": torch.full((len(labels),), 0.9)})
        return results


class SyntheticDataset(Dataset):
    """In-memory items `(path, image (3, 32, 32), gt (40, 5))`; records what was read."""

    def __init__(self, n: int = 8, size: int = 32):
        self.n, self.size, self.seen = n, size, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.seen.append(int(i))
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, self.size, self.size, generator=g)
        gt = torch.full((40, 5), -1.0)
        gt[0] = torch.tensor([2.0, 3.0, 20.0, 25.0, float(i % 20)])
        # augmentation drawn from the global torch RNG, as a user dataset would
        if torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return f"img{i}.jpg", image, gt


def _param_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def tiny_builder(monkeypatch):
    """Registers "tiny" (a TinyDetector) as a detector the command line can build."""
    def build(**kw):
        detector = TinyDetector(num_classes=kw.get("num_classes", 20), freeze_backbone=kw.get("freeze_backbone", False))
        detector.built_with = kw  # what the command line asked for (tune_last_stage, ...)
        return detector

    monkeypatch.setitem(h.DETECTOR_BUILDERS, "tiny", build)

"""Shared helpers of the benchmark scripts: imports, model pairs, machine info.

The benchmark scripts run as ``python benchmarks/<script>.py`` from the repository root
(then ``benchmarks/`` is ``sys.path[0]``) or are imported as ``benchmarks.<script>`` by the
tests. Either way they import the repository's ``fcos``, ``two_stage_detector`` and
``a5_helper``: the repository root is *appended* to ``sys.path`` so that a checkout already
placed first (the autograder's ``A5_SUBMISSION``) still wins.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

# Offline defaults (as in the tests): the shared data and weights beside the repository.
_SHARED = REPO_ROOT.parent / "shared"
if (_SHARED / "weights").is_dir():
    os.environ.setdefault("TORCH_HOME", str(_SHARED / "weights"))
if (_SHARED / "data").is_dir():
    os.environ.setdefault("VOC_ROOT", str(_SHARED / "data"))

import torch  # noqa: E402  (after TORCH_HOME is set)
import torchvision  # noqa: E402

try:  # both spellings work: `python benchmarks/x.py` and `import benchmarks.x`
    from . import tv_adapters  # type: ignore
except ImportError:  # pragma: no cover - script mode
    import tv_adapters  # type: ignore


# --------------------------------------------------------------------------------------
# Detector configurations (the course's hyper-parameters)
# --------------------------------------------------------------------------------------


@dataclass
class FCOSConfig:
    """Course FCOS: FPN 128, two 128-channel stem convs per branch."""

    num_classes: int = 20
    fpn_channels: int = 128
    stem_channels: Tuple[int, ...] = (128, 128)
    # Both heads have GroupNorm(32) after every stem conv ("groupnorm", torchvision's stock
    # FCOSHead); "none" would give torchvision plain conv + ReLU stems instead.
    tv_head_norm: str = "groupnorm"


@dataclass
class FasterRCNNConfig:
    """Course Faster R-CNN: FPN 64, RPN and RoI stems [64, 64], 16 anchors / 32 RoIs sampled
    per image, 400 proposals per level before NMS and 80 per image after."""

    num_classes: int = 20
    fpn_channels: int = 64
    rpn_stem_channels: Tuple[int, ...] = (64, 64)
    rpn_batch_size_per_image: int = 16
    anchor_stride_scale: float = 8
    anchor_aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_topk: int = 400
    post_nms_topk: int = 80
    roi_stem_channels: Tuple[int, ...] = (64, 64)
    roi_batch_size_per_image: int = 32
    roi_size: Tuple[int, int] = (7, 7)


@dataclass
class PairConfig:
    """What both members of a pair share."""

    backbone: str = "mobilenet_v2"
    pretrained: bool = False
    freeze_backbone: bool = False
    # Fine-tune the CNN's stride-32 stage of a frozen backbone (on cached c4), both models.
    tune_last_stage: bool = False
    image_size: int = 224
    # Inference thresholds used by *both* models (torchvision's FCOS defaults).
    score_thresh: float = 0.2
    nms_thresh: float = 0.6
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    faster_rcnn: FasterRCNNConfig = field(default_factory=FasterRCNNConfig)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def ours_model_config(kind: str, cfg: PairConfig) -> Dict[str, Any]:
    """The config dict of ``a5_helper.build_detector`` (also stored in checkpoints, so
    that ``python a5_helper.py eval --checkpoint ...`` can rebuild our models)."""
    if kind == "fcos":
        c = cfg.fcos
        kwargs: Dict[str, Any] = {"fpn_channels": c.fpn_channels, "stem_channels": list(c.stem_channels)}
    elif kind == "faster_rcnn":
        c = cfg.faster_rcnn
        kwargs = {
            "fpn_channels": c.fpn_channels, "stem_channels": list(c.roi_stem_channels),
            "rpn_stem_channels": list(c.rpn_stem_channels), "rpn_batch_size_per_image": c.rpn_batch_size_per_image,
            "roi_batch_size_per_image": c.roi_batch_size_per_image, "anchor_stride_scale": c.anchor_stride_scale,
            "anchor_aspect_ratios": list(c.anchor_aspect_ratios), "pre_nms_topk": c.pre_nms_topk,
            "post_nms_topk": c.post_nms_topk, "roi_size": list(c.roi_size),
        }
    else:
        raise ValueError(f"unknown detector {kind!r} (fcos or faster_rcnn)")
    kwargs.update(num_classes=c.num_classes, backbone=cfg.backbone, pretrained=cfg.pretrained,
                  freeze_backbone=cfg.freeze_backbone)
    if cfg.tune_last_stage:  # recorded only when on, so that older run configs still match
        kwargs["tune_last_stage"] = True
    return {"detector": kind, "image_size": cfg.image_size, "kwargs": kwargs}


def build_ours(kind: str, cfg: PairConfig) -> torch.nn.Module:
    """Our ``FCOS`` or ``FasterRCNN`` with the hyper-parameters of ``cfg`` (through
    ``a5_helper.build_detector``, the builder of the project's command line)."""
    import a5_helper

    return a5_helper.build_detector(ours_model_config(kind, cfg))


def build_torchvision(kind: str, cfg: PairConfig, ours: torch.nn.Module) -> tv_adapters.TorchvisionDetector:
    """torchvision's detector configured like ``ours``, sharing a copy of its backbone body.

    Hyper-parameters are read from our constructed modules where they are attributes
    (so the pair stays identical if our defaults change), else from ``cfg``.
    """
    body = tv_adapters.TorchvisionBackboneFPN.from_ours(ours.backbone)
    if kind == "fcos":
        c = cfg.fcos
        det = tv_adapters.build_tv_fcos(
            body, c.num_classes, num_convs=len(c.stem_channels), image_size=cfg.image_size,
            center_sampling_radius=1.5, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
            head_norm=c.tv_head_norm,
        )
    elif kind == "faster_rcnn":
        c = cfg.faster_rcnn
        rpn = ours.rpn  # hyper-parameters our constructor filled in (thresholds, fractions)
        det = tv_adapters.build_tv_faster_rcnn(
            body, c.num_classes, cfg.image_size,
            rpn_conv_depth=len(c.rpn_stem_channels),
            anchor_stride_scale=getattr(rpn, "anchor_stride_scale", c.anchor_stride_scale),
            anchor_aspect_ratios=tuple(getattr(rpn, "anchor_aspect_ratios", c.anchor_aspect_ratios)),
            rpn_iou_thresholds=tuple(getattr(rpn, "anchor_iou_thresholds", (0.3, 0.6))),
            rpn_batch_size_per_image=getattr(rpn, "batch_size_per_image", c.rpn_batch_size_per_image),
            rpn_positive_fraction=getattr(rpn, "fg_fraction", 0.5),
            rpn_nms_thresh=getattr(rpn, "nms_thresh", 0.7),
            # Both are per level (pre) and per image (post) in ours and in torchvision's.
            rpn_pre_nms_topk=getattr(rpn, "pre_nms_topk", c.pre_nms_topk),
            rpn_post_nms_topk=getattr(rpn, "post_nms_topk", c.post_nms_topk),
            roi_stem_channels=tuple(c.roi_stem_channels), roi_size=tuple(c.roi_size), roi_sampling_ratio=2,
            roi_iou_thresholds=(getattr(ours, "roi_iou_threshold", 0.5),) * 2,
            roi_batch_size_per_image=getattr(ours, "batch_size_per_image", c.roi_batch_size_per_image),
            roi_positive_fraction=getattr(ours, "fg_fraction", 0.25),
            score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
            detections_per_img=getattr(ours, "detections_per_image", 100),
        )
    else:
        raise ValueError(f"unknown detector {kind!r} (fcos or faster_rcnn)")
    return tv_adapters.TorchvisionDetector(det)


def build_pair(kind: str, cfg: PairConfig,
               device: torch.device) -> Tuple[torch.nn.Module, tv_adapters.TorchvisionDetector]:
    """Ours and torchvision's detector of one kind, configured alike, on ``device``."""
    ours = build_ours(kind, cfg)
    theirs = build_torchvision(kind, cfg, ours)
    return ours.to(device), theirs.to(device)


def num_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------


def random_batch(batch_size: int, image_size: int, num_classes: int = 20, max_boxes: int = 8,
                 seed: int = 0, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking random images and random GT boxes, padded ``(B, max_boxes, 5)``.

    Every image gets 1..max_boxes boxes with sides between 1/8 and 3/4 of the image
    (VOC-like), classes uniform; the remaining rows are -1 padding.
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=dtype)
    gt = torch.full((batch_size, max_boxes, 5), -1.0, dtype=dtype)
    for i in range(batch_size):  # tiny loop over images, input generation only
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=gen))
        wh = (torch.rand(n, 2, generator=gen, dtype=dtype) * 0.625 + 0.125) * image_size
        xy = torch.rand(n, 2, generator=gen, dtype=dtype) * (image_size - wh)
        gt[i, :n, :2] = xy.floor()
        gt[i, :n, 2:4] = (xy + wh).floor().clamp(max=image_size)
        gt[i, :n, 4] = torch.randint(0, num_classes, (n,), generator=gen).to(dtype)
    device = device or torch.device("cpu")
    return images.to(device), gt.to(device)


def random_boxes(n: int, extent: float = 1000.0, seed: int = 0,
                 device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` random boxes (sides 16..128 px) in an ``extent`` square, and random scores."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * extent
    wh = 16 + torch.rand(n, 2, generator=gen) * 112
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=gen)
    device = device or torch.device("cpu")
    return boxes.to(device), scores.to(device)


# --------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """Short commit of the repository, with "+dirty" when the measured code differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        code = ["fcos.py", "two_stage_detector.py", "a5_helper.py", "benchmarks"]
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", *code],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + ("+dirty" if status else "")


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, GPU, versions, date."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable_cores = os.cpu_count()
    info: Dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "device": str(device),
        # Other processes compete for the cores when this exceeds usable_cores: timings
        # taken then are unreliable (small multi-threaded ops suffer most).
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: Dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['usable_cores']} cores, {info['torch_threads']} threads)"
    return f"{where}; torch {info['torch']}, torchvision {info['torchvision']}; {info['date']}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

"""Everything around the two detectors of assignment 5: data, training, evaluation,
pictures and a command line.

Sections (in file order):

* Small utilities: `hello_helper`, `reset_seed`, device helpers.
* Data: `VOC2007DetectionTiny` (course JSON split files or the VOCdevkit layout),
  the train / eval transforms, `infinite_loader`, download with checksum.
* Training: `train_detector` (SGD + warm-up + step/cosine decay, gradient clipping,
  AMP on CUDA, checkpoints with exact resume, NaN guard, DistributedDataParallel under
  `torchrun`) and the samplers that make exact resume possible.
* Frozen backbone + feature cache: `build_feature_cache`, `CachedFeatureDataset`.
* Progress: `ProgressReporter` (a bar on a terminal, periodic plain lines in a log file).
* Evaluation: `compute_voc_map` (PASCAL devkit rules), `compute_coco_map`
  (pycocotools cross-check), `count_detection_errors` (false positives by kind, misses),
  `evaluate_detector`, `inference_with_detector`.
* Pictures: `detection_visualizer` / `draw_detections` (a colour per class, labels that
  do not overlap), `plot_loss_history`, `plot_per_class_ap`, `plot_pr_curves`,
  `plot_error_breakdown`.
* Command line: `python a5_helper.py {train,eval,predict} --help`.

Conventions (shared with fcos.py and two_stage_detector.py): boxes are XYXY in absolute
pixels; a batch of ground truth is `(B, N, 5)` with rows `x1, y1, x2, y2, class_id`,
padded with rows of -1. Detectors return a dict of scalar losses in training mode and
`predict(images, score_thresh, nms_thresh) -> [{"boxes", "labels", "scores"}, ...]`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

TensorDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

REPO_ROOT = Path(__file__).resolve().parent

# fmt: off
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
# fmt: on
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where `download=True` fetches PASCAL VOC2007 trainval (mirrors tried in order). The MD5
# is the one published with the archive (torchvision checks the same value).
VOC2007_DOWNLOAD = {
    "urls": [
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
        "https://web.eecs.umich.edu/~justincj/data/VOCtrainval_06-Nov-2007.tar",
    ],
    "filename": "VOCtrainval_06-Nov-2007.tar",
    "md5": "c52e279531787c972589f7e41ab4ae64",
}

EXPECTED_LAYOUT = """\
expected layout under the data folder (VOC_ROOT):
    VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    VOCdevkit/VOC2007/Annotations/<id>.xml
    VOCdevkit/VOC2007/ImageSets/Main/{train,val}.txt
  and/or the course split files voc07_{train,val}.json (paths prefixed ./here/)"""


def hello_helper() -> None:
    print("Hello from a5_helper.py!")


def reset_seed(number: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) random number generators."""
    random.seed(number)
    np.random.seed(number % 2**32)
    torch.manual_seed(number)


def rel_error(x: Union[torch.Tensor, np.ndarray, float], y: Union[torch.Tensor, np.ndarray, float],
              eps: float = 1e-10) -> float:
    """Relative error `max |x - y| / max(|x| + |y|)`, the course's sanity-check measure.

    Around 1e-7 (float32) for equal computations; above 1e-3 usually means a bug.
    """
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.numel() == 0:
        return 0.0
    return float((x - y).abs().max() / (x.abs() + y.abs()).clamp(min=eps).max())


def check_close(name: str, expected: Any, computed: Any, tol: float = 1e-6, decimals: int = 4) -> bool:
    """Print one notebook sanity check: expected and computed values, relative error, verdict.

    The verdict is "OK" when the relative error is below `tol`, else "WRONG". Values are
    printed rounded to `decimals` places (the error uses the full precision).
    """
    err = rel_error(expected, computed)

    def show(values: Any) -> Any:
        # "+ 0.0" turns -0.0 into 0.0 so that printed checks compare equal across machines.
        values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).numpy()
        return (np.round(values, decimals) + 0.0).tolist()

    print(f"{name}\n  expected {show(expected)}\n  computed {show(computed)}\n"
          f"  rel. error {err:.1e}: {'OK' if err < tol else 'WRONG'}")
    return err < tol


def pick_backbone(candidates: Sequence[str] = ("regnet_x_400mf", "mobilenet_v2")) -> Tuple[str, bool]:
    """The first backbone of `candidates` whose ImageNet weights can be loaded.

    Tries each in order through torchvision's weights API (the `TORCH_HOME` cache, then a
    download). Returns `(name, True)` for the first that loads, else
    `(candidates[0], False)` after a warning: the caller then trains from a random
    initialisation, which works but gives far lower accuracy.
    """
    import fcos  # local import: fcos imports nothing from here, but keep a5_helper light

    _setup_torch_home()
    reasons = []
    for name in candidates:
        try:
            fcos.DetectorBackboneWithFPN(8, backbone=name, pretrained=True)
            return name, True
        except RuntimeError as err:  # fcos raises RuntimeError with the file and cache folder
            reasons.append(f"{name}: {err}")
    warnings.warn("No pretrained backbone weights could be loaded; using a randomly initialised "
                  f"{candidates[0]}.\n" + "\n".join(reasons))
    return candidates[0], False


def default_data_dir() -> Path:
    """`$VOC_ROOT`, else `<repo>/../shared/data` if it exists, else `./data`."""
    if os.environ.get("VOC_ROOT"):
        return Path(os.environ["VOC_ROOT"])
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """"auto" -> CUDA if available else CPU; anything else is passed to torch.device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bfloat16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (Intel AMX or
    AVX512-BF16). There, bf16 autocast makes convolutions ~1.8x faster; elsewhere
    oneDNN emulates bf16 and it is no faster than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in checks if hasattr(torch.cpu, name))
    except Exception:  # an old or unusual build: assume no fast bf16
        return False


def autocast_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """The half-precision dtype autocast uses by default: float16 on CUDA (more
    mantissa bits than bfloat16 for box coordinates), bfloat16 on CPU (what its
    matrix units support)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def default_amp(device: Union[str, torch.device]) -> bool:
    """Whether training autocasts by default: always on CUDA (float16), and on a CPU
    with hardware bfloat16 (`cpu_has_fast_bfloat16`). Losses and box decoding stay
    in float32 either way (the detectors cast their predictions up first)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_fast_bfloat16()


def move_to_device(obj: Any, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> Any:
    """Move tensors inside (nested) dicts / lists / tuples to `device`.

    Training batches are either an image tensor `(B, 3, H, W)` or a dict of cached
    backbone features {"c3", "c4", "c5"}; this lets the training loop ignore which.
    `dtype` (if given) is applied to floating point tensors only, so that integer
    tensors keep their type.
    """
    if torch.is_tensor(obj):
        non_blocking = obj.is_pinned() if obj.device.type == "cpu" else False
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return obj.to(device=device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, dtype) for v in obj)
    return obj


# ======================================================================================
# Data: transforms
# ======================================================================================

Window = Tuple[float, float, float, float]  # x0, y0, x1, y1 in original image pixels
_MEAN_255 = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)


def open_image(path: PathLike) -> Image.Image:
    """Open an image lazily (header only), with errors that name the file."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise RuntimeError(f"Cannot read image file {path}: {err}") from err


def render_image(image: Image.Image, window: Window, flip: bool, size: int, path: PathLike = "?") -> torch.Tensor:
    """Crop `window` from `image`, resize it to `(size, size)`, flip, normalise.

    This one function serves the training augmentation (random window and flip), the
    evaluation transform (window = the whole image, so nothing is cropped) and the
    feature cache (fixed windows), so all of them produce identical pixels for the same
    parameters.

    Returns: float32 tensor `(3, size, size)`, normalised with the ImageNet mean / std.
    """
    W, H = image.size
    x0, y0, x1, y1 = window
    # JPEG "draft" mode decodes at 1/2, 1/4 or 1/8 scale when that still leaves at
    # least `size` pixels across the window: several times faster for big images.
    need_w = math.ceil(W * size / max(x1 - x0, 1e-6))
    need_h = math.ceil(H * size / max(y1 - y0, 1e-6))
    try:
        if image.format == "JPEG":
            image.draft("RGB", (need_w, need_h))
        image = image.convert("RGB")  # forces decoding; truncated files fail here
    except (OSError, ValueError, SyntaxError) as err:
        raise RuntimeError(f"Cannot decode image file {path}: {err}") from err
    rx, ry = image.size[0] / W, image.size[1] / H
    box = (x0 * rx, y0 * ry, x1 * rx, y1 * ry)
    # PIL's resize with `box` crops and resizes in one (antialiased) pass.
    image = image.resize((size, size), resample=Image.BILINEAR, box=box)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    # NumPy rather than torch for this small per-image arithmetic: torch's intra-op
    # threads cost more than they save here (and a lot on a busy machine).
    pixels = (np.asarray(image, dtype=np.float32) - _MEAN_255) * _INV_STD_255
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def transform_boxes(
    boxes: torch.Tensor, window: Window, flip: bool, size: int, min_size: float = 1.0, min_visible: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map boxes `(N, 4)` (original pixels) through `render_image`'s geometry.

    Boxes are shifted by the window corner, scaled to the output size, clipped to the
    image and mirrored when flipped. Returns `(boxes (N, 4), keep (N,) bool)`, where a
    box is kept when its clipped width and height are at least `min_size` output pixels
    and at least `min_visible` of its area is inside the window.
    """
    x0, y0, x1, y1 = window
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    out = boxes.clone().float()
    out[:, 0::2] = (out[:, 0::2] - x0) * sx
    out[:, 1::2] = (out[:, 1::2] - y0) * sy
    full_area = (out[:, 2] - out[:, 0]).clamp(min=0) * (out[:, 3] - out[:, 1]).clamp(min=0)
    out = out.clamp(min=0, max=size)
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visible * full_area)
    if flip:
        out = torch.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], dim=1)
    return out, keep


def boxes_to_original(boxes: torch.Tensor, original_size: Tuple[int, int], image_size: int) -> torch.Tensor:
    """Inverse of the evaluation transform: `(N, 4)` boxes in the `image_size` square
    back to pixels of the original `(width, height)` image (no crop, so just a scale)."""
    W, H = original_size
    scale = boxes.new_tensor([W / image_size, H / image_size, W / image_size, H / image_size])
    return boxes[:, :4] * scale


def sample_train_window(
    width: int, height: int, min_scale: float, max_aspect_change: float = 4 / 3, generator: Optional[torch.Generator] = None
) -> Tuple[Window, bool]:
    """Random scale-jitter crop + horizontal flip, drawn from torch's RNG.

    The window side lengths are a fraction `s ~ U[min_scale, 1]` of the image sides,
    with a mild aspect-ratio change (log-uniform in [1/r, r]); its position is uniform.
    `min_scale >= 1` disables cropping (then only the flip is random).
    """
    u = torch.rand(5, generator=generator).tolist()
    flip = u[4] < 0.5
    if min_scale >= 1.0:
        return (0.0, 0.0, float(width), float(height)), flip
    s = min_scale + (1.0 - min_scale) * u[0]
    aspect = math.exp((2 * u[1] - 1) * math.log(max_aspect_change))
    fw, fh = min(1.0, s * math.sqrt(aspect)), min(1.0, s / math.sqrt(aspect))
    ww, wh = fw * width, fh * height
    x0, y0 = u[2] * (width - ww), u[3] * (height - wh)
    return (x0, y0, x0 + ww, y0 + wh), flip


def load_image_for_inference(path: PathLike, image_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Evaluation transform of one image file: `((3, S, S) tensor, (width, height))`."""
    image = open_image(path)
    size = image.size
    return render_image(image, (0.0, 0.0, float(size[0]), float(size[1])), False, image_size, path), size


# ======================================================================================
# Data: the dataset
# ======================================================================================


def _find_voc_root(dataset_dir: Path) -> Optional[Path]:
    """The folder holding Annotations/ and ImageSets/ (VOC2007), if any."""
    for cand in (dataset_dir / "VOCdevkit" / "VOC2007", dataset_dir / "VOC2007", dataset_dir):
        if (cand / "Annotations").is_dir() and (cand / "ImageSets" / "Main").is_dir():
            return cand
    return None


def parse_voc_xml(path: PathLike) -> Tuple[List[Dict[str, Any]], Optional[Tuple[int, int]]]:
    """Read one VOC annotation: `([{"name", "xyxy", "difficult"}, ...], (width, height))`."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"Annotation file not found: {path}") from None
    except ET.ParseError as err:
        raise RuntimeError(f"Corrupt annotation file {path}: {err}") from err
    try:
        size = None
        if root.find("size") is not None:
            size = (int(float(root.findtext("size/width"))), int(float(root.findtext("size/height"))))
        objects = []
        for obj in root.findall("object"):
            bb = obj.find("bndbox")
            objects.append(
                {
                    "name": obj.findtext("name").strip(),
                    "xyxy": [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
                    "difficult": bool(int(obj.findtext("difficult", default="0").strip() or 0)),
                }
            )
    except (AttributeError, TypeError, ValueError) as err:
        raise RuntimeError(f"Corrupt annotation file {path}: missing or bad field ({err})") from err
    return objects, size


class VOC2007DetectionTiny(Dataset):
    """PASCAL VOC 2007 detection, as the course uses it.

    Items are `(image_path, image, gt_boxes)`:
        image: float32 `(3, S, S)` with S = `image_size`, ImageNet-normalised.
        gt_boxes: `(max_num_instances, 5)` rows `x1, y1, x2, y2, class_id` in pixels of
            the `S x S` image, padded with rows of -1 (as the course does).

    Two annotation sources (`annotation_format="auto"` prefers the VOCdevkit layout when
    both exist, because it has the difficult flags that honest evaluation needs):
        "json": the course split files `voc07_{split}.json`, entries
            `[path, [{"name", "xyxy"}, ...]]` with paths prefixed `./here/` (relative to
            `dataset_dir`); they list non-difficult objects only.
        "voc": `VOCdevkit/VOC2007/{Annotations,ImageSets/Main/{split}.txt,JPEGImages}`.
            Difficult objects are kept in `get_annotation` (the evaluation ignores them)
            but are left out of `gt_boxes` unless `use_difficult=True`.

    Transforms (both stretch the whole image or a window of it to `S x S`):
        augment=True (default for train splits): scale-jitter crop (`min_scale`) and
            horizontal flip, drawn from torch's RNG.
        augment=False: the whole image, no crop, so no object is dropped or clipped
            (the course helper's centre crop did both). `boxes_to_original` maps
            predictions back to original image pixels.
    """

    def __init__(
        self,
        dataset_dir: PathLike,
        split: str = "train",
        download: bool = False,
        image_size: int = 224,
        max_num_instances: int = 40,
        augment: Optional[bool] = None,
        min_scale: float = 0.7,
        annotation_format: str = "auto",
        use_difficult: bool = False,
        validate: bool = True,
    ):
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.image_size = int(image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, not {image_size}")
        if not 0.0 < float(min_scale) <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], not {min_scale}")
        self.max_num_instances = max_num_instances
        self.augment = split.startswith("train") if augment is None else bool(augment)
        self.min_scale = float(min_scale)
        self.use_difficult = use_difficult

        if download:
            download_voc2007(self.dataset_dir)

        self.class_to_idx = {c: i for i, c in enumerate(VOC_CLASSES)}
        self.idx_to_class = {i: c for i, c in enumerate(VOC_CLASSES)}

        voc_root = _find_voc_root(self.dataset_dir)
        json_path = self.dataset_dir / f"voc07_{split}.json"
        fmt = annotation_format
        if fmt == "auto":
            if voc_root is not None and (voc_root / "ImageSets" / "Main" / f"{split}.txt").is_file():
                fmt = "voc"
            elif json_path.is_file():
                fmt = "json"
            else:
                raise FileNotFoundError(
                    f"No VOC2007 '{split}' split found in {self.dataset_dir}. Set VOC_ROOT (or pass "
                    f"dataset_dir) to a folder with the data, or use download=True.\n{EXPECTED_LAYOUT}"
                )
        if fmt not in ("voc", "json"):
            raise ValueError(f"annotation_format must be 'auto', 'voc' or 'json', not {annotation_format!r}")
        self.annotation_format = fmt

        # self.instances: [(image_path, [{"name", "xyxy", "difficult"}, ...]), ...]
        self._sizes: Dict[int, Tuple[int, int]] = {}
        if fmt == "json":
            self.instances = self._read_json(json_path)
        else:
            if voc_root is None:
                raise FileNotFoundError(f"No VOCdevkit layout in {self.dataset_dir}.\n{EXPECTED_LAYOUT}")
            self.instances = self._read_voc(voc_root, split)

        for path, objs in self.instances:
            for obj in objs:
                if obj["name"] not in self.class_to_idx:
                    raise RuntimeError(f"Unknown class {obj['name']!r} in the annotation of {path}")
        missing = [p for p, _ in self.instances if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"Image file not found: {missing[0]} ({len(missing)} of {plural(len(self.instances), 'image')} "
                f"of split '{split}' {'is' if len(missing) == 1 else 'are'} missing)"
            )
        self._warned_truncation = False
        self.validation_report: Dict[str, list] = {}
        if validate:
            self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        """One pass over the annotations, against each image's real size (its header).

        Ground-truth rules, the same for training and evaluation: a box is clipped to
        its image; a box with no area left (zero width or height, inverted corners, or
        entirely outside the image) is dropped. The image's own size is used everywhere
        (mapping predictions back included); an XML `<size>` that disagrees is reported.
        Everything fixed or dropped is listed in `self.validation_report` (file names)
        and summarised in one warning.
        """
        report: Dict[str, list] = {"clipped": [], "dropped": [], "size_mismatch": [], "unreadable": []}
        cleaned = []
        for i, (path, objs) in enumerate(self.instances):
            try:
                with open_image(path) as im:
                    W, H = im.size
            except (RuntimeError, OSError) as err:  # it fails, naming the file, when it is used
                report["unreadable"].append(f"{path} ({err})")
                self._sizes.pop(i, None)
                cleaned.append((path, objs))
                continue
            xml_size = self._sizes.get(i)
            if xml_size is not None and tuple(xml_size) != (W, H):
                report["size_mismatch"].append(f"{path} (annotation {xml_size[0]}x{xml_size[1]}, image {W}x{H})")
            self._sizes[i] = (W, H)
            kept = []
            for obj in objs:
                x1, y1, x2, y2 = obj["xyxy"]
                if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
                    report["dropped"].append(f"{path}: {obj['name']} {obj['xyxy']} (no area)")
                    continue
                c = [min(max(x1, 0.0), W), min(max(y1, 0.0), H), min(max(x2, 0.0), W), min(max(y2, 0.0), H)]
                if c[2] <= c[0] or c[3] <= c[1]:
                    report["dropped"].append(f"{path}: {obj['name']} {obj['xyxy']} (outside the {W}x{H} image)")
                    continue
                if c != [x1, y1, x2, y2]:
                    report["clipped"].append(f"{path}: {obj['name']} {obj['xyxy']} -> {c}")
                    obj = {**obj, "xyxy": c}
                kept.append(obj)
            cleaned.append((path, kept))
        self.instances = cleaned
        self.validation_report = report
        labels = {"clipped": "boxes clipped to their image", "dropped": "degenerate boxes dropped",
                  "size_mismatch": "annotation sizes differ from the image (the image's size is used)",
                  "unreadable": "images cannot be read (they fail when loaded)"}
        parts = []
        for name, entries in report.items():
            if entries:
                parts.append(f"{len(entries)} {labels[name]}: " + "; ".join(entries[:3]) + ("; ..." if len(entries) > 3 else ""))
        if parts:
            warnings.warn(f"VOC2007 '{self.split}' ({len(self.instances)} images) validation (details in "
                          "dataset.validation_report):\n  " + "\n  ".join(parts))

    # ---------------------------------------------------------------- annotation readers
    def _read_json(self, json_path: Path) -> List[Tuple[str, List[Dict[str, Any]]]]:
        try:
            with open(json_path) as f:
                entries = json.load(f)
        except json.JSONDecodeError as err:
            raise RuntimeError(f"Corrupt annotation file {json_path}: {err}") from err
        instances = []
        for entry in entries:
            try:
                path, objs = entry
                rel = path[len("./here/"):] if path.startswith("./here/") else path
                objs = [{"name": o["name"], "xyxy": [float(v) for v in o["xyxy"]], "difficult": False} for o in objs]
            except (KeyError, TypeError, ValueError) as err:
                raise RuntimeError(f"Corrupt annotation file {json_path}: bad entry {entry!r:.200}") from err
            instances.append((str(self.dataset_dir / rel), objs))
        return instances

    def _read_voc(self, voc_root: Path, split: str) -> List[Tuple[str, List[Dict[str, Any]]]]:
        split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"Split file not found: {split_file}\n{EXPECTED_LAYOUT}")
        ids = [line.strip().split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        instances = []
        for i, image_id in enumerate(ids):
            objs, size = parse_voc_xml(voc_root / "Annotations" / f"{image_id}.xml")
            if size is not None and size[0] > 0 and size[1] > 0:
                self._sizes[i] = size
            instances.append((str(voc_root / "JPEGImages" / f"{image_id}.jpg"), objs))
        return instances

    # ---------------------------------------------------------------- public helpers
    def __len__(self) -> int:
        return len(self.instances)

    def image_id(self, index: int) -> str:
        return Path(self.instances[index][0]).stem

    def original_size(self, index: int) -> Tuple[int, int]:
        """`(width, height)` of the original image, from its file header (validation
        reads it; with `validate=False` the XML's `<size>` is trusted)."""
        if index not in self._sizes:
            with open_image(self.instances[index][0]) as im:
                self._sizes[index] = im.size
        return self._sizes[index]

    def get_annotation(self, index: int) -> List[Tuple[str, List[float], bool]]:
        """All objects of an image in original pixels: `[(class_name, [x1, y1, x2, y2], difficult)]`."""
        return [(o["name"], list(o["xyxy"]), bool(o["difficult"])) for o in self.instances[index][1]]

    def boxes_to_original(self, boxes: torch.Tensor, index: int) -> torch.Tensor:
        """Map `(N, >=4)` boxes predicted on the evaluation transform of image `index`
        back to original image pixels `(N, 4)`."""
        return boxes_to_original(boxes, self.original_size(index), self.image_size)

    def eval_copy(self) -> "VOC2007DetectionTiny":
        """A shallow copy that uses the evaluation transform (no crop, no flip)."""
        other = copy.copy(self)
        other.augment = False
        return other

    @property
    def transform_signature(self) -> str:
        """Describes the pixel pipeline; part of the feature-cache key."""
        return (
            f"stretch-window-to-square;size={self.image_size};bilinear;jpeg-draft;imagenet-norm;"
            f"min_scale={self.min_scale};aspect=4/3;min_visible=0.25;difficult={self.use_difficult};v1"
        )

    # ---------------------------------------------------------------- items
    def __getitem__(self, index: int):
        path = self.instances[index][0]
        image = open_image(path)
        W, H = image.size
        if self.augment:
            window, flip = sample_train_window(W, H, self.min_scale)
        else:
            window, flip = (0.0, 0.0, float(W), float(H)), False
        return self._make_item(index, image, window, flip)

    def get_variant(self, index: int, variant: str, seed: int = 0):
        """Deterministic version of an item for the feature cache.

        variant: "orig" (evaluation transform), "flip" (its mirror image) or
            "jitter<k>" (a scale-jitter crop and flip drawn from a generator seeded with
            `(seed, index, k)`, so the same name always gives the same pixels).
        """
        path = self.instances[index][0]
        image = open_image(path)
        W, H = image.size
        full = (0.0, 0.0, float(W), float(H))
        if variant == "orig":
            window, flip = full, False
        elif variant == "flip":
            window, flip = full, True
        elif variant.startswith("jitter") and variant[6:].isdigit():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + index * 1009 + int(variant[6:])) % 2**62)
            window, flip = sample_train_window(W, H, min(self.min_scale, 0.999), generator=gen)
        else:
            raise ValueError(f"Unknown variant {variant!r}: use 'orig', 'flip' or 'jitter<k>'")
        return self._make_item(index, image, window, flip)

    def _make_item(self, index: int, image: Image.Image, window: Window, flip: bool):
        path, objs = self.instances[index]
        S = self.image_size
        pixels = render_image(image, window, flip, S, path)
        objs = [o for o in objs if self.use_difficult or not o["difficult"]]
        gt = torch.full((self.max_num_instances, 5), -1.0)
        if objs:
            boxes = torch.tensor([o["xyxy"] for o in objs], dtype=torch.float32)
            classes = torch.tensor([float(self.class_to_idx[o["name"]]) for o in objs])
            # Crops may cut objects; keep those with at least a quarter of them visible and
            # at least a pixel wide. The whole image (the evaluation transform, "orig",
            # "flip") keeps every validated box, as evaluation counts every one of them.
            is_crop = window != (0.0, 0.0, float(image.size[0]), float(image.size[1]))
            boxes, keep = transform_boxes(boxes, window, flip, S, min_size=1.0 if is_crop else 1e-6,
                                          min_visible=0.25 if is_crop else 0.0)
            rows = torch.cat([boxes, classes[:, None]], dim=1)[keep]
            if len(rows) > self.max_num_instances:
                if not self._warned_truncation:
                    warnings.warn(f"{path} has {len(rows)} objects; keeping the first {self.max_num_instances}")
                    self._warned_truncation = True
                rows = rows[: self.max_num_instances]
            gt[: len(rows)] = rows
        return path, pixels, gt


def infinite_loader(loader: Iterable) -> Iterator:
    """Get an infinite stream of batches from a data loader."""
    while True:
        yield from loader


def _unwrap_subset(dataset: Dataset) -> Tuple[Dataset, List[int]]:
    """For (nested) `Subset`s return the base dataset and the base index of each item."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _eval_view(dataset: Dataset) -> Dataset:
    """The same items with the evaluation transform (unwrapping / rewrapping Subsets)."""
    if isinstance(dataset, Subset):
        return Subset(_eval_view(dataset.dataset), dataset.indices)
    if getattr(dataset, "augment", False) and hasattr(dataset, "eval_copy"):
        return dataset.eval_copy()
    return dataset


# ======================================================================================
# Data: download
# ======================================================================================


def _md5(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Quick TCP check so that an offline machine fails in seconds, not minutes."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme == "file":
        return os.path.exists(urllib.request.url2pathname(parts.path))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_voc2007(dataset_dir: PathLike, resources: Optional[Dict[str, Any]] = None, timeout: float = 5.0) -> Path:
    """Download and extract VOC2007 trainval into `dataset_dir` (verifying the MD5).

    Does nothing when the VOCdevkit layout is already there. Without internet it fails
    fast with a message that says how to point the project at an offline copy.
    Returns the VOC2007 folder.
    """
    resources = resources or VOC2007_DOWNLOAD
    dataset_dir = Path(dataset_dir)
    existing = _find_voc_root(dataset_dir)
    if existing is not None:
        return existing
    dataset_dir.mkdir(parents=True, exist_ok=True)
    archive = dataset_dir / resources["filename"]
    if not (archive.is_file() and _md5(archive) == resources["md5"]):
        urls = [u for u in resources["urls"] if _reachable(u, timeout)]
        if not urls:
            raise RuntimeError(
                f"Cannot download PASCAL VOC2007: no network access to {', '.join(resources['urls'])}.\n"
                f"On a machine without internet, set VOC_ROOT (or pass dataset_dir / --data-dir) to a "
                f"folder that already holds the data, e.g. ../shared/data.\n{EXPECTED_LAYOUT}"
            )
        partial = archive.with_name(archive.name + ".part")
        last_error: Optional[Exception] = None
        for url in urls:
            try:
                h = hashlib.md5()
                with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    if not _use_bar():  # a log file gets one line, not thousands of bar updates
                        print(f"Downloading {archive.name} ({format_bytes(total) if total else 'size unknown'}) "
                              f"from {url} ...", flush=True)
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {archive.name}",
                              disable=not _use_bar()) as bar:
                        for block in iter(lambda: response.read(1 << 20), b""):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
                if h.hexdigest() != resources["md5"]:
                    partial.unlink(missing_ok=True)
                    raise RuntimeError(
                        f"Checksum mismatch for {archive.name} from {url}: MD5 {h.hexdigest()}, "
                        f"expected {resources['md5']}. The file was deleted; try again."
                    )
                os.replace(partial, archive)
                last_error = None
                break
            except (OSError, RuntimeError) as err:
                last_error = err
        if last_error is not None:
            raise last_error
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(dataset_dir, filter="data")  # refuses absolute / ../ paths
        except TypeError:  # Python < 3.10.12 has no `filter`
            tar.extractall(dataset_dir)
    root = _find_voc_root(dataset_dir)
    if root is None:
        raise RuntimeError(f"{archive} did not contain the VOCdevkit layout.\n{EXPECTED_LAYOUT}")
    return root


# ======================================================================================
# Training: samplers that make exact resume possible
# ======================================================================================


def _mix_seed(*numbers: int) -> int:
    """A well-spread 62-bit seed from several integers (seed, epoch, ...)."""
    digest = hashlib.sha256(":".join(str(int(n)) for n in numbers).encode()).hexdigest()
    return int(digest[:15], 16)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields `(index, item_seed)` pairs; the order is a pure function of (seed, epoch).

    * Shuffling uses a generator seeded from `(seed, epoch)`, never the global RNG, so a
      resumed run sees exactly the same batches as an uninterrupted one.
    * Every item also gets its own seed; `_SeededItems` runs the dataset's `__getitem__`
      with torch's RNG set to it, which makes the random augmentation independent of
      worker processes and of where training was interrupted.
    * Distributed training: the epoch's order is padded to a multiple of `world_size`
      and each rank takes every `world_size`-th element (like DistributedSampler).
    * `set_epoch(epoch, start)` skips the first `start` samples of that epoch (resume).
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(num_items / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> Tuple[List[int], List[int]]:
        """This rank's `(indices, item_seeds)` for `epoch`."""
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        perm = torch.randperm(self.num_items, generator=gen) if self.shuffle else torch.arange(self.num_items)
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=gen)
        total = self.num_samples * self.world_size
        if total > self.num_items:  # pad by wrapping around, as DistributedSampler does
            reps = math.ceil(total / self.num_items)
            perm, seeds = perm.repeat(reps)[:total], seeds.repeat(reps)[:total]
        return perm[self.rank :: self.world_size].tolist(), seeds[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices, seeds = self.order(self.epoch)
        start, self.start = self.start, 0
        return iter(list(zip(indices, seeds))[start:])

    def __len__(self) -> int:
        return self.num_samples


class _SeededItems(Dataset):
    """Wraps a dataset so that `ds[(index, seed)]` is `dataset[index]` computed with
    torch's RNG seeded by `seed` (and the caller's RNG state left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class _TrainStream:
    """Endless stream of training batches that can start at any iteration.

    Built from the loader given to `train_detector`: its dataset, batch size, collate
    function, workers and pin_memory are reused, but the order comes from a
    `ResumableSampler` (shuffled unless the loader used a SequentialSampler), so that
    resuming at iteration k fast-forwards to the right batch without loading images.
    A `CachedFeatureDataset` is read by indexing its stored tensors with whole batches
    (no per-item Python work, no worker processes).
    """

    def __init__(self, loader: DataLoader, seed: int, rank: int, world_size: int):
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
        self.drop_last = bool(loader.drop_last)
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        self.sampler = ResumableSampler(len(self.dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        n = len(self.sampler)
        self.batches_per_epoch = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if self.batches_per_epoch == 0:  # fewer items than one batch: keep the partial one
            self.drop_last, self.batches_per_epoch = False, 1
        base, self.base_indices = _unwrap_subset(self.dataset)
        self.cached = base if isinstance(base, CachedFeatureDataset) else None
        self._dl: Optional[DataLoader] = None

    def _image_loader(self) -> DataLoader:
        if self._dl is None:
            workers = self.loader.num_workers
            self._dl = DataLoader(
                _SeededItems(self.dataset),
                batch_size=self.batch_size,
                sampler=self.sampler,
                collate_fn=self.loader.collate_fn,
                num_workers=workers,
                pin_memory=self.loader.pin_memory,
                drop_last=self.drop_last,
                worker_init_fn=self.loader.worker_init_fn,
                persistent_workers=workers > 0,
                # A private generator: creating iterators must not consume global RNG.
                generator=torch.Generator().manual_seed(self.sampler.seed),
            )
        return self._dl

    def _epoch(self, epoch: int, first_batch: int) -> Iterator:
        if self.cached is not None:
            indices, seeds = self.sampler.order(epoch)
            B = self.batch_size
            for b in range(first_batch, self.batches_per_epoch):
                chunk = slice(b * B, (b + 1) * B)
                base = [self.base_indices[i] for i in indices[chunk]]
                variants = [s % self.cached.num_variants for s in seeds[chunk]]
                yield self.cached.get_batch(base, variants)
        else:
            self.sampler.set_epoch(epoch, start=first_batch * self.batch_size)
            yield from self._image_loader()

    def stream(self, start_iteration: int) -> Iterator:
        epoch, first = divmod(start_iteration, self.batches_per_epoch)
        while True:
            yield from self._epoch(epoch, first)
            epoch, first = epoch + 1, 0


# ======================================================================================
# Training: schedule, checkpoints, distributed helpers
# ======================================================================================


class WarmupLR(optim.lr_scheduler.LRScheduler):
    """Linear warm-up, then step decay (x0.1 at 60% and 90% of training) or cosine.

    The factor is a pure function of the iteration, so the scheduler's only state is
    `last_epoch` (= iterations done): resuming just restores that number.
    """

    def __init__(
        self,
        optimizer: optim.Optimizer,
        max_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 1e-3,
        schedule: str = "step",
        milestones: Sequence[float] = (0.6, 0.9),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ):
        if schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', not {schedule!r}")
        self.max_iters, self.warmup_iters, self.warmup_factor = max_iters, warmup_iters, warmup_factor
        self.schedule, self.gamma = schedule, gamma
        self.milestones = [int(m * max_iters) for m in milestones]
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, it: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(it >= m for m in self.milestones)
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iters) / max(self.max_iters, 1)))
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    def get_lr(self) -> List[float]:
        return [base * self.lr_factor(self.last_epoch) for base in self.base_lrs]


def _dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: Union[str, torch.device] = "auto") -> Tuple[int, int, torch.device]:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1).

    Backend: NCCL for CUDA, gloo for CPU. Each process uses GPU `LOCAL_RANK`.
    Returns `(rank, world_size, device)`; outside torchrun `(0, 1, device)`.
    """
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    rank, world = _dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world, device


def _rng_state() -> Dict[str, Any]:
    """All RNG states, in types that `torch.load(weights_only=True)` accepts (tensors,
    tuples, ints, floats, strings): NumPy's key array is stored as an int64 tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)  # old files: an ndarray
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


@contextlib.contextmanager
def _preserved_rng():
    """Run a block (e.g. validation) without disturbing the training RNG streams."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Atomic save: write a temporary file, then rename it over `path`, so an
    interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def _numpy_array_globals() -> List[Any]:
    """What unpickling a plain NumPy array refers to (NumPy 1 and 2 spell it differently)."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct] + [
        getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType")
        if hasattr(getattr(np, "dtypes", None), name)
    ]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot (or may not safely) be loaded; the message names it."""


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                    trusted: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by `train_detector` / the command line.

    Files are read with `torch.load(..., weights_only=True)`, which only rebuilds
    tensors and plain containers and never runs code from the file: checkpoints exchanged
    between students and instructors are safe to open. Everything `train_detector`
    stores (weights, optimizer, RNG states, history, config) is in those types.

    Plain NumPy arrays (the RNG state of earlier versions' checkpoints) are allowed too.
    A file that needs arbitrary unpickling (files made by other code, arbitrary objects)
    is refused with a `CheckpointError`, unless `trusted=True` says that you trust
    where it comes from (command line: `--trust-checkpoint`). An empty, truncated or
    non-checkpoint file also raises a `CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty (0 bytes): not a checkpoint (an interrupted copy "
                              "or a full disk?)")
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            # Checkpoints of earlier versions stored NumPy's RNG state as an ndarray: allow
            # plain NumPy arrays (no code runs to rebuild them), nothing else.
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by case
        with open(path, "rb") as f:
            head = f.read(2)
        looks_like_torch = zipfile.is_zipfile(path) or head[:1] == b"\x80"
        if not looks_like_torch:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({size} bytes, neither a torch zip "
                                  "archive nor a pickle): truncated, corrupt or another kind of file?") from err
        if not trusted:
            first = str(err).strip().splitlines()
            detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line),
                          first[0] if first else type(err).__name__)
            raise CheckpointError(
                f"Refusing to load {path}: it needs arbitrary unpickling, which can run any code stored in "
                f"the file ({detail.strip()[:300]}). Checkpoints written by this version load safely. If you "
                "trust where this file comes from, pass trusted=True (command line: --trust-checkpoint)."
            ) from err
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err2:
            raise CheckpointError(f"Cannot load checkpoint {path}: {type(err2).__name__}: {err2}") from err2
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected a dict with 'model', "
                              f"got {type(state).__name__}{' with keys ' + ', '.join(map(str, list(state)[:8])) if isinstance(state, dict) else ''})")
    return state


_NUMBERED_CHECKPOINT = re.compile(r"^ckpt_(\d+)\.pt$")


def numbered_checkpoints(checkpoint_dir: PathLike) -> List[Tuple[int, Path]]:
    """`[(iteration, path), ...]` of the kept `ckpt_<iteration>.pt` files, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NUMBERED_CHECKPOINT.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def load_resumable(last: PathLike, map_location: Union[str, torch.device] = "cpu", *, trusted: bool = False,
                   warn: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """`(path, checkpoint)` of `last` (a run's `last.pt`), or, when that file cannot be
    read (a bad copy, a disk fault), of the newest readable `ckpt_<iteration>.pt` beside
    it, with a warning that names both. Raises the error of `last` if none loads."""
    last = Path(last)
    try:
        return last, load_checkpoint(last, map_location=map_location, trusted=trusted)
    except CheckpointError as err:
        for _, candidate in reversed(numbered_checkpoints(last.parent)):
            try:
                ckpt = load_checkpoint(candidate, map_location=map_location, trusted=trusted)
            except CheckpointError:
                continue
            if warn:
                warnings.warn(f"{err}\nResuming from {candidate} instead.")
            return candidate, ckpt
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically (a hard link when the file system allows)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _nonfinite_entries(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _describe_images(paths: Any, limit: int = 8) -> str:
    """'a.jpg, b.jpg, ... (N images)' for the paths of a batch."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        names = [str(p) for p in paths]
    except TypeError:
        return "unknown images"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} images)" if len(names) > limit else "")
    return shown or "no image names"


def _rollback_after_nonfinite(checkpoint_dir: Path, bad_iteration: int, written: Sequence[int],
                              resumed_from: Optional[int]) -> Optional[Tuple[int, Path]]:
    """Point `last.pt` at the newest kept checkpoint from before `bad_iteration`.

    Only this run's checkpoints count: those it `written`, and those up to
    `resumed_from` when it resumed (files of an unrelated earlier run in the folder
    are left alone). Checkpoints at or after `bad_iteration` hold the state that
    produced the non-finite values (resuming them would fail again at the same batch):
    they are renamed `ckpt_<it>.nonfinite.pt` (kept for inspection, never chosen again).
    Returns `(iteration, path)` of the checkpoint now in `last.pt`, or None.
    """
    ours = [(i, p) for i, p in numbered_checkpoints(checkpoint_dir)
            if i in set(written) or (resumed_from is not None and i <= resumed_from)]
    for iteration, path in ours:
        if iteration >= bad_iteration:
            os.replace(path, path.with_name(f"ckpt_{iteration:07d}.nonfinite.pt"))
    good = [(i, p) for i, p in ours if i < bad_iteration]
    if not good:
        last = checkpoint_dir / "last.pt"
        if ours and last.is_file():  # the state that produced the NaN must not be resumed by default
            os.replace(last, checkpoint_dir / f"last.nonfinite_{bad_iteration:07d}.pt")
        return None
    iteration, path = good[-1]
    _link_or_copy(path, checkpoint_dir / "last.pt")
    return iteration, path


def _unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _new_history() -> Dict[str, list]:
    return {"iteration": [], "lr": [], "total_loss": [], "val": []}


def _loss_stats(history: Dict[str, list], terms: Sequence[str], window: int) -> Dict[str, float]:
    """Losses for the progress line: means over the last `window` iterations (one batch is
    noisy), 3 significant digits; loss terms lose their "loss_" prefix ("cls 0.51")."""
    stats = {"loss": float(f"{np.mean(history['total_loss'][-window:]):.3g}")}
    for key in terms:
        if history.get(key):
            stats[key.replace("loss_", "")] = float(f"{np.mean(history[key][-window:]):.3g}")
    return stats


# ======================================================================================
# Progress and messages: a bar on a terminal, periodic plain lines in a log file
# ======================================================================================

# Set by `main()`: messages then name command-line flags ("--no-amp") instead of Python
# arguments ("amp=False").
_CLI_ACTIVE = [False]


def _arg_name(python: str, flag: str) -> str:
    """`flag` when the command line is running, else the Python spelling `python`."""
    return flag if _CLI_ACTIVE[0] else python


# Python spellings in messages of fcos.py / two_stage_detector.py -> command-line flags.
_PYTHON_TO_FLAG = {"pretrained=False": "--no-pretrained", "backbone='mobilenet_v2'": "--backbone mobilenet_v2",
                   "freeze_backbone=True": "--frozen-backbone", "amp=False": "--no-amp"}


def _with_flags(err: Exception) -> Exception:
    """The same error, its message naming command-line flags instead of Python arguments."""
    text = str(err)
    for python, flag in _PYTHON_TO_FLAG.items():
        text = text.replace(python, flag)
    if text == str(err):
        return err
    new = type(err)(text) if isinstance(err, (RuntimeError, ValueError)) else RuntimeError(text)
    new.__cause__ = err
    return new


def plural(count: int, word: str, plural_form: Optional[str] = None) -> str:
    """`"1 detection"`, `"2 detections"` (`plural_form` for irregular words)."""
    return f"{count} {word if count == 1 else (plural_form or word + 's')}"


def format_bytes(size: float) -> str:
    """ "512 B", "3.4 MB", "1.9 GB" (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 999.5 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2g} {unit}" if size < 10 else f"{size:.0f} {unit}"
        size /= 1000.0
    return f"{size} TB"  # unreachable


def format_duration(seconds: float) -> str:
    """Short human duration: "45 s", "3.2 min", "1 h 05 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes:02d} min"


def _format_rate(rate: float, unit: str) -> str:
    if rate <= 0 or not math.isfinite(rate):
        return f"? {unit}/s"
    if rate >= 1:
        return f"{rate:.3g} {unit}/s"
    return f"{1 / rate:.3g} s/{unit}"


def _format_stat(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def machine_load() -> Optional[Tuple[float, int]]:
    """`(1-minute load average, number of CPUs)`, or None where the OS has no load average."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def _in_jupyter() -> bool:
    """True inside a Jupyter kernel (not merely when ipykernel is importable or imported)."""
    if "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except AttributeError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _use_bar() -> bool:
    """A progress bar only where carriage returns redraw in place: a terminal or Jupyter."""
    if _in_jupyter():
        return True
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_mode(progress: Union[bool, str], when_false: str = "off") -> str:
    """`progress` argument of the long functions -> "auto" | "bar" | "lines" | "off"."""
    if progress is True:
        return "auto"
    if progress is False or progress is None:
        return when_false
    if progress not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"progress must be True, False, 'auto', 'bar', 'lines' or 'off', not {progress!r}")
    return progress


class ProgressReporter:
    """Progress of one long phase (cache build, training, evaluation).

    On a terminal (or in Jupyter) it is a tqdm bar. Otherwise (output to a log file, or
    `mode="lines"`) it prints a plain line now and then, which `less` and `grep` read:

        train: iter 500/3500 (14%), loss 1.12, 9.8 it/s, ETA 5.1 min

    A line comes after at least `every` steps and `min_seconds` seconds (default
    `$A5_PROGRESS_SECONDS`, else 10) since the previous one, and at the first step;
    `close()` prints the phase's total time. Once the speed is known (after
    `announce_after` seconds) one line says how long the rest should take. When the speed
    drops, or the machine is busy (1-minute load average above the number of CPUs, see
    `machine_load`), the lines say so: that is the usual reason for a sudden long ETA.

    Args:
        total: number of steps of the phase (iterations, images).
        desc: the phase's name, the start of every line.
        count_format: how the count reads, with `{n}` and `{total}`, e.g. "iter {n}/{total}"
            or "{n}/{total} images".
        unit: the unit of the speed ("it" -> "9.8 it/s", below 1/s "1.6 s/it").
        noun: what a step is, for the expected-time line ("iteration", "image").
        mode: "auto" (bar on a terminal, else lines), "bar", "lines" or "off".
        initial: steps already done (a resumed run).
        clock, load: injectable time source and `machine_load` replacement (tests).
    """

    def __init__(self, total: int, desc: str, *, count_format: str = "{n}/{total}", unit: str = "it",
                 noun: str = "step", mode: str = "auto", initial: int = 0, every: int = 1,
                 min_seconds: Optional[float] = None,
                 announce_after: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 load: Callable[[], Optional[Tuple[float, int]]] = machine_load, stream: Optional[Any] = None):
        if mode == "auto":
            mode = "bar" if _use_bar() else "lines"
        self.mode, self.total, self.desc, self.unit = mode, int(total), desc, unit
        self.count_format, self.noun, self.every = count_format, noun, max(1, int(every))
        if min_seconds is None:
            min_seconds = float(os.environ.get("A5_PROGRESS_SECONDS", 10))
        self.min_seconds, self.announce_after = min_seconds, announce_after
        self.clock, self.load, self.stream = clock, load, stream
        self.initial = self.n = int(initial)
        self.stats: Dict[str, Any] = {}
        self.start = clock()
        self.samples: List[Tuple[float, int]] = []  # (time, n) after each update, for the recent speed
        self.last_line: Optional[Tuple[float, int]] = None
        self.best_rate = 0.0
        self.announced = False
        self.busy_noted = False
        self.closed = False
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, dynamic_ncols=True, unit=unit)

    # -- output -------------------------------------------------------------------------
    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=self.stream or sys.stdout, flush=True)

    # -- speed --------------------------------------------------------------------------
    def rate(self, window: float = 60.0) -> float:
        """Steps per second over the last `window` seconds (the first step, which pays
        for warm-up, is left out); 0.0 while unknown."""
        if len(self.samples) < 2:
            return 0.0
        t_now, n_now = self.samples[-1]
        old = next(((t, n) for t, n in self.samples if t_now - t <= window), self.samples[0])
        if old == self.samples[-1]:
            old = self.samples[-2]
        dt = t_now - old[0]
        return (n_now - old[1]) / dt if dt > 0 else 0.0

    def eta(self) -> Optional[float]:
        rate = self.rate()
        return (self.total - self.n) / rate if rate > 0 else None

    def slowdown_note(self) -> str:
        """Why it is slow, when that can be told: "" on an idle machine at full speed."""
        rate = self.rate()
        slowed = self.best_rate > 0 and 0 < rate < 0.6 * self.best_rate
        load = self.load() if self.load is not None else None
        busy = load is not None and load[0] > load[1]
        parts = []
        if slowed:
            parts.append(f"slower than the earlier {_format_rate(self.best_rate, self.unit)}")
        if busy:
            parts.append(f"machine busy: load average {load[0]:.1f} on {plural(load[1], 'CPU')}")
        return "; ".join(parts)

    # -- steps --------------------------------------------------------------------------
    def set_stats(self, **stats: Any) -> None:
        """Values shown with the progress, e.g. `loss=1.12`."""
        self.stats.update(stats)
        if self.bar is not None:
            self.bar.set_postfix({k: _format_stat(v) for k, v in self.stats.items()}, refresh=False)

    def line(self) -> str:
        """The plain progress line for the current state."""
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: " + self.count_format.format(n=self.n, total=self.total) + f" ({pct:.0f}%)"]
        parts += [f"{k} {_format_stat(v)}" for k, v in self.stats.items()]
        rate = self.rate()
        if rate > 0:
            parts.append(_format_rate(rate, self.unit))
            eta = self.eta()
            if eta is not None and self.n < self.total:
                parts.append(f"ETA {format_duration(eta)}")
        note = self.slowdown_note()
        return ", ".join(parts) + (f" ({note})" if note else "")

    def update(self, n: int = 1, **stats: Any) -> None:
        if stats:
            self.set_stats(**stats)
        self.n += n
        now = self.clock()
        self.samples.append((now, self.n))
        while len(self.samples) > 2 and now - self.samples[1][0] > 120.0:
            self.samples.pop(0)
        if self.bar is not None:
            self.bar.update(n)
        if self.mode == "off":
            return
        first = self.last_line is None
        due = (not first and self.n - self.last_line[1] >= self.every
               and now - self.last_line[0] >= self.min_seconds and self.n < self.total)
        if due or (first and self.n < self.total):
            rate = self.rate()
            if self.mode == "lines":
                self.write(self.line())
            elif not self.busy_noted:  # the bar shows the speed; say once why it is slow
                note = self.slowdown_note()
                if "busy" in note:
                    self.write(f"{self.desc}: {note}; it will run slower than on an idle machine")
                    self.busy_noted = True
            self.best_rate = max(self.best_rate, rate)
            self.last_line = (now, self.n)
        if (not self.announced and self.n < self.total and now - self.start >= self.announce_after
                and len(self.samples) >= 3):
            self.announced = True
            eta = self.eta()
            if eta is not None:
                finish = time.strftime("%H:%M", time.localtime(time.time() + eta))
                self.write(f"{self.desc}: {_format_rate(self.rate(), self.unit)}, so the remaining "
                           f"{plural(self.total - self.n, self.noun)} should take about {format_duration(eta)} "
                           f"(until about {finish})")

    def close(self) -> float:
        """End the phase; prints (lines mode) and returns its duration in seconds."""
        if self.closed:
            return self.clock() - self.start
        self.closed = True
        seconds = self.clock() - self.start
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            done = self.n - self.initial
            speed = f", {_format_rate(done / seconds, self.unit)}" if seconds > 0 and done > 0 else ""
            stats = "".join(f", {k} {_format_stat(v)}" for k, v in self.stats.items())
            state = "done in" if self.n >= self.total else "stopped after"
            self.write(f"{self.desc}: " + self.count_format.format(n=self.n, total=self.total)
                       + f" {state} {format_duration(seconds)}{speed}{stats}")
        return seconds

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None and not self.closed:
            self.bar.close()
            self.closed = True


# ======================================================================================
# Training: the loop
# ======================================================================================


def train_detector(
    detector: nn.Module,
    train_loader: Iterable,
    learning_rate: float = 5e-3,
    weight_decay: float = 1e-4,
    max_iters: int = 5000,
    log_period: int = 20,
    device: Union[str, torch.device] = "cpu",
    *,
    momentum: float = 0.9,
    lr_schedule: str = "step",
    warmup_iters: Optional[int] = None,
    warmup_factor: float = 1e-3,
    grad_clip: Optional[float] = 10.0,
    amp: Optional[bool] = None,
    amp_dtype: Optional[torch.dtype] = None,
    checkpoint_dir: Optional[PathLike] = None,
    checkpoint_period: int = 500,
    resume: Union[bool, PathLike] = False,
    seed: Optional[int] = None,
    progress: Union[bool, str] = True,
    val_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
    val_period: Optional[int] = None,
    model_config: Optional[Dict[str, Any]] = None,
    keep_checkpoints: int = 3,
    skip_nonfinite: int = 0,
    trust_checkpoint: bool = False,
) -> Dict[str, list]:
    """Train the detector with SGD (momentum 0.9) and return the loss history.

    Schedule: linear warm-up over `warmup_iters` (default min(500, max_iters // 10))
    from `warmup_factor * learning_rate`, then step decay x0.1 at 60% and 90% of
    `max_iters` ("step", the course's schedule) or cosine decay ("cosine").

    Args:
        detector: in training mode `detector(images_or_feats, gt_boxes)` returns a dict
            of scalar losses (keys without "loss" are ignored, as in the course).
        train_loader: a DataLoader of `(image_paths, images, gt_boxes)` batches, where
            `images` is `(B, 3, H, W)` or a dict of cached features {"c3","c4","c5"}.
            Its dataset, batch size, collate function and workers are used with a
            resumable, seeded order (see `ResumableSampler`); any other iterable is
            consumed as is (then resuming is not exact).
        grad_clip: max total gradient norm (None disables clipping).
        amp: automatic mixed precision; default `default_amp(device)`: on for CUDA,
            and on CPUs with hardware bfloat16 (AMX / AVX512-BF16), off otherwise.
        amp_dtype: autocast dtype; default `autocast_dtype(device)`: float16 (with a
            GradScaler) on CUDA, bfloat16 on CPU.
        checkpoint_dir: where `ckpt_<iteration>.pt` is written every
            `checkpoint_period` iterations and at the end (atomically), and `last.pt`
            made the same file. It holds model, optimizer, scheduler, scaler,
            iteration, seed, RNG states, history and `model_config`, all loadable with
            `weights_only=True`. A state with non-finite weights is never saved.
        keep_checkpoints: how many `ckpt_<iteration>.pt` to keep (>= 1, newest first);
            the older ones let a non-finite loss roll back past the bad state.
        resume: True resumes from `checkpoint_dir/last.pt` if it exists; a path resumes
            from that file. On CPU with a fixed seed the resumed run logs exactly the
            same losses as an uninterrupted one.
        skip_nonfinite: how many batches whose loss or gradient is NaN / infinite may
            be skipped (no update; named in a warning and in `history["skipped"]`)
            before training stops with FloatingPointError. Default 0: stop at the first.
        trust_checkpoint: allow resuming from a file that needs arbitrary unpickling
            (see `load_checkpoint`).
        seed: seeds the data order and augmentation; default: drawn from torch's RNG
            (so `reset_seed(n)` beforehand makes training reproducible).
        progress: True: a progress bar on a terminal (or in Jupyter), else a plain line
            every `log_period` iterations and at most every $A5_PROGRESS_SECONDS (10)
            seconds, with the mean loss, speed and ETA (`ProgressReporter`); False: those
            plain lines always; "off": nothing.
        val_fn: `val_fn(detector) -> dict of metrics`, run (on rank 0) every
            `val_period` iterations (if given) and at the end, with the training RNG
            state preserved; results are stored in `history["val"]`.

    Returns:
        history: dict of per-iteration lists: "iteration", "lr", "total_loss" and one
            list per loss term, plus "val" (list of dicts).

    Raises:
        FloatingPointError: when a loss or gradient becomes NaN or infinite (after
            `skip_nonfinite` skipped batches). The message names the iteration and the
            batch's images. Nothing is saved at that point: `last.pt` is rolled back to
            the newest kept checkpoint from *before* that iteration (a later one, or the
            state just before the bad batch, would fail again at the same batch), so
            `resume=True` with a lower learning rate or stronger clipping continues from a
            good state. Checkpoints from that iteration on become `ckpt_<it>.nonfinite.pt`.

    Under `torchrun` (WORLD_SIZE > 1) the detector is wrapped in
    DistributedDataParallel (gloo on CPU, NCCL on GPU), each rank reads its own shard
    of every epoch, losses are averaged across ranks for logging, and only rank 0
    prints, saves checkpoints and runs `val_fn`.
    """
    if int(keep_checkpoints) < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, not {keep_checkpoints}")
    if int(skip_nonfinite) < 0:
        raise ValueError(f"skip_nonfinite must be >= 0, not {skip_nonfinite}")
    for name, value in (("max_iters", max_iters), ("log_period", log_period), ("checkpoint_period", checkpoint_period)):
        if int(value) < (0 if name == "max_iters" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'max_iters' else '>= 1'}, not {value}")
    rank, world, device = init_distributed(device)
    detector.to(device)
    model: nn.Module = detector
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            detector, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if warmup_iters is None:
        warmup_iters = min(500, max_iters // 10)
    scheduler = WarmupLR(optimizer, max_iters, warmup_iters, warmup_factor, lr_schedule)

    use_amp = default_amp(device) if amp is None else bool(amp)
    if amp_dtype is None:
        amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    if use_amp and rank == 0:
        print(f"Mixed precision: {str(amp_dtype).replace('torch.', '')} autocast on {device.type} "
              f"(losses in float32; {_arg_name('amp=False', '--no-amp')} turns it off).")

    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    history = _new_history()
    start_iter = 0
    restored_rng = None
    resume_path: Optional[Path] = None
    if resume:
        resume_path = Path(resume) if not isinstance(resume, bool) else ckpt_path
        if resume_path is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint path as resume=...)")
        if not resume_path.is_file():
            if rank == 0:
                print(f"No checkpoint at {resume_path}; starting from scratch.")
            resume_path = None
    if resume_path is not None:
        if isinstance(resume, bool):  # last.pt, or the newest readable ckpt_*.pt if it is damaged
            resume_path, ckpt = load_resumable(resume_path, map_location=device, trusted=trust_checkpoint,
                                               warn=rank == 0)
        else:  # an explicitly named file is never replaced by another
            ckpt = load_checkpoint(resume_path, map_location=device, trusted=trust_checkpoint)
        detector.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt.get("scaler") or {})
        start_iter = int(ckpt["iteration"])
        # The schedule is a function of the iteration: set the learning rate of
        # iteration `start_iter` directly (calling scheduler.step() here would warn).
        scheduler.last_epoch = start_iter
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * scheduler.lr_factor(start_iter)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        seed = int(ckpt["seed"])
        history = ckpt.get("history") or history
        rngs = ckpt.get("rng_per_rank") or [ckpt.get("rng")]
        restored_rng = rngs[rank] if rank < len(rngs) else rngs[0]
        if model_config is None:
            model_config = ckpt.get("config")
        if rank == 0:
            print(f"Resumed from {resume_path} at iteration {start_iter}.")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if world > 1:  # every rank must use rank 0's seed for the shared data order
        seed_t = torch.tensor([seed], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(seed_t, src=0)
        seed = int(seed_t.item())

    if isinstance(train_loader, DataLoader) and not isinstance(train_loader.dataset, torch.utils.data.IterableDataset):
        batches = _TrainStream(train_loader, seed, rank, world).stream(start_iter)
    else:
        if resume_path is not None and rank == 0:
            warnings.warn("train_loader is not a DataLoader: resuming cannot restore the data order exactly")
        batches = infinite_loader(train_loader)
    if restored_rng is not None:
        _set_rng_state(restored_rng)

    def make_state(iteration: int, rng: Dict[str, Any]) -> Dict[str, Any]:
        rng_all = [rng]
        if world > 1:  # exact resume needs every rank's RNG state
            rng_all = [None] * world
            dist.all_gather_object(rng_all, rng)
        return {
            "format": "a5_helper.checkpoint/1",
            "model": detector.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
            "max_iters": max_iters,
            "seed": seed,
            "rng": rng_all[0],
            "rng_per_rank": rng_all,
            "history": history,
            "config": model_config,
        }

    def save(iteration: int, rng: Dict[str, Any]) -> None:
        state = make_state(iteration, rng)  # collective under DDP: all ranks call it
        if rank == 0 and ckpt_path is not None:
            bad = _nonfinite_entries(state["model"])
            if bad:  # never replace a good state with a bad one
                warnings.warn(f"Not saving the checkpoint of iteration {iteration}: non-finite values in "
                              f"{', '.join(bad[:5])}; {ckpt_path} keeps the last good state.")
                return
            numbered = ckpt_path.parent / f"ckpt_{iteration:07d}.pt"
            save_checkpoint(state, numbered)
            written.append(iteration)
            _link_or_copy(numbered, ckpt_path)
            for _, old_path in numbered_checkpoints(ckpt_path.parent)[:-int(keep_checkpoints)]:
                old_path.unlink(missing_ok=True)

    skipped = history.setdefault("skipped", [])
    written: List[int] = []  # iterations of the checkpoints this call saved
    model.train()
    bar = ProgressReporter(max_iters, "train", count_format="iter {n}/{total}", noun="iteration", initial=start_iter,
                           every=log_period, mode=_progress_mode(progress, "lines") if rank == 0 else "off")
    for it in range(start_iter, max_iters):
        paths, images, gt_boxes = next(batches)
        images = move_to_device(images, device)
        gt_boxes = gt_boxes.to(device)

        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = model(images, gt_boxes)
        # Ignore keys like "proposals" that some detectors return next to the losses.
        losses = {k: v for k, v in losses.items() if "loss" in k}
        total_loss = sum(losses.values())

        # One sync per iteration: the NaN guard and the log need the values anyway.
        values = torch.stack([total_loss.detach().float()] + [v.detach().float() for v in losses.values()])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        values = values.tolist()
        problem = None
        if not all(math.isfinite(v) for v in values):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values[1:]))
            problem = f"Non-finite loss at iteration {it}: total={values[0]:.4g} ({terms})"

        optimizer.zero_grad(set_to_none=True)
        if problem is None:
            scaler.scale(total_loss).backward()
            if grad_clip is not None or not scaler.is_enabled():
                scaler.unscale_(optimizer)
                # max_norm=inf only measures; the fp16 GradScaler skips inf steps by itself.
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
                if not scaler.is_enabled() and not math.isfinite(float(norm)):
                    problem = f"Non-finite gradient norm ({float(norm):.4g}) at iteration {it}"
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            images_text = _describe_images(paths)
            if len(skipped) < int(skip_nonfinite):
                skipped.append({"iteration": it, "images": [str(p) for p in paths] if not isinstance(paths, str) else [paths]})
                if rank == 0:
                    warnings.warn(f"{problem}; skipped the batch of images {images_text} "
                                  f"({len(skipped)} of at most {skip_nonfinite} skips).")
                scheduler.step()
                bar.update(1)
                done = it + 1
                if ckpt_path is not None and (done % checkpoint_period == 0 or done == max_iters):
                    save(done, _rng_state())
                continue
            where = "no checkpoint_dir was given, nothing saved"
            if ckpt_path is not None:
                rolled = None
                if rank == 0:
                    rolled = _rollback_after_nonfinite(ckpt_path.parent, it, written,
                                                       start_iter if resume_path is not None else None)
                if rolled is not None:
                    where = (f"{ckpt_path} now holds the last good checkpoint, iteration {rolled[0]} ({rolled[1].name}); "
                             "nothing was overwritten")
                else:
                    where = (f"there is no good checkpoint from before iteration {it} in {ckpt_path.parent}, so "
                             "nothing was saved (the state just before this batch would fail again at it)")
            bar.close()
            raise FloatingPointError(
                f"{problem}, batch images: {images_text}; {where}. Resume with a lower learning rate or stronger "
                "gradient clipping, or skip such batches with skip_nonfinite=N (command line: --skip-nonfinite N)."
            )
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        history["iteration"].append(it)
        history["lr"].append(lr)
        history["total_loss"].append(values[0])
        for key, value in zip(losses, values[1:]):
            history.setdefault(key, []).append(value)

        if it % log_period == 0 or it == max_iters - 1:
            bar.set_stats(**_loss_stats(history, list(losses), log_period), lr=float(f"{lr:.3g}"))
        bar.update(1)

        done = it + 1
        if val_fn is not None and ((val_period and done % val_period == 0) or done == max_iters):
            if rank == 0:
                with _preserved_rng():
                    metrics = val_fn(detector)
                history["val"].append({"iteration": done, **metrics})
                bar.write(f"train: iter {done}, validation: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            if world > 1:
                dist.barrier()
            model.train()
        if ckpt_path is not None and (done % checkpoint_period == 0 or done == max_iters):
            save(done, _rng_state())
    bar.close()
    if world > 1:
        dist.barrier()
    return history


# ======================================================================================
# Frozen backbone + feature cache
# ======================================================================================

FEATURE_LEVELS = ("c3", "c4", "c5")
_CACHE_VERSION = 2  # 2: image content hashes in the key, per-file checksums
_CACHE_FILES = tuple(f"{level}.npy" for level in FEATURE_LEVELS) + ("gt_boxes.npy",)


def _file_crc32(path: Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _image_fingerprints(paths: Sequence[str], previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`{path: [size, mtime_ns, sha1 of the content]}` for the image files.

    Fast path: a file whose size and modification time match `previous` keeps its
    recorded hash; any other file is read and hashed, so an image replaced under the
    same name changes the cache key even when its size is the same."""
    previous = previous or {}
    result: Dict[str, Any] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result[path] = None  # not a file (a synthetic dataset): the key covers its description only
            continue
        old = previous.get(path)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            result[path] = list(old)
            continue
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        result[path] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return result


def _check_cache_files(cache_path: Path, checksums: Dict[str, Any]) -> Optional[str]:
    """None if every cache file has its recorded size and checksum, else what is wrong
    (naming the file)."""
    if not checksums:
        return f"{cache_path / 'meta.json'} records no checksums"
    for name in _CACHE_FILES:
        path = cache_path / name
        want = checksums.get(name) or {}
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path} has {size} bytes, expected {want.get('size')} (truncated or overwritten)"
        if _file_crc32(path) != want.get("crc32"):
            return f"{path} does not match its checksum (corrupt)"
    return None


def _backbone_of(module: nn.Module) -> nn.Module:
    """The DetectorBackboneWithFPN of a detector (or the module itself)."""
    if hasattr(module, "extract_features"):
        return module
    inner = getattr(module, "backbone", None)
    if inner is not None and hasattr(inner, "extract_features"):
        return inner
    raise TypeError("expected a DetectorBackboneWithFPN (with extract_features) or a detector with .backbone")


def backbone_state_hash(backbone: nn.Module) -> str:
    """SHA-1 of the feature extractor's weights and buffers (FPN layers excluded)."""
    h = hashlib.sha1()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.startswith("fpn_params."):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _VariantView(Dataset):
    """Item `j` is variant `j % V` of image `j // V` (for building the cache)."""

    def __init__(self, dataset: Dataset, base_indices: List[int], variants: Sequence[str], seed: int):
        self.dataset, self.base_indices, self.variants, self.seed = dataset, base_indices, list(variants), seed

    def __len__(self) -> int:
        return len(self.base_indices) * len(self.variants)

    def __getitem__(self, j: int):
        i, v = divmod(j, len(self.variants))
        _, image, gt = self.dataset.get_variant(self.base_indices[i], self.variants[v], seed=self.seed)
        return image, gt


class CachedFeatureDataset(Dataset):
    """Backbone features computed once per image and augmentation variant.

    Storage: for each level in {"c3", "c4", "c5"} one array `(N * V, C, H, W)` (fp16 by
    default; a torch tensor in memory or a NumPy memmap on disk), where row `i * V + v`
    is variant `v` of image `i`; `gt_boxes` `(N * V, 40, 5)` holds the boxes transformed
    like that variant (flipped for "flip").

    Items are `(image_path, {"c3","c4","c5"} float32 tensors, gt_boxes)`, with a random
    variant per access; `collate_fn` stacks them into a batch. `train_detector` reads
    whole batches with `get_batch` instead (one tensor gather per level).
    """

    def __init__(
        self,
        features: Dict[str, Union[torch.Tensor, np.ndarray]],
        gt_boxes: torch.Tensor,
        image_paths: List[str],
        variants: Sequence[str],
        meta: Optional[Dict[str, Any]] = None,
    ):
        self.features = features
        self.gt_boxes = gt_boxes
        self.image_paths = list(image_paths)
        self.variants = list(variants)
        self.num_variants = len(self.variants)
        self.meta = meta or {}
        c3 = features["c3"]
        self.image_size = (8 * c3.shape[-2], 8 * c3.shape[-1])

    def __len__(self) -> int:
        return len(self.image_paths)

    def _rows(self, level: str, rows: torch.Tensor) -> torch.Tensor:
        store = self.features[level]
        if isinstance(store, np.ndarray):  # memmap on disk: NumPy fancy indexing copies
            return torch.from_numpy(np.ascontiguousarray(store[rows.numpy()])).float()
        return store.index_select(0, rows).float()

    def get_batch(self, indices: Sequence[int], variant_ids: Sequence[int]) -> Tuple[List[str], TensorDict, torch.Tensor]:
        """A whole batch: `(paths, {"c3": (B, C3, H3, W3), ...} float32, gt (B, 40, 5))`."""
        rows = torch.as_tensor(indices, dtype=torch.long) * self.num_variants + torch.as_tensor(variant_ids, dtype=torch.long)
        feats = {k: self._rows(k, rows) for k in FEATURE_LEVELS}
        return [self.image_paths[i] for i in indices], feats, self.gt_boxes.index_select(0, rows)

    def get_variant(self, index: int, variant_id: int):
        paths, feats, gt = self.get_batch([index], [variant_id])
        return paths[0], {k: v[0] for k, v in feats.items()}, gt[0]

    def __getitem__(self, index: int):
        variant_id = int(torch.randint(self.num_variants, (1,)).item())
        return self.get_variant(index, variant_id)

    @staticmethod
    def collate_fn(items: List[Tuple[str, TensorDict, torch.Tensor]]):
        """Stack a list of items: `(paths, dict of (B, ...) tensors, (B, 40, 5))`."""
        paths = [it[0] for it in items]
        feats = {k: torch.stack([it[1][k] for it in items]) for k in items[0][1]}
        return paths, feats, torch.stack([it[2] for it in items])


collate_cached = CachedFeatureDataset.collate_fn


def _cache_key(backbone: nn.Module, dataset: Dataset, base_indices: List[int], variants: Sequence[str],
               storage_dtype: torch.dtype, seed: int, fingerprints: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    items = [getattr(dataset, "instances", [None] * (max(base_indices) + 1))[i] for i in base_indices]
    items_hash = hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    contents = [fp[2] if fp else None for fp in (fingerprints or {}).values()]
    return {
        "content_hash": hashlib.sha1(json.dumps(contents).encode()).hexdigest(),
        "version": _CACHE_VERSION,
        "backbone_name": str(getattr(backbone, "backbone_name", type(backbone).__name__)),
        "weights_name": str(getattr(backbone, "weights_name", "unknown")),
        "weights_hash": backbone_state_hash(backbone),
        "image_size": int(getattr(dataset, "image_size", 0)),
        "transform": str(getattr(dataset, "transform_signature", type(dataset).__name__)),
        "variants": list(variants),
        "variant_seed": seed,
        "storage_dtype": str(storage_dtype),
        "num_images": len(base_indices),
        "items_hash": items_hash,
    }


def build_feature_cache(
    backbone: nn.Module,
    dataset: Dataset,
    variants: Sequence[str] = ("orig", "flip"),
    cache_dir: Optional[PathLike] = None,
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
    storage_dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    progress: Union[bool, str] = True,
    on_mismatch: str = "rebuild",
    seed: int = 0,
) -> CachedFeatureDataset:
    """Run the frozen backbone once over every training image and variant.

    Args:
        backbone: a DetectorBackboneWithFPN built with `freeze_backbone=True` (or a
            detector whose `.backbone` is one); its `extract_features(images)` gives
            {"c3", "c4", "c5"}.
        dataset: a `VOC2007DetectionTiny` (or a Subset of one); its `get_variant`
            renders "orig", "flip" and "jitter<k>" deterministically.
        variants: which versions of each image to store. A training step picks one at
            random per image, like the random flip / crop of image training.
        cache_dir: None keeps the cache in memory; a folder stores one `.npy` memmap
            per level plus `gt_boxes.npy` and `meta.json`, reused by later runs when the
            key matches. The key covers backbone name, weights name, a hash of the
            backbone weights, image size, transform, variants, storage dtype and the
            list of images with a hash of each image file's content (re-read only when a
            file's size or modification time changed), so an image replaced under the
            same name is noticed. `meta.json` records each cache file's size and CRC32,
            checked on every load. A mismatched, incomplete, truncated or corrupt cache
            is named and rebuilt (`on_mismatch="rebuild"`) or refused
            (`on_mismatch="error"`), never reused.
        storage_dtype: torch.float16 (default, half the memory) or torch.float32.
        progress: True: a bar on a terminal, plain lines in a log (`ProgressReporter`);
            "lines": plain lines always; False / "off": silent.

    Returns: a CachedFeatureDataset.
    """
    fpn_backbone = _backbone_of(backbone)
    inner = getattr(fpn_backbone, "backbone", None)
    if inner is not None and any(p.requires_grad for p in inner.parameters()):
        raise ValueError(
            "build_feature_cache needs a frozen backbone (build the detector with "
            f"{_arg_name('freeze_backbone=True', '--frozen-backbone')}): "
            "features of a backbone that trains would go stale after the first step."
        )
    if storage_dtype not in (torch.float16, torch.float32):
        raise ValueError("storage_dtype must be torch.float16 or torch.float32")
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError("on_mismatch must be 'rebuild' or 'error'")
    base, base_indices = _unwrap_subset(dataset)
    if not hasattr(base, "get_variant"):
        raise TypeError("dataset must provide get_variant(index, variant) (VOC2007DetectionTiny does)")
    variants = list(variants)
    if not variants:
        raise ValueError("variants must name at least one of 'orig', 'flip', 'jitter<k>'")
    N, V = len(base_indices), len(variants)
    paths = [base.instances[i][0] for i in base_indices] if hasattr(base, "instances") else [str(i) for i in base_indices]
    np_dtype = np.float16 if storage_dtype == torch.float16 else np.float32

    cache_path = Path(cache_dir) if cache_dir is not None else None
    meta: Dict[str, Any] = {}
    if cache_path is not None and (cache_path / "meta.json").is_file():
        try:
            meta = json.loads((cache_path / "meta.json").read_text())
        except json.JSONDecodeError:
            meta = {"corrupt": True}
    # Content hashes matter only for a cache on disk, which a later run may reuse.
    fingerprints = _image_fingerprints(paths, meta.get("files")) if cache_path is not None else {}
    key = _cache_key(fpn_backbone, base, base_indices, variants, storage_dtype, seed, fingerprints)
    if cache_path is not None and (cache_path / "meta.json").is_file():
        problem = None
        if meta.get("corrupt"):
            problem = f"{cache_path / 'meta.json'} is not valid JSON (corrupt)"
        elif meta.get("complete") and meta.get("key") == key:
            problem = _check_cache_files(cache_path, meta.get("checksums") or {})
            if problem is None:
                try:
                    feats = {k: np.load(cache_path / f"{k}.npy", mmap_mode="r") for k in FEATURE_LEVELS}
                    gt = torch.from_numpy(np.load(cache_path / "gt_boxes.npy"))
                except (ValueError, OSError, EOFError) as err:
                    problem = f"a file under {cache_path} cannot be read ({err})"
                else:
                    if meta.get("files") != fingerprints:  # same contents, new mtimes: refresh the fast path
                        meta["files"] = fingerprints
                        tmp = cache_path / "meta.json.tmp"
                        tmp.write_text(json.dumps(meta, indent=1))
                        os.replace(tmp, cache_path / "meta.json")
                    if _progress_mode(progress) != "off":
                        size = sum(feats[k].nbytes for k in FEATURE_LEVELS)
                        print(f"Loaded feature cache from {cache_path} ({plural(N, 'image')} x {plural(V, 'variant')}, "
                              f"{format_bytes(size)}); it was built by an earlier run.")
                    return CachedFeatureDataset(feats, gt, paths, variants, meta)
        if problem is not None:
            message = f"Feature cache at {cache_path} is damaged: {problem}"
        else:
            old = meta.get("key") or {}
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            reason = "it is incomplete" if not meta.get("complete") else f"it differs in {', '.join(diff)}"
            if "content_hash" in diff and isinstance(meta.get("files"), dict):
                changed = [p for p, fp in fingerprints.items() if fp and (meta["files"].get(p) or [None] * 3)[2] != fp[2]]
                if changed:
                    reason += f"; changed images: {', '.join(changed[:5])}" + (" ..." if len(changed) > 5 else "")
            message = f"Feature cache at {cache_path} does not match this backbone/dataset ({reason})"
        if on_mismatch == "error":
            raise RuntimeError(message + f"; delete it or choose another {_arg_name('cache_dir', '--cache-dir')}.")
        print(message + "; rebuilding it.")
    if cache_path is not None:
        cache_path.mkdir(parents=True, exist_ok=True)
        (cache_path / "meta.json").unlink(missing_ok=True)  # incomplete until the end

    device = resolve_device(device)
    was_training = fpn_backbone.training
    fpn_backbone.to(device).eval()
    view = _VariantView(base, base_indices, variants, seed)
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    store: Dict[str, Union[torch.Tensor, np.ndarray]] = {}
    gt_all = torch.full((N * V, getattr(base, "max_num_instances", 40), 5), -1.0)
    row = 0
    bar = ProgressReporter(N * V, "caching backbone features", count_format="{n}/{total} images", unit="img",
                           noun="image", mode=_progress_mode(progress))
    with torch.no_grad(), bar:
        for images, gt in loader:
            feats = fpn_backbone.extract_features(images.to(device))
            for level in FEATURE_LEVELS:
                f = feats[level].detach().to("cpu", storage_dtype)
                if level not in store:
                    shape = (N * V,) + tuple(f.shape[1:])
                    if cache_path is not None:
                        store[level] = np.lib.format.open_memmap(cache_path / f"{level}.npy", mode="w+",
                                                                 dtype=np_dtype, shape=shape)
                    else:
                        store[level] = torch.empty(shape, dtype=storage_dtype)
                if cache_path is not None:
                    store[level][row : row + len(f)] = f.numpy()
                else:
                    store[level][row : row + len(f)] = f
            gt_all[row : row + len(gt), : gt.shape[1]] = gt
            row += len(images)
            bar.update(len(images))
        bar.close()
    fpn_backbone.train(was_training)
    meta = {"key": key, "complete": True, "shapes": {k: list(v.shape) for k, v in store.items()}}
    if cache_path is not None:
        for level in FEATURE_LEVELS:
            store[level].flush()
        np.save(cache_path / "gt_boxes.npy", gt_all.numpy())
        meta["files"] = fingerprints
        meta["checksums"] = {name: {"size": (cache_path / name).stat().st_size, "crc32": _file_crc32(cache_path / name)}
                             for name in _CACHE_FILES}
        tmp = cache_path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, cache_path / "meta.json")
        store = {k: np.load(cache_path / f"{k}.npy", mmap_mode="r") for k in FEATURE_LEVELS}
    return CachedFeatureDataset(store, gt_all, paths, variants, meta)


# ======================================================================================
# Evaluation: PASCAL VOC mAP (devkit rules) and the COCO cross-check
# ======================================================================================

GroundTruths = Dict[str, List[Tuple[str, Sequence[float], bool]]]
Detections = List[Tuple[str, str, float, Sequence[float]]]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False,
           exact_tenths: bool = False) -> float:
    """Average precision from a precision/recall curve (detections sorted by score).

    use_07_metric=True: VOC2007's 11-point interpolation, the mean over recall
        thresholds t of the best precision at recall >= t (0 when no point reaches t).
        The thresholds are the devkit's `np.arange(0, 1.1, 0.1)`, as in the code that
        produced the published numbers and in other toolkits; there 0.3 is
        0.30000000000000004, so a curve that reaches recall 0.3 exactly does not count
        at that threshold. `exact_tenths=True` uses exact 0, 0.1, ..., 1 instead (can
        differ by up to ~0.09 AP on classes with few boxes).
    use_07_metric=False: VOC2010+ "all-point" AP, the exact area under the
        precision envelope (precision made non-increasing from the right).
    """
    if use_07_metric:
        ap = 0.0
        thresholds = [i / 10 for i in range(11)] if exact_tenths else np.arange(0.0, 1.1, 0.1)
        for t in thresholds:
            mask = recall >= t
            ap += (float(np.max(precision[mask])) if mask.any() else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou_plus_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with `(M, 4)` boxes using the devkit's inclusive-pixel (+1) areas."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    union = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0) + (boxes[:, 2] - boxes[:, 0] + 1.0) * (
        boxes[:, 3] - boxes[:, 1] + 1.0
    ) - inter
    return inter / union


AP_METRIC_NAMES = {False: "all-point (VOC2010+)", True: "11-point (VOC2007)"}


def compute_voc_map(
    ground_truths: GroundTruths,
    detections: Detections,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    return_curves: bool = False,
    exact_tenths: bool = False,
) -> Dict[str, Any]:
    """PASCAL VOC mean average precision, following the devkit's `voc_eval`.

    Args:
        ground_truths: `{image_id: [(class_name, [x1, y1, x2, y2], difficult), ...]}`
            in original image pixels; list every evaluated image, even without objects.
        detections: `[(image_id, class_name, score, [x1, y1, x2, y2]), ...]`.
        iou_threshold: a detection matches when IoU > threshold (strictly, as the devkit).
        use_07_metric: 11-point AP (VOC2007) instead of all-point AP (VOC2010+), with
            the devkit's recall thresholds (see `voc_ap`); `exact_tenths=True` for exact tenths.

    Rules: per class, detections are visited by decreasing score; each is matched to
    the ground-truth box it overlaps most in its image. Above the threshold it is a
    true positive if that box is not yet taken, a false positive if it is (duplicate),
    and ignored (neither) if that box is "difficult". Difficult boxes do not count
    towards recall. Below the threshold it is a false positive. Areas use the devkit's
    inclusive-pixel convention (width = x2 - x1 + 1).

    Returns: {"mAP": mean AP over classes that have at least one non-difficult box,
        "per_class": {class_name: AP, or NaN for classes without such boxes}}
        (+ "curves": {class_name: {"recall": [...], "precision": [...]}} if asked).
    """
    class_set = set(class_names)
    gt_by_class: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {c: {} for c in class_names}
    for image_id, objects in ground_truths.items():
        per_class: Dict[str, Tuple[list, list]] = {}
        for cls, box, difficult in objects:
            if cls in class_set:
                per_class.setdefault(cls, ([], []))
                per_class[cls][0].append([float(v) for v in box[:4]])
                per_class[cls][1].append(bool(difficult))
        for cls, (boxes, diff) in per_class.items():
            gt_by_class[cls][image_id] = {
                "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                "difficult": np.asarray(diff, dtype=bool),
            }
    dets_by_class: Dict[str, list] = {c: [] for c in class_names}
    for image_id, cls, score, box in detections:
        if cls in dets_by_class:
            dets_by_class[cls].append((image_id, float(score), [float(v) for v in box[:4]]))

    aps: Dict[str, float] = {}
    curves: Dict[str, Dict[str, list]] = {}
    for cls in class_names:
        gts = gt_by_class[cls]
        npos = int(sum((~g["difficult"]).sum() for g in gts.values()))
        taken = {image_id: np.zeros(len(g["difficult"]), dtype=bool) for image_id, g in gts.items()}
        dets = dets_by_class[cls]
        scores = np.asarray([d[1] for d in dets], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for rank_, k in enumerate(order):
            image_id, _, box = dets[k]
            g = gts.get(image_id)
            if g is None or len(g["boxes"]) == 0:
                fp[rank_] = 1.0
                continue
            ious = _iou_plus_one(np.asarray(box), g["boxes"])
            j = int(np.argmax(ious))
            if ious[j] > iou_threshold:
                if g["difficult"][j]:
                    continue  # neither rewarded nor penalised
                if not taken[image_id][j]:
                    tp[rank_], taken[image_id][j] = 1.0, True
                else:
                    fp[rank_] = 1.0  # duplicate detection of an already matched box
            else:
                fp[rank_] = 1.0
        if npos == 0:
            aps[cls] = float("nan")
            curves[cls] = {"recall": [], "precision": []}
            continue
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_cum / npos
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        aps[cls] = voc_ap(recall, precision, use_07_metric, exact_tenths) if len(dets) else 0.0
        curves[cls] = {"recall": recall.tolist(), "precision": precision.tolist()}
    valid = [ap for ap in aps.values() if not math.isnan(ap)]
    result: Dict[str, Any] = {"mAP": float(np.mean(valid)) if valid else float("nan"), "per_class": aps}
    if return_curves:
        result["curves"] = curves
    return result


def compute_coco_map(ground_truths: GroundTruths, detections: Detections, class_names: Sequence[str]) -> Dict[str, float]:
    """COCO-style AP with pycocotools (an independent implementation, as a cross-check).

    Boxes are converted with the devkit's inclusive-pixel convention (w = x2 - x1 + 1)
    so that geometry matches `compute_voc_map`; difficult objects become `iscrowd`
    regions (detections on them are ignored). COCO differs from VOC in its
    101-point interpolation and in matching each detection to the best *unmatched*
    box, so AP50 is close to, not equal to, VOC mAP.

    Returns: {"mAP": AP@[.5:.95], "AP50": AP@.5, "AP75": AP@.75}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = {c: i + 1 for i, c in enumerate(class_names)}
    img_ids = {image_id: i + 1 for i, image_id in enumerate(ground_truths)}
    annotations = []
    for image_id, objects in ground_truths.items():
        for cls, box, difficult in objects:
            if cls not in cat_ids:
                continue
            x1, y1, x2, y2 = (float(v) for v in box[:4])
            w, h = x2 - x1 + 1.0, y2 - y1 + 1.0
            annotations.append({"id": len(annotations) + 1, "image_id": img_ids[image_id], "category_id": cat_ids[cls],
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(bool(difficult))})
    if not any(a["iscrowd"] == 0 for a in annotations):
        return {"mAP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    results = []
    for image_id, cls, score, box in detections:
        if cls in cat_ids and image_id in img_ids:
            x1, y1, x2, y2 = (float(v) for v in box[:4])
            results.append({"image_id": img_ids[image_id], "category_id": cat_ids[cls], "score": float(score),
                            "bbox": [x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0]})
    if not results:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints a lot
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i} for i in img_ids.values()], "annotations": annotations,
                           "categories": [{"id": i, "name": c} for c, i in cat_ids.items()]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


# What `count_detection_errors` calls each false positive (and the misses), in the order the
# pictures show them. The idea is Hoiem et al., "Diagnosing error in object detectors"
# (ECCV 2012), and the TIDE toolbox (Bolya et al. 2020). TIDE itself (`tidecv` 1.0.1, the
# latest release) was tried and is not used: it imports OpenCV, pandas, seaborn and
# appdirs at import time and builds a seaborn palette in `TIDE()`, none of which this
# project installs, and it works on COCO-format data with COCO's AP. This is a small
# implementation of the same classification on the VOC AP50 protocol of `compute_voc_map`.
ERROR_KINDS = ("localisation", "confusion", "duplicate", "background")
ERROR_KIND_HELP = {
    "correct": "true positive: right class, IoU > 0.5 with an object not yet taken",
    "localisation": "right class, 0.1 <= IoU <= 0.5 with an object of that class",
    "confusion": "on an object of another class: IoU > 0.5 with it, or IoU >= 0.1 and no localisation error",
    "duplicate": "right class, IoU > 0.5 with an object that a higher-scoring detection already took",
    "background": "IoU < 0.1 with every object",
    "missed": "object (not difficult) that no detection found",
}


def count_detection_errors(
    ground_truths: GroundTruths,
    detections: Detections,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    score_thresh: float = 0.0,
    background_iou: float = 0.1,
) -> Dict[str, Any]:
    """Break a detector's mistakes down by kind, at the AP50 protocol of `compute_voc_map`.

    Detections with `score >= score_thresh` are matched as the VOC devkit does (per class,
    by decreasing score, each to the object of its class it overlaps most; a match needs
    IoU > `iou_threshold`; difficult objects are ignored). Each one that is not a true
    positive is then called, first rule that applies:

    * "duplicate": right class, IoU > `iou_threshold` with an object already taken by a
      higher-scoring detection;
    * "confusion" (a): IoU > `iou_threshold` with an object of another class;
    * "localisation": right class, `background_iou` <= IoU <= `iou_threshold`;
    * "confusion" (b): IoU >= `background_iou` with an object of another class;
    * "background": IoU < `background_iou` with every object.

    Objects (not difficult) that no detection matched are "missed".

    Args:
        ground_truths, detections: as for `compute_voc_map` (what `collect_predictions`
            returns), boxes in the same pixels.
        score_thresh: count only detections at least this confident. 0 counts all of
            them (all the detections that AP sees; many are low-scoring); 0.3 counts
            those that `predict` draws.

    Returns: {"correct", "localisation", "confusion", "duplicate", "background",
        "missed": counts; "detections": detections counted, "objects": non-difficult
        objects, "ignored": detections on difficult objects, "score_thresh",
        "iou_threshold", "per_class": {class_name: the same counts}}.
    """
    keys = ("correct",) + ERROR_KINDS + ("missed", "detections", "objects", "ignored")
    per_class: Dict[str, Dict[str, int]] = {c: dict.fromkeys(keys, 0) for c in class_names}
    class_index = {c: i for i, c in enumerate(class_names)}
    # Every object of each image: boxes (M, 4), class index (M,), difficult (M,).
    images: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for image_id, objects in ground_truths.items():
        objects = [o for o in objects if o[0] in class_index]
        boxes = np.asarray([[float(v) for v in o[1][:4]] for o in objects], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray([class_index[o[0]] for o in objects], dtype=np.int64)
        difficult = np.asarray([bool(o[2]) for o in objects], dtype=bool)
        images[image_id] = (boxes, labels, difficult)
        for o in objects:
            if not o[2]:
                per_class[o[0]]["objects"] += 1
    taken = {image_id: np.zeros(len(v[1]), dtype=bool) for image_id, v in images.items()}
    kept = [d for d in detections if d[1] in class_index and float(d[2]) >= score_thresh]
    # Per class by decreasing score, as the devkit (a stable sort keeps the input order on ties).
    kept.sort(key=lambda d: (class_index[d[1]], -float(d[2])))
    empty = (np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    for image_id, cls, _, box in kept:
        counts = per_class[cls]
        counts["detections"] += 1
        boxes, labels, difficult = images.get(image_id, empty)
        ious = _iou_plus_one(np.asarray(box[:4], dtype=np.float64), boxes) if len(boxes) else np.zeros(0)
        same = labels == class_index[cls]
        kind = "background"
        if same.any():
            j = int(np.flatnonzero(same)[np.argmax(ious[same])])
            if ious[j] > iou_threshold:
                if difficult[j]:
                    counts["ignored"] += 1
                    continue
                if not taken[image_id][j]:
                    taken[image_id][j] = True
                    counts["correct"] += 1
                    continue
                counts["duplicate"] += 1
                continue
        best_same = float(ious[same].max()) if same.any() else 0.0
        best_other = float(ious[~same].max()) if (~same).any() else 0.0
        if best_other > iou_threshold:
            kind = "confusion"
        elif best_same >= background_iou:
            kind = "localisation"
        elif best_other >= background_iou:
            kind = "confusion"
        counts[kind] += 1
    for image_id, (boxes, labels, difficult) in images.items():
        for j in np.flatnonzero(~difficult & ~taken[image_id]):
            per_class[class_names[int(labels[j])]]["missed"] += 1
    totals = {k: int(sum(c[k] for c in per_class.values())) for k in keys}
    return {**totals, "score_thresh": float(score_thresh), "iou_threshold": float(iou_threshold),
            "per_class": per_class}


def format_error_breakdown(errors: Dict[str, Any]) -> List[str]:
    """The counts of `count_detection_errors` as a few readable lines."""
    n = max(errors["detections"], 1)
    lines = [f"{plural(errors['detections'], 'detection')} with score >= {errors['score_thresh']:g}: "
             f"{errors['correct']} correct ({100 * errors['correct'] / n:.0f}%), "
             + ", ".join(f"{errors[k]} {k} ({100 * errors[k] / n:.0f}%)" for k in ERROR_KINDS)]
    lines.append(f"{plural(errors['objects'], 'object')} (not difficult): {errors['objects'] - errors['missed']} found, "
                 f"{errors['missed']} missed ({100 * errors['missed'] / max(errors['objects'], 1):.0f}%)")
    return lines


def _class_names_of(dataset: Dataset) -> List[str]:
    if hasattr(dataset, "idx_to_class"):
        return [dataset.idx_to_class[i] for i in sorted(dataset.idx_to_class)]
    return list(VOC_CLASSES)


class _IndexedItems(Dataset):
    """`(index, item)` pairs, so evaluation knows which image each output belongs to."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class _IndexedCollate:
    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        return [i for i, _ in batch], self.collate_fn([item for _, item in batch])


def _indexed_loader(dataset: Dataset, batch_size: int, num_workers: int, collate_fn: Optional[Callable] = None) -> DataLoader:
    collate = collate_fn or torch.utils.data.default_collate
    return DataLoader(_IndexedItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_IndexedCollate(collate))


@torch.no_grad()
def predict_batch(detector: nn.Module, images: torch.Tensor, score_thresh: float, nms_thresh: float) -> List[TensorDict]:
    """`[{"boxes": (N, 4), "labels": (N,), "scores": (N,)}, ...]` for a batch of images.

    Uses `detector.predict` (batched) when available, else the course interface
    `detector(image[None], test_score_thresh=..., test_nms_thresh=...)` per image.
    """
    if hasattr(detector, "predict"):
        return detector.predict(images, score_thresh=score_thresh, nms_thresh=nms_thresh)
    outputs = []
    for image in images:
        boxes, labels, scores = detector(image[None], test_score_thresh=score_thresh, test_nms_thresh=nms_thresh)
        outputs.append({"boxes": boxes, "labels": labels, "scores": scores})
    return outputs


def _eval_autocast(device: torch.device, amp: bool):
    """Optional fp16 (CUDA) / bf16 (CPU) autocast for inference. Off by default:
    half-precision box coordinates lose about a pixel at 224 px."""
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device), enabled=bool(amp))


def collect_predictions(
    detector: nn.Module,
    dataset: Dataset,
    batch_size: int = 8,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    max_detections: int = 100,
    amp: bool = False,
    progress: Union[bool, str] = True,
    class_names: Optional[Sequence[str]] = None,
) -> Tuple[GroundTruths, Detections]:
    """Run batched inference over every image of `dataset` (evaluation transform).

    `progress`: True: a bar on a terminal, plain lines in a log (`ProgressReporter`);
    "lines": plain lines always; False / "off": silent.

    Returns `(ground_truths, detections)` in the format of `compute_voc_map`, in
    original image pixels when the dataset can map boxes back (VOC2007DetectionTiny),
    otherwise in network-input pixels with the ground truth taken from the batch.
    Images without detections are still listed in `ground_truths`.
    """
    device = resolve_device(device)
    dataset = _eval_view(dataset)
    base, base_indices = _unwrap_subset(dataset)
    if class_names is None:
        class_names = _class_names_of(base)
    can_map = hasattr(base, "boxes_to_original") and hasattr(base, "get_annotation")
    was_training = detector.training
    detector.to(device=device, dtype=dtype).eval()
    ground_truths: GroundTruths = {}
    detections: Detections = []
    loader = _indexed_loader(dataset, batch_size, num_workers)
    nonfinite_images: List[str] = []
    bar = ProgressReporter(len(dataset), "evaluate", count_format="{n}/{total} images", unit="img", noun="image",
                           mode=_progress_mode(progress))
    for indices, (paths, images, gt_boxes) in loader:
        images = images.to(device=device, dtype=dtype)
        with _eval_autocast(device, amp):
            outputs = predict_batch(detector, images, score_thresh, nms_thresh)
        for k, (index, path) in enumerate(zip(indices, paths)):
            b_index = base_indices[index]
            image_id = base.image_id(b_index) if hasattr(base, "image_id") else Path(path).stem
            out = outputs[k]
            boxes = out["boxes"].detach().float().cpu()
            labels = out["labels"].detach().cpu().long()
            scores = out["scores"].detach().float().cpu()
            valid = labels >= 0
            finite = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
            if not bool(finite[valid].all()):  # a diverged model: drop, but say so
                nonfinite_images.append(Path(path).name)
            valid &= finite
            boxes, labels, scores = boxes[valid], labels[valid], scores[valid]
            if len(scores) > max_detections:
                top = scores.argsort(descending=True)[:max_detections]
                boxes, labels, scores = boxes[top], labels[top], scores[top]
            if can_map:
                boxes = base.boxes_to_original(boxes, b_index)
                ground_truths[image_id] = base.get_annotation(b_index)
            else:
                g = gt_boxes[k][gt_boxes[k][:, 4] >= 0]
                ground_truths[image_id] = [(class_names[int(r[4])], r[:4].tolist(), False) for r in g]
            for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
                detections.append((image_id, class_names[label], score, box))
        bar.update(len(indices))
    bar.close()
    detector.train(was_training)
    if nonfinite_images:
        warnings.warn(f"Dropped NaN / infinite detections (boxes or scores) in {len(nonfinite_images)} images: "
                      + ", ".join(nonfinite_images[:5]) + (" ..." if len(nonfinite_images) > 5 else "")
                      + ". The model has probably diverged.")
    return ground_truths, detections


def evaluate_detector(
    detector: nn.Module,
    dataset: Dataset,
    batch_size: int = 8,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    num_workers: int = 0,
    max_detections: int = 100,
    coco: bool = True,
    amp: bool = False,
    progress: Union[bool, str] = True,
    return_curves: bool = False,
    exact_tenths: bool = False,
    error_score_thresh: Optional[float] = None,
) -> Dict[str, Any]:
    """Honest evaluation: batched inference over every image, VOC mAP + COCO cross-check.

    The dataset is used with its evaluation transform (no crop), predictions are mapped
    back to original image pixels and compared with *all* annotated objects (difficult
    ones ignored, per the devkit). Low `score_thresh` (0.05) and up to `max_detections`
    per image, as usual for mAP.

    Returns: {"mAP", "per_class" (as `compute_voc_map`, with the metric that
        `use_07_metric` chooses), "ap_metric" (its name), "mAP_all_point" and
        "mAP_11_point" (both metrics, from the same detections), "coco_mAP"
        (AP@[.5:.95]), "coco_AP50", "coco_AP75" (pycocotools; NaN when coco=False),
        "num_images", "num_detections", "seconds"} (+ "curves" when return_curves, and
        "errors": `count_detection_errors` of the detections scoring at least
        `error_score_thresh`, when it is given).
    """
    start = time.time()
    ground_truths, detections = collect_predictions(
        detector, dataset, batch_size, score_thresh, nms_thresh, device, dtype, num_workers, max_detections, amp, progress
    )
    class_names = _class_names_of(_unwrap_subset(dataset)[0])
    result = compute_voc_map(ground_truths, detections, class_names, iou_threshold, use_07_metric, return_curves=True,
                             exact_tenths=exact_tenths)
    # The other metric from the same precision/recall curves (no second matching pass).
    other = {}
    for cls, ap in result["per_class"].items():
        curve = result["curves"][cls]
        other[cls] = ap if math.isnan(ap) else voc_ap(np.asarray(curve["recall"]), np.asarray(curve["precision"]),
                                                      not use_07_metric, exact_tenths=exact_tenths)
    valid = [ap for ap in other.values() if not math.isnan(ap)]
    other_map = float(np.mean(valid)) if valid else float("nan")
    result["ap_metric"] = AP_METRIC_NAMES[bool(use_07_metric)]
    result["mAP_11_point"] = result["mAP"] if use_07_metric else other_map
    result["mAP_all_point"] = other_map if use_07_metric else result["mAP"]
    if not return_curves:
        del result["curves"]
    if error_score_thresh is not None:
        result["errors"] = count_detection_errors(ground_truths, detections, class_names, iou_threshold,
                                                  error_score_thresh)
    nan = float("nan")
    cm = compute_coco_map(ground_truths, detections, class_names) if coco else {"mAP": nan, "AP50": nan, "AP75": nan}
    result.update({"coco_mAP": cm["mAP"], "coco_AP50": cm["AP50"], "coco_AP75": cm["AP75"],
                   "num_images": len(ground_truths), "num_detections": len(detections),
                   "seconds": time.time() - start})
    return result


def _as_batches(items: Iterable) -> Iterator[Tuple[List[None], Tuple[List[str], Any, torch.Tensor]]]:
    """`(indices, (image_paths, images, gt_boxes))` batches from any iterable of batches
    `(paths, (B, 3, H, W) images, (B, N, 5) gt)` or of single items `(path, (3, H, W)
    image, (N, 5) gt)` (a dataset, a list, a generator); indices are unknown (None)."""
    for item in items:
        paths, images, gt_boxes = item
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if torch.is_tensor(images) and images.dim() == 3:
            images = images[None]
        gt_boxes = torch.as_tensor(gt_boxes)
        if gt_boxes.dim() == 2:
            gt_boxes = gt_boxes[None]
        yield [None] * len(paths), (list(paths), images, gt_boxes)


def inference_with_detector(
    detector: nn.Module,
    test_loader: Iterable,
    idx_to_class: Dict[int, str],
    score_thresh: Optional[float] = None,
    nms_thresh: Optional[float] = None,
    output_dir: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> None:
    """The course's inference function: visualise detections, or write them to files.

    With `output_dir`, every image (also those without detections, which the course
    version skipped) gets `output_dir/detection-results/<id>.txt` with lines
    `class score x1 y1 x2 y2` and `output_dir/ground-truth/<id>.txt` with lines
    `class x1 y1 x2 y2` (plus ` difficult` for difficult objects): the format of the
    usual one-file-per-image mAP tool. Boxes are in original image pixels when the
    dataset can map them back, else in network-input pixels.
    Without `output_dir`, each image is shown (or saved, when headless) with its
    ground truth and detections via `detection_visualizer`.

    `test_loader` is a DataLoader (its dataset is read with the evaluation transform
    and boxes can be mapped back to original pixels), or any other iterable of
    `(image_paths, images, gt_boxes)` batches or of single `(path, image, gt_boxes)`
    items: a list, a generator, a dataset (used as is, boxes in network-input pixels).
    """
    device = resolve_device(device)
    score_thresh = 0.3 if score_thresh is None else score_thresh
    nms_thresh = 0.5 if nms_thresh is None else nms_thresh
    detector.to(dtype=dtype, device=device)
    detector.eval()
    start_t = time.time()
    if isinstance(test_loader, Dataset) and not isinstance(test_loader, torch.utils.data.IterableDataset):
        test_loader = DataLoader(test_loader, batch_size=1)
    use_dataset = isinstance(test_loader, DataLoader) and not isinstance(
        test_loader.dataset, torch.utils.data.IterableDataset
    )
    if use_dataset:
        dataset = _eval_view(test_loader.dataset)
        base, base_indices = _unwrap_subset(dataset)
        can_map = hasattr(base, "boxes_to_original") and hasattr(base, "get_annotation")
    else:
        can_map = False
    if output_dir is not None:
        det_dir, gt_dir = Path(output_dir) / "detection-results", Path(output_dir) / "ground-truth"
        for d in (det_dir, gt_dir):
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
    if use_dataset:
        loader = _indexed_loader(dataset, test_loader.batch_size or 1, test_loader.num_workers, test_loader.collate_fn)
    else:
        loader = _as_batches(test_loader)
    for indices, (image_paths, images, gt_boxes) in loader:
        images = move_to_device(images, device, dtype)
        outputs = predict_batch(detector, images, score_thresh, nms_thresh)
        for k, index in enumerate(indices):
            b_index = base_indices[index] if can_map else None
            out = outputs[k]
            valid = out["labels"] >= 0
            boxes = out["boxes"][valid].detach().float().cpu()
            labels = out["labels"][valid].detach().cpu().long()
            scores = out["scores"][valid].detach().float().cpu()
            gt = gt_boxes[k][gt_boxes[k][:, 4] >= 0].cpu()
            if output_dir is not None:
                name = Path(image_paths[k]).stem + ".txt"
                if can_map:
                    boxes_out = base.boxes_to_original(boxes, b_index)
                    gt_lines = [f"{c} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}" + (" difficult" if d else "")
                                for c, b, d in base.get_annotation(b_index)]
                else:
                    boxes_out = boxes
                    gt_lines = [f"{idx_to_class[int(b[4])]} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}" for b in gt.tolist()]
                det_lines = [f"{idx_to_class[int(c)]} {s:.6f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}"
                             for b, c, s in zip(boxes_out.tolist(), labels.tolist(), scores.tolist())]
                (gt_dir / name).write_text("".join(line + "\n" for line in gt_lines))
                (det_dir / name).write_text("".join(line + "\n" for line in det_lines))
            else:
                image = unnormalize_image(images[k].float().cpu())
                pred = torch.cat([boxes, labels[:, None].float(), scores[:, None]], dim=1)
                detection_visualizer(image, idx_to_class, gt, pred)
    print(f"Total inference time: {time.time() - start_t:.1f}s")


# ======================================================================================
# Pictures
# ======================================================================================

_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "cairo", "template", "pgf"}
_plot_counter = [0]


def _pyplot():
    """matplotlib.pyplot, switching to the Agg backend when there is no display."""
    import matplotlib

    if (
        "MPLBACKEND" not in os.environ
        and "matplotlib.pyplot" not in sys.modules
        and sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
        and "ipykernel" not in sys.modules
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_figure(fig, save_path: Optional[PathLike], name: str, tight: bool = True) -> Optional[Path]:
    """Save to `save_path`; else show it, or save a PNG under `$A5_PLOT_DIR` (default
    runs/plots) when the backend cannot show windows. Returns the file written."""
    plt = _pyplot()
    if save_path is None and plt.get_backend().lower() in _NON_INTERACTIVE:
        _plot_counter[0] += 1
        save_path = Path(os.environ.get("A5_PLOT_DIR", "runs/plots")) / f"{name}_{_plot_counter[0]:04d}.png"
        print(f"No display: saved {save_path}")
    if save_path is not None:
        save_path = Path(save_path)
        save_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, dpi=80 if not tight else 100, bbox_inches="tight" if tight else None)
        plt.close(fig)
        return save_path
    plt.show()
    return None


def unnormalize_image(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: `(3, H, W)` -> values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def class_color(class_index: int) -> Tuple[float, float, float]:
    """A colour per class: matplotlib's tab20 with its light and dark halves interleaved, so
    that neighbouring class indices get different hues (20 colours, then they repeat)."""
    import matplotlib

    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return tuple(matplotlib.colormaps["tab20"](order[int(class_index) % 20])[:3])


def _text_color_on(rgb: Sequence[float]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 0.45 else "white"


def _figure_renderer(fig):
    try:
        return fig.canvas.get_renderer()
    except AttributeError:  # a canvas without one (vector backends)
        return fig._get_renderer()


def _overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Overlap of two rectangles (x0, y0, x1, y1)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_candidates(box: Sequence[float], w: float, h: float, steps: int = 6):
    """Where a label of size (w, h) may go around a box (x0, y0, x1, y1), best first. All
    coordinates are display pixels (y up): above the box's top-left corner, inside it,
    below the box, the right-hand corners, then stacked further above / inside / below."""
    x0, yb, x1, yt = box
    lefts, rights = (x0, x0 + w), (x1 - w, x1)
    for k in range(steps):
        for xs in (lefts, rights):
            yield (xs[0], yt + k * h, xs[1], yt + (k + 1) * h)  # above the top edge, then higher
            yield (xs[0], yt - (k + 1) * h, xs[1], yt - k * h)  # inside from the top edge, then lower
            yield (xs[0], yb - (k + 1) * h, xs[1], yb - k * h)  # below the bottom edge, then lower
            yield (xs[0], yb + k * h, xs[1], yb + (k + 1) * h)  # inside from the bottom edge, then higher


def _place_labels(ax, labels: List[Tuple[Sequence[float], str, Sequence[float]]], fontsize: float = 9,
                  pad: float = 1.5) -> List[Optional[Tuple[float, float, float, float]]]:
    """Put each label (box in data coordinates, text, colour) next to its box where it
    overlaps no earlier label and stays on the image; a label with no such place is left
    out (its box stays, in its class colour). Returns each label's rectangle in display
    pixels, or None for those left out."""
    fig = ax.figure
    ax.apply_aspect()  # the axes take their final place, so data -> pixel is fixed now
    renderer = _figure_renderer(fig)
    to_px, to_data = ax.transData, ax.transData.inverted()
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    pad_px = pad * fig.dpi / 72.0
    gap = 1.0  # pixels kept free between labels
    placed: List[Tuple[float, float, float, float]] = []
    result: List[Optional[Tuple[float, float, float, float]]] = []
    for box, text, color in labels:
        artist = ax.text(0, 0, text, size=fontsize, family="sans-serif", color=_text_color_on(color),
                         ha="left", va="bottom", clip_on=False,
                         bbox={"facecolor": color, "alpha": 0.85, "pad": pad, "edgecolor": "none"})
        extent = artist.get_window_extent(renderer)
        w, h = extent.width + 2 * pad_px + gap, extent.height + 2 * pad_px + gap
        (px0, py0), (px1, py1) = to_px.transform([(box[0], box[1]), (box[2], box[3])])
        box_px = (min(px0, px1), min(py0, py1), max(px0, px1), max(py0, py1))
        best = None
        for cand in _label_candidates(box_px, w, h):
            # Slide sideways onto the image when a corner position sticks out.
            dx = max(frame[0] - cand[0], 0.0) - max(cand[2] - frame[2], 0.0)
            cand = (cand[0] + dx, cand[1], cand[2] + dx, cand[3])
            if cand[1] < frame[1] - 0.5 or cand[3] > frame[3] + 0.5:
                continue
            if all(_overlap_area(cand, other) <= 0.0 for other in placed):
                best = cand
                break
        if best is None:
            artist.remove()
            result.append(None)
            continue
        placed.append(best)
        artist.set_position(to_data.transform((best[0] + pad_px + gap / 2, best[1] + pad_px + gap / 2)))
        result.append(best)
    return result


def detection_visualizer(
    img: Union[torch.Tensor, np.ndarray, Image.Image],
    idx_to_class: Dict[int, str],
    bbox: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    pred: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    points: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    save_path: Optional[PathLike] = None,
    *,
    score_thresh: Optional[float] = None,
    max_boxes: Optional[int] = None,
    title: Optional[str] = None,
) -> Optional[Path]:
    """Draw an image with ground-truth boxes (dashed), predictions (solid) and points.

    Every class has its own colour (`class_color`); labels sit on a background of that
    colour, next to their box, and never on top of one another (`draw_detections`).

    Args:
        img: `(3, H, W)` tensor with values in [0, 1], or an `(H, W, 3)` uint8 array /
            PIL image.
        bbox: `(N, 4 or 5)` ground truth `x1, y1, x2, y2[, class]`.
        pred: `(M, 4, 5 or 6)` predictions `x1, y1, x2, y2[, class[, score]]`.
        points: `(P, 2)` `(x, y)` points (e.g. FPN locations), drawn in yellow.
        save_path: write a PNG instead of showing it.
        score_thresh: draw only predictions with at least this score.
        max_boxes: draw only the `max_boxes` highest-scoring predictions.
        title: a title above the image.
    """
    plt = _pyplot()
    height, width = np.asarray(img).shape[:2] if not isinstance(img, torch.Tensor) else img.shape[-2:]
    # About one figure pixel per image pixel (at 100 dpi), within 4 to 10 inches: labels in
    # points then keep the same size relative to the image, whatever its resolution.
    scale = min(max(max(width, height) / 100.0, 4.0), 10.0) / max(width, height)
    fig_w, img_h = width * scale, height * scale
    title_h = 0.3 if title else 0.0
    fig = plt.figure(figsize=(fig_w, img_h + title_h), frameon=False)
    ax = fig.add_axes((0.0, 0.0, 1.0, img_h / (img_h + title_h)))  # the image fills the figure
    draw_detections(ax, img, idx_to_class, bbox=bbox, pred=pred, points=points, score_thresh=score_thresh,
                    max_boxes=max_boxes)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish_figure(fig, save_path, "detections")


def draw_detections(
    ax,
    img: Union[torch.Tensor, np.ndarray, Image.Image],
    idx_to_class: Dict[int, str],
    bbox: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    pred: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    points: Optional[Union[torch.Tensor, np.ndarray, list]] = None,
    *,
    score_thresh: Optional[float] = None,
    max_boxes: Optional[int] = None,
    fontsize: float = 9,
) -> Dict[str, Any]:
    """Draw what `detection_visualizer` shows onto a matplotlib axis (for grids).

    Boxes take their class's colour (`class_color`): ground truth dashed, predictions
    solid. Predictions are drawn by decreasing score, after filtering by `score_thresh`
    and keeping the `max_boxes` best. Labels ("dog 0.87" for a prediction; "dog", or
    "gt dog" next to predictions, for ground truth) get a background in the box colour
    and are placed by `_place_labels`: above or inside the box, or shifted, so that no
    two labels overlap; a label that finds no free place is left out. Ground-truth rows
    whose class is -1 (the padding of `(40, 5)` targets) are skipped.

    Returns: {"drawn": predictions drawn, "hidden": predictions filtered out,
        "labels": label rectangles in display pixels (None for labels left out)}.
    """
    from matplotlib.patches import Rectangle

    if isinstance(img, torch.Tensor):
        img = (img.detach().float().cpu() * 255).permute(1, 2, 0).numpy()
    ax.axis("off")
    ax.imshow(np.asarray(img).astype("uint8"))

    def rows(x):
        if x is None:
            return []
        return x.detach().cpu().tolist() if torch.is_tensor(x) else np.asarray(x).tolist()

    if points is not None:
        pts = rows(points)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="yellow", s=24)
    gt_rows = [b for b in rows(bbox) if len(b) <= 4 or b[4] >= 0]
    pred_rows = rows(pred)
    total = len(pred_rows)
    if pred_rows and len(pred_rows[0]) > 5:
        pred_rows.sort(key=lambda b: -b[5])
        if score_thresh is not None:
            pred_rows = [b for b in pred_rows if b[5] >= score_thresh]
    if max_boxes is not None:
        pred_rows = pred_rows[: max(int(max_boxes), 0)]
    labels: List[Tuple[Sequence[float], str, Sequence[float]]] = []
    neutral = (0.9, 0.1, 0.1)  # boxes without a class
    for is_pred, boxes in ((True, pred_rows), (False, gt_rows)):
        for b in boxes:
            x0, y0, x1, y1 = b[:4]
            has_class = len(b) > 4 and b[4] >= 0
            color = class_color(int(b[4])) if has_class else neutral
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=2.5 if is_pred else 2, linestyle="-" if is_pred else (0, (4, 2))))
            if has_class:
                text = idx_to_class.get(int(b[4]), str(int(b[4])))
                if is_pred and len(b) > 5:
                    text += f" {b[5]:.2f}"
                elif not is_pred and pred_rows:
                    text = "gt " + text
                labels.append(((x0, y0, x1, y1), text, color))
    rects = _place_labels(ax, labels, fontsize=fontsize) if labels else []
    return {"drawn": len(pred_rows), "hidden": total - len(pred_rows), "labels": rects}


def show_dataset_grid(
    dataset: Dataset,
    idx_to_class: Dict[int, str],
    num_images: int = 6,
    cols: int = 3,
    save_path: Optional[PathLike] = None,
) -> Optional[Path]:
    """A grid of the first `num_images` items of a detection dataset with their boxes.

    Items are `(image_path, image, gt_boxes)` with ImageNet-normalised images, as
    `VOC2007DetectionTiny` returns them.
    """
    plt = _pyplot()
    count = min(num_images, len(dataset))
    nrows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, index in zip(axes.ravel(), range(count)):
        path, image, gt_boxes = dataset[index]
        draw_detections(ax, unnormalize_image(image), idx_to_class, bbox=gt_boxes)
        ax.set_title(Path(path).name, fontsize=8)
    return _finish_figure(fig, save_path, "dataset_grid")


def smooth_curve(values: Sequence[float], window: int = 50) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_loss_history(history: Union[Dict[str, list], Sequence[float]], window: int = 50,
                      save_path: Optional[PathLike] = None, title: str = "Training loss") -> Optional[Path]:
    """Loss curves: total loss raw (faint) and smoothed, plus each loss term smoothed."""
    plt = _pyplot()
    if not isinstance(history, dict):
        history = {"iteration": list(range(len(history))), "total_loss": list(history)}
    its = history.get("iteration") or list(range(len(history["total_loss"])))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(its, history["total_loss"], color="black", alpha=0.2, linewidth=0.8, label="total (raw)")
    ax.plot(its, smooth_curve(history["total_loss"], window), color="black", linewidth=2, label="total (smoothed)")
    terms = [k for k in history if "loss" in k and k != "total_loss" and len(history[k]) == len(its)]
    for key in terms:
        ax.plot(its, smooth_curve(history[key], window), linewidth=1.2, label=f"{key} (smoothed)")
    ax.set_xlabel("Iteration")
    ax.set_ylabel("Loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish_figure(fig, save_path, "loss")


def plot_per_class_ap(per_class: Dict[str, float], save_path: Optional[PathLike] = None,
                      title: str = "AP per class") -> Optional[Path]:
    """Horizontal bar chart of AP per class (sorted), with the mean as a line."""
    plt = _pyplot()
    items = sorted(((c, ap) for c, ap in per_class.items() if ap is not None and not math.isnan(ap)), key=lambda x: x[1])
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(items), 1) + 1.2))
    ax.barh([c for c, _ in items], [ap for _, ap in items], color="tab:green")
    if items:
        mean = float(np.mean([ap for _, ap in items]))
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{title} (mean {mean:.3f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP")
    return _finish_figure(fig, save_path, "per_class_ap")


def plot_pr_curves(curves: Dict[str, Dict[str, list]], save_path: Optional[PathLike] = None,
                   per_class_ap: Optional[Dict[str, float]] = None) -> Optional[Path]:
    """Precision-recall curve of every class (one small panel each)."""
    plt = _pyplot()
    names = list(curves)
    cols = 5
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 2.6 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, name in zip(axes.ravel(), names):
        rec, prec = curves[name]["recall"], curves[name]["precision"]
        if rec:
            ax.plot(rec, prec, color="tab:purple")
        ap = (per_class_ap or {}).get(name)
        ax.set_title(name + (f" (AP {ap:.2f})" if ap is not None and not math.isnan(ap) else ""), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    # Ticks at 0, 0.5 and 1 only, the outer labels pulled inwards: neighbouring panels'
    # "1.0" and "0.0" would otherwise run into each other ("1.00.0").
    for ax in axes.ravel()[: len(names)]:
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.tick_params(labelsize=8)
        xlabels, ylabels = ax.get_xticklabels(), ax.get_yticklabels()  # the visible ones
        if len(xlabels) == 3:
            xlabels[0].set_horizontalalignment("left")
            xlabels[-1].set_horizontalalignment("right")
        if len(ylabels) == 3:
            ylabels[0].set_verticalalignment("bottom")
            ylabels[-1].set_verticalalignment("top")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    # Fixed margins: tight_layout on 20 panels costs seconds.
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.94, wspace=0.12, hspace=0.35)
    return _finish_figure(fig, save_path, "pr_curves", tight=False)


def plot_error_breakdown(errors: Dict[str, Any], save_path: Optional[PathLike] = None,
                         title: Optional[str] = None) -> Optional[Path]:
    """Bar charts of `count_detection_errors`: what the counted detections were (correct or
    which kind of false positive) and how many objects were missed, overall (left) and
    per class (right, errors stacked, classes with most errors on top).

    `errors` is what `count_detection_errors` returns, or the result of
    `evaluate_detector(..., error_score_thresh=0.3)` (its "errors" entry is used)."""
    if isinstance(errors.get("errors"), dict):
        errors = errors["errors"]
    plt = _pyplot()
    kinds = ("correct",) + ERROR_KINDS + ("missed",)
    colors = {"correct": "tab:green", "localisation": "tab:orange", "confusion": "tab:purple",
              "duplicate": "tab:olive", "background": "tab:red", "missed": "tab:gray"}
    per_class = errors.get("per_class") or {}
    classes = sorted(per_class, key=lambda c: sum(per_class[c][k] for k in kinds[1:]))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 0.28 * max(len(classes), 8) + 1.6),
                                   gridspec_kw={"width_ratios": [1, 1.3]})
    counts = [errors[k] for k in kinds]
    y = np.arange(len(kinds))[::-1]
    ax0.barh(y, counts, color=[colors[k] for k in kinds])
    ax0.set_yticks(y, [k if k != "missed" else "missed objects" for k in kinds])
    n_det, n_obj = max(errors["detections"], 1), max(errors["objects"], 1)
    top = max(counts + [1])
    for yi, k, c in zip(y, kinds, counts):
        ax0.text(c + 0.01 * top, yi, f"{c} ({100 * c / (n_obj if k == 'missed' else n_det):.0f}%)", va="center",
                 fontsize=8)
    ax0.set_xlim(0, top * 1.3)
    ax0.set_xlabel("count (%: of the detections; for missed objects, of the objects)", fontsize=9)
    ax0.set_title(f"{plural(errors['detections'], 'detection')} with score >= {errors['score_thresh']:g}, "
                  f"{plural(errors['objects'], 'object')}", fontsize=10)
    ax0.grid(axis="x", alpha=0.3)
    left = np.zeros(len(classes))
    for k in kinds[1:]:
        values = np.asarray([per_class[c][k] for c in classes], dtype=float)
        ax1.barh(np.arange(len(classes)), values, left=left, color=colors[k], label=k)
        left += values
    ax1.set_yticks(np.arange(len(classes)), classes)
    ax1.tick_params(axis="y", labelsize=8)
    ax1.set_xlabel("errors (count)")
    ax1.set_title("errors per class", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(axis="x", alpha=0.3)
    for ax in (ax0, ax1):
        ax.xaxis.set_major_locator(_max_ticks(5))
    fig.suptitle(title or f"Where the errors are (AP{100 * errors['iou_threshold']:.0f} matching)", fontsize=11)
    fig.tight_layout()
    return _finish_figure(fig, save_path, "error_breakdown")


def _max_ticks(n: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=n, integer=True, min_n_ticks=2)


# ======================================================================================
# Command line
# ======================================================================================


def _build_fcos(num_classes: int = 20, backbone: str = "mobilenet_v2", pretrained: bool = True,
                freeze_backbone: bool = False, fpn_channels: int = 128, stem_channels: Sequence[int] = (128, 128),
                **extra: Any) -> nn.Module:
    import fcos

    return fcos.FCOS(num_classes=num_classes, fpn_channels=fpn_channels, stem_channels=list(stem_channels),
                     backbone=backbone, pretrained=pretrained, freeze_backbone=freeze_backbone, **extra)


def _build_faster_rcnn(num_classes: int = 20, backbone: str = "mobilenet_v2", pretrained: bool = True,
                       freeze_backbone: bool = False, fpn_channels: int = 64, stem_channels: Sequence[int] = (64, 64),
                       rpn_stem_channels: Sequence[int] = (64, 64), rpn_batch_size_per_image: int = 16,
                       roi_batch_size_per_image: int = 32, anchor_stride_scale: int = 8,
                       anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), pre_nms_topk: int = 400,
                       post_nms_topk: int = 80, roi_size: Sequence[int] = (7, 7), **extra: Any) -> nn.Module:
    import fcos
    import two_stage_detector as tsd

    fpn = fcos.DetectorBackboneWithFPN(out_channels=fpn_channels, backbone=backbone, pretrained=pretrained,
                                       freeze_backbone=freeze_backbone)
    rpn = tsd.RPN(fpn_channels=fpn_channels, stem_channels=list(rpn_stem_channels),
                  batch_size_per_image=rpn_batch_size_per_image, anchor_stride_scale=anchor_stride_scale,
                  anchor_aspect_ratios=list(anchor_aspect_ratios), pre_nms_topk=pre_nms_topk,
                  post_nms_topk=post_nms_topk)
    return tsd.FasterRCNN(fpn, rpn, stem_channels=list(stem_channels), num_classes=num_classes,
                          batch_size_per_image=roi_batch_size_per_image, roi_size=tuple(roi_size), **extra)


# The CPU recipe (frozen backbone + feature cache) of the README's results table, shared by
# the command line and benchmarks/accuracy.py. Two scale-jitter crops on top of the image and
# its flip let 3500 iterations help instead of overfit (orig + flip peaks near 2500).
CPU_RECIPE_ITERS = 3500
CPU_RECIPE_CACHE_VARIANTS = ("orig", "flip", "jitter0", "jitter1")
CPU_RECIPE_LR = {"fcos": 2e-2, "faster_rcnn": 1e-2}

# name -> builder(**kwargs). Tests may register small stand-ins here.
DETECTOR_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"fcos": _build_fcos, "faster_rcnn": _build_faster_rcnn}


def build_detector(config: Dict[str, Any], pretrained: Optional[bool] = None) -> nn.Module:
    """Rebuild a detector from the config stored in checkpoints:
    `{"detector": "fcos" | "faster_rcnn", "kwargs": {...}, ...}`. `pretrained`
    overrides the stored flag (False when the weights come from a checkpoint)."""
    kwargs = dict(config.get("kwargs", {}))
    if pretrained is not None:
        kwargs["pretrained"] = pretrained
    name = config["detector"]
    if name not in DETECTOR_BUILDERS:
        raise ValueError(f"Unknown detector {name!r}; known: {', '.join(DETECTOR_BUILDERS)}")
    return DETECTOR_BUILDERS[name](**kwargs)


def load_detector(checkpoint: PathLike, device: Union[str, torch.device] = "cpu", *,
                  trusted: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the detector described by a checkpoint and load its weights (safely: see
    `load_checkpoint` for `trusted`)."""
    ckpt = load_checkpoint(checkpoint, trusted=trusted)
    config = ckpt.get("config")
    if not config:
        raise ValueError(f"{checkpoint} holds no model config; it was not written by a5_helper's command line")
    detector = build_detector(config, pretrained=False)
    detector.load_state_dict(ckpt["model"])
    detector.to(resolve_device(device)).eval()
    return detector, config


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None so that metrics.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _first_n(dataset: Dataset, n: Optional[int]) -> Dataset:
    return Subset(dataset, list(range(min(n, len(dataset))))) if n else dataset


def _setup_torch_home() -> None:
    """Use the offline weight cache next to the repository when TORCH_HOME is unset."""
    shared = REPO_ROOT.parent / "shared" / "weights"
    if "TORCH_HOME" not in os.environ and shared.is_dir():
        os.environ["TORCH_HOME"] = str(shared)


def _write_eval_outputs(metrics: Dict[str, Any], out: Path, history: Optional[Dict[str, list]] = None) -> None:
    if history and history.get("total_loss"):
        plot_loss_history(history, save_path=out / "loss_curve.png")
    metric = metrics.get("ap_metric", AP_METRIC_NAMES[False])
    plot_per_class_ap(metrics["per_class"], save_path=out / "per_class_ap.png", title=f"AP@0.5 per class, {metric}")
    if "curves" in metrics:
        plot_pr_curves(metrics["curves"], save_path=out / "pr_curves.png", per_class_ap=metrics["per_class"])
    if metrics.get("errors"):
        plot_error_breakdown(metrics["errors"], save_path=out / "error_breakdown.png")


def _example_image(dataset: Dataset) -> Optional[str]:
    """An image file of `dataset` for the example `predict` command."""
    try:
        base, indices = _unwrap_subset(dataset)
        return str(base.instances[indices[0]][0]) if indices else None
    except (AttributeError, IndexError, TypeError):
        return None


def _metrics_for_json(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return _json_safe({k: v for k, v in metrics.items() if k != "curves"})


# ======================================================================================
# Command line: what a run says before it starts and after it ends
# ======================================================================================

DETECTOR_NAMES = {"fcos": "FCOS", "faster_rcnn": "Faster R-CNN"}
# `predict` draws at most this many detections per picture (the best-scoring ones);
# predictions.json lists all of them.
PREDICT_MAX_DRAWN = 20
# Detections at least this confident are those the error breakdown counts (and the
# default `predict --score-thresh`): a low-scoring box is not a mistake anybody sees.
ERROR_SCORE_THRESH = 0.3
# summary.txt reports the training loss as the mean over this many last iterations.
FINAL_LOSS_WINDOW = 100


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` that states a default once: "(default: X)" is added only where the help
    text does not already talk about its default, the option is not required, and the
    default says something (not None or False). Descriptions and epilogs keep their
    line breaks (the examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _feature_cache_bytes(detector: nn.Module, image_size: int, items: int) -> Optional[int]:
    """Bytes an fp16 feature cache of `items` images takes (one small forward pass to learn
    the feature shapes), or None when the backbone cannot tell."""
    try:
        backbone = _backbone_of(detector)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            feats = backbone.extract_features(torch.zeros(1, 3, image_size, image_size))
        backbone.train(was_training)
        per_item = sum(int(feats[k][0].numel()) for k in FEATURE_LEVELS) * 2 + 40 * 5 * 4
        return items * per_item
    except Exception:  # only an estimate for the start-up message
        return None


def _precision_text(amp: bool, device: torch.device) -> str:
    if amp:
        dtype = str(autocast_dtype(device)).replace("torch.", "")
        return f"{dtype} autocast, losses in float32 (--no-amp: all float32)"
    if device.type == "cuda":
        return "float32 (--amp: float16 autocast, faster)"
    if cpu_has_fast_bfloat16():
        return "float32 (--amp: bfloat16 autocast, about 1.8x faster on this CPU)"
    return "float32 (this CPU has no hardware bfloat16, where --amp would be slow)"


def _train_plan(args: argparse.Namespace, config: Dict[str, Any], device: torch.device, detector: nn.Module,
                train_set: Dataset, val_set: Dataset, out: Path) -> List[str]:
    """The start-up summary of `train`: what will run, where, and what it writes."""
    kw = config.get("kwargs", {})
    name = DETECTOR_NAMES.get(config["detector"], config["detector"])
    weights = "ImageNet weights" if kw.get("pretrained", True) else "random weights"
    mode = "frozen" if kw.get("freeze_backbone") else "trained end to end"
    threads = f", {plural(torch.get_num_threads(), 'thread')}" if device.type == "cpu" else ""
    image_size = config.get("image_size", args.image_size)
    lines = [f"Training {name} (backbone {kw.get('backbone')}, {weights}, {mode}) on {device}{threads}."]
    rows = [("precision", _precision_text(bool(args.amp), device)),
            ("data", f"{plural(len(train_set), 'train image')}, {plural(len(val_set), 'val image')} from "
                     f"{args.data_dir}, resized to {image_size} px")]
    if args.cache_features:
        variants = [v.strip() for v in args.cache_variants.split(",") if v.strip()]
        items = len(train_set) * len(variants)
        size = _feature_cache_bytes(detector, image_size, items)
        size_text = f"about {format_bytes(size)}" if size else "size unknown"
        what = (f"the frozen backbone's features of {plural(len(train_set), 'image')} x "
                f"{plural(len(variants), 'variant')} ({', '.join(variants)})")
        if args.cache_dir is None:
            where = (f"computed once, before training, and kept in memory ({size_text}); "
                     "--cache-dir DIR keeps them on disk for later runs")
        elif (Path(args.cache_dir) / "meta.json").is_file():
            where = (f"reused from {args.cache_dir} if it matches this backbone and image list, "
                     f"else computed once again ({size_text})")
        else:
            where = f"computed once into {args.cache_dir} ({size_text}); later runs with it reuse them"
        rows.append(("features", f"{what}: {where}"))
    else:
        rows.append(("features", "the backbone runs on every batch (no feature cache)"))
    warmup = args.warmup_iters if args.warmup_iters is not None else min(500, args.iters // 10)
    resume = ""
    if args.resume and (out / "last.pt").is_file():
        resume = f"; continues from {out / 'last.pt'}"
    rows.append(("training", f"{plural(args.iters, 'iteration')}, batch {args.batch_size}, lr {args.lr:g} "
                             f"({warmup} warm-up, {args.lr_schedule} decay), checkpoint every "
                             f"{plural(args.checkpoint_period, 'iteration')}{resume}"))
    rows.append(("evaluation", f"then on {plural(len(val_set), 'val image')}: VOC AP@0.5 (all-point and "
                               "11-point), COCO mAP, error breakdown"))
    rows.append(("output", f"{out}/ (checkpoints, metrics.json, summary.txt, plots)"))
    return lines + [f"  {key:<11} {value}" for key, value in rows]


def _final_loss(history: Dict[str, list]) -> Tuple[Optional[float], int]:
    """Mean of the last FINAL_LOSS_WINDOW logged total losses (one batch is noisy)."""
    losses = history.get("total_loss") or []
    window = min(FINAL_LOSS_WINDOW, len(losses))
    return (float(np.mean(losses[-window:])) if window else None), window


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _metric_lines(metrics: Dict[str, Any], split: str) -> List[str]:
    """The evaluation's headline numbers, both AP metrics named."""
    lines = [f"  {split} images  {metrics['num_images']}, {plural(metrics['num_detections'], 'detection')} kept for AP",
             f"  mAP@0.5     {_pct(metrics.get('mAP_all_point', metrics['mAP']))} all-point (VOC2010+), "
             f"{_pct(metrics.get('mAP_11_point'))} 11-point (VOC2007)",
             f"  COCO        mAP@[.5:.95] {_pct(metrics['coco_mAP'])}, AP50 {_pct(metrics['coco_AP50'])}"]
    if metrics.get("errors"):
        first, second = format_error_breakdown(metrics["errors"])
        lines += [f"  errors      {first}", f"              {second}"]
    return lines


def _next_commands(out: Path, args: argparse.Namespace, example_image: Optional[str]) -> List[str]:
    import shlex

    ckpt = shlex.quote(str(out / "model_final.pt"))
    data = "" if args.data_dir == str(default_data_dir()) else f" --data-dir {shlex.quote(str(args.data_dir))}"
    image = shlex.quote(example_image) if example_image else "IMAGE.jpg"
    return [f"  python a5_helper.py eval --checkpoint {ckpt}{data} --out {shlex.quote(str(out / 'eval_val'))}",
            f"  python a5_helper.py predict --checkpoint {ckpt} {image} --out {shlex.quote(str(out / 'predictions'))}"]


def _written_files(out: Path, names: Sequence[str]) -> List[str]:
    about = {
        "model_final.pt": "the trained model, for eval and predict",
        "last.pt": "the last checkpoint (train --resume continues from it)",
        "metrics.json": "every number of this run, per class too",
        "summary.txt": "this summary",
        "loss_curve.png": "training loss",
        "per_class_ap.png": "AP per class",
        "pr_curves.png": "precision-recall curve per class",
        "error_breakdown.png": "false positives by kind, missed objects",
    }
    return [f"  {name:<20} {about.get(name, '')}".rstrip() for name in names if (out / name).is_file()]


def _train_report(args: argparse.Namespace, config: Dict[str, Any], device: torch.device, out: Path,
                  metrics: Dict[str, Any], history: Dict[str, list], seconds: Dict[str, float],
                  example_image: Optional[str]) -> List[str]:
    """The end summary of `train` (also summary.txt): results, files written, what next."""
    kw = config.get("kwargs", {})
    name = DETECTOR_NAMES.get(config["detector"], config["detector"])
    loss, window = _final_loss(history)
    last = history["total_loss"][-1] if history.get("total_loss") else None
    loss_text = (f"{loss:.3g} (mean of the last {plural(window, 'iteration')}; the last batch: {last:.3g})"
                 if loss is not None else "n/a (no iterations ran)")
    features = f", cached features ({args.cache_variants})" if args.cache_features else ""
    lines = [f"Run summary ({out})",
             f"  detector    {name}, backbone {kw.get('backbone')} "
             f"({'frozen' if kw.get('freeze_backbone') else 'trained'}){features}",
             f"  training    {plural(len(history.get('total_loss') or []), 'iteration')}, batch {args.batch_size}, "
             f"image size {config.get('image_size', args.image_size)}, lr {args.lr:g} ({args.lr_schedule}), "
             f"{_precision_text(bool(args.amp), device).split(' (')[0]}, on {device}",
             f"  final loss  {loss_text}",
             f"  time        cache {format_duration(seconds['cache'])}, training {format_duration(seconds['train'])}, "
             f"evaluation {format_duration(seconds['eval'])}; total {format_duration(seconds['total'])}"]
    lines += _metric_lines(metrics, "val")
    files = ["model_final.pt", "last.pt", "metrics.json", "summary.txt", "loss_curve.png", "per_class_ap.png",
             "pr_curves.png", "error_breakdown.png"]
    lines += [f"Files in {out}:"] + _written_files(out, files)
    lines += ["Next:"] + _next_commands(out, args, example_image)
    return lines


def _cmd_train(args: argparse.Namespace) -> int:
    _setup_torch_home()
    rank, world, device = init_distributed(args.device)
    reset_seed(args.seed)
    out = Path(args.out or f"runs/{args.detector}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # "auto": a CPU cannot fine-tune a backbone in reasonable time, so there the default is
    # the frozen backbone with cached features; a GPU trains end to end.
    if args.frozen_backbone is None:
        args.frozen_backbone = device.type == "cpu"
    if args.cache_features is None:
        args.cache_features = args.frozen_backbone
    if args.cache_features and not args.frozen_backbone:
        raise SystemExit("--cache-features needs --frozen-backbone (cached features must not change during training)")
    if args.lr is None:
        args.lr = CPU_RECIPE_LR.get(args.detector, 1e-2)
    if args.amp is None:
        args.amp = default_amp(device)  # resolved here so that metrics.json records what ran

    if args.frozen_backbone and not args.pretrained and rank == 0:
        warnings.warn("--no-pretrained with a frozen backbone: the backbone keeps its random initialisation "
                      "and never trains, so only the FPN and heads learn (low accuracy). Pass --no-frozen-backbone "
                      "to train it, or drop --no-pretrained.")

    config: Dict[str, Any] = {
        "detector": args.detector,
        "image_size": args.image_size,
        "class_names": VOC_CLASSES,
        "kwargs": {"num_classes": len(VOC_CLASSES), "backbone": args.backbone, "pretrained": args.pretrained,
                   "freeze_backbone": args.frozen_backbone},
        # The data settings that shape what the model learns (checked by --resume).
        "data": {"max_train_images": args.max_train_images, "cache_features": bool(args.cache_features),
                 "cache_variants": args.cache_variants if args.cache_features else None},
    }
    # Widths default to each detector's course configuration (FCOS 128, Faster R-CNN 64).
    if args.fpn_channels is not None:
        config["kwargs"]["fpn_channels"] = args.fpn_channels
    if args.stem_channels is not None:
        config["kwargs"]["stem_channels"] = _int_list(args.stem_channels)
    resume_ckpt = out / "last.pt"
    existing = sorted(n for n in ("last.pt", "model_final.pt", "metrics.json") if (out / n).is_file())
    existing += [p.name for _, p in numbered_checkpoints(out)]
    changed: List[str] = []
    if not args.resume and existing:
        if not args.overwrite:
            raise SystemExit(f"{out} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                             "--overwrite to replace it (its checkpoints are deleted), or another --out.")
        if rank == 0:
            for name in existing:
                (out / name).unlink(missing_ok=True)
            print(f"--overwrite: deleted {', '.join(existing)} in {out}.")
    if args.resume and resume_ckpt.is_file():
        stored = load_resumable(resume_ckpt, trusted=args.trust_checkpoint, warn=False)[1].get("config")
        if stored:
            changed = _config_differences(stored, config)
            if changed and not args.allow_changed_settings:
                raise SystemExit(
                    f"--resume: {resume_ckpt} was trained with other settings (stored -> requested):\n  "
                    + "\n  ".join(changed)
                    + "\nRerun with the stored settings, use another --out for a new run, or pass "
                      "--allow-changed-settings to continue the stored model with the new data settings."
                )
            # The architecture cannot change under a checkpoint: the stored model is resumed.
            # Data settings come from this command line and are recorded as such.
            config = {**stored, "image_size": config["image_size"], "data": config["data"]}
            if changed and rank == 0:
                print("--allow-changed-settings: continuing the stored model "
                      f"({config['detector']}, {config['kwargs'].get('backbone')}) with: " + "; ".join(changed))
    try:
        detector = build_detector(config)
    except (RuntimeError, ValueError) as err:
        raise _with_flags(err) from err
    if rank == 0:
        run_record = {"config": config, "command": sys.argv, "resumed": bool(args.resume and resume_ckpt.is_file()),
                      "changed_settings": changed}
        (out / "run.json").write_text(json.dumps(_json_safe(run_record), indent=2))

    train_set = VOC2007DetectionTiny(args.data_dir, "train", download=args.download, image_size=args.image_size)
    train_set = _first_n(train_set, args.max_train_images)
    val_set = _first_n(VOC2007DetectionTiny(args.data_dir, "val", image_size=args.image_size), args.max_val_images)
    progress = "off" if rank != 0 else ("lines" if args.no_progress else "auto")
    if rank == 0:
        print("\n".join(_train_plan(args, config, device, detector, train_set, val_set, out)), flush=True)

    start = time.time()
    cache_seconds = 0.0
    if args.cache_features:
        variants = [v.strip() for v in args.cache_variants.split(",") if v.strip()]
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        if world > 1 and rank != 0 and cache_dir is not None:
            dist.barrier()  # rank 0 builds the on-disk cache first, then the others load it
        cache = build_feature_cache(detector, train_set, variants, cache_dir=cache_dir, batch_size=args.batch_size,
                                    device=device, num_workers=args.num_workers, progress=progress)
        if world > 1 and rank == 0 and cache_dir is not None:
            dist.barrier()
        cache_seconds = time.time() - start
        train_loader = DataLoader(cache, batch_size=args.batch_size, shuffle=True, collate_fn=collate_cached)
    else:
        train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                  pin_memory=device.type == "cuda", drop_last=True)

    history = train_detector(
        detector, train_loader, learning_rate=args.lr, weight_decay=args.weight_decay, max_iters=args.iters,
        log_period=args.log_period, device=device, lr_schedule=args.lr_schedule, warmup_iters=args.warmup_iters,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, checkpoint_dir=out,
        checkpoint_period=args.checkpoint_period, resume=args.resume, seed=args.seed,
        progress=progress, model_config=config, amp=args.amp,
        keep_checkpoints=args.keep_checkpoints, skip_nonfinite=args.skip_nonfinite,
        trust_checkpoint=args.trust_checkpoint,
    )
    train_seconds = time.time() - start - cache_seconds
    if rank != 0:
        dist.barrier()
        return 0
    save_checkpoint({"format": "a5_helper.model/1", "model": detector.state_dict(), "config": config},
                    out / "model_final.pt")
    metrics = evaluate_detector(detector, val_set, batch_size=args.eval_batch_size or args.batch_size,
                                score_thresh=args.score_thresh, nms_thresh=args.nms_thresh, device=device,
                                num_workers=args.num_workers, progress=progress, return_curves=True,
                                error_score_thresh=ERROR_SCORE_THRESH)
    _write_eval_outputs(metrics, out, history)
    total_seconds = time.time() - start
    final_loss, window = _final_loss(history)
    summary = {
        "config": config, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "val": _metrics_for_json(metrics),
        "train": {"iterations": len(history["total_loss"]),
                  "final_loss": history["total_loss"][-1] if history["total_loss"] else None,
                  "final_loss_mean": final_loss, "final_loss_window": window,
                  "cache_seconds": cache_seconds, "train_seconds": train_seconds,
                  "eval_seconds": metrics["seconds"], "total_seconds": total_seconds, "device": str(device),
                  "world_size": world},
    }
    (out / "metrics.json").write_text(json.dumps(_json_safe(summary), indent=2))
    (out / "summary.txt").touch()  # listed among the files written
    seconds = {"cache": cache_seconds, "train": train_seconds, "eval": metrics["seconds"], "total": total_seconds}
    example = _example_image(val_set)
    lines = _train_report(args, config, device, out, metrics, history, seconds, example)
    if changed:
        lines.insert(1, "resumed with changed settings (--allow-changed-settings): " + "; ".join(changed))
    if history.get("skipped"):
        lines.insert(1, f"skipped non-finite batches at iterations {[s['iteration'] for s in history['skipped']]}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"final val mAP: {metrics['mAP']:.4f}")
    if world > 1:
        dist.barrier()
    return 0


def _config_differences(stored: Dict[str, Any], requested: Dict[str, Any], prefix: str = "") -> List[str]:
    """`["image_size: 224 -> 64", ...]` for the settings that differ (keys a stored
    config does not record, from older versions, are not compared)."""
    lines = []
    for key in sorted(set(stored) | set(requested)):
        if key == "class_names" or key not in stored or key not in requested:
            continue
        a, b = stored[key], requested[key]
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _config_differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def _cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    detector, config = load_detector(args.checkpoint, device, trusted=args.trust_checkpoint)
    dataset = VOC2007DetectionTiny(args.data_dir, args.split, image_size=config.get("image_size", 224), augment=False)
    dataset = _first_n(dataset, args.max_val_images)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}"
    metric = AP_METRIC_NAMES[bool(args.use_07_metric)]
    print(f"Evaluating {args.checkpoint} ({DETECTOR_NAMES.get(config['detector'], config['detector'])}) on "
          f"{plural(len(dataset), args.split + ' image')} from {args.data_dir}, on {device}; AP@0.5 {metric}.",
          flush=True)
    metrics = evaluate_detector(detector, dataset, batch_size=args.batch_size, score_thresh=args.score_thresh,
                                nms_thresh=args.nms_thresh, device=device, num_workers=args.num_workers,
                                use_07_metric=args.use_07_metric, exact_tenths=args.exact_tenths,
                                progress="lines" if args.no_progress else "auto",
                                return_curves=True, error_score_thresh=ERROR_SCORE_THRESH)
    out.mkdir(parents=True, exist_ok=True)
    _write_eval_outputs(metrics, out)
    (out / "metrics.json").write_text(json.dumps(_metrics_for_json(metrics), indent=2))
    print(f"AP@0.5 per class, {metric}:")
    for cls, ap in metrics["per_class"].items():
        print(f"  {cls:<12} {'n/a (no such objects in these images)' if math.isnan(ap) else f'{ap:.3f}'}")
    print("\n".join(_metric_lines(metrics, args.split)))
    print(f"Files in {out}:")
    print("\n".join(_written_files(out, ["metrics.json", "per_class_ap.png", "pr_curves.png", "error_breakdown.png"])))
    other = "all-point" if args.use_07_metric else "11-point"
    other_value = metrics["mAP_all_point"] if args.use_07_metric else metrics["mAP_11_point"]
    print(f"{args.split} mAP: {metrics['mAP']:.4f} (AP@0.5, {metric}; {other}: {other_value:.4f})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    detector, config = load_detector(args.checkpoint, device, trusted=args.trust_checkpoint)
    class_names = config.get("class_names", VOC_CLASSES)
    idx_to_class = dict(enumerate(class_names))
    image_size = config.get("image_size", 224)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Drawing the detections of {args.checkpoint} with score >= {args.score_thresh:g} "
          f"(at most the {PREDICT_MAX_DRAWN} best per image) into {out}/", flush=True)
    results: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    for path in args.images:
        try:  # one unreadable file must not cost the others their results
            image, size = load_image_for_inference(path, image_size)
            with Image.open(path) as im:
                original = np.array(im.convert("RGB"))
        except (OSError, RuntimeError, ValueError) as err:
            skipped[str(path)] = str(err)
            warnings.warn(f"Skipping {path}: {err}")
            continue
        with torch.no_grad():
            pred = predict_batch(detector, image[None].to(device), args.score_thresh, args.nms_thresh)[0]
        keep = pred["labels"] >= 0
        boxes = boxes_to_original(pred["boxes"][keep].float().cpu(), size, image_size)
        labels, scores = pred["labels"][keep].cpu(), pred["scores"][keep].float().cpu()
        rows = torch.cat([boxes, labels[:, None].float(), scores[:, None]], dim=1)
        target = out / f"{Path(path).stem}_pred.png"
        count = len(scores)
        shown = min(count, PREDICT_MAX_DRAWN)
        title = f"{Path(path).name}: {plural(count, 'detection')}" + (f", the {shown} best drawn" if shown < count else "")
        detection_visualizer(original, idx_to_class, pred=rows, save_path=target, max_boxes=PREDICT_MAX_DRAWN,
                             title=title)
        results[str(path)] = [{"class": class_names[int(c)], "score": float(s), "box": [round(v, 2) for v in b]}
                              for b, c, s in zip(boxes.tolist(), labels.tolist(), scores.tolist())]
        drawn = f" (the {shown} best drawn)" if shown < count else ""
        print(f"{path}: {plural(count, 'detection')}{drawn} -> {target}")
    (out / "predictions.json").write_text(json.dumps(results, indent=2))
    print(f"{out / 'predictions.json'}: every detection with its class, score and box (original pixels)")
    if skipped:
        (out / "skipped.json").write_text(json.dumps(skipped, indent=2))
        print(f"{len(skipped)} of {len(args.images)} images could not be read (listed in {out / 'skipped.json'}); "
              f"predictions for the other {len(results)} are in {out / 'predictions.json'}.", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------
# Command-line value checks: argparse reports "argument --OPTION: <message>" and exits 2.
# --------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _float_in(low: float, high: float, low_open: bool = False, what: str = "") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


_positive_float = _float_in(0.0, math.inf, low_open=True, what="a positive number")
_nonnegative_float = _float_in(0.0, math.inf, what="a number >= 0")
_unit_float = _float_in(0.0, 1.0, what="a number in [0, 1]")


def _image_size_arg(text: str) -> int:
    value = _int_at_least(32, "an integer >= 32")(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the backbone's finest stride), got {value}")
    return value


def _channels_arg(text: str) -> str:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return text


def _variants_arg(text: str) -> str:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected at least one of orig, flip, jitter<k>, got {text!r}")
    bad = [n for n in names if n not in ("orig", "flip") and not (n.startswith("jitter") and n[6:].isdigit())]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant {bad[0]!r}: use orig, flip or jitter<k> (k = 0, 1, ...)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a variant is listed twice in {text!r}")
    return ",".join(names)


MAIN_EPILOG = """\
examples:
  python a5_helper.py train --detector fcos --out runs/fcos
  python a5_helper.py eval --checkpoint runs/fcos/model_final.pt
  python a5_helper.py predict --checkpoint runs/fcos/model_final.pt photo.jpg

'python a5_helper.py COMMAND --help' lists the options of each command."""

TRAIN_EPILOG = """\
examples:
  # the CPU recipe (frozen backbone, cached features; README, "Results")
  python a5_helper.py train --detector fcos --out runs/fcos
  python a5_helper.py train --detector faster_rcnn --out runs/frcnn --cache-dir runs/cache
  # a quick check that everything runs (a minute)
  python a5_helper.py train --iters 20 --max-train-images 64 --max-val-images 64 --out runs/smoke
  # the course's GPU schedule, end to end
  python a5_helper.py train --backbone regnet_x_400mf --iters 9000 --lr 8e-3 --lr-schedule step --out runs/fcos_gpu
  # continue an interrupted run
  python a5_helper.py train --out runs/fcos --resume

Output goes to --out; when it is not a terminal (a log file), progress is one line every
10 s ($A5_PROGRESS_SECONDS) with speed and ETA."""

EVAL_EPILOG = """\
examples:
  python a5_helper.py eval --checkpoint runs/fcos/model_final.pt
  python a5_helper.py eval --checkpoint runs/fcos/model_final.pt --use-07-metric --out runs/fcos/eval07
  python a5_helper.py eval --checkpoint runs/fcos/model_final.pt --max-val-images 200"""

PREDICT_EPILOG = """\
examples:
  python a5_helper.py predict --checkpoint runs/fcos/model_final.pt photo.jpg
  python a5_helper.py predict --checkpoint runs/fcos/model_final.pt *.jpg --score-thresh 0.5 --out runs/pred_05"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a5_helper.py",
        description="Train, evaluate and run the A5 detectors (FCOS, Faster R-CNN) on PASCAL VOC2007.",
        formatter_class=HelpFormatter,
        epilog=MAIN_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data_default = str(default_data_dir())

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=data_default,
                       help="VOC data folder (VOCdevkit layout and/or voc07_*.json); default: $VOC_ROOT, "
                            "else ../shared/data next to the repository if it exists, else ./data")
        p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
        p.add_argument("--num-workers", type=_nonnegative_int, default=min(2, os.cpu_count() or 1),
                       help="data-loading worker processes")
        p.add_argument("--score-thresh", type=_unit_float, default=0.05, help="score threshold for evaluation detections")
        p.add_argument("--nms-thresh", type=_unit_float, default=0.5, help="NMS IoU threshold at inference")
        p.add_argument("--no-progress", action="store_true",
                       help="progress as a plain line every few seconds instead of a bar (automatic when the "
                            "output is not a terminal)")
        p.add_argument("--threads", type=_nonnegative_int, default=0,
                       help="torch CPU threads (0: torch's default); 1 is often faster on a busy machine")

    t = sub.add_parser("train", help="train a detector, evaluate it on val, write plots and metrics",
                       description="Train a detector on VOC2007 train, evaluate it on val, and write checkpoints, "
                                   "metrics.json, summary.txt and plots to --out.",
                       formatter_class=HelpFormatter, epilog=TRAIN_EPILOG)
    t.add_argument("--detector", choices=sorted(DETECTOR_BUILDERS), default="fcos", help="which detector to train")
    t.add_argument("--backbone", default="mobilenet_v2",
                   help="torchvision backbone (mobilenet_v2 or regnet_x_400mf); ImageNet weights come from TORCH_HOME")
    t.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start the backbone from ImageNet weights")
    t.add_argument("--frozen-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the pretrained backbone fixed (eval mode, no gradients); only FPN and heads train. "
                        "Much faster on a CPU. Default: on when training on a CPU, off on a GPU")
    t.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="with --frozen-backbone: compute backbone features once per training image and variant, "
                        "then train from them instead of images. Default: on with --frozen-backbone")
    t.add_argument("--cache-variants", type=_variants_arg, default=",".join(CPU_RECIPE_CACHE_VARIANTS),
                   help="comma-separated image variants to cache: orig, flip, jitter0, jitter1, ...")
    t.add_argument("--cache-dir", default=None,
                   help="folder for an on-disk feature cache reused by later runs (default: in memory)")
    t.add_argument("--iters", type=_positive_int, default=CPU_RECIPE_ITERS,
                   help="training iterations (the CPU recipe; the course schedule on a GPU is 9000)")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="images per iteration (per process under torchrun)")
    t.add_argument("--eval-batch-size", type=_positive_int, default=None, help="images per inference batch (default: --batch-size)")
    t.add_argument("--image-size", type=_image_size_arg, default=224, help="images are resized to a square of this side")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (SGD, momentum 0.9). Default: the CPU recipe's, "
                        + ", ".join(f"{k} {v:g}" for k, v in CPU_RECIPE_LR.items()))
    t.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4, help="L2 weight decay")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision training (float16 autocast on CUDA, bfloat16 on CPU). Default: on for "
                        "CUDA and for CPUs with hardware bfloat16 (AMX / AVX512-BF16, ~1.8x faster there)")
    t.add_argument("--lr-schedule", choices=["step", "cosine"], default="cosine",
                   help="decay after warm-up: x0.1 at 60%% and 90%% (step) or cosine")
    t.add_argument("--warmup-iters", type=_nonnegative_int, default=None, help="linear warm-up length (default: min(500, iters/10))")
    t.add_argument("--grad-clip", type=_nonnegative_float, default=10.0, help="max gradient norm (0 disables)")
    t.add_argument("--fpn-channels", type=_positive_int, default=None,
                   help="FPN output channels (default: the course's, 128 for FCOS, 64 for Faster R-CNN)")
    t.add_argument("--stem-channels", type=_channels_arg, default=None,
                   help="comma-separated channels of the head stem convs (default: 128,128 for FCOS, 64,64 for "
                        "Faster R-CNN)")
    t.add_argument("--out", default=None,
                   help="output folder for checkpoints, metrics.json, plots, summary.txt (default: runs/DETECTOR)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    t.add_argument("--checkpoint-period", type=_positive_int, default=500, help="save OUT/last.pt every N iterations")
    t.add_argument("--log-period", type=_positive_int, default=20, help="log the losses every N iterations")
    t.add_argument("--max-train-images", type=_positive_int, default=None, help="use only the first N training images")
    t.add_argument("--max-val-images", type=_positive_int, default=None, help="evaluate on the first N val images only")
    t.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, initialisation)")
    t.add_argument("--download", action="store_true", help="download VOC2007 into --data-dir if it is missing")
    # Faults: existing runs, changed settings, NaN, checkpoint trust (see README "After a crash ...").
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in OUT (its checkpoints are deleted) instead of refusing")
    t.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: continue even if the model or data settings differ from the stored run "
                        "(the stored model is kept; the new data settings are used and recorded)")
    t.add_argument("--skip-nonfinite", type=_nonnegative_int, default=0,
                   help="skip up to N batches whose loss or gradient is NaN/inf (named in a warning) before stopping")
    t.add_argument("--keep-checkpoints", type=_positive_int, default=3,
                   help="how many OUT/ckpt_<iteration>.pt to keep (a NaN rolls last.pt back to the newest good one)")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="allow --resume from a file that needs arbitrary unpickling (only for files you trust)")
    common(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (VOC mAP + COCO cross-check)",
                       description="Evaluate a checkpoint: VOC AP@0.5 per class, COCO mAP, an error breakdown "
                                   "and plots.",
                       formatter_class=HelpFormatter, epilog=EVAL_EPILOG)
    e.add_argument("--checkpoint", required=True, help="last.pt or model_final.pt written by `train`")
    e.add_argument("--split", default="val", help="dataset split to evaluate")
    e.add_argument("--batch-size", type=_positive_int, default=16, help="images per inference batch")
    e.add_argument("--max-val-images", type=_positive_int, default=None, help="evaluate on the first N images only")
    e.add_argument("--use-07-metric", action="store_true",
                   help="report the 11-point AP (VOC2007) as the mAP instead of the all-point AP (VOC2010+); "
                        "both are printed")
    e.add_argument("--out", default=None,
                   help="folder for metrics.json and the plots (default: eval_SPLIT next to the checkpoint)")
    e.add_argument("--exact-tenths", action="store_true",
                   help="with --use-07-metric: exact recall thresholds 0, 0.1, ..., 1 instead of the devkit's arange")
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs arbitrary unpickling (can run code: only files you trust)")
    common(e)
    e.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="draw detections on image files",
                       description="Draw a checkpoint's detections on image files (one colour per class) and "
                                   "list them in predictions.json.",
                       formatter_class=HelpFormatter, epilog=PREDICT_EPILOG)
    p.add_argument("--checkpoint", required=True, help="last.pt or model_final.pt written by `train`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="runs/predictions", help="folder for annotated images and predictions.json")
    p.add_argument("--score-thresh", type=_unit_float, default=0.3,
                   help=f"minimum detection score to draw and list; at most the {PREDICT_MAX_DRAWN} best are drawn")
    p.add_argument("--nms-thresh", type=_unit_float, default=0.5, help="NMS IoU threshold")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_nonnegative_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs arbitrary unpickling (can run code: only files you trust)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    cli_before = _CLI_ACTIVE[0]
    _CLI_ACTIVE[0] = True  # messages name command-line flags
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as err:  # a bad file: its name, no traceback
        print(f"a5_helper.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _CLI_ACTIVE[0] = cli_before
        if dist.is_available() and dist.is_initialized() and "TORCHELASTIC_RUN_ID" in os.environ:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

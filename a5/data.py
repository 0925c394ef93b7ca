"""Data: the train / eval transforms, `VOC2007DetectionTiny`, loaders, download with checksum.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import tarfile
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from a5.utils import PathLike
from a5.progress import _use_bar, format_bytes, plural


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
        fmt = self._annotation_format(annotation_format, voc_root, json_path)
        self.annotation_format = fmt

        # self.instances: [(image_path, [{"name", "xyxy", "difficult"}, ...]), ...]
        self._sizes: Dict[int, Tuple[int, int]] = {}
        if fmt == "json":
            self.instances = self._read_json(json_path)
        else:
            if voc_root is None:
                raise FileNotFoundError(f"No VOCdevkit layout in {self.dataset_dir}.\n{EXPECTED_LAYOUT}")
            self.instances = self._read_voc(voc_root, split)

        self._check_instances()
        self._warned_truncation = False
        self.validation_report: Dict[str, list] = {}
        if validate:
            self._validate()

    def _annotation_format(self, annotation_format: str, voc_root: Optional[Path], json_path: Path) -> str:
        """"voc" or "json": the one asked for, or with "auto" the VOCdevkit layout if it has the split."""
        split, fmt = self.split, annotation_format
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
        return fmt

    def _check_instances(self) -> None:
        """Every class known and every image file present (else a clear error)."""
        split = self.split
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


@runtime_checkable
class MapsBoxesToOriginal(Protocol):
    """A dataset that can map predictions back to original image pixels and list every
    annotated object there (`VOC2007DetectionTiny`); evaluation and `inference_with_detector`
    then work in original pixels, otherwise in network-input pixels."""

    def get_annotation(self, index: int) -> List[Tuple[str, List[float], bool]]: ...

    def boxes_to_original(self, boxes: torch.Tensor, index: int) -> torch.Tensor: ...


@runtime_checkable
class NamesClasses(Protocol):
    """A dataset that names its classes: `idx_to_class[i]` is the name of class `i`
    (`VOC2007DetectionTiny`); evaluation otherwise assumes the 20 VOC classes."""

    idx_to_class: Dict[int, str]


@runtime_checkable
class NamesImages(Protocol):
    """A dataset that names each image (`image_id(index)`, e.g. VOC's "000005"); evaluation
    otherwise names an image by its file's stem."""

    def image_id(self, index: int) -> str: ...


@runtime_checkable
class HasEvalTransform(Protocol):
    """A dataset that may augment its items (`augment`) and can give a copy of itself with
    the evaluation transform (`eval_copy()`, `VOC2007DetectionTiny`)."""

    augment: bool

    def eval_copy(self) -> Dataset: ...


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
    if isinstance(dataset, HasEvalTransform) and dataset.augment:
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

"""Evaluation: PASCAL VOC mAP (devkit rules), the COCO cross-check, the error breakdown,
`evaluate_detector`.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from a5.utils import TensorDict, autocast_dtype, resolve_device
from a5.progress import ProgressReporter, _progress_mode, plural
from a5.data import MapsBoxesToOriginal, NamesClasses, NamesImages, VOC_CLASSES, _eval_view, _unwrap_subset
from a5.tta import predict_with_flip


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
    gt_by_class, dets_by_class = _group_by_class(ground_truths, detections, class_names)
    aps: Dict[str, float] = {}
    curves: Dict[str, Dict[str, list]] = {}
    for cls in class_names:
        dets = dets_by_class[cls]
        tp, fp, npos = _match_class_detections(gt_by_class[cls], dets, iou_threshold)
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


def _group_by_class(ground_truths: GroundTruths, detections: Detections, class_names: Sequence[str],
                    ) -> Tuple[Dict[str, Dict[str, Dict[str, np.ndarray]]], Dict[str, list]]:
    """`{class: {image_id: {"boxes": (M, 4), "difficult": (M,)}}}` and
    `{class: [(image_id, score, box), ...]}`, for the classes in `class_names`."""
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
    return gt_by_class, dets_by_class


def _match_class_detections(gts: Dict[str, Dict[str, np.ndarray]], dets: list, iou_threshold: float,
                            ) -> Tuple[np.ndarray, np.ndarray, int]:
    """The devkit's matching for one class: true / false positive flags of the detections in
    decreasing score order, and the number of non-difficult objects."""
    npos = int(sum((~g["difficult"]).sum() for g in gts.values()))
    taken = {image_id: np.zeros(len(g["difficult"]), dtype=bool) for image_id, g in gts.items()}
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
    return tp, fp, npos


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
    images = _objects_by_image(ground_truths, class_index, per_class)
    taken = {image_id: np.zeros(len(v[1]), dtype=bool) for image_id, v in images.items()}
    kept = [d for d in detections if d[1] in class_index and float(d[2]) >= score_thresh]
    # Per class by decreasing score, as the devkit (a stable sort keeps the input order on ties).
    kept.sort(key=lambda d: (class_index[d[1]], -float(d[2])))
    empty = (np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    for image_id, cls, _, box in kept:
        counts = per_class[cls]
        counts["detections"] += 1
        objects = images.get(image_id, empty)
        counts[_error_kind(box, class_index[cls], objects, taken.get(image_id), iou_threshold, background_iou)] += 1
    for image_id, (boxes, labels, difficult) in images.items():
        for j in np.flatnonzero(~difficult & ~taken[image_id]):
            per_class[class_names[int(labels[j])]]["missed"] += 1
    totals = {k: int(sum(c[k] for c in per_class.values())) for k in keys}
    return {**totals, "score_thresh": float(score_thresh), "iou_threshold": float(iou_threshold),
            "per_class": per_class}


def _objects_by_image(ground_truths: GroundTruths, class_index: Dict[str, int],
                      per_class: Dict[str, Dict[str, int]]) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every object of each image: boxes (M, 4), class index (M,), difficult (M,); counts the
    non-difficult objects per class into `per_class`."""
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
    return images


def _error_kind(box: Sequence[float], label: int, objects: Tuple[np.ndarray, np.ndarray, np.ndarray],
                taken: Optional[np.ndarray], iou_threshold: float, background_iou: float) -> str:
    """What one detection is (the rules of `count_detection_errors`): "correct" (then its object
    is marked in `taken`), "ignored", "duplicate", "confusion", "localisation" or "background"."""
    boxes, labels, difficult = objects
    ious = _iou_plus_one(np.asarray(box[:4], dtype=np.float64), boxes) if len(boxes) else np.zeros(0)
    same = labels == label
    if same.any():
        j = int(np.flatnonzero(same)[np.argmax(ious[same])])
        if ious[j] > iou_threshold:
            if difficult[j]:
                return "ignored"
            if not taken[j]:
                taken[j] = True
                return "correct"
            return "duplicate"
    best_same = float(ious[same].max()) if same.any() else 0.0
    best_other = float(ious[~same].max()) if (~same).any() else 0.0
    if best_other > iou_threshold:
        return "confusion"
    if best_same >= background_iou:
        return "localisation"
    if best_other >= background_iou:
        return "confusion"
    return "background"


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
    """The class names of `dataset` in class-index order (the VOC classes when it names none)."""
    if isinstance(dataset, NamesClasses):
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


@runtime_checkable
class BatchPredictor(Protocol):
    """A detector with batched inference (`FCOS`, `FasterRCNN`):
    `predict(images, score_thresh, nms_thresh) -> [{"boxes", "labels", "scores"}, ...]`,
    one dict per image. Detectors of the course interface have no `predict`."""

    def predict(self, images: torch.Tensor, score_thresh: float, nms_thresh: float) -> List[TensorDict]: ...


@torch.no_grad()
def predict_batch(detector: nn.Module, images: torch.Tensor, score_thresh: float, nms_thresh: float) -> List[TensorDict]:
    """`[{"boxes": (N, 4), "labels": (N,), "scores": (N,)}, ...]` for a batch of images.

    Uses `detector.predict` (batched) when available, else the course interface
    `detector(image[None], test_score_thresh=..., test_nms_thresh=...)` per image.
    """
    if isinstance(detector, BatchPredictor):
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


def _kept_detections(out: TensorDict, max_detections: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The valid, finite detections of one image (at most `max_detections`, the best-scoring),
    on the CPU, and whether all valid ones were finite."""
    boxes = out["boxes"].detach().float().cpu()
    labels = out["labels"].detach().cpu().long()
    scores = out["scores"].detach().float().cpu()
    valid = labels >= 0
    finite = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
    all_finite = bool(finite[valid].all())
    valid &= finite
    boxes, labels, scores = boxes[valid], labels[valid], scores[valid]
    if len(scores) > max_detections:
        top = scores.argsort(descending=True)[:max_detections]
        boxes, labels, scores = boxes[top], labels[top], scores[top]
    return boxes, labels, scores, all_finite


def _image_results(base: Dataset, b_index: int, path: str, out: TensorDict, gt_boxes: torch.Tensor,
                   class_names: Sequence[str], max_detections: int
                   ) -> Tuple[str, List[Tuple[str, Sequence[float], bool]], Detections, bool]:
    """One image's id, ground truth and detections in the format of `compute_voc_map`
    (original pixels when `base` can map boxes back, else network-input pixels with the
    ground truth of the batch), and whether all its valid detections were finite."""
    image_id = base.image_id(b_index) if isinstance(base, NamesImages) else Path(path).stem
    boxes, labels, scores, finite = _kept_detections(out, max_detections)
    if isinstance(base, MapsBoxesToOriginal):
        boxes = base.boxes_to_original(boxes, b_index)
        truths = base.get_annotation(b_index)
    else:
        g = gt_boxes[gt_boxes[:, 4] >= 0]
        truths = [(class_names[int(r[4])], r[:4].tolist(), False) for r in g]
    detections = [(image_id, class_names[label], score, box)
                  for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist())]
    return image_id, truths, detections, finite


def _warn_nonfinite(image_names: List[str]) -> None:
    """Says which images had NaN / infinite detections (dropped): the model has diverged."""
    if image_names:
        warnings.warn(f"Dropped NaN / infinite detections (boxes or scores) in {len(image_names)} images: "
                      + ", ".join(image_names[:5]) + (" ..." if len(image_names) > 5 else "")
                      + ". The model has probably diverged.")


def _check_test_flip(detector: nn.Module, test_flip: bool) -> None:
    """Test-time flip merges two batched `predict` calls: refuse detectors without one."""
    if test_flip and not isinstance(detector, BatchPredictor):
        raise TypeError(f"test_flip needs a detector with a batched predict(images, score_thresh=, nms_thresh=); "
                        f"{type(detector).__name__} has none")


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
    test_flip: bool = False,
) -> Tuple[GroundTruths, Detections]:
    """Run batched inference over every image of `dataset` (evaluation transform).

    `test_flip`: also detect on every image's mirror image and merge the two
    (`a5.tta.predict_with_flip`; twice the inference time, needs `detector.predict`).

    `progress`: True: a bar on a terminal, plain lines in a log (`ProgressReporter`);
    "lines": plain lines always; False / "off": silent.

    Returns `(ground_truths, detections)` in the format of `compute_voc_map`, in
    original image pixels when the dataset can map boxes back (VOC2007DetectionTiny),
    otherwise in network-input pixels with the ground truth taken from the batch.
    Images without detections are still listed in `ground_truths`.
    """
    device = resolve_device(device)
    _check_test_flip(detector, test_flip)
    dataset = _eval_view(dataset)
    base, base_indices = _unwrap_subset(dataset)
    if class_names is None:
        class_names = _class_names_of(base)
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
        with _eval_autocast(device, amp), torch.no_grad():
            outputs = (predict_with_flip(detector, images, score_thresh, nms_thresh, max_per_image=max_detections)
                       if test_flip else predict_batch(detector, images, score_thresh, nms_thresh))
        for k, (index, path) in enumerate(zip(indices, paths)):
            image_id, truths, found, finite = _image_results(base, base_indices[index], path, outputs[k],
                                                             gt_boxes[k], class_names, max_detections)
            if not finite:  # a diverged model: drop, but say so
                nonfinite_images.append(Path(path).name)
            ground_truths[image_id] = truths
            detections.extend(found)
        bar.update(len(indices))
    bar.close()
    detector.train(was_training)
    _warn_nonfinite(nonfinite_images)
    return ground_truths, detections


def _other_metric_map(result: Dict[str, Any], use_07_metric: bool, exact_tenths: bool) -> float:
    """The mAP with the metric `use_07_metric` did not choose, from the same precision/recall
    curves of `compute_voc_map` (no second matching pass)."""
    other = {}
    for cls, ap in result["per_class"].items():
        curve = result["curves"][cls]
        other[cls] = ap if math.isnan(ap) else voc_ap(np.asarray(curve["recall"]), np.asarray(curve["precision"]),
                                                      not use_07_metric, exact_tenths=exact_tenths)
    valid = [ap for ap in other.values() if not math.isnan(ap)]
    return float(np.mean(valid)) if valid else float("nan")


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
    test_flip: bool = False,
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
        `error_score_thresh`, when it is given). `test_flip`: see `collect_predictions`.
    """
    start = time.time()
    ground_truths, detections = collect_predictions(
        detector, dataset, batch_size, score_thresh, nms_thresh, device, dtype, num_workers, max_detections, amp, progress,
        test_flip=test_flip,
    )
    class_names = _class_names_of(_unwrap_subset(dataset)[0])
    result = compute_voc_map(ground_truths, detections, class_names, iou_threshold, use_07_metric, return_curves=True,
                             exact_tenths=exact_tenths)
    other_map = _other_metric_map(result, use_07_metric, exact_tenths)
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
                   "test_flip": bool(test_flip), "seconds": time.time() - start})
    return result

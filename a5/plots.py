"""Pictures: detections, dataset grids, loss curves, per-class AP, PR curves, error breakdown;
`inference_with_detector`.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from a5.utils import PathLike, TensorDict, move_to_device, resolve_device
from a5.progress import plural
from a5.data import MapsBoxesToOriginal, IMAGENET_MEAN, IMAGENET_STD, _eval_view, _unwrap_subset
from a5.evaluation import ERROR_KINDS, _indexed_loader, predict_batch


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


def _write_detection_files(output_dir: Path, name: str, idx_to_class: Dict[int, str], boxes: torch.Tensor,
                           labels: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor,
                           base: Optional[MapsBoxesToOriginal], b_index: Optional[int]) -> None:
    """One image's `detection-results/<name>` and `ground-truth/<name>` (see `inference_with_detector`);
    in original image pixels when `base` (the dataset) can map them back."""
    if base is not None:
        boxes_out = base.boxes_to_original(boxes, b_index)
        gt_lines = [f"{c} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}" + (" difficult" if d else "")
                    for c, b, d in base.get_annotation(b_index)]
    else:
        boxes_out = boxes
        gt_lines = [f"{idx_to_class[int(b[4])]} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}" for b in gt.tolist()]
    det_lines = [f"{idx_to_class[int(c)]} {s:.6f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}"
                 for b, c, s in zip(boxes_out.tolist(), labels.tolist(), scores.tolist())]
    (output_dir / "ground-truth" / name).write_text("".join(line + "\n" for line in gt_lines))
    (output_dir / "detection-results" / name).write_text("".join(line + "\n" for line in det_lines))


def _inference_batches(test_loader: Iterable) -> Tuple[Iterable, Optional[MapsBoxesToOriginal], List[int]]:
    """The `(indices, (image_paths, images, gt_boxes))` batches of `test_loader`, and the
    dataset with the base index of each item when it can map boxes back to original
    pixels (a DataLoader of one; read with the evaluation transform), else `(None, [])`."""
    if isinstance(test_loader, Dataset) and not isinstance(test_loader, torch.utils.data.IterableDataset):
        test_loader = DataLoader(test_loader, batch_size=1)
    use_dataset = isinstance(test_loader, DataLoader) and not isinstance(
        test_loader.dataset, torch.utils.data.IterableDataset
    )
    if not use_dataset:
        return _as_batches(test_loader), None, []
    dataset = _eval_view(test_loader.dataset)
    base, base_indices = _unwrap_subset(dataset)
    loader = _indexed_loader(dataset, test_loader.batch_size or 1, test_loader.num_workers, test_loader.collate_fn)
    if not isinstance(base, MapsBoxesToOriginal):
        return loader, None, []
    return loader, base, base_indices


def _empty_result_dirs(output_dir: PathLike) -> None:
    """`output_dir/detection-results` and `output_dir/ground-truth`, created empty."""
    for d in (Path(output_dir) / "detection-results", Path(output_dir) / "ground-truth"):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)


def _valid_detections(out: TensorDict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(boxes, labels, scores)` of one image's valid detections (label >= 0), on the CPU."""
    valid = out["labels"] >= 0
    boxes = out["boxes"][valid].detach().float().cpu()
    labels = out["labels"][valid].detach().cpu().long()
    scores = out["scores"][valid].detach().float().cpu()
    return boxes, labels, scores


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
    loader, base, base_indices = _inference_batches(test_loader)
    if output_dir is not None:
        _empty_result_dirs(output_dir)
    for indices, (image_paths, images, gt_boxes) in loader:
        images = move_to_device(images, device, dtype)
        outputs = predict_batch(detector, images, score_thresh, nms_thresh)
        for k, index in enumerate(indices):
            boxes, labels, scores = _valid_detections(outputs[k])
            gt = gt_boxes[k][gt_boxes[k][:, 4] >= 0].cpu()
            if output_dir is not None:
                b_index = None if base is None else base_indices[index]
                _write_detection_files(Path(output_dir), Path(image_paths[k]).stem + ".txt", idx_to_class,
                                       boxes, labels, scores, gt, base, b_index)
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


def _draw_boxes(ax, idx_to_class: Dict[int, str], pred_rows: List[list], gt_rows: List[list],
                ) -> List[Tuple[Sequence[float], str, Sequence[float]]]:
    """Draw the boxes (predictions solid, ground truth dashed; a colour per class) and return
    the labels to place: (box, text, colour)."""
    from matplotlib.patches import Rectangle

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
    return labels


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
    labels = _draw_boxes(ax, idx_to_class, pred_rows, gt_rows)
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

"""Accuracy of our detectors next to torchvision's, trained and evaluated the same way.

    # CPU: frozen ImageNet MobileNetV2, features cached once, heads trained from the cache
    python benchmarks/accuracy.py --detector all --impl ours,torchvision --iters 3000
    # a quick look (a few minutes): fewer images and iterations
    python benchmarks/accuracy.py --detector fcos --iters 200 --max-train-images 400 --max-val-images 300
    # GPU: the course's end-to-end schedule
    python benchmarks/accuracy.py --mode end-to-end --device cuda --iters 9000 --lr 0.005 --schedule step

One command trains and evaluates every requested (detector, implementation) pair with

* the same data: VOC2007 ``train`` (2500 images) at 224 px; in ``frozen-cache`` mode the
  frozen backbone's features of every image and variant (``--cache-variants``) are computed
  once by ``a5_helper.build_feature_cache`` and shared by all runs (c3/c4 with
  ``--tune-last-stage``, whose runs recompute c5; c3/c4/c5 without);
* the same starting point: ImageNet MobileNetV2 weights (offline in ``TORCH_HOME``), the
  same seed for the new layers' initialisation and for the data order;
* the same training loop: ``a5_helper.train_detector`` (SGD, warm-up, cosine or step
  decay, gradient clipping, checkpoints with exact resume). torchvision's ``FCOS`` and
  ``FasterRCNN`` run through ``tv_adapters.TorchvisionDetector``, configured like ours;
* the same evaluation: all of VOC2007 ``val`` (2508 images, whole image, no crop),
  predictions mapped back to original pixels, ``a5_helper.compute_voc_map`` (devkit rules,
  difficult objects ignored) with all-point and 11-point (VOC07) AP at IoU 0.5, per class,
  plus pycocotools' COCO AP as a cross-check. In ``frozen-cache`` mode the val features come
  from a cache too (the same frozen backbone, stored in float16).

Long runs survive interruption: every run checkpoints to ``OUT/<detector>_<impl>/last.pt``
and re-running the same command resumes it (finished runs are not retrained; wall time is
accumulated across resumes). Outputs in ``OUT``: ``<run>/metrics.json`` and
``<run>/history.json`` per run, ``results.md`` (all runs), ``loss_curves.png`` and
``detections_<detector>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    from . import common  # type: ignore
except ImportError:  # script mode: benchmarks/ is sys.path[0]
    import common  # type: ignore

import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

DETECTORS = ("fcos", "faster_rcnn")
IMPLS = ("ours", "torchvision")
NAMES = {"fcos": "FCOS", "faster_rcnn": "Faster R-CNN", "ours": "ours", "torchvision": "torchvision"}


# --------------------------------------------------------------------------------------
# Data and feature caches
# --------------------------------------------------------------------------------------


def _first_n(dataset, n: Optional[int]):
    return Subset(dataset, list(range(min(n, len(dataset))))) if n else dataset


def load_datasets(args: argparse.Namespace):
    """VOC2007 train (augmented in end-to-end mode) and val (evaluation transform)."""
    import a5_helper as H

    train = H.VOC2007DetectionTiny(args.data_dir, "train", image_size=args.image_size,
                                   augment=args.mode == "end-to-end")
    val = H.VOC2007DetectionTiny(args.data_dir, "val", image_size=args.image_size, augment=False)
    return _first_n(train, args.max_train_images), _first_n(val, args.max_val_images)


def frozen_backbone(args: argparse.Namespace) -> torch.nn.Module:
    """The frozen backbone whose features all runs share (its FPN layers are unused). With
    --tune-last-stage every run recomputes c5 from the cached c4, so the cache leaves c5 out
    (``a5_helper.cached_levels``)."""
    import fcos

    return fcos.DetectorBackboneWithFPN(64, backbone=args.backbone, pretrained=args.pretrained, freeze_backbone=True,
                                        tune_last_stage=bool(args.tune_last_stage))


def build_cache(backbone: torch.nn.Module, dataset, variants: Sequence[str], cache_dir: Path,
                args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """``a5_helper.build_feature_cache`` on disk, with its build time remembered.

    The time of the run that built the cache is stored next to it (``timing.json``), so
    that later runs, which only load it, still report what building it cost.
    """
    import a5_helper as H

    start = time.time()
    cache = H.build_feature_cache(backbone, dataset, variants, cache_dir=cache_dir, batch_size=args.cache_batch_size,
                                  device=args.device, num_workers=args.num_workers, progress=not args.no_progress)
    seconds = time.time() - start
    timing_file = cache_dir / "timing.json"
    key = cache.meta.get("key")
    stored = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if stored.get("key") != key:  # built by this call
        stored = {"key": key, "build_seconds": seconds, "images": len(dataset), "variants": list(variants),
                  "machine": common.machine_line(common.machine_info(torch.device(args.device)))}
        timing_file.write_text(json.dumps(stored, indent=1))
    return cache, {"build_seconds": stored["build_seconds"], "this_call_seconds": seconds,
                   "images": len(dataset), "variants": list(variants), "dir": str(cache_dir)}


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def pair_config(kind: str, args: argparse.Namespace) -> "common.PairConfig":
    cfg = common.PairConfig(backbone=args.backbone, pretrained=args.pretrained,
                            freeze_backbone=args.mode == "frozen-cache", image_size=args.image_size,
                            score_thresh=args.score_thresh, nms_thresh=args.nms_thresh)
    cfg.fcos.tv_head_norm = args.tv_fcos_head_norm
    cfg.tune_last_stage = bool(args.tune_last_stage) and args.mode == "frozen-cache"
    if args.small:  # tiny widths, for smoke tests only
        cfg.fcos.fpn_channels, cfg.fcos.stem_channels = 32, (32, 32)
        cfg.faster_rcnn.fpn_channels = 32
        cfg.faster_rcnn.rpn_stem_channels = cfg.faster_rcnn.roi_stem_channels = (32, 32)
    return cfg


def build_model(kind: str, impl: str, args: argparse.Namespace) -> torch.nn.Module:
    """Ours, or torchvision's configured like ours with a copy of our (frozen) backbone."""
    cfg = pair_config(kind, args)
    ours = common.build_ours(kind, cfg)
    if impl == "ours":
        return ours
    return common.build_torchvision(kind, cfg, ours)


def learning_rate(kind: str, args: argparse.Namespace) -> float:
    """--lr, or the CPU recipe's learning rate of this detector."""
    import a5_helper as H

    return args.lr if args.lr is not None else H.CPU_RECIPE_LR[kind]


def iterations(kind: str, args: argparse.Namespace) -> int:
    """--iters, or the CPU recipe's iterations of this detector at the run's precision
    (longer with autocast: the recipe is sized to a time budget)."""
    import a5_helper as H

    if args.iters is not None:
        return args.iters
    amp = args.amp if args.amp is not None else H.default_amp(args.device)
    return H.cpu_recipe_iters(kind, amp)


def precision(args: argparse.Namespace) -> str:
    """What the training step computes in: autocast dtype (a5_helper's choice) or float32."""
    import a5_helper as H

    return str(H.autocast_dtype(args.device) if args.amp else torch.float32).replace("torch.", "")


def run_config(kind: str, impl: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Everything that defines a run; a resumed run must match it exactly."""
    cfg = pair_config(kind, args)
    return {
        "detector": kind, "impl": impl, "mode": args.mode, "model": common.ours_model_config(kind, cfg),
        "tv_fcos_head_norm": args.tv_fcos_head_norm if impl == "torchvision" and kind == "fcos" else None,
        "iters": iterations(kind, args), "batch_size": args.batch_size, "lr": learning_rate(kind, args), "schedule": args.schedule,
        "warmup_iters": args.warmup_iters, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
        "precision": precision(args), "seed": args.seed, "cache_variants": list(args.cache_variants) if args.mode == "frozen-cache" else None,
        "max_train_images": args.max_train_images, "image_size": args.image_size,
    }


# --------------------------------------------------------------------------------------
# Training (a5_helper.train_detector, resumable) and evaluation
# --------------------------------------------------------------------------------------


def _previous_wall_seconds(checkpoint: Path) -> float:
    """Training wall time accumulated up to the checkpoint we resume from."""
    if not checkpoint.is_file():
        return 0.0
    import a5_helper as H

    history = H.load_checkpoint(checkpoint).get("history") or {}
    marks = [v.get("wall_seconds") for v in history.get("val", []) if isinstance(v, dict)]
    marks = [m for m in marks if m is not None]
    return float(marks[-1]) if marks else 0.0


def train_run(model: torch.nn.Module, loader: DataLoader, run_dir: Path, config: Dict[str, Any],
              args: argparse.Namespace) -> Tuple[Dict[str, list], float]:
    """Train (or resume) one run; returns the loss history and the total training seconds.

    Wall time across interruptions: ``train_detector`` calls ``val_fn`` right before it
    writes each checkpoint, and stores its result in the checkpointed history; ours just
    returns the elapsed training time, so a resumed run continues the count.
    """
    import a5_helper as H

    checkpoint = run_dir / "last.pt"
    prior = _previous_wall_seconds(checkpoint)
    start = time.time()

    def clock(_model: torch.nn.Module) -> Dict[str, float]:
        return {"wall_seconds": prior + time.time() - start}

    history = H.train_detector(
        model, loader, learning_rate=config["lr"], weight_decay=args.weight_decay, max_iters=config["iters"],
        log_period=args.log_period, device=args.device, lr_schedule=args.schedule, warmup_iters=args.warmup_iters,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, amp=args.amp, checkpoint_dir=run_dir,
        checkpoint_period=args.checkpoint_period, resume=True, seed=args.seed, progress=not args.no_progress,
        val_fn=clock, val_period=args.checkpoint_period, model_config=config,
    )
    marks = [v["wall_seconds"] for v in history.get("val", []) if isinstance(v, dict) and "wall_seconds" in v]
    return history, (marks[-1] if marks else prior + time.time() - start)


@torch.no_grad()
def collect_cached_predictions(model: torch.nn.Module, cache, val_set, args: argparse.Namespace):
    """Like ``a5_helper.collect_predictions``, reading the val images' cached features.

    Row ``i`` of the cache is item ``i`` of ``val_set`` (variant "orig": the whole image,
    no crop; with ``--test-flip`` variant "flip", its mirror image, is detected on too and
    the two merged, ``a5.tta.predict_with_flip``). Boxes are mapped back to original pixels and compared with every annotated
    object of the image (``get_annotation``: difficult ones included, flagged).
    """
    import a5_helper as H
    from a5.data import _unwrap_subset

    from a5.tta import predict_with_flip

    base, base_indices = _unwrap_subset(val_set)
    class_names = [base.idx_to_class[i] for i in sorted(base.idx_to_class)]
    device = torch.device(args.device)
    model.to(device).eval()
    ground_truths: Dict[str, list] = {}
    detections: List[tuple] = []
    for first in range(0, len(base_indices), args.eval_batch_size):
        rows = list(range(first, min(first + args.eval_batch_size, len(base_indices))))
        _, feats, _ = cache.get_batch(rows, [0] * len(rows))
        feats = {k: v.to(device) for k, v in feats.items()}
        if args.test_flip:
            _, mirrored, _ = cache.get_batch(rows, [1] * len(rows))
            mirrored = {k: v.to(device) for k, v in mirrored.items()}
            outputs = predict_with_flip(model, feats, args.eval_score_thresh, args.eval_nms_thresh, mirrored,
                                        max_per_image=args.max_detections, width=args.image_size)
        else:
            outputs = H.predict_batch(model, feats, args.eval_score_thresh, args.eval_nms_thresh)
        for row, out in zip(rows, outputs):
            index = base_indices[row]
            image_id = base.image_id(index)
            labels = out["labels"].cpu().long()
            scores, boxes = out["scores"].float().cpu(), out["boxes"].float().cpu()
            top = scores.argsort(descending=True)[: args.max_detections]
            boxes = base.boxes_to_original(boxes[top], index)
            ground_truths[image_id] = base.get_annotation(index)
            for box, label, score in zip(boxes.tolist(), labels[top].tolist(), scores[top].tolist()):
                detections.append((image_id, class_names[label], score, box))
    return ground_truths, detections, class_names


def evaluate_run(model: torch.nn.Module, val_set, val_cache, args: argparse.Namespace) -> Dict[str, Any]:
    """VOC AP@0.5 all-point and 11-point (per class) + COCO cross-check, timed."""
    import a5_helper as H

    start = time.time()
    if val_cache is not None:
        gts, dets, class_names = collect_cached_predictions(model, val_cache, val_set, args)
    else:
        gts, dets = H.collect_predictions(model, val_set, batch_size=args.eval_batch_size,
                                          score_thresh=args.eval_score_thresh, nms_thresh=args.eval_nms_thresh,
                                          device=args.device, num_workers=args.num_workers,
                                          max_detections=args.max_detections, progress=not args.no_progress,
                                          test_flip=args.test_flip)
        class_names = list(H.VOC_CLASSES)
    voc = H.compute_voc_map(gts, dets, class_names, 0.5, use_07_metric=False)
    voc07 = H.compute_voc_map(gts, dets, class_names, 0.5, use_07_metric=True)
    # The COCO cross-check is not part of the timed evaluation (pycocotools is slow).
    eval_seconds = time.time() - start
    coco = H.compute_coco_map(gts, dets, class_names) if args.coco else {}
    return {
        "mAP": voc["mAP"], "mAP_07": voc07["mAP"],
        "per_class": voc["per_class"], "per_class_07": voc07["per_class"],
        "coco_mAP": coco.get("mAP"), "coco_AP50": coco.get("AP50"),
        "num_images": len(gts), "num_detections": len(dets), "eval_seconds": eval_seconds,
        "test_flip": bool(args.test_flip),
    }


# --------------------------------------------------------------------------------------
# Report: results.md, loss curves, detection pictures
# --------------------------------------------------------------------------------------


def _fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(out: Path) -> str:
    """The table of every finished run under ``out`` (+ per-class AP), as markdown."""
    runs = []
    for path in sorted(out.glob("*/metrics.json")):
        runs.append(json.loads(path.read_text()))
    if not runs:
        return "(no finished runs)\n"
    rows = []
    for m in runs:
        c = m["config"]
        mode = "frozen backbone, feature cache" if c["mode"] == "frozen-cache" else "end-to-end"
        schedule = f"{c['iters']} it x {c['batch_size']}, lr {c['lr']} {c['schedule']}"
        if c.get("precision", "float32") != "float32":  # runs recorded before the field were float32
            schedule += f", {c['precision']} autocast"
        if m["val"].get("test_flip"):
            schedule += ", test-time flip"
        t = m["timing"]
        cache_seconds = sum(v["build_seconds"] for v in (t.get("cache") or {}).values())
        total = cache_seconds + t["train_seconds"] + t["eval_seconds"]
        rows.append([NAMES[c["detector"]], m["impl"], c["model"]["kwargs"]["backbone"], mode, schedule,
                     _pct(m["val"]["mAP"]), _pct(m["val"]["mAP_07"]), _pct(m["val"].get("coco_mAP")),
                     _fmt_seconds(cache_seconds) if cache_seconds else "-", _fmt_seconds(t["train_seconds"]),
                     _fmt_seconds(t["eval_seconds"]), _fmt_seconds(total), f"{m['val']['num_images']}",
                     m["machine_line"]])
    header = ["detector", "impl", "backbone", "mode", "schedule", "mAP@0.5 all-point (%)", "mAP@0.5 VOC07 11-pt (%)",
              "COCO mAP (%)", "cache build (train + val)", "training time", "eval time", "total", "val images",
              "machine, date"]
    text = common.markdown_table(header, rows) + "\n"
    text += ("\nTotal = cache build + training + evaluation (prediction on every val image and VOC AP; "
             "the pycocotools cross-check is not timed).\n")
    caches = set()
    for m in runs:
        for split, v in (m["timing"].get("cache") or {}).items():
            caches.add((split, v["images"], tuple(v["variants"]), round(v["build_seconds"])))
    for split, images, variants, seconds in sorted(caches):
        text += (f"\nFeature cache ({split}): {images} images x {len(variants)} variants "
                 f"({', '.join(variants)}), built in {_fmt_seconds(seconds)}.")
    text += "\n\nAP@0.5 per class (all-point, %):\n\n"
    classes = list(runs[0]["val"]["per_class"])
    per_rows = [[f"{NAMES[m['config']['detector']]} ({m['impl']})"] +
                [_pct(m["val"]["per_class"].get(cls)) for cls in classes] for m in runs]
    text += common.markdown_table(["run"] + classes, per_rows) + "\n"
    commands = sorted({m["command"] for m in runs if m.get("command")})
    if commands:
        text += "\nCommands:\n\n" + "\n".join(f"    {c}" for c in commands) + "\n"
    return text


def finished_histories(out: Path) -> Dict[Tuple[str, str], Dict[str, list]]:
    """The loss history of every finished run under ``out`` (``<kind>_<impl>/history.json``
    next to a metrics.json), keyed by ``(kind, impl)``."""
    histories = {}
    for kind in DETECTORS:
        for impl in IMPLS:
            run = out / f"{kind}_{impl}"
            if (run / "metrics.json").is_file() and (run / "history.json").is_file():
                histories[(kind, impl)] = json.loads((run / "history.json").read_text())
    return histories


def plot_loss_curves(out: Path, histories: Dict[Tuple[str, str], Dict[str, list]]) -> Optional[Path]:
    """Smoothed total training loss per detector, ours vs torchvision (small PNG).

    The two implementations normalise their losses differently (e.g. our FCOS divides by
    an EMA of the foreground count), so compare the shapes, not the absolute values.
    """
    import a5_helper as H
    from a5.plots import _pyplot

    if not histories:
        return None
    plt = _pyplot()
    kinds = sorted({k for k, _ in histories}, key=DETECTORS.index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for impl in IMPLS:
            h = histories.get((kind, impl))
            if not h or not h.get("total_loss"):
                continue
            window = max(1, min(50, len(h["total_loss"]) // 10))
            ax.plot(h["iteration"], H.smooth_curve(h["total_loss"], window), label=impl, linewidth=1.5)
        ax.set_title(f"{NAMES[kind]}: training loss", fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_detections(out: Path, kind: str, models: Dict[str, torch.nn.Module], val_set, val_cache,
                    args: argparse.Namespace) -> Optional[Path]:
    """One val image with the detections (score >= 0.4) of each implementation (small PNG)."""
    import a5_helper as H
    from a5.data import _unwrap_subset
    from a5.plots import _pyplot

    if not models:
        return None
    plt = _pyplot()
    base, base_indices = _unwrap_subset(val_set)
    row = min(args.picture_index, len(base_indices) - 1)
    _, image, gt = base.get_variant(base_indices[row], "orig")
    if val_cache is not None:
        _, x, _ = val_cache.get_batch([row], [0])
    else:
        x = image[None]
    device = torch.device(args.device)
    x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), squeeze=False)
    for ax, (impl, model) in zip(axes[0], models.items()):
        pred = H.predict_batch(model.to(device), x, 0.4, args.eval_nms_thresh)[0]
        rows = torch.cat([pred["boxes"].float().cpu(), pred["labels"].float().cpu()[:, None],
                          pred["scores"].float().cpu()[:, None]], dim=1)
        # The notebooks' drawing: class colours, labels placed where they overlap nothing.
        H.draw_detections(ax, H.unnormalize_image(image), base.idx_to_class, gt, rows, fontsize=6)
        ax.set_title(f"{NAMES[kind]} ({impl})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / f"detections_{kind}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _add_evaluation_args(p: argparse.ArgumentParser) -> None:
    """How the val images are evaluated (the devkit protocol's thresholds, test-time flip)."""
    p.add_argument("--eval-score-thresh", type=float, default=0.05)
    p.add_argument("--eval-nms-thresh", type=float, default=0.5)
    p.add_argument("--test-flip", action="store_true",
                   help="also detect on each val image's mirror image and merge (val cache with 'orig', 'flip')")
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--coco", action=argparse.BooleanOptionalAction, default=True,
                   help="also compute pycocotools' COCO mAP (cross-check)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    import a5_helper as H

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--detector", default="all", choices=("fcos", "faster_rcnn", "all"))
    p.add_argument("--impl", default="ours,torchvision", help="comma-separated: ours, torchvision")
    p.add_argument("--mode", default="frozen-cache", choices=("frozen-cache", "end-to-end"),
                   help="frozen-cache: frozen pretrained backbone, features cached once (CPU); "
                        "end-to-end: the whole network trains on augmented images (GPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="default: the CPU recipe's iterations of each detector, a5_helper.CPU_RECIPE_ITERS with "
                        "--amp, CPU_RECIPE_ITERS_FLOAT32 without")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: a5_helper.CPU_RECIPE_LR of each detector)")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "step"))
    p.add_argument("--warmup-iters", type=int, default=None, help="default: min(500, iters / 10)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=10.0, help="0 disables")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: a5_helper.default_amp: on for CUDA and for CPUs with "
                        "hardware bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="ImageNet backbone weights (offline: TORCH_HOME)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache-variants", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   default=None, help="train-image variants cached: orig, flip, jitter0, ... "
                                      "(default: a5_helper.CPU_RECIPE_CACHE_VARIANTS)")
    p.add_argument("--cache-dir", default=None, help="feature caches (default: OUT/cache)")
    p.add_argument("--tune-last-stage", action=argparse.BooleanOptionalAction, default=True,
                   help="frozen-cache mode: fine-tune the backbone's stride-32 stage on the cached c4 "
                        "(both implementations)")
    p.add_argument("--cache-batch-size", type=int, default=32)
    p.add_argument("--tv-fcos-head-norm", default="groupnorm", choices=("groupnorm", "none"))
    p.add_argument("--score-thresh", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--nms-thresh", type=float, default=0.6, help=argparse.SUPPRESS)
    _add_evaluation_args(p)
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-val-images", type=int, default=None)
    p.add_argument("--picture-index", type=int, default=3, help="val image drawn in detections_*.png")
    p.add_argument("--data-dir", default=str(H.default_data_dir()))
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--checkpoint-period", type=int, default=250)
    p.add_argument("--log-period", type=int, default=50)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--retrain", action="store_true", help="delete existing checkpoints of the selected runs first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # tiny widths, smoke tests
    args = p.parse_args(argv)
    if args.cache_variants is None:
        args.cache_variants = list(H.CPU_RECIPE_CACHE_VARIANTS)
    return args


def _command_line(argv: Optional[Sequence[str]]) -> str:
    """The command that ran, as recorded in metrics.json and results.md."""
    given = sys.argv[1:] if argv is None else list(argv)
    return "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in given)


def _selected_impls(args: argparse.Namespace) -> List[str]:
    """The implementations of ``--impl`` (an unknown one ends the program)."""
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown --impl {impl!r}: use ours and/or torchvision")
    return impls


def training_loader(args: argparse.Namespace, train_set, val_set, out: Path,
                    device: torch.device) -> Tuple[DataLoader, Any, Dict[str, Any]]:
    """The training batches, the val feature cache (``None`` end to end) and what building
    the caches cost (``{split: timing}``, empty end to end)."""
    import a5_helper as H

    if args.mode != "frozen-cache":
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        return loader, None, {}
    cache_info: Dict[str, Any] = {}
    cache_root = Path(args.cache_dir) if args.cache_dir else out / "cache"
    backbone = frozen_backbone(args)
    train_cache, cache_info["train"] = build_cache(backbone, train_set, args.cache_variants,
                                                   cache_root / "train", args)
    # Test-time flip needs the mirror images' features: a cache of its own ("orig", "flip").
    val_variants, val_dir = (["orig", "flip"], "val_flip") if args.test_flip else (["orig"], "val")
    val_cache, cache_info["val"] = build_cache(backbone, val_set, val_variants, cache_root / val_dir, args)
    del backbone
    loader = DataLoader(train_cache, batch_size=args.batch_size, shuffle=True, collate_fn=H.collate_cached)
    return loader, val_cache, cache_info


def prepare_run_dir(run_dir: Path, config: Dict[str, Any], args: argparse.Namespace) -> None:
    """``run_dir`` ready for ``config``: emptied with ``--retrain``; a run there with another
    configuration ends the program; ``run_config.json`` written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "run_config.json"
    if args.retrain:
        for f in ("last.pt", "metrics.json", "history.json", "run_config.json"):
            (run_dir / f).unlink(missing_ok=True)
    if config_file.is_file() and json.loads(config_file.read_text()) != json.loads(json.dumps(config)):
        raise SystemExit(f"{run_dir} holds a run with another configuration (see {config_file}); "
                         "use another --out or --retrain")
    config_file.write_text(json.dumps(config, indent=1))


def run_metrics(kind: str, impl: str, config: Dict[str, Any], model: torch.nn.Module, history: Dict[str, list],
                train_seconds: float, val: Dict[str, Any], context: Dict[str, Any]) -> Dict[str, Any]:
    """metrics.json of one run; ``context`` holds the command, the machine and the cache timing."""
    machine = context["machine"]
    return {
        "detector": kind, "impl": impl, "config": config, "command": context["command"],
        "machine": machine, "machine_line": common.machine_line(machine),
        "trainable_parameters": common.num_parameters(model),
        "final_loss": history["total_loss"][-1] if history.get("total_loss") else None,
        "timing": {"train_seconds": train_seconds, "eval_seconds": val["eval_seconds"],
                   "cache": context["cache_info"] or None},
        "val": {k: v for k, v in val.items() if k != "eval_seconds"},
    }


def train_and_evaluate(kind: str, impl: str, loader: DataLoader, val_set, val_cache, out: Path,
                       args: argparse.Namespace, context: Dict[str, Any]
                       ) -> Tuple[torch.nn.Module, Dict[str, list], Dict[str, Any]]:
    """One run, trained (or resumed) and evaluated: its model, loss history and metrics
    (history.json and metrics.json written in ``out/<kind>_<impl>``)."""
    import a5_helper as H
    from a5.cli import _json_safe

    name = f"{kind}_{impl}"
    run_dir = out / name
    config = run_config(kind, impl, args)
    prepare_run_dir(run_dir, config, args)
    H.reset_seed(args.seed)  # same initialisation seed for every model
    model = build_model(kind, impl, args)
    print(f"[accuracy] {name}: {common.num_parameters(model):,} trainable parameters, "
          f"{config['iters']} iterations", flush=True)
    history, train_seconds = train_run(model, loader, run_dir, config, args)
    (run_dir / "history.json").write_text(json.dumps(history))
    val = evaluate_run(model, val_set, val_cache, args)
    metrics = run_metrics(kind, impl, config, model, history, train_seconds, val, context)
    (run_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    print(f"[accuracy] {name}: mAP@0.5 {100 * val['mAP']:.2f} (all-point), {100 * val['mAP_07']:.2f} "
          f"(VOC07); training {_fmt_seconds(train_seconds)}, eval {_fmt_seconds(val['eval_seconds'])}",
          flush=True)
    return model, history, metrics


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import a5_helper as H

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = _command_line(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(DETECTORS) if args.detector == "all" else [args.detector]
    impls = _selected_impls(args)
    device = torch.device(args.device)
    if args.amp is None:
        args.amp = H.default_amp(device)  # resolved so that the results record what ran
    machine = common.machine_info(device)

    train_set, val_set = load_datasets(args)
    loader, val_cache, cache_info = training_loader(args, train_set, val_set, out, device)
    context = {"command": command, "machine": machine, "cache_info": cache_info}
    summary: Dict[str, Any] = {}
    histories: Dict[Tuple[str, str], Dict[str, list]] = {}
    for kind in kinds:
        models: Dict[str, torch.nn.Module] = {}
        for impl in impls:
            models[impl], histories[(kind, impl)], summary[f"{kind}_{impl}"] = train_and_evaluate(
                kind, impl, loader, val_set, val_cache, out, args, context)
        plot_detections(out, kind, models, val_set, val_cache, args)
    # Every finished run under OUT, also those of earlier invocations (one detector at a time).
    plot_loss_curves(out, {**finished_histories(out), **histories})
    table = results_markdown(out)
    (out / "results.md").write_text(table)
    print()
    print(table)
    return summary


if __name__ == "__main__":
    main()

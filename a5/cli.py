"""Command line: detector builders, the CPU recipe, the argument parser and the
`train` / `eval` / `predict` commands (`python a5_helper.py {train,eval,predict} --help`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from a5.utils import (
    PathLike, _setup_torch_home, autocast_dtype, cpu_has_fast_bfloat16, default_amp, default_data_dir,
    reset_seed, resolve_device,
)
from a5.progress import _CLI_ACTIVE, _with_flags, format_bytes, format_duration, plural
from a5.data import (
    VOC2007DetectionTiny, VOC_CLASSES, _unwrap_subset, boxes_to_original, load_image_for_inference,
)
from a5.cache import _backbone_of, build_feature_cache, cached_levels, collate_cached
from a5.training import (
    CheckpointError, init_distributed, load_checkpoint, load_resumable, numbered_checkpoints,
    save_checkpoint, train_detector,
)
from a5.evaluation import AP_METRIC_NAMES, evaluate_detector, format_error_breakdown, predict_batch
from a5.plots import (
    detection_visualizer, plot_error_breakdown, plot_loss_history, plot_per_class_ap, plot_pr_curves,
)


# ======================================================================================
# Command line
# ======================================================================================


def _build_fcos(num_classes: int = 20, backbone: str = "mobilenet_v2", pretrained: bool = True,
                freeze_backbone: bool = False, tune_last_stage: bool = False, fpn_channels: int = 128,
                stem_channels: Sequence[int] = (128, 128), **extra: Any) -> nn.Module:
    import fcos

    return fcos.FCOS(num_classes=num_classes, fpn_channels=fpn_channels, stem_channels=list(stem_channels),
                     backbone=backbone, pretrained=pretrained, freeze_backbone=freeze_backbone,
                     tune_last_stage=tune_last_stage, **extra)


def _build_faster_rcnn(num_classes: int = 20, backbone: str = "mobilenet_v2", pretrained: bool = True,
                       freeze_backbone: bool = False, tune_last_stage: bool = False, fpn_channels: int = 64,
                       stem_channels: Sequence[int] = (64, 64),
                       rpn_stem_channels: Sequence[int] = (64, 64), rpn_batch_size_per_image: int = 16,
                       roi_batch_size_per_image: int = 32, anchor_stride_scale: int = 8,
                       anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), pre_nms_topk: int = 400,
                       post_nms_topk: int = 80, roi_size: Sequence[int] = (7, 7), **extra: Any) -> nn.Module:
    import fcos
    import two_stage_detector as tsd

    fpn = fcos.DetectorBackboneWithFPN(out_channels=fpn_channels, backbone=backbone, pretrained=pretrained,
                                       freeze_backbone=freeze_backbone, tune_last_stage=tune_last_stage)
    rpn = tsd.RPN(fpn_channels=fpn_channels, stem_channels=list(rpn_stem_channels),
                  batch_size_per_image=rpn_batch_size_per_image, anchor_stride_scale=anchor_stride_scale,
                  anchor_aspect_ratios=list(anchor_aspect_ratios), pre_nms_topk=pre_nms_topk,
                  post_nms_topk=post_nms_topk)
    return tsd.FasterRCNN(fpn, rpn, stem_channels=list(stem_channels), num_classes=num_classes,
                          batch_size_per_image=roi_batch_size_per_image, roi_size=tuple(roi_size), **extra)


# The CPU recipe (frozen backbone + feature cache, the backbone's last stage fine-tuned) of
# the README's results table, shared by the command line, the notebooks and
# benchmarks/accuracy.py. Two scale-jitter crops on top of the image and its flip give the
# heads enough data. The length is sized to a time budget on a 2-core CPU: about 15 minutes
# per detector where the CPU has bfloat16 hardware (autocast on), about 30 in float32. Only
# FCOS differs between the two: its step costs about twice a Faster R-CNN step, and its
# 1800 iterations (50.9% VOC AP50, against 47.8% after 1200) take 36 minutes in float32.
CPU_RECIPE_ITERS = {"fcos": 1800, "faster_rcnn": 2500}
CPU_RECIPE_ITERS_FLOAT32 = {"fcos": 1200, "faster_rcnn": 2500}
# The default length of end-to-end training (backbone not frozen), unchanged since recipe v1.
END_TO_END_ITERS = 3500
CPU_RECIPE_CACHE_VARIANTS = ("orig", "flip", "jitter0", "jitter1")
CPU_RECIPE_LR = {"fcos": 2e-2, "faster_rcnn": 1e-2}


def cpu_recipe_iters(detector: str, amp: Optional[bool] = None) -> int:
    """Training iterations of the CPU recipe for `detector` (the longest one for a detector
    without a recipe entry): `CPU_RECIPE_ITERS` when training autocasts (`amp`; `None`: what
    `default_amp("cpu")` picks on this machine), `CPU_RECIPE_ITERS_FLOAT32` in float32."""
    if amp is None:
        amp = default_amp("cpu")
    table = CPU_RECIPE_ITERS if amp else CPU_RECIPE_ITERS_FLOAT32
    return table.get(detector, max(table.values()))


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
        per_item = sum(int(feats[k][0].numel()) for k in cached_levels(backbone)) * 2 + 40 * 5 * 4
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


def _backbone_mode(kwargs: Dict[str, Any], unfrozen: str) -> str:
    """How the backbone trains, in words, from a model config's kwargs."""
    if not kwargs.get("freeze_backbone"):
        return unfrozen
    return "frozen, last stage fine-tuned" if kwargs.get("tune_last_stage") else "frozen"


def _train_plan(args: argparse.Namespace, config: Dict[str, Any], device: torch.device, detector: nn.Module,
                train_set: Dataset, val_set: Dataset, out: Path) -> List[str]:
    """The start-up summary of `train`: what will run, where, and what it writes."""
    kw = config.get("kwargs", {})
    name = DETECTOR_NAMES.get(config["detector"], config["detector"])
    weights = "ImageNet weights" if kw.get("pretrained", True) else "random weights"
    mode = _backbone_mode(kw, "trained end to end")
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
    flip = ", with test-time flip (--no-test-flip: without)" if args.test_flip else ""
    rows.append(("evaluation", f"then on {plural(len(val_set), 'val image')}{flip}: VOC AP@0.5 (all-point "
                               "and 11-point), COCO mAP, error breakdown"))
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
             f"({_backbone_mode(kw, 'trained')}){features}",
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
    _resolve_train_defaults(args, device, rank)
    config, changed = _prepare_run_dir(args, out, _train_config(args), rank)
    try:
        detector = build_detector(config)
    except (RuntimeError, ValueError) as err:
        raise _with_flags(err) from err
    if rank == 0:
        run_record = {"config": config, "command": sys.argv, "resumed": bool(args.resume and (out / "last.pt").is_file()),
                      "changed_settings": changed}
        (out / "run.json").write_text(json.dumps(_json_safe(run_record), indent=2))

    train_set = VOC2007DetectionTiny(args.data_dir, "train", download=args.download, image_size=args.image_size)
    train_set = _first_n(train_set, args.max_train_images)
    val_set = _first_n(VOC2007DetectionTiny(args.data_dir, "val", image_size=args.image_size), args.max_val_images)
    progress = "off" if rank != 0 else ("lines" if args.no_progress else "auto")
    if rank == 0:
        print("\n".join(_train_plan(args, config, device, detector, train_set, val_set, out)), flush=True)

    start = time.time()
    train_loader = _train_loader(args, detector, train_set, device, rank, world, progress)
    cache_seconds = time.time() - start if args.cache_features else 0.0
    history = train_detector(
        detector, train_loader, learning_rate=args.lr, weight_decay=args.weight_decay, max_iters=args.iters,
        log_period=args.log_period, device=device, lr_schedule=args.lr_schedule, warmup_iters=args.warmup_iters,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, checkpoint_dir=out,
        checkpoint_period=args.checkpoint_period, resume=args.resume, seed=args.seed,
        progress=progress, model_config=config, amp=args.amp,
        keep_checkpoints=args.keep_checkpoints, skip_nonfinite=args.skip_nonfinite,
        trust_checkpoint=args.trust_checkpoint,
    )
    seconds = {"cache": cache_seconds, "train": time.time() - start - cache_seconds}
    if rank != 0:
        dist.barrier()
        return 0
    _finish_training_run(args, config, device, out, detector, val_set, history, changed, start, seconds, world,
                         progress)
    if world > 1:
        dist.barrier()
    return 0


def _resolve_train_defaults(args: argparse.Namespace, device: torch.device, rank: int) -> None:
    """Fill in the "auto" (None) defaults of `train` that depend on the device."""
    # "auto": a CPU cannot fine-tune a backbone in reasonable time, so there the default is
    # the frozen backbone with cached features; a GPU trains end to end.
    if args.frozen_backbone is None:
        args.frozen_backbone = device.type == "cpu"
    if args.cache_features is None:
        args.cache_features = args.frozen_backbone
    if args.cache_features and not args.frozen_backbone:
        raise SystemExit("--cache-features needs --frozen-backbone (cached features must not change during training)")
    if args.tune_last_stage is None:
        args.tune_last_stage = args.frozen_backbone
    if args.tune_last_stage and not args.frozen_backbone:
        raise SystemExit("--tune-last-stage needs --frozen-backbone (without it every stage trains anyway)")
    if args.lr is None:
        args.lr = CPU_RECIPE_LR.get(args.detector, 1e-2)
    if args.amp is None:
        args.amp = default_amp(device)  # resolved here so that metrics.json records what ran
    args.recipe_iters = args.iters is None  # a resumed run then keeps its own length
    if args.iters is None:
        args.iters = cpu_recipe_iters(args.detector, args.amp) if args.frozen_backbone else END_TO_END_ITERS
    if args.test_flip is None:
        args.test_flip = args.frozen_backbone

    if args.frozen_backbone and not args.pretrained and rank == 0:
        warnings.warn("--no-pretrained with a frozen backbone: the backbone keeps its random initialisation "
                      "and never trains, so only the FPN and heads learn (low accuracy). Pass --no-frozen-backbone "
                      "to train it, or drop --no-pretrained.")


def _train_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The model config that `train` records in its checkpoints (what `build_detector` takes)."""
    config: Dict[str, Any] = {
        "detector": args.detector,
        "image_size": args.image_size,
        "class_names": VOC_CLASSES,
        "kwargs": {"num_classes": len(VOC_CLASSES), "backbone": args.backbone, "pretrained": args.pretrained,
                   "freeze_backbone": args.frozen_backbone, "tune_last_stage": args.tune_last_stage},
        # The data settings that shape what the model learns (checked by --resume).
        "data": {"max_train_images": args.max_train_images, "cache_features": bool(args.cache_features),
                 "cache_variants": args.cache_variants if args.cache_features else None},
        # How `train` evaluated the model (`eval` does the same by default); not checked by --resume.
        "eval": {"test_flip": bool(args.test_flip)},
    }
    # Widths default to each detector's course configuration (FCOS 128, Faster R-CNN 64).
    if args.fpn_channels is not None:
        config["kwargs"]["fpn_channels"] = args.fpn_channels
    if args.stem_channels is not None:
        config["kwargs"]["stem_channels"] = _int_list(args.stem_channels)
    return config


def _keep_stored_length(args: argparse.Namespace, checkpoint: Dict[str, Any], rank: int) -> None:
    """--resume without --iters: continue to the run's own length (the schedule is stretched
    over it), not to the current default's."""
    stored = (checkpoint.get("scheduler") or {}).get("max_iters")
    if getattr(args, "recipe_iters", False) and isinstance(stored, int) and stored != args.iters:
        if rank == 0:
            print(f"--resume: the run trains for {plural(stored, 'iteration')} as it started "
                  f"(the default is now {args.iters}; --iters changes it).")
        args.iters = stored


def _prepare_run_dir(args: argparse.Namespace, out: Path, config: Dict[str, Any], rank: int,
                     ) -> Tuple[Dict[str, Any], List[str]]:
    """Refuse (or with --overwrite clear) an earlier run in `out`; with --resume, check the stored
    settings against `config`. Returns the config to train and the changed settings."""
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
        checkpoint = load_resumable(resume_ckpt, trusted=args.trust_checkpoint, warn=False)[1]
        stored = checkpoint.get("config")
        _keep_stored_length(args, checkpoint, rank)
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
            config = {**stored, "image_size": config["image_size"], "data": config["data"], "eval": config["eval"]}
            # A run from before the option existed trained with its last stage frozen.
            args.tune_last_stage = bool(config["kwargs"].get("tune_last_stage", False))
            if changed and rank == 0:
                print("--allow-changed-settings: continuing the stored model "
                      f"({config['detector']}, {config['kwargs'].get('backbone')}) with: " + "; ".join(changed))
    return config, changed


def _train_loader(args: argparse.Namespace, detector: nn.Module, train_set: Dataset, device: torch.device,
                  rank: int, world: int, progress: str) -> DataLoader:
    """Batches of cached features (--cache-features; builds or loads the cache) or of images."""
    if not args.cache_features:
        return DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda", drop_last=True)
    variants = [v.strip() for v in args.cache_variants.split(",") if v.strip()]
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if world > 1 and rank != 0 and cache_dir is not None:
        dist.barrier()  # rank 0 builds the on-disk cache first, then the others load it
    cache = build_feature_cache(detector, train_set, variants, cache_dir=cache_dir, batch_size=args.batch_size,
                                device=device, num_workers=args.num_workers, progress=progress)
    if world > 1 and rank == 0 and cache_dir is not None:
        dist.barrier()
    return DataLoader(cache, batch_size=args.batch_size, shuffle=True, collate_fn=collate_cached)


def _finish_training_run(args: argparse.Namespace, config: Dict[str, Any], device: torch.device, out: Path,
                         detector: nn.Module, val_set: Dataset, history: Dict[str, list], changed: List[str],
                         start: float, seconds: Dict[str, float], world: int, progress: str) -> None:
    """Rank 0 after training: model_final.pt, the validation, metrics.json and summary.txt."""
    save_checkpoint({"format": "a5_helper.model/1", "model": detector.state_dict(), "config": config},
                    out / "model_final.pt")
    metrics = evaluate_detector(detector, val_set, batch_size=args.eval_batch_size or args.batch_size,
                                score_thresh=args.score_thresh, nms_thresh=args.nms_thresh, device=device,
                                num_workers=args.num_workers, progress=progress, return_curves=True,
                                error_score_thresh=ERROR_SCORE_THRESH, test_flip=args.test_flip)
    _write_eval_outputs(metrics, out, history)
    seconds = {**seconds, "eval": metrics["seconds"], "total": time.time() - start}
    final_loss, window = _final_loss(history)
    summary = {
        "config": config, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "val": _metrics_for_json(metrics),
        "train": {"iterations": len(history["total_loss"]),
                  "final_loss": history["total_loss"][-1] if history["total_loss"] else None,
                  "final_loss_mean": final_loss, "final_loss_window": window,
                  "cache_seconds": seconds["cache"], "train_seconds": seconds["train"],
                  "eval_seconds": metrics["seconds"], "total_seconds": seconds["total"], "device": str(device),
                  "world_size": world},
    }
    (out / "metrics.json").write_text(json.dumps(_json_safe(summary), indent=2))
    (out / "summary.txt").touch()  # listed among the files written
    lines = _train_report(args, config, device, out, metrics, history, seconds, _example_image(val_set))
    if changed:
        lines.insert(1, "resumed with changed settings (--allow-changed-settings): " + "; ".join(changed))
    if history.get("skipped"):
        lines.insert(1, f"skipped non-finite batches at iterations {[s['iteration'] for s in history['skipped']]}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"final val mAP: {metrics['mAP']:.4f}")


def _config_differences(stored: Dict[str, Any], requested: Dict[str, Any], prefix: str = "") -> List[str]:
    """`["image_size: 224 -> 64", ...]` for the settings that differ (keys a stored
    config does not record, from older versions, are not compared)."""
    lines = []
    for key in sorted(set(stored) | set(requested)):
        if key in ("class_names", "eval") or key not in stored or key not in requested:
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
    if args.test_flip is None:  # as `train` evaluated it (recorded since recipe v2; before: no flip)
        args.test_flip = bool((config.get("eval") or {}).get("test_flip", False))
    dataset = VOC2007DetectionTiny(args.data_dir, args.split, image_size=config.get("image_size", 224), augment=False)
    dataset = _first_n(dataset, args.max_val_images)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}"
    metric = AP_METRIC_NAMES[bool(args.use_07_metric)]
    print(f"Evaluating {args.checkpoint} ({DETECTOR_NAMES.get(config['detector'], config['detector'])}) on "
          f"{plural(len(dataset), args.split + ' image')} from {args.data_dir}, on {device}; AP@0.5 {metric}"
          + (", with test-time flip." if args.test_flip else "."),
          flush=True)
    metrics = evaluate_detector(detector, dataset, batch_size=args.batch_size, score_thresh=args.score_thresh,
                                nms_thresh=args.nms_thresh, device=device, num_workers=args.num_workers,
                                use_07_metric=args.use_07_metric, exact_tenths=args.exact_tenths,
                                progress="lines" if args.no_progress else "auto",
                                return_curves=True, error_score_thresh=ERROR_SCORE_THRESH,
                                test_flip=args.test_flip)
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
    _add_train_parser(sub, data_default)
    _add_eval_parser(sub, data_default)
    _add_predict_parser(sub)
    return parser


def _add_common_args(p: argparse.ArgumentParser, data_default: str) -> None:
    """The options `train` and `eval` share (after their own, in --help)."""
    p.add_argument("--data-dir", default=data_default,
                   help="VOC data folder (VOCdevkit layout and/or voc07_*.json); default: $VOC_ROOT, "
                        "else ../shared/data next to the repository if it exists, else ./data")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=_nonnegative_int, default=min(2, os.cpu_count() or 1),
                   help="data-loading worker processes")
    p.add_argument("--score-thresh", type=_unit_float, default=0.05, help="score threshold for evaluation detections")
    p.add_argument("--nms-thresh", type=_unit_float, default=0.5, help="NMS IoU threshold at inference")
    p.add_argument("--test-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluation also detects on each image's mirror image and merges both (test-time "
                        "flip: about twice the evaluation time). Default: train: on with --frozen-backbone "
                        "(the CPU recipe); eval: as train evaluated the checkpoint")
    p.add_argument("--no-progress", action="store_true",
                   help="progress as a plain line every few seconds instead of a bar (automatic when the "
                        "output is not a terminal)")
    p.add_argument("--threads", type=_nonnegative_int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is often faster on a busy machine")


def _add_train_parser(sub: Any, data_default: str) -> None:
    t = sub.add_parser("train", help="train a detector, evaluate it on val, write plots and metrics",
                       description="Train a detector on VOC2007 train, evaluate it on val, and write checkpoints, "
                                   "metrics.json, summary.txt and plots to --out.",
                       formatter_class=HelpFormatter, epilog=TRAIN_EPILOG)
    _add_train_model_args(t)
    _add_train_run_args(t)
    _add_common_args(t, data_default)
    t.set_defaults(func=_cmd_train)


def _add_train_model_args(t: argparse.ArgumentParser) -> None:
    """`train`: the model, the data and the optimisation."""
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
    t.add_argument("--tune-last-stage", action=argparse.BooleanOptionalAction, default=None,
                   help="with --frozen-backbone: fine-tune the backbone's last (stride-32) stage all the same, "
                        "recomputing c5 from the cached c4 (15-30%% more time per iteration, worth "
                        "several AP points). Default: on with --frozen-backbone")
    t.add_argument("--cache-variants", type=_variants_arg, default=",".join(CPU_RECIPE_CACHE_VARIANTS),
                   help="comma-separated image variants to cache: orig, flip, jitter0, jitter1, ...")
    t.add_argument("--cache-dir", default=None,
                   help="folder for an on-disk feature cache reused by later runs (default: in memory)")
    t.add_argument("--iters", type=_positive_int, default=None,
                   help="training iterations (default: the CPU recipe's with --frozen-backbone, "
                        + ", ".join(f"{k} {v}" for k, v in CPU_RECIPE_ITERS.items()) + " with --amp, "
                        + ", ".join(f"{k} {v}" for k, v in CPU_RECIPE_ITERS_FLOAT32.items())
                        + f" without; else {END_TO_END_ITERS}; the course schedule on a GPU is 9000)")
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


def _add_train_run_args(t: argparse.ArgumentParser) -> None:
    """`train`: the output folder, checkpoints, logging, the data subset and fault handling."""
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


def _add_eval_parser(sub: Any, data_default: str) -> None:
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
    _add_common_args(e, data_default)
    e.set_defaults(func=_cmd_eval)


def _add_predict_parser(sub: Any) -> None:
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

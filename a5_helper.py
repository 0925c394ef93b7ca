"""The facade that the notebooks, the course code and the command line import: everything
around the two detectors of assignment 5 (data, training, evaluation, pictures, a command
line), re-exported from the modules of the `a5/` package, one per concern:

* `a5.utils`: `hello_helper`, `reset_seed`, `rel_error`, device and AMP helpers.
* `a5.progress`: `ProgressReporter` (a bar on a terminal, periodic plain lines in a log file).
* `a5.data`: `VOC2007DetectionTiny` (course JSON split files or the VOCdevkit layout),
  the train / eval transforms, `infinite_loader`, download with checksum.
* `a5.cache`: frozen backbone + feature cache: `build_feature_cache`, `CachedFeatureDataset`.
* `a5.training`: `train_detector` (SGD + warm-up + step/cosine decay, gradient clipping,
  AMP, checkpoints with exact resume, NaN guard, DistributedDataParallel under `torchrun`)
  and the samplers that make exact resume possible.
* `a5.evaluation`: `compute_voc_map` (PASCAL devkit rules), `compute_coco_map`
  (pycocotools cross-check), `count_detection_errors` (false positives by kind, misses),
  `evaluate_detector`.
* `a5.plots`: `detection_visualizer` / `draw_detections`, `plot_loss_history`,
  `plot_per_class_ap`, `plot_pr_curves`, `plot_error_breakdown`, `inference_with_detector`.
* `a5.cli`: `python a5_helper.py {train,eval,predict} --help`.

Conventions (shared with fcos.py and two_stage_detector.py): boxes are XYXY in absolute
pixels; a batch of ground truth is `(B, N, 5)` with rows `x1, y1, x2, y2, class_id`,
padded with rows of -1. Detectors return a dict of scalar losses in training mode and
`predict(images, score_thresh, nms_thresh) -> [{"boxes", "labels", "scores"}, ...]`.

Only public names are re-exported (tests/test_layout.py checks it): code that needs a
private helper imports it from its module (`from a5.data import _unwrap_subset`). To
monkeypatch a name, patch it in the module that uses it (e.g. `a5.plots._finish_figure`),
not here.
"""
from __future__ import annotations

import sys

from a5.utils import (  # noqa: F401
    TensorDict, PathLike, REPO_ROOT, hello_helper, reset_seed, rel_error, check_close, pick_backbone,
    default_data_dir, resolve_device, cpu_has_fast_bfloat16, autocast_dtype, default_amp, move_to_device,
)
from a5.progress import (  # noqa: F401
    plural, format_bytes, format_duration, machine_load, ProgressReporter,
)
from a5.data import (  # noqa: F401
    VOC_CLASSES, IMAGENET_MEAN, IMAGENET_STD, VOC2007_DOWNLOAD, EXPECTED_LAYOUT, Window, open_image, render_image,
    transform_boxes, boxes_to_original, sample_train_window, load_image_for_inference, parse_voc_xml,
    VOC2007DetectionTiny, infinite_loader, MapsBoxesToOriginal, NamesClasses, NamesImages, HasEvalTransform,
    download_voc2007,
)
from a5.cache import (  # noqa: F401
    FEATURE_LEVELS, backbone_state_hash, CacheableBackbone, RendersVariants, ListsImageFiles, TRAINED_PREFIXES,
    CachedFeatureDataset, collate_cached, build_feature_cache, cached_levels,
)
from a5.training import (  # noqa: F401
    ResumableSampler, WarmupLR, init_distributed, save_checkpoint, CheckpointError, load_checkpoint,
    numbered_checkpoints, load_resumable, train_detector,
)
from a5.evaluation import (  # noqa: F401
    GroundTruths, Detections, voc_ap, AP_METRIC_NAMES, compute_voc_map, compute_coco_map, ERROR_KINDS,
    ERROR_KIND_HELP, count_detection_errors, format_error_breakdown, BatchPredictor, predict_batch,
    collect_predictions, evaluate_detector,
)
from a5.plots import (  # noqa: F401
    inference_with_detector, unnormalize_image, class_color, detection_visualizer, draw_detections,
    show_dataset_grid, smooth_curve, plot_loss_history, plot_per_class_ap, plot_pr_curves, plot_error_breakdown,
)
from a5.cli import (  # noqa: F401
    CPU_RECIPE_ITERS, CPU_RECIPE_ITERS_FLOAT32, CPU_RECIPE_CACHE_VARIANTS, CPU_RECIPE_LR, cpu_recipe_iters,
    DETECTOR_BUILDERS, build_detector, load_detector,
    DETECTOR_NAMES, PREDICT_MAX_DRAWN, ERROR_SCORE_THRESH, FINAL_LOSS_WINDOW, HelpFormatter, MAIN_EPILOG,
    TRAIN_EPILOG, EVAL_EPILOG, PREDICT_EPILOG, build_parser, main,
)

if __name__ == "__main__":
    sys.exit(main())

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

Private names (`_...`) are re-exported too: course code and tests use some of them as
`a5_helper._name`. To monkeypatch a name, patch it in the module that uses it (e.g.
`a5.plots._finish_figure`), not here.
"""
from __future__ import annotations

import sys

from a5.utils import (  # noqa: F401
    TensorDict, PathLike, REPO_ROOT, hello_helper, reset_seed, rel_error, check_close,
    pick_backbone, default_data_dir, resolve_device, cpu_has_fast_bfloat16, autocast_dtype,
    default_amp, move_to_device, _setup_torch_home,
)
from a5.progress import (  # noqa: F401
    _CLI_ACTIVE, _arg_name, _PYTHON_TO_FLAG, _with_flags, plural, format_bytes, format_duration,
    _format_rate, _format_stat, machine_load, _in_jupyter, _use_bar, _progress_mode,
    ProgressReporter,
)
from a5.data import (  # noqa: F401
    VOC_CLASSES, IMAGENET_MEAN, IMAGENET_STD, VOC2007_DOWNLOAD, EXPECTED_LAYOUT, Window, _MEAN_255,
    _INV_STD_255, open_image, render_image, transform_boxes, boxes_to_original,
    sample_train_window, load_image_for_inference, _find_voc_root, parse_voc_xml,
    VOC2007DetectionTiny, infinite_loader, MapsBoxesToOriginal, _unwrap_subset, _eval_view, _md5,
    _reachable, download_voc2007,
)
from a5.cache import (  # noqa: F401
    FEATURE_LEVELS, _CACHE_VERSION, _CACHE_FILES, _file_crc32, _image_fingerprints,
    _check_cache_files, _backbone_of, backbone_state_hash, CacheableBackbone, TRAINED_PREFIXES,
    _VariantView, CachedFeatureDataset, collate_cached, _cache_key, build_feature_cache,
)
from a5.training import (  # noqa: F401
    _mix_seed, ResumableSampler, _SeededItems, _TrainStream, WarmupLR, _dist_info,
    init_distributed, _rng_state, _set_rng_state, _preserved_rng, save_checkpoint,
    _numpy_array_globals, CheckpointError, load_checkpoint, _NUMBERED_CHECKPOINT,
    numbered_checkpoints, load_resumable, _link_or_copy, _nonfinite_entries, _describe_images,
    _rollback_after_nonfinite, _new_history, _loss_stats, train_detector,
)
from a5.evaluation import (  # noqa: F401
    GroundTruths, Detections, voc_ap, _iou_plus_one, AP_METRIC_NAMES, compute_voc_map,
    compute_coco_map, ERROR_KINDS, ERROR_KIND_HELP, count_detection_errors, format_error_breakdown,
    _class_names_of, _IndexedItems, _IndexedCollate, _indexed_loader, predict_batch,
    _eval_autocast, collect_predictions, evaluate_detector,
)
from a5.plots import (  # noqa: F401
    _as_batches, inference_with_detector, _NON_INTERACTIVE, _plot_counter, _pyplot, _finish_figure,
    unnormalize_image, class_color, _text_color_on, _figure_renderer, _overlap_area,
    _label_candidates, _place_labels, detection_visualizer, draw_detections, show_dataset_grid,
    smooth_curve, plot_loss_history, plot_per_class_ap, plot_pr_curves, plot_error_breakdown,
    _max_ticks,
)
from a5.cli import (  # noqa: F401
    _build_fcos, _build_faster_rcnn, CPU_RECIPE_ITERS, CPU_RECIPE_CACHE_VARIANTS, CPU_RECIPE_LR,
    DETECTOR_BUILDERS, build_detector, load_detector, _json_safe, _int_list, _first_n,
    _write_eval_outputs, _example_image, _metrics_for_json, DETECTOR_NAMES, PREDICT_MAX_DRAWN,
    ERROR_SCORE_THRESH, FINAL_LOSS_WINDOW, HelpFormatter, _feature_cache_bytes, _precision_text,
    _train_plan, _final_loss, _pct, _metric_lines, _next_commands, _written_files, _train_report,
    _cmd_train, _config_differences, _cmd_eval, _cmd_predict, _int_at_least, _positive_int,
    _nonnegative_int, _float_in, _positive_float, _nonnegative_float, _unit_float, _image_size_arg,
    _channels_arg, _variants_arg, MAIN_EPILOG, TRAIN_EPILOG, EVAL_EPILOG, PREDICT_EPILOG,
    build_parser, main,
)

if __name__ == "__main__":
    sys.exit(main())

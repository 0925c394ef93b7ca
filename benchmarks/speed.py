"""Speed of our FCOS / Faster R-CNN / NMS next to torchvision's, in one command.

    python benchmarks/speed.py                       # CPU, batch 16, 224 px, all benchmarks
    python benchmarks/speed.py --device cuda --amp   # on a GPU, with mixed precision
    python benchmarks/speed.py --only nms --json runs/speed.json

What is measured (medians; ratio = ours / torchvision, so < 1 means ours is faster for
times, > 1 means ours is faster for throughputs):

* **training step**: ``zero_grad`` + forward with losses + backward + SGD step on one
  random batch (random normalised images, 1-8 random GT boxes per image). Steps of our
  model and of torchvision's alternate in one process (the order flips every iteration),
  so that both see the same machine state (thermal, other load).
* **inference throughput**: images/s of ``predict`` (ours) and of torchvision's eval-mode
  ``forward`` (list of images), same thresholds (``--score-thresh/--nms-thresh``,
  torchvision's FCOS defaults 0.2 / 0.6) and at most 100 detections per image.
* **peak memory**: each model runs in a *fresh subprocess* (so that neither sees the
  other's allocations). CUDA: ``torch.cuda.max_memory_allocated`` minus the memory
  allocated after building the model and the batch. CPU: the peak resident set size
  (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``) minus the
  resident set at the start of the phase (after building the model and the batch); this
  counts what the allocator actually took from the OS for activations, gradients and
  optimizer state (an upper bound of the live tensors; allocator caching included).
* **NMS**: our ``a5.kernels.fast_nms`` vs ``torchvision.ops.nms`` (compiled C++/CUDA kernel) on 1k,
  5k, 20k random boxes (sides 16-128 px in a 1000 px square, IoU 0.5): median time, ratio,
  and whether the kept indices are identical.
* **target assignment**: the part of our training step that matches locations/anchors to
  GT (FCOS: ``fcos_match_locations_to_gt`` + regression/centerness targets; Faster
  R-CNN: anchor and RoI matching + sampling) on the same batch, as a share of our step.

Both models of a pair are built identically (see ``tv_adapters.py``): same backbone body
(a copy, same weights), FPN of the same width on 3 levels (no P6/P7), same head depth,
anchors, IoU thresholds, sample sizes and top-k's; torchvision's transform neither resizes
nor normalises (the images already are the model input, as for ours).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:
    from . import common  # type: ignore
except ImportError:  # script mode: benchmarks/ is sys.path[0]
    import common  # type: ignore

import torch  # noqa: E402

DETECTORS = ("fcos", "faster_rcnn")
NAMES = {"fcos": "FCOS", "faster_rcnn": "Faster R-CNN"}
# Targets of issue 8 (CPU): train step ratio <= 0.9, inference >= 1.2x, NMS <= 3x at 5k boxes.
TARGETS = {"train_ratio": 0.9, "infer_speedup": 1.2, "nms_ratio_5k": 3.0}


# --------------------------------------------------------------------------------------
# Timing primitives
# --------------------------------------------------------------------------------------


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(fns: Dict[str, Callable[[], Any]], iters: int, warmup: int,
              sync: Callable[[], None]) -> Dict[str, List[float]]:
    """Run the callables in turn ``warmup + iters`` times; return the timed seconds.

    The order flips every iteration (a b, b a, a b, ...) so that neither always runs
    right after the other (caches, allocator state, CPU frequency).
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(warmup + iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            seconds = time_call(fns[name], sync)
            if i >= warmup:
                times[name].append(seconds)
    return times


def autocast_ctx(device: torch.device, amp: bool):
    """float16 autocast on CUDA, bfloat16 on CPU; a no-op without ``--amp``."""
    if not amp:
        return nullcontext()
    import a5_helper as H

    return torch.autocast(device_type=device.type, dtype=H.autocast_dtype(device))


# --------------------------------------------------------------------------------------
# Step functions
# --------------------------------------------------------------------------------------


def make_train_step(model: torch.nn.Module, call: Callable[[], Dict[str, torch.Tensor]],
                    device: torch.device, amp: bool, lr: float = 1e-4) -> Callable[[], torch.Tensor]:
    """A closure doing one full training step; it returns the (detached) total loss.

    SGD with momentum and weight decay like the course's training loop; a small learning
    rate keeps random-data training numerically tame so that every step does the same work.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_ctx(device, amp):
            losses = call()
        loss = sum(losses.values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    model.train()
    return step


def _train_calls(ours, theirs, images, gt):
    """Forward-with-losses callables: ours on the padded batch, torchvision's on its own
    input format (list of images, list of target dicts), converted once outside timing."""
    targets = common.tv_adapters.padded_gt_to_targets(gt, theirs.label_offset)
    image_list = list(images)  # torchvision's input format, prepared once like a user would
    return (lambda: ours(images, gt)), (lambda: theirs.detector(image_list, targets))


def _infer_calls(ours, theirs, images, cfg: "common.PairConfig", device: torch.device, amp: bool):
    image_list = list(images)

    def ours_infer():
        with torch.no_grad(), autocast_ctx(device, amp):
            return ours.predict(images, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)

    def theirs_infer():
        with torch.no_grad(), autocast_ctx(device, amp):
            return theirs.detector(image_list)

    return ours_infer, theirs_infer


# --------------------------------------------------------------------------------------
# Target assignment (ours)
# --------------------------------------------------------------------------------------


def _fcos_assignment(model: torch.nn.Module, images: torch.Tensor, gt: torch.Tensor) -> Callable[[], Any]:
    """Our FCOS training targets for the batch, as ``FCOS.compute_losses`` builds them:
    batched matching of all locations, regression deltas, centerness of the foreground."""
    import fcos as F

    strides = model.backbone.fpn_strides
    height, width = images.shape[-2:]
    shapes = {name: (images.shape[0], 1, height // s, width // s) for name, s in strides.items()}
    locations = F.get_fpn_location_coords(shapes, strides, dtype=images.dtype, device=images.device)
    all_locations = torch.cat(list(locations.values()), dim=0)
    stride_per_location = torch.cat(
        [all_locations.new_full((locs.shape[0], 1), float(strides[name])) for name, locs in locations.items()]
    )
    radius = getattr(model, "center_sampling_radius", 1.5)

    def assign():
        matched = F.fcos_match_locations_to_gt(locations, strides, gt, center_sampling_radius=radius)
        matched = torch.cat(list(matched.values()), dim=1)  # (B, L, 5)
        deltas = F.fcos_get_deltas_from_locations(all_locations, matched, stride_per_location)
        foreground = matched[..., 4] >= 0
        return deltas, F.fcos_make_centerness_targets(deltas[foreground])

    return assign


def _rcnn_assignment(model: torch.nn.Module, images: torch.Tensor, gt: torch.Tensor) -> Callable[[], Any]:
    """Our Faster R-CNN targets: RPN anchor matching + sampling, RoI matching + sampling.

    RoI candidates are ``post_nms_topk`` random proposals per image plus the GT boxes,
    matched and sampled the way our second stage does it.
    """
    import fcos as F
    import two_stage_detector as T

    rpn = model.rpn
    strides = model.backbone.fpn_strides
    size = images.shape[-1]
    shapes = {name: (images.shape[0], 1, size // s, size // s) for name, s in strides.items()}
    locations = F.get_fpn_location_coords(shapes, strides, dtype=images.dtype, device=images.device)
    anchors = T.generate_fpn_anchors(locations, strides, rpn.anchor_stride_scale, rpn.anchor_aspect_ratios)
    anchor_boxes = torch.cat(list(anchors.values()), dim=0)
    num_images = images.shape[0]
    proposals, _ = common.random_boxes(num_images * rpn.post_nms_topk, extent=size * 0.8, seed=1,
                                       device=images.device)
    proposals = proposals.reshape(num_images, rpn.post_nms_topk, 4).clamp(max=size).to(images.dtype)
    candidates = torch.cat([proposals, gt[..., :4]], dim=1)
    valid = torch.cat([torch.ones_like(proposals[..., 0], dtype=torch.bool), gt[..., 4] != -1], dim=1)
    roi_thresh = getattr(model, "roi_iou_threshold", 0.5)

    def assign():
        matched = T.rcnn_match_anchors_to_gt(anchor_boxes, gt, rpn.anchor_iou_thresholds)
        rpn_samples = T.sample_rpn_training(matched, rpn.batch_size_per_image, rpn.fg_fraction)
        roi_matched = T.rcnn_match_anchors_to_gt(candidates, gt, (roi_thresh, roi_thresh),
                                                 allow_low_quality_matches=False)
        roi_matched = torch.where(valid[..., None], roi_matched, torch.full_like(roi_matched, T.NEUTRAL))
        roi_samples = T.sample_rpn_training(roi_matched, model.batch_size_per_image, model.fg_fraction)
        return rpn_samples, roi_samples

    return assign


def time_assignment(kind: str, model, images, gt, iters: int, sync) -> Optional[float]:
    builder = _fcos_assignment if kind == "fcos" else _rcnn_assignment
    try:
        fn = builder(model, images, gt)
        fn()  # warm-up (and a check that the API is what we expect)
    except Exception as exc:  # noqa: BLE001 - report, do not abort the whole benchmark
        print(f"[speed] target assignment of {kind} not measured: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return statistics.median(time_call(fn, sync) for _ in range(max(iters, 3)))


# --------------------------------------------------------------------------------------
# Peak memory, one model per fresh subprocess
# --------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _probe_calls(kind: str, impl: str, args: argparse.Namespace,
                 device: torch.device) -> Tuple[torch.nn.Module, Callable[[], Any], Callable[[], Any]]:
    """The model probed (on ``device``), its training-loss call and its inference call, on
    one random batch."""
    cfg = config_from_args(args)
    ours = common.build_ours(kind, cfg)
    model = ours if impl == "ours" else common.build_torchvision(kind, cfg, ours)
    if impl != "ours":
        del ours
    model = model.to(device)
    images, gt = common.random_batch(args.batch_size, args.image_size, device=device)
    if impl == "ours":
        train_call = lambda: model(images, gt)  # noqa: E731
        infer = lambda: model.predict(images, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)  # noqa: E731
    else:
        _, train_call = _train_calls(model, model, images, gt)
        image_list = list(images)
        infer = lambda: model.detector(image_list)  # noqa: E731
    return model, train_call, infer


def _run_phase(model: torch.nn.Module, phase: str, fn: Callable[[], Any], device: torch.device, amp: bool) -> None:
    """Two inference calls (eval mode, no grad) or two training steps."""
    if phase == "infer":
        model.eval()
        with torch.no_grad(), autocast_ctx(device, amp):
            fn(); fn()  # noqa: E702
    else:
        model.train()
        fn(); fn()  # noqa: E702


def _cuda_peaks(model: torch.nn.Module, phases: Sequence[Tuple[str, Callable[[], Any]]], device: torch.device,
                amp: bool) -> Dict[str, Any]:
    """``{phase}_peak_mib`` of each phase on a CUDA device (allocator statistics), and the method."""
    result: Dict[str, Any] = {}
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    for phase, fn in phases:
        torch.cuda.reset_peak_memory_stats(device)
        _run_phase(model, phase, fn, device, amp)
        torch.cuda.synchronize(device)
        result[f"{phase}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    result["method"] = "torch.cuda.max_memory_allocated - allocated after build"
    return result


def _rss_peaks(model: torch.nn.Module, phases: Sequence[Tuple[str, Callable[[], Any]]], device: torch.device,
               amp: bool) -> Dict[str, Any]:
    """``{phase}_peak_mib`` of each phase on the CPU (peak resident set), and the method."""
    result: Dict[str, Any] = {}
    base_kib = _proc_status_kib("VmRSS")
    exact = _reset_peak_rss()
    for phase, fn in phases:
        # Each phase is measured from the resident set at its own start, read right after
        # resetting the peak (so peak >= start): garbage freed in between (e.g. left by
        # earlier work in the same process) would otherwise make the difference negative.
        gc.collect()
        if exact:
            _reset_peak_rss()
        start_kib = _proc_status_kib("VmRSS") if exact else base_kib
        _run_phase(model, phase, fn, device, amp)
        # Linux syncs each thread's RSS counters lazily (every 64 page faults), so two
        # reads can disagree by a few hundred KiB: a phase that allocates next to
        # nothing (tiny models) may read slightly negative, which means 0.
        result[f"{phase}_peak_mib"] = max(_proc_status_kib("VmHWM") - start_kib, 0) / 1024
    result["method"] = ("peak RSS (VmHWM, reset via clear_refs) - RSS at the start of the phase" if exact
                        else "VmHWM - RSS after build (VmHWM not resettable: includes construction)")
    return result


def memory_probe(kind: str, impl: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Peak memory of one model (``impl`` = ours | torchvision), run in this process.

    Called in a fresh subprocess by :func:`measure_memory`. Inference is measured
    first, then training (whose peak includes gradients and optimizer state).
    """
    device = torch.device(args.device)
    model, train_call, infer = _probe_calls(kind, impl, args, device)
    step = make_train_step(model, train_call, device, args.amp)
    gc.collect()
    phases = (("infer", infer), ("train", step))
    peaks = _cuda_peaks if device.type == "cuda" else _rss_peaks
    return {"kind": kind, "impl": impl, **peaks(model, phases, device, args.amp)}


def measure_memory(kind: str, impl: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Run :func:`memory_probe` in a fresh interpreter and return its JSON result."""
    probe_args = {k: v for k, v in vars(args).items() if k != "json"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", f"{kind}:{impl}",
           "--_probe-args", json.dumps(probe_args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(common.REPO_ROOT))
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory probe {kind}:{impl} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")


# --------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> "common.PairConfig":
    cfg = common.PairConfig(
        backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
        score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
    )
    cfg.fcos.tv_head_norm = args.tv_fcos_head_norm
    if getattr(args, "small", False):  # tiny widths for smoke tests
        cfg.fcos.fpn_channels, cfg.fcos.stem_channels = 32, (32, 32)
        cfg.faster_rcnn.fpn_channels = 32
        cfg.faster_rcnn.rpn_stem_channels = cfg.faster_rcnn.roi_stem_channels = (32, 32)
    return cfg


def bench_detector(kind: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Training step, inference and target-assignment timings of one pair."""
    device = torch.device(args.device)
    cfg = config_from_args(args)
    torch.manual_seed(0)
    ours, theirs = common.build_pair(kind, cfg, device)
    images, gt = common.random_batch(args.batch_size, args.image_size, seed=0, device=device)
    sync = _sync_fn(device)

    ours_call, theirs_call = _train_calls(ours, theirs, images, gt)
    steps = {"ours": make_train_step(ours, ours_call, device, args.amp),
             "torchvision": make_train_step(theirs, theirs_call, device, args.amp)}
    train = alternate(steps, args.iters, args.warmup, sync)
    losses = {name: float(step()) for name, step in steps.items()}  # one more, to check finiteness

    ours.eval()
    theirs.eval()
    ours_infer, theirs_infer = _infer_calls(ours, theirs, images, cfg, device, args.amp)
    infer = alternate({"ours": ours_infer, "torchvision": theirs_infer}, args.iters, args.warmup, sync)
    ours.train()

    assign = time_assignment(kind, ours, images, gt, args.iters, sync)
    result: Dict[str, Any] = {
        "train_step_s": {k: statistics.median(v) for k, v in train.items()},
        "train_step_all_s": train,
        "infer_batch_s": {k: statistics.median(v) for k, v in infer.items()},
        "infer_images_per_s": {k: args.batch_size / statistics.median(v) for k, v in infer.items()},
        "final_loss": losses,
        "trainable_params": {"ours": common.num_parameters(ours), "torchvision": common.num_parameters(theirs)},
        "target_assignment_s": assign,
    }
    result["train_ratio"] = result["train_step_s"]["ours"] / result["train_step_s"]["torchvision"]
    result["infer_speedup"] = result["infer_images_per_s"]["ours"] / result["infer_images_per_s"]["torchvision"]
    if assign is not None:
        result["target_assignment_share"] = assign / result["train_step_s"]["ours"]
    del ours, theirs
    gc.collect()
    if args.memory:
        result["memory"] = {impl: measure_memory(kind, impl, args) for impl in ("ours", "torchvision")}
    return result


def bench_nms(args: argparse.Namespace) -> Dict[str, Any]:
    """Our ``a5.kernels.fast_nms`` (what training and inference run; ``fcos.nms`` is the
    student's plain version) vs ``torchvision.ops.nms``: median seconds and identical
    kept indices."""
    import torchvision

    from a5.kernels import fast_nms

    device = torch.device(args.device)
    sync = _sync_fn(device)
    out: Dict[str, Any] = {}
    for n in args.nms_sizes:
        boxes, scores = common.random_boxes(n, seed=n, device=device)
        keep_ours = fast_nms(boxes, scores, 0.5)
        keep_tv = torchvision.ops.nms(boxes, scores, 0.5)
        identical = torch.equal(keep_ours.long().cpu(), keep_tv.long().cpu())
        times = alternate({"ours": lambda: fast_nms(boxes, scores, 0.5),
                           "torchvision": lambda: torchvision.ops.nms(boxes, scores, 0.5)},
                          args.nms_reps, 1, sync)
        ours_s, tv_s = statistics.median(times["ours"]), statistics.median(times["torchvision"])
        out[str(n)] = {"ours_s": ours_s, "torchvision_s": tv_s, "ratio": ours_s / tv_s,
                       "identical": identical, "kept": int(keep_tv.numel())}
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def format_report(results: Dict[str, Any]) -> str:
    rows: List[List[Any]] = []
    for kind in DETECTORS:
        if kind not in results:
            continue
        r = results[kind]
        name = NAMES[kind]
        t, i = r["train_step_s"], r["infer_images_per_s"]
        rows.append([name, "train step, median (ms)", _ms(t["ours"]), _ms(t["torchvision"]),
                     f"{r['train_ratio']:.2f}", f"<= {TARGETS['train_ratio']}",
                     _ok(r["train_ratio"] <= TARGETS["train_ratio"])])
        rows.append([name, "inference (images/s)", f"{i['ours']:.1f}", f"{i['torchvision']:.1f}",
                     f"{r['infer_speedup']:.2f}x", f">= {TARGETS['infer_speedup']}x",
                     _ok(r["infer_speedup"] >= TARGETS["infer_speedup"])])
        if "memory" in r:
            mem = r["memory"]
            for phase, label in (("train", "peak memory, training (MiB)"), ("infer", "peak memory, inference (MiB)")):
                o, v = mem["ours"][f"{phase}_peak_mib"], mem["torchvision"][f"{phase}_peak_mib"]
                rows.append([name, label, f"{o:.0f}", f"{v:.0f}", f"{o / v:.2f}" if v > 0 else "n/a", "", ""])
        if r.get("target_assignment_s") is not None:
            rows.append([name, "target assignment per batch (ms, share of our step)",
                         f"{_ms(r['target_assignment_s'])} ({100 * r['target_assignment_share']:.1f}%)",
                         "", "", "", ""])
    for n, r in results.get("nms", {}).items():
        target = f"<= {TARGETS['nms_ratio_5k']}x" if n == "5000" else ""
        met = _ok(r["ratio"] <= TARGETS["nms_ratio_5k"]) if n == "5000" else ""
        rows.append([f"NMS, {int(n):,} boxes", f"time (ms), identical keep: {_ok(r['identical'])}",
                     f"{r['ours_s'] * 1e3:.2f}", f"{r['torchvision_s'] * 1e3:.2f}", f"{r['ratio']:.2f}x",
                     target, met])
    header = ["benchmark", "measure", "ours", "torchvision", "ours / tv", "target", "met"]
    return common.markdown_table(header, rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 or regnet_x_400mf")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="ImageNet backbone weights (timings do not depend on them)")
    p.add_argument("--only", default="fcos,faster_rcnn,nms", help="comma-separated subset of fcos,faster_rcnn,nms")
    p.add_argument("--score-thresh", type=float, default=0.2, help="inference score threshold (both models)")
    p.add_argument("--nms-thresh", type=float, default=0.6, help="inference NMS IoU threshold (both models)")
    p.add_argument("--tv-fcos-head-norm", default="groupnorm", choices=("groupnorm", "none"),
                   help="torchvision FCOS head: 'groupnorm' = its stock head (GroupNorm, like ours), "
                        "'none' = plain conv + ReLU stems")
    p.add_argument("--nms-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 5000, 20000])
    p.add_argument("--nms-reps", type=int, default=10)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (one fresh subprocess per model)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the numbers and machine info to this file")
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # tiny widths, smoke tests
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_probe-args", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """All requested benchmarks; returns the JSON-able report (also printed)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    info = common.machine_info(device)
    load, cores = info.get("load_average_1min"), info.get("usable_cores") or 1
    if device.type == "cpu" and load is not None and load > 0.5 * cores:
        hint = "an idle machine" if torch.get_num_threads() == 1 else "--threads 1, or an idle machine"
        print(f"[speed] warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU, "
              f"timings will be noisy (consider {hint})", file=sys.stderr)
    report: Dict[str, Any] = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("speed.py") else None,
        "machine": info,
        "config": {**common.PairConfig().as_dict(), **config_from_args(args).as_dict(),
                   "batch_size": args.batch_size, "iters": args.iters, "warmup": args.warmup, "amp": args.amp},
        "results": {},
    }
    for kind in DETECTORS:
        if kind in only:
            print(f"[speed] {NAMES[kind]}: {args.iters} timed + {args.warmup} warm-up steps per model ...",
                  file=sys.stderr, flush=True)
            report["results"][kind] = bench_detector(kind, args)
    if "nms" in only:
        report["results"]["nms"] = bench_nms(args)
    table = format_report(report["results"])
    report["table"] = table
    amp = " AMP" if args.amp else ""
    print(f"\nbatch {args.batch_size}, {args.image_size}x{args.image_size}, {args.backbone}, "
          f"{device.type}{amp}; {common.machine_line(report['machine'])}\n")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args._probe:
        probe_args = argparse.Namespace(**json.loads(args._probe_args))
        if probe_args.threads:
            torch.set_num_threads(probe_args.threads)
        kind, impl = args._probe.split(":")
        print(json.dumps(memory_probe(kind, impl, probe_args)))
        return
    run(args)


if __name__ == "__main__":
    main()

"""Fast kernels behind the detectors: provided code, not part of the assignment.

The chapters that students read (``fcos.py``, ``two_stage_detector.py``) state each
algorithm in its plain form; training and inference call the versions here, which
compute the same results faster. Each says what it buys; each has its own tests
(``tests/test_kernels.py``) that compare it with the plain version or torchvision.

* ``fast_nms`` / ``batched_nms``: greedy NMS, vectorised (independent clusters, blocked
  fixed-point greedy), equal to ``torchvision.ops.nms`` / ``batched_nms``; 0.5-0.7x
  torchvision's C++ time on a CPU (``benchmarks/speed.py``), where a Python loop over
  boxes is 10-100x slower.
* ``split_kept_per_image``, ``select_detections``, ``nms_topk_per_image``: one NMS
  call for a whole batch instead of one per image (and class).
* ``fold_batchnorm``: BatchNorm folded into the convolutions of an eval-mode CNN
  (about a fifth of MobileNetV2's CPU inference time).
* ``GroupNorm``: ``nn.GroupNorm`` without PyTorch's slow CPU kernel for half-precision
  channels-last inputs (~30% faster bfloat16 FCOS steps).
* ``to_fast_layout``: channels-last CPU tensors, which oneDNN convolves faster.
* ``roi_align``: ``torchvision.ops.roi_align(aligned=True)`` with a sparse-matrix
  backward on the CPU (torchvision's is a serial loop).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

def to_fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Return a CPU feature map in channels-last (NHWC) memory layout.

    oneDNN, PyTorch's CPU convolution library, is markedly faster on
    channels-last tensors, and conv / norm / ReLU outputs keep the layout of
    their input, so converting the network input once speeds up the whole
    backbone and head. Only the memory layout changes (shapes and indexing
    are the same). GPU tensors are left as they are.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x



def fold_batchnorm(body: nn.Module) -> nn.Module:
    """
    An inference copy of a CNN in which every BatchNorm that directly follows
    a convolution (in the same ``nn.Sequential``, as in torchvision's
    ``Conv2dNormActivation`` blocks) is folded into that convolution.

    In eval mode a BatchNorm is a fixed per-channel affine map,
    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so
    ``BN(conv(x))`` is itself a convolution with rescaled weights and a new
    bias. Pairs are found among the consecutive children of every
    ``nn.Sequential`` and, for an fx ``GraphModule``, in its graph (a conv
    whose output only feeds a BatchNorm). The folded network computes the
    same features (up to float rounding) and skips a full pass over every
    feature map: about a fifth of MobileNetV2's inference time on a CPU.

    Args:
        body: The CNN (e.g. the ``GraphModule`` of ``build_backbone_body``).

    Returns:
        A new module in eval mode, without gradients; ``body`` is unchanged.
    """
    folded = copy.deepcopy(body).eval().requires_grad_(False)
    # (conv, norm) pairs by qualified name: consecutive children of a
    # Sequential, and, in an fx graph, a conv node whose only reader is a norm.
    pairs: List[Tuple[str, str]] = []
    for prefix, module in folded.named_modules():
        if isinstance(module, nn.Sequential):
            names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_children()]
            pairs += list(zip(names, names[1:]))
    if isinstance(folded, fx.GraphModule):
        for node in folded.graph.nodes:
            source = node.args[0] if node.op == "call_module" and node.args else None
            if isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1:
                pairs.append((source.target, node.target))
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            # Replacing modules (not graph nodes) works for plain and fx modules alike.
            _set_submodule(folded, conv_name, fuse_conv_bn_eval(conv, norm))
            _set_submodule(folded, norm_name, nn.Identity())
    return folded


def without_outputs(body: fx.GraphModule, dropped: Sequence[str]) -> fx.GraphModule:
    """
    A copy of an fx feature extractor whose output dict leaves out the keys
    ``dropped``, and every layer that only they needed (e.g. ``dropped=("c5",)``
    turns a c3/c4/c5 body into the cheaper c3/c4 trunk: the stride-32 stage of
    MobileNetV2 is about 30% of its multiply-adds). The copy calls the same
    layers as ``body`` (shared weights).
    """
    graph = copy.deepcopy(body.graph)
    output = next(node for node in graph.nodes if node.op == "output")
    taps = output.args[0]
    missing = [key for key in dropped if key not in taps]
    if missing:
        raise KeyError(f"{', '.join(missing)}: not among the body's outputs {', '.join(taps)}")
    output.args = ({key: node for key, node in taps.items() if key not in dropped},)
    trunk = fx.GraphModule(body, graph)
    trunk.graph.eliminate_dead_code()  # (needs the owning module: after construction)
    trunk.recompile()
    trunk.delete_all_unused_submodules()  # from the trunk's own containers; body keeps its layers
    return trunk.train(body.training)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, module)



class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, state dict and values) that avoids a slow
    kernel: on the CPU, PyTorch's GroupNorm on a channels-last bfloat16 / float16
    tensor runs about 10x slower than on the same tensor in NCHW layout (torch
    2.15: 64 ms against 6 ms, forward + backward, for ``(16, 128, 28, 28)``). Under
    CPU autocast the head's convolutions hand it exactly that, so it normalises an
    NCHW copy and returns channels-last again for the next convolution (~30%
    faster FCOS training steps in bfloat16). Float32 keeps the direct path, which
    is fast in both layouts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)



def _threshold_like_torchvision(iou_threshold: float, dtype: torch.dtype, device) -> torch.Tensor:
    """torchvision compares the IoU (computed in the boxes' dtype) with the threshold as a
    double. Return the threshold in the boxes' dtype that makes the same decisions: if
    rounding moved it up, step one value down."""
    thresh = torch.tensor(iou_threshold, dtype=dtype, device=device)
    if float(thresh) > iou_threshold:
        thresh = torch.nextafter(thresh, thresh.new_tensor(-math.inf))
    return thresh


def _iou_above(first: torch.Tensor, second: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """(..., M, K) bool: IoU(first[..., m], second[..., k]) > thresh, where ``first``
    (5, ..., M) and ``second`` (5, ..., K) hold x1, y1, x2, y2 and area. Same floating
    point operations as torchvision's kernel, so that the decisions are identical even at
    the threshold."""
    x1a, y1a, x2a, y2a, area_a = first.unsqueeze(-1)
    x1b, y1b, x2b, y2b, area_b = second.unsqueeze(-2)
    inter_w = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
    inter_h = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    union = (area_a + area_b).sub_(inter)
    return inter.div_(union) > thresh


def _left_align(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Move the selected entries of each row of ``values`` (G, W) to the left, keeping
    their order, pad with -1 and trim to the longest row. The new column of a selected
    entry is the running count of selected entries; the others go to a spare column."""
    width = int(selected.sum(dim=1).max()) if selected.numel() > 0 else 0
    column = torch.where(selected, torch.cumsum(selected, dim=1) - 1, width)
    aligned = values.new_full((values.shape[0], width + 1), -1)
    return aligned.scatter_(1, column, values)[:, :width]


def _greedy_within_block(suppresses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Greedy keep-mask of a block: the unique solution of
    ``keep[j] = valid[j] and not any(keep[i] and suppresses[i, j])``, found by iterating
    the equation to its fixed point (exact after at most ``block`` steps, usually a few)."""
    keep = valid & ~suppresses.any(dim=1)
    if torch.equal(keep, valid):
        return keep
    while True:
        new_keep = valid & ~(suppresses & keep.unsqueeze(-1)).any(dim=1)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def _greedy_rows(rows: torch.Tensor, table: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Greedy NMS within each row of ``rows`` (G, W): positions in score order,
    left-aligned, padded with -1; ``table`` (5, N) holds x1, y1, x2, y2, area by
    position. Rows are processed ``block`` boxes at a time: the kept boxes of a block
    suppress the rest of their row at once. Returns the kept positions."""
    # One long row wants large blocks (fewer Python rounds); many rows want small ones
    # (the G x block x block intra-block matrices dominate).
    block = max(32, min(128, int(128 / math.sqrt(max(rows.shape[0], 1)))))
    kept_rows: List[torch.Tensor] = []
    while rows.shape[0] > 0 and rows.shape[1] > 0:
        current, rest = rows[:, :block], rows[:, block:]
        valid = current >= 0
        cur_table = table[:, current.clamp(min=0)]  # (5, G, block)
        # suppresses[g, i, j]: in row g, box i comes before box j and overlaps it.
        suppresses = _iou_above(cur_table, cur_table, thresh).triu_(diagonal=1)
        suppresses &= valid.unsqueeze(-1)  # padding suppresses nothing
        kept = _left_align(current, _greedy_within_block(suppresses, valid))
        kept_rows.append(kept[kept >= 0])
        # Rows are left-aligned: a row has boxes left iff its first entry does.
        alive = rest[:, 0] >= 0 if rest.shape[1] > 0 else rest.new_zeros((0,), dtype=torch.bool)
        if not bool(alive.any()):
            break
        rest, kept = rest[alive], kept[alive]
        overlaps = _iou_above(table[:, kept.clamp(min=0)], table[:, rest.clamp(min=0)], thresh)
        overlaps &= (kept >= 0).unsqueeze(-1)  # padding suppresses nothing
        rows = _left_align(rest, (rest >= 0) & ~overlaps.any(dim=1))
        if rows.shape[1] > 0:
            rows = rows[rows[:, 0] >= 0]
    return torch.cat(kept_rows) if kept_rows else rows.new_empty((0,))


def _clusters_by_x(sorted_boxes: torch.Tensor) -> torch.Tensor:
    """Cluster id of every box: sweeping the boxes by ``x1``, a box starts a new cluster
    when it begins at or right of the largest ``x2`` so far. Boxes of different clusters
    have disjoint x-ranges, hence IoU 0: they never suppress each other."""
    x_order = torch.sort(sorted_boxes[:, 0], stable=True).indices
    reach = torch.cummax(sorted_boxes[x_order, 2], dim=0).values
    starts = torch.ones(sorted_boxes.shape[0], dtype=torch.bool, device=sorted_boxes.device)
    starts[1:] = sorted_boxes[x_order[1:], 0] >= reach[:-1]
    cluster = torch.empty_like(x_order)
    cluster[x_order] = torch.cumsum(starts, dim=0) - 1
    return cluster


def _greedy_per_cluster(cluster: torch.Tensor, table: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Kept positions of greedy NMS run independently in every cluster. Clusters of
    similar size (2^(k-1) < size <= 2^k) are padded into one matrix, a row per cluster
    (at most 2x padding), and processed together by ``_greedy_rows``."""
    positions = torch.arange(cluster.numel(), device=cluster.device)
    sizes = torch.bincount(cluster)
    if sizes.numel() == 1:  # one cluster: a single row, in score order
        return _greedy_rows(positions.unsqueeze(0), table, thresh)
    # Positions grouped by cluster (a stable sort keeps the score order inside each
    # cluster) and their rank within the cluster.
    by_cluster = torch.sort(cluster, stable=True).indices
    member_cluster = cluster[by_cluster]
    rank = positions - (torch.cumsum(sizes, dim=0) - sizes)[member_cluster]
    powers_of_two = torch.tensor([1 << k for k in range(63)], device=cluster.device)
    size_class = torch.bucketize(sizes, powers_of_two)
    member_class = size_class[member_cluster]
    kept_chunks: List[torch.Tensor] = []
    for k in torch.unique(size_class).tolist():
        in_class = member_class == k
        if k == 0:  # single-box clusters: nothing can suppress them
            kept_chunks.append(by_cluster[in_class])
            continue
        class_clusters = size_class == k
        row_of_cluster = torch.cumsum(class_clusters, dim=0) - 1
        rows = positions.new_full((int(class_clusters.sum()), int(sizes[class_clusters].max())), -1)
        rows[row_of_cluster[member_cluster[in_class]], rank[in_class]] = by_cluster[in_class]
        kept_chunks.append(_greedy_rows(rows, table, thresh))
    return torch.cat(kept_chunks)


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """
    Greedy non-maximum suppression, the result of ``fcos.nms`` (and of
    ``torchvision.ops.nms``: tied scores in input order, the comparison with the
    threshold, degenerate boxes whose IoU 0/0 = NaN never suppresses, float64), without
    a Python loop over boxes:

    1. **Independent clusters** (``_clusters_by_x``): boxes with disjoint x-ranges never
       suppress each other, so the work is the sum over clusters of ``size^2`` instead
       of ``N^2``. This matters for ``batched_nms``, which shifts each class far away.
    2. **Blocked greedy, batched over clusters** (``_greedy_per_cluster``): each
       cluster is a row of boxes in score order; rows are processed ``block`` boxes at
       a time, all rows at once.

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        iou_threshold: Suppress boxes whose IoU with a kept box is larger.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.shape[0] == 0:
        return boxes.new_empty((0,), dtype=torch.long)
    # Stable descending sort: tied scores keep their input order, as in torchvision.
    # Below, "position" = index in this order.
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    areas = (sorted_boxes[:, 2] - sorted_boxes[:, 0]) * (sorted_boxes[:, 3] - sorted_boxes[:, 1])
    # (5, N) table of x1, y1, x2, y2, area: gathering columns gives contiguous
    # per-coordinate tensors, which the IoU ops read fastest.
    table = torch.cat([sorted_boxes.t(), areas.unsqueeze(0)])
    thresh = _threshold_like_torchvision(iou_threshold, boxes.dtype, boxes.device)
    # Clusters are only independent when boxes with IoU 0 cannot suppress (thresh >= 0).
    if iou_threshold >= 0:
        cluster = _clusters_by_x(sorted_boxes)
    else:
        cluster = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    kept_positions = _greedy_per_cluster(cluster, table, thresh)
    # Positions in increasing order = decreasing score (ties: input order).
    return order[torch.sort(kept_positions).values]


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """
    Class-specific NMS: boxes of different classes never suppress each other.

    Trick: shift the boxes of each class by a class-dependent offset larger
    than all coordinates, so that boxes of different classes can no longer
    overlap, and run one ``fast_nms`` on everything. It notices that the
    shifted classes are spatially separate and handles them as independent
    clusters, so the cost grows with the square of the class sizes, not of
    the total number of boxes.

    The shifted boxes are in float64: in float32, an offset of a few thousand
    pixels leaves only about 1e-3 px of precision, enough to flip IoU
    comparisons near the threshold. In float64 the IoUs are those of the
    unshifted boxes, so the result is identical to
    ``torchvision.ops.batched_nms`` (which runs one NMS per class on large
    inputs).

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        class_ids: ``(N,)`` integer class (or any group) ids.
        iou_threshold: IoU threshold of ``nms``.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes64 = boxes.to(torch.float64)
    # Shift by (span + 1) per class: classes then lie in disjoint x/y ranges.
    span = boxes64.max() - boxes64.min()
    offsets = class_ids.to(boxes64) * (span + 1)
    return fast_nms(boxes64 + offsets[:, None], scores, iou_threshold)



def split_kept_per_image(
    keep: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    max_per_image: Optional[int] = None,
) -> List[torch.Tensor]:
    """
    Split the survivors of one NMS over a whole batch by image.

    Detectors run a single ``batched_nms`` for all images at once (groups =
    (image, class) pairs): far fewer calls than one NMS per image. This gives
    back each image's share, best first, capped at ``max_per_image``.

    Args:
        keep: ``(K,)`` indices of the kept candidates by decreasing score (as
            returned by ``fast_nms`` / ``batched_nms``).
        image_ids: ``(N,)`` image index of every candidate.
        num_images: Batch size ``B`` (images without survivors get an empty
            tensor).
        max_per_image: Keep at most this many per image (``None``: all).

    Returns:
        List of ``B`` int64 tensors of candidate indices, by decreasing score.
    """
    # A stable sort by image groups `keep` per image and keeps the score order
    # within each image; an entry's rank in its image is its position minus
    # the position where its image starts.
    keep = keep[torch.sort(image_ids[keep], stable=True).indices]
    kept_image_ids = image_ids[keep]
    counts = torch.bincount(kept_image_ids, minlength=num_images)
    if max_per_image is not None:
        starts = torch.cumsum(counts, dim=0) - counts
        rank = torch.arange(keep.numel(), device=keep.device) - starts[kept_image_ids]
        keep = keep[rank < max_per_image]
        counts = counts.clamp(max=max_per_image)
    return list(keep.split(counts.tolist()))



def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    nms_thresh: float,
    max_per_image: Optional[int],
) -> List[Dict[str, torch.Tensor]]:
    """
    Class-specific NMS per image, for a whole batch in one call, and the best
    ``max_per_image`` detections of every image: the last step of both detectors'
    inference.

    Args:
        boxes: ``(N, 4)`` candidate boxes of all images.
        scores, labels, image_ids: ``(N,)`` score, class and image of each candidate.
        num_images: Batch size ``B``.
        nms_thresh: IoU threshold of the NMS.
        max_per_image: Most detections kept per image (``None``: all).

    Returns:
        ``B`` dicts with "boxes" ``(K, 4)``, "labels" ``(K,)`` and "scores" ``(K,)``,
        by decreasing score.
    """
    num_classes = int(labels.max()) + 1 if labels.numel() > 0 else 1
    # One group per (image, class): groups never suppress each other.
    keep = batched_nms(boxes, scores, image_ids * num_classes + labels, nms_thresh)
    return [
        {"boxes": boxes[k], "labels": labels[k], "scores": scores[k]}
        for k in split_kept_per_image(keep, image_ids, num_images, max_per_image)
    ]


def nms_topk_per_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    topk: int,
) -> List[torch.Tensor]:
    """
    The first ``topk`` survivors of greedy NMS within each image: the RPN's proposals.

    Greedy NMS decides each box from higher-scored boxes only, so NMS on the top-M
    boxes of an image gives the first survivors of NMS on all of them. NMS runs on a
    short prefix of every image first (``4 * topk`` boxes) and the prefix grows only for
    the images where too few boxes survive: the same result as NMS on everything, at a
    fraction of the cost. One ``batched_nms`` call handles all pending images (an image
    is a group).

    Args:
        boxes: ``(B, K, 4)`` candidate boxes.
        scores: ``(B, K)`` their scores (higher is better).
        valid: ``(B, K)`` bool, False for candidates to ignore.
        iou_threshold: IoU threshold of the NMS.
        topk: Survivors kept per image.

    Returns:
        ``B`` tensors ``(P_i, 4)``, ``P_i <= topk``, by decreasing score.
    """
    num_images, num_candidates = scores.shape
    ranked = torch.argsort(scores.masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True)
    num_valid = valid.sum(dim=1)
    survivors: List[torch.Tensor] = [boxes.new_zeros((0, 4))] * num_images
    pending = torch.arange(num_images, device=boxes.device)
    prefix = 4 * topk
    while pending.numel() > 0:
        width = min(prefix, num_candidates)
        candidates = ranked[pending, :width]  # (P, width)
        in_prefix = torch.arange(width, device=boxes.device) < num_valid[pending, None]
        image_idx = pending[:, None].expand_as(candidates)[in_prefix]
        candidates = candidates[in_prefix]
        keep = batched_nms(boxes[image_idx, candidates], scores[image_idx, candidates], image_idx, iou_threshold)
        kept = split_kept_per_image(keep, image_idx, num_images, topk)
        num_kept = torch.tensor([len(k) for k in kept], device=boxes.device)[pending]
        # Done: enough survivors, or the prefix already held every valid box.
        done = (num_kept >= topk) | (num_valid[pending] <= width)
        for image in pending[done].tolist():
            survivors[image] = boxes[image, candidates[kept[image]]]
        pending = pending[~done]
        prefix *= 4
    return survivors


def _roi_sample_positions(rois: torch.Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                          sampling_ratio: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Feature-map coordinates of the bilinear samples of every bin, a separable grid:
    rows ``(K, PH, s)`` and columns ``(K, PW, s)`` (``rois`` in the gradient's dtype)."""
    dtype, device = rois.dtype, rois.device
    start_x = rois[:, 1] * spatial_scale - 0.5  # aligned=True: pixel centres at +0.5
    start_y = rois[:, 2] * spatial_scale - 0.5
    bin_w = (rois[:, 3] - rois[:, 1]) * spatial_scale / pooled_w
    bin_h = (rois[:, 4] - rois[:, 2]) * spatial_scale / pooled_h
    offsets = (torch.arange(sampling_ratio, dtype=dtype, device=device) + 0.5) / sampling_ratio
    grid_y = torch.arange(pooled_h, dtype=dtype, device=device)[:, None] + offsets  # (PH, s)
    grid_x = torch.arange(pooled_w, dtype=dtype, device=device)[:, None] + offsets  # (PW, s)
    ys = start_y[:, None, None] + grid_y * bin_h[:, None, None]
    xs = start_x[:, None, None] + grid_x * bin_w[:, None, None]
    return ys, xs


def _bilinear_neighbours(coords: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices and weights ``(..., 2)`` of the two cells a coordinate interpolates, as in
    torchvision's kernel (more than one cell outside the map: weight 0; on the border:
    clamped)."""
    dtype = coords.dtype
    inside = ((coords >= -1.0) & (coords <= size)).to(dtype)
    coords = coords.clamp(min=0)
    low = coords.floor().long().clamp(max=size - 1)
    at_end = low >= size - 1
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(coords), coords - low.to(dtype)) * inside
    return torch.stack([low, high], dim=-1), torch.stack([inside - frac, frac], dim=-1)


def _roi_align_matrix(rois: torch.Tensor, input_shape: torch.Size, pooled_h: int, pooled_w: int,
                      spatial_scale: float, sampling_ratio: int) -> torch.Tensor:
    """The sparse ``(B * H * W, K * PH * PW)`` matrix ``M^T`` of roi_align (aligned=True):
    column ``b`` holds the weights of the cells that bin ``b`` averages."""
    num_images, _, height, width = input_shape
    num_rois = rois.shape[0]
    batch_idx = rois[:, 0].long()
    ys, xs = _roi_sample_positions(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio)
    y_idx, y_w = _bilinear_neighbours(ys, height)  # (K, PH, s, 2)
    x_idx, x_w = _bilinear_neighbours(xs, width)  # (K, PW, s, 2)
    # Outer product over (bin row, bin column, sample row, sample column, 2 rows, 2 columns).
    y_idx, y_w = y_idx[:, :, None, :, None, :, None], y_w[:, :, None, :, None, :, None]
    x_idx, x_w = x_idx[:, None, :, None, :, None, :], x_w[:, None, :, None, :, None, :]
    cells = (batch_idx[:, None, None, None, None, None, None] * height + y_idx) * width + x_idx
    weights = y_w * (x_w / (sampling_ratio * sampling_ratio))
    num_bins = num_rois * pooled_h * pooled_w
    entries_per_bin = 4 * sampling_ratio * sampling_ratio  # samples x neighbours
    bins = torch.arange(num_bins, device=rois.device)[:, None].expand(num_bins, entries_per_bin)
    return torch.sparse_coo_tensor(
        torch.stack([cells.reshape(-1), bins.reshape(-1)]),
        weights.reshape(-1),
        (num_images * height * width, num_bins),
        check_invariants=False,
    )


def _roi_align_input_grad(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: torch.Size,
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """
    Gradient of ``torchvision.ops.roi_align(..., aligned=True)`` with respect to its
    input features, for a fixed ``sampling_ratio > 0``.

    Every output bin is the mean of ``sampling_ratio ** 2`` bilinear samples, and each
    sample reads 4 neighbouring feature cells, so the op is a sparse linear map
    ``M`` from the ``(B * H * W)`` cells to the ``(K * PH * PW)`` bins (per channel).
    Its gradient is ``M^T @ grad_output``: we build ``M`` (16 entries per bin for
    a sampling ratio of 2) with tensor ops, following torchvision's kernel exactly
    (samples more than one cell outside the map are ignored; samples on the border
    are clamped), and let one sparse matrix product do the scatter for all channels.

    Returns:
        ``(B, C, H, W)`` gradient (a permuted view, which autograd accepts).
    """
    num_images, channels, height, width = input_shape
    num_rois, _, pooled_h, pooled_w = grad_output.shape
    matrix = _roi_align_matrix(rois.to(grad_output.dtype), input_shape, pooled_h, pooled_w, spatial_scale,
                               sampling_ratio)
    grad_bins = grad_output.permute(0, 2, 3, 1).reshape(num_rois * pooled_h * pooled_w, channels)
    grad_cells = torch.sparse.mm(matrix, grad_bins)  # (B*H*W, C); duplicates are summed
    return grad_cells.reshape(num_images, height, width, channels).permute(0, 3, 1, 2)


class _RoIAlignFastBackward(torch.autograd.Function):
    """
    ``torchvision.ops.roi_align`` (aligned) whose backward pass is
    ``_roi_align_input_grad``. On CPU, torchvision's backward is a serial scalar
    loop over every (RoI, channel, bin, sample) and is the most expensive step of
    the second stage; the sparse product gives the same gradient several times
    faster (and uses all cores). The forward pass is torchvision's.
    """

    @staticmethod
    def forward(ctx, feats, rois, output_size, spatial_scale, sampling_ratio):
        ctx.save_for_backward(rois)
        ctx.input_shape = feats.shape
        ctx.spatial_scale = spatial_scale
        ctx.sampling_ratio = sampling_ratio
        return torchvision.ops.roi_align(feats, rois, output_size, spatial_scale, sampling_ratio, aligned=True)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad = _roi_align_input_grad(grad_output, rois, ctx.input_shape, ctx.spatial_scale, ctx.sampling_ratio)
        return grad, None, None, None, None


def roi_align(
    feats: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> torch.Tensor:
    """``torchvision.ops.roi_align(aligned=True)``, with the fast backward on CPU."""
    use_fast_backward = (
        feats.requires_grad
        and torch.is_grad_enabled()
        and feats.device.type == "cpu"
        and feats.dtype in (torch.float32, torch.float64)
        and sampling_ratio > 0
    )
    if use_fast_backward:
        return _RoIAlignFastBackward.apply(feats, rois, output_size, spatial_scale, sampling_ratio)
    return torchvision.ops.roi_align(feats, rois, output_size, spatial_scale, sampling_ratio, aligned=True)



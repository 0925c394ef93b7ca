"""Plausible student mistakes in the two-stage detector's parts (see ``grading/mutations.py``).

Each ``old`` is an exact, unique piece of a student region of ``two_stage_detector.py``;
``new`` is what a student could plausibly write instead. The tests of the part (public
``tests/test_two_stage_detector.py`` and hidden ``tests/hidden/test_two_stage_hidden.py``)
must fail for each of them, with a message that says what was expected.
"""
from __future__ import annotations

from grading.mutations import Mutation

_M = "two_stage_detector.py"

MUTATIONS = [
    # ---------------------------------------------------------------- rpn_head
    Mutation(
        part="rpn_head", module=_M,
        old="stem_rpn += [nn.Conv2d(prev_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]",
        new="stem_rpn += [nn.Conv2d(prev_channels, out_channels, 3, padding=1)]",
        mistake="no ReLU after the 3x3 convs of the RPN stem",
    ),
    Mutation(
        part="rpn_head", module=_M,
        old="stem_rpn += [nn.Conv2d(prev_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]",
        new="stem_rpn += [nn.Conv2d(prev_channels, out_channels, 3), nn.ReLU(inplace=True)]",
        mistake="3x3 stem convs without padding (the feature maps shrink)",
    ),
    Mutation(
        part="rpn_head", module=_M,
        old="object_logits[level_name] = obj.permute(0, 2, 3, 1).reshape(batch_size, -1)",
        new="object_logits[level_name] = obj.reshape(batch_size, -1)",
        mistake="objectness flattened anchor-major (B, A, H, W) instead of location-major",
    ),
    Mutation(
        part="rpn_head", module=_M,
        old="boxreg_deltas[level_name] = box.permute(0, 2, 3, 1).reshape(batch_size, -1, 4)",
        new="boxreg_deltas[level_name] = box.permute(0, 2, 3, 1).reshape(batch_size, -1, 4, box.shape[1] // 4)"
            ".transpose(2, 3).reshape(batch_size, -1, 4)",
        mistake="box deltas read as channel k * A + a instead of 4 * a + k",
    ),
    Mutation(
        part="rpn_head", module=_M,
        old="""        for layer in self.stem_rpn:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")""",
        new="""        for layer in self.stem_rpn:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)""",
        mistake="N(0, 0.01) init of the stem convs instead of He init",
    ),
    Mutation(
        part="rpn_head", module=_M,
        old="""        for layer in (self.pred_obj, self.pred_box):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)""",
        new="""        for layer in (self.pred_obj, self.pred_box):
            nn.init.zeros_(layer.bias)""",
        mistake="predictor weights left at PyTorch's default init instead of N(0, 0.01)",
    ),
    # ---------------------------------------------------------------- anchors
    Mutation(
        part="anchors", module=_M,
        old="half_sizes = torch.stack([widths, heights], dim=1) / 2",
        new="half_sizes = torch.stack([heights, widths], dim=1) / 2",
        mistake="width and height swapped (aspect ratio read as width / height)",
    ),
    Mutation(
        part="anchors", module=_M,
        old="area = float(level_stride * stride_scale) ** 2",
        new="area = float(level_stride) ** 2",
        mistake="anchor area stride^2 instead of (stride * stride_scale)^2",
    ),
    Mutation(
        part="anchors", module=_M,
        old="area = float(level_stride * stride_scale) ** 2",
        new="area = float(level_stride * stride_scale)",
        mistake="anchor area stride * stride_scale (the side, not squared)",
    ),
    Mutation(
        part="anchors", module=_M,
        old="anchors_per_fpn_level[level_name] = anchors.reshape(-1, 4)",
        new="anchors_per_fpn_level[level_name] = anchors.transpose(0, 1).reshape(-1, 4)",
        mistake="anchors ordered anchor-major (all locations of ratio 0 first) instead of location-major",
    ),
    Mutation(
        part="anchors", module=_M,
        old="heights = ratios * widths",
        new="heights = widths / ratios",
        mistake="height = width / ratio (the box is tall for ratio 0.5 and the area is wrong)",
    ),
    # ---------------------------------------------------------------- iou
    Mutation(
        part="iou", module=_M,
        old="inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)",
        new="inter = (bottom_right - top_left).prod(dim=-1)",
        mistake="negative intersection widths / heights not clamped at 0",
    ),
    Mutation(
        part="iou", module=_M,
        old="inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)",
        new="inter = (bottom_right - top_left).prod(dim=-1).clamp(min=0)",
        mistake="intersection clamped after the product (two negative sides give a positive area)",
    ),
    Mutation(
        part="iou", module=_M,
        old="union = area1[..., :, None] + area2[..., None, :] - inter",
        new="union = area1[..., :, None] + area2[..., None, :]",
        mistake="union without subtracting the intersection",
    ),
    Mutation(
        part="iou", module=_M,
        old="area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])",
        new="area1 = (boxes1[..., 2] - boxes1[..., 1]) * (boxes1[..., 3] - boxes1[..., 0])",
        mistake="x and y coordinates mixed up in the box area",
    ),
    Mutation(
        part="iou", module=_M,
        old="iou_matrix = inter / union.clamp(min=torch.finfo(union.dtype).tiny)",
        new="iou_matrix = inter / union",
        mistake="no guard against a zero union (NaN for two empty boxes)",
    ),
    # ---------------------------------------------------------------- rcnn_match
    Mutation(
        part="rcnn_match", module=_M,
        old="state[best_iou >= high] = 1",
        new="state[best_iou > high] = 1",
        mistake="> instead of >= at the foreground threshold",
    ),
    Mutation(
        part="rcnn_match", module=_M,
        old="state[best_iou < low] = 0",
        new="state[best_iou <= low] = 0",
        mistake="<= instead of < at the background threshold",
    ),
    Mutation(
        part="rcnn_match", module=_M,
        old="""    state = torch.full_like(matched_idx, -1)
    state[best_iou >= high] = 1
    state[best_iou < low] = 0""",
        new="""    state = torch.full_like(matched_idx, 0)
    state[best_iou >= high] = 1
    state[best_iou < low] = -1""",
        mistake="neutral and background states swapped",
    ),
    Mutation(
        part="rcnn_match", module=_M,
        old="""    state[best_iou >= high] = 1
    state[best_iou < low] = 0""",
        new="""    state[best_iou >= low] = 1
    state[best_iou < high] = 0""",
        mistake="low and high thresholds swapped",
    ),
    Mutation(
        part="rcnn_match", module=_M,
        old="best_iou, matched_idx = ious.max(dim=2)",
        new="best_iou, matched_idx = ious.max(dim=2)\n    matched_idx = ious.shape[2] - 1 - ious.flip(2).argmax(dim=2)",
        mistake="the last GT box among equal IoUs instead of the first",
    ),
    # ---------------------------------------------------------------- rcnn_low_quality
    Mutation(
        part="rcnn_low_quality", module=_M,
        old="is_best = (ious == best_iou_per_gt) & (best_iou_per_gt > 0)",
        new="is_best = F.one_hot(ious.argmax(dim=1), ious.shape[1]).transpose(1, 2).bool() & (best_iou_per_gt > 0)",
        mistake="argmax: only one best anchor per GT box, ties dropped",
    ),
    Mutation(
        part="rcnn_low_quality", module=_M,
        old="""    is_best = (ious == best_iou_per_gt) & (best_iou_per_gt > 0)
    best_quality, best_gt_idx = ious.masked_fill(~is_best, -1.0).max(dim=2)
    promoted = best_quality > 0""",
        new="""    is_best = ious == best_iou_per_gt
    best_quality, best_gt_idx = ious.masked_fill(~is_best, -1.0).max(dim=2)
    promoted = is_best.any(dim=2)""",
        mistake="anchors promoted even when the best IoU of the GT box is 0 (or padding)",
    ),
    Mutation(
        part="rcnn_low_quality", module=_M,
        old="best_quality, best_gt_idx = ious.masked_fill(~is_best, -1.0).max(dim=2)",
        new="best_quality, best_gt_idx = is_best.to(ious.dtype).max(dim=2)",
        mistake="a promoted anchor takes the first GT box it is best for, not the one it overlaps most",
    ),
    Mutation(
        part="rcnn_low_quality", module=_M,
        old="best_iou_per_gt = ious.max(dim=1, keepdim=True).values",
        new="best_iou_per_gt = ious.max(dim=2, keepdim=True).values",
        mistake="max over GT boxes (best box per anchor) instead of over anchors (best anchor per box)",
    ),
    # ---------------------------------------------------------------- rcnn_deltas
    Mutation(
        part="rcnn_deltas", module=_M,
        old="ww * torch.log(gt_w / anchor_w),",
        new="ww * (gt_w / anchor_w),",
        mistake="dw without the log",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="wy * (gt_y - anchor_y) / anchor_h,",
        new="wy * (gt_y - anchor_y) / anchor_w,",
        mistake="dy divided by the anchor width instead of its height",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="wx * (gt_x - anchor_x) / anchor_w,",
        new="(gt_x - anchor_x) / anchor_w,",
        mistake="encoding weight wx not applied",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="dx = deltas[..., 0] / wx",
        new="dx = deltas[..., 0] * wx",
        mistake="decoding multiplies by the weight (applied twice) instead of dividing",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="dw = (deltas[..., 2] / ww).clamp(max=_SCALE_CLAMP)",
        new="dw = deltas[..., 2] / ww",
        mistake="dw not clamped at log(1000 / 16)",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="dh = (deltas[..., 3] / wh).clamp(max=_SCALE_CLAMP)",
        new="dh = (deltas[..., 3].clamp(max=_SCALE_CLAMP)) / wh",
        mistake="dh clamped before dividing by its weight",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="no_box = (gt == -1).all(dim=-1) | (gt == NEUTRAL).all(dim=-1)",
        new="no_box = (gt == NEUTRAL).all(dim=-1)",
        mistake="background (-1) GT rows not given -1e8 deltas",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="center_x = anchor_x + dx * anchor_w",
        new="center_x = anchors[..., 0] + dx * anchor_w",
        mistake="decoding moves the anchor's corner instead of its centre",
    ),
    Mutation(
        part="rcnn_deltas", module=_M,
        old="""    no_box = (deltas == NEUTRAL).all(dim=-1)
    boxes = torch.where(no_box[..., None], torch.full_like(boxes, NEUTRAL), boxes)""",
        new="",
        mistake="-1e8 deltas decoded like any others (no -1e8 boxes)",
    ),
    # ---------------------------------------------------------------- rpn_loss
    Mutation(
        part="rpn_loss", module=_M,
        old="total_samples = batch_size_per_image * num_images",
        new="total_samples = fg_idx.numel() + bg_idx.numel()",
        mistake="normalised by the number of sampled anchors instead of batch_size_per_image * B",
    ),
    Mutation(
        part="rpn_loss", module=_M,
        old="total_samples = batch_size_per_image * num_images",
        new="total_samples = batch_size_per_image",
        mistake="normalised by batch_size_per_image, not times the number of images",
    ),
    Mutation(
        part="rpn_loss", module=_M,
        old="targets = torch.cat([torch.ones_like(fg_idx), torch.zeros_like(bg_idx)]).to(sampled_logits)",
        new="targets = torch.cat([torch.ones_like(fg_idx), torch.ones_like(bg_idx)]).to(sampled_logits)",
        mistake="background anchors get target 1",
    ),
    Mutation(
        part="rpn_loss", module=_M,
        old="loss_box = F.l1_loss(fg_pred_deltas, fg_gt_deltas, reduction=\"sum\")",
        new="loss_box = F.smooth_l1_loss(fg_pred_deltas, fg_gt_deltas, reduction=\"sum\")",
        mistake="smooth L1 instead of L1 for the box loss",
    ),
    Mutation(
        part="rpn_loss", module=_M,
        old="loss_obj, loss_box = loss_obj / total_samples, loss_box / total_samples",
        new="loss_obj, loss_box = loss_obj / total_samples, loss_box / max(fg_idx.numel(), 1)",
        mistake="box loss divided by the number of foreground anchors",
    ),
    Mutation(
        part="rpn_loss", module=_M,
        old="""    sampled_logits = obj_logits.reshape(-1)[torch.cat([fg_idx, bg_idx])]
    targets = torch.cat([torch.ones_like(fg_idx), torch.zeros_like(bg_idx)]).to(sampled_logits)""",
        new="""    sampled_logits = obj_logits.reshape(-1)
    targets = torch.zeros_like(sampled_logits).index_fill(0, fg_idx, 1.0)""",
        mistake="objectness loss over all anchors (unsampled ones as background), not only the sampled ones",
    ),
    # ---------------------------------------------------------------- rpn_proposals
    Mutation(
        part="rpn_proposals", module=_M,
        old="scores, top_idx = obj_logits.topk(k, dim=1)  # (B, k)",
        new="scores, top_idx = obj_logits.topk(k, dim=0)  # (B, k)",
        mistake="topk over the images (dim 0) instead of over each image's anchors",
    ),
    Mutation(
        part="rpn_proposals", module=_M,
        old="scores, top_idx = obj_logits.topk(k, dim=1)  # (B, k)",
        new="scores, top_idx = obj_logits.topk(k, dim=1, largest=False)  # (B, k)",
        mistake="the k lowest logits instead of the highest",
    ),
    Mutation(
        part="rpn_proposals", module=_M,
        old="top_anchors = anchors[top_idx]",
        new="top_anchors = anchors[top_idx[0]].expand(obj_logits.shape[0], -1, -1)",
        mistake="anchors of every image indexed with the first image's indices",
    ),
    Mutation(
        part="rpn_proposals", module=_M,
        old="deltas = torch.gather(box_deltas, 1, top_idx[..., None].expand(-1, -1, 4))",
        new="deltas = box_deltas[:, :k]",
        mistake="deltas of the first k anchors instead of the selected ones",
    ),
    Mutation(
        part="rpn_proposals", module=_M,
        old="k = min(topk, obj_logits.shape[1])",
        new="k = topk",
        mistake="topk not limited to the number of anchors",
    ),
    # ---------------------------------------------------------------- roi_head
    Mutation(
        part="roi_head", module=_M,
        old="roi_stem += [nn.Conv2d(prev_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]",
        new="roi_stem += [nn.Conv2d(prev_channels, out_channels, 3, padding=1)]",
        mistake="no ReLU in the RoI stem",
    ),
    Mutation(
        part="roi_head", module=_M,
        old="self.cls_pred = nn.Linear(flat_features, num_classes + 1)",
        new="self.cls_pred = nn.Linear(flat_features, num_classes)",
        mistake="C class logits instead of C + 1 (no background logit)",
    ),
    Mutation(
        part="roi_head", module=_M,
        old="self.box_pred = nn.Linear(flat_features, num_classes * 4)",
        new="self.box_pred = nn.Linear(flat_features, (num_classes + 1) * 4)",
        mistake="(C + 1) * 4 box outputs (a box for background too)",
    ),
    Mutation(
        part="roi_head", module=_M,
        old="""        for layer in self.roi_stem:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")""",
        new="""        for layer in self.roi_stem:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)""",
        mistake="N(0, 0.01) init of the RoI stem convs instead of He init",
    ),
    Mutation(
        part="roi_head", module=_M,
        old="flat_features = prev_channels * self.roi_size[0] * self.roi_size[1]",
        new="flat_features = prev_channels * 7 * 7",
        mistake="flattened size hard-coded for a 7 x 7 RoI grid",
    ),
    # ---------------------------------------------------------------- roi_sampling
    Mutation(
        part="roi_sampling", module=_M,
        old="""        candidates = torch.cat([padded, gt_boxes[..., :4]], dim=1)  # (B, P + N, 4)
        valid = torch.cat([is_proposal, gt_boxes[..., 4] != -1], dim=1)""",
        new="""        candidates = padded
        valid = is_proposal""",
        mistake="GT boxes not appended to the candidates",
    ),
    Mutation(
        part="roi_sampling", module=_M,
        old="matched = torch.where(valid[..., None], matched, torch.full_like(matched, NEUTRAL))",
        new="matched = matched",
        mistake="padding entries not made neutral (sampled as background)",
    ),
    Mutation(
        part="roi_sampling", module=_M,
        old="valid = torch.cat([is_proposal, gt_boxes[..., 4] != -1], dim=1)",
        new="valid = torch.cat([is_proposal, torch.ones_like(gt_boxes[..., 4], dtype=torch.bool)], dim=1)",
        mistake="padding GT rows kept as candidates",
    ),
    Mutation(
        part="roi_sampling", module=_M,
        old="threshold = (self.roi_iou_threshold, self.roi_iou_threshold)",
        new="threshold = self.rpn.anchor_iou_thresholds",
        mistake="matched with the RPN's thresholds (a neutral band) instead of roi_iou_threshold",
    ),
    Mutation(
        part="roi_sampling", module=_M,
        old="roi_batch_idx = sampled_idx // candidates.shape[1]",
        new="roi_batch_idx = sampled_idx // padded.shape[1]",
        mistake="image index computed with the number of proposals P instead of P + N",
    ),
    Mutation(
        part="roi_sampling", module=_M,
        old="is_proposal = torch.arange(padded.shape[1], device=gt_boxes.device)[None, :] < num_proposals[:, None]",
        new="is_proposal = torch.ones(padded.shape[:2], dtype=torch.bool, device=gt_boxes.device)",
        mistake="every padded proposal slot counted as a real proposal",
    ),
    # ---------------------------------------------------------------- roi_losses
    Mutation(
        part="roi_losses", module=_M,
        old="loss_cls = F.cross_entropy(cls_logits, gt_classes + 1, reduction=\"sum\") / num_rois",
        new="loss_cls = F.cross_entropy(cls_logits, gt_classes.clamp(min=0), reduction=\"sum\") / num_rois",
        mistake="class targets without the +1 shift (background not logit 0)",
    ),
    Mutation(
        part="roi_losses", module=_M,
        old="fg_pred_deltas = box_deltas[fg_rows, gt_classes[fg_rows]]  # (F, 4)",
        new="fg_pred_deltas = box_deltas[fg_rows, 0]  # (F, 4)",
        mistake="deltas of class 0 instead of the GT class",
    ),
    Mutation(
        part="roi_losses", module=_M,
        old="loss_box = F.l1_loss(fg_pred_deltas, gt_deltas[fg_rows], reduction=\"sum\") / num_rois",
        new="loss_box = F.l1_loss(fg_pred_deltas, gt_deltas[fg_rows], reduction=\"sum\") / max(len(fg_rows), 1)",
        mistake="box loss divided by the number of foreground RoIs instead of S",
    ),
    Mutation(
        part="roi_losses", module=_M,
        old="loss_cls = F.cross_entropy(cls_logits, gt_classes + 1, reduction=\"sum\") / num_rois",
        new="loss_cls = F.cross_entropy(cls_logits, gt_classes + 1) / num_rois",
        mistake="mean cross-entropy divided by S again",
    ),
    Mutation(
        part="roi_losses", module=_M,
        old="fg_pred_deltas = box_deltas[fg_rows, gt_classes[fg_rows]]  # (F, 4)",
        new="fg_pred_deltas = box_deltas[fg_rows, gt_classes[fg_rows] + 1]  # (F, 4)",
        mistake="box deltas indexed with the shifted class c + 1 (as for the logits)",
    ),
    # ---------------------------------------------------------------- faster_rcnn_inference
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="probs = F.softmax(cls_logits, dim=1)[:, 1:]  # (R, C), background dropped",
        new="probs = F.softmax(cls_logits[:, 1:], dim=1)  # (R, C), background dropped",
        mistake="softmax over the C object classes only (background dropped before the softmax)",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="probs = F.softmax(cls_logits, dim=1)[:, 1:]  # (R, C), background dropped",
        new="probs = F.softmax(cls_logits, dim=1)[:, :-1]  # (R, C), background dropped",
        mistake="background column kept (the last class dropped instead)",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="boxes = clip_boxes(boxes, image_size).reshape(-1, 4)",
        new="boxes = boxes.reshape(-1, 4)",
        mistake="boxes not clipped to the image",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="keep = (scores > score_thresh) & (widths > 0) & (heights > 0)",
        new="keep = (scores >= score_thresh) & (widths > 0) & (heights > 0)",
        mistake=">= instead of > at the score threshold",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="boxes = rcnn_apply_deltas_to_anchors(box_deltas, rois[:, None, :], self.box_reg_weights)  # (R, C, 4)",
        new="boxes = rcnn_apply_deltas_to_anchors(box_deltas, rois[:, None, :])  # (R, C, 4)",
        mistake="deltas decoded without box_reg_weights",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="labels = torch.arange(self.num_classes, device=rois.device).repeat(rois.shape[0])",
        new="labels = torch.arange(self.num_classes, device=rois.device).repeat_interleave(rois.shape[0])",
        mistake="labels laid out class-major instead of entry r * C + c",
    ),
    Mutation(
        part="faster_rcnn_inference", module=_M,
        old="keep = (scores > score_thresh) & (widths > 0) & (heights > 0)",
        new="keep = scores > score_thresh",
        mistake="empty boxes (zero width or height after clipping) kept",
    ),
]

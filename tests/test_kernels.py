"""Tests of a5/kernels.py: the provided fast versions of the plain algorithms.

Each kernel must give the result of its plain version or of torchvision exactly (NMS:
the same kept indices; BatchNorm folding and GroupNorm: the same values up to rounding).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from a5 import kernels
from checks import check_equal
from fcos import DetectorBackboneWithFPN, class_spec_nms


# Tiny tensors: one intra-op thread is faster and steadier (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _random_boxes(n: int, gen: torch.Generator, extent: float, max_side: float, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * max_side
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.part("provided")
@pytest.mark.parametrize("iou_threshold", [-0.5, 0.0, 0.3, 0.5, 0.7, 1.0])
def test_fast_nms_equals_torchvision(iou_threshold):
    gen = torch.Generator().manual_seed(7)
    for trial in range(30):
        n = int(torch.randint(1, 600, (1,), generator=gen))
        boxes = _random_boxes(n, gen, 200.0, [20.0, 60.0, 200.0][trial % 3])
        scores = torch.rand(n, generator=gen)
        if trial % 4 == 0:  # many ties: torchvision's stable order
            scores = torch.randint(0, 4, (n,), generator=gen).float()
        check_equal(f"fast_nms kept indices (trial {trial}, {n} boxes)", kernels.fast_nms(boxes, scores, iou_threshold),
                    torchvision.ops.nms(boxes, scores, iou_threshold))


@pytest.mark.part("provided")
def test_fast_nms_float64_degenerate_clusters_and_threshold_rounding():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(3000, gen, 1000.0, 120.0, dtype=torch.float64)
    boxes[::17, 2] = boxes[::17, 0]  # empty boxes: IoU 0/0 never suppresses
    boxes[5] = boxes[3]
    scores = torch.rand(3000, generator=gen, dtype=torch.float64)
    groups = torch.cat([_random_boxes(40, gen, 60.0, 40.0) + 1000.0 * g for g in range(50)])
    group_scores = torch.rand(groups.shape[0], generator=gen)
    pair = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])  # IoU 0.3 (0.30000001 in float32)
    for threshold in (0.3, 0.5, 0.7):
        check_equal("fast_nms on float64 boxes", kernels.fast_nms(boxes, scores, threshold),
                    torchvision.ops.nms(boxes, scores, threshold))
        check_equal("fast_nms on separate groups", kernels.fast_nms(groups, group_scores, threshold),
                    torchvision.ops.nms(groups, group_scores, threshold))
    for dtype in (torch.float32, torch.float64):
        scores2 = torch.tensor([0.9, 0.8], dtype=dtype)
        check_equal(f"fast_nms at the rounded threshold ({dtype})", kernels.fast_nms(pair.to(dtype), scores2, 0.3),
                    torchvision.ops.nms(pair.to(dtype), scores2, 0.3))
    check_equal("fast_nms of no boxes", kernels.fast_nms(torch.zeros(0, 4), torch.zeros(0)),
                torch.zeros(0, dtype=torch.long))


@pytest.mark.part("provided")
def test_nms_topk_per_image_equals_nms_per_image():
    gen = torch.Generator().manual_seed(3)
    boxes = torch.stack([_random_boxes(300, gen, 100.0, 50.0) for _ in range(3)])  # (3, 300, 4)
    scores = torch.rand(3, 300, generator=gen)
    valid = torch.rand(3, 300, generator=gen) > 0.2
    valid[2] = False  # an image without valid candidates
    for topk in (1, 5, 40, 1000):
        survivors = kernels.nms_topk_per_image(boxes, scores, valid, 0.5, topk)
        for b in range(3):
            idx = valid[b].nonzero().squeeze(1)
            keep = torchvision.ops.nms(boxes[b, idx], scores[b, idx], 0.5)[:topk]
            check_equal(f"image {b}, top {topk} survivors", survivors[b], boxes[b, idx[keep]])


@pytest.mark.part("provided")
def test_select_detections_per_image_and_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                          [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 0, 0])
    image_ids = torch.tensor([0, 0, 0, 1, 0])
    detections = kernels.select_detections(boxes, scores, labels, image_ids, 3, 0.5, max_per_image=2)
    # Image 0: box 1 is suppressed by box 0 (same class), box 2 has another class; cap 2.
    check_equal("image 0 labels", detections[0]["labels"], [0, 1])
    check_equal("image 0 scores", detections[0]["scores"], [0.9, 0.7])
    check_equal("image 1 boxes", detections[1]["boxes"], [[0.0, 0.0, 10.0, 10.0]])
    check_equal("image 2 (no candidates)", detections[2]["boxes"], torch.zeros(0, 4))


@pytest.mark.part("provided")
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_class_spec_nms_equals_torchvision(iou_threshold):
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = int(torch.randint(1, 900, (1,), generator=gen))
        boxes = _random_boxes(n, gen, 300.0, 80.0)
        scores = torch.rand(n, generator=gen)
        class_ids = torch.randint(0, 5, (n,), generator=gen)
        expected = torchvision.ops.batched_nms(boxes, scores, class_ids, iou_threshold)
        assert torch.equal(class_spec_nms(boxes, scores, class_ids, iou_threshold), expected)
    assert class_spec_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    # Many classes and boxes: above 1000 boxes batched_nms runs one NMS per class on
    # the unshifted boxes, which class_spec_nms must match exactly (float64 shifts).
    # Distinct scores: batched_nms orders tied scores arbitrarily there.
    for num_classes in (20, 200):
        boxes = _random_boxes(6000, gen, 200.0, 100.0).clamp(max=224)
        scores = (torch.randperm(6000, generator=gen).float() + 1) / 6000
        class_ids = torch.randint(0, num_classes, (6000,), generator=gen)
        expected = torchvision.ops.batched_nms(boxes, scores, class_ids, iou_threshold)
        assert torch.equal(class_spec_nms(boxes, scores, class_ids, iou_threshold), expected)


@pytest.mark.part("provided")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_equals_torch_in_every_layout(dtype, layout):
    """kernels.GroupNorm takes a faster route for half-precision channels-last inputs on
    the CPU; values, gradients and the output layout must be nn.GroupNorm's."""
    torch.manual_seed(0)
    ours, ref = kernels.GroupNorm(4, 8), nn.GroupNorm(4, 8)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 5, 6).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(2, 8, 5, 6).to(dtype)
    outs = []
    for module in (ours, ref):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y = module.to(dtype)(xi)
        y.backward(grad)
        outs.append((y, xi.grad, module.weight.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = outs
    assert y.is_contiguous(memory_format=layout) and y.dtype == dtype
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)


def _randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


@pytest.mark.part("provided")
@pytest.mark.parametrize("backbone", ["regnet_x_400mf", "mobilenet_v2"])
def test_folded_batchnorm_backbone(backbone):
    """Eval-mode features without autograd come from a BatchNorm-folded copy of the CNN:
    same values, no BatchNorm left, not in the state dict, rebuilt when weights change.
    (Provided code, but building the module needs the FPN layers.)"""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, backbone=backbone, pretrained=False, freeze_backbone=True)
    _randomize_batchnorm(model.backbone)
    images = torch.randn(2, 3, 64, 96)
    reference = dict(model.backbone(images))  # the unfolded CNN, called directly
    feats = model.extract_features(images)  # frozen => no_grad => folded copy
    folded = model._folded_backbone()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules()) > 10
    for name in ("c3", "c4", "c5"):
        torch.testing.assert_close(feats[name], reference[name], rtol=1e-4, atol=1e-4)
    assert not any("folded" in key for key in model.state_dict())
    assert model._folded_backbone() is folded, "unchanged weights reuse the folded copy"

    # New weights (as when loading a checkpoint): the folded copy is rebuilt.
    _randomize_batchnorm(model.backbone, seed=1)
    reference = dict(model.backbone(images))
    feats = model.extract_features(images)
    assert model._folded_backbone() is not folded
    torch.testing.assert_close(feats["c5"], reference["c5"], rtol=1e-4, atol=1e-4)

    # A trainable CNN in train mode uses the real one: BatchNorm batch statistics, gradients.
    trainable = DetectorBackboneWithFPN(8, backbone=backbone, pretrained=False).train()
    feats = trainable.extract_features(images)
    feats["c5"].sum().backward()
    assert all(p.grad is not None for p in trainable.backbone.parameters() if p.requires_grad)




@pytest.mark.part("provided")
def test_without_outputs_drops_a_tap_and_its_layers():
    model = DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    body = model.backbone
    trunk = kernels.without_outputs(body, ("c5",))
    images = torch.randn(1, 3, 64, 64)
    full, cut = dict(body(images)), dict(trunk(images))
    assert set(cut) == {"c3", "c4"}
    assert all(torch.equal(cut[k], full[k]) for k in cut)
    calls = lambda gm: sum(node.op == "call_module" for node in gm.graph.nodes)  # noqa: E731
    assert calls(trunk) < calls(body), "the layers only c5 needed are gone"
    assert trunk.get_submodule("features.0.0") is body.get_submodule("features.0.0"), "shared, not copied"
    # The trunk holds no layer it does not call; the body keeps all of its own.
    with pytest.raises(AttributeError):
        trunk.get_submodule("features.18")
    assert isinstance(body.get_submodule("features.18"), nn.Module) and trunk.training == body.training
    with pytest.raises(KeyError, match="c6"):
        kernels.without_outputs(body, ("c6",))


@pytest.mark.part("provided")
def test_tuned_last_stage_runs_once_per_forward():
    """With tune_last_stage the folded copy stops at c4 and the live stage computes c5 once:
    training from images, inference, and not at all for a c3/c4 cache (with_c5=False)."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                    tune_last_stage=True)
    stage_conv = next(m for m in model.last_stage().modules() if isinstance(m, nn.Conv2d))
    calls = []
    stage_conv.register_forward_hook(lambda *args: calls.append(1))
    images = torch.randn(2, 3, 64, 64)
    feats = model.extract_features(images, with_c5=False)
    assert set(feats) == {"c3", "c4"} and not calls
    assert "c5" not in dict(model._folded_backbone()(images))
    out = model.train()(images)  # grad enabled: c5 with its gradient
    assert len(calls) == 1
    out["p5"].sum().backward()
    assert stage_conv.weight.grad is not None
    calls.clear()
    with torch.no_grad():
        model.eval()(images)
    assert len(calls) == 1
    # c5 = the live stage on c4, as before.
    full = model.extract_features(images)
    torch.testing.assert_close(full["c5"], model.last_stage()(full["c4"]))
    # A copy made after the trunk was built computes the same (and its own stage trains).
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone.extract_features(images)["c5"], full["c5"])
    assert {id(p) for p in clone.last_stage().parameters()} <= {id(p) for p in clone.backbone.parameters()}

"""Tests of fcos.py: FCOS building blocks, NMS, losses and the whole detector.

Expected values are computed by hand (documented next to each assertion) or by an
independent reference: torchvision's ops for NMS and the losses, straightforward
Python loops for target assignment and the training losses. Models are tiny and
randomly initialised (``pretrained=False``), images 64-128 px, so the file runs in
seconds on a CPU.
"""
from __future__ import annotations

import copy
import math
import urllib.error
from typing import Dict, Optional

import pytest
import torch
from torch import nn
import torchvision
from torch.nn import functional as F

import fcos
from fcos import (
    FCOS,
    DetectorBackboneWithFPN,
    FCOSPredictionNetwork,
    class_spec_nms,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
    get_fpn_location_coords,
    image_size_of,
    nms,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is faster and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fcos(num_classes: int = 3, **kwargs) -> FCOS:
    """A small random FCOS (RegNetX-400MF body, FPN 16, one 16-channel stem conv)."""
    kwargs.setdefault("pretrained", False)
    return FCOS(num_classes=num_classes, fpn_channels=16, stem_channels=[16], **kwargs)


def hand_locations(height: int, width: int) -> Dict[str, torch.Tensor]:
    """Locations of a (height, width) image built independently of the student code:
    cell (i, j) of stride s is at (s * (j + 0.5), s * (i + 0.5))."""
    out = {}
    for name, s in STRIDES.items():
        rows, cols = math.ceil(height / s), math.ceil(width / s)
        out[name] = torch.tensor(
            [[s * (j + 0.5), s * (i + 0.5)] for i in range(rows) for j in range(cols)]
        )
    return out


def random_gt(batch: int, size: int, num_classes: int, max_boxes: int = 3, seed: int = 0) -> torch.Tensor:
    """(B, max_boxes, 5) padded GT with 1..max_boxes boxes of 16..size/2 px per image."""
    gen = torch.Generator().manual_seed(seed)
    gt = torch.full((batch, max_boxes, 5), -1.0)
    for b in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=gen))
        wh = 16 + torch.rand(n, 2, generator=gen) * (size / 2 - 16)
        xy = torch.rand(n, 2, generator=gen) * (size - wh)
        cls = torch.randint(0, num_classes, (n, 1), generator=gen).float()
        gt[b, :n] = torch.cat([xy, xy + wh, cls], dim=1)
    return gt


###############################################################################
# Provided helpers
###############################################################################


@pytest.mark.part("provided")
def test_hello_fcos(capsys):
    fcos.hello_fcos()
    assert "Hello from fcos.py!" in capsys.readouterr().out


@pytest.mark.part("provided")
def test_image_size_of_images_and_features():
    assert image_size_of(torch.zeros(2, 3, 96, 128)) == (96, 128)
    feats = {"c3": torch.zeros(2, 8, 12, 16), "c4": torch.zeros(2, 8, 6, 8), "c5": torch.zeros(2, 8, 3, 4)}
    assert image_size_of(feats) == (96, 128)  # 8 * c3 size


###############################################################################
# Backbone and FPN
###############################################################################


@pytest.mark.part("fpn")
@pytest.mark.parametrize("backbone", ["regnet_x_400mf", "mobilenet_v2"])
@pytest.mark.parametrize("size", [(64, 96), (100, 75)])
def test_backbone_fpn_shapes(backbone, size):
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(24, backbone=backbone, pretrained=False)
    assert model.fpn_strides == STRIDES
    assert model.backbone_name == backbone and model.weights_name == "random"
    images = torch.randn(2, 3, *size)
    c_feats = model.extract_features(images)
    spec = fcos.BACKBONE_SPECS[backbone]
    p_feats = model(images)
    assert list(p_feats) == ["p3", "p4", "p5"]
    for level, stride in STRIDES.items():
        # Odd sizes: convolutions with padding round up.
        expected_hw = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        c = c_feats["c" + level[1]]
        assert c.shape == (2, spec.channels["c" + level[1]], *expected_hw)
        assert p_feats[level].shape == (2, 24, *expected_hw)


@pytest.mark.part("fpn")
def test_fpn_top_down_information_flow():
    """p3 sees c5 (top-down pathway), p5 does not see c3 (no bottom-up path)."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, pretrained=False).eval()
    feats = model.extract_features(torch.randn(1, 3, 72, 72))
    base = model(feats)
    changed_c5 = model({**feats, "c5": feats["c5"] + 1.0})
    changed_c3 = model({**feats, "c3": feats["c3"] + 1.0})
    assert not torch.allclose(changed_c5["p3"], base["p3"])
    assert not torch.allclose(changed_c5["p4"], base["p4"])
    assert torch.equal(changed_c3["p5"], base["p5"])
    assert torch.equal(changed_c3["p4"], base["p4"])


@pytest.mark.part("fpn")
def test_frozen_backbone_mode():
    """Frozen mode is provided code, but building the module needs the FPN layers."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, pretrained=False, freeze_backbone=True)
    model.train()
    assert not model.backbone.training, "a frozen CNN stays in eval mode"
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.fpn_params.parameters())
    feats = model.extract_features(torch.randn(1, 3, 64, 64))
    assert all(not f.requires_grad for f in feats.values())


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


@pytest.mark.part("fpn")
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
def test_missing_weights_error_names_file_and_cache(tmp_path, monkeypatch):
    """Offline and not cached: a RuntimeError that says which file, where, and what to do."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        fcos.build_backbone_body("mobilenet_v2", pretrained=True)
    message = str(info.value)
    assert "mobilenet_v2-b0353104.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "pretrained=False" in message and "mobilenet_v2" in message
    # The detector backbone fails the same way (before building any student layer).
    with pytest.raises(RuntimeError, match="mobilenet_v2-b0353104.pth"):
        DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=True)


@pytest.mark.part("provided")
def test_mobilenet_v2_offline_pretrained_weights(mobilenet_weights_available):
    body, weights_name = fcos.build_backbone_body("mobilenet_v2", pretrained=True)
    assert weights_name == "MobileNet_V2_Weights.IMAGENET1K_V1"
    state = torch.load(mobilenet_weights_available, map_location="cpu", weights_only=True)
    # The feature extractor keeps torchvision's parameter names.
    ours = dict(body.named_parameters())
    assert torch.equal(ours["features.0.0.weight"], state["features.0.0.weight"])
    assert torch.equal(ours["features.18.0.weight"], state["features.18.0.weight"])


@pytest.mark.part("fpn")
def test_backbone_fpn_with_offline_pretrained_mobilenet(mobilenet_weights_available):
    model = DetectorBackboneWithFPN(16, backbone="mobilenet_v2", pretrained=True, freeze_backbone=True).eval()
    assert model.weights_name == "MobileNet_V2_Weights.IMAGENET1K_V1"
    feats = model(torch.randn(1, 3, 64, 64))
    assert feats["p3"].shape == (1, 16, 8, 8) and all(torch.isfinite(f).all() for f in feats.values())


###############################################################################
# Locations and head
###############################################################################


@pytest.mark.part("locations")
def test_fpn_location_coords_hand_computed():
    shapes = {"p3": (2, 16, 2, 3), "p4": (2, 16, 1, 2), "p5": (2, 16, 1, 1)}
    locations = get_fpn_location_coords(shapes, STRIDES, dtype=torch.float64)
    # Centres stride * (index + 0.5), x varying fastest (row-major cells).
    expected = {
        "p3": [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]],
        "p4": [[8, 8], [24, 8]],
        "p5": [[16, 16]],
    }
    assert list(locations) == ["p3", "p4", "p5"]
    for name, coords in expected.items():
        assert locations[name].dtype == torch.float64
        assert torch.equal(locations[name], torch.tensor(coords, dtype=torch.float64))


@pytest.mark.part("locations")
def test_fpn_location_coords_match_hand_grid():
    shapes = {"p3": (1, 1, 13, 10), "p4": (1, 1, 7, 5), "p5": (1, 1, 4, 3)}
    locations = get_fpn_location_coords(shapes, STRIDES)
    expected = hand_locations(100, 75)
    for name in STRIDES:
        assert locations[name].dtype == torch.float32
        assert torch.equal(locations[name], expected[name])


@pytest.mark.part("provided")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_equals_torch_in_every_layout(dtype, layout):
    """fcos.GroupNorm takes a faster route for half-precision channels-last inputs on
    the CPU; values, gradients and the output layout must be nn.GroupNorm's."""
    torch.manual_seed(0)
    ours, ref = fcos.GroupNorm(4, 8), nn.GroupNorm(4, 8)
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


@pytest.mark.part("fcos_head")
def test_prediction_network_shapes_and_init():
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(num_classes=5, in_channels=16, stem_channels=[32, 48])
    feats = {"p3": torch.randn(2, 16, 8, 6), "p4": torch.randn(2, 16, 4, 3), "p5": torch.randn(2, 16, 2, 2)}
    cls_logits, box_deltas, ctr_logits = head(feats)
    for name, feat in feats.items():
        hw = feat.shape[2] * feat.shape[3]
        assert cls_logits[name].shape == (2, hw, 5)
        assert box_deltas[name].shape == (2, hw, 4)
        assert ctr_logits[name].shape == (2, hw, 1)
    # Focal-loss prior: every class starts at probability ~0.01.
    probs = torch.sigmoid(torch.cat([v.detach() for v in cls_logits.values()], dim=1))
    assert abs(float(probs.mean()) - 0.01) < 1e-3 and 0.005 < float(probs.min()) and float(probs.max()) < 0.02
    # One GroupNorm per stem conv in each of the two stems.
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4


@pytest.mark.part("fcos_head")
def test_centerness_hangs_off_box_stem():
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(num_classes=3, in_channels=8, stem_channels=[8])
    _, _, ctr_logits = head({"p3": torch.randn(1, 8, 4, 4)})
    ctr_logits["p3"].sum().backward()
    assert all(p.grad is None for p in head.stem_cls.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.stem_box.parameters())


###############################################################################
# Deltas and centerness
###############################################################################


@pytest.mark.part("fcos_deltas")
def test_deltas_hand_computed_and_background():
    locations = torch.tensor([[20.0, 30.0], [5.0, 5.0]])
    gt = torch.tensor([[10.0, 20.0, 50.0, 40.0, 3.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    deltas = fcos_get_deltas_from_locations(locations, gt, stride=8)
    # (x - x1, y - y1, x2 - x, y2 - y) / 8 = (10, 10, 30, 10) / 8; background -> -1.
    expected = torch.tensor([[1.25, 1.25, 3.75, 1.25], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.allclose(deltas, expected)


@pytest.mark.part("fcos_deltas")
def test_deltas_round_trip_batched_and_clamped():
    gen = torch.Generator().manual_seed(0)
    locations = torch.rand(7, 2, generator=gen) * 100 + 50  # (N, 2), shared by the batch
    sides = torch.rand(3, 7, 4, generator=gen) * 40 + 1
    boxes = torch.cat([locations - sides[..., :2], locations + sides[..., 2:]], dim=-1)  # (B, N, 4)
    deltas = fcos_get_deltas_from_locations(locations, boxes, stride=16)
    assert deltas.shape == (3, 7, 4)
    assert torch.allclose(deltas, sides / 16)
    assert torch.allclose(fcos_apply_deltas_to_locations(deltas, locations, stride=16), boxes, atol=1e-5)
    # Background deltas decode to the location itself; negative deltas are clamped to 0.
    point = fcos_apply_deltas_to_locations(torch.tensor([[-1.0, -1.0, -1.0, -1.0]]), torch.tensor([[7.0, 9.0]]), 8)
    assert torch.equal(point, torch.tensor([[7.0, 9.0, 7.0, 9.0]]))
    half = fcos_apply_deltas_to_locations(torch.tensor([[-2.0, 1.0, 0.5, -0.1]]), torch.tensor([[10.0, 10.0]]), 4)
    assert torch.allclose(half, torch.tensor([[10.0, 6.0, 12.0, 10.0]]))
    # A per-location stride tensor (several levels concatenated) broadcasts.
    strides = torch.tensor([[8.0], [16.0]])
    two = fcos_get_deltas_from_locations(torch.tensor([[16.0, 16.0], [40.0, 40.0]]),
                                         torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 72.0, 72.0]]), strides)
    assert torch.allclose(two, torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]]))


@pytest.mark.part("centerness")
def test_centerness_hand_computed():
    deltas = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # centre of the box: 1
            [1.0, 3.0, 2.0, 2.0],  # sqrt(1/2 * 2/3) = sqrt(1/3)
            [0.5, 4.0, 1.5, 1.0],  # sqrt(1/3 * 1/4) = sqrt(1/12)
            [-1.0, -1.0, -1.0, -1.0],  # background
        ]
    )
    expected = torch.tensor([1.0, math.sqrt(1 / 3), math.sqrt(1 / 12), -1.0])
    assert torch.allclose(fcos_make_centerness_targets(deltas), expected)
    # Extra leading dims.
    batched = fcos_make_centerness_targets(deltas.expand(2, 4, 4).double())
    assert batched.shape == (2, 4) and batched.dtype == torch.float64
    assert torch.allclose(batched, expected.double().expand(2, 4))


###############################################################################
# Matching locations to GT (provided)
###############################################################################

# A 256 x 256 scene: a small box A inside a medium box B, and a large box C that
# overlaps both, plus a padding row.
SCENE = torch.tensor(
    [
        [20.0, 20.0, 60.0, 60.0, 0.0],  # A, area 1600
        [0.0, 0.0, 100.0, 100.0, 1.0],  # B, area 10000
        [0.0, 0.0, 256.0, 200.0, 2.0],  # C, area 51200
        [-1.0, -1.0, -1.0, -1.0, -1.0],  # padding
    ]
)

# (level, x, y) -> expected class (-1 = background) without / with centre sampling (1.5).
# Distances are (l, t, r, b); p3 keeps max < 64, p4 64 < max < 128, p5 max > 128.
SCENE_EXPECTED = [
    ("p3", 44, 44, 0, 0),  # in A (max 24) and B (max 56): smallest box A wins
    ("p3", 60, 44, 1, 1),  # on A's right side (r = 0: not inside); B max 60 -> B
    ("p3", 28, 28, 0, -1),  # A max 32; |28 - 40| = 12 is not < 1.5 * 8 -> background with sampling
    ("p3", 12, 12, -1, -1),  # B max 88 is too large for p3
    ("p3", 36, 60, -1, -1),  # A: b = 0; B max = 64 exactly: not < 64
    ("p4", 72, 72, 1, 1),  # B max 72 in (64, 128); |72 - 50| = 22 < 24
    ("p4", 88, 88, 1, -1),  # B max 88; |88 - 50| = 38 > 24
    ("p4", 40, 40, -1, -1),  # A max 20, B max 60: too small for p4; C max 216: too large
    ("p5", 112, 112, 2, 2),  # C max 144; centre (128, 100) within 48
    ("p5", 144, 80, 2, 2),  # C max 144
    ("p5", 16, 16, 2, -1),  # C max 240; |16 - 128| = 112 > 48
    ("p5", 240, 16, 2, -1),  # C max 240; |240 - 128| = 112 > 48
]


def _row_at(matched: Dict[str, torch.Tensor], locations: Dict[str, torch.Tensor], level: str, x: float, y: float):
    index = ((locations[level][:, 0] == x) & (locations[level][:, 1] == y)).nonzero()
    assert index.numel() == 1, f"({x}, {y}) is not a location of {level}"
    return matched[level][int(index)]


def _reference_match(locations, gt_boxes, radius: Optional[float]) -> Dict[str, torch.Tensor]:
    """Plain-loop matching straight from the definition (one image)."""
    names = list(locations)
    out = {}
    for k, name in enumerate(names):
        s = STRIDES[name]
        lower = 0.0 if k == 0 else 4.0 * s
        upper = math.inf if k == len(names) - 1 else 8.0 * s
        rows = []
        for x, y in locations[name].tolist():
            best, best_area = None, math.inf
            for box in gt_boxes.tolist():
                x1, y1, x2, y2, c = box
                if c < 0:
                    continue
                dists = (x - x1, y - y1, x2 - x, y2 - y)
                ok = min(dists) > 0 and lower < max(dists) < upper
                if radius is not None:
                    r = radius * s
                    ok = ok and abs(x - (x1 + x2) / 2) < r and abs(y - (y1 + y2) / 2) < r
                area = (x2 - x1) * (y2 - y1)
                if ok and area < best_area:
                    best, best_area = box, area
            rows.append(best if best is not None else [-1.0] * 5)
        out[name] = torch.tensor(rows)
    return out


@pytest.mark.part("provided")
@pytest.mark.parametrize("radius", [None, 1.5])
def test_match_constructed_scene(radius):
    locations = hand_locations(256, 256)
    matched = fcos_match_locations_to_gt(locations, STRIDES, SCENE, center_sampling_radius=radius)
    for name, locs in locations.items():
        assert matched[name].shape == (locs.shape[0], 5)
    for level, x, y, cls_plain, cls_sampled in SCENE_EXPECTED:
        expected_cls = cls_plain if radius is None else cls_sampled
        row = _row_at(matched, locations, level, x, y)
        if expected_cls < 0:
            assert torch.equal(row, torch.full((5,), -1.0)), (level, x, y)
        else:
            assert torch.equal(row, SCENE[expected_cls]), (level, x, y)
    reference = _reference_match(locations, SCENE, radius)
    for name in locations:
        assert torch.equal(matched[name], reference[name])


@pytest.mark.part("provided")
def test_match_default_uses_center_sampling():
    locations = hand_locations(256, 256)
    default = fcos_match_locations_to_gt(locations, STRIDES, SCENE)
    sampled = fcos_match_locations_to_gt(locations, STRIDES, SCENE, center_sampling_radius=1.5)
    for name in locations:
        assert torch.equal(default[name], sampled[name])


@pytest.mark.part("provided")
@pytest.mark.parametrize("radius", [None, 1.5])
def test_match_batched_equals_per_image(radius):
    locations = hand_locations(128, 96)
    gt = random_gt(3, 96, num_classes=4, max_boxes=5, seed=1)
    gt = torch.cat([gt, torch.full((1, 5, 5), -1.0)])  # an image without objects
    batched = fcos_match_locations_to_gt(locations, STRIDES, gt, center_sampling_radius=radius)
    for name, locs in locations.items():
        assert batched[name].shape == (4, locs.shape[0], 5)
    for b in range(gt.shape[0]):
        single = fcos_match_locations_to_gt(locations, STRIDES, gt[b], center_sampling_radius=radius)
        reference = _reference_match(locations, gt[b], radius)
        for name in locations:
            assert torch.equal(batched[name][b], single[name])
            assert torch.equal(single[name], reference[name])
    assert all(torch.all(batched[name][3] == -1) for name in locations)
    # No boxes at all (N = 0).
    empty = fcos_match_locations_to_gt(locations, STRIDES, torch.zeros(2, 0, 5))
    assert all(v.shape == (2, locations[k].shape[0], 5) and torch.all(v == -1) for k, v in empty.items())


###############################################################################
# NMS
###############################################################################


def _random_boxes(n: int, gen: torch.Generator, extent: float, max_side: float, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * max_side
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.part("nms")
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_equals_torchvision(iou_threshold):
    gen = torch.Generator().manual_seed(int(iou_threshold * 10))
    for trial in range(40):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        # Dense (heavy overlap) to sparse scenes.
        max_side = [20.0, 60.0, 200.0][trial % 3]
        boxes = _random_boxes(n, gen, 200.0, max_side)
        scores = torch.rand(n, generator=gen)
        if trial % 4 == 0:  # many tied scores: the order must be torchvision's (stable)
            scores = torch.randint(0, 4, (n,), generator=gen).float()
        expected = torchvision.ops.nms(boxes, scores, iou_threshold)
        kept = nms(boxes, scores, iou_threshold)
        assert kept.dtype == torch.int64
        assert torch.equal(kept, expected), (trial, n)


@pytest.mark.part("nms")
def test_nms_large_float64_and_degenerate():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(3000, gen, 1000.0, 120.0, dtype=torch.float64)
    boxes[::17, 2] = boxes[::17, 0]  # zero-width boxes: IoU 0/0 never suppresses
    boxes[5] = boxes[3]  # exact duplicates
    scores = torch.rand(3000, generator=gen, dtype=torch.float64)
    for threshold in (0.3, 0.5, 0.7):
        assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("nms")
def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert torch.equal(nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.5])), torch.tensor([0]))
    # Two identical boxes with the same score: the first one is kept.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert torch.equal(nms(boxes, torch.tensor([0.9, 0.9, 0.95])), torch.tensor([2, 0]))
    # IoU exactly at the threshold does not suppress (strict ">").
    half = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU = 0.5
    assert torch.equal(nms(half, torch.tensor([0.9, 0.8]), 0.5), torch.tensor([0, 1]))
    # torchvision compares the float32 IoU with the threshold as a double: 3 / 10 in
    # float32 is 0.30000001 > 0.3, so this pair is suppressed at 0.3 (not in float64).
    pair = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    for dtype in (torch.float32, torch.float64):
        boxes, scores = pair.to(dtype), torch.tensor([0.9, 0.8], dtype=dtype)
        assert torch.equal(nms(boxes, scores, 0.3), torchvision.ops.nms(boxes, scores, 0.3)), dtype
    # Thresholds outside [0, 1].
    gen = torch.Generator().manual_seed(3)
    boxes, scores = _random_boxes(50, gen, 100.0, 30.0), torch.rand(50, generator=gen)
    for threshold in (-0.5, 0.0, 1.0):
        assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("nms")
def test_nms_many_separate_clusters_equals_torchvision():
    """Groups of boxes far apart (as class_spec_nms makes them), of very different
    sizes, plus isolated boxes: NMS may treat them independently but must give
    exactly torchvision's result."""
    gen = torch.Generator().manual_seed(5)
    groups = []
    for g in range(60):
        n = [1, 2, 3, 7, 40, 150][g % 6]
        boxes = _random_boxes(n, gen, 60.0, 40.0)
        groups.append(boxes + 1000.0 * g)
    boxes = torch.cat(groups)
    scores = torch.rand(boxes.shape[0], generator=gen)
    scores[::9] = 0.5  # ties across groups
    for threshold in (0.3, 0.5, 0.7):
        assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("nms")
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


###############################################################################
# Losses (provided formulas) and the detector's training losses
###############################################################################


@pytest.mark.part("provided")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_functions_equal_torchvision(reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=gen) * 3
    targets = (torch.rand(50, 7, generator=gen) < 0.2).float()
    for alpha, gamma in ((0.25, 2.0), (-1.0, 1.5)):
        ours = fcos.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
        theirs = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    boxes1 = _random_boxes(200, gen, 100.0, 50.0)
    boxes2 = _random_boxes(200, gen, 100.0, 50.0)
    boxes2[:20] = boxes1[:20]  # identical pairs: loss 0
    ours = fcos.generalized_box_iou_loss(boxes1, boxes2, reduction=reduction)
    theirs = torchvision.ops.generalized_box_iou_loss(boxes1, boxes2, reduction=reduction)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def _reference_losses(model: FCOS, locations, cls_logits, box_deltas, ctr_logits, gt):
    """FCOS losses with a loop over images and levels and torchvision's loss ops."""
    num_images = gt.shape[0]
    loss_cls = loss_box = loss_ctr = 0.0
    num_fg = 0
    giou_losses, centernesses = [], []
    for b in range(num_images):
        matched = fcos_match_locations_to_gt(locations, STRIDES, gt[b], model.center_sampling_radius)
        for name, locs in locations.items():
            m, s = matched[name], STRIDES[name]
            fg = m[:, 4] >= 0
            num_fg += int(fg.sum())
            target = torch.zeros_like(cls_logits[name][b])
            target[fg, m[fg, 4].long()] = 1.0
            loss_cls = loss_cls + torchvision.ops.sigmoid_focal_loss(cls_logits[name][b], target, reduction="sum")
            x, y = locs[fg, 0], locs[fg, 1]
            ltrb = torch.stack([x - m[fg, 0], y - m[fg, 1], m[fg, 2] - x, m[fg, 3] - y], dim=1)
            pred = box_deltas[name][b][fg]
            if model.box_loss == "giou":
                d = pred.clamp(min=0) * s
                pred_boxes = torch.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], dim=1)
                giou_losses.append(torchvision.ops.generalized_box_iou_loss(pred_boxes, m[fg, :4]))
            else:
                loss_box = loss_box + 0.25 * (pred - ltrb / s).abs().sum()
            l, t, r, bb = ltrb.unbind(1)
            centerness = torch.sqrt(torch.minimum(l, r) / torch.maximum(l, r) * torch.minimum(t, bb) / torch.maximum(t, bb))
            centernesses.append(centerness)
            loss_ctr = loss_ctr + F.binary_cross_entropy_with_logits(ctr_logits[name][b][fg, 0], centerness, reduction="sum")
    if model.box_loss == "giou":
        giou, centerness = torch.cat(giou_losses), torch.cat(centernesses)
        # Centerness weighting (official FCOS): weights rescaled to mean 1 over the batch.
        weights = centerness / centerness.mean() if model.centerness_weighted_box_loss else 1.0
        loss_box = (weights * giou).sum()
    normalizer = (0.9 * 150.0 + 0.1 * num_fg / num_images) * num_images
    return {"loss_cls": loss_cls / normalizer, "loss_box": loss_box / normalizer, "loss_ctr": loss_ctr / normalizer}, num_fg


@pytest.mark.part("fcos_loss")
@pytest.mark.parametrize("box_loss,radius,weighted", [("giou", 1.5, True), ("giou", 1.5, False), ("l1", None, True)])
def test_fcos_losses_equal_reference(box_loss, radius, weighted):
    torch.manual_seed(0)
    model = tiny_fcos(num_classes=4, box_loss=box_loss, center_sampling_radius=radius,
                      centerness_weighted_box_loss=weighted).train()
    images = torch.randn(3, 3, 128, 96)
    gt = random_gt(3, 96, num_classes=4, max_boxes=4, seed=2)
    locations, cls_logits, box_deltas, ctr_logits = model._run_network(images)
    for name in STRIDES:  # the detector's locations are the cell centres
        assert torch.equal(locations[name], hand_locations(128, 96)[name])
    losses = model.compute_losses(locations, cls_logits, box_deltas, ctr_logits, gt)
    expected, num_fg = _reference_losses(model, locations, cls_logits, box_deltas, ctr_logits, gt)
    assert num_fg > 0
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    for key in expected:
        assert losses[key].dim() == 0
        assert torch.allclose(losses[key], expected[key], rtol=1e-4, atol=1e-7), key
    # The EMA of foreground locations per image was updated once from 150.
    assert torch.allclose(model._normalizer, torch.tensor(0.9 * 150 + 0.1 * num_fg / 3))


@pytest.mark.part("fcos_loss")
def test_image_without_objects_and_input_gradients():
    torch.manual_seed(0)
    model = tiny_fcos().train()
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    gt = torch.full((2, 2, 5), -1.0)  # no objects at all
    losses = model(images, gt)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"] == 0 and losses["loss_ctr"] == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # One image with objects, one without, in the same batch.
    images.grad = None
    gt[0, 0] = torch.tensor([8.0, 8.0, 48.0, 40.0, 1.0])
    losses = model(images, gt)
    assert losses["loss_box"] > 0 and losses["loss_ctr"] > 0
    sum(losses.values()).backward()
    assert torch.isfinite(images.grad).all()


@pytest.mark.part("fcos_loss")
def test_float64_training_and_prediction():
    torch.manual_seed(0)
    model = tiny_fcos().double().train()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    gt = random_gt(2, 64, num_classes=3).double()
    losses = model(images, gt)
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    detections = model.predict(images, score_thresh=0.0)
    assert detections[0]["boxes"].dtype == torch.float64 and detections[0]["scores"].dtype == torch.float64


@pytest.mark.part("fcos_loss")
def test_autocast_losses_and_boxes_in_float32():
    """Under autocast (bfloat16 on CPU, float16 on GPUs) losses and decoded boxes stay
    float32: pixel areas overflow float16 and lose precision in bfloat16."""
    torch.manual_seed(0)
    model = tiny_fcos().train()
    images = torch.randn(2, 3, 128, 128)
    gt = torch.tensor([[[0.0, 0.0, 120.0, 110.0, 1.0], [10.0, 10.0, 40.0, 50.0, 2.0]]]).repeat(2, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, gt)
        detections = model.predict(images, score_thresh=0.0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"] > 0
    sum(losses.values()).backward()
    assert detections[0]["boxes"].dtype == torch.float32


@pytest.mark.part("fcos_loss")
def test_normalizer_buffer_checkpoint_resume_and_eval():
    torch.manual_seed(0)
    model = tiny_fcos().train()
    assert "_normalizer" in model.state_dict() and float(model._normalizer) == 150.0
    images = torch.randn(2, 3, 64, 64)
    gt = random_gt(2, 64, num_classes=3, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(m, opt):
        losses = m(images, gt)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        return losses

    for _ in range(2):
        step(model, optimizer)
    assert float(model._normalizer) != 150.0
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optim": optimizer.state_dict()})
    expected = step(model, optimizer)

    torch.manual_seed(123)
    resumed = tiny_fcos().train()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9)
    resumed_opt.load_state_dict(checkpoint["optim"])
    got = step(resumed, resumed_opt)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # Eval mode never touches the EMA (losses computed for validation, or prediction).
    resumed.eval()
    before = resumed._normalizer.clone()
    outputs = resumed._run_network(images)
    resumed.compute_losses(*outputs, gt)
    resumed.predict(images)
    assert torch.equal(resumed._normalizer, before)


@pytest.mark.part("fcos_loss")
def test_cached_features_give_identical_losses_and_gradients():
    """Frozen backbone: training from cached c3/c4/c5 == training on the images."""
    torch.manual_seed(0)
    on_images = tiny_fcos(freeze_backbone=True).train()
    on_features = copy.deepcopy(on_images)
    assert not on_images.backbone.backbone.training
    images = torch.randn(2, 3, 64, 96)
    gt = random_gt(2, 64, num_classes=3, seed=4)
    features = on_features.backbone.extract_features(images)

    losses_images = on_images(images, gt)
    losses_features = on_features(features, gt)
    for key in losses_images:
        assert torch.equal(losses_images[key], losses_features[key]), key
    sum(losses_images.values()).backward()
    sum(losses_features.values()).backward()
    for (name, p1), (_, p2) in zip(on_images.named_parameters(), on_features.named_parameters()):
        assert p1.requires_grad == p2.requires_grad
        if p1.requires_grad:
            assert torch.equal(p1.grad, p2.grad), name
        else:
            assert p1.grad is None and p2.grad is None
    assert torch.equal(on_images._normalizer, on_features._normalizer)

    # Predictions from features equal predictions from images.
    dets_images = on_images.predict(images, score_thresh=0.0)
    dets_features = on_features.predict(features, score_thresh=0.0)
    for a, b in zip(dets_images, dets_features):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))


@pytest.mark.part("fcos_loss")
def test_tiny_model_overfits_two_images():
    torch.manual_seed(0)
    model = FCOS(num_classes=3, fpn_channels=32, stem_channels=[32], pretrained=False).train()
    images = torch.randn(2, 3, 64, 64)
    gt = torch.tensor(
        [
            [[8.0, 8.0, 40.0, 48.0, 0.0], [30.0, 20.0, 62.0, 60.0, 2.0]],
            [[16.0, 4.0, 56.0, 36.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        ]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(20):
        losses = model(images, gt)
        total = sum(losses.values())
        # Undo the EMA normalisation (it changes from 150 towards the true foreground
        # count while training) so that the losses of all steps are comparable.
        totals.append(total.item() * model._normalizer.item() * 2)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert totals[-1] < 0.5 * totals[0], totals


###############################################################################
# Inference
###############################################################################


def _crafted_predictions(num_images: int = 2):
    """Hand-made head outputs of a 64 x 64 image: p3 8x8, p4 4x4, p5 2x2, 3 classes."""
    locations = hand_locations(64, 64)
    hw = {name: locs.shape[0] for name, locs in locations.items()}
    cls_logits = {n: torch.full((num_images, k, 3), -20.0) for n, k in hw.items()}
    box_deltas = {n: torch.ones(num_images, k, 4) for n, k in hw.items()}
    ctr_logits = {n: torch.zeros(num_images, k, 1) for n, k in hw.items()}
    # Image 0. p3 cell (row 2, col 3) = location (28, 20): class 1, box (20, 12, 36, 28).
    cls_logits["p3"][0, 2 * 8 + 3, 1] = 3.0
    # p3 cell (2, 4) = (36, 20): box (28, 12, 44, 28), IoU 1/3 with the previous box;
    # class 1 (suppressed at NMS 0.3, kept at 0.5) and class 2 (never suppressed by class 1).
    cls_logits["p3"][0, 2 * 8 + 4, 1] = 2.0
    cls_logits["p3"][0, 2 * 8 + 4, 2] = 1.0
    # p5 cell (0, 0) = (16, 16): class 0, deltas (1, 1, 3, 3) * 32 -> (-16, -16, 112, 112),
    # clipped to the image (0, 0, 64, 64).
    cls_logits["p5"][0, 0, 0] = 4.0
    box_deltas["p5"][0, 0] = torch.tensor([1.0, 1.0, 3.0, 3.0])
    # Image 1. p4 cell (1, 1) = (24, 24): class 2, deltas 0.5 * 16 -> (16, 16, 32, 32).
    cls_logits["p4"][1, 5, 2] = 5.0
    box_deltas["p4"][1, 5] = 0.5
    ctr_logits["p4"][1, 5] = 2.0
    return locations, cls_logits, box_deltas, ctr_logits


def _score(cls_logit: float, ctr_logit: float = 0.0) -> float:
    return math.sqrt(torch.sigmoid(torch.tensor(cls_logit)) * torch.sigmoid(torch.tensor(ctr_logit)))


@pytest.mark.part("fcos_inference")
def test_inference_on_crafted_predictions():
    torch.manual_seed(0)
    model = tiny_fcos().eval()
    preds = _crafted_predictions()
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    assert len(dets) == 2
    expected_boxes = torch.tensor(
        [[0.0, 0.0, 64.0, 64.0], [20.0, 12.0, 36.0, 28.0], [28.0, 12.0, 44.0, 28.0], [28.0, 12.0, 44.0, 28.0]]
    )
    assert torch.allclose(dets[0]["boxes"], expected_boxes)
    assert torch.equal(dets[0]["labels"], torch.tensor([0, 1, 1, 2]))
    assert dets[0]["labels"].dtype == torch.int64
    assert torch.allclose(dets[0]["scores"], torch.tensor([_score(4), _score(3), _score(2), _score(1)]))
    assert torch.allclose(dets[1]["boxes"], torch.tensor([[16.0, 16.0, 32.0, 32.0]]))
    assert torch.equal(dets[1]["labels"], torch.tensor([2]))
    assert torch.allclose(dets[1]["scores"], torch.tensor([_score(5, 2)]))

    # Stricter NMS: the class-1 box with IoU 1/3 goes, the class-2 box stays.
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.3)
    assert torch.equal(dets[0]["labels"], torch.tensor([0, 1, 2]))
    # Score threshold above the class-2 box's score (0.605).
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.62, nms_thresh=0.5)
    assert torch.equal(dets[0]["labels"], torch.tensor([0, 1, 1])) and torch.equal(dets[1]["labels"], torch.tensor([2]))
    # Cap per image, and top-1 candidate per level.
    model.detections_per_image = 2
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    assert torch.equal(dets[0]["labels"], torch.tensor([0, 1])) and len(dets[1]["labels"]) == 1
    model.detections_per_image, model.topk_candidates = 100, 1
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    assert torch.equal(dets[0]["labels"], torch.tensor([0, 1]))


@pytest.mark.part("fcos_inference")
def test_inference_batch_equals_single_images():
    torch.manual_seed(0)
    model = tiny_fcos().eval()
    locations, *outputs = _crafted_predictions()
    batched = model.postprocess(locations, *outputs, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    for b in range(2):
        single_outputs = [{k: v[b : b + 1] for k, v in d.items()} for d in outputs]
        single = model.postprocess(locations, *single_outputs, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
        assert len(single) == 1
        assert all(torch.equal(single[0][k], batched[b][k]) for k in ("boxes", "labels", "scores"))


@pytest.mark.part("fcos_inference")
def test_predict_and_eval_forward_on_random_model():
    torch.manual_seed(0)
    model = tiny_fcos(detections_per_image=50).train()
    images = torch.randn(3, 3, 64, 80)
    dets = model.predict(images, score_thresh=0.0, nms_thresh=0.5)
    assert model.training, "predict restores the previous mode"
    assert len(dets) == 3
    for det in dets:
        boxes, scores = det["boxes"], det["scores"]
        assert 0 < boxes.shape[0] <= 50 and boxes.shape == (scores.shape[0], 4)
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < 3
        assert torch.all(scores[:-1] >= scores[1:]), "sorted by decreasing score"
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 80
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 64
    model.eval()
    boxes, classes, scores = model(images[:1], test_score_thresh=0.0, test_nms_thresh=0.5)
    assert torch.equal(boxes, dets[0]["boxes"]) or torch.allclose(boxes, dets[0]["boxes"], atol=1e-5)
    assert classes.shape == scores.shape == (boxes.shape[0],)
    with pytest.raises(ValueError):
        model(images)  # eval forward is for one image; predict handles batches
    # Nothing above the threshold: empty, well-typed outputs.
    for det in model.predict(images, score_thresh=1.0):
        assert det["boxes"].shape == (0, 4) and det["labels"].shape == (0,) and det["scores"].shape == (0,)

"""Tests of fcos.py: FCOS building blocks, NMS, losses and the whole detector.

Every test is marked with the part of the assignment it grades ("provided" for given code
and for tests of the whole detector). Expected values are computed by hand (the
arithmetic is in the comments) or come from torchvision; failures say what was expected
and what was computed (``tests/checks.py``). Models are tiny and randomly initialised
(``pretrained=False``), images 64-128 px, so the file runs in seconds on a CPU.
"""
from __future__ import annotations

import copy
import math
import urllib.error
from typing import Dict

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fcos
from checks import check_close, check_dtype, check_equal, check_shape
from fcos import (
    FCOS,
    DetectorBackboneWithFPN,
    FCOSPredictionNetwork,
    fcos_apply_deltas_to_locations,
    fcos_box_and_centerness_losses,
    fcos_candidates_in_scale_range,
    fcos_candidates_inside_boxes,
    fcos_classification_loss,
    fcos_get_deltas_from_locations,
    fcos_level_candidates,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
    fcos_pick_smallest_box,
    get_fpn_location_coords,
    image_size_of,
    nms,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}


# Tiny tensors: one intra-op thread is faster and steadier (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_fcos(num_classes: int = 3, **kwargs) -> FCOS:
    """A small random FCOS (RegNetX-400MF body, FPN 16, one 16-channel stem conv)."""
    kwargs.setdefault("pretrained", False)
    return FCOS(num_classes=num_classes, fpn_channels=16, stem_channels=[16], **kwargs)


def image_locations(height: int, width: int) -> Dict[str, torch.Tensor]:
    """The detector's locations of a (height, width) image (``get_fpn_location_coords``)."""
    shapes = {name: (1, 1, math.ceil(height / s), math.ceil(width / s)) for name, s in STRIDES.items()}
    return get_fpn_location_coords(shapes, STRIDES)


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
    try:
        p_feats = model(images)
    except NotImplementedError:
        raise
    except RuntimeError as error:
        raise AssertionError(
            f"FPN on a {size[0]}x{size[1]} image: expected p3/p4/p5 of the sizes of c3/c4/c5 "
            f"({', '.join(str(tuple(c.shape[-2:])) for c in c_feats.values())}); computing them raised: {error}"
        ) from error
    check_equal("levels of the FPN output", torch.tensor([len(p_feats)]), [3])
    for level, stride in STRIDES.items():
        # Odd sizes: convolutions with padding round up.
        expected_hw = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        c = c_feats["c" + level[1]]
        assert c.shape == (2, spec.channels["c" + level[1]], *expected_hw)
        check_shape(f"{level} of a {size[0]}x{size[1]} image", p_feats[level], (2, 24, *expected_hw))


@pytest.mark.part("fpn")
def test_fpn_top_down_information_flow():
    """p3 sees c5 (top-down pathway), p5 does not see c3 (no bottom-up path)."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, pretrained=False).eval()
    feats = model.extract_features(torch.randn(1, 3, 72, 72))
    base = model(feats)
    changed_c5 = model({**feats, "c5": feats["c5"] + 1.0})
    changed_c3 = model({**feats, "c3": feats["c3"] + 1.0})
    for level in ("p3", "p4"):
        if torch.allclose(changed_c5[level], base[level]):
            raise AssertionError(f"{level} when c5 changes: expected a change (the top-down pathway carries c5 "
                                 f"down to every level), computed the same {level}")
    check_equal("p5 when only c3 changes (no bottom-up path)", changed_c3["p5"], base["p5"])
    check_equal("p4 when only c3 changes (no bottom-up path)", changed_c3["p4"], base["p4"])


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


@pytest.mark.part("fpn")
@pytest.mark.parametrize("backbone", ["regnet_x_400mf", "mobilenet_v2"])
def test_last_stage_is_the_cnns_c4_to_c5_part(backbone):
    """Provided code (built with the FPN layers): the stage that tune_last_stage trains."""
    torch.manual_seed(0)
    model = DetectorBackboneWithFPN(8, backbone=backbone, pretrained=False, freeze_backbone=True)
    feats = model.extract_features(torch.randn(2, 3, 64, 96))
    with torch.no_grad():
        check_close("last_stage()(c4), against the CNN's c5", model.last_stage()(feats["c4"]), feats["c5"],
                    atol=1e-4, rtol=1e-4)
    stage_convs = [m for m in model.last_stage().modules() if isinstance(m, nn.Conv2d)]
    body_convs = {id(m) for m in model.backbone.modules()}
    assert stage_convs and all(id(m) in body_convs for m in stage_convs), "the stage shares the CNN's layers"


@pytest.mark.part("fpn")
def test_tune_last_stage_trains_the_stage_on_cached_c4():
    torch.manual_seed(0)
    frozen = DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    tuned = DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                    tune_last_stage=True)
    tuned.load_state_dict(frozen.state_dict())  # same keys: checkpoints do not depend on the option
    stage = {id(p) for p in tuned.last_stage().parameters()}
    trained = [(n, p) for n, p in tuned.backbone.named_parameters() if p.requires_grad]
    assert trained and all(id(p) in stage for _, p in trained), "only the last stage of the CNN trains"
    batchnorms = [m for m in tuned.last_stage().modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(not p.requires_grad for m in batchnorms for p in m.parameters())
    tuned.train()
    assert not any(m.training for m in batchnorms), "BatchNorm keeps its ImageNet statistics"

    feats = tuned.extract_features(torch.randn(2, 3, 64, 64))
    # A cached c5 is ignored: c5 comes from c4 through the stage being trained.
    out = tuned({**feats, "c5": torch.zeros_like(feats["c5"])})
    check_close("p5 with tune_last_stage (c5 recomputed from c4)", out["p5"], frozen(feats)["p5"],
                atol=1e-4, rtol=1e-4)
    out["p5"].sum().backward()
    assert all(p.grad is not None for _, p in trained)
    with pytest.raises(ValueError, match="freeze_backbone"):
        DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, tune_last_stage=True)


def _fpn_convs(model: DetectorBackboneWithFPN):
    """The FPN's convolutions, found by shape (whatever the student named them):
    1x1 "lateral" convs keyed by their input channels, and the 3x3 "output" convs."""
    convs = [m for m in model.fpn_params.modules() if isinstance(m, nn.Conv2d)]
    lateral = {m.in_channels: m for m in convs if m.kernel_size == (1, 1)}
    output = [m for m in convs if m.kernel_size == (3, 3)]
    return lateral, output


@pytest.mark.part("fpn")
def test_fpn_has_lateral_and_output_convs():
    model = DetectorBackboneWithFPN(24, backbone="mobilenet_v2", pretrained=False)
    lateral, output = _fpn_convs(model)
    # MobileNetV2 gives c3, c4, c5 with 32, 96 and 1280 channels.
    check_equal("input channels of the 1x1 lateral convs", torch.tensor(sorted(lateral)), [32, 96, 1280])
    check_equal("output channels of the 1x1 lateral convs",
                torch.tensor([m.out_channels for m in lateral.values()]), [24, 24, 24])
    check_equal("number of 3x3 output convs (one per level)", torch.tensor(len(output)), 3)
    for conv in output:
        check_equal("3x3 output conv (in, out) channels", torch.tensor([conv.in_channels, conv.out_channels]), [24, 24])
        check_equal("3x3 output conv padding (keeps the size)", torch.tensor(conv.padding), [1, 1])


def _identity_fpn(out_channels: int = 4) -> DetectorBackboneWithFPN:
    """An FPN whose 1x1 lateral convs copy the first ``out_channels`` input channels and
    whose 3x3 output convs are the identity: p_i shows exactly what is added where."""
    model = DetectorBackboneWithFPN(out_channels, backbone="mobilenet_v2", pretrained=False)
    lateral, output = _fpn_convs(model)
    with torch.no_grad():
        for conv in list(lateral.values()) + output:
            conv.weight.zero_()
            conv.bias.zero_()
            for channel in range(out_channels):
                centre = conv.kernel_size[0] // 2
                conv.weight[channel, channel, centre, centre] = 1.0
    return model


@pytest.mark.part("fpn")
def test_fpn_nearest_upsampling_to_the_exact_size():
    """Only c5 is non-zero, so p4 = upsample(p5) and p3 = upsample(p4). Nearest-neighbour
    upsampling to the lateral's *exact* size: p5 is 2x2, p4 is 3x3 (an odd image size),
    and nearest picks rows/columns floor(i * 2 / 3) = 0, 0, 1 of p5."""
    model = _identity_fpn(4).eval()
    c5 = torch.zeros(1, 1280, 2, 2)
    c5[0, :4] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    feats = {"c3": torch.zeros(1, 32, 6, 6), "c4": torch.zeros(1, 96, 3, 3), "c5": c5}
    try:
        with torch.no_grad():
            p = model(feats)
    except NotImplementedError:
        raise
    except RuntimeError as error:
        raise AssertionError(
            "FPN on c3/c4/c5 of 6x6, 3x3, 2x2 (an odd image size): expected the upsampled coarser map to "
            f"take the exact size of the finer lateral (2x2 -> 3x3), computing it raised: {error}"
        ) from error
    check_close("p5 (lateral c5 through the identity output conv), channel 0", p["p5"][0, 0], [[1.0, 2.0], [3.0, 4.0]])
    expected_p4 = [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]
    check_close("p4 = nearest upsampling of the c5 path to 3x3, channel 0", p["p4"][0, 0], expected_p4,
                hint="use F.interpolate(..., size=lateral.shape[-2:], mode='nearest')")
    # p3 (6x6): every cell of p4 becomes a 2x2 block.
    expected_p3 = torch.tensor(expected_p4).repeat_interleave(2, 0).repeat_interleave(2, 1)
    check_close("p3 = nearest upsampling of the merged p4 path to 6x6, channel 0", p["p3"][0, 0], expected_p3)


@pytest.mark.part("fpn")
def test_fpn_adds_the_lateral_before_the_output_conv():
    """c4 alone: p4 is its lateral (through the output conv), p5 does not see it, and p3
    receives it upsampled (2x: 3x3 -> 6x6)."""
    model = _identity_fpn(4).eval()
    c4 = torch.zeros(1, 96, 3, 3)
    c4[0, 1, 1, 2] = 5.0
    feats = {"c3": torch.ones(1, 32, 6, 6), "c4": c4, "c5": torch.zeros(1, 1280, 2, 2)}
    with torch.no_grad():
        p = model(feats)
    check_close("p5 when only c3 and c4 are non-zero", p["p5"], torch.zeros(1, 4, 2, 2))
    check_close("p4 channel 1 (the lateral of c4)", p["p4"][0, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    # p3 channel 1 = lateral(c3) (ones) + 2x2 blocks of p4's channel 1.
    expected = torch.ones(6, 6)
    expected[2:4, 4:6] += 5.0
    check_close("p3 channel 1 (lateral of c3 plus the upsampled p4 path)", p["p3"][0, 1], expected)


@pytest.mark.part("fpn")
def test_fpn_output_convs_are_applied():
    """Output convs with zero weights and bias 7 make every p_i exactly 7."""
    model = DetectorBackboneWithFPN(4, backbone="mobilenet_v2", pretrained=False).eval()
    _, output = _fpn_convs(model)
    with torch.no_grad():
        for conv in output:
            conv.weight.zero_()
            conv.bias.fill_(7.0)
        p = model(model.extract_features(torch.randn(1, 3, 64, 64)))
    for name, feat in p.items():
        check_close(f"{name} after a 3x3 output conv of weight 0 and bias 7", feat, torch.full_like(feat, 7.0),
                    hint="every p_i must be the output of its 3x3 conv")


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
    check_equal("levels of the returned dict", torch.tensor([len(locations)]), [3])
    for name, coords in expected.items():
        check_dtype(f"{name} locations", locations[name], torch.float64)
        check_close(f"{name} (x, y) locations of a {shapes[name][2]}x{shapes[name][3]} map", locations[name],
                    torch.tensor(coords, dtype=torch.float64),
                    hint="cell (row i, column j) is at (s * (j + 0.5), s * (i + 0.5)), x varying fastest")


@pytest.mark.part("locations")
def test_fpn_location_coords_tall_map_and_default_dtype():
    # A 3 x 1 map at stride 16 (rows vary, one column) and a 1 x 2 map at stride 8.
    locations = get_fpn_location_coords({"p4": (1, 1, 3, 1), "p3": (1, 1, 1, 2)}, {"p4": 16, "p3": 8})
    check_dtype("locations (default dtype)", locations["p4"], torch.float32)
    check_close("p4 locations of a 3x1 map", locations["p4"], [[8.0, 8.0], [8.0, 24.0], [8.0, 40.0]],
                hint="the first coordinate is x (the column), the second y (the row)")
    check_close("p3 locations of a 1x2 map", locations["p3"], [[4.0, 4.0], [12.0, 4.0]])


@pytest.mark.part("fcos_head")
def test_prediction_network_shapes_and_init():
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(num_classes=5, in_channels=16, stem_channels=[32, 48])
    feats = {"p3": torch.randn(2, 16, 8, 6), "p4": torch.randn(2, 16, 4, 3), "p5": torch.randn(2, 16, 2, 2)}
    cls_logits, box_deltas, ctr_logits = head(feats)
    for name, feat in feats.items():
        hw = feat.shape[2] * feat.shape[3]
        check_shape(f"class logits of {name}", cls_logits[name], (2, hw, 5))
        check_shape(f"box deltas of {name}", box_deltas[name], (2, hw, 4))
        check_shape(f"centerness logits of {name}", ctr_logits[name], (2, hw, 1))
    # Focal-loss prior: every class starts at probability ~0.01.
    probs = torch.sigmoid(torch.cat([v.detach() for v in cls_logits.values()], dim=1))
    check_close("mean initial class probability (focal-loss prior)", probs.mean(), torch.tensor(0.01), atol=1e-3,
                hint="initialise the pred_cls bias at -log((1 - 0.01) / 0.01)")
    check_close("spread of the initial class probabilities", torch.stack([probs.min(), probs.max()]),
                torch.tensor([0.01, 0.01]), atol=0.01)
    # One GroupNorm per stem conv in each of the two stems.
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    check_equal("number of GroupNorm layers (one per stem conv, two stems of 2)", torch.tensor(len(norms)), 4)


@pytest.mark.part("fcos_head")
def test_prediction_network_output_order_matches_the_locations():
    """Row i * W + j of an output is cell (row i, column j) of the conv output: the order
    of get_fpn_location_coords (x varies fastest), with channels last."""
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(num_classes=3, in_channels=8, stem_channels=[8])
    feats = {"p3": torch.randn(2, 8, 3, 5)}
    cls_logits, box_deltas, ctr_logits = head(feats)
    with torch.no_grad():
        cls_map = head.pred_cls(head.stem_cls(feats["p3"]))  # (2, 3, 3, 5)
        box_map = head.pred_box(head.stem_box(feats["p3"]))  # (2, 4, 3, 5)
    for b, i, j in ((0, 0, 1), (1, 2, 4), (1, 1, 0)):
        check_close(f"class logits of image {b}, cell (row {i}, column {j})", cls_logits["p3"][b, i * 5 + j],
                    cls_map[b, :, i, j], hint="(B, C, H, W) -> (B, H*W, C): flatten H, W then move channels last")
        check_close(f"box deltas of image {b}, cell (row {i}, column {j})", box_deltas["p3"][b, i * 5 + j],
                    box_map[b, :, i, j])


@pytest.mark.part("fcos_head")
def test_prediction_network_stems_end_with_relu():
    """Stems are Conv3x3 -> GroupNorm -> ReLU. With every GroupNorm giving -1 (weight 0,
    bias -1), the ReLU makes the stem output 0, so the predictions equal their biases."""
    head = FCOSPredictionNetwork(num_classes=2, in_channels=4, stem_channels=[4, 4])
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.zero_()
                module.bias.fill_(-1.0)
        for conv in (head.pred_cls, head.pred_box, head.pred_ctr):
            conv.weight.fill_(1.0)
            conv.bias.fill_(0.5)
        cls_logits, box_deltas, ctr_logits = head({"p4": torch.randn(1, 4, 2, 2)})
    for name, out in (("class logits", cls_logits), ("box deltas", box_deltas), ("centerness logits", ctr_logits)):
        check_close(f"{name} after stems whose GroupNorm outputs -1", out["p4"], torch.full_like(out["p4"], 0.5),
                    hint="each stem block is Conv3x3 -> GroupNorm -> ReLU")


@pytest.mark.part("fcos_head")
def test_centerness_hangs_off_box_stem():
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(num_classes=3, in_channels=8, stem_channels=[8])
    _, _, ctr_logits = head({"p3": torch.randn(1, 8, 4, 4)})
    ctr_logits["p3"].sum().backward()
    cls_stem_grads = [p.grad for p in head.stem_cls.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    box_stem_grads = [p.grad for p in head.stem_box.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    check_equal("classification-stem parameters that the centerness reaches", torch.tensor(len(cls_stem_grads)), 0,
                hint="pred_ctr sits on the box stem (FCOS v2)")
    if not box_stem_grads:
        raise AssertionError("box-stem parameters that the centerness reaches: expected some, computed none")


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
    check_close("deltas (l, t, r, b) / stride of a location and of a background row", deltas, expected,
                hint="(x - x1, y - y1, x2 - x, y2 - y) / stride; background rows (all -1) give -1")


@pytest.mark.part("fcos_deltas")
def test_deltas_round_trip_batched_and_clamped():
    gen = torch.Generator().manual_seed(0)
    locations = torch.rand(7, 2, generator=gen) * 100 + 50  # (N, 2), shared by the batch
    sides = torch.rand(3, 7, 4, generator=gen) * 40 + 1
    boxes = torch.cat([locations - sides[..., :2], locations + sides[..., 2:]], dim=-1)  # (B, N, 4)
    deltas = fcos_get_deltas_from_locations(locations, boxes, stride=16)
    check_shape("batched deltas", deltas, (3, 7, 4))
    check_close("batched deltas", deltas, sides / 16)
    check_close("boxes decoded from their deltas", fcos_apply_deltas_to_locations(deltas, locations, stride=16),
                boxes, atol=1e-5)
    # Background deltas decode to the location itself; negative deltas are clamped to 0.
    point = fcos_apply_deltas_to_locations(torch.tensor([[-1.0, -1.0, -1.0, -1.0]]), torch.tensor([[7.0, 9.0]]), 8)
    check_close("box decoded from background deltas (-1, clamped to 0)", point, [[7.0, 9.0, 7.0, 9.0]],
                hint="clamp the deltas at 0 before decoding")
    half = fcos_apply_deltas_to_locations(torch.tensor([[-2.0, 1.0, 0.5, -0.1]]), torch.tensor([[10.0, 10.0]]), 4)
    check_close("box decoded from partly negative deltas at stride 4", half, [[10.0, 6.0, 12.0, 10.0]])
    # A per-location stride tensor (several levels concatenated) broadcasts.
    strides = torch.tensor([[8.0], [16.0]])
    two = fcos_get_deltas_from_locations(torch.tensor([[16.0, 16.0], [40.0, 40.0]]),
                                         torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 72.0, 72.0]]), strides)
    check_close("deltas with a per-location stride tensor", two, [[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])


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
    check_close("centerness targets", fcos_make_centerness_targets(deltas), expected,
                hint="sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); -1 for background rows")
    # Extra leading dims.
    batched = fcos_make_centerness_targets(deltas.expand(2, 4, 4).double())
    check_shape("centerness of (2, 4, 4) deltas", batched, (2, 4))
    check_dtype("centerness of float64 deltas", batched, torch.float64)
    check_close("batched centerness", batched, expected.double().expand(2, 4))


###############################################################################
# Matching locations to GT: the three steps
###############################################################################

# Five locations against two images of boxes. Image 0: box A (0, 0, 40, 20) class 3 and a
# padding row; image 1: box B (10, 10, 30, 30) class 0 and box C (-10, -10, 100, 100) class 2.
MATCH_LOCATIONS = torch.tensor([[10.0, 10.0], [40.0, 10.0], [20.0, 5.0], [20.0, 20.0], [35.0, 15.0]])
MATCH_GT = torch.tensor(
    [
        [[0.0, 0.0, 40.0, 20.0, 3.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        [[10.0, 10.0, 30.0, 30.0, 0.0], [-10.0, -10.0, 100.0, 100.0, 2.0]],
    ]
)


@pytest.mark.part("fcos_match_inside")
def test_candidates_inside_boxes_without_centre_sampling():
    strides = torch.full((5,), 8.0)
    inside = fcos_candidates_inside_boxes(MATCH_LOCATIONS, MATCH_GT, strides, center_sampling_radius=None)
    check_shape("candidates (B, L, N)", inside, (2, 5, 2))
    check_dtype("candidates", inside, torch.bool)
    # Image 0, box A (0, 0, 40, 20): (10, 10) inside; (40, 10) on the right side (not
    # strictly inside); (20, 5), (35, 15) inside; (20, 20) on the bottom side. The padding
    # row is never a candidate.
    # Image 1, box B (10, 10, 30, 30): only (20, 20) is strictly inside ((10, 10) is a
    # corner); box C contains every location.
    expected = torch.tensor(
        [
            [[True, False], [False, False], [True, False], [False, False], [True, False]],
            [[False, True], [False, True], [False, True], [True, True], [False, True]],
        ]
    )
    check_equal("locations strictly inside each box (no centre sampling)", inside, expected,
                hint="strictly inside: x1 < x < x2 and y1 < y < y2; padding rows (class -1) never")


@pytest.mark.part("fcos_match_inside")
def test_candidates_inside_boxes_with_centre_sampling():
    # Strides differ per location: 8, 8, 16, 16, 16; radius 1.5 -> 12, 12, 24, 24, 24 px.
    strides = torch.tensor([8.0, 8.0, 16.0, 16.0, 16.0])
    inside = fcos_candidates_inside_boxes(MATCH_LOCATIONS, MATCH_GT, strides, center_sampling_radius=1.5)
    # Box A centre (20, 10): (10, 10): |dx| 10 < 12 yes; (20, 5): 0, 5 < 24 yes;
    # (35, 15): |dx| 15 < 24 yes (it would not be with the stride of p3).
    # Box B centre (20, 20): (20, 20) yes. Box C centre (45, 45): (10, 10): 35 > 12 no;
    # (40, 10): dy 35 > 12 no; (20, 5): 25 > 24 no (dx); (20, 20): 25 > 24 no; (35, 15): dy 30 > 24 no.
    expected = torch.tensor(
        [
            [[True, False], [False, False], [True, False], [False, False], [True, False]],
            [[False, False], [False, False], [False, False], [True, False], [False, False]],
        ]
    )
    check_equal("candidates with centre sampling (radius 1.5 strides)", inside, expected,
                hint="|x - cx| < radius * stride and |y - cy| < radius * stride, with each location's stride")


@pytest.mark.part("fcos_match_scale")
def test_candidates_in_scale_range():
    locations = torch.tensor([[50.0, 50.0], [50.0, 50.0], [50.0, 50.0], [10.0, 90.0]])
    # One box (0, 0, 114, 64): from (50, 50) the distances (l, t, r, b) = (50, 50, 64, 14),
    # max 64; from (10, 90): (10, 90, 104, -26), max 104 (outside, but that is step 1's job).
    gt = torch.tensor([[[0.0, 0.0, 114.0, 64.0, 1.0]]])
    lower = torch.tensor([0.0, 64.0, 32.0, 64.0])
    upper = torch.tensor([64.0, 128.0, 70.0, 128.0])
    in_range = fcos_candidates_in_scale_range(locations, gt, lower, upper)
    check_shape("in-range mask (B, L, N)", in_range, (1, 4, 1))
    check_dtype("in-range mask", in_range, torch.bool)
    # max 64 vs (0, 64): not < 64; vs (64, 128): not > 64; vs (32, 70): in; 104 vs (64, 128): in.
    check_equal("max(l, t, r, b) strictly between the level's bounds", in_range.reshape(-1),
                [False, False, True, True],
                hint="use the largest of the four distances, with strict comparisons on both sides")


@pytest.mark.part("fcos_match_scale")
def test_candidates_in_scale_range_uses_the_largest_distance():
    # From (30, 20) to box (0, 0, 40, 100): (l, t, r, b) = (30, 20, 10, 80): max 80, min 10.
    locations = torch.tensor([[30.0, 20.0]])
    gt = torch.tensor([[[0.0, 0.0, 40.0, 100.0, 0.0]], [[25.0, 15.0, 45.0, 35.0, 2.0]]])
    in_range = fcos_candidates_in_scale_range(locations, gt, torch.tensor([64.0]), torch.tensor([128.0]))
    # Image 1: box (25, 15, 45, 35): (5, 5, 15, 15): max 15, not in (64, 128).
    check_equal("in (64, 128) for max distances 80 and 15", in_range.reshape(-1), [True, False])


@pytest.mark.part("fcos_match_smallest")
def test_pick_smallest_box():
    gt = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0, 4.0], [0.0, 0.0, 5.0, 6.0, 1.0], [0.0, 0.0, 6.0, 5.0, 2.0]],
            [[0.0, 0.0, 100.0, 100.0, 0.0], [-1.0, -1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        ]
    )  # areas 100, 30, 30 / 10000
    is_candidate = torch.tensor(
        [
            [[True, False, False], [True, True, False], [True, True, True], [False, False, False]],
            [[True, False, False], [False, False, False], [True, False, False], [False, False, False]],
        ]
    )
    matched = fcos_pick_smallest_box(is_candidate, gt)
    check_shape("matched GT rows (B, L, 5)", matched, (2, 4, 5))
    background = [-1.0] * 5
    expected = torch.tensor(
        [
            [gt[0, 0].tolist(), gt[0, 1].tolist(), gt[0, 1].tolist(), background],  # equal areas: the first
            [gt[1, 0].tolist(), background, gt[1, 0].tolist(), background],
        ]
    )
    check_equal("matched GT row per location (smallest candidate box, -1 without candidate)", matched, expected,
                hint="with equal areas the first box wins; rows of locations without candidates are all -1")


@pytest.mark.part("fcos_match_smallest")
def test_pick_smallest_box_float64_and_huge_areas():
    # Areas 4e10 and 1e10: an "1e8 - area" trick breaks down; the smallest must still win.
    gt = torch.tensor([[[0.0, 0.0, 2e5, 2e5, 0.0], [0.0, 0.0, 1e5, 1e5, 1.0]]], dtype=torch.float64)
    matched = fcos_pick_smallest_box(torch.tensor([[[True, True]]]), gt)
    check_dtype("matched rows", matched, torch.float64)
    check_equal("matched row among boxes of areas 4e10 and 1e10", matched[0, 0], gt[0, 1])
    # Only the huge box is a candidate: it must win whatever the other box's area.
    matched = fcos_pick_smallest_box(torch.tensor([[[True, False]]]), gt)
    check_equal("matched row when only the box of area 4e10 is a candidate", matched[0, 0], gt[0, 0],
                hint="give non-candidates an infinite area, not a large number")


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


@pytest.mark.part("provided")
@pytest.mark.parametrize("radius", [None, 1.5])
def test_match_constructed_scene(radius):
    """The provided matcher, which runs the three steps for all levels at once."""
    locations = image_locations(256, 256)
    matched = fcos_match_locations_to_gt(locations, STRIDES, SCENE, center_sampling_radius=radius)
    for name, locs in locations.items():
        check_shape(f"matched rows of {name}", matched[name], (locs.shape[0], 5))
    for level, x, y, cls_plain, cls_sampled in SCENE_EXPECTED:
        expected_cls = cls_plain if radius is None else cls_sampled
        row = _row_at(matched, locations, level, x, y)
        expected = torch.full((5,), -1.0) if expected_cls < 0 else SCENE[expected_cls]
        check_equal(f"matched row of location ({x}, {y}) on {level} (radius {radius})", row, expected)


@pytest.mark.part("provided")
def test_match_default_uses_center_sampling():
    locations = image_locations(256, 256)
    default = fcos_match_locations_to_gt(locations, STRIDES, SCENE)
    sampled = fcos_match_locations_to_gt(locations, STRIDES, SCENE, center_sampling_radius=1.5)
    for name in locations:
        check_equal(f"default matching of {name} (centre sampling 1.5)", default[name], sampled[name])


@pytest.mark.part("provided")
@pytest.mark.parametrize("radius", [None, 1.5])
def test_match_batched_equals_per_image(radius):
    locations = image_locations(128, 96)
    gt = random_gt(3, 96, num_classes=4, max_boxes=5, seed=1)
    gt = torch.cat([gt, torch.full((1, 5, 5), -1.0)])  # an image without objects
    batched = fcos_match_locations_to_gt(locations, STRIDES, gt, center_sampling_radius=radius)
    for name, locs in locations.items():
        check_shape(f"batched matched rows of {name}", batched[name], (4, locs.shape[0], 5))
    for b in range(gt.shape[0]):
        single = fcos_match_locations_to_gt(locations, STRIDES, gt[b], center_sampling_radius=radius)
        for name in locations:
            check_equal(f"image {b}, {name}: batched vs one image", batched[name][b], single[name])
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
        check_dtype("kept indices", kept, torch.int64)
        check_equal(f"kept indices of {n} random boxes (trial {trial}, threshold {iou_threshold})", kept, expected,
                    hint="visit boxes by decreasing score (stable sort: ties in input order); suppress IoU > t")


@pytest.mark.part("nms")
def test_nms_large_float64_and_degenerate():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(3000, gen, 1000.0, 120.0, dtype=torch.float64)
    boxes[::17, 2] = boxes[::17, 0]  # zero-width boxes: IoU 0/0 never suppresses
    boxes[5] = boxes[3]  # exact duplicates
    scores = torch.rand(3000, generator=gen, dtype=torch.float64)
    for threshold in (0.3, 0.5, 0.7):
        check_equal(f"kept indices of 3000 float64 boxes with empty ones and duplicates (threshold {threshold})",
                    nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("nms")
def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0))
    check_shape("kept indices of no boxes", empty, (0,))
    check_dtype("kept indices of no boxes", empty, torch.int64)
    check_equal("kept indices of one box", nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.5])), [0])
    # Two identical boxes with the same score: the first one is kept.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    check_equal("kept indices, two identical boxes with equal scores", nms(boxes, torch.tensor([0.9, 0.9, 0.95])),
                [2, 0], hint="a stable descending sort keeps the first of two equal scores first")
    # IoU exactly at the threshold does not suppress (strict ">").
    half = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU = 0.5
    check_equal("kept indices when the IoU equals the threshold (0.5)", nms(half, torch.tensor([0.9, 0.8]), 0.5),
                [0, 1], hint="suppress only when IoU > threshold")
    # torchvision compares the float32 IoU with the threshold as a double: 3 / 10 in
    # float32 is 0.30000001 > 0.3, so this pair is suppressed at 0.3 (not in float64).
    pair = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    for dtype in (torch.float32, torch.float64):
        boxes, scores = pair.to(dtype), torch.tensor([0.9, 0.8], dtype=dtype)
        check_equal(f"kept indices at IoU 0.30000001 > 0.3 ({dtype})", nms(boxes, scores, 0.3),
                    torchvision.ops.nms(boxes, scores, 0.3))
    # Thresholds outside [0, 1].
    gen = torch.Generator().manual_seed(3)
    boxes, scores = _random_boxes(50, gen, 100.0, 30.0), torch.rand(50, generator=gen)
    for threshold in (-0.5, 0.0, 1.0):
        check_equal(f"kept indices at threshold {threshold}", nms(boxes, scores, threshold),
                    torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.part("nms")
def test_nms_many_separate_clusters_equals_torchvision():
    """Groups of boxes far apart (as class-specific NMS makes them), of very different
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
        check_equal(f"kept indices of 60 separate groups (threshold {threshold})", nms(boxes, scores, threshold),
                    torchvision.ops.nms(boxes, scores, threshold))


###############################################################################
# Losses
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


@pytest.mark.part("provided")
def test_centerness_floor_is_the_entropy_of_the_targets():
    """The detector reports the centerness BCE minus the targets' entropy: the floor that
    the BCE of soft targets reaches when the predictions equal the targets."""
    targets = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    logits = torch.logit(targets.clamp(1e-6, 1 - 1e-6))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    check_close("entropy of the targets = BCE at the targets", fcos.binary_entropy(targets), bce, atol=1e-4)
    check_close("entropy of 0.5", fcos.binary_entropy(torch.tensor(0.5)), torch.tensor(math.log(2)))
    torch.manual_seed(0)
    model = tiny_fcos().train()
    images = torch.randn(2, 3, 64, 64)
    gt = random_gt(2, 64, num_classes=3, seed=5)
    losses = model(images, gt)
    assert float(losses["loss_ctr"].detach()) >= -1e-6, "above its floor"


@pytest.mark.part("fcos_loss_cls")
def test_classification_loss_one_hot_targets():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3], [-0.7, 1.5]], [[0.1, 0.2], [-2.0, 3.0], [1.0, 1.0]]])
    matched_classes = torch.tensor([[1, -1, 0], [-1, -1, 1]])
    loss = fcos_classification_loss(logits, matched_classes, alpha=0.25, gamma=2.0)
    # One-hot targets, all zeros for background (-1).
    targets = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    check_shape("classification loss (a scalar)", loss, ())
    check_close("focal loss summed over all locations and classes", loss, expected, rtol=1e-5,
                hint="targets: one-hot of the matched class, all zeros for background (class -1)")


@pytest.mark.part("fcos_loss_cls")
def test_classification_loss_passes_alpha_and_gamma():
    logits = torch.tensor([[[1.5, -0.5, 0.2]], [[-1.0, 0.7, 2.2]]])
    matched_classes = torch.tensor([[2], [-1]])
    targets = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]])
    for alpha, gamma in ((0.5, 1.0), (-1.0, 0.0)):
        loss = fcos_classification_loss(logits, matched_classes, alpha=alpha, gamma=gamma)
        expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
        check_close(f"focal loss with alpha={alpha}, gamma={gamma}", loss, expected, rtol=1e-5)
    # No foreground at all: only the background terms.
    none = fcos_classification_loss(logits, torch.full((2, 1), -1), alpha=0.25, gamma=2.0)
    expected = torchvision.ops.sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    check_close("focal loss of a batch without foreground", none, expected, rtol=1e-5)


BOX_PRED = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 4.0, 4.0]])
BOX_GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0], [6.0, 6.0, 8.0, 8.0]])
CTR_LOGITS = torch.tensor([2.0, -1.0, 0.5])
CTR_TARGETS = torch.tensor([1.0, 0.5, 0.25])


@pytest.mark.part("fcos_loss_box")
def test_box_and_centerness_losses_weighted():
    loss_box, loss_ctr = fcos_box_and_centerness_losses(BOX_PRED, BOX_GT, CTR_LOGITS, CTR_TARGETS,
                                                        centerness_weighted=True)
    giou = torchvision.ops.generalized_box_iou_loss(BOX_PRED, BOX_GT)  # (3,)
    # Centerness weights divided by their mean (1 + 0.5 + 0.25) / 3 = 7/12: 12/7, 6/7, 3/7.
    weights = torch.tensor([12 / 7, 6 / 7, 3 / 7])
    check_shape("box loss (a scalar)", loss_box, ())
    check_close("centerness-weighted GIoU loss (sum)", loss_box, (weights * giou).sum(), rtol=1e-5,
                hint="weights = gt_centerness / gt_centerness.mean()")
    expected_ctr = F.binary_cross_entropy_with_logits(CTR_LOGITS, CTR_TARGETS, reduction="sum")
    check_close("centerness BCE-with-logits (sum)", loss_ctr, expected_ctr, rtol=1e-5,
                hint="binary cross-entropy on the logits (not on probabilities), summed")


@pytest.mark.part("fcos_loss_box")
def test_box_and_centerness_losses_unweighted_and_empty():
    loss_box, loss_ctr = fcos_box_and_centerness_losses(BOX_PRED, BOX_GT, CTR_LOGITS, CTR_TARGETS,
                                                        centerness_weighted=False)
    expected = torchvision.ops.generalized_box_iou_loss(BOX_PRED, BOX_GT, reduction="sum")
    check_close("GIoU loss without weights (sum)", loss_box, expected, rtol=1e-5)
    # No foreground location in the batch: both losses are 0 (not NaN).
    empty = torch.zeros(0, 4)
    for weighted in (True, False):
        loss_box, loss_ctr = fcos_box_and_centerness_losses(empty, empty, torch.zeros(0), torch.zeros(0),
                                                            centerness_weighted=weighted)
        check_close(f"box loss with no foreground (weighted={weighted})", loss_box, torch.tensor(0.0))
        check_close(f"centerness loss with no foreground (weighted={weighted})", loss_ctr, torch.tensor(0.0))


@pytest.mark.part("fcos_normalizer")
def test_normalizer_starts_at_the_first_batch_then_averages():
    model = tiny_fcos().train()
    model.normalizer_momentum = 0.9
    foreground = torch.zeros(2, 50, dtype=torch.bool)
    foreground[0, :30] = True
    foreground[1, :10] = True  # 40 foreground locations in 2 images: 20 per image
    normalizer = model.update_normalizer(foreground)
    check_close("EMA after the first batch (its count per image)", model._normalizer, torch.tensor(20.0),
                hint="the buffer starts negative: take the first batch's count per image")
    check_close("normaliser after the first batch (EMA * B)", normalizer, torch.tensor(40.0))
    foreground[1, :40] = True  # 70 in 2 images: 35 per image
    normalizer = model.update_normalizer(foreground)
    # 0.9 * 20 + 0.1 * 35 = 21.5 per image, * 2 images.
    check_close("EMA after the second batch", model._normalizer, torch.tensor(21.5))
    check_close("normaliser after the second batch", normalizer, torch.tensor(43.0))
    assert not normalizer.requires_grad, "the normaliser has no gradient"


@pytest.mark.part("fcos_normalizer")
def test_normalizer_in_eval_mode_and_at_least_one():
    model = tiny_fcos(normalizer_init=100.0).eval()
    foreground = torch.zeros(3, 20, dtype=torch.bool)
    normalizer = model.update_normalizer(foreground)
    check_close("EMA in eval mode (never updated)", model._normalizer, torch.tensor(100.0))
    check_close("normaliser in eval mode (EMA * B)", normalizer, torch.tensor(300.0))
    model.train()
    model.normalizer_momentum = 0.5
    normalizer = model.update_normalizer(foreground)  # no foreground at all
    check_close("EMA after a batch without foreground (0.5 * 100 + 0.5 * 0)", model._normalizer, torch.tensor(50.0))
    fresh = tiny_fcos().train()
    normalizer = fresh.update_normalizer(torch.zeros(2, 5, dtype=torch.bool))
    check_close("normaliser of an empty first batch (clamped at 1)", normalizer, torch.tensor(1.0),
                hint="return max(EMA * B, 1): the losses are divided by it")


@pytest.mark.part("provided")
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


@pytest.mark.part("provided")
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


@pytest.mark.part("provided")
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


@pytest.mark.part("provided")
def test_normalizer_buffer_checkpoint_resume_and_eval():
    torch.manual_seed(0)
    model = tiny_fcos().train()
    assert "_normalizer" in model.state_dict() and float(model._normalizer) < 0, "not started before training"
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
    assert float(model._normalizer) > 0
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


@pytest.mark.part("provided")
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


@pytest.mark.part("provided")
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
        # Undo the EMA normalisation (it follows the foreground count while training)
        # so that the losses of all steps are comparable.
        totals.append(total.item() * model._normalizer.item() * 2)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert totals[-1] < 0.5 * totals[0], totals


###############################################################################
# Inference
###############################################################################


def _score(cls_logit: float, ctr_logit: float = 0.0) -> float:
    return math.sqrt(torch.sigmoid(torch.tensor(cls_logit)) * torch.sigmoid(torch.tensor(ctr_logit)))


@pytest.mark.part("fcos_inference")
def test_level_candidates_hand_computed():
    # One image, 3 locations, 2 classes; flat index = location * 2 + class.
    cls_logits = torch.tensor([[[0.0, 2.0], [-1.0, 1.0], [3.0, -2.0]]])
    ctr_logits = torch.tensor([[[0.0], [2.0], [-1.0]]])
    scores, location_idx, labels = fcos_level_candidates(cls_logits, ctr_logits, topk=3)
    # sqrt(sigmoid(cls) * sigmoid(ctr)) with s = sigmoid: (1, 1) = sqrt(s(1) s(2)) = 0.803,
    # (0, 1) = sqrt(s(2) s(0)) = 0.664, (2, 0) = sqrt(s(3) s(-1)) = 0.506, (0, 0) = 0.5, ...
    expected_scores = [_score(1.0, 2.0), _score(2.0, 0.0), _score(3.0, -1.0)]
    check_close("top-3 scores, decreasing", scores, [expected_scores], rtol=1e-5,
                hint="score = sqrt(sigmoid(class logit) * sigmoid(centerness logit))")
    check_equal("location index of the top-3 candidates", location_idx, [[1, 0, 2]])
    check_equal("class of the top-3 candidates", labels, [[1, 1, 0]],
                hint="the flat index is location * num_classes + class")


@pytest.mark.part("fcos_inference")
def test_level_candidates_batch_and_small_levels():
    cls_logits = torch.tensor([[[1.0, 0.0, -1.0]], [[-3.0, 4.0, 0.5]]])  # 2 images, 1 location, 3 classes
    ctr_logits = torch.zeros(2, 1, 1)
    scores, location_idx, labels = fcos_level_candidates(cls_logits, ctr_logits, topk=1000)
    check_shape("scores when topk exceeds H*W*C = 3", scores, (2, 3))
    check_equal("classes per image, by decreasing score", labels, [[0, 1, 2], [1, 2, 0]])
    check_equal("location indices", location_idx, torch.zeros(2, 3, dtype=torch.long))
    check_close("scores of image 1", scores[1], [_score(4.0), _score(0.5), _score(-3.0)], rtol=1e-5)


def _crafted_predictions(num_images: int = 2):
    """Hand-made head outputs of a 64 x 64 image: p3 8x8, p4 4x4, p5 2x2, 3 classes."""
    locations = image_locations(64, 64)
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


@pytest.mark.part("fcos_inference")
def test_inference_on_crafted_predictions():
    torch.manual_seed(0)
    model = tiny_fcos().eval()
    preds = _crafted_predictions()
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    check_equal("number of images with detections", torch.tensor(len(dets)), 2)
    expected_boxes = torch.tensor(
        [[0.0, 0.0, 64.0, 64.0], [20.0, 12.0, 36.0, 28.0], [28.0, 12.0, 44.0, 28.0], [28.0, 12.0, 44.0, 28.0]]
    )
    check_close("image 0 boxes", dets[0]["boxes"], expected_boxes)
    check_equal("image 0 labels", dets[0]["labels"], torch.tensor([0, 1, 1, 2]))
    check_dtype("labels", dets[0]["labels"], torch.int64)
    check_close("image 0 scores", dets[0]["scores"], torch.tensor([_score(4), _score(3), _score(2), _score(1)]),
                hint="score = sqrt(sigmoid(class logit) * sigmoid(centerness logit))")
    check_close("image 1 boxes", dets[1]["boxes"], torch.tensor([[16.0, 16.0, 32.0, 32.0]]))
    check_equal("image 1 labels", dets[1]["labels"], torch.tensor([2]))
    check_close("image 1 scores", dets[1]["scores"], torch.tensor([_score(5, 2)]))

    # Stricter NMS: the class-1 box with IoU 1/3 goes, the class-2 box stays.
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.3)
    check_equal("image 0 labels with NMS at IoU 0.3", dets[0]["labels"], [0, 1, 2])
    # Score threshold above the class-2 box's score (0.605).
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.62, nms_thresh=0.5)
    check_equal("image 0 labels with score threshold 0.62", dets[0]["labels"], [0, 1, 1])
    check_equal("image 1 labels with score threshold 0.62", dets[1]["labels"], [2])
    # Cap per image, and top-1 candidate per level.
    model.detections_per_image = 2
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    check_equal("image 0 labels, 2 detections per image", dets[0]["labels"], [0, 1])
    check_equal("image 1 detections, 2 per image", torch.tensor(len(dets[1]["labels"])), 1)
    model.detections_per_image, model.topk_candidates = 100, 1
    dets = model.postprocess(*preds, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    check_equal("image 0 labels, top-1 candidate per level", dets[0]["labels"], [0, 1],
                hint="keep at most topk candidates per level and image")


@pytest.mark.part("fcos_inference")
def test_inference_batch_equals_single_images():
    torch.manual_seed(0)
    model = tiny_fcos().eval()
    locations, *outputs = _crafted_predictions()
    batched = model.postprocess(locations, *outputs, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
    for b in range(2):
        single_outputs = [{k: v[b : b + 1] for k, v in d.items()} for d in outputs]
        single = model.postprocess(locations, *single_outputs, image_size=(64, 64), score_thresh=0.3, nms_thresh=0.5)
        check_equal("detections of one image", torch.tensor(len(single)), 1)
        for key in ("boxes", "labels", "scores"):
            check_equal(f"image {b} {key}: alone vs in a batch", single[0][key], batched[b][key])


@pytest.mark.part("provided")
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

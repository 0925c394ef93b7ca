"""Tests of a5_helper.py (the facade over the `a5/` package) with the real detectors: FCOS and
Faster R-CNN trained through it on tiny settings, its command line, and the notebooks' CPU
recipe. Tests of each `a5/` module are in test_<module>.py; shared helpers in helpers.py.

Tests that train the real FCOS / Faster R-CNN skip when those modules are not importable.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import a5_helper as h
from helpers import N_VAL, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def _real_module(name: str):
    try:
        return __import__(name)
    except Exception as err:  # pragma: no cover - depends on the checkout
        pytest.skip(f"{name} not importable: {err}")


@pytest.mark.part("provided")
def test_real_fcos_trains_from_images_and_cache(tiny_voc, tmp_path):
    _real_module("fcos")
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)
    config = {"detector": "fcos", "image_size": 64,
              "kwargs": {"backbone": "mobilenet_v2", "pretrained": False, "freeze_backbone": True,
                         "fpn_channels": 16, "stem_channels": [16]}}
    h.reset_seed(0)
    det = h.build_detector(config)
    cache = h.build_feature_cache(det, ds, variants=["orig", "flip"], storage_dtype=torch.float32, progress=False)
    # Same computation from the cache and from the images.
    det_img, det_feat = copy.deepcopy(det).train(), copy.deepcopy(det).train()
    _, feats, gt = cache.get_batch([0, 1, 2], [0, 1, 1])
    images = torch.stack([ds.get_variant(i, v)[1] for i, v in zip([0, 1, 2], ["orig", "flip", "flip"])])
    li, lf = det_img(images, gt), det_feat(feats, gt)
    for k in li:
        torch.testing.assert_close(lf[k], li[k], rtol=1e-4, atol=1e-5)
    sum(li.values()).backward(), sum(lf.values()).backward()
    for (n, a), (_, b) in zip(det_img.named_parameters(), det_feat.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)
    loader = DataLoader(cache, batch_size=3, shuffle=True, collate_fn=h.collate_cached)
    history = h.train_detector(det, loader, max_iters=3, progress=False, checkpoint_dir=tmp_path, model_config=config)
    assert len(history["total_loss"]) == 3 and all(math.isfinite(v) for v in history["total_loss"])
    res = h.evaluate_detector(det, h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64), batch_size=4,
                              progress=False)
    assert res["num_images"] == N_VAL and 0.0 <= res["mAP"] <= 1.0
    reloaded, _ = h.load_detector(tmp_path / "last.pt")
    for k, v in det.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.cpu())


@pytest.mark.part("provided")
def test_real_faster_rcnn_trains_and_evaluates(tiny_voc, tmp_path):
    _real_module("fcos")
    _real_module("two_stage_detector")
    config = {"detector": "faster_rcnn", "image_size": 64,
              "kwargs": {"backbone": "mobilenet_v2", "pretrained": False, "fpn_channels": 16,
                         "stem_channels": [16], "rpn_stem_channels": [16]}}
    h.reset_seed(0)
    det = h.build_detector(config)
    loader = DataLoader(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), batch_size=2, shuffle=True)
    history = h.train_detector(det, loader, max_iters=2, progress=False, model_config=config)
    assert len(history["total_loss"]) == 2 and all(math.isfinite(v) for v in history["total_loss"])
    res = h.evaluate_detector(det, h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64), batch_size=4,
                              progress=False)
    assert res["num_images"] == N_VAL
    # Frozen backbone: Faster R-CNN also trains from cached features.
    frozen = h.build_detector({**config, "kwargs": {**config["kwargs"], "freeze_backbone": True}})
    cache = h.build_feature_cache(frozen, loader.dataset, progress=False)
    cached_loader = DataLoader(cache, batch_size=2, shuffle=True, collate_fn=h.collate_cached)
    history = h.train_detector(frozen, cached_loader, max_iters=2, progress=False)
    assert all(math.isfinite(v) for v in history["total_loss"])


@pytest.mark.part("provided")
def test_real_fcos_command_line(tiny_voc, tmp_path, capsys):
    _real_module("fcos")
    out = tmp_path / "fcos_run"
    rc = h.main(["train", "--detector", "fcos", "--backbone", "mobilenet_v2", "--no-pretrained", "--iters", "2",
                 "--batch-size", "2", "--image-size", "64", "--fpn-channels", "16", "--stem-channels", "16",
                 "--out", str(out), "--max-val-images", "2", "--data-dir", str(tiny_voc), "--num-workers", "0",
                 "--no-progress", "--device", "cpu"])
    assert rc == 0 and "final val mAP" in capsys.readouterr().out
    assert h.main(["predict", "--checkpoint", str(out / "model_final.pt"),
                   str(tiny_voc / "VOCdevkit/VOC2007/JPEGImages/000008.jpg"), "--out", str(tmp_path / "p"),
                   "--device", "cpu"]) == 0
    assert (tmp_path / "p" / "000008_pred.png").is_file()


@pytest.mark.parametrize("notebook, detector", [("fcos.ipynb", "fcos"), ("faster_rcnn.ipynb", "faster_rcnn")])
def test_notebooks_train_with_the_cpu_recipe(notebook, detector):
    """The notebooks' "no GPU" path spells out the recipe for students; it must stay the
    one the command line runs and the README measures (a5_helper.CPU_RECIPE_*)."""
    import ast
    import re

    cells = json.loads((Path(h.__file__).parent / notebook).read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "CACHE_VARIANTS =" in "".join(c["source"]))
    variants = ast.literal_eval(re.search(r"^CACHE_VARIANTS = (\(.*\))$", source, re.M).group(1))
    # Either one length, or "(with bfloat16 if a5_helper.default_amp(DEVICE) else float32)".
    recipe = re.search(r"elif USE_FEATURE_CACHE:\n(?:\s+#.*\n)*\s+ITERS, LR, SCHEDULE = "
                       r"(?:(\d+)|\((\d+) if a5_helper\.default_amp\(DEVICE\) else (\d+)\)), ([0-9.e-]+), \"cosine\"",
                       source)
    single, with_amp, without_amp, lr = recipe.groups()
    with_amp, without_amp = (single, single) if single else (with_amp, without_amp)
    assert tuple(variants) == h.CPU_RECIPE_CACHE_VARIANTS
    assert int(with_amp) == h.CPU_RECIPE_ITERS[detector] and int(without_amp) == h.CPU_RECIPE_ITERS_FLOAT32[detector]
    assert float(lr) == h.CPU_RECIPE_LR[detector]
    # The recipe fine-tunes the backbone's last stage (the constructor call in the cell).
    assert "tune_last_stage=USE_FEATURE_CACHE" in source
    # ... and the command line's defaults are that recipe too.
    args = h.build_parser().parse_args(["train", "--detector", detector])
    assert args.iters is None and args.cache_variants == ",".join(h.CPU_RECIPE_CACHE_VARIANTS)
    assert h.cpu_recipe_iters(detector, amp=True) == h.CPU_RECIPE_ITERS[detector]
    assert h.cpu_recipe_iters(detector, amp=False) == h.CPU_RECIPE_ITERS_FLOAT32[detector]


def test_cpu_recipe_length_follows_the_precision(monkeypatch):
    """The recipe is sized to a time budget: FCOS trains longer where bfloat16 hardware makes
    its steps cheap; amp=None asks this machine (default_amp on the CPU)."""
    import a5.cli

    assert h.cpu_recipe_iters("fcos", amp=True) > h.cpu_recipe_iters("fcos", amp=False)
    for fast, table in ((True, h.CPU_RECIPE_ITERS), (False, h.CPU_RECIPE_ITERS_FLOAT32)):
        monkeypatch.setattr(a5.cli, "default_amp", lambda device, fast=fast: fast)
        assert h.cpu_recipe_iters("fcos") == table["fcos"]
        # A detector without an entry gets the table's longest schedule.
        assert h.cpu_recipe_iters("my_detector") == max(table.values())

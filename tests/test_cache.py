"""Tests of a5/cache.py: the frozen-backbone feature cache (same computation as images, on-disk
key and refusals, exact resume from the cache).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import a5.cache
import a5_helper as h
from helpers import N_TRAIN, TinyDetector, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_cache_training_is_same_computation_as_images(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)
    h.reset_seed(0)
    det = TinyDetector(freeze_backbone=True, dropout=0.0)
    variants = ["orig", "flip", "jitter0"]
    cache = h.build_feature_cache(det, ds, variants=variants, storage_dtype=torch.float32, batch_size=4, progress=False)
    assert len(cache) == N_TRAIN and cache.num_variants == 3 and cache.image_size == (64, 64)
    det_img, det_feat = copy.deepcopy(det), copy.deepcopy(det)
    opt_img = torch.optim.SGD([p for p in det_img.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    opt_feat = torch.optim.SGD([p for p in det_feat.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    det_img.train(), det_feat.train()
    for step, (idx, var) in enumerate([([0, 3, 5], [0, 1, 2]), ([1, 2, 4], [1, 2, 0]), ([5, 0, 2], [2, 2, 1])]):
        _, feats, gt = cache.get_batch(idx, var)
        items = [ds.get_variant(i, variants[v]) for i, v in zip(idx, var)]
        images = torch.stack([it[1] for it in items])
        gt_img = torch.stack([it[2] for it in items])
        assert torch.equal(gt, gt_img)  # boxes transformed like the cached variant (flip!)
        losses_img, losses_feat = det_img(images, gt_img), det_feat(feats, gt)
        for k in losses_img:
            torch.testing.assert_close(losses_feat[k], losses_img[k], rtol=1e-5, atol=1e-6)
        for det_, opt_, losses in ((det_img, opt_img, losses_img), (det_feat, opt_feat, losses_feat)):
            opt_.zero_grad()
            sum(losses.values()).backward()
        for (n, a), (_, b) in zip(det_img.named_parameters(), det_feat.named_parameters()):
            if a.requires_grad:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=f"grad of {n}, step {step}")
        opt_img.step(), opt_feat.step()
    # A dataset item and the collate function give the same tensors as get_batch.
    path, item_feats, item_gt = cache.get_variant(2, 1)
    paths, batch_feats, batch_gt = h.collate_cached([cache.get_variant(2, 1), cache.get_variant(3, 0)])
    assert batch_feats["c3"].shape == (2, 6, 8, 8) and batch_feats["c5"].dtype == torch.float32
    assert torch.equal(batch_feats["c4"][0], item_feats["c4"]) and torch.equal(batch_gt[0], item_gt)


def test_feature_cache_on_disk_key_and_refusals(tiny_voc, tmp_path, capsys):
    ds = Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), [0, 2, 4])
    torch.manual_seed(0)
    det = TinyDetector(freeze_backbone=True)
    with pytest.raises(ValueError, match="frozen"):
        h.build_feature_cache(TinyDetector(freeze_backbone=False), ds, progress=False)
    cache_dir = tmp_path / "cache"
    c1 = h.build_feature_cache(det, ds, cache_dir=cache_dir, progress=False)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["complete"] and meta["key"]["backbone_name"] == "tiny" and meta["key"]["image_size"] == 64
    assert (cache_dir / "c3.npy").is_file() and np.load(cache_dir / "c3.npy", mmap_mode="r").dtype == np.float16
    c2 = h.build_feature_cache(det, ds, cache_dir=cache_dir, progress=True)
    assert "Loaded feature cache" in capsys.readouterr().out
    _, f1, g1 = c1.get_batch([0, 1, 2], [1, 0, 1])
    _, f2, g2 = c2.get_batch([0, 1, 2], [1, 0, 1])
    assert all(torch.equal(f1[k], f2[k]) for k in f1) and torch.equal(g1, g2)
    # Other weights: refused with a clear message, or rebuilt; never silently reused.
    other = TinyDetector(freeze_backbone=True)
    with pytest.raises(RuntimeError, match="weights_hash"):
        h.build_feature_cache(other, ds, cache_dir=cache_dir, progress=False, on_mismatch="error")
    c3 = h.build_feature_cache(other, ds, cache_dir=cache_dir, progress=False)
    assert "rebuilding" in capsys.readouterr().out
    assert not torch.equal(c3.get_batch([0], [0])[1]["c3"], f1["c3"][1:2])
    # Another image size or variant list changes the key too.
    with pytest.raises(RuntimeError, match="image_size"):
        h.build_feature_cache(other, Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=96), [0, 2, 4]),
                              cache_dir=cache_dir, progress=False, on_mismatch="error")
    # An interrupted build (no "complete" marker) is rebuilt, not used.
    (cache_dir / "meta.json").write_text(json.dumps({"key": meta["key"], "complete": False}))
    with pytest.raises(RuntimeError, match="incomplete"):
        h.build_feature_cache(other, ds, cache_dir=cache_dir, progress=False, on_mismatch="error")


def test_train_detector_from_cache_resumes_exactly(tiny_voc, tmp_path):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)
    h.reset_seed(0)
    det = TinyDetector(freeze_backbone=True)
    cache = h.build_feature_cache(det, ds, progress=False)
    loader = DataLoader(cache, batch_size=4, shuffle=True, collate_fn=h.collate_cached)
    kwargs = dict(learning_rate=0.05, max_iters=6, warmup_iters=1, checkpoint_period=2, progress=False, seed=1)
    h.reset_seed(1)
    full = h.train_detector(copy.deepcopy(det), loader, checkpoint_dir=tmp_path / "a", **kwargs)
    h.reset_seed(1)
    crashing = copy.deepcopy(det)
    crashing.fail_at = 6  # crash in iteration 5, after the checkpoint of iteration 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        h.train_detector(crashing, loader, checkpoint_dir=tmp_path / "b", **kwargs)
    resumed = h.train_detector(copy.deepcopy(det), loader, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert resumed["total_loss"] == full["total_loss"]
    # and the frozen backbone did not change
    for (n, a), (_, b) in zip(det.backbone.backbone.named_parameters(), det.backbone.backbone.named_parameters()):
        assert torch.equal(a, b)


def test_cacheable_backbone_protocol():
    det = TinyDetector(freeze_backbone=True)
    assert isinstance(det.backbone, a5.cache.CacheableBackbone)
    assert a5.cache._backbone_of(det) is det.backbone and a5.cache._backbone_of(det.backbone) is det.backbone
    with pytest.raises(TypeError, match="extract_features"):
        a5.cache._backbone_of(torch.nn.Linear(2, 2))
    # The trained layers on top of the cached features do not change the cache key.
    before = h.backbone_state_hash(det.backbone)
    with torch.no_grad():
        next(p for n, p in det.backbone.named_parameters() if n.startswith(a5.cache.TRAINED_PREFIXES)).add_(1.0)
    assert h.backbone_state_hash(det.backbone) == before


def test_cache_key_ignores_a_last_stage_being_fine_tuned():
    import fcos

    tuned = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                         tune_last_stage=True)
    frozen = copy.deepcopy(tuned)
    frozen.tune_last_stage = False
    frozen.requires_grad_(False)
    before = (h.backbone_state_hash(tuned), h.backbone_state_hash(frozen))
    with torch.no_grad():
        for module in (tuned, frozen):
            next(p for p in module.last_stage().parameters() if p.dim() == 4).add_(1.0)
    assert h.backbone_state_hash(tuned) == before[0], "the stage trained on top of the cache is not its key"
    assert h.backbone_state_hash(frozen) != before[1], "a frozen last stage computes the cached c5: part of the key"


def test_cache_builds_for_a_backbone_whose_last_stage_trains(tiny_voc):
    """The CPU recipe: a frozen backbone whose last stage is fine-tuned builds its cache (only
    c4 feeds the stage); a backbone that trains elsewhere is still refused."""
    import fcos

    torch.manual_seed(0)
    tuned = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                         tune_last_stage=True)
    ds = Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), [0, 1])
    cache = h.build_feature_cache(tuned, ds, variants=("orig",), progress=False)
    _, feats, _ = cache.get_batch([0, 1], [0, 0])
    with torch.no_grad():
        images = torch.stack([ds[i][1] for i in range(2)])
        expected = tuned.extract_features(images)
    assert torch.allclose(feats["c4"], expected["c4"].float(), atol=1e-2)
    unfrozen = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    unfrozen.backbone.get_submodule("features.0").requires_grad_(True)
    with pytest.raises(ValueError, match="frozen backbone"):
        h.build_feature_cache(unfrozen, ds, variants=("orig",), progress=False)


def test_folded_inference_follows_the_trained_last_stage():
    """extract_features in eval mode (BatchNorm folded) gives the c5 of the stage as trained,
    without refolding the CNN at every training step."""
    import fcos

    torch.manual_seed(0)
    model = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                         tune_last_stage=True)
    images = torch.randn(1, 3, 64, 64)
    model.extract_features(images)
    folded = model._folded_backbone()
    with torch.no_grad():
        next(p for p in model.last_stage().parameters() if p.dim() == 4).mul_(2.0)  # "a training step"
        feats = model.extract_features(images)
        assert model._folded_backbone() is folded, "no refold for a change of the stage being trained"
        assert torch.allclose(feats["c5"], model.last_stage()(feats["c4"]), atol=1e-5)


def test_cache_of_a_tuned_backbone_leaves_out_c5(tiny_voc, tmp_path, capsys):
    """A backbone that fine-tunes its last stage recomputes c5 from c4 at every step, so its
    cache stores c3 and c4 only (memory, disk, build time); the FPN outputs are those of
    the images, c5 included; an explicit `levels` overrides the default, within reason."""
    import fcos

    torch.manual_seed(0)
    tuned = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                         tune_last_stage=True)
    ds = Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), [0, 1, 2])
    assert h.cached_levels(tuned) == ("c3", "c4") and h.cached_levels(copy.deepcopy(tuned).eval()) == ("c3", "c4")
    cache = h.build_feature_cache(tuned, ds, variants=("orig", "flip"), storage_dtype=torch.float32,
                                  cache_dir=tmp_path / "c", progress=False)
    assert cache.levels == ("c3", "c4") and not (tmp_path / "c" / "c5.npy").exists()
    _, feats, _ = cache.get_batch([0, 2], [1, 0])
    assert set(feats) == {"c3", "c4"}
    base = ds.dataset
    images = torch.stack([base.get_variant(0, "flip")[1], base.get_variant(2, "orig")[1]])
    tuned.train()
    from_cache, from_images = tuned(feats), tuned(images)
    for level in ("p3", "p4", "p5"):  # both ran the BatchNorm-folded trunk and the live stage
        torch.testing.assert_close(from_cache[level], from_images[level], rtol=1e-5, atol=1e-6)
    # Reloaded from disk with the same key; a cache of every level is a different key.
    again = h.build_feature_cache(tuned, ds, variants=("orig", "flip"), storage_dtype=torch.float32,
                                  cache_dir=tmp_path / "c", progress=True)
    assert "Loaded feature cache" in capsys.readouterr().out and again.levels == ("c3", "c4")
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["key"]["levels"] == ["c3", "c4"]
    with pytest.raises(RuntimeError, match="levels"):
        h.build_feature_cache(tuned, ds, variants=("orig", "flip"), storage_dtype=torch.float32,
                              cache_dir=tmp_path / "c", progress=False, on_mismatch="error",
                              levels=("c5", "c4", "c3"))
    full = h.build_feature_cache(tuned, ds, variants=("orig",), progress=False, levels=("c5", "c4", "c3"))
    assert full.levels == ("c3", "c4", "c5") and "levels" not in full.meta["key"]  # keys of older caches
    # A frozen last stage needs its c5 cached; unknown levels are refused.
    frozen = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    assert h.cached_levels(frozen) == ("c3", "c4", "c5")
    for levels in (("c3", "c4"), ("c3", "c4", "c5", "c6")):
        with pytest.raises(ValueError, match="levels must hold c3, c4"):
            h.build_feature_cache(frozen, ds, variants=("orig",), progress=False, levels=levels)
    with pytest.raises(ValueError, match="no 'c5'"):
        frozen(feats)


def test_cache_size_estimate_counts_the_stored_levels():
    import fcos
    from a5.cli import _feature_cache_bytes

    kwargs = dict(backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    full = _feature_cache_bytes(fcos.DetectorBackboneWithFPN(8, **kwargs), 64, 10)
    tuned = _feature_cache_bytes(fcos.DetectorBackboneWithFPN(8, tune_last_stage=True, **kwargs), 64, 10)
    # MobileNetV2: c3 32 x 8 x 8, c4 96 x 4 x 4, c5 1280 x 2 x 2 at 64 px, fp16, plus the boxes.
    assert full == 10 * ((32 * 64 + 96 * 16 + 1280 * 4) * 2 + 800)
    assert tuned == 10 * ((32 * 64 + 96 * 16) * 2 + 800)


def test_rebuilt_cache_writes_new_files_and_drops_stale_levels(tiny_voc, tmp_path):
    """A cache rebuilt in place (here: a full one replaced by a tuned backbone's c3/c4 cache)
    writes new files, so a reader that still maps the old ones keeps its data, and leaves
    no c5.npy behind."""
    import fcos

    torch.manual_seed(0)
    ds = Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), [0, 1])
    frozen = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    old = h.build_feature_cache(frozen, ds, variants=("orig",), cache_dir=tmp_path / "c", progress=False)
    old_c3 = np.array(old.features["c3"])
    assert (tmp_path / "c" / "c5.npy").is_file()
    tuned = fcos.DetectorBackboneWithFPN(8, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True,
                                         tune_last_stage=True)
    with torch.no_grad():
        for p in tuned.backbone.parameters():
            p.mul_(0.5)  # other weights: other features
    new = h.build_feature_cache(tuned, ds, variants=("orig",), cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "c5.npy").exists() and new.levels == ("c3", "c4")
    assert np.array_equal(np.array(old.features["c3"]), old_c3), "the old reader's map was overwritten"
    assert not np.array_equal(np.array(new.features["c3"]), old_c3)

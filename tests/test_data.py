"""Tests of a5/data.py: the dataset (both formats), transforms, validation, download.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time

import pytest
import torch

import a5.data
import a5_helper as h
from helpers import CLASS_COLORS, N_TRAIN, _image_spec, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


@pytest.mark.parametrize("fmt", ["voc", "json"])
def test_dataset_formats(tiny_voc, fmt):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64, annotation_format=fmt, augment=False)
    assert ds.annotation_format == fmt and len(ds) == N_TRAIN
    assert len(ds.idx_to_class) == 20 and ds.idx_to_class[6] == "car" and ds.class_to_idx["tvmonitor"] == 19
    path, image, gt = ds[0]
    assert path.endswith("000001.jpg") and os.path.isfile(path)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert gt.shape == (40, 5)
    for i in range(len(ds)):
        _, _, gt = ds[i]
        _, _, objs = _image_spec(i + 1)
        kept = [o for o in objs if not o[2]]
        assert (gt[:, 4] >= 0).sum() == len(kept)
        assert (gt[len(kept):] == -1).all()  # padding rows
        assert sorted(gt[: len(kept), 4].tolist()) == sorted(float(ds.class_to_idx[c]) for c, _, _ in kept)
        anns = ds.get_annotation(i)
        if fmt == "voc":  # difficult flags are kept (for evaluation)
            assert [(c, b, d) for c, b, d in anns] == [(c, b, d) for c, b, d in objs]
        else:  # the course files list non-difficult objects only
            assert all(not d for _, _, d in anns) and len(anns) == len(kept)
    with_difficult = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64, annotation_format="voc",
                                            augment=False, use_difficult=True)
    assert (with_difficult[2][2][:, 4] >= 0).sum() == 2  # image 3 has a difficult bird


def test_auto_format_and_missing_data_message(tiny_voc, tmp_path):
    assert h.VOC2007DetectionTiny(tiny_voc, "val").annotation_format == "voc"
    only_json = tmp_path / "only_json"
    shutil.copytree(tiny_voc, only_json, ignore=shutil.ignore_patterns("Annotations", "ImageSets"))
    assert h.VOC2007DetectionTiny(only_json, "val").annotation_format == "json"
    with pytest.raises(FileNotFoundError, match="VOC_ROOT"):
        h.VOC2007DetectionTiny(tmp_path / "nothing_here", "train")


def test_eval_transform_keeps_every_object_and_maps_back(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    assert not ds.augment  # val uses the evaluation transform by default
    for i in range(len(ds)):
        _, image, gt = ds[i]
        W, H, objs = _image_spec(N_TRAIN + 1 + i)
        kept = [o for o in objs if not o[2]]
        valid = gt[gt[:, 4] >= 0]
        assert len(valid) == len(kept)  # nothing dropped, even objects touching the border
        back = ds.boxes_to_original(valid, i)
        expected = torch.tensor([b for _, b, _ in kept]).reshape(-1, 4)
        assert torch.allclose(back, expected, atol=1e-3)  # nothing clipped, exact inverse
        assert ds.original_size(i) == (W, H)


def _colour_at(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    rgb = h.unnormalize_image(image) * 255
    return rgb[:, int(y), int(x)]


def test_train_transform_keeps_boxes_on_their_objects(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64, min_scale=0.6)
    assert ds.augment
    torch.manual_seed(0)
    checked = 0
    for _ in range(6):
        for i in range(len(ds)):
            _, image, gt = ds[i]
            for x1, y1, x2, y2, c in gt[gt[:, 4] >= 0].tolist():
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
                color = torch.tensor(CLASS_COLORS[ds.idx_to_class[int(c)]], dtype=torch.float32)
                assert (_colour_at(image, (x1 + x2) / 2, (y1 + y2) / 2) - color).abs().max() < 60
                checked += 1
    assert checked > 30


def test_flip_variant_mirrors_pixels_and_boxes(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)
    _, orig, gt = ds.get_variant(1, "orig")
    _, flip, gt_f = ds.get_variant(1, "flip")
    assert torch.equal(flip, orig.flip(-1))
    valid = gt[:, 4] >= 0
    assert torch.allclose(gt_f[valid][:, [0, 2]], 64 - gt[valid][:, [2, 0]])
    assert torch.equal(gt_f[valid][:, [1, 3, 4]], gt[valid][:, [1, 3, 4]])
    _, orig_eval, _ = ds.eval_copy()[1]
    assert torch.equal(orig, orig_eval)
    _, j1, g1 = ds.get_variant(1, "jitter0")
    _, j2, g2 = ds.get_variant(1, "jitter0")
    assert torch.equal(j1, j2) and torch.equal(g1, g2)  # deterministic
    with pytest.raises(ValueError):
        ds.get_variant(0, "rotate")


def test_missing_or_corrupt_files_are_named(tiny_voc, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_voc, root)
    jpeg = root / "VOCdevkit/VOC2007/JPEGImages/000002.jpg"
    jpeg.write_bytes(b"this is not a jpeg")
    ds = h.VOC2007DetectionTiny(root, "train", image_size=64)
    with pytest.raises(RuntimeError, match="000002.jpg"):
        ds[1]
    jpeg.write_bytes((tiny_voc / "VOCdevkit/VOC2007/JPEGImages/000002.jpg").read_bytes()[:300])  # truncated
    with pytest.raises(RuntimeError, match="000002.jpg"):
        ds[1]
    jpeg.unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        h.VOC2007DetectionTiny(root, "train", image_size=64)
    shutil.copy(tiny_voc / "VOCdevkit/VOC2007/JPEGImages/000002.jpg", jpeg)
    (root / "VOCdevkit/VOC2007/Annotations/000003.xml").write_text("<annotation><object>")
    with pytest.raises(RuntimeError, match="000003.xml"):
        h.VOC2007DetectionTiny(root, "train", image_size=64)
    (root / "VOCdevkit/VOC2007/Annotations/000003.xml").unlink()
    with pytest.raises(FileNotFoundError, match="000003.xml"):
        h.VOC2007DetectionTiny(root, "train", image_size=64)
    (root / "voc07_val.json").write_text("[[")
    with pytest.raises(RuntimeError, match="voc07_val.json"):
        h.VOC2007DetectionTiny(root, "val", annotation_format="json")


def test_download_fails_fast_offline_and_verifies_checksum(tiny_voc, tmp_path, monkeypatch):
    offline = {"urls": ["http://127.0.0.1:9/VOCtrainval.tar"], "filename": "VOCtrainval.tar", "md5": "0" * 32}
    monkeypatch.setattr(a5.data, "VOC2007_DOWNLOAD", offline)
    start = time.time()
    with pytest.raises(RuntimeError, match="VOC_ROOT") as err:
        h.VOC2007DetectionTiny(tmp_path / "dl0", "train", download=True)
    assert "VOCdevkit/VOC2007/JPEGImages" in str(err.value) and time.time() - start < 15

    archive = tmp_path / "VOCtrainval.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_voc / "VOCdevkit", arcname="VOCdevkit")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    bad = {"urls": [archive.as_uri()], "filename": "VOCtrainval.tar", "md5": "f" * 32}
    monkeypatch.setattr(a5.data, "VOC2007_DOWNLOAD", bad)
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        h.VOC2007DetectionTiny(tmp_path / "dl1", "train", download=True)
    assert not (tmp_path / "dl1" / "VOCtrainval.tar").exists()
    good = {"urls": [archive.as_uri()], "filename": "VOCtrainval.tar", "md5": md5}
    monkeypatch.setattr(a5.data, "VOC2007_DOWNLOAD", good)
    ds = h.VOC2007DetectionTiny(tmp_path / "dl2", "train", download=True, image_size=64)
    assert len(ds) == N_TRAIN and ds.annotation_format == "voc"


def test_infinite_loader():
    stream = h.infinite_loader([1, 2, 3])
    assert [next(stream) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]


def test_real_voc_split_sizes(voc_root):
    for fmt in ("voc", "json"):
        train = h.VOC2007DetectionTiny(voc_root, "train", annotation_format=fmt)
        val = h.VOC2007DetectionTiny(voc_root, "val", annotation_format=fmt)
        assert (len(train), len(val)) == (2500, 2508)
    path, image, gt = val[0]
    assert image.shape == (3, 224, 224) and gt.shape == (40, 5)
    voc_val = h.VOC2007DetectionTiny(voc_root, "val")
    n_difficult = sum(d for i in range(len(voc_val)) for _, _, d in voc_val.get_annotation(i))
    assert n_difficult > 0  # the VOCdevkit copy keeps difficult flags
    assert len(voc_val.get_annotation(0)) >= len(val.get_annotation(0))

"""Tests of a5/plots.py: pictures saved as PNG, headless plots, `inference_with_detector`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import a5_helper as h
from a5.plots import _NON_INTERACTIVE
from helpers import ColorOracle, N_TRAIN, _image_spec, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_inference_with_detector_writes_every_image(tiny_voc, tmp_path):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    loader = DataLoader(ds, batch_size=2)
    h.inference_with_detector(ColorOracle(["car", "bird"]), loader, ds.idx_to_class, 0.5, 0.5, output_dir=tmp_path)
    det_files = sorted((tmp_path / "detection-results").glob("*.txt"))
    gt_files = sorted((tmp_path / "ground-truth").glob("*.txt"))
    assert [f.name for f in det_files] == [f.name for f in gt_files] == [f"{i:06d}.txt" for i in range(7, 11)]
    for i, (fd, fg) in enumerate(zip(det_files, gt_files)):
        W, H, objs = _image_spec(N_TRAIN + 1 + i)
        gt_lines = fg.read_text().splitlines()
        assert len(gt_lines) == len(objs)
        for line, (c, b, d) in zip(gt_lines, objs):
            parts = line.split()
            assert parts[0] == c and [float(v) for v in parts[1:5]] == pytest.approx(b, abs=0.01)
            assert (parts[-1] == "difficult") == d
        for line in fd.read_text().splitlines():
            name, score, *box = line.split()
            assert name in ("car", "bird") and float(score) == pytest.approx(0.9)
            match = [o for o in objs if o[0] == name][0][1]
            assert [float(v) for v in box] == pytest.approx(match, abs=W / 64 + 0.01)  # original pixels
    assert (tmp_path / "detection-results" / "000010.txt").read_text() == ""  # empty image still written


def test_pictures_are_saved_as_png(tiny_voc, tmp_path):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    _, image, gt = ds[0]
    pred = torch.tensor([[5.0, 5.0, 30.0, 40.0, 6.0, 0.87]])
    path = h.detection_visualizer(h.unnormalize_image(image), ds.idx_to_class, gt[gt[:, 4] >= 0], pred,
                                  points=[[8, 8], [16, 16]], save_path=tmp_path / "det.png")
    history = {"iteration": list(range(30)), "total_loss": list(np.linspace(3, 1, 30)),
               "loss_cls": list(np.linspace(2, 0.5, 30)), "lr": [0.01] * 30}
    h.plot_loss_history(history, window=5, save_path=tmp_path / "loss.png")
    res = h.compute_voc_map({"a": [("car", [0, 0, 9, 9], False)]}, [("a", "car", 0.9, [0, 0, 9, 9])],
                            h.VOC_CLASSES, return_curves=True)
    h.plot_per_class_ap(res["per_class"], save_path=tmp_path / "ap.png")
    h.plot_pr_curves(res["curves"], save_path=tmp_path / "pr.png", per_class_ap=res["per_class"])
    for name in ("det.png", "loss.png", "ap.png", "pr.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert path == tmp_path / "det.png"
    smooth = h.smooth_curve([0, 10, 0, 10], window=2)
    assert smooth.tolist() == [0, 5, 5, 5]


def test_headless_plot_without_path_is_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("A5_PLOT_DIR", str(tmp_path))
    import matplotlib

    if matplotlib.get_backend().lower() not in _NON_INTERACTIVE:
        pytest.skip("a display backend is active")
    path = h.plot_loss_history([3.0, 2.0, 1.5, 1.2])
    assert path is not None and path.parent == tmp_path and path.is_file()

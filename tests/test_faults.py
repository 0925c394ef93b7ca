"""Fault injection: what a user gets after a NaN, a crash, a changed or corrupt dataset or
cache, bad command-line numbers, unsafe or broken checkpoint files, and odd API inputs.

Each test builds tiny synthetic data and models (seconds each) and checks that the fault
is reported with the name of the file, option, iteration or image concerned, and that
nothing good is lost or silently replaced.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import a5_helper as h
from test_a5_helper import TinyDetector, _write_xml, make_tiny_voc

pytestmark = pytest.mark.part("provided")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    """A fresh generated VOC folder per test (tests here modify it)."""
    return make_tiny_voc(tmp_path / "voc")


# --------------------------------------------------------------------------------------
# VOC07 11-point AP: the devkit's np.arange thresholds
# --------------------------------------------------------------------------------------


def test_voc07_11_point_uses_devkit_thresholds():
    # 10 positives; 3 hits (recall reaches exactly 0.3), 7 misses, then a 4th hit.
    gts = {f"i{k}": [("car", [0, 0, 10, 10], False)] for k in range(10)}
    dets = [(f"i{k}", "car", 1.0 - 0.01 * k, [0, 0, 10, 10]) for k in range(3)]
    dets += [("i0", "car", 0.9 - 0.01 * k, [50, 50, 60, 60]) for k in range(7)]
    dets += [("i3", "car", 0.5, [0, 0, 10, 10])]
    devkit = h.compute_voc_map(gts, dets, ["car"], use_07_metric=True)["mAP"]
    # The devkit's own loop (VOCdevkit / py-faster-rcnn voc_eval.voc_ap):
    rec = np.array([0.1, 0.2, 0.3] + [0.3] * 7 + [0.4])
    prec = np.array([1, 1, 1] + [3 / (4 + k) for k in range(7)] + [4 / 11])
    expected = sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0.0) / 11.0 for t in np.arange(0.0, 1.1, 0.1))
    assert devkit == pytest.approx(expected, abs=1e-12)
    assert devkit == pytest.approx((3 + 2 * 4 / 11) / 11)
    exact = h.compute_voc_map(gts, dets, ["car"], use_07_metric=True, exact_tenths=True)["mAP"]
    assert exact == pytest.approx((4 + 4 / 11) / 11)

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


# --------------------------------------------------------------------------------------
# NaN: roll back to the last good checkpoint, name the batch, optionally skip it
# --------------------------------------------------------------------------------------


class Runaway(torch.nn.Module):
    """Loss -p pushes the parameter p up by about lr per step; once p > limit the loss
    is NaN. The NaN comes from the *state*, so resuming the state just before it fails
    again at once, whatever the learning rate; an earlier state with a lower rate does
    not. Images with NaN pixels (poisoned input) also give a NaN loss."""

    def __init__(self, limit: float = 3.0):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.limit = limit

    def forward(self, images, gt_boxes=None):
        loss = -self.p + 0.0 * images.mean()
        loss = torch.where(self.p.detach() > self.limit, torch.full_like(loss, float("nan")), loss)
        return {"loss_run": loss}


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n=8, poison=()):
        self.n, self.poison = n, set(poison)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.zeros(3, 8, 8)
        if i in self.poison:
            image[0, 0, 0] = float("nan")
        return f"img{i}.jpg", image, torch.full((40, 5), -1.0)


def _train(det, ds, out, **kw):
    args = dict(learning_rate=1.0, momentum=0.0, weight_decay=0.0, warmup_iters=0, max_iters=12, log_period=100,
                checkpoint_period=2, progress=False, seed=0, lr_schedule="step", grad_clip=None)
    args.update(kw)
    loader = DataLoader(ds, batch_size=2, shuffle=False)
    return h.train_detector(det, loader, checkpoint_dir=out, **args)


def test_nan_rolls_back_to_last_good_checkpoint_and_resume_with_lower_lr_works(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        _train(Runaway(3.0), Pixels(), tmp_path)  # p = 1, 2, 3, 4 -> NaN at iteration 4
    message = str(err.value)
    assert "iteration 4" in message and "img0.jpg" in message and "iteration 2" in message
    ckpt = h.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and float(ckpt["model"]["p"]) == pytest.approx(2.0)
    # The earlier good checkpoint was not overwritten by the bad state.
    assert float(h.load_checkpoint(tmp_path / "ckpt_0000002.pt")["model"]["p"]) == pytest.approx(2.0)
    # Resuming with a lower learning rate now gets past iteration 4 and finishes.
    det = Runaway(3.0)
    history = _train(det, Pixels(), tmp_path, resume=True, learning_rate=0.01)
    assert history["iteration"][-1] == 11 and all(math.isfinite(v) for v in history["total_loss"])
    assert h.load_checkpoint(tmp_path / "last.pt")["iteration"] == 12


def test_nan_from_poisoned_images_names_them_and_can_be_skipped(tmp_path):
    with pytest.raises(FloatingPointError, match=r"iteration 2.*img4\.jpg, img5\.jpg"):
        _train(Runaway(1e9), Pixels(poison=[5]), tmp_path / "a", learning_rate=0.1)
    with pytest.warns(UserWarning, match=r"iteration 2.*img4\.jpg, img5\.jpg"):
        history = _train(Runaway(1e9), Pixels(poison=[5]), tmp_path / "b", learning_rate=0.1, skip_nonfinite=1,
                         max_iters=6)
    assert history["skipped"] == [{"iteration": 2, "images": ["img4.jpg", "img5.jpg"]}]
    assert history["iteration"] == [0, 1, 3, 4, 5]
    assert h.load_checkpoint(tmp_path / "b" / "last.pt")["history"]["skipped"] == history["skipped"]
    assert all(math.isfinite(v) for v in history["total_loss"])
    # The skip budget is a limit: a second bad batch (epoch 2) stops training.
    with pytest.raises(FloatingPointError, match="iteration 6"):
        _train(Runaway(1e9), Pixels(poison=[5]), tmp_path / "c", learning_rate=0.1, skip_nonfinite=1)


class InfGrad(torch.nn.Module):
    """A finite loss whose gradient is NaN at iteration 3 (sqrt at 0)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images, gt_boxes=None):
        self.calls += 1
        x = self.w * 0.0 if self.calls == 4 else self.w + 1.0
        return {"loss": torch.sqrt(x.abs()) + 0.0 * images.mean()}


def test_nonfinite_gradient_is_caught_before_it_poisons_the_weights(tmp_path):
    det = InfGrad()
    with pytest.raises(FloatingPointError, match=r"gradient.*iteration 3"):
        _train(det, Pixels(), tmp_path, learning_rate=0.01)
    assert torch.isfinite(det.w).all()  # the bad step was not applied
    assert h.load_checkpoint(tmp_path / "last.pt")["iteration"] == 2


class BrokenBuffer(Runaway):
    """A finite loss, but a statistics buffer turns NaN at the 3rd call (like a
    BatchNorm running mean fed an overflow)."""

    def __init__(self):
        super().__init__(1e9)
        self.register_buffer("stat", torch.zeros(()))
        self.calls = 0

    def forward(self, images, gt_boxes=None):
        self.calls += 1
        if self.calls == 3:
            self.stat.fill_(float("nan"))
        return super().forward(images, gt_boxes)


def test_state_with_nonfinite_weights_is_never_saved(tmp_path):
    with pytest.warns(UserWarning, match=r"Not saving the checkpoint of iteration 4.*stat"):
        _train(BrokenBuffer(), Pixels(), tmp_path, max_iters=4, learning_rate=0.1)
    last = h.load_checkpoint(tmp_path / "last.pt")
    assert last["iteration"] == 2 and torch.isfinite(last["model"]["stat"])
    assert not (tmp_path / "ckpt_0000004.pt").exists()


def test_checkpoints_rotate_and_a_new_run_does_not_touch_old_ones(tmp_path):
    _train(Runaway(1e9), Pixels(), tmp_path, max_iters=10, learning_rate=0.1, keep_checkpoints=2)
    assert [i for i, _ in h.numbered_checkpoints(tmp_path)] == [8, 10]
    before = (tmp_path / "ckpt_0000008.pt").read_bytes()
    # A NaN in a later, unrelated run (no resume) in the same folder rolls nothing of the
    # old run back or aside.
    with pytest.raises(FloatingPointError, match="no good checkpoint"):
        _train(Runaway(-1.0), Pixels(), tmp_path, max_iters=4, learning_rate=0.1)
    assert (tmp_path / "ckpt_0000008.pt").read_bytes() == before
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _train(Runaway(1e9), Pixels(), tmp_path / "x", keep_checkpoints=0)

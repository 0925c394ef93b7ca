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
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import a5_helper as h
from a5.cache import _check_cache_files
from a5.training import _rng_state, _set_rng_state
from helpers import TinyDetector, _write_xml, make_tiny_voc, one_thread, tiny_builder  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


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


# --------------------------------------------------------------------------------------
# Command line: every number is checked by argparse, with the option's name
# --------------------------------------------------------------------------------------


def _common(voc):
    return ["--data-dir", str(voc), "--num-workers", "0", "--no-progress", "--device", "cpu"]


def _train_args(voc, out, *extra):
    return ["train", "--detector", "tiny", "--iters", "2", "--batch-size", "2", "--image-size", "64",
            "--out", str(out), "--max-val-images", "2", "--checkpoint-period", "1", *_common(voc), *extra]


@pytest.mark.parametrize("option, value", [
    ("--iters", "-5"), ("--iters", "0"), ("--checkpoint-period", "0"), ("--log-period", "0"),
    ("--image-size", "0"), ("--image-size", "100"), ("--cache-variants", ","), ("--cache-variants", "orig,blur"),
    ("--max-train-images", "0"), ("--max-val-images", "0"), ("--batch-size", "0"), ("--lr", "-1"),
    ("--lr", "nan"), ("--grad-clip", "-1"), ("--num-workers", "-1"), ("--score-thresh", "1.5"),
    ("--stem-channels", "64,0"), ("--warmup-iters", "-1"), ("--skip-nonfinite", "-1"), ("--keep-checkpoints", "0"),
])
def test_cli_rejects_bad_numbers_naming_the_option(tiny_voc, tmp_path, capsys, tiny_builder, option, value):
    with pytest.raises(SystemExit) as exc:
        h.main(_train_args(tiny_voc, tmp_path / "run", option, value))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and any(w in err for w in ("must be", "expected", "unknown variant"))
    assert not (tmp_path / "run").exists()


def test_cli_eval_and_predict_reject_bad_numbers(tmp_path, capsys):
    for argv in (["eval", "--checkpoint", "x.pt", "--batch-size", "0"],
                 ["predict", "--checkpoint", "x.pt", "a.jpg", "--score-thresh", "-0.1"]):
        with pytest.raises(SystemExit):
            h.main(argv)
        assert "argument --" in capsys.readouterr().err


def test_no_pretrained_frozen_backbone_warns(tiny_voc, tmp_path, tiny_builder):
    with pytest.warns(UserWarning, match="no-pretrained.*frozen"):
        assert h.main(_train_args(tiny_voc, tmp_path / "r", "--no-pretrained", "--frozen-backbone")) == 0


# --------------------------------------------------------------------------------------
# Run folders: --resume checks the settings; an existing run is never overwritten silently
# --------------------------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_shows_the_difference(tiny_voc, tmp_path, tiny_builder, capsys,
                                                                 monkeypatch):
    out = tmp_path / "run"
    assert h.main(_train_args(tiny_voc, out)) == 0
    stamp = (out / "last.pt").read_bytes()
    monkeypatch.setitem(h.DETECTOR_BUILDERS, "tiny2", h.DETECTOR_BUILDERS["tiny"])
    for change, shown in ((["--detector", "tiny2"], "detector: 'tiny' -> 'tiny2'"),
                          (["--image-size", "96"], "image_size: 64 -> 96"),
                          (["--max-train-images", "3"], "max_train_images: None -> 3")):
        args = _train_args(tiny_voc, out, "--resume", "--iters", "3")
        args = [a for a in args] + change
        with pytest.raises(SystemExit) as exc:
            h.main(args)
        assert shown in str(exc.value) and "--allow-changed-settings" in str(exc.value)
        assert (out / "last.pt").read_bytes() == stamp  # nothing touched
    # Told otherwise: the stored model continues with the new data, and the record says so.
    assert h.main(_train_args(tiny_voc, out, "--resume", "--iters", "3", "--image-size", "96",
                              "--allow-changed-settings")) == 0
    summary = (out / "summary.txt").read_text()
    assert "image_size: 64 -> 96" in summary and "image size 96" in summary
    assert h.load_checkpoint(out / "last.pt")["config"]["image_size"] == 96
    assert json.loads((out / "run.json").read_text())["changed_settings"] == ["image_size: 64 -> 96"]


def test_train_into_existing_run_refuses_without_resume_or_overwrite(tiny_voc, tmp_path, tiny_builder, capsys):
    out = tmp_path / "run"
    assert h.main(_train_args(tiny_voc, out)) == 0
    final = (out / "model_final.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        h.main(_train_args(tiny_voc, out, "--seed", "5"))
    assert "already holds a run" in str(exc.value) and "--overwrite" in str(exc.value)
    assert (out / "model_final.pt").read_bytes() == final
    assert h.main(_train_args(tiny_voc, out, "--seed", "5", "--overwrite")) == 0
    assert (out / "model_final.pt").read_bytes() != final
    assert h.load_checkpoint(out / "last.pt")["seed"] == 5


def test_cli_skip_nonfinite_and_keep_checkpoints_reach_the_loop(tiny_voc, tmp_path, monkeypatch):
    def nan_once(**kw):
        det = TinyDetector(num_classes=kw.get("num_classes", 20), freeze_backbone=kw.get("freeze_backbone", False))
        det.nan_at = 2
        return det

    monkeypatch.setitem(h.DETECTOR_BUILDERS, "tiny", nan_once)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="iteration 1"):
        assert h.main(_train_args(tiny_voc, out, "--iters", "4", "--skip-nonfinite", "1",
                                  "--keep-checkpoints", "2")) == 0
    assert [i for i, _ in h.numbered_checkpoints(out)] == [3, 4]
    assert "skipped non-finite batches at iterations [1]" in (out / "summary.txt").read_text()


# --------------------------------------------------------------------------------------
# Checkpoint files: loaded safely (weights_only), bad files named
# --------------------------------------------------------------------------------------


class Boom:
    """Unpickling this runs code (here it only writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": {"detector": "tiny"}, "payload": Boom(marker)}, tmp_path / "evil.pt")
    with pytest.raises(h.CheckpointError, match=r"evil\.pt.*arbitrary unpickling.*trust"):
        h.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    h.load_checkpoint(tmp_path / "evil.pt", trusted=True)  # the user said they trust it
    assert marker.exists()


def test_training_checkpoints_load_with_weights_only(tmp_path):
    _train(Runaway(1e9), Pixels(), tmp_path, max_iters=2, learning_rate=0.1)
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # RNG states, history, config: all safe types
    assert state["iteration"] == 2 and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    np.random.seed(3)
    before = _rng_state()
    a = np.random.rand(3)
    _set_rng_state(before)
    assert np.array_equal(a, np.random.rand(3))


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"), (b"hello, not a checkpoint\n", "not a PyTorch checkpoint"), ("truncated", "not a PyTorch checkpoint"),
    ("tensor", "not a checkpoint of this project"),
])
def test_bad_checkpoint_files_are_named(tmp_path, capsys, content, expected):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(h.CheckpointError, match=expected) as err:
        h.load_checkpoint(path)
    assert str(path) in str(err.value)
    assert h.main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err_text = capsys.readouterr().err
    assert str(path) in err_text and expected in err_text


def test_eval_refuses_unsafe_checkpoint_unless_trusted(tiny_voc, tmp_path, tiny_builder, capsys):
    out = tmp_path / "run"
    assert h.main(_train_args(tiny_voc, out)) == 0
    state = torch.load(out / "model_final.pt", weights_only=True)
    state["extra"] = np.float64(1.0)  # a NumPy scalar needs the full unpickler
    torch.save(state, tmp_path / "old.pt")
    eval_args = ["eval", "--checkpoint", str(tmp_path / "old.pt"), "--max-val-images", "2", *_common(tiny_voc)]
    assert h.main(eval_args) == 2
    assert "arbitrary unpickling" in capsys.readouterr().err
    assert h.main(eval_args + ["--trust-checkpoint"]) == 0


# --------------------------------------------------------------------------------------
# predict: an unreadable file is skipped with a warning, the others get their results
# --------------------------------------------------------------------------------------


def test_predict_skips_unreadable_files_and_writes_the_rest(tiny_voc, tmp_path, tiny_builder, capsys):
    out = tmp_path / "run"
    assert h.main(_train_args(tiny_voc, out)) == 0
    good = [str(tiny_voc / f"VOCdevkit/VOC2007/JPEGImages/00000{i}.jpg") for i in (1, 2)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    missing = str(tmp_path / "missing.jpg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        rc = h.main(["predict", "--checkpoint", str(out / "model_final.pt"), good[0], str(broken), missing, good[1],
                     "--out", str(tmp_path / "pred"), "--score-thresh", "0.0", "--device", "cpu"])
    assert rc == 1
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(preds) == sorted(good)
    skipped = json.loads((tmp_path / "pred" / "skipped.json").read_text())
    assert sorted(skipped) == sorted([str(broken), missing])


# --------------------------------------------------------------------------------------
# Feature cache: checksummed files, content-keyed entries, corrupt files named and rebuilt
# --------------------------------------------------------------------------------------


def _cache(tiny_voc, cache_dir, **kw):
    ds = Subset(h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64), [0, 1, 2])
    torch.manual_seed(0)
    return h.build_feature_cache(TinyDetector(freeze_backbone=True), ds, cache_dir=cache_dir, progress=False, **kw)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[-10] ^= 0xFF  # same size, different content
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("name, how", [("c4.npy", "truncate"), ("c3.npy", "flip"), ("gt_boxes.npy", "truncate"),
                                       ("c5.npy", "empty")])
def test_corrupt_cache_file_is_named_and_rebuilt(tiny_voc, tmp_path, capsys, name, how):
    cache_dir = tmp_path / "cache"
    first = _cache(tiny_voc, cache_dir)
    _, want_feats, want_gt = first.get_batch([0, 1, 2], [0, 1, 0])
    del first
    _damage(cache_dir / name, how)
    with pytest.raises(RuntimeError, match=name):
        _cache(tiny_voc, cache_dir, on_mismatch="error")
    rebuilt = _cache(tiny_voc, cache_dir)
    out = capsys.readouterr().out
    assert str(cache_dir / name) in out and "rebuilding" in out
    _, feats, gt = rebuilt.get_batch([0, 1, 2], [0, 1, 0])
    assert all(torch.equal(feats[k], want_feats[k]) for k in feats) and torch.equal(gt, want_gt)
    assert _check_cache_files(cache_dir, json.loads((cache_dir / "meta.json").read_text())["checksums"]) is None


def test_changed_image_content_under_same_name_rebuilds_the_cache(tiny_voc, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    before = _cache(tiny_voc, cache_dir).get_batch([0], [0])[1]["c3"]
    image_path = tiny_voc / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    # Fast path: a touched file with the same content is re-hashed, and the cache reused.
    stat = image_path.stat()
    os.utime(image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    _cache(tiny_voc, cache_dir)
    assert "rebuilding" not in capsys.readouterr().out
    recorded = json.loads((cache_dir / "meta.json").read_text())["files"][str(image_path)]
    assert recorded[1] == stat.st_mtime_ns + 10**9  # the fast path now knows the new time
    # New content under the same id: rebuilt, not served stale.
    with Image.open(image_path) as im:
        inverted = Image.eval(im.convert("RGB"), lambda v: 255 - v)
    inverted.save(image_path, quality=95)
    after = _cache(tiny_voc, cache_dir).get_batch([0], [0])[1]["c3"]
    out = capsys.readouterr().out
    assert "content_hash" in out and "000001.jpg" in out and "rebuilding" in out
    assert not torch.equal(before, after)


# --------------------------------------------------------------------------------------
# Dataset validation: one report; training and evaluation see the same ground truth
# --------------------------------------------------------------------------------------


class GroundTruthOracle(torch.nn.Module):
    """A perfect detector: returns the training targets of the evaluation transform of
    each image, in order (evaluation visits the images in order)."""

    def __init__(self, dataset):
        super().__init__()
        self.targets = [dataset[i][2] for i in range(len(dataset))]
        self.next = 0

    def predict(self, images, score_thresh=0.3, nms_thresh=0.5):
        results = []
        for _ in range(len(images)):
            gt = self.targets[self.next]
            self.next += 1
            gt = gt[gt[:, 4] >= 0]
            results.append({"boxes": gt[:, :4].clone(), "labels": gt[:, 4].long(), "scores": torch.ones(len(gt))})
        return results


def _rewrite_val_xml(voc, image_id, extra_objs=(), size_scale=1):
    from helpers import N_TRAIN, _image_spec

    W, H, objs = _image_spec(int(image_id))
    assert int(image_id) > N_TRAIN
    path = voc / "VOCdevkit" / "VOC2007" / "Annotations" / f"{image_id}.xml"
    _write_xml(path, image_id, W * size_scale, H * size_scale, list(objs) + list(extra_objs))


def test_degenerate_boxes_are_dropped_for_training_and_evaluation_alike(tiny_voc):
    # 000007 gets a zero-width dog, an inverted person and a cat outside the image.
    _rewrite_val_xml(tiny_voc, "000007", [("dog", [30.0, 5.0, 30.0, 40.0], False),
                                          ("person", [40.0, 30.0, 20.0, 10.0], False),
                                          ("cat", [500.0, 5.0, 600.0, 40.0], False),
                                          ("car", [-5.0, -3.0, 10.0, 12.0], False)])
    with pytest.warns(UserWarning, match=r"3 degenerate boxes dropped.*000007\.jpg") as rec:
        ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    assert "1 boxes clipped" in str(rec[0].message)
    assert len(ds.validation_report["dropped"]) == 3 and "000007.jpg" in ds.validation_report["clipped"][0]
    names = [name for name, _, _ in ds.get_annotation(0)]
    assert "dog" not in names and "person" not in names and names.count("car") == 2
    assert [0.0, 0.0, 10.0, 12.0] in [box for _, box, _ in ds.get_annotation(0)]
    # The training targets and the evaluation ground truth hold the same boxes.
    gt = ds[0][2]
    assert int((gt[:, 4] >= 0).sum()) == len([a for a in ds.get_annotation(0) if not a[2]])
    metrics = h.evaluate_detector(GroundTruthOracle(ds), ds, batch_size=2, coco=False, progress=False)
    assert metrics["mAP"] == pytest.approx(1.0)  # was 0.5-ish: the dropped boxes counted as missed


def test_image_size_comes_from_the_image_with_a_warning(tiny_voc):
    _rewrite_val_xml(tiny_voc, "000008", size_scale=2)  # <size> twice the real image
    with pytest.warns(UserWarning, match=r"000008\.jpg \(annotation \d+x\d+, image \d+x\d+\)"):
        ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    from helpers import _image_spec

    W, H, _ = _image_spec(8)
    assert ds.original_size(1) == (W, H)
    metrics = h.evaluate_detector(GroundTruthOracle(ds), ds, batch_size=2, coco=False, progress=False)
    assert metrics["mAP"] == pytest.approx(1.0)


def test_clean_dataset_gives_no_warning(tiny_voc, recwarn):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)
    assert not [w for w in recwarn if "validation" in str(w.message)]
    assert all(not v for v in ds.validation_report.values())


# --------------------------------------------------------------------------------------
# Python API: lists of images of any size, empty batches
# --------------------------------------------------------------------------------------


def _real_detector(kind):
    config = {"detector": kind, "image_size": 64,
              "kwargs": {"backbone": "mobilenet_v2", "pretrained": False, "fpn_channels": 16, "stem_channels": [16]}}
    if kind == "faster_rcnn":
        config["kwargs"]["rpn_stem_channels"] = [16]
    try:
        torch.manual_seed(0)
        return h.build_detector(config).eval()
    except Exception as err:  # pragma: no cover - depends on the checkout
        pytest.skip(f"{kind} cannot be built here: {err}")


@pytest.mark.parametrize("kind", ["fcos", "faster_rcnn"])
def test_predict_accepts_images_of_different_sizes_and_empty_batches(kind):
    det = _real_detector(kind)
    try:
        _check_predict_inputs(det)
    except NotImplementedError:  # the student release: the detector's parts are still TODO
        pytest.skip("the student parts of this detector are not implemented yet")


def _check_predict_inputs(det):
    assert det.predict([], score_thresh=0.0) == []
    assert det.predict(torch.zeros(0, 3, 64, 64), score_thresh=0.0) == []
    feats = det.backbone.extract_features(torch.zeros(1, 3, 64, 64))
    assert det.predict({k: v[:0] for k, v in feats.items()}, score_thresh=0.0) == []
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 40)]
    outputs = det.predict(images, score_thresh=0.0, nms_thresh=0.5)
    assert len(outputs) == 2
    for out, image in zip(outputs, images):
        H, W = image.shape[-2:]
        boxes = out["boxes"]
        assert len(boxes) == len(out["labels"]) == len(out["scores"])
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    # A tuple works too, and a same-size list gives what the stacked batch gives (less the
    # boxes that have no area inside the image).
    same = [torch.randn(3, 64, 64), torch.randn(3, 64, 64)]
    a, b = det.predict(tuple(same), score_thresh=0.0), det.predict(torch.stack(same), score_thresh=0.0)
    for x, y in zip(a, b):
        yb = y["boxes"].clone()
        yb = yb.clamp(0, 64)
        keep = (yb[:, 2] > yb[:, 0]) & (yb[:, 3] > yb[:, 1])
        torch.testing.assert_close(x["boxes"], yb[keep])
        torch.testing.assert_close(x["scores"], y["scores"][keep])


def test_as_image_batch_pads_and_reports_sizes():
    import fcos

    batch, sizes = fcos.as_image_batch([torch.ones(3, 33, 20), torch.full((3, 10, 70), 2.0)])
    assert batch.shape == (2, 3, 64, 96) and sizes == [(33, 20), (10, 70)]
    assert batch[0, :, :33, :20].eq(1).all() and batch[0, :, 33:].eq(0).all() and batch[1, :, :10, :70].eq(2).all()
    assert fcos.as_image_batch([]) == (None, [])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        fcos.as_image_batch([torch.ones(3, 8, 8), torch.ones(8, 8)])


# --------------------------------------------------------------------------------------
# More faults: a failed save, an unreadable last.pt
# --------------------------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_one_and_no_partial_file(tmp_path, monkeypatch):
    h.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        h.save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert torch.equal(h.load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_with_unreadable_last_pt_falls_back_to_newest_good_checkpoint(tmp_path):
    _train(Runaway(1e9), Pixels(), tmp_path, max_iters=4, learning_rate=0.1)
    (tmp_path / "last.pt").unlink()  # it is a hard link to ckpt_0000004.pt: break only last.pt
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"(?s)last\.pt is not a PyTorch checkpoint.*Resuming from .*ckpt_0000004\.pt"):
        history = _train(Runaway(1e9), Pixels(), tmp_path, max_iters=6, learning_rate=0.1, resume=True)
    assert history["iteration"] == list(range(6))
    with pytest.raises(h.CheckpointError, match="garbage.pt"):
        (tmp_path / "garbage.pt").write_bytes(b"garbage")
        _train(Runaway(1e9), Pixels(), tmp_path, max_iters=6, resume=tmp_path / "garbage.pt")


class NaNDetector(torch.nn.Module):
    """Predicts one good box and one NaN-scored box per image."""

    def __init__(self, dataset):
        super().__init__()
        self.oracle = GroundTruthOracle(dataset)

    def predict(self, images, score_thresh=0.3, nms_thresh=0.5):
        outs = self.oracle.predict(images)
        for out in outs:
            out["boxes"] = torch.cat([out["boxes"], torch.tensor([[float("nan"), 0.0, 5.0, 5.0]])])
            out["labels"] = torch.cat([out["labels"], torch.tensor([6])])
            out["scores"] = torch.cat([out["scores"], torch.tensor([float("nan")])])
        return outs


def test_nonfinite_detections_are_dropped_with_a_warning_naming_images(tiny_voc):
    ds = h.VOC2007DetectionTiny(tiny_voc, "val", image_size=64)
    with pytest.warns(UserWarning, match=r"NaN.*000007\.jpg"):
        metrics = h.evaluate_detector(NaNDetector(ds), ds, batch_size=2, coco=False, progress=False)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["num_detections"] == 5


def test_python_api_rejects_bad_numbers_by_name(tiny_voc, tmp_path):
    loader = DataLoader(Pixels(), batch_size=2)
    for kwargs, name in (({"max_iters": -5}, "max_iters"), ({"log_period": 0}, "log_period"),
                         ({"checkpoint_period": 0}, "checkpoint_period"), ({"skip_nonfinite": -1}, "skip_nonfinite")):
        with pytest.raises(ValueError, match=name):
            h.train_detector(Runaway(), loader, progress=False, **{"max_iters": 2, **kwargs})
    with pytest.raises(ValueError, match="image_size"):
        h.VOC2007DetectionTiny(tiny_voc, "train", image_size=0)


def test_checkpoints_of_the_previous_version_still_load_safely(tmp_path):
    """Earlier versions stored NumPy's RNG state as an ndarray: plain arrays are allowed
    (nothing runs to rebuild them), so users keep their runs without --trust-checkpoint."""
    _train(Runaway(1e9), Pixels(), tmp_path, max_iters=2, learning_rate=0.1)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    np.random.seed(7)
    for rng in [state["rng"]] + state["rng_per_rank"]:
        rng["numpy"] = np.random.get_state()  # the old format
    torch.save(state, tmp_path / "last.pt")
    (tmp_path / "ckpt_0000002.pt").unlink()
    history = _train(Runaway(1e9), Pixels(), tmp_path, max_iters=3, learning_rate=0.1, resume=True)
    assert history["iteration"] == [0, 1, 2]
    assert isinstance(h.load_checkpoint(tmp_path / "last.pt")["rng"]["numpy"][1], torch.Tensor)  # new format

"""Tests of a5/training.py: samplers, schedule, `train_detector` (checkpoints, exact resume,
NaN guard, AMP, DDP).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import a5_helper as h
from helpers import TinyDetector, _param_vector, one_thread, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_resumable_sampler_order_and_shards():
    s = h.ResumableSampler(10, seed=5)
    s.set_epoch(2)
    a = list(s)
    s2 = h.ResumableSampler(10, seed=5)
    s2.set_epoch(2, start=4)
    assert list(s2) == a[4:] and list(s2) == a  # the skip applies once
    assert sorted(i for i, _ in a) == list(range(10))
    s.set_epoch(3)
    assert [i for i, _ in list(s)] != [i for i, _ in a]
    r0, r1 = h.ResumableSampler(9, seed=1, rank=0, world_size=2), h.ResumableSampler(9, seed=1, rank=1, world_size=2)
    i0, i1 = [i for i, _ in r0], [i for i, _ in r1]
    assert len(i0) == len(i1) == 5 and set(i0) | set(i1) == set(range(9))


def test_warmup_step_and_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = h.WarmupLR(opt, max_iters=100, warmup_iters=10, warmup_factor=0.1)
    assert sched.lr_factor(0) == pytest.approx(0.1) and sched.lr_factor(5) == pytest.approx(0.55)
    assert sched.lr_factor(10) == 1.0 and sched.lr_factor(59) == 1.0
    assert sched.lr_factor(60) == pytest.approx(0.1) and sched.lr_factor(90) == pytest.approx(0.01)
    cos = h.WarmupLR(torch.optim.SGD([p], lr=1.0), max_iters=100, schedule="cosine")
    assert cos.lr_factor(50) == pytest.approx(0.5) and cos.lr_factor(100) == pytest.approx(0.0)


def test_warmup_jump_to_sets_the_learning_rate_that_stepping_reaches():
    p = nn.Parameter(torch.zeros(1))
    stepped = h.WarmupLR(torch.optim.SGD([p], lr=0.5), max_iters=100, warmup_iters=10, schedule="cosine")
    for _ in range(37):
        stepped.optimizer.step()
        stepped.step()
    jumped = h.WarmupLR(torch.optim.SGD([p], lr=0.5), max_iters=100, warmup_iters=10, schedule="cosine")
    jumped.jump_to(37)
    assert jumped.last_epoch == 37 and jumped.get_last_lr() == pytest.approx(stepped.get_last_lr())
    assert jumped.optimizer.param_groups[0]["lr"] == pytest.approx(stepped.optimizer.param_groups[0]["lr"])

def _image_loader(tiny_voc, batch_size=2):
    ds = h.VOC2007DetectionTiny(tiny_voc, "train", image_size=64)  # random crop + flip
    return DataLoader(ds, batch_size=batch_size, shuffle=True)


def test_train_detector_history_and_checkpoint(tiny_voc, tmp_path):
    h.reset_seed(0)
    det = TinyDetector()
    before = _param_vector(det).clone()
    history = h.train_detector(det, _image_loader(tiny_voc), learning_rate=0.05, max_iters=10, log_period=3,
                               warmup_iters=2, checkpoint_dir=tmp_path, checkpoint_period=4, progress=False,
                               model_config={"detector": "tiny"})
    assert set(history) >= {"iteration", "lr", "total_loss", "loss_cls", "loss_box", "val"}
    assert history["iteration"] == list(range(10)) and len(history["loss_cls"]) == 10
    assert all(math.isfinite(v) for v in history["total_loss"])
    np.testing.assert_allclose(history["total_loss"], np.add(history["loss_cls"], history["loss_box"]), rtol=1e-5)
    assert history["lr"][0] == pytest.approx(0.05 * 1e-3) and history["lr"][2] == pytest.approx(0.05)
    assert history["lr"][6] == pytest.approx(0.005) and history["lr"][9] == pytest.approx(0.0005)
    assert not torch.equal(before, _param_vector(det))
    ckpt = h.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 10 and ckpt["config"] == {"detector": "tiny"}
    assert {"model", "optimizer", "scheduler", "rng", "seed", "history"} <= set(ckpt)
    assert not list(tmp_path.glob("*.tmp"))  # atomic save leaves no temporary file


def test_resume_gives_identical_losses(tiny_voc, tmp_path):
    kwargs = dict(learning_rate=0.05, max_iters=8, log_period=1, warmup_iters=2, checkpoint_period=3,
                  progress=False, seed=123)
    h.reset_seed(0)
    full = h.train_detector(TinyDetector(), _image_loader(tiny_voc), checkpoint_dir=tmp_path / "a", **kwargs)

    h.reset_seed(0)
    crashing = TinyDetector()
    crashing.fail_at = 6  # dies in iteration 5, after the checkpoint of iteration 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        h.train_detector(crashing, _image_loader(tiny_voc), checkpoint_dir=tmp_path / "b", **kwargs)
    assert h.load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3

    h.reset_seed(99)  # a different init and RNG state: everything must come from the checkpoint
    resumed_det = TinyDetector()
    resumed = h.train_detector(resumed_det, _image_loader(tiny_voc), checkpoint_dir=tmp_path / "b",
                               resume=True, **kwargs)
    for key in ("iteration", "lr", "total_loss", "loss_cls", "loss_box"):
        assert resumed[key] == full[key], key
    final_a = h.load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    for k, v in resumed_det.state_dict().items():
        assert torch.equal(v, final_a[k]), k


def test_nan_guard_rolls_back_and_names_iteration(tiny_voc, tmp_path):
    h.reset_seed(0)
    det = TinyDetector()
    det.nan_at = 5  # the 5th training call = iteration 4
    with pytest.raises(FloatingPointError, match=r"iteration 4.*loss_box=nan") as err:
        h.train_detector(det, _image_loader(tiny_voc), max_iters=10, checkpoint_dir=tmp_path, checkpoint_period=2,
                         progress=False)
    assert str(tmp_path / "last.pt") in str(err.value) and "iteration 2" in str(err.value)
    # last.pt is rolled back to the newest checkpoint from before the bad batch (the one
    # of iteration 4 is the state that produced the NaN; it is kept aside, not deleted).
    ckpt = h.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and len(ckpt["history"]["total_loss"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (tmp_path / "ckpt_0000004.nonfinite.pt").is_file()
    assert [i for i, _ in h.numbered_checkpoints(tmp_path)] == [2]


def test_train_accepts_any_iterable_and_dict_inputs():
    batches = [("x", {"c3": torch.randn(2, 6, 4, 4), "c4": torch.randn(2, 10, 2, 2), "c5": torch.randn(2, 12, 1, 1)},
                torch.tensor([[[1.0, 1.0, 20.0, 20.0, 3.0]] + [[-1.0] * 5] * 39] * 2))]
    history = h.train_detector(TinyDetector(freeze_backbone=True), batches, max_iters=3, progress=False)
    assert len(history["total_loss"]) == 3
    # Mixed precision on CPU (bf16 autocast) runs too; on CUDA it is the default.
    history = h.train_detector(TinyDetector(), [("x", torch.randn(2, 3, 32, 32), batches[0][2])], max_iters=2,
                               amp=True, progress=False)
    assert all(math.isfinite(v) for v in history["total_loss"])
    moved = h.move_to_device({"a": [torch.zeros(1, dtype=torch.float64)], "b": "s"}, "cpu", torch.float32)
    assert moved["a"][0].dtype == torch.float32 and moved["b"] == "s"


DDP_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    sys.path.insert(0, {repo!r})
    spec = importlib.util.spec_from_file_location("standins", {test_file!r})
    standins = importlib.util.module_from_spec(spec); spec.loader.exec_module(standins)
    import torch
    from torch.utils.data import DataLoader
    import a5_helper as h

    torch.set_num_threads(1)
    out = {out!r}
    h.reset_seed(0)
    det = standins.TinyDetector(dropout=0.0)
    ds = standins.SyntheticDataset(8)
    loader = DataLoader(ds, batch_size=2, shuffle=True)
    hist = h.train_detector(det, loader, learning_rate=0.05, max_iters=3, log_period=1, checkpoint_dir=out,
                            checkpoint_period=2, progress=False, seed=7)
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"seen": ds.seen, "params": [float(p.double().sum()) for p in det.parameters()],
                   "loss": hist["total_loss"], "world": torch.distributed.get_world_size()}}, f)
    """
)


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_train.py"
    submission = Path(h.__file__).resolve().parent
    helpers = Path(__file__).resolve().parent / "helpers.py"  # TinyDetector, SyntheticDataset
    script.write_text(DDP_SCRIPT.format(repo=str(submission), test_file=str(helpers), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(submission))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # Distributed sampler: in epoch 0 (2 batches of 2 per rank) the ranks read disjoint halves.
    assert set(r0["seen"][:4]).isdisjoint(r1["seen"][:4]) and set(r0["seen"][:4] + r1["seen"][:4]) == set(range(8))
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-6)  # gradients were all-reduced
    assert r0["loss"] == r1["loss"]  # logged losses are averaged over the ranks
    assert proc.stdout.count("train: iter 1/3 ") == 1  # only rank 0 logs
    assert h.load_checkpoint(out / "last.pt")["iteration"] == 3

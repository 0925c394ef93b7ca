"""Tests of a5/cli.py: help texts and the train / eval / predict commands with a stand-in
detector.
"""
from __future__ import annotations

import json

import pytest
import torch

import a5_helper as h
from helpers import one_thread, tiny_builder, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_cli_help_explains_options():
    text = h.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--detector", "--frozen-backbone", "--cache-features", "--data-dir", "--max-train-images",
                   "--resume", "--seed", "--device", "--num-workers"):
        assert option in text


def test_cli_train_eval_predict_end_to_end(tiny_voc, tmp_path, capsys, tiny_builder):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_voc), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    rc = h.main(["train", "--detector", "tiny", "--iters", "4", "--batch-size", "2", "--image-size", "64",
                 "--out", str(out), "--checkpoint-period", "2", "--max-val-images", "3", "--log-period", "1",
                 "--lr", "0.01", *common])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "final val mAP:" in stdout
    for name in ("last.pt", "model_final.pt", "metrics.json", "summary.txt", "loss_curve.png", "per_class_ap.png",
                 "pr_curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["num_images"] == 3 and metrics["train"]["iterations"] == 4
    assert metrics["config"]["detector"] == "tiny" and "coco_mAP" in metrics["val"]
    mAP_line = [l for l in stdout.splitlines() if l.startswith("final val mAP:")][0]
    assert float(mAP_line.split(":")[1]) == pytest.approx(metrics["val"]["mAP"], abs=1e-4)

    # Resume: continue the same run to 6 iterations.
    assert h.main(["train", "--detector", "tiny", "--iters", "6", "--batch-size", "2", "--image-size", "64",
                   "--out", str(out), "--resume", "--max-val-images", "2", *common]) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert h.load_checkpoint(out / "last.pt")["iteration"] == 6

    assert h.main(["eval", "--checkpoint", str(out / "model_final.pt"), "--max-val-images", "2",
                   "--out", str(tmp_path / "ev"), "--data-dir", str(tiny_voc), "--num-workers", "0",
                   "--no-progress", "--device", "cpu"]) == 0
    assert "val mAP:" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated["num_images"] == 2
    assert evaluated["test_flip"] is True, "a frozen-backbone model is evaluated as the CPU recipe: with flip"
    assert h.main(["eval", "--checkpoint", str(out / "model_final.pt"), "--max-val-images", "2", "--no-test-flip",
                   "--out", str(tmp_path / "ev_flip"), "--data-dir", str(tiny_voc), "--num-workers", "0",
                   "--no-progress", "--device", "cpu"]) == 0
    assert "with test-time flip" not in capsys.readouterr().out
    assert json.loads((tmp_path / "ev_flip" / "metrics.json").read_text())["test_flip"] is False

    images = [str(tiny_voc / "VOCdevkit/VOC2007/JPEGImages/000007.jpg")]
    assert h.main(["predict", "--checkpoint", str(out / "last.pt"), *images, "--out", str(tmp_path / "pred"),
                   "--score-thresh", "0.0", "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "000007_pred.png").is_file()
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert images[0] in preds


def test_cli_frozen_backbone_with_feature_cache(tiny_voc, tmp_path, capsys, tiny_builder):
    out = tmp_path / "cached"
    args = ["train", "--detector", "tiny", "--iters", "3", "--batch-size", "4", "--image-size", "64",
            "--out", str(out), "--frozen-backbone", "--cache-features", "--cache-variants", "orig,flip,jitter0",
            "--cache-dir", str(tmp_path / "fc"), "--max-val-images", "2", "--data-dir", str(tiny_voc),
            "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert h.main(args) == 0
    assert (tmp_path / "fc" / "meta.json").is_file()
    assert h.load_checkpoint(out / "model_final.pt")["config"]["kwargs"]["freeze_backbone"] is True
    assert "final val mAP" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        h.main([a if a != "--frozen-backbone" else "--no-frozen-backbone" for a in args])


@pytest.mark.part("provided")
def test_cli_defaults_to_frozen_cached_training_on_cpu(tiny_voc, tmp_path, tiny_builder):
    out = tmp_path / "auto"
    args = ["train", "--detector", "tiny", "--iters", "2", "--batch-size", "4", "--image-size", "64",
            "--out", str(out), "--max-val-images", "2", "--data-dir", str(tiny_voc),
            "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert h.main(args) == 0
    kwargs = h.load_checkpoint(out / "model_final.pt")["config"]["kwargs"]
    assert kwargs["freeze_backbone"] is True and kwargs["tune_last_stage"] is True
    summary = (out / "summary.txt").read_text()
    assert "cached features (" in summary and "last stage fine-tuned" in summary
    with pytest.raises(SystemExit, match="--tune-last-stage needs --frozen-backbone"):
        h.main(args + ["--no-frozen-backbone", "--tune-last-stage", "--overwrite"])
    # The resolved defaults are recorded: the recipe's variants, the fallback lr of a
    # detector without a recipe entry, and whether autocast ran (this CPU's choice).
    recorded = json.loads((out / "metrics.json").read_text())["args"]
    assert recorded["cache_variants"] == ",".join(h.CPU_RECIPE_CACHE_VARIANTS)
    assert recorded["lr"] == 1e-2 and recorded["amp"] is h.default_amp("cpu")


@pytest.mark.part("provided")
def test_cli_default_length_follows_the_precision():
    """Without --iters, a frozen-backbone run trains the CPU recipe's length for the precision
    it resolves (autocast: the longer schedule); --iters and end-to-end runs are untouched."""
    from a5.cli import END_TO_END_ITERS, _resolve_train_defaults

    def resolved(*extra):
        args = h.build_parser().parse_args(["train", "--detector", "fcos", *extra])
        _resolve_train_defaults(args, torch.device("cpu"), rank=0)
        return args

    assert resolved("--amp").iters == h.CPU_RECIPE_ITERS["fcos"]
    assert resolved("--no-amp").iters == h.CPU_RECIPE_ITERS_FLOAT32["fcos"]
    assert resolved().iters == h.cpu_recipe_iters("fcos", h.default_amp("cpu"))
    assert resolved("--amp", "--iters", "7").iters == 7
    assert resolved("--amp", "--no-frozen-backbone").iters == END_TO_END_ITERS


@pytest.mark.part("provided")
def test_cli_resume_and_eval_keep_what_the_run_started_with(tiny_voc, tmp_path, capsys, tiny_builder):
    """A run from before recipe v2 (no tune_last_stage, no recorded evaluation) resumes with
    its last stage frozen and its own length, and `eval` does not flip it."""
    out = tmp_path / "old"
    common = ["--detector", "tiny", "--batch-size", "2", "--image-size", "64", "--out", str(out),
              "--max-val-images", "2", "--data-dir", str(tiny_voc), "--num-workers", "0", "--no-progress",
              "--device", "cpu"]
    assert h.main(["train", "--iters", "2", "--checkpoint-period", "2", *common]) == 0
    for name in ("last.pt", "model_final.pt"):  # make it look like an old run's checkpoints
        state = h.load_checkpoint(out / name)
        del state["config"]["kwargs"]["tune_last_stage"], state["config"]["eval"]
        if name == "last.pt":
            state["scheduler"]["max_iters"] = 3
        torch.save(state, out / name)
    assert h.main(["eval", "--checkpoint", str(out / "model_final.pt"), "--max-val-images", "2",
                   "--out", str(tmp_path / "ev_old"), "--data-dir", str(tiny_voc), "--num-workers", "0",
                   "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev_old" / "metrics.json").read_text())["test_flip"] is False
    capsys.readouterr()
    assert h.main(["train", "--resume", *common]) == 0
    printed = capsys.readouterr().out
    assert "--resume: the run trains for 3 iterations as it started" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["iterations"] == 3 and metrics["args"]["tune_last_stage"] is False

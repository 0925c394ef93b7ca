"""What a user reads and sees: progress in a log file, --help, the run's summaries,
messages, the error breakdown and the pictures (colours per class, labels that do not
overlap, tick labels that do not collide).

Everything runs on the tiny generated VOC data and stand-in detectors of
helpers.py; nothing here needs the real data, and nothing asserts wall-clock
times (progress tests drive an injected clock).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import a5.plots
import a5_helper as h
from a5.progress import _CLI_ACTIVE, _progress_mode
from helpers import TinyDetector, one_thread, tiny_builder, tiny_voc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


# --------------------------------------------------------------------------------------
# Progress when the output is not a terminal
# --------------------------------------------------------------------------------------


def test_progress_is_periodic_lines_in_a_log(capsys):
    clock = FakeClock()
    bar = h.ProgressReporter(3500, "train", count_format="iter {n}/{total}", noun="iteration", mode="auto",
                             every=20, min_seconds=30, announce_after=20, clock=clock, load=lambda: (0.3, 2))
    assert bar.mode == "lines"  # pytest captures stdout: not a terminal
    for it in range(1000):
        clock.now += 0.125  # 8 it/s (exact in binary floating point)
        bar.update(1, loss=1.1234, lr=0.0195)
    bar.close()
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    # A line at the first iteration, then one every 30 s of (fake) time: 125 s -> 4 more.
    progress = [l for l in lines if re.match(r"train: iter \d+/3500 \(", l)]
    assert [l.split()[2] for l in progress] == ["1/3500", "241/3500", "481/3500", "721/3500", "961/3500"]
    assert progress[0] == "train: iter 1/3500 (0%), loss 1.12, lr 0.0195"
    assert progress[1] == "train: iter 241/3500 (7%), loss 1.12, lr 0.0195, 8 it/s, ETA 6.8 min"
    # Once the speed is known, one line says how long the rest takes.
    expect = [l for l in lines if "should take about" in l]
    assert len(expect) == 1 and "8 it/s, so the remaining 3340 iterations should take about 7.0 min" in expect[0]
    # Closed before the end (an interrupted phase): it says so, with the time it ran.
    assert lines[-1] == "train: iter 1000/3500 stopped after 2.1 min, 8 it/s, loss 1.12, lr 0.0195"
    assert not any("busy" in l or "slower" in l for l in lines)


def test_progress_says_why_it_slowed_down(capsys):
    clock = FakeClock()
    load = [(0.5, 2)]
    bar = h.ProgressReporter(400, "evaluate", count_format="{n}/{total} images", unit="img", noun="image",
                             mode="lines", every=1, min_seconds=10, clock=clock, load=lambda: load[0])
    for i in range(400):
        if i == 200:
            load[0] = (5.2, 2)  # other jobs start
        clock.now += 0.1 if i < 200 else 1.0
        bar.update(1)
    out = capsys.readouterr().out.splitlines()
    early = [l for l in out if l.startswith("evaluate: 1") and "images (" in l][:3]
    assert early and not any("busy" in l for l in early)
    late = [l for l in out if "/400 images (" in l][-1]
    assert "1 img/s" in late
    assert "slower than the earlier 10 img/s" in late and "machine busy: load average 5.2 on 2 CPUs" in late


def test_progress_off_and_bar_modes(capsys):
    bar = h.ProgressReporter(10, "cut", mode="lines", min_seconds=0, clock=FakeClock(), load=lambda: None)
    bar.update(4)
    bar.close()
    assert capsys.readouterr().out.splitlines()[-1].startswith("cut: 4/10 stopped after 0 s")
    bar = h.ProgressReporter(5, "quiet", mode="off")
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().out == ""
    assert _progress_mode(True) == "auto" and _progress_mode(False) == "off"
    assert _progress_mode(False, "lines") == "lines"
    with pytest.raises(ValueError):
        _progress_mode("sometimes")


def test_train_detector_logs_lines_without_carriage_returns(monkeypatch, capsys):
    monkeypatch.setenv("A5_PROGRESS_SECONDS", "0")
    from helpers import SyntheticDataset

    det = TinyDetector(dropout=0.0)
    loader = torch.utils.data.DataLoader(SyntheticDataset(8), batch_size=2)
    h.train_detector(det, loader, max_iters=6, log_period=2, progress=True, seed=0)
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err
    lines = [l for l in out.out.splitlines() if l.startswith("train: iter")]
    assert [re.match(r"train: iter \d/6( done)?", l).group(0) for l in lines] == [
        "train: iter 1/6", "train: iter 3/6", "train: iter 5/6", "train: iter 6/6 done"]
    assert re.search(r"loss [0-9.]+, cls [0-9.]+, box [0-9.]+, lr ", lines[1])


# --------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    return h.build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_states_each_default_once_and_has_examples(command):
    text = _subparser(command).format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    # Option by option: never two defaults.
    for chunk in re.split(r"\n  (?=-)", text):
        assert chunk.lower().count("default") <= 1, chunk
    assert "examples:" in text and f"python a5_helper.py {command} " in text.split("examples:")[1]
    if command != "train":
        checkpoint = re.search(r"--checkpoint CHECKPOINT\n(.*?)\n  -", text, re.S).group(1)
        assert "default" not in checkpoint  # required: no default to speak of
    if command == "train":
        flat = " ".join(text.split())
        assert "(default: in memory)" in flat and ("(default: the CPU recipe's with --frozen-backbone, fcos 1800, faster_rcnn 2500 with --amp, "
                                                  "fcos 1200, faster_rcnn 2500 without; else 3500;") in flat
    assert "examples:" in h.build_parser().format_help()


def test_help_formatter_rules():
    parser = argparse.ArgumentParser(formatter_class=h.HelpFormatter, epilog="examples:\n  a\n  b")
    parser.add_argument("--plain", type=int, default=7, help="a number")
    parser.add_argument("--zero", type=int, default=0, help="zero counts")
    parser.add_argument("--said", default=3, help="three (default: three)")
    parser.add_argument("--none", default=None, help="unset")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--need", required=True, default="x", help="required")
    text = parser.format_help()
    assert "a number (default: 7)" in text and "zero counts (default: 0)" in text
    assert text.count("(default: three)") == 1 and "(default: 3)" not in text
    for option in ("unset", "a switch", "required"):
        assert f"{option} (default" not in text
    assert "examples:\n  a\n  b" in text  # the epilog keeps its lines


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def test_plural():
    assert h.plural(1, "detection") == "1 detection"
    assert h.plural(0, "detection") == "0 detections" and h.plural(2, "image") == "2 images"
    assert h.plural(3, "class", "classes") == "3 classes"
    assert h.format_duration(45) == "45 s" and h.format_duration(192) == "3.2 min"
    assert h.format_duration(6519) == "1 h 49 min"
    assert h.format_bytes(1.93e9) == "1.9 GB" and h.format_bytes(27e6) == "27 MB"


def test_messages_name_the_python_argument_or_the_flag(capsys):
    from helpers import SyntheticDataset

    loader = torch.utils.data.DataLoader(SyntheticDataset(4), batch_size=2)
    h.train_detector(TinyDetector(dropout=0.0), loader, max_iters=1, progress="off", amp=True, seed=0)
    assert "amp=False turns it off" in capsys.readouterr().out
    _CLI_ACTIVE[0] = True
    try:
        h.train_detector(TinyDetector(dropout=0.0), loader, max_iters=1, progress="off", amp=True, seed=0)
        with pytest.raises(ValueError, match="--frozen-backbone"):
            h.build_feature_cache(TinyDetector(freeze_backbone=False), SyntheticDataset(2), progress=False)
    finally:
        _CLI_ACTIVE[0] = False
    out = capsys.readouterr().out
    assert "--no-amp turns it off" in out and "amp=False" not in out


def test_detector_errors_name_the_flags(tiny_voc, tmp_path, monkeypatch):
    def offline(**kwargs):
        raise RuntimeError("Could not load the weights. Either build the model with pretrained=False, or use "
                           "backbone='mobilenet_v2' with TORCH_HOME set")

    monkeypatch.setitem(h.DETECTOR_BUILDERS, "offline", offline)
    with pytest.raises(RuntimeError) as info:
        h.main(["train", "--detector", "offline", "--out", str(tmp_path / "x"), "--data-dir", str(tiny_voc),
                "--device", "cpu"])
    message = str(info.value)
    assert "--no-pretrained" in message and "--backbone mobilenet_v2" in message and "pretrained=False" not in message
    assert "pretrained=False" in str(info.value.__cause__)


# --------------------------------------------------------------------------------------
# The run's summaries: train, eval, predict
# --------------------------------------------------------------------------------------


def test_train_summary_eval_and_predict_read_well(tiny_voc, tmp_path, capsys, tiny_builder, monkeypatch):
    monkeypatch.setenv("A5_PROGRESS_SECONDS", "0")
    out = tmp_path / "run"
    rc = h.main(["train", "--detector", "tiny", "--iters", "6", "--batch-size", "2", "--image-size", "64",
                 "--out", str(out), "--max-val-images", "3", "--lr", "0.01", "--data-dir", str(tiny_voc),
                 "--num-workers", "0", "--no-progress", "--device", "cpu", "--cache-variants", "orig,flip"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "\r" not in stdout
    # The start-up summary comes first and says what will happen.
    head = stdout.split("caching backbone features")[0]
    assert head.startswith("Training tiny (backbone mobilenet_v2, ImageNet weights, frozen, last stage fine-tuned) on cpu")
    for needle in ("precision", "float32", "6 train images, 3 val images", "resized to 64 px",
                   "computed once, before training", "6 images x 2 variants", "--cache-dir DIR",
                   "6 iterations, batch 2", f"output      {out}"):
        assert needle in head, needle
    # Every long phase reports progress although --no-progress was given.
    for phase in ("caching backbone features: 12/12 images done", "train: iter 1/6 ", "train: iter 6/6 done",
                  "evaluate: 3/3 images done"):
        assert phase in stdout, phase

    summary = (out / "summary.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    history = h.load_checkpoint(out / "last.pt")["history"]
    loss = re.search(r"final loss  (\S+) \(mean of the last 6 iterations; the last batch: (\S+)\)", summary)
    assert loss, summary
    assert len(loss.group(1).replace(".", "").lstrip("0")) <= 4  # rounded, not 1.4415929317474365
    assert float(loss.group(1)) == pytest.approx(np.mean(history["total_loss"]), rel=2e-3)
    assert metrics["train"]["final_loss_mean"] == pytest.approx(np.mean(history["total_loss"]))
    ap = re.search(r"mAP@0.5     (\S+)% all-point \(VOC2010\+\), (\S+)% 11-point \(VOC2007\)", summary)
    assert ap and float(ap.group(1)) == pytest.approx(100 * metrics["val"]["mAP_all_point"], abs=0.05)
    assert float(ap.group(2)) == pytest.approx(100 * metrics["val"]["mAP_11_point"], abs=0.05)
    assert metrics["val"]["mAP"] == metrics["val"]["mAP_all_point"]
    assert "errors      " in summary and metrics["val"]["errors"]["score_thresh"] == h.ERROR_SCORE_THRESH
    for name in ("model_final.pt", "last.pt", "metrics.json", "summary.txt", "loss_curve.png", "pr_curves.png",
                 "error_breakdown.png"):
        assert re.search(rf"^  {re.escape(name)} ", summary, re.M), name
        assert (out / name).is_file()
    next_cmds = summary.split("Next:\n")[1].splitlines()
    assert next_cmds[0].startswith(f"  python a5_helper.py eval --checkpoint {out / 'model_final.pt'} --data-dir ")
    assert next_cmds[1].startswith(f"  python a5_helper.py predict --checkpoint {out / 'model_final.pt'} ")
    assert next_cmds[1].split()[5].endswith(".jpg") and Path(next_cmds[1].split()[5]).is_file()
    assert summary.strip() in stdout  # printed as written

    # eval --use-07-metric names its metric, prints both and draws the error breakdown.
    ev = tmp_path / "ev"
    assert h.main(["eval", "--checkpoint", str(out / "model_final.pt"), "--max-val-images", "3", "--use-07-metric",
                   "--out", str(ev), "--data-dir", str(tiny_voc), "--num-workers", "0", "--no-progress",
                   "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    final = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"val mAP: [0-9.]+ \(AP@0.5, 11-point \(VOC2007\); all-point: [0-9.]+\)", final)
    assert "AP@0.5 per class, 11-point (VOC2007):" in stdout and "evaluate: 3/3 images done" in stdout
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["ap_metric"] == "11-point (VOC2007)" and saved["mAP"] == saved["mAP_11_point"]
    assert (ev / "error_breakdown.png").is_file()

    # predict: plurals, and by default under runs/.
    assert h.build_parser().parse_args(["predict", "--checkpoint", "x.pt", "a.jpg"]).out == "runs/predictions"
    images = [str(tiny_voc / "VOCdevkit/VOC2007/JPEGImages/000007.jpg")]
    assert h.main(["predict", "--checkpoint", str(out / "model_final.pt"), *images, "--out", str(tmp_path / "p"),
                   "--score-thresh", "0.0", "--device", "cpu"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith(images[0])][0]
    count = len(json.loads((tmp_path / "p" / "predictions.json").read_text())[images[0]])
    assert h.plural(count, "detection") in line and "1 detections" not in line


def test_outputs_are_git_ignored():
    ignored = (Path(h.__file__).parent / ".gitignore").read_text().split()
    assert "runs/" in ignored


# --------------------------------------------------------------------------------------
# Error breakdown
# --------------------------------------------------------------------------------------


def test_count_detection_errors_calls_each_kind(tmp_path):
    gts = {"a": [("car", [0, 0, 99, 99], False), ("dog", [200, 200, 299, 299], False),
                 ("cat", [400, 0, 499, 99], False)],
           "b": [("car", [0, 0, 49, 49], True)]}
    dets = [
        ("a", "car", 0.9, [0, 0, 99, 99]),  # correct
        ("a", "car", 0.8, [2, 2, 99, 99]),  # duplicate of the car
        ("a", "car", 0.7, [0, 0, 40, 40]),  # localisation (IoU ~0.17 with the car)
        ("a", "car", 0.6, [200, 200, 299, 299]),  # confusion: on the dog
        ("a", "dog", 0.5, [600, 600, 650, 650]),  # background
        ("b", "car", 0.9, [0, 0, 49, 49]),  # on a difficult car: ignored
        ("a", "cat", 0.95, [220, 220, 300, 320]),  # confusion (IoU > 0.5 with the dog)
        ("a", "cat", 0.2, [400, 0, 499, 99]),  # correct, but below a 0.3 threshold
    ]
    e = h.count_detection_errors(gts, dets, ["car", "dog", "cat"])
    assert {k: e[k] for k in ("correct",) + h.ERROR_KINDS + ("missed", "ignored", "detections", "objects")} == {
        "correct": 2, "localisation": 1, "confusion": 2, "duplicate": 1, "background": 1, "missed": 1,
        "ignored": 1, "detections": 8, "objects": 3}
    assert e["per_class"]["dog"]["missed"] == 1 and e["per_class"]["car"]["duplicate"] == 1
    hi = h.count_detection_errors(gts, dets, ["car", "dog", "cat"], score_thresh=0.3)
    assert hi["correct"] == 1 and hi["detections"] == 7 and hi["missed"] == 2
    lines = h.format_error_breakdown(hi)
    assert lines[0].startswith("7 detections with score >= 0.3: 1 correct (14%)")
    assert lines[1] == "3 objects (not difficult): 1 found, 2 missed (67%)"
    # The chart takes the counts, or evaluate_detector's result that holds them.
    path = h.plot_error_breakdown({"mAP": 0.5, "errors": hi}, save_path=tmp_path / "errors.png")
    assert path == tmp_path / "errors.png" and path.stat().st_size > 1000


def test_error_counts_agree_with_the_ap_matching():
    rng = np.random.default_rng(0)
    classes = ["car", "dog", "cat"]
    for trial in range(5):
        gts, dets = {}, []
        for i in range(12):
            objs = []
            for _ in range(rng.integers(0, 4)):
                x, y = rng.uniform(0, 200, 2)
                box = [x, y, x + rng.uniform(10, 80), y + rng.uniform(10, 80)]
                objs.append((classes[rng.integers(3)], box, bool(rng.random() < 0.1)))
                for _ in range(rng.integers(0, 3)):
                    cls = objs[-1][0] if rng.random() < 0.7 else classes[rng.integers(3)]
                    dets.append((str(i), cls, float(rng.random()), list(np.asarray(box) + rng.normal(0, 8, 4))))
            for _ in range(rng.integers(0, 2)):
                x, y = rng.uniform(0, 250, 2)
                dets.append((str(i), classes[rng.integers(3)], float(rng.random()), [x, y, x + 20, y + 20]))
            gts[str(i)] = objs
        e = h.count_detection_errors(gts, dets, classes)
        res = h.compute_voc_map(gts, dets, classes, return_curves=True)
        for cls in classes:
            c = e["per_class"][cls]
            rec = res["curves"][cls]["recall"]
            tp = round(rec[-1] * c["objects"]) if rec else 0
            assert c["correct"] == tp  # the same matching as the AP
            assert c["correct"] + c["missed"] == c["objects"]
            assert c["correct"] + sum(c[k] for k in h.ERROR_KINDS) + c["ignored"] == c["detections"]


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------


def _capture_figures(monkeypatch):
    """Keep the figures that the plot functions make (drawn, so extents are final)."""
    figures = []

    def finish(fig, save_path, name, tight=True):
        fig.canvas.draw()
        figures.append(fig)
        return None

    monkeypatch.setattr(a5.plots, "_finish_figure", finish)
    return figures


def _busy_predictions(n: int = 32, seed: int = 0, width: int = 500, height: int = 375) -> torch.Tensor:
    """Many boxes crowded into the middle of the image, several per class."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x0, y0 = rng.uniform(60, 300), rng.uniform(50, 220)
        w, hh = rng.uniform(40, 150), rng.uniform(40, 110)
        rows.append([x0, y0, min(x0 + w, width - 1), min(y0 + hh, height - 1), float(i % 7), rng.uniform(0.3, 1.0)])
    return torch.tensor(rows)


def test_boxes_have_a_colour_per_class(monkeypatch):
    from matplotlib.patches import Rectangle

    figures = _capture_figures(monkeypatch)
    image = np.full((120, 160, 3), 127, dtype=np.uint8)
    pred = torch.tensor([[10.0, 10, 50, 50, 0, 0.9], [60, 10, 100, 50, 1, 0.8], [10, 60, 50, 100, 0, 0.7],
                         [110, 60, 150, 110, 14, 0.6]])
    gt = torch.tensor([[12.0, 12, 48, 48, 0], [62, 12, 98, 48, 1], [-1, -1, -1, -1, -1]])
    h.detection_visualizer(image, dict(enumerate(h.VOC_CLASSES)), gt, pred)
    ax = figures[0].axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(rects) == 6  # 4 predictions + 2 ground-truth boxes (padding skipped)
    colour = {tuple(round(c, 3) for c in r.get_edgecolor()[:3]) for r in rects}
    assert len(colour) == 3  # three classes, three colours
    solid = [r for r in rects if r.get_linestyle() == "-"]
    by_xy = {tuple(r.get_xy()): tuple(r.get_edgecolor()[:3]) for r in solid}
    assert by_xy[(10.0, 10.0)] == by_xy[(10.0, 60.0)] != by_xy[(60.0, 10.0)]
    assert len(solid) == 4 and len(rects) - len(solid) == 2  # ground truth is dashed
    assert by_xy[(10.0, 10.0)] == pytest.approx(h.class_color(0))
    assert len({h.class_color(i) for i in range(20)}) == 20
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["aeroplane 0.90", "bicycle 0.80", "aeroplane 0.70", "person 0.60", "gt aeroplane",
                            "gt bicycle"])


def test_labels_do_not_overlap_on_a_busy_image(monkeypatch):
    figures = _capture_figures(monkeypatch)
    image = np.full((375, 500, 3), 90, dtype=np.uint8)
    pred = _busy_predictions()
    h.detection_visualizer(image, dict(enumerate(h.VOC_CLASSES)), pred=pred, max_boxes=20)
    fig = figures[0]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    assert len(ax.patches) == 20  # top-k: the 20 best of 32 boxes are drawn
    assert len(boxes) >= 18  # nearly every box keeps its label
    for a, b in itertools.combinations(boxes, 2):
        assert _overlap((a.x0, a.y0, a.x1, a.y1), (b.x0, b.y0, b.x1, b.y1)) == 0.0
    for b in boxes:  # on the image
        assert frame.x0 - 1 <= b.x0 and b.x1 <= frame.x1 + 1 and frame.y0 - 1 <= b.y0 and b.y1 <= frame.y1 + 1
    # The best-scoring boxes are the ones drawn, and a display threshold is honoured.
    scores = sorted(pred[:, 5].tolist(), reverse=True)
    shown = sorted(float(t.get_text().split()[-1]) for t in ax.texts)
    assert min(shown) >= round(scores[19], 2) - 1e-9
    info = h.draw_detections(fig.add_axes((0, 0, 0.1, 0.1)), image, dict(enumerate(h.VOC_CLASSES)), pred=pred,
                             score_thresh=0.8)
    assert info["drawn"] == int((pred[:, 5] >= 0.8).sum()) and info["hidden"] == 32 - info["drawn"]


def test_label_goes_inside_when_there_is_no_room_above(monkeypatch):
    figures = _capture_figures(monkeypatch)
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    h.detection_visualizer(image, {0: "aeroplane", 1: "bicycle"}, pred=[[20, 0, 120, 80, 0, 0.9],
                                                                         [20, 100, 120, 180, 1, 0.8]])
    fig = figures[0]
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    (top_px,) = ax.transData.transform([(20, 0)])[:, 1]
    (top2_px,) = ax.transData.transform([(20, 100)])[:, 1]
    first, second = (t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts)
    assert first.y1 <= top_px + 1  # inside the box at the image's top edge
    assert second.y0 >= top2_px - 1  # above the second box, where there is room


def test_plots_have_clean_axes(monkeypatch):
    figures = _capture_figures(monkeypatch)
    rng = np.random.default_rng(1)
    gts, dets = {}, []
    for i in range(60):
        cls = h.VOC_CLASSES[i % 20]
        gts[str(i)] = [(cls, [10, 10, 60, 60], False)]
        dets.append((str(i), cls, float(rng.random()), list(10 + rng.normal(0, 12, 4) + [0, 0, 50, 50])))
        dets.append((str(i), h.VOC_CLASSES[(i + 3) % 20], float(rng.random()), [100, 100, 140, 140]))
    res = h.compute_voc_map(gts, dets, h.VOC_CLASSES, return_curves=True)
    h.plot_pr_curves(res["curves"], per_class_ap=res["per_class"])
    h.plot_per_class_ap(res["per_class"])
    h.plot_loss_history({"iteration": list(range(300)), "total_loss": list(np.linspace(3, 1, 300)),
                         "loss_cls": list(np.linspace(2, 0.5, 300))}, window=10)
    h.plot_error_breakdown(h.count_detection_errors(gts, dets, h.VOC_CLASSES, score_thresh=0.3))
    assert len(figures) == 4
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        labels = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()
                  if t.get_visible() and t.get_text()]
        assert labels
        extents = [t.get_window_extent(renderer) for t in labels]
        for (ta, a), (tb, b) in itertools.combinations(zip(labels, extents), 2):
            assert _overlap((a.x0, a.y0, a.x1, a.y1), (b.x0, b.y0, b.x1, b.y1)) == 0.0, (
                fig.axes[0].get_title(), ta.get_text(), tb.get_text())
        for ax in fig.axes:  # value labels stay inside their panel
            frame = ax.get_window_extent(renderer)
            for t in ax.texts:
                e = t.get_window_extent(renderer)
                assert frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1, t.get_text()

#!/usr/bin/env python3
"""Training-step and predict time of the detectors at an earlier git revision against the
working tree, alternating in one process (so that machine load affects both alike).

Usage::

    python benchmarks/compare_revisions.py --old dd4bb4b [--batch 8] [--reps 12]

Both versions run the CPU recipe's setting on random cached features (frozen MobileNetV2
body, FPN 64, batch 8 of 224 px images, 1 thread). Prints the medians and new/old ratios:
a change of structure should leave them at 1 within noise (about +-5%).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = ("fcos", "two_stage_detector")


def load_version(tag: str, root: Path) -> Dict[str, object]:
    """Import fcos.py and two_stage_detector.py of ``root`` under private names; while
    they run, ``from fcos import ...`` resolves to the same version."""
    saved = {name: sys.modules.pop(name, None) for name in MODULES}
    loaded = {}
    try:
        for name in MODULES:
            spec = importlib.util.spec_from_file_location(f"{tag}_{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None) if module is None else sys.modules.__setitem__(name, module)
    return loaded


def checkout_files(revision: str, folder: Path) -> Path:
    for name in MODULES:
        text = subprocess.run(["git", "show", f"{revision}:{name}.py"], cwd=REPO_ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / f"{name}.py").write_text(text)
    return folder


def random_batch(batch: int):
    gen = torch.Generator().manual_seed(0)
    feats = {"c3": torch.randn(batch, 32, 28, 28, generator=gen), "c4": torch.randn(batch, 96, 14, 14, generator=gen),
             "c5": torch.randn(batch, 1280, 7, 7, generator=gen)}
    gt = torch.full((batch, 6, 5), -1.0)
    for b in range(batch):
        n = 1 + b % 5
        xy = torch.rand(n, 2, generator=gen) * 150
        wh = 16 + torch.rand(n, 2, generator=gen) * 60
        gt[b, :n] = torch.cat([xy, xy + wh, torch.randint(0, 20, (n, 1), generator=gen).float()], 1)
    return feats, gt


def build(modules, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    fcos, tsd = modules["fcos"], modules["two_stage_detector"]
    if kind == "fcos":
        return fcos.FCOS(20, 64, [64, 64], backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    backbone = fcos.DetectorBackboneWithFPN(64, backbone="mobilenet_v2", pretrained=False, freeze_backbone=True)
    rpn = tsd.RPN(64, [64], batch_size_per_image=256, pre_nms_topk=400, post_nms_topk=100)
    return tsd.FasterRCNN(backbone, rpn, [64], 20, batch_size_per_image=128)


def alternate(models, step, reps: int) -> Dict[str, float]:
    times = {tag: [] for tag in models}
    for rep in range(reps):
        for tag in (list(models) if rep % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            step(models[tag])
            times[tag].append(time.perf_counter() - start)
    return {tag: statistics.median(values[2:]) for tag, values in times.items()}  # 2 warm-up rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO_ROOT))  # a5/ (kernels) for the working tree's version
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"old": load_version("old", checkout_files(args.old, Path(tmp))),
                    "new": load_version("new", REPO_ROOT)}
        feats, gt = random_batch(args.batch)
        for kind in ("fcos", "faster_rcnn"):
            models = {tag: build(mods, kind).train() for tag, mods in versions.items()}
            train = alternate(models, lambda m: sum(m(feats, gt).values()).backward(), args.reps)
            for model in models.values():
                model.eval()
            predict = alternate(models, lambda m: m.predict(feats, 0.05, 0.5), args.reps)
            for what, t in (("train step", train), ("predict", predict)):
                print(f"{kind} {what}: {args.old} {t['old'] * 1000:.0f} ms, working tree {t['new'] * 1000:.0f} ms, "
                      f"new/old {t['new'] / t['old']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

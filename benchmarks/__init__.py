"""Benchmarks: our FCOS / Faster R-CNN side by side with torchvision's detectors.

* ``speed.py``: training step time, inference throughput, peak memory, NMS and target
  assignment timings (one command, prints a markdown table).
* ``accuracy.py``: frozen-backbone feature-cache training and VOC evaluation of our
  detectors and torchvision's, with the same cache, schedule and evaluation.
* ``tv_adapters.py``: builds torchvision detectors configured like ours and wraps them in
  our interface (padded ``(B, N, 5)`` GT, image or c3/c4/c5 feature input).
"""

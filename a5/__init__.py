"""Provided machinery behind ``a5_helper.py`` and the detector chapters (see the README's layout).

One module per concern, each importing only those above it in this list: ``utils`` (seeds,
devices, AMP), ``progress`` (progress bar / plain lines), ``data`` (transforms, dataset,
download), ``cache`` (frozen-backbone feature cache), ``training`` (samplers, checkpoints,
DDP, ``train_detector``), ``evaluation`` (VOC mAP, COCO cross-check, error breakdown),
``plots`` (pictures), ``cli`` (builders, recipe, command line); and ``kernels`` (the fast
kernels that ``fcos.py`` and ``two_stage_detector.py`` use). Kept light: importing ``a5``
imports none of them.
"""

"""FCOS: Fully-Convolutional One-Stage object detection.

This module implements the FCOS detector of Tian et al., "FCOS: Fully
Convolutional One-Stage Object Detection" (ICCV 2019), together with the
improvements of the journal version ("FCOS: A Simple and Strong Anchor-free
Object Detector", TPAMI 2020): centre sampling, centerness on the box branch,
GroupNorm in the heads and the GIoU box loss.

Overview of the pieces, in the order a student implements them:

1. ``DetectorBackboneWithFPN``: a small ImageNet CNN (RegNetX-400MF or
   MobileNetV2) gives features ``c3, c4, c5`` at strides 8, 16, 32; a Feature
   Pyramid Network (Lin et al. 2017) turns them into ``p3, p4, p5`` that all
   have the same number of channels.
2. ``get_fpn_location_coords``: every cell of an FPN feature map is a
   "location", the absolute ``(x, y)`` pixel centre of its receptive field.
3. ``FCOSPredictionNetwork``: a head shared by all FPN levels that predicts,
   per location, class logits, box regression deltas ``(l, t, r, b)`` and a
   centerness logit.
4. ``fcos_match_locations_to_gt``: assigns every location either a ground
   truth (GT) box or background; ``fcos_get_deltas_from_locations``,
   ``fcos_apply_deltas_to_locations`` and ``fcos_make_centerness_targets``
   convert between boxes and regression / centerness targets.
5. ``nms`` / ``class_spec_nms``: non-maximum suppression for inference.
6. ``FCOS``: puts it together, computes the training losses (focal loss,
   GIoU or L1 box loss, centerness BCE) and runs inference.

Conventions used throughout:

* Boxes are ``(x1, y1, x2, y2)`` in absolute pixels of the input image.
* Ground truth for a batch is a ``(B, N, 5)`` tensor of rows
  ``(x1, y1, x2, y2, class_id)``; images with fewer than ``N`` boxes are
  padded with rows of ``-1``. Background / unmatched rows are also ``-1``.
* Per-level tensors live in dicts keyed ``"p3"``, ``"p4"``, ``"p5"`` (FPN)
  or ``"c3"``, ``"c4"``, ``"c5"`` (backbone).
* Everything is device and dtype agnostic (float64 works) and vectorized.

Code that students write is wrapped in ``# BEGIN SOLUTION (part): ...`` /
``# END SOLUTION`` markers; the release tool replaces each region by a
``TODO`` and a ``NotImplementedError``.
"""
from __future__ import annotations

import contextlib
import math
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models import feature_extraction

# Provided fast kernels (see a5/kernels.py): the same results as the plain code of this
# chapter, faster. Training and inference use them.
from a5.kernels import (  # noqa: F401  (GroupNorm, fold_batchnorm: re-exported)
    GroupNorm,
    batched_nms,
    fold_batchnorm,
    select_detections,
    without_outputs,
    split_kept_per_image,
    to_fast_layout,
)

TensorDict = Dict[str, torch.Tensor]
ImagesOrFeatures = Union[torch.Tensor, TensorDict]


def hello_fcos() -> None:
    """Print a greeting, to check that the module imports fine."""
    print("Hello from fcos.py!")


###############################################################################
# Backbone with Feature Pyramid Network (FPN)
###############################################################################


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one torchvision backbone and where to tap c3/c4/c5.

    Attributes:
        constructor: torchvision model builder, e.g. ``models.regnet_x_400mf``.
        weights: torchvision ImageNet weights enum member used when
            ``pretrained=True``.
        return_nodes: graph node name -> "c3"/"c4"/"c5" for
            ``torchvision.models.feature_extraction.create_feature_extractor``.
        channels: number of channels of c3, c4, c5 (strides 8, 16, 32).
    """

    constructor: Callable[..., nn.Module]
    weights: Any
    return_nodes: Dict[str, str]
    channels: Dict[str, int]


BACKBONE_SPECS: Dict[str, BackboneSpec] = {
    # The course default: RegNetX-400MF; c3/c4/c5 are the outputs of its
    # stages 2, 3, 4.
    "regnet_x_400mf": BackboneSpec(
        constructor=torchvision.models.regnet_x_400mf,
        weights=torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V1,
        return_nodes={
            "trunk_output.block2": "c3",
            "trunk_output.block3": "c4",
            "trunk_output.block4": "c5",
        },
        channels={"c3": 64, "c4": 160, "c5": 400},
    ),
    # MobileNetV2: the last inverted-residual block at each stride
    # (features.6 -> stride 8, features.13 -> stride 16) and the final 1x1
    # conv (features.18, stride 32), as torchvision's detection models do.
    "mobilenet_v2": BackboneSpec(
        constructor=torchvision.models.mobilenet_v2,
        weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
        return_nodes={"features.6": "c3", "features.13": "c4", "features.18": "c5"},
        channels={"c3": 32, "c4": 96, "c5": 1280},
    ),
}


def _load_pretrained_state_dict(backbone: str, weights: Any) -> Dict[str, Any]:
    """Load ImageNet weights through torchvision's weights API.

    The weights API looks into ``torch.hub.get_dir()/checkpoints`` (i.e.
    ``$TORCH_HOME/hub/checkpoints``) first and downloads otherwise. Offline
    and without a cached file the download raises (``URLError`` is an
    ``OSError``); we turn that into an error that says what to do.
    """
    file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise RuntimeError(
            f"Could not load the pretrained ImageNet weights of backbone "
            f"'{backbone}' ({type(weights).__name__}.{weights.name}): the file "
            f"'{file_name}' is not in the cache folder '{cache_dir}' (or is "
            f"unreadable) and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Either build the model with "
            f"pretrained=False (random initialisation), copy '{file_name}' into "
            f"'{cache_dir}', or use backbone='mobilenet_v2' with TORCH_HOME set "
            f"to a folder that holds hub/checkpoints/mobilenet_v2-b0353104.pth "
            f"(the offline weights, e.g. TORCH_HOME=/work/shared/weights)."
        ) from exc


def build_backbone_body(backbone: str, pretrained: bool = True) -> Tuple[nn.Module, str]:
    """
    Build the CNN "body" of a detection backbone: a torchvision classifier cut
    after its stride-32 stage, returning the dict ``{"c3", "c4", "c5"}``.

    Args:
        backbone: Key of ``BACKBONE_SPECS``.
        pretrained: Load the ImageNet weights (see
            ``_load_pretrained_state_dict`` for the error when they cannot be
            loaded); otherwise random initialisation.

    Returns:
        ``(body, weights_name)``: the feature extractor (an fx ``GraphModule``
        keeping torchvision's parameter names) and the name of the weights,
        e.g. "MobileNet_V2_Weights.IMAGENET1K_V1", or "random".
    """
    spec = BACKBONE_SPECS.get(backbone)
    if spec is None:
        raise ValueError(f"Unknown backbone '{backbone}', expected one of {sorted(BACKBONE_SPECS)}.")
    # Build the classifier without weights, then load the state dict
    # ourselves: this way a failed download is caught precisely (and not some
    # unrelated error raised while building the model). BatchNorm is left
    # exactly as torchvision builds it.
    cnn = spec.constructor(weights=None)
    if pretrained:
        cnn.load_state_dict(_load_pretrained_state_dict(backbone, spec.weights))
        weights_name = f"{type(spec.weights).__name__}.{spec.weights.name}"
    else:
        weights_name = "random"
    # Keep only the layers up to c5 and return the three taps as a dict.
    body = feature_extraction.create_feature_extractor(cnn, return_nodes=spec.return_nodes)
    return body, weights_name


def last_stage_of(body: nn.Module) -> nn.Module:
    """
    The part of a CNN body (``build_backbone_body``) that computes c5 from c4.

    The body is an fx graph; the stage is its sub-graph between the c4 and c5
    nodes, as a ``GraphModule`` that calls the body's own layers (same weights).

    Returns:
        A module mapping c4 ``(B, C4, H/16, W/16)`` to c5 ``(B, C5, H/32, W/32)``.
    """
    graph = body.graph
    taps = next(node for node in graph.nodes if node.op == "output").args[0]
    c4, c5 = taps["c4"], taps["c5"]
    # The nodes c5 depends on that c4 feeds (the graph is in topological order).
    after_c4 = {c4}
    for node in graph.nodes:
        if any(arg in after_c4 for arg in node.all_input_nodes):
            after_c4.add(node)
    needed = {c5}
    for node in reversed(list(graph.nodes)):
        if node in needed:
            needed.update(node.all_input_nodes)
    stage = torch.fx.Graph()
    env = {c4: stage.placeholder("c4")}
    for node in graph.nodes:
        if node in after_c4 and node in needed and node is not c4:
            env[node] = stage.node_copy(node, lambda n: env[n])
    stage.output(env[c5])
    return torch.fx.GraphModule(body, stage)


def unfreeze_except_batchnorm(module: nn.Module) -> None:
    """Let every parameter of ``module`` train except BatchNorm's affine weights
    (its statistics are buffers and follow the module's train/eval mode)."""
    for layer in module.modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for param in layer.parameters(recurse=False):
                param.requires_grad_(True)


def image_size_of(x: ImagesOrFeatures) -> Tuple[int, int]:
    """Return the ``(H, W)`` of the images that ``x`` stands for.

    Args:
        x: Either an image batch of shape ``(B, 3, H, W)``, or a dict of
            backbone features (keys "c3", "c4", "c5") as returned by
            ``DetectorBackboneWithFPN.extract_features`` (e.g. loaded from a
            feature cache).

    Returns:
        ``(H, W)``. For features this is ``8 * (H_c3, W_c3)`` (c3 has stride
        8), which equals the image size when it is a multiple of 8 and
        otherwise rounds it up to the next multiple of 8.
    """
    if isinstance(x, dict):
        key = "c3" if "c3" in x else "p3"
        feat = x[key]
        return 8 * int(feat.shape[-2]), 8 * int(feat.shape[-1])
    return int(x.shape[-2]), int(x.shape[-1])


def as_image_batch(
    images: Union[ImagesOrFeatures, Sequence[torch.Tensor]],
) -> Tuple[Optional[ImagesOrFeatures], Optional[List[Tuple[int, int]]]]:
    """Provided helper for ``predict``: ``(batch, sizes)`` from what a user passes.

    * A ``(B, 3, H, W)`` tensor or a dict of features: returned as is, ``sizes=None``.
    * A list / tuple of ``(3, H_i, W_i)`` images of any sizes: zero-padded at the bottom
      and right into one ``(B, 3, H, W)`` batch (``H, W`` the largest sides rounded up to
      a multiple of 32), with ``sizes = [(H_i, W_i), ...]`` so that the caller can clip
      each image's boxes to it (padding leaves pixel coordinates unchanged).
    * An empty list or a batch of zero images: ``(None, [])``.
    """
    if isinstance(images, dict):
        key = "c3" if "c3" in images else next(iter(images))
        return (None, []) if images[key].shape[0] == 0 else (images, None)
    if torch.is_tensor(images):
        return (None, []) if images.shape[0] == 0 else (images, None)
    images = list(images)
    if not images:
        return None, []
    for i, image in enumerate(images):
        if not torch.is_tensor(image) or image.dim() != 3:
            raise ValueError(f"images[{i}]: expected a (3, H, W) tensor, got "
                             f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    H = -(-max(h for h, _ in sizes) // 32) * 32
    W = -(-max(w for _, w in sizes) // 32) * 32
    batch = images[0].new_zeros((len(images), images[0].shape[0], H, W))
    for b, (image, (h, w)) in enumerate(zip(images, sizes)):
        batch[b, :, :h, :w] = image
    return batch, sizes


def clip_to_image_sizes(
    detections: List[TensorDict], sizes: Optional[List[Tuple[int, int]]]
) -> List[TensorDict]:
    """Provided helper for ``predict``: with the ``sizes`` of ``as_image_batch`` (a padded
    list of images), clip each image's boxes to its own ``(H_i, W_i)`` and drop the boxes
    that become empty; ``sizes=None`` (a regular batch): the detections as they are."""
    for result, (height, width) in zip(detections, sizes or ()):
        boxes = clip_boxes(result["boxes"], (height, width))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        result.update({key: value[keep] for key, value in {**result, "boxes": boxes}.items()})
    return detections


class DetectorBackboneWithFPN(nn.Module):
    r"""
    Detection backbone network: a small ImageNet CNN followed by a Feature
    Pyramid Network (FPN).

    The CNN gives three feature maps ``c3, c4, c5`` at strides 8, 16, 32 (a
    cell of ``c4`` sees a 16x16 patch of the image, etc.). Deep maps are
    semantically strong but coarse, shallow maps are fine but weak; the FPN
    (Lin et al. 2017, Figure 3) mixes them:

    1. A 1x1 "lateral" conv maps each ``c_i`` to ``out_channels`` channels.
    2. Top-down pathway: starting from the coarsest level, the running
       feature is upsampled (nearest neighbour) to the *exact* spatial size
       of the next finer lateral output and added to it. Using the exact
       size (not a factor of 2) makes odd image sizes work.
    3. A 3x3 "output" conv on every merged map gives ``p3, p4, p5``.

    ```
     c5 --1x1--> lat5 ---------------------------3x3--> p5
                   | upsample
     c4 --1x1--> lat4 + up(lat5) = m4 -----------3x3--> p4
                                    | upsample
     c3 --1x1--> lat3 + up(m4)   = m3 -----------3x3--> p3
    ```

    Frozen mode (``freeze_backbone=True``): the CNN gets no gradients and stays
    in eval mode (its BatchNorm uses the ImageNet statistics) even after
    ``.train()``; only the FPN trains. Then the CNN is a fixed function, so
    its features can be computed once (``extract_features``), cached, and fed
    back to ``forward`` as a dict instead of images.

    ``tune_last_stage=True`` (with a frozen CNN) fine-tunes the CNN's last
    stage, the one that computes c5 from c4: ``forward`` then recomputes c5
    from c4 (cached or not), so that the deepest features adapt to detection
    while c3/c4 can still be cached. At stride 32 the stage is cheap (7x7 at
    224 px) and it is worth several AP points over a fully frozen CNN. Its
    BatchNorm layers stay frozen (ImageNet statistics and affine weights):
    batches of 16 would estimate them poorly.
    """

    def __init__(
        self,
        out_channels: int,
        backbone: str = "regnet_x_400mf",
        pretrained: bool = True,
        freeze_backbone: bool = False,
        tune_last_stage: bool = False,
    ):
        """
        Args:
            out_channels: Number of channels of every FPN output (p3/p4/p5).
            backbone: Key of ``BACKBONE_SPECS``: "regnet_x_400mf" (course
                default) or "mobilenet_v2".
            pretrained: Load ImageNet weights via torchvision's weights API
                (cached under ``$TORCH_HOME/hub/checkpoints``). If they cannot
                be loaded a ``RuntimeError`` explains the options.
            freeze_backbone: Freeze the CNN (see the class docstring).
            tune_last_stage: With ``freeze_backbone``, train the CNN's last
                stage all the same (see the class docstring).
        """
        super().__init__()
        spec = BACKBONE_SPECS.get(backbone)
        if spec is None:
            raise ValueError(
                f"Unknown backbone '{backbone}', expected one of {sorted(BACKBONE_SPECS)}."
            )
        if tune_last_stage and not freeze_backbone:
            raise ValueError("tune_last_stage=True trains the last stage of a frozen CNN: pass "
                             "freeze_backbone=True too (an unfrozen CNN trains every stage anyway).")
        self.backbone_name = backbone
        self.out_channels = out_channels
        self.freeze_backbone = freeze_backbone
        self.tune_last_stage = tune_last_stage

        # The CNN body returns {"c3", "c4", "c5"}.
        self.backbone, self.weights_name = build_backbone_body(backbone, pretrained)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # The c4 -> c5 part of the CNN as a module of its own, sharing the CNN's
        # weights; kept out of the registered children (no duplicate state-dict keys).
        self.__dict__["_last_stage"] = last_stage_of(self.backbone)
        if tune_last_stage:
            unfreeze_except_batchnorm(self.last_stage())

        # Channels of c3, c4, c5 (e.g. 64, 160, 400 for RegNetX-400MF).
        in_channels = spec.channels
        self.fpn_params = nn.ModuleDict()
        # BEGIN SOLUTION (fpn): Create a 1x1 lateral conv for each of c3/c4/c5 and a 3x3 output conv (padding 1) for each of p3/p4/p5 in self.fpn_params, all with out_channels outputs.
        for level in ("3", "4", "5"):
            self.fpn_params[f"lateral_c{level}"] = nn.Conv2d(
                in_channels[f"c{level}"], out_channels, kernel_size=1
            )
            self.fpn_params[f"output_p{level}"] = nn.Conv2d(
                out_channels, out_channels, kernel_size=3, padding=1
            )
        # END SOLUTION

    def train(self, mode: bool = True) -> "DetectorBackboneWithFPN":
        """Set train/eval mode; a frozen CNN always stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    @property
    def fpn_strides(self) -> Dict[str, int]:
        """Total stride of each FPN level w.r.t. the input image."""
        return {"p3": 8, "p4": 16, "p5": 32}

    def last_stage(self) -> nn.Module:
        """The part of the CNN that maps c4 to c5 (its own layers, not copies)."""
        return self.__dict__["_last_stage"]

    def extract_features(self, images: torch.Tensor, with_c5: bool = True) -> TensorDict:
        """
        Run only the CNN.

        Args:
            images: Tensor of shape ``(B, 3, H, W)``, normalized as for
                ImageNet.
            with_c5: ``False`` leaves c5 out (with ``tune_last_stage`` its
                stage is then not run: a feature cache stores c3/c4 only).

        Returns:
            Dict with keys "c3", "c4", "c5" (no "c5" with ``with_c5=False``) of
            shapes ``(B, C_i, H/s, W/s)`` (rounded up) for strides ``s`` = 8,
            16, 32. Computed without autograd when the backbone is frozen
            (nothing to train there).
        """
        if self.freeze_backbone and self.backbone.training:
            # train() keeps a frozen CNN in eval mode, but a deepcopy of the fx
            # feature extractor (or a direct .train() on it) can flip it back.
            self.backbone.eval()
        context = torch.no_grad() if self.freeze_backbone else contextlib.nullcontext()
        with context:
            # In eval mode without autograd, BatchNorm is a fixed affine map:
            # run the copy with BatchNorm folded into the convs (faster).
            use_folded = not self.backbone.training and not torch.is_grad_enabled()
            body = self._folded_backbone() if use_folded else self.backbone
            feats = dict(body(to_fast_layout(images)))
            if self.tune_last_stage and with_c5:
                # The folded copy is not rebuilt for every step of the stage being trained
                # and stops at c4: c5 comes from the live stage.
                feats["c5"] = self.last_stage()(feats["c4"])
            if not with_c5:
                feats.pop("c5", None)
            return feats

    def _folded_backbone(self) -> nn.Module:
        """``fold_batchnorm(self.backbone)``, rebuilt whenever the backbone's
        tensors change: a new device or dtype, loaded weights, an optimizer
        step (every in-place write bumps a tensor's version counter). The copy
        is kept outside the module's registered children, so it is not in the
        state dict, the parameters or the checkpoints. With ``tune_last_stage``
        it stops at c4 (``extract_features`` runs the live last stage)."""
        tensors = list(self.backbone.parameters()) + list(self.backbone.buffers())
        if self.tune_last_stage:  # changes at every step; extract_features recomputes its c5
            tensors = [t for t in tensors if not t.requires_grad]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_folded_backbone_cache")
        if cached is None or cached[0] != key:
            folded = fold_batchnorm(self.backbone)
            cached = (key, without_outputs(folded, ("c5",)) if self.tune_last_stage else folded)
            self.__dict__["_folded_backbone_cache"] = cached
        return cached[1]

    def forward(self, images: ImagesOrFeatures) -> TensorDict:
        """
        Args:
            images: Images ``(B, 3, H, W)``, or a dict of backbone features with
                keys "c3", "c4", "c5" (then the CNN is skipped, e.g. when
                training a frozen-backbone model from a feature cache; "c5" may
                be left out with ``tune_last_stage``, which recomputes it).

        Returns:
            Dict with keys "p3", "p4", "p5": FPN features of shape
            ``(B, out_channels, H_i, W_i)`` where ``(H_i, W_i)`` is the size of
            ``c_i``.
        """
        # c5 from the stage being trained, with its gradient (a cached c5 is from its
        # ImageNet weights; extract_features computes it without autograd).
        recompute_c5 = self.tune_last_stage and (isinstance(images, dict) or torch.is_grad_enabled())
        if isinstance(images, dict):
            # Cached features: same memory layout as freshly computed ones, so
            # that both give the same numbers.
            backbone_feats = {name: to_fast_layout(feat) for name, feat in images.items()}
            if "c5" not in backbone_feats and not self.tune_last_stage:
                raise ValueError("the feature dict has no 'c5': only a backbone built with "
                                 "tune_last_stage=True recomputes it from 'c4'")
        else:
            backbone_feats = self.extract_features(images, with_c5=not recompute_c5)
        if recompute_c5:
            backbone_feats["c5"] = self.last_stage()(backbone_feats["c4"])

        fpn_feats: TensorDict = {}
        # BEGIN SOLUTION (fpn): Compute p3/p4/p5 from c3/c4/c5 with lateral 1x1 convs, top-down nearest upsampling to the exact size of the finer lateral output (add), then 3x3 output convs.
        merged = self.fpn_params["lateral_c5"](backbone_feats["c5"])
        fpn_feats["p5"] = self.fpn_params["output_p5"](merged)
        for level in ("4", "3"):
            lateral = self.fpn_params[f"lateral_c{level}"](backbone_feats[f"c{level}"])
            # Upsample to the lateral's exact size: with an odd image size the
            # finer map is not exactly twice as large as the coarser one.
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + top_down
            fpn_feats[f"p{level}"] = self.fpn_params[f"output_p{level}"](merged)
        # END SOLUTION
        return {name: fpn_feats[name] for name in ("p3", "p4", "p5")}


###############################################################################
# Locations, prediction head
###############################################################################


def get_fpn_location_coords(
    shape_per_fpn_level: Dict[str, Sequence[int]],
    strides_per_fpn_level: Dict[str, int],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> TensorDict:
    """
    Map every cell of every FPN feature map to the absolute image coordinates
    of the centre of its receptive field: cell ``(i, j)`` (row ``i``, column
    ``j``) of a level with stride ``s`` is the location
    ``(x, y) = (s * (j + 0.5), s * (i + 0.5))``.

    Args:
        shape_per_fpn_level: Shape of the FPN feature of each level, e.g.
            ``{"p3": (B, C, H3, W3), ...}``; only the last two entries
            ``(H, W)`` are used.
        strides_per_fpn_level: Dict of the same keys, e.g. ``{"p3": 8, ...}``.
        dtype, device: Of the returned tensors.

    Returns:
        Dict of the same keys: tensors of shape ``(H * W, 2)`` holding the
        ``(x, y)`` location of each cell, in row-major order (x varies
        fastest), i.e. the order of ``feature.flatten(2)``.
    """
    location_coords: TensorDict = {}
    # BEGIN SOLUTION (locations): For each level, build the (H*W, 2) tensor of (x, y) = stride * (index + 0.5) with x varying fastest.
    for level_name, feat_shape in shape_per_fpn_level.items():
        stride = strides_per_fpn_level[level_name]
        height, width = int(feat_shape[-2]), int(feat_shape[-1])
        xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) * stride
        ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) * stride
        # "ij" indexing: the first output varies along rows (y), the second
        # along columns (x), so flattening makes x vary fastest.
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        location_coords[level_name] = torch.stack(
            [grid_x.reshape(-1), grid_y.reshape(-1)], dim=1
        )
    # END SOLUTION
    return location_coords


def _group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: 32 as in FCOS when it divides ``channels``,
    otherwise the largest common divisor (so any width works)."""
    return math.gcd(max_groups, channels)


class FCOSPredictionNetwork(nn.Module):
    """
    FCOS prediction head, shared by all FPN levels.

    Two parallel "stems" process each FPN feature map: one for classification
    and one for box regression. A stem is a stack of
    ``Conv3x3 -> GroupNorm -> ReLU`` blocks, one per entry of
    ``stem_channels``. On top of them three 3x3 conv layers predict, for every
    location:

    * ``pred_cls``: ``num_classes`` logits (one sigmoid classifier per class,
      no background class),
    * ``pred_box``: 4 box regression deltas ``(l, t, r, b)`` (distances to the
      box sides, divided by the level's stride),
    * ``pred_ctr``: 1 centerness logit. As in FCOS v2 it sits on the **box**
      stem: centerness is a property of the box geometry.

    Initialization (as in the course / paper): conv weights ~ N(0, 0.01^2),
    biases 0, except the classification bias, set so that every class starts
    with probability 0.01 (focal-loss prior): without it the huge number of
    background locations dominates the first iterations.
    """

    def __init__(self, num_classes: int, in_channels: int, stem_channels: List[int]):
        """
        Args:
            num_classes: Number of object classes (no background class).
            in_channels: Number of channels of the FPN features.
            stem_channels: Output channels of each conv of a stem, e.g.
                ``[256, 256, 256, 256]`` for the 4-conv head of the paper.
        """
        super().__init__()
        # BEGIN SOLUTION (fcos_head): Build stem_cls and stem_box (Conv3x3-GroupNorm-ReLU per entry of stem_channels) and the 3x3 conv layers pred_cls, pred_box, pred_ctr (centerness on the box stem); init weights N(0, 0.01), biases 0, pred_cls bias at the 0.01 prior.
        def make_stem() -> nn.Sequential:
            layers: List[nn.Module] = []
            channels = in_channels
            for out_channels in stem_channels:
                layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
                layers.append(GroupNorm(_group_norm_groups(out_channels), out_channels))
                layers.append(nn.ReLU())
                channels = out_channels
            return nn.Sequential(*layers)

        self.stem_cls = make_stem()
        self.stem_box = make_stem()
        head_channels = stem_channels[-1] if len(stem_channels) > 0 else in_channels
        self.pred_cls = nn.Conv2d(head_channels, num_classes, kernel_size=3, padding=1)
        self.pred_box = nn.Conv2d(head_channels, 4, kernel_size=3, padding=1)
        self.pred_ctr = nn.Conv2d(head_channels, 1, kernel_size=3, padding=1)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        # sigmoid(bias) = prior  <=>  bias = -log((1 - prior) / prior).
        prior = 0.01
        nn.init.constant_(self.pred_cls.bias, -math.log((1 - prior) / prior))
        # END SOLUTION

    def forward(self, feats_per_fpn_level: TensorDict) -> List[TensorDict]:
        """
        Args:
            feats_per_fpn_level: FPN features, ``{"p3": (B, C, H3, W3), ...}``.

        Returns:
            ``[class_logits, boxreg_deltas, centerness_logits]``, each a dict
            with the same keys, holding tensors of shape ``(B, H*W, C')`` with
            ``C'`` = ``num_classes``, 4 and 1 respectively. Locations are in
            the row-major order of ``get_fpn_location_coords``.
        """
        class_logits: TensorDict = {}
        boxreg_deltas: TensorDict = {}
        centerness_logits: TensorDict = {}
        # BEGIN SOLUTION (fcos_head): Run both stems on every level and reshape the pred_cls / pred_box / pred_ctr outputs from (B, C, H, W) to (B, H*W, C).
        def flatten(x: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, H*W, C): same location order as
            # get_fpn_location_coords (x varies fastest).
            return x.flatten(start_dim=2).transpose(1, 2)

        for level_name, feats in feats_per_fpn_level.items():
            cls_feats = self.stem_cls(feats)
            box_feats = self.stem_box(feats)
            class_logits[level_name] = flatten(self.pred_cls(cls_feats))
            boxreg_deltas[level_name] = flatten(self.pred_box(box_feats))
            centerness_logits[level_name] = flatten(self.pred_ctr(box_feats))
        # END SOLUTION
        return [class_logits, boxreg_deltas, centerness_logits]


###############################################################################
# Target assignment, box encoding
###############################################################################


def _cat_across_fpn_levels(dict_with_fpn_levels: TensorDict, dim: int = 1) -> torch.Tensor:
    """Concatenate the per-level tensors of a dict along ``dim`` (in the
    dict's level order, i.e. p3, p4, p5)."""
    return torch.cat(list(dict_with_fpn_levels.values()), dim=dim)


def fcos_candidates_inside_boxes(
    locations: torch.Tensor,
    gt_boxes: torch.Tensor,
    strides: torch.Tensor,
    center_sampling_radius: Optional[float] = 1.5,
) -> torch.Tensor:
    """
    Matching, step 1: which locations lie inside which GT boxes.

    Location ``(x, y)`` is a candidate for box ``(x1, y1, x2, y2, class)`` when

    * it lies strictly inside the box: ``x1 < x < x2`` and ``y1 < y < y2``;
    * (centre sampling, FCOS v2) it is also close to the box centre ``(cx, cy)``:
      ``|x - cx| < radius * stride`` and ``|y - cy| < radius * stride``, with the
      stride of the location's level. Locations near the border of a box mostly see
      background or other objects; this makes the positives cleaner. ``None`` skips
      this test (the plain rule of the 2019 paper and of the course);
    * the box is real: padding rows (class ``-1``) are never candidates.

    Compare all locations with all boxes of all images at once (broadcasting
    ``(1, L, 1)`` against ``(B, 1, N)``), with no Python loop.

    Args:
        locations: ``(L, 2)`` (x, y) locations of all levels, concatenated.
        gt_boxes: ``(B, N, 5)`` GT boxes, rows ``(x1, y1, x2, y2, class)``, padded with
            rows of ``-1``.
        strides: ``(L,)`` stride of each location's level.
        center_sampling_radius: Radius in units of the stride, or ``None``.

    Returns:
        ``(B, L, N)`` bool: entry ``[b, l, n]`` is True when location ``l`` is a
        candidate for box ``n`` of image ``b``.
    """
    x = locations[:, 0].view(1, -1, 1)
    y = locations[:, 1].view(1, -1, 1)
    x1, y1, x2, y2, class_ids = (column.unsqueeze(1) for column in gt_boxes.unbind(dim=2))  # (B, 1, N)
    # BEGIN SOLUTION (fcos_match_inside): Mark (location, box) pairs with the location strictly inside the box and the box real (class >= 0); with a radius, also require |x - cx| and |y - cy| below radius * stride.
    is_candidate = (x > x1) & (y > y1) & (x < x2) & (y < y2) & (class_ids >= 0)
    if center_sampling_radius is not None:
        radius = center_sampling_radius * strides.view(1, -1, 1)
        near_x = (x - (x1 + x2) / 2).abs() < radius
        near_y = (y - (y1 + y2) / 2).abs() < radius
        is_candidate = is_candidate & near_x & near_y
    # END SOLUTION
    return is_candidate


def fcos_candidates_in_scale_range(
    locations: torch.Tensor,
    gt_boxes: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
) -> torch.Tensor:
    """
    Matching, step 2: each FPN level handles one range of object sizes.

    For a location and a box, let ``(l, t, r, b)`` be the distances from the location
    to the left, top, right and bottom sides of the box. The pair fits the location's
    level when ``lower < max(l, t, r, b) < upper`` with that level's bounds (from
    ``fcos_level_scale_ranges``: ``(0, 64)`` for p3, ``(64, 128)`` for p4,
    ``(128, inf)`` for p5).

    Args:
        locations: ``(L, 2)`` (x, y) locations of all levels, concatenated.
        gt_boxes: ``(B, N, 5)`` GT boxes (the class column is not used here).
        lower, upper: ``(L,)`` bounds of each location's level.

    Returns:
        ``(B, L, N)`` bool.
    """
    x = locations[:, 0].view(1, -1, 1)
    y = locations[:, 1].view(1, -1, 1)
    x1, y1, x2, y2 = (column.unsqueeze(1) for column in gt_boxes[..., :4].unbind(dim=2))  # (B, 1, N)
    # BEGIN SOLUTION (fcos_match_scale): Compute the (B, L, N) distances l, t, r, b, take their maximum and keep the pairs with lower < max < upper (bounds of the location's level).
    left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y
    max_dist = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    in_range = (max_dist > lower.view(1, -1, 1)) & (max_dist < upper.view(1, -1, 1))
    # END SOLUTION
    return in_range


def fcos_pick_smallest_box(is_candidate: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """
    Matching, step 3: when a location is a candidate for several boxes, it regresses
    the one with the smallest area (the ambiguous location most likely belongs to the
    small object in front); with equal areas, the first of them. A location without
    any candidate box is background: a row of ``-1``.

    Hint: give non-candidate pairs an infinite area and take the minimum over boxes
    (``torch.min`` returns the first index among equal values), then gather the rows.

    Args:
        is_candidate: ``(B, L, N)`` bool, the result of steps 1 and 2 combined.
        gt_boxes: ``(B, N, 5)`` GT boxes.

    Returns:
        ``(B, L, 5)``: the GT row matched to every location, ``-1`` for background.
    """
    # BEGIN SOLUTION (fcos_match_smallest): Mask the (B, 1, N) box areas with inf where not a candidate, take the argmin over boxes, gather those GT rows, and set locations without any candidate to -1.
    x1, y1, x2, y2 = (column.unsqueeze(1) for column in gt_boxes[..., :4].unbind(dim=2))  # (B, 1, N)
    areas = (x2 - x1) * (y2 - y1)
    masked_areas = torch.where(is_candidate, areas, torch.full_like(areas, float("inf")))
    matched_idx = masked_areas.min(dim=2).indices  # (B, L)
    matched = torch.gather(gt_boxes, 1, matched_idx.unsqueeze(2).expand(-1, -1, 5))
    has_match = is_candidate.any(dim=2, keepdim=True)
    matched = torch.where(has_match, matched, torch.full_like(matched, -1))
    # END SOLUTION
    return matched


def fcos_level_scale_ranges(strides_per_fpn_level: Dict[str, int]) -> Dict[str, Tuple[float, float]]:
    """``(lower, upper)`` bound of ``max(l, t, r, b)`` per level: ``(4 s, 8 s)`` for
    stride ``s``, with no lower bound on the first (finest) and no upper bound on the
    last level, so that every box size has a level."""
    names = list(strides_per_fpn_level)
    ranges = {}
    for i, name in enumerate(names):
        stride = float(strides_per_fpn_level[name])
        lower = 0.0 if i == 0 else 4 * stride
        upper = float("inf") if i == len(names) - 1 else 8 * stride
        ranges[name] = (lower, upper)
    return ranges


@torch.no_grad()
def fcos_match_locations_to_gt(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Dict[str, int],
    gt_boxes: torch.Tensor,
    center_sampling_radius: Optional[float] = 1.5,
) -> TensorDict:
    """
    Match every location of every FPN level with a GT box or background, in three
    steps that you write: a location is a candidate for the boxes it lies inside
    (``fcos_candidates_inside_boxes``) and whose size suits its level
    (``fcos_candidates_in_scale_range``); among its candidates it takes the smallest
    box (``fcos_pick_smallest_box``). Locations without candidates are background.

    Provided: it concatenates the levels, builds the per-location strides and scale
    ranges, and runs the three steps for all levels and images at once.

    Args:
        locations_per_fpn_level: ``{"p3": (H3*W3, 2), ...}`` (x, y) locations,
            as from ``get_fpn_location_coords``.
        strides_per_fpn_level: ``{"p3": 8, ...}``, same keys, ordered from the finest
            to the coarsest level.
        gt_boxes: ``(N, 5)`` GT boxes of one image, or ``(B, N, 5)`` for a batch; rows
            ``(x1, y1, x2, y2, class_id)``. Padding rows (class ``-1``) never match.
        center_sampling_radius: Radius of centre sampling in units of the level's
            stride (FCOS v2 default 1.5), or ``None``.

    Returns:
        Dict with the same keys: the matched GT row of every location, of shape
        ``(H*W, 5)`` (or ``(B, H*W, 5)`` for batched ``gt_boxes``); background
        locations get a row of ``-1``.
    """
    # Long: the docstring states every argument's shape (the course style); the code is 30 lines.
    level_names = list(locations_per_fpn_level.keys())
    is_batched = gt_boxes.dim() == 3
    gt = gt_boxes if is_batched else gt_boxes.unsqueeze(0)  # (B, N, 5)
    num_locations = [locations_per_fpn_level[name].shape[0] for name in level_names]
    locations = _cat_across_fpn_levels(locations_per_fpn_level, dim=0)  # (L, 2)
    dtype = torch.promote_types(locations.dtype, gt.dtype)
    locations, gt = locations.to(dtype), gt.to(dtype)

    if gt.shape[1] == 0:
        matched = gt.new_full((gt.shape[0], locations.shape[0], 5), -1)
    else:
        # Per-location stride and scale range: one set of broadcast comparisons
        # handles all levels.
        counts = torch.tensor(num_locations, device=locations.device)
        ranges = fcos_level_scale_ranges({name: strides_per_fpn_level[name] for name in level_names})

        def per_location(values: List[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=locations.device).repeat_interleave(counts)

        strides = per_location([float(strides_per_fpn_level[name]) for name in level_names])
        lower = per_location([ranges[name][0] for name in level_names])
        upper = per_location([ranges[name][1] for name in level_names])
        is_candidate = fcos_candidates_inside_boxes(locations, gt, strides, center_sampling_radius)
        is_candidate &= fcos_candidates_in_scale_range(locations, gt, lower, upper)
        matched = fcos_pick_smallest_box(is_candidate, gt)

    if not is_batched:
        matched = matched.squeeze(0)
    per_level = matched.split(num_locations, dim=-2)
    return {name: level for name, level in zip(level_names, per_level)}


def fcos_get_deltas_from_locations(
    locations: torch.Tensor,
    gt_boxes: torch.Tensor,
    stride: Union[int, float, torch.Tensor],
) -> torch.Tensor:
    """
    Compute the regression targets ``(l, t, r, b)`` of locations w.r.t. their
    matched GT boxes: the distances from the location to the left, top, right
    and bottom box sides, divided by the level's stride (so that targets of
    all levels have similar magnitude).

    Args:
        locations: ``(N, 2)`` (x, y) locations; extra leading dims are allowed
            and broadcast against ``gt_boxes`` (e.g. ``(N, 2)`` with
            ``(B, N, 5)``).
        gt_boxes: ``(..., N, 4 or 5)`` matched GT boxes. Background rows are
            ``-1`` in all coordinates.
        stride: Stride of the level; a number, or a tensor broadcastable to
            ``(..., N, 1)`` (one stride per location when several levels are
            concatenated).

    Returns:
        ``(..., N, 4)`` deltas; ``-1`` in all four entries for background.
    """
    # BEGIN SOLUTION (fcos_deltas): Compute (x - x1, y - y1, x2 - x, y2 - y) / stride and set background rows (all box coordinates -1) to -1.
    boxes = gt_boxes[..., :4]
    deltas = torch.cat([locations - boxes[..., :2], boxes[..., 2:] - locations], dim=-1) / stride
    is_background = (boxes == -1).all(dim=-1, keepdim=True)
    deltas = torch.where(is_background, torch.full_like(deltas, -1), deltas)
    # END SOLUTION
    return deltas


def fcos_apply_deltas_to_locations(
    deltas: torch.Tensor,
    locations: torch.Tensor,
    stride: Union[int, float, torch.Tensor],
) -> torch.Tensor:
    """
    Inverse of ``fcos_get_deltas_from_locations``: turn predicted deltas
    ``(l, t, r, b)`` into boxes ``(x - l*s, y - t*s, x + r*s, y + b*s)``.

    Negative deltas are meaningless (a location must lie inside its box), so
    they are clamped at 0 first; background deltas (``-1``) thus decode to the
    degenerate box at the location itself.

    Args:
        deltas: ``(..., N, 4)`` box deltas.
        locations: ``(..., N, 2)`` (x, y) locations (broadcastable).
        stride: Number, or tensor broadcastable to ``(..., N, 1)``.

    Returns:
        ``(..., N, 4)`` boxes in XYXY format.
    """
    # BEGIN SOLUTION (fcos_deltas): Clamp deltas at 0, multiply by the stride and offset the location by (-l, -t, +r, +b).
    distances = deltas.clamp(min=0) * stride
    output_boxes = torch.cat(
        [locations - distances[..., :2], locations + distances[..., 2:]], dim=-1
    )
    # END SOLUTION
    return output_boxes


def fcos_make_centerness_targets(deltas: torch.Tensor) -> torch.Tensor:
    """
    Centerness of a location inside its box (Tian et al., Eq. 3):

        centerness = sqrt( min(l, r) / max(l, r) * min(t, b) / max(t, b) )

    It is 1 at the box centre and decays towards 0 at the border; at test
    time it down-weights the poor boxes predicted far from object centres.

    Args:
        deltas: ``(..., N, 4)`` deltas ``(l, t, r, b)`` (any common scale);
            background rows are ``-1``.

    Returns:
        ``(..., N)`` centerness targets; ``-1`` for background (any negative
        delta).
    """
    # BEGIN SOLUTION (centerness): Compute sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) and set background rows (negative deltas) to -1.
    left, top, right, bottom = deltas.unbind(dim=-1)
    # Guard 0/0 for degenerate boxes (a location on a side): ratio 0.
    tiny = torch.finfo(deltas.dtype).tiny
    ratio_lr = torch.minimum(left, right) / torch.maximum(left, right).clamp(min=tiny)
    ratio_tb = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=tiny)
    centerness = torch.sqrt((ratio_lr * ratio_tb).clamp(min=0))
    is_background = (deltas < 0).any(dim=-1)
    centerness = torch.where(is_background, torch.full_like(centerness, -1), centerness)
    # END SOLUTION
    return centerness


###############################################################################
# Losses
###############################################################################


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    """
    Focal loss of Lin et al. 2017 (RetinaNet) for independent sigmoid
    classifiers:  ``FL = -alpha_t * (1 - p_t)^gamma * log(p_t)``.

    ``(1 - p_t)^gamma`` shrinks the loss of the many easy (mostly background)
    locations so that the rare hard ones dominate; ``alpha`` balances
    positives and negatives. Same results as ``torchvision.ops.sigmoid_focal_loss``.

    Args:
        inputs: Logits of any shape.
        targets: Same shape, binary targets (1 = this class is present).
        alpha: Weight of positives (negatives get ``1 - alpha``); a negative
            value disables the weighting.
        gamma: Focusing exponent.
        reduction: "none", "mean" or "sum".
    """
    probs = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return _reduce(loss, reduction)


def generalized_box_iou_loss(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    reduction: str = "none",
    eps: float = 1e-7,
) -> torch.Tensor:
    """
    Generalized IoU loss (Rezatofighi et al. 2019) between paired boxes:
    ``1 - GIoU`` with ``GIoU = IoU - (|C| - |A u B|) / |C|`` where ``C`` is
    the smallest box enclosing both. Unlike ``1 - IoU`` it still has a
    gradient when the boxes do not overlap, and it is scale invariant. Same
    results as ``torchvision.ops.generalized_box_iou_loss``.

    Args:
        boxes1, boxes2: ``(..., 4)`` XYXY boxes (paired element-wise).
        reduction: "none", "mean" or "sum".
        eps: Avoids division by zero for degenerate boxes.
    """
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    inter_w = (torch.minimum(x2, x2g) - torch.maximum(x1, x1g)).clamp(min=0)
    inter_h = (torch.minimum(y2, y2g) - torch.maximum(y1, y1g)).clamp(min=0)
    intersection = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    enclosing = (torch.maximum(x2, x2g) - torch.minimum(x1, x1g)) * (
        torch.maximum(y2, y2g) - torch.minimum(y1, y1g)
    )
    giou = iou - (enclosing - union) / (enclosing + eps)
    return _reduce(1 - giou, reduction)


def binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-(p log p + (1 - p) log(1 - p))`` of Bernoulli targets (``0 log 0 = 0``):
    the smallest binary cross-entropy any prediction can reach on soft targets ``p``."""
    return -(torch.special.xlogy(probs, probs) + torch.special.xlogy(1 - probs, 1 - probs))


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"Invalid reduction '{reduction}', expected 'none', 'mean' or 'sum'.")


def fcos_classification_loss(
    pred_cls_logits: torch.Tensor,
    matched_classes: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """
    FCOS loss, term 1: the focal loss of the class logits of **all** locations.

    There is no background class: every class has its own sigmoid classifier, so the
    target of a location is a one-hot vector of its matched class, and all zeros for
    a background location (class ``-1``).

    Args:
        pred_cls_logits: ``(B, L, C)`` class logits of all locations.
        matched_classes: ``(B, L)`` int64 class of each location's matched GT box,
            ``-1`` for background.
        alpha, gamma: Focal-loss parameters (``sigmoid_focal_loss``).

    Returns:
        Scalar: the focal loss summed over all locations and classes (not normalised;
        the caller divides by the number of foreground locations).
    """
    num_classes = pred_cls_logits.shape[-1]
    # BEGIN SOLUTION (fcos_loss_cls): Build (B, L, C) one-hot targets (all zeros for background, class -1) and return the summed sigmoid_focal_loss.
    # Shifting class ids by one maps background (-1) to column 0, which is dropped.
    targets = F.one_hot(matched_classes + 1, num_classes + 1)[..., 1:].to(pred_cls_logits.dtype)
    loss = sigmoid_focal_loss(pred_cls_logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    # END SOLUTION
    return loss


def fcos_box_and_centerness_losses(
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    pred_ctr_logits: torch.Tensor,
    gt_centerness: torch.Tensor,
    centerness_weighted: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    FCOS loss, terms 2 and 3, on the ``K`` **foreground** locations only (background
    locations have no box to regress to):

    * box loss: ``generalized_box_iou_loss`` between predicted and GT boxes. With
      ``centerness_weighted`` (FCOS v2, as the official FCOS and mmdetection do) each
      location's loss is multiplied by its centerness target divided by the mean
      centerness target of the batch (weights of mean 1 keep the loss scale): central
      locations, whose boxes win at inference, get the most box supervision;
    * centerness loss: binary cross-entropy (with logits) between the predicted
      centerness logits and the centerness targets (soft targets in ``[0, 1]``).

    Args:
        pred_boxes: ``(K, 4)`` predicted XYXY boxes of the foreground locations.
        gt_boxes: ``(K, 4)`` their GT boxes.
        pred_ctr_logits: ``(K,)`` predicted centerness logits.
        gt_centerness: ``(K,)`` centerness targets (``fcos_make_centerness_targets``).
        centerness_weighted: Weight the box loss by the centerness targets.

    Returns:
        ``(loss_box, loss_ctr)``: two scalars, each summed over the ``K`` locations
        (0 when ``K == 0``).
    """
    # BEGIN SOLUTION (fcos_loss_box): GIoU loss per location (optionally times gt_centerness / its mean, the mean clamped at 1e-6), summed; plus the summed BCE-with-logits of the centerness.
    giou_loss = generalized_box_iou_loss(pred_boxes, gt_boxes)  # (K,)
    if centerness_weighted and giou_loss.numel() > 0:
        giou_loss = giou_loss * gt_centerness / gt_centerness.mean().clamp(min=1e-6)
    loss_box = giou_loss.sum()
    loss_ctr = F.binary_cross_entropy_with_logits(pred_ctr_logits, gt_centerness, reduction="sum")
    # END SOLUTION
    return loss_box, loss_ctr


###############################################################################
# Non-maximum suppression
###############################################################################


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """
    Non-maximum suppression (greedy): visit the boxes by decreasing score; keep a
    box unless a box kept before it overlaps it with IoU > ``iou_threshold``.

    Write the plain algorithm, with one Python loop over the kept boxes and the IoUs
    of a kept box with all boxes computed at once (broadcasting). It must return
    exactly what ``torchvision.ops.nms`` returns, which fixes three details:

    * boxes with equal scores are visited in their input order: sort with
      ``torch.sort(scores, descending=True, stable=True)``;
    * a box is suppressed only when its IoU is strictly larger than the threshold;
    * the IoU of boxes ``a`` and ``b`` is ``inter / (area_a + area_b - inter)``, where
      ``inter`` is the area of the intersection rectangle (0 when they do not
      overlap). An empty box has IoU 0 / 0 = NaN with another empty box, and NaN is
      never larger than the threshold.

    Training and inference use ``a5.kernels.fast_nms``, which gives the same result
    without the Python loop (it is provided, and it is not what you write here).

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        iou_threshold: Suppress boxes whose IoU with a kept box is larger.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    keep: List[int] = []
    # BEGIN SOLUTION (nms): Sort by score (stable, descending); repeatedly keep the best box that is left and remove the boxes whose IoU with it exceeds iou_threshold. Return the kept indices as an int64 tensor.
    order = torch.sort(scores, descending=True, stable=True).indices
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        box = boxes[index]
        inter_w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
        inter_h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
        inter = inter_w * inter_h
        iou = inter / (areas[index] + areas - inter)
        # Compare in float64, as torchvision does: the threshold is a Python float.
        suppressed |= iou.double() > iou_threshold
    # END SOLUTION
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def class_spec_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """
    Class-specific NMS: boxes of different classes never suppress each other (the
    result of running ``nms`` once per class and merging by score).

    Provided. It runs ``a5.kernels.batched_nms``: the boxes of each class are shifted
    by a class-dependent offset larger than all coordinates (so that classes cannot
    overlap) and one fast NMS handles everything; identical to
    ``torchvision.ops.batched_nms``.

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        class_ids: ``(N,)`` integer class (or any group) ids.
        iou_threshold: IoU threshold of the NMS.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    return batched_nms(boxes, scores, class_ids, iou_threshold)


def float32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, ``dtype`` itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept in float64. Under autocast the heads output
    float16 / bfloat16, whose 8-11 mantissa bits cannot hold pixel coordinates
    (bfloat16 steps by 1 px above 128) or box areas; losses, anchors, locations
    and box decoding run on the float32 copy."""
    return x.to(float32_or_wider(x.dtype))


def clip_boxes(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Clip ``(..., 4)`` XYXY boxes to an image of ``(height, width)``."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    return torch.stack(
        [x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], dim=-1
    )


def fcos_level_candidates(
    cls_logits: torch.Tensor,
    ctr_logits: torch.Tensor,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Inference on one FPN level: the ``k = min(topk, H*W*C)`` best (location, class)
    pairs of every image.

    The score of location ``i`` for class ``c`` is
    ``sqrt(sigmoid(cls_logits[i, c]) * sigmoid(ctr_logits[i]))``: the geometric mean
    of the class probability and the centerness, which ranks boxes predicted far from
    an object's centre lower. Flatten the ``(H*W, C)`` scores of each image so that
    entry ``i * C + c`` is (location ``i``, class ``c``), take the top ``k`` (sorted by
    decreasing score), and recover ``i`` and ``c`` from the flat index.

    Args:
        cls_logits: ``(B, H*W, C)`` class logits.
        ctr_logits: ``(B, H*W, 1)`` centerness logits.
        topk: Most candidates kept per image.

    Returns:
        ``(scores, location_idx, labels)``, each ``(B, k)``: the scores (decreasing),
        the location index in ``[0, H*W)`` and the class in ``[0, C)`` of each candidate.
    """
    num_classes = cls_logits.shape[-1]
    # BEGIN SOLUTION (fcos_inference): Score every (location, class) pair as sqrt(sigmoid(cls) * sigmoid(ctr)), flatten to (B, H*W*C), take the top k and split the flat index into location (// C) and class (% C).
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(ctr_logits)).flatten(start_dim=1)
    k = min(topk, scores.shape[1])
    top_scores, top_idx = scores.topk(k, dim=1)
    location_idx = top_idx // num_classes
    labels = top_idx % num_classes
    # END SOLUTION
    return top_scores, location_idx, labels


###############################################################################
# FCOS detector
###############################################################################


def _make_backbone(
    backbone: Union[str, nn.Module, Callable[[int], nn.Module]],
    fpn_channels: int,
    pretrained: bool,
    freeze_backbone: bool,
    tune_last_stage: bool = False,
) -> nn.Module:
    """The backbone + FPN of a detector: built from a ``BACKBONE_SPECS`` key, or
    injected (an ``nn.Module`` instance, or a callable ``backbone(fpn_channels)``)."""
    if isinstance(backbone, str):
        return DetectorBackboneWithFPN(
            fpn_channels, backbone=backbone, pretrained=pretrained, freeze_backbone=freeze_backbone,
            tune_last_stage=tune_last_stage,
        )
    module = backbone if isinstance(backbone, nn.Module) else backbone(fpn_channels)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"backbone must be a name of {sorted(BACKBONE_SPECS)}, an nn.Module or a callable "
            f"returning one (e.g. a class taking out_channels), got {type(module).__name__}."
        )
    out_channels = getattr(module, "out_channels", fpn_channels)
    if out_channels != fpn_channels:
        raise ValueError(f"The injected backbone has out_channels={out_channels}, expected fpn_channels={fpn_channels}.")
    return module


class FCOS(nn.Module):
    """
    FCOS: fully-convolutional one-stage object detector.

    Every location of every FPN level predicts class scores, a box (as
    distances to its sides) and a centerness. Training assigns each location
    a GT box (``fcos_match_locations_to_gt``) and applies

    * a sigmoid focal loss on the class logits of all locations,
    * a GIoU loss between predicted and GT boxes (or the course's L1 loss on
      deltas, ``box_loss="l1"``) on foreground locations,
    * a binary cross-entropy on centerness logits of foreground locations,

    each divided by an exponential moving average (EMA) of the number of
    foreground locations, which is steadier than the per-batch count.

    Inference scores each (location, class) pair by
    ``sqrt(sigmoid(cls) * sigmoid(ctr))``, keeps the top candidates per
    level above a threshold, decodes and clips boxes, runs class-specific NMS
    and keeps the best detections per image.
    """

    def __init__(
        self,
        num_classes: int,
        fpn_channels: int,
        stem_channels: List[int],
        backbone: Union[str, nn.Module, Callable[[int], nn.Module]] = "regnet_x_400mf",
        pretrained: bool = True,
        freeze_backbone: bool = False,
        *,
        tune_last_stage: bool = False,
        center_sampling_radius: Optional[float] = 1.5,
        box_loss: str = "giou",
        centerness_weighted_box_loss: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk_candidates: int = 1000,
        detections_per_image: int = 100,
        normalizer_init: Optional[float] = None,
        normalizer_momentum: float = 0.9,
    ):
        """
        Args:
            num_classes: Number of object classes.
            fpn_channels: Channels of the FPN features (and head input).
            stem_channels: Channels of the head's stem convs.
            backbone: A key of ``BACKBONE_SPECS`` (then ``pretrained`` and
                ``freeze_backbone`` are passed to ``DetectorBackboneWithFPN``),
                or a backbone to inject: an ``nn.Module`` instance, or a class /
                callable called as ``backbone(fpn_channels)`` (the course's
                ``DetectorBackboneWithFPN(out_channels)``). An injected backbone
                maps images to a dict of p3/p4/p5 features with ``fpn_channels``
                channels and has ``fpn_strides``; ``pretrained`` and
                ``freeze_backbone`` do not apply to it.
            pretrained, freeze_backbone, tune_last_stage: See
                ``DetectorBackboneWithFPN``.
            center_sampling_radius: For ``fcos_match_locations_to_gt``
                (``None`` = plain inside-box rule).
            box_loss: "giou" (default, FCOS v2) or "l1" (course: L1 on
                deltas, weighted 0.25).
            centerness_weighted_box_loss: With ``box_loss="giou"``, weight
                each foreground location's GIoU loss by its centerness target
                (weights rescaled to mean 1 over the batch), as the official
                FCOS, AdelaiDet and mmdetection do: central locations, whose
                boxes win at inference (scores include centerness), get the
                most box supervision. ``False``: uniform (torchvision).
            focal_alpha, focal_gamma: Focal loss parameters.
            topk_candidates: Candidates kept per level before NMS.
            detections_per_image: Maximum number of detections per image.
            normalizer_init: Initial EMA of the foreground count per image;
                ``None`` (default) starts it at the first training batch's count
                (a fixed start far from the real count makes the normalised
                losses drift for the first few dozen iterations).
            normalizer_momentum: EMA momentum (weight of the old value).
        """
        # Long: the course's arguments then one keyword per option, each documented; the code is 19 lines.
        super().__init__()
        if box_loss not in ("giou", "l1"):
            raise ValueError(f"box_loss must be 'giou' or 'l1', got '{box_loss}'.")
        self.num_classes = num_classes
        self.backbone = _make_backbone(backbone, fpn_channels, pretrained, freeze_backbone, tune_last_stage)
        self.pred_net = FCOSPredictionNetwork(num_classes, fpn_channels, stem_channels)
        self.center_sampling_radius = center_sampling_radius
        self.box_loss = box_loss
        self.centerness_weighted_box_loss = centerness_weighted_box_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.topk_candidates = topk_candidates
        self.detections_per_image = detections_per_image
        self.normalizer_momentum = normalizer_momentum
        # EMA of the number of foreground locations *per image*; a persistent
        # buffer so that it is saved in checkpoints (exact resumption) and
        # follows .to(device/dtype). A negative value means "not started yet".
        start = -1.0 if normalizer_init is None else float(normalizer_init)
        self.register_buffer("_normalizer", torch.tensor(start))

    def _run_network(
        self, images: ImagesOrFeatures
    ) -> Tuple[TensorDict, TensorDict, TensorDict, TensorDict]:
        """Backbone + FPN + head, and the locations of all FPN cells.

        Predictions and locations come out in at least float32: under
        autocast the head gives float16 / bfloat16 outputs, in which pixel
        coordinates and box areas lose precision or overflow, so the losses
        and the box decoding run in float32 (float64 models stay float64).
        """
        fpn_feats = self.backbone(images)
        predictions = self.pred_net(fpn_feats)
        reference = fpn_feats["p3"]
        dtype = float32_or_wider(reference.dtype)
        pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits = (
            {name: at_least_float32(pred) for name, pred in level_dict.items()} for level_dict in predictions
        )
        shape_per_fpn_level = {name: feat.shape for name, feat in fpn_feats.items()}
        locations_per_fpn_level = get_fpn_location_coords(
            shape_per_fpn_level, self.backbone.fpn_strides, dtype=dtype, device=reference.device
        )
        return locations_per_fpn_level, pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits

    def forward(
        self,
        images: ImagesOrFeatures,
        gt_boxes: Optional[torch.Tensor] = None,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
    ):
        """
        Args:
            images: ``(B, 3, H, W)`` images, or a dict of backbone features
                "c3"/"c4"/"c5" (feature cache of a frozen backbone).
            gt_boxes: ``(B, N, 5)`` padded GT boxes; required in training.
            test_score_thresh, test_nms_thresh: Inference thresholds (default
                0.3 and 0.5).

        Returns:
            Training mode: dict of scalar losses "loss_cls", "loss_box",
            "loss_ctr" (their sum is the total loss).
            Eval mode (one image, as in the course): tuple
            ``(pred_boxes (K, 4), pred_classes (K,), pred_scores (K,))``.
            Use ``predict`` for batches.
        """
        (
            locations_per_fpn_level,
            pred_cls_logits,
            pred_boxreg_deltas,
            pred_ctr_logits,
        ) = self._run_network(images)

        if not self.training:
            return self.inference(
                images,
                locations_per_fpn_level,
                pred_cls_logits,
                pred_boxreg_deltas,
                pred_ctr_logits,
                test_score_thresh=test_score_thresh,
                test_nms_thresh=test_nms_thresh,
            )

        if gt_boxes is None:
            raise ValueError("FCOS.forward needs gt_boxes in training mode.")
        return self.compute_losses(
            locations_per_fpn_level, pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits, gt_boxes
        )

    def update_normalizer(self, foreground: torch.Tensor) -> torch.Tensor:
        """
        The number that divides the three losses: the expected number of foreground
        locations in the batch. The count of one batch is noisy (a batch of small
        objects has few positives), so FCOS uses an exponential moving average (EMA)
        of the foreground count *per image*, stored in the buffer ``self._normalizer``:

            ema = count                                   on the first batch
                                                          (the buffer is negative)
            ema = m * ema + (1 - m) * count               afterwards,
                                                          m = self.normalizer_momentum

        The EMA is updated only in training mode. The returned normaliser is
        ``ema * B``, at least 1.

        Args:
            foreground: ``(B, L)`` bool, True for the foreground locations.

        Returns:
            Scalar tensor (no gradient).
        """
        num_images = foreground.shape[0]
        ema = self._normalizer
        if self.training:
            with torch.no_grad():
                count = foreground.sum().to(ema.dtype) / num_images
                # BEGIN SOLUTION (fcos_normalizer): Update the EMA buffer in place (ema.copy_(...)): the count itself if the buffer is negative (first batch), else m * ema + (1 - m) * count.
                momentum = self.normalizer_momentum
                updated = momentum * ema + (1 - momentum) * count
                # torch.where instead of an `if` on a tensor: no GPU -> CPU sync.
                ema.copy_(torch.where(ema < 0, count, updated))
                # END SOLUTION
        return (ema.detach().clone() * num_images).clamp(min=1.0)

    def compute_losses(
        self,
        locations_per_fpn_level: TensorDict,
        pred_cls_logits: TensorDict,
        pred_boxreg_deltas: TensorDict,
        pred_ctr_logits: TensorDict,
        gt_boxes: torch.Tensor,
    ) -> TensorDict:
        """
        Training losses of FCOS (provided glue around the parts you write):

        1. match every location to a GT box (``fcos_match_locations_to_gt``);
        2. the normaliser (``update_normalizer``);
        3. the focal loss over all locations (``fcos_classification_loss``);
        4. on foreground locations: box targets (``fcos_get_deltas_from_locations``),
           centerness targets (``fcos_make_centerness_targets``), decoded predicted
           boxes (``fcos_apply_deltas_to_locations``), and the box and centerness
           losses (``fcos_box_and_centerness_losses``; ``box_loss="l1"``: the
           course's ``0.25 * L1`` on the deltas instead of GIoU).

        Args:
            locations_per_fpn_level: ``{"p3": (H3*W3, 2), ...}``.
            pred_cls_logits: ``{"p3": (B, H3*W3, num_classes), ...}``.
            pred_boxreg_deltas: ``{"p3": (B, H3*W3, 4), ...}``.
            pred_ctr_logits: ``{"p3": (B, H3*W3, 1), ...}``.
            gt_boxes: ``(B, N, 5)`` padded GT boxes.

        Returns:
            Dict with scalar "loss_cls", "loss_box", "loss_ctr", each a sum over
            locations divided by the normaliser; "loss_ctr" is the centerness
            cross-entropy minus its floor, the entropy of the targets (see below).
        """
        # Long: the docstring states every argument's shape (the course style); the code is 46 lines.
        strides_per_fpn_level = self.backbone.fpn_strides
        matched_per_level = fcos_match_locations_to_gt(
            locations_per_fpn_level, strides_per_fpn_level, gt_boxes, self.center_sampling_radius
        )
        # Concatenate the levels: L = total number of locations.
        pred_cls = _cat_across_fpn_levels(pred_cls_logits, dim=1)  # (B, L, C)
        pred_box = _cat_across_fpn_levels(pred_boxreg_deltas, dim=1)  # (B, L, 4)
        pred_ctr = _cat_across_fpn_levels(pred_ctr_logits, dim=1)  # (B, L, 1)
        matched_gt = _cat_across_fpn_levels(matched_per_level, dim=1).to(pred_box.dtype)  # (B, L, 5)
        locations = _cat_across_fpn_levels(locations_per_fpn_level, dim=0)  # (L, 2)
        strides = torch.cat(
            [locs.new_full((locs.shape[0], 1), float(strides_per_fpn_level[name]))
             for name, locs in locations_per_fpn_level.items()]
        )  # (L, 1)
        num_images = pred_cls.shape[0]
        foreground = matched_gt[..., 4] >= 0  # (B, L)

        normalizer = self.update_normalizer(foreground)
        loss_cls = fcos_classification_loss(
            pred_cls, matched_gt[..., 4].long(), alpha=self.focal_alpha, gamma=self.focal_gamma
        )
        # Foreground locations only: K = number of foreground locations in the batch.
        fg_gt = matched_gt[foreground]  # (K, 5)
        fg_locations = locations.expand(num_images, -1, -1)[foreground]  # (K, 2)
        fg_strides = strides.expand(num_images, -1, -1)[foreground]  # (K, 1)
        fg_pred_deltas = pred_box[foreground]  # (K, 4)
        gt_deltas = fcos_get_deltas_from_locations(fg_locations, fg_gt, fg_strides)
        gt_centerness = fcos_make_centerness_targets(gt_deltas)  # (K,)
        fg_pred_boxes = fcos_apply_deltas_to_locations(fg_pred_deltas, fg_locations, fg_strides)
        loss_box, loss_ctr = fcos_box_and_centerness_losses(
            fg_pred_boxes, fg_gt[:, :4], pred_ctr[foreground].squeeze(-1), gt_centerness,
            centerness_weighted=self.centerness_weighted_box_loss,
        )
        if self.box_loss == "l1":
            loss_box = 0.25 * (fg_pred_deltas - gt_deltas).abs().sum()
        # The centerness targets are soft (between 0 and 1), so their cross-entropy
        # cannot reach 0: its minimum is the targets' entropy (about 0.58 per location
        # on VOC). Report the cross-entropy minus that floor (the KL divergence from the
        # targets): the same gradients, and a loss that falls to 0 when the predictions
        # match, so that "the loss must fall" holds for the total.
        loss_ctr = loss_ctr - binary_entropy(gt_centerness).sum()
        return {
            "loss_cls": loss_cls / normalizer,
            "loss_box": loss_box / normalizer,
            "loss_ctr": loss_ctr / normalizer,
        }

    @torch.no_grad()
    def inference(
        self,
        images: ImagesOrFeatures,
        locations_per_fpn_level: TensorDict,
        pred_cls_logits: TensorDict,
        pred_boxreg_deltas: TensorDict,
        pred_ctr_logits: TensorDict,
        test_score_thresh: Optional[float] = 0.3,
        test_nms_thresh: Optional[float] = 0.5,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The course's inference on a single image (batch size 1): ``postprocess``
        for one image, returned as a tuple. Called by ``forward`` in eval mode.

        Args:
            images: The ``(1, 3, H, W)`` image (or its c3/c4/c5 feature dict); only
                its size is used, to clip the boxes.
            locations_per_fpn_level, pred_*: As in ``compute_losses``, batch size 1.
            test_score_thresh, test_nms_thresh: Thresholds (``None``: 0.3 and 0.5).

        Returns:
            ``(pred_boxes (K, 4), pred_classes (K,), pred_scores (K,))``: absolute
            XYXY boxes, class ids (never -1) and scores
            ``sqrt(sigmoid(cls) * sigmoid(ctr))``, by decreasing score.
        """
        detections = self.postprocess(
            locations_per_fpn_level,
            pred_cls_logits,
            pred_boxreg_deltas,
            pred_ctr_logits,
            image_size=image_size_of(images),
            score_thresh=0.3 if test_score_thresh is None else test_score_thresh,
            nms_thresh=0.5 if test_nms_thresh is None else test_nms_thresh,
        )
        if len(detections) != 1:
            raise ValueError(
                "FCOS.forward / FCOS.inference in eval mode handle a single image (course API); "
                f"got a batch of {len(detections)}. Use FCOS.predict for batches."
            )
        det = detections[0]
        return det["boxes"], det["labels"], det["scores"]

    @staticmethod
    def _cat_across_fpn_levels(dict_with_fpn_levels: TensorDict, dim: int = 1) -> torch.Tensor:
        """The course's helper: concatenate the values of a per-level dict along ``dim``."""
        return _cat_across_fpn_levels(dict_with_fpn_levels, dim=dim)

    @torch.no_grad()
    def predict(
        self,
        images: ImagesOrFeatures,
        score_thresh: float = 0.3,
        nms_thresh: float = 0.5,
    ) -> List[TensorDict]:
        """
        Detect objects in a batch of images (any batch size).

        The model is run in eval mode (restoring the previous mode after) and
        without autograd.

        Args:
            images: ``(B, 3, H, W)`` images, a list of ``(3, H_i, W_i)`` images of
                any sizes (padded, boxes clipped to each image), or a dict of "c3"/"c4"/"c5"
                backbone features.
            score_thresh: Minimum score ``sqrt(sigmoid(cls) * sigmoid(ctr))``.
            nms_thresh: IoU threshold of class-specific NMS.

        Returns:
            One dict per image with "boxes" ``(K, 4)`` XYXY, "labels" ``(K,)``
            int64 class ids and "scores" ``(K,)``, by decreasing score.
        """
        images, sizes = as_image_batch(images)  # lists of any sizes; empty batches
        if images is None:
            return []
        was_training = self.training
        self.eval()
        try:
            outputs = self._run_network(images)
            results = self.postprocess(
                *outputs,
                image_size=image_size_of(images),
                score_thresh=score_thresh,
                nms_thresh=nms_thresh,
            )
        finally:
            self.train(was_training)
        return clip_to_image_sizes(results, sizes)

    @torch.no_grad()
    def postprocess(
        self,
        locations_per_fpn_level: TensorDict,
        pred_cls_logits: TensorDict,
        pred_boxreg_deltas: TensorDict,
        pred_ctr_logits: TensorDict,
        image_size: Tuple[int, int],
        score_thresh: float = 0.3,
        nms_thresh: float = 0.5,
    ) -> List[TensorDict]:
        """
        Turn the raw predictions of a batch into detections.

        For every level: score all (location, class) pairs with
        ``sqrt(sigmoid(cls) * sigmoid(ctr))``, keep the ``topk_candidates``
        best pairs above ``score_thresh``, decode their boxes and clip them to
        the image. Then run class-specific NMS (per image and class, all
        images at once) and keep at most ``detections_per_image`` per image.

        Args:
            locations_per_fpn_level, pred_*: As in ``compute_losses``.
            image_size: ``(H, W)`` for clipping.
            score_thresh, nms_thresh: Thresholds.

        Returns:
            As ``predict``: one dict {"boxes", "labels", "scores"} per image.
        """
        strides_per_fpn_level = self.backbone.fpn_strides
        boxes_per_level, scores_per_level, labels_per_level = [], [], []
        for level_name, locations in locations_per_fpn_level.items():
            scores, location_idx, labels = fcos_level_candidates(
                pred_cls_logits[level_name], pred_ctr_logits[level_name], self.topk_candidates
            )  # (B, k) each
            deltas = torch.gather(
                pred_boxreg_deltas[level_name], 1, location_idx.unsqueeze(-1).expand(-1, -1, 4)
            )
            boxes = fcos_apply_deltas_to_locations(
                deltas, locations[location_idx], strides_per_fpn_level[level_name]
            )  # (B, k, 4)
            boxes_per_level.append(boxes)
            scores_per_level.append(scores)
            labels_per_level.append(labels)
        boxes = clip_boxes(torch.cat(boxes_per_level, dim=1), image_size)  # (B, M, 4)
        scores = torch.cat(scores_per_level, dim=1)  # (B, M)
        labels = torch.cat(labels_per_level, dim=1)  # (B, M)
        num_images = boxes.shape[0]
        image_ids = torch.arange(num_images, device=boxes.device).unsqueeze(1).expand_as(labels)
        # Flatten the batch, keeping the candidates above the threshold; then one
        # class-specific NMS per image (all images in one call) and the best
        # detections_per_image of each.
        is_candidate = scores > score_thresh
        return select_detections(
            boxes[is_candidate], scores[is_candidate], labels[is_candidate], image_ids[is_candidate],
            num_images, nms_thresh, self.detections_per_image,
        )

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
import copy
import math
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import feature_extraction

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


def _to_fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Return a CPU feature map in channels-last (NHWC) memory layout.

    oneDNN, PyTorch's CPU convolution library, is markedly faster on
    channels-last tensors, and conv / norm / ReLU outputs keep the layout of
    their input, so converting the network input once speeds up the whole
    backbone and head. Only the memory layout changes (shapes and indexing
    are the same). GPU tensors are left as they are.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


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


def fold_batchnorm(body: nn.Module) -> nn.Module:
    """
    An inference copy of a CNN in which every BatchNorm that directly follows
    a convolution (in the same ``nn.Sequential``, as in torchvision's
    ``Conv2dNormActivation`` blocks) is folded into that convolution.

    In eval mode a BatchNorm is a fixed per-channel affine map,
    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so
    ``BN(conv(x))`` is itself a convolution with rescaled weights and a new
    bias. Pairs are found among the consecutive children of every
    ``nn.Sequential`` and, for an fx ``GraphModule``, in its graph (a conv
    whose output only feeds a BatchNorm). The folded network computes the
    same features (up to float rounding) and skips a full pass over every
    feature map: about a fifth of MobileNetV2's inference time on a CPU.

    Args:
        body: The CNN (e.g. the ``GraphModule`` of ``build_backbone_body``).

    Returns:
        A new module in eval mode, without gradients; ``body`` is unchanged.
    """
    folded = copy.deepcopy(body).eval().requires_grad_(False)
    # (conv, norm) pairs by qualified name: consecutive children of a
    # Sequential, and, in an fx graph, a conv node whose only reader is a norm.
    pairs: List[Tuple[str, str]] = []
    for prefix, module in folded.named_modules():
        if isinstance(module, nn.Sequential):
            names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_children()]
            pairs += list(zip(names, names[1:]))
    if isinstance(folded, fx.GraphModule):
        for node in folded.graph.nodes:
            source = node.args[0] if node.op == "call_module" and node.args else None
            if isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1:
                pairs.append((source.target, node.target))
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            # Replacing modules (not graph nodes) works for plain and fx modules alike.
            _set_submodule(folded, conv_name, fuse_conv_bn_eval(conv, norm))
            _set_submodule(folded, norm_name, nn.Identity())
    return folded


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, module)


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
    """

    def __init__(
        self,
        out_channels: int,
        backbone: str = "regnet_x_400mf",
        pretrained: bool = True,
        freeze_backbone: bool = False,
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
        """
        super().__init__()
        spec = BACKBONE_SPECS.get(backbone)
        if spec is None:
            raise ValueError(
                f"Unknown backbone '{backbone}', expected one of {sorted(BACKBONE_SPECS)}."
            )
        self.backbone_name = backbone
        self.out_channels = out_channels
        self.freeze_backbone = freeze_backbone

        # The CNN body returns {"c3", "c4", "c5"}.
        self.backbone, self.weights_name = build_backbone_body(backbone, pretrained)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

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

    def extract_features(self, images: torch.Tensor) -> TensorDict:
        """
        Run only the CNN.

        Args:
            images: Tensor of shape ``(B, 3, H, W)``, normalized as for
                ImageNet.

        Returns:
            Dict with keys "c3", "c4", "c5" of shapes ``(B, C_i, H/s, W/s)``
            (rounded up) for strides ``s`` = 8, 16, 32. Computed without
            autograd when the backbone is frozen (nothing to train there).
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
            return dict(body(_to_fast_layout(images)))

    def _folded_backbone(self) -> nn.Module:
        """``fold_batchnorm(self.backbone)``, rebuilt whenever the backbone's
        tensors change: a new device or dtype, loaded weights, an optimizer
        step (every in-place write bumps a tensor's version counter). The copy
        is kept outside the module's registered children, so it is not in the
        state dict, the parameters or the checkpoints."""
        tensors = list(self.backbone.parameters()) + list(self.backbone.buffers())
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_folded_backbone_cache")
        if cached is None or cached[0] != key:
            cached = (key, fold_batchnorm(self.backbone))
            self.__dict__["_folded_backbone_cache"] = cached
        return cached[1]

    def forward(self, x: ImagesOrFeatures) -> TensorDict:
        """
        Args:
            x: Images ``(B, 3, H, W)``, or a dict of backbone features with
                keys "c3", "c4", "c5" (then the CNN is skipped, e.g. when
                training a frozen-backbone model from a feature cache).

        Returns:
            Dict with keys "p3", "p4", "p5": FPN features of shape
            ``(B, out_channels, H_i, W_i)`` where ``(H_i, W_i)`` is the size of
            ``c_i``.
        """
        if isinstance(x, dict):
            # Cached features: same memory layout as freshly computed ones, so
            # that both give the same numbers.
            backbone_feats = {name: _to_fast_layout(feat) for name, feat in x.items()}
        else:
            backbone_feats = self.extract_features(x)

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


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, state dict and values) that avoids a slow
    kernel: on the CPU, PyTorch's GroupNorm on a channels-last bfloat16 / float16
    tensor runs about 10x slower than on the same tensor in NCHW layout (torch
    2.15: 64 ms against 6 ms, forward + backward, for ``(16, 128, 28, 28)``). Under
    CPU autocast the head's convolutions hand it exactly that, so it normalises an
    NCHW copy and returns channels-last again for the next convolution (~30%
    faster FCOS training steps in bfloat16). Float32 keeps the direct path, which
    is fast in both layouts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


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


@torch.no_grad()
def fcos_match_locations_to_gt(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Dict[str, int],
    gt_boxes: torch.Tensor,
    center_sampling_radius: Optional[float] = 1.5,
) -> TensorDict:
    """
    Match every location of every FPN level with a GT box or background.

    A location is a *candidate* for a GT box when

    1. it lies strictly inside the box: ``min(l, t, r, b) > 0`` where
       ``(l, t, r, b)`` are its distances to the left/top/right/bottom sides;
    2. (centre sampling, FCOS v2) it is close to the box centre:
       ``|x - cx| < radius * stride`` and ``|y - cy| < radius * stride``.
       Locations near the border of a box mostly see background or other
       objects; this makes the positives cleaner. ``None`` disables it (the
       plain rule of the 2019 paper and the course);
    3. the box has the right size for the level: the longest distance
       ``max(l, t, r, b)`` must lie in ``(0, 64)`` for p3, ``(64, 128)`` for
       p4, ``(128, inf)`` for p5 (in general ``(4 s, 8 s)`` with no lower
       bound on the first and no upper bound on the last level). Each level
       thus handles one range of object sizes.

    When several boxes are candidates, the location regresses the one with
    the smallest area (the ambiguous location most likely belongs to the
    small object in front). Locations without candidate are background.

    All pairs (location, box) of all levels and images are compared at once:
    there is no Python loop over boxes, locations or images.

    Args:
        locations_per_fpn_level: ``{"p3": (H3*W3, 2), ...}`` (x, y) locations,
            as from ``get_fpn_location_coords``.
        strides_per_fpn_level: ``{"p3": 8, ...}``, same keys, ordered from
            the finest to the coarsest level.
        gt_boxes: ``(N, 5)`` GT boxes of one image, or ``(B, N, 5)`` for a
            batch; rows ``(x1, y1, x2, y2, class_id)``. Padding rows (class
            ``-1``) never match.
        center_sampling_radius: Radius of centre sampling in units of the
            level's stride (FCOS v2 default 1.5), or ``None``.

    Returns:
        Dict with the same keys: the matched GT row of every location, of
        shape ``(H*W, 5)`` (or ``(B, H*W, 5)`` for batched ``gt_boxes``);
        background locations get a row of ``-1``.
    """
    level_names = list(locations_per_fpn_level.keys())
    is_batched = gt_boxes.dim() == 3
    gt = gt_boxes if is_batched else gt_boxes.unsqueeze(0)  # (B, N, 5)
    locations = _cat_across_fpn_levels(locations_per_fpn_level, dim=0)  # (L, 2)
    num_locations = [locations_per_fpn_level[name].shape[0] for name in level_names]
    num_images, num_gt = gt.shape[0], gt.shape[1]
    dtype = torch.promote_types(locations.dtype, gt.dtype)
    device = locations.device

    if num_gt == 0:
        matched = gt.new_full((num_images, locations.shape[0], 5), -1, dtype=dtype)
    else:
        # Per-location stride and scale range, so that all levels are handled
        # by the same broadcasted comparisons.
        strides = torch.tensor(
            [float(strides_per_fpn_level[name]) for name in level_names], dtype=dtype, device=device
        )
        lower = strides * 4
        upper = strides * 8
        lower[0] = 0.0
        upper[-1] = float("inf")
        counts = torch.tensor(num_locations, device=device)
        strides = strides.repeat_interleave(counts).view(1, -1, 1)  # (1, L, 1)
        lower = lower.repeat_interleave(counts).view(1, -1, 1)
        upper = upper.repeat_interleave(counts).view(1, -1, 1)

        # Locations along dim 1, boxes along dim 2: (1, L, 1) vs (B, 1, N).
        x = locations[:, 0].to(dtype).view(1, -1, 1)
        y = locations[:, 1].to(dtype).view(1, -1, 1)
        x1, y1, x2, y2, class_ids = (v.to(dtype).unsqueeze(1) for v in gt.unbind(dim=2))
        left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y  # (B, L, N) each
        min_dist = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom))
        max_dist = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))

        is_candidate = (min_dist > 0) & (max_dist > lower) & (max_dist < upper) & (class_ids >= 0)
        if center_sampling_radius is not None:
            radius = center_sampling_radius * strides
            is_candidate &= ((x - (x1 + x2) / 2).abs() < radius) & ((y - (y1 + y2) / 2).abs() < radius)

        # Smallest-area candidate: non-candidates get an infinite area so that
        # the minimum picks a candidate whenever there is one (ties between
        # equal areas go to the first box). This is exact, unlike the
        # "1e8 - area" trick that loses precision in float32.
        areas = (x2 - x1) * (y2 - y1)  # (B, 1, N)
        masked_areas = torch.where(is_candidate, areas, torch.full_like(areas, float("inf")))
        _, matched_idx = masked_areas.min(dim=2)  # (B, L)
        has_match = is_candidate.any(dim=2, keepdim=True)  # (B, L, 1)
        matched = torch.gather(gt.to(dtype), 1, matched_idx.unsqueeze(2).expand(-1, -1, 5))
        matched = torch.where(has_match, matched, torch.full_like(matched, -1))

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


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"Invalid reduction '{reduction}', expected 'none', 'mean' or 'sum'.")


###############################################################################
# Non-maximum suppression
###############################################################################


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """
    Non-maximum suppression: visit boxes by decreasing score; keep a box
    unless a box kept before it overlaps it with IoU > ``iou_threshold``.

    Same output as ``torchvision.ops.nms``: the order of boxes with tied
    scores (a stable descending sort), the comparison with the threshold,
    degenerate boxes (IoU 0/0 = NaN never suppresses) and float64 included.

    Implementation (vectorized, no Python loop over boxes):

    1. **Independent clusters.** Two boxes whose x-ranges are disjoint have
       IoU 0 and never suppress each other. Sweeping the boxes by ``x1`` and
       starting a new cluster whenever a box begins right of everything
       before it splits the boxes into clusters that can be processed
       independently. This matters for class-specific NMS
       (``class_spec_nms`` shifts each class far away) and for images with
       separate objects: the work becomes the sum over clusters of
       ``size^2`` instead of ``N^2``.
    2. **Blocked greedy, batched over clusters.** Each cluster is a row of
       box indices in score order (clusters of similar size are padded into
       one matrix, at most 2x padding). Rows are processed ``block`` boxes at
       a time, all rows at once:

       * within a block, the greedy result is the unique solution of
         ``keep[j] = not any(keep[i] and iou[i, j] > t for i < j)``;
         iterating this equation is exact after at most ``block`` steps
         (step ``k`` fixes box ``k``), and in practice converges after a
         handful of (cheap, matrix-wide) steps: a fixed point is the answer;
       * the boxes kept from the block then suppress the rest of their row
         at once (one IoU matrix ``kept x rest``), and the suppressed boxes
         are dropped before the next block.

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        iou_threshold: Suppress boxes whose IoU with a kept box is larger.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    keep: torch.Tensor = boxes.new_empty((0,), dtype=torch.long)
    # BEGIN SOLUTION (nms): Implement greedy NMS equal to torchvision.ops.nms (stable descending score order) with vectorized IoU computations instead of a Python loop over boxes.
    num_boxes = boxes.shape[0]
    device = boxes.device
    # torchvision compares the IoU (computed in the boxes' dtype) with the
    # threshold as a double. Use the threshold of the boxes' dtype that makes
    # the same decisions: if rounding moved it up, step one value down.
    thresh = torch.tensor(iou_threshold, dtype=boxes.dtype, device=device)
    if float(thresh) > iou_threshold:
        thresh = torch.nextafter(thresh, thresh.new_tensor(-math.inf))

    def iou_above(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """(..., M, K) bool: IoU(first[..., m], second[..., k]) > thresh, where
        ``first`` (5, ..., M) and ``second`` (5, ..., K) hold x1, y1, x2, y2
        and area. Same floating point operations as torchvision's kernel, so
        that the decisions are identical even at the threshold."""
        x1a, y1a, x2a, y2a, area_a = first.unsqueeze(-1)
        x1b, y1b, x2b, y2b, area_b = second.unsqueeze(-2)
        inter_w = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
        inter_h = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
        inter = inter_w.mul_(inter_h)
        union = (area_a + area_b).sub_(inter)
        return inter.div_(union) > thresh

    def left_align(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Move the selected entries of each row of ``values`` (G, W) to the
        left, keeping their order, pad with -1 and trim to the longest row.
        The new column of a selected entry is the running count of selected
        entries; the others are written to a spare last column."""
        width = int(selected.sum(dim=1).max()) if selected.numel() > 0 else 0
        column = torch.where(selected, torch.cumsum(selected, dim=1) - 1, width)
        aligned = values.new_full((values.shape[0], width + 1), -1)
        return aligned.scatter_(1, column, values)[:, :width]

    def greedy_rows(rows: torch.Tensor) -> torch.Tensor:
        """Greedy NMS within each row of ``rows`` (G, W): positions in score
        order, left-aligned, padded with -1. Returns the kept positions."""
        # Boxes per block: one long row wants large blocks (fewer rounds of
        # Python overhead); many rows want small ones (the G x block x block
        # intra-block matrices dominate).
        block = max(32, min(128, int(128 / math.sqrt(max(rows.shape[0], 1)))))
        kept_rows: List[torch.Tensor] = []
        while rows.shape[0] > 0 and rows.shape[1] > 0:
            current, rest = rows[:, :block], rows[:, block:]
            valid = current >= 0
            cur_table = table[:, current.clamp(min=0)]  # (5, G, block)
            # suppresses[g, i, j]: in row g, box i comes before box j and overlaps it.
            suppresses = iou_above(cur_table, cur_table).triu_(diagonal=1)
            suppresses &= valid.unsqueeze(-1)  # padding suppresses nothing
            cur_keep = valid & ~suppresses.any(dim=1)
            if not torch.equal(cur_keep, valid):
                while True:  # fixed-point iteration of the greedy equation
                    new_keep = valid & ~(suppresses & cur_keep.unsqueeze(-1)).any(dim=1)
                    if torch.equal(new_keep, cur_keep):
                        break
                    cur_keep = new_keep
            kept = left_align(current, cur_keep)  # (G, K): only the kept boxes suppress
            kept_rows.append(kept[kept >= 0])
            # Rows are left-aligned: a row has boxes left iff its first entry does.
            alive = rest[:, 0] >= 0 if rest.shape[1] > 0 else rest.new_zeros((0,), dtype=torch.bool)
            if not bool(alive.any()):
                break
            rest, kept = rest[alive], kept[alive]
            overlaps = iou_above(table[:, kept.clamp(min=0)], table[:, rest.clamp(min=0)])  # (G, K, R)
            if not bool((kept >= 0).all()):
                overlaps &= (kept >= 0).unsqueeze(-1)  # padding suppresses nothing
            rows = left_align(rest, (rest >= 0) & ~overlaps.any(dim=1))
            if rows.shape[1] > 0:
                rows = rows[rows[:, 0] >= 0]
        return torch.cat(kept_rows) if kept_rows else rows.new_empty((0,))

    if num_boxes > 0:
        # Stable descending sort: tied scores keep their input order, as in
        # torchvision. Below, "position" = index in this order.
        order = torch.sort(scores, descending=True, stable=True).indices
        sorted_boxes = boxes[order]
        areas = (sorted_boxes[:, 2] - sorted_boxes[:, 0]) * (sorted_boxes[:, 3] - sorted_boxes[:, 1])
        # (5, N) table of x1, y1, x2, y2, area: gathering columns gives
        # contiguous per-coordinate tensors, which the IoU ops read fastest.
        table = torch.cat([sorted_boxes.t(), areas.unsqueeze(0)])
        positions = torch.arange(num_boxes, device=device)

        # 1. Clusters: sweep by x1; a box starts a new cluster when it begins at
        # or right of the largest x2 so far. Only valid when boxes with IoU 0
        # cannot suppress, i.e. for thresholds >= 0.
        if iou_threshold >= 0:
            x_order = torch.sort(sorted_boxes[:, 0], stable=True).indices
            reach = torch.cummax(sorted_boxes[x_order, 2], dim=0).values
            starts = torch.ones(num_boxes, dtype=torch.bool, device=device)
            starts[1:] = sorted_boxes[x_order[1:], 0] >= reach[:-1]
            cluster = torch.empty_like(positions)
            cluster[x_order] = torch.cumsum(starts, dim=0) - 1
        else:
            cluster = torch.zeros_like(positions)

        # 2. Greedy NMS per cluster.
        sizes = torch.bincount(cluster)
        if sizes.numel() == 1:  # one cluster: a single row, in score order
            kept_positions = greedy_rows(positions.unsqueeze(0))
        else:
            # Positions grouped by cluster (a stable sort keeps the score order
            # inside each cluster) and their rank within the cluster.
            by_cluster = torch.sort(cluster, stable=True).indices
            member_cluster = cluster[by_cluster]
            rank = positions - (torch.cumsum(sizes, dim=0) - sizes)[member_cluster]
            # Size class k holds the clusters of 2^(k-1) < size <= 2^k boxes;
            # each class becomes one padded (clusters, largest size) matrix.
            powers_of_two = torch.tensor([1 << k for k in range(63)], device=device)
            size_class = torch.bucketize(sizes, powers_of_two)
            member_class = size_class[member_cluster]
            kept_chunks: List[torch.Tensor] = []
            for k in torch.unique(size_class).tolist():
                in_class = member_class == k
                if k == 0:  # single-box clusters: nothing can suppress them
                    kept_chunks.append(by_cluster[in_class])
                    continue
                class_clusters = size_class == k
                row_of_cluster = torch.cumsum(class_clusters, dim=0) - 1
                rows = positions.new_full((int(class_clusters.sum()), int(sizes[class_clusters].max())), -1)
                rows[row_of_cluster[member_cluster[in_class]], rank[in_class]] = by_cluster[in_class]
                kept_chunks.append(greedy_rows(rows))
            kept_positions = torch.cat(kept_chunks)
        # Positions in increasing order = decreasing score (ties: input order).
        keep = order[torch.sort(kept_positions).values]
    # END SOLUTION
    return keep


def class_spec_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """
    Class-specific NMS: boxes of different classes never suppress each other.

    Trick: shift the boxes of each class by a class-dependent offset larger
    than all coordinates, so that boxes of different classes can no longer
    overlap, and run one ``nms`` on everything. ``nms`` notices that the
    shifted classes are spatially separate and handles them as independent
    clusters, so the cost grows with the square of the class sizes, not of
    the total number of boxes.

    The shifted boxes are in float64: in float32, an offset of a few thousand
    pixels leaves only about 1e-3 px of precision, enough to flip IoU
    comparisons near the threshold. In float64 the IoUs are those of the
    unshifted boxes, so the result is identical to
    ``torchvision.ops.batched_nms`` (which runs one NMS per class on large
    inputs).

    Args:
        boxes: ``(N, 4)`` XYXY boxes.
        scores: ``(N,)`` scores.
        class_ids: ``(N,)`` integer class (or any group) ids.
        iou_threshold: IoU threshold of ``nms``.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes64 = boxes.to(torch.float64)
    # Shift by (span + 1) per class: classes then lie in disjoint x/y ranges.
    span = boxes64.max() - boxes64.min()
    offsets = class_ids.to(boxes64) * (span + 1)
    return nms(boxes64 + offsets[:, None], scores, iou_threshold)


def float32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, ``dtype`` itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept in float64. Under autocast the heads output
    float16 / bfloat16, whose 8-11 mantissa bits cannot hold pixel coordinates
    (bfloat16 steps by 1 px above 128) or box areas; losses, anchors, locations
    and box decoding run on the float32 copy."""
    return x.to(float32_or_wider(x.dtype))


def split_kept_per_image(
    keep: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    max_per_image: Optional[int] = None,
) -> List[torch.Tensor]:
    """
    Split the survivors of one NMS over a whole batch by image.

    Detectors run a single ``class_spec_nms`` for all images at once (groups =
    (image, class) pairs): far fewer calls than one NMS per image. This gives
    back each image's share, best first, capped at ``max_per_image``.

    Args:
        keep: ``(K,)`` indices of the kept candidates by decreasing score (as
            returned by ``nms`` / ``class_spec_nms``).
        image_ids: ``(N,)`` image index of every candidate.
        num_images: Batch size ``B`` (images without survivors get an empty
            tensor).
        max_per_image: Keep at most this many per image (``None``: all).

    Returns:
        List of ``B`` int64 tensors of candidate indices, by decreasing score.
    """
    # A stable sort by image groups `keep` per image and keeps the score order
    # within each image; an entry's rank in its image is its position minus
    # the position where its image starts.
    keep = keep[torch.sort(image_ids[keep], stable=True).indices]
    kept_image_ids = image_ids[keep]
    counts = torch.bincount(kept_image_ids, minlength=num_images)
    if max_per_image is not None:
        starts = torch.cumsum(counts, dim=0) - counts
        rank = torch.arange(keep.numel(), device=keep.device) - starts[kept_image_ids]
        keep = keep[rank < max_per_image]
        counts = counts.clamp(max=max_per_image)
    return list(keep.split(counts.tolist()))


###############################################################################
# FCOS detector
###############################################################################


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
        backbone: str = "regnet_x_400mf",
        pretrained: bool = True,
        freeze_backbone: bool = False,
        *,
        center_sampling_radius: Optional[float] = 1.5,
        box_loss: str = "giou",
        centerness_weighted_box_loss: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk_candidates: int = 1000,
        detections_per_image: int = 100,
        normalizer_init: float = 150.0,
        normalizer_momentum: float = 0.9,
    ):
        """
        Args:
            num_classes: Number of object classes.
            fpn_channels: Channels of the FPN features (and head input).
            stem_channels: Channels of the head's stem convs.
            backbone, pretrained, freeze_backbone: See
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
            normalizer_init: Initial EMA of the foreground count per image.
            normalizer_momentum: EMA momentum (weight of the old value).
        """
        super().__init__()
        if box_loss not in ("giou", "l1"):
            raise ValueError(f"box_loss must be 'giou' or 'l1', got '{box_loss}'.")
        self.num_classes = num_classes
        self.backbone = DetectorBackboneWithFPN(
            fpn_channels, backbone=backbone, pretrained=pretrained, freeze_backbone=freeze_backbone
        )
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
        # follows .to(device/dtype).
        self.register_buffer("_normalizer", torch.tensor(float(normalizer_init)))

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
            detections = self.inference(
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
                    "FCOS.forward in eval mode handles a single image (course API); "
                    f"got a batch of {len(detections)}. Use FCOS.predict for batches."
                )
            det = detections[0]
            return det["boxes"], det["labels"], det["scores"]

        if gt_boxes is None:
            raise ValueError("FCOS.forward needs gt_boxes in training mode.")
        return self.compute_losses(
            locations_per_fpn_level, pred_cls_logits, pred_boxreg_deltas, pred_ctr_logits, gt_boxes
        )

    def compute_losses(
        self,
        locations_per_fpn_level: TensorDict,
        pred_cls_logits: TensorDict,
        pred_boxreg_deltas: TensorDict,
        pred_ctr_logits: TensorDict,
        gt_boxes: torch.Tensor,
    ) -> TensorDict:
        """
        Training losses of FCOS.

        Args:
            locations_per_fpn_level: ``{"p3": (H3*W3, 2), ...}``.
            pred_cls_logits: ``{"p3": (B, H3*W3, num_classes), ...}``.
            pred_boxreg_deltas: ``{"p3": (B, H3*W3, 4), ...}``.
            pred_ctr_logits: ``{"p3": (B, H3*W3, 1), ...}``.
            gt_boxes: ``(B, N, 5)`` padded GT boxes.

        Returns:
            Dict with scalar "loss_cls", "loss_box", "loss_ctr", each a sum
            over locations divided by ``EMA(foreground per image) * B``.
            The EMA is updated here (training mode only).
        """
        losses: TensorDict = {}
        # BEGIN SOLUTION (fcos_loss): Match locations to GT (batched), build class one-hot / delta / centerness targets, update the foreground EMA, and compute focal, GIoU (centerness-weighted, mean-1 weights; or 0.25 * L1) and centerness BCE losses over foreground, normalized by EMA * batch size.
        strides_per_fpn_level = self.backbone.fpn_strides
        matched_per_level = fcos_match_locations_to_gt(
            locations_per_fpn_level,
            strides_per_fpn_level,
            gt_boxes,
            center_sampling_radius=self.center_sampling_radius,
        )
        # Concatenate levels: L = total number of locations.
        matched_gt = _cat_across_fpn_levels(matched_per_level, dim=1)  # (B, L, 5)
        pred_cls = _cat_across_fpn_levels(pred_cls_logits, dim=1)  # (B, L, C)
        pred_box = _cat_across_fpn_levels(pred_boxreg_deltas, dim=1)  # (B, L, 4)
        pred_ctr = _cat_across_fpn_levels(pred_ctr_logits, dim=1)  # (B, L, 1)
        locations = _cat_across_fpn_levels(locations_per_fpn_level, dim=0)  # (L, 2)
        strides = torch.cat(
            [
                locations.new_full((locs.shape[0], 1), float(strides_per_fpn_level[name]))
                for name, locs in locations_per_fpn_level.items()
            ]
        )  # (L, 1)
        matched_gt = matched_gt.to(pred_box.dtype)
        num_images = pred_cls.shape[0]

        foreground = matched_gt[..., 4] >= 0  # (B, L)

        # EMA of foreground locations per image: the per-batch count is
        # noisy, the EMA gives a steadier loss scale.
        if self.training:
            with torch.no_grad():
                num_fg_per_image = foreground.sum().to(self._normalizer.dtype) / num_images
                momentum = self.normalizer_momentum
                self._normalizer.mul_(momentum).add_((1 - momentum) * num_fg_per_image)
        normalizer = (self._normalizer.detach().clone() * num_images).clamp(min=1.0)

        # Classification: one-hot targets, all zeros for background.
        # Shifting class ids by one maps background (-1) to column 0, which
        # is dropped.
        gt_classes = matched_gt[..., 4].long()
        cls_targets = F.one_hot(gt_classes + 1, self.num_classes + 1)[..., 1:].to(pred_cls.dtype)
        loss_cls = sigmoid_focal_loss(
            pred_cls, cls_targets, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )

        # Box regression and centerness only on foreground locations.
        gt_deltas = fcos_get_deltas_from_locations(locations, matched_gt, strides)  # (B, L, 4)
        fg_pred_deltas = pred_box[foreground]  # (K, 4)
        fg_gt_deltas = gt_deltas[foreground]
        gt_centerness = fcos_make_centerness_targets(fg_gt_deltas)  # (K,)
        if self.box_loss == "giou":
            fg_locations = locations.expand(num_images, -1, -1)[foreground]
            fg_strides = strides.expand(num_images, -1, -1)[foreground]
            fg_pred_boxes = fcos_apply_deltas_to_locations(fg_pred_deltas, fg_locations, fg_strides)
            giou_loss = generalized_box_iou_loss(fg_pred_boxes, matched_gt[foreground][:, :4])  # (K,)
            if self.centerness_weighted_box_loss and giou_loss.numel() > 0:
                # Mean-1 weights keep the loss scale of the uniform version.
                weights = gt_centerness / gt_centerness.mean().clamp(min=1e-6)
                giou_loss = weights * giou_loss
            loss_box = giou_loss.sum()
        else:
            loss_box = 0.25 * (fg_pred_deltas - fg_gt_deltas).abs().sum()

        loss_ctr = F.binary_cross_entropy_with_logits(
            pred_ctr[foreground].squeeze(-1), gt_centerness, reduction="sum"
        )

        losses = {
            "loss_cls": loss_cls / normalizer,
            "loss_box": loss_box / normalizer,
            "loss_ctr": loss_ctr / normalizer,
        }
        # END SOLUTION
        return losses

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
            results = self.inference(
                *outputs,
                image_size=image_size_of(images),
                score_thresh=score_thresh,
                nms_thresh=nms_thresh,
            )
        finally:
            self.train(was_training)
        for result, (h, w) in zip(results, sizes or ()):  # padded batch: clip to each image
            boxes = result["boxes"]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            result.update({k: v[keep] for k, v in result.items()})
        return results

    @torch.no_grad()
    def inference(
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
        detections: List[TensorDict] = []
        # BEGIN SOLUTION (fcos_inference): Score (location, class) pairs by sqrt(sigmoid(cls) * sigmoid(ctr)), keep the top-k per level above score_thresh, decode and clip boxes, run class-specific NMS per image and class, and cap detections per image.
        strides_per_fpn_level = self.backbone.fpn_strides
        height, width = image_size
        num_classes = self.num_classes
        all_boxes, all_scores, all_labels = [], [], []
        for level_name, locations in locations_per_fpn_level.items():
            cls_logits = pred_cls_logits[level_name]  # (B, HW, C)
            num_images = cls_logits.shape[0]
            scores = torch.sqrt(
                torch.sigmoid(cls_logits) * torch.sigmoid(pred_ctr_logits[level_name])
            ).flatten(start_dim=1)  # (B, HW * C): index = location * C + class
            k = min(self.topk_candidates, scores.shape[1])
            top_scores, top_idx = scores.topk(k, dim=1)  # (B, k), sorted
            location_idx = top_idx // num_classes
            labels = top_idx % num_classes
            deltas = torch.gather(
                pred_boxreg_deltas[level_name], 1, location_idx.unsqueeze(-1).expand(-1, -1, 4)
            )
            boxes = fcos_apply_deltas_to_locations(
                deltas, locations[location_idx], strides_per_fpn_level[level_name]
            )  # (B, k, 4)
            all_boxes.append(boxes)
            all_scores.append(top_scores)
            all_labels.append(labels)

        boxes = torch.cat(all_boxes, dim=1)  # (B, M, 4)
        scores = torch.cat(all_scores, dim=1)  # (B, M)
        labels = torch.cat(all_labels, dim=1)  # (B, M)
        num_images = boxes.shape[0]
        boxes = torch.stack(
            [
                boxes[..., 0].clamp(min=0, max=width),
                boxes[..., 1].clamp(min=0, max=height),
                boxes[..., 2].clamp(min=0, max=width),
                boxes[..., 3].clamp(min=0, max=height),
            ],
            dim=-1,
        )
        image_ids = torch.arange(num_images, device=boxes.device).unsqueeze(1).expand_as(labels)

        # Flatten the batch, keeping only candidates above the threshold.
        is_candidate = scores > score_thresh
        boxes, scores = boxes[is_candidate], scores[is_candidate]
        labels, image_ids = labels[is_candidate], image_ids[is_candidate]

        # One NMS for the whole batch: a group per (image, class).
        keep = class_spec_nms(boxes, scores, image_ids * num_classes + labels, nms_thresh)

        for keep_image in split_kept_per_image(keep, image_ids, num_images, self.detections_per_image):
            detections.append(
                {"boxes": boxes[keep_image], "labels": labels[keep_image], "scores": scores[keep_image]}
            )
        # END SOLUTION
        return detections

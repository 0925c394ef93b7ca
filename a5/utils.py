"""Small utilities: seeds, relative error, devices, automatic mixed precision, offline folders.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch


TensorDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

REPO_ROOT = Path(__file__).resolve().parent.parent


def hello_helper() -> None:
    print("Hello from a5_helper.py!")


def reset_seed(number: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) random number generators."""
    random.seed(number)
    np.random.seed(number % 2**32)
    torch.manual_seed(number)


def rel_error(x: Union[torch.Tensor, np.ndarray, float], y: Union[torch.Tensor, np.ndarray, float],
              eps: float = 1e-10) -> float:
    """Relative error `max |x - y| / max(|x| + |y|)`, the course's sanity-check measure.

    Around 1e-7 (float32) for equal computations; above 1e-3 usually means a bug.
    """
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.numel() == 0:
        return 0.0
    return float((x - y).abs().max() / (x.abs() + y.abs()).clamp(min=eps).max())


def check_close(name: str, expected: Any, computed: Any, tol: float = 1e-6, decimals: int = 4) -> bool:
    """Print one notebook sanity check: expected and computed values, relative error, verdict.

    The verdict is "OK" when the relative error is below `tol`, else "WRONG". Values are
    printed rounded to `decimals` places (the error uses the full precision).
    """
    err = rel_error(expected, computed)

    def show(values: Any) -> Any:
        # "+ 0.0" turns -0.0 into 0.0 so that printed checks compare equal across machines.
        values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).numpy()
        return (np.round(values, decimals) + 0.0).tolist()

    print(f"{name}\n  expected {show(expected)}\n  computed {show(computed)}\n"
          f"  rel. error {err:.1e}: {'OK' if err < tol else 'WRONG'}")
    return err < tol


def pick_backbone(candidates: Sequence[str] = ("regnet_x_400mf", "mobilenet_v2")) -> Tuple[str, bool]:
    """The first backbone of `candidates` whose ImageNet weights can be loaded.

    Tries each in order through torchvision's weights API (the `TORCH_HOME` cache, then a
    download). Returns `(name, True)` for the first that loads, else
    `(candidates[0], False)` after a warning: the caller then trains from a random
    initialisation, which works but gives far lower accuracy.
    """
    import fcos  # local import: fcos imports nothing from here, but keep a5_helper light

    _setup_torch_home()
    reasons = []
    for name in candidates:
        try:
            fcos.DetectorBackboneWithFPN(8, backbone=name, pretrained=True)
            return name, True
        except RuntimeError as err:  # fcos raises RuntimeError with the file and cache folder
            reasons.append(f"{name}: {err}")
    warnings.warn("No pretrained backbone weights could be loaded; using a randomly initialised "
                  f"{candidates[0]}.\n" + "\n".join(reasons))
    return candidates[0], False


def default_data_dir() -> Path:
    """`$VOC_ROOT`, else `<repo>/../shared/data` if it exists, else `./data`."""
    if os.environ.get("VOC_ROOT"):
        return Path(os.environ["VOC_ROOT"])
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """"auto" -> CUDA if available else CPU; anything else is passed to torch.device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bfloat16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (Intel AMX or
    AVX512-BF16). There, bf16 autocast makes convolutions ~1.8x faster; elsewhere
    oneDNN emulates bf16 and it is no faster than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in checks if hasattr(torch.cpu, name))
    except Exception:  # an old or unusual build: assume no fast bf16
        return False


def autocast_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """The half-precision dtype autocast uses by default: float16 on CUDA (more
    mantissa bits than bfloat16 for box coordinates), bfloat16 on CPU (what its
    matrix units support)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def default_amp(device: Union[str, torch.device]) -> bool:
    """Whether training autocasts by default: always on CUDA (float16), and on a CPU
    with hardware bfloat16 (`cpu_has_fast_bfloat16`). Losses and box decoding stay
    in float32 either way (the detectors cast their predictions up first)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_fast_bfloat16()


def move_to_device(obj: Any, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> Any:
    """Move tensors inside (nested) dicts / lists / tuples to `device`.

    Training batches are either an image tensor `(B, 3, H, W)` or a dict of cached
    backbone features {"c3", "c4", "c5"}; this lets the training loop ignore which.
    `dtype` (if given) is applied to floating point tensors only, so that integer
    tensors keep their type.
    """
    if torch.is_tensor(obj):
        non_blocking = obj.is_pinned() if obj.device.type == "cpu" else False
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return obj.to(device=device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, dtype) for v in obj)
    return obj


def _setup_torch_home() -> None:
    """Use the offline weight cache next to the repository when TORCH_HOME is unset."""
    shared = REPO_ROOT.parent / "shared" / "weights"
    if "TORCH_HOME" not in os.environ and shared.is_dir():
        os.environ["TORCH_HOME"] = str(shared)

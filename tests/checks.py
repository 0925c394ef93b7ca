"""Assertions whose failure messages a student can act on.

Every check names the quantity, then says what was expected and what the code computed,
with the shapes and the largest difference, e.g.::

    centerness of location (12, 4): expected 0.5774 (shape (3,)), computed 0.3333 ...

Use them instead of bare ``assert torch.equal(...)`` in the tests of student parts.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def _describe(value: Any, limit: int = 12) -> str:
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        shown = flat[:limit].tolist()
        more = f" ... ({flat.numel()} values)" if flat.numel() > limit else ""
        return f"{shown}{more} (shape {tuple(value.shape)}, {str(value.dtype).replace('torch.', '')})"
    return repr(value)


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=like.dtype)


def check_shape(what: str, computed: torch.Tensor, shape: tuple) -> None:
    """``computed`` must be a tensor of exactly ``shape``."""
    if not isinstance(computed, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor of shape {shape}, computed {type(computed).__name__}")
    if tuple(computed.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {tuple(shape)}, computed shape {tuple(computed.shape)}")


def check_close(
    what: str,
    computed: Any,
    expected: Any,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    hint: Optional[str] = None,
) -> None:
    """``computed`` equals ``expected`` up to ``atol + rtol * |expected|`` (same shape)."""
    if not isinstance(computed, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, computed {type(computed).__name__}: {computed!r}")
    expected = _as_tensor(expected, computed)
    if tuple(computed.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{what}: expected shape {tuple(expected.shape)}, computed shape {tuple(computed.shape)}"
            f"\n  expected: {_describe(expected)}\n  computed: {_describe(computed)}"
        )
    computed64 = computed.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    if torch.allclose(computed64, expected64, rtol=rtol, atol=atol, equal_nan=True):
        return
    difference = (computed64 - expected64).abs()
    worst = int(torch.nan_to_num(difference, nan=float("inf")).reshape(-1).argmax()) if difference.numel() else 0
    message = (
        f"{what}: expected {_describe(expected)},\n  computed {_describe(computed)}"
        f"\n  largest difference {difference.reshape(-1)[worst].item():.4g} at flat index {worst}"
        f" (expected {expected64.reshape(-1)[worst].item():.6g}, computed {computed64.reshape(-1)[worst].item():.6g})"
    )
    if hint:
        message += f"\n  hint: {hint}"
    raise AssertionError(message)


def check_equal(what: str, computed: Any, expected: Any, hint: Optional[str] = None) -> None:
    """``computed`` equals ``expected`` exactly (values and shape; integers and bools too)."""
    if not isinstance(computed, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, computed {type(computed).__name__}: {computed!r}")
    expected = _as_tensor(expected, computed)
    if tuple(computed.shape) == tuple(expected.shape) and torch.equal(computed.cpu(), expected.to(computed.dtype).cpu()):
        return
    message = f"{what}: expected {_describe(expected)},\n  computed {_describe(computed)}"
    if tuple(computed.shape) == tuple(expected.shape):
        differs = (computed.cpu() != expected.to(computed.dtype).cpu()).reshape(-1).nonzero().reshape(-1)
        if differs.numel():
            first = int(differs[0])
            message += (f"\n  {differs.numel()} entries differ; the first at flat index {first}: expected "
                        f"{expected.reshape(-1)[first].item()}, computed {computed.reshape(-1)[first].item()}")
    if hint:
        message += f"\n  hint: {hint}"
    raise AssertionError(message)


def check_dtype(what: str, computed: torch.Tensor, dtype: torch.dtype) -> None:
    if computed.dtype != dtype:
        raise AssertionError(f"{what}: expected dtype {dtype}, computed {computed.dtype}")

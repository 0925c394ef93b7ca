"""Tests of a5/utils.py: seeds, devices, the AMP defaults.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import a5_helper as h
from helpers import one_thread  # noqa: F401 (fixtures)

pytestmark = pytest.mark.part("provided")


def test_hello_and_reset_seed():
    h.hello_helper()
    h.reset_seed(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    h.reset_seed(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_default_amp_follows_the_cpus_bfloat16_support(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert h.cpu_has_fast_bfloat16() is expected
    assert h.default_amp("cpu") is expected and h.default_amp(torch.device("cpu")) is expected
    assert h.default_amp("cuda") is True and h.default_amp("meta") is False


def test_default_amp_survives_a_torch_without_the_cpu_probes(monkeypatch):
    def broken():
        raise RuntimeError("not built with oneDNN")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert h.cpu_has_fast_bfloat16() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert h.cpu_has_fast_bfloat16() is False

"""Deterministic kernels: the process-wide switch and the server's `--deterministic`."""
from __future__ import annotations

import os

import pytest
import torch

import djinn
from djinn.reproducibility import (CUBLAS_WORKSPACE_CONFIG, deterministic_kernels, deterministic_region,
                                  use_deterministic_kernels)


@pytest.fixture
def restore_torch_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    for enable in FUSED_ATTENTION_SWITCHES:
        enable(True)


FUSED_ATTENTION_SWITCHES = (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                            torch.backends.cuda.enable_cudnn_sdp)


def _fused_attention_enabled() -> list[bool]:
    return [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled()]


def test_use_deterministic_kernels_sets_every_switch(restore_torch_flags):
    assert not deterministic_kernels()
    use_deterministic_kernels()
    assert deterministic_kernels() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert _fused_attention_enabled() == [False, False, False] and torch.backends.cuda.math_sdp_enabled()


def test_a_user_cublas_setting_is_kept(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_kernels()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_region_restores_the_previous_settings(restore_torch_flags):
    with deterministic_region():
        assert deterministic_kernels()
        assert _fused_attention_enabled() == [False, False, False]
    assert not deterministic_kernels() and torch.utils.deterministic.fill_uninitialized_memory is True
    assert _fused_attention_enabled() == [True, True, True]


@pytest.mark.parametrize("flag, expected", [((), False), (("--deterministic",), True)])
def test_server_reports_its_kernels(start_server, flag, expected):
    server = start_server(*flag)
    with djinn.connect(server.host_port) as client:
        assert client.hello()["deterministic_kernels"] is expected

"""Deterministic kernels: the process-wide switch and the server's `--deterministic`."""
from __future__ import annotations

import os

import pytest
import torch

import djinn
from djinn.reproducibility import (CUBLAS_WORKSPACE_CONFIG, DETERMINISTIC, DeterministicKernels, child_environment, current_kernel_config,
                                  deterministic_kernels, deterministic_region, use_deterministic_kernels)


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
    with deterministic_region() as inside:
        assert deterministic_kernels()
        assert _fused_attention_enabled() == [False, False, False]
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
        assert inside.deterministic and inside.fused_attention == () and inside.cuda_initialized_before is False
    assert not deterministic_kernels() and torch.utils.deterministic.fill_uninitialized_memory is True
    assert _fused_attention_enabled() == [True, True, True]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ, "the region must not leak cuBLAS's workspace setting"
    assert current_kernel_config().fused_attention == ("flash", "mem_efficient", "cudnn")


def test_deterministic_region_restores_a_users_cublas_value(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_region() as inside:
        assert inside.cublas_workspace_config == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_child_environment_carries_exactly_the_childs_kernel_setting():
    base = {"PATH": "/bin", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert child_environment(base, deterministic=False) == {"PATH": "/bin"}
    assert child_environment({"PATH": "/bin"}, deterministic=True)["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    assert child_environment({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, True)["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("flag, expected", [((), False), (("--deterministic",), True)])
def test_server_reports_its_kernels(start_server, flag, expected):
    server = start_server(*flag)
    with djinn.connect(server.host_port) as client:
        assert client.hello()["deterministic_kernels"] is expected


def test_the_kernels_follow_the_named_constant(restore_torch_flags):
    """What --deterministic sets is `DETERMINISTIC` (the probe's choice), not values of its own."""
    chosen = DeterministicKernels(cublas_workspace_config=":32768:2", algorithms=False, fused_attention=("flash",))
    use_deterministic_kernels(chosen)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":32768:2"
    assert not torch.are_deterministic_algorithms_enabled()
    assert _fused_attention_enabled() == [True, False, False]
    assert CUBLAS_WORKSPACE_CONFIG == DETERMINISTIC.cublas_workspace_config


def test_nested_regions_restore_the_outer_one(restore_torch_flags):
    with deterministic_region():
        with deterministic_region():
            pass
        assert deterministic_kernels() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    assert not deterministic_kernels() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_no_kernel_setting_reaches_a_child_started_after_a_region(restore_torch_flags):
    """A region's setting is gone once it ends: a child started with this process's environment
    afterwards sees none of it (the issue's 41 ms servers had inherited it)."""
    import subprocess
    import sys
    with deterministic_region():
        pass
    probe = "import os, torch; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'), torch.are_deterministic_algorithms_enabled())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False"]
    inside = {}
    with deterministic_region():
        inside = child_environment(os.environ, deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in inside

"""`djinn-server`'s command line: defaults written once in `ServerConfig`, version, fast clear start-up failures."""
from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import djinn
from djinn.server.__main__ import parse_args
from djinn.server.server import ServerConfig

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _server(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:  # torch imports slowly on a loaded host
    return subprocess.run([sys.executable, "-m", "djinn.server", "--no-malloc-tuning", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_the_version_is_pyprojects():
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert djinn.__version__ == version
    result = _server("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"djinn-server {version}"


def test_the_parser_is_the_config():
    assert parse_args([]) == ServerConfig()
    config = ServerConfig(host="0.0.0.0", port=0, device="cpu", model=("tiny-llama", "/ckpt/a"), vram_budget_gb=1.5,
                          disable_kv_swap=True, ipc_path="/tmp/x", malloc_tuning=False, log_level="DEBUG")
    assert parse_args(config.argv()) == config
    assert ServerConfig().argv() == []


def test_help_shows_the_defaults():
    text = ServerConfig.parser().format_help()
    assert "(default: 5556)" in text and "(default: auto)" in text and "(default: 600.0)" in text


@pytest.mark.parametrize("args,says", [
    (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda:0"], "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--auth-token-file", "/nonexistent/token"], "/nonexistent/token"),
], ids=["device-gpu", "cuda-on-a-cpu-torch", "unknown-model", "missing-token-file"])
def test_a_start_up_failure_is_one_line_and_an_exit_code(args, says):
    result = _server("--port", "0", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("djinn-server: cannot start: ") and says in lines[0], result.stderr


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _server("--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "in use" in result.stderr, result.stderr

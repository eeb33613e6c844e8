"""The benchmark suite's infrastructure: options, the server, the model, collectors, results.

Benchmarks share one device and must run serially (`-n 0`); correctness tests in
tests/ are the ones to run with `-n auto`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import djinn
from djinn.client import RemoteModel, load_local
from djinn.modes import resolve as resolve_mode
from djinn.reproducibility import deterministic_region
from djinn import models
from djinn.server.process import ServerProcess
from djinn.telemetry.nvml import NvmlSampler, nvml_available
from djinn.telemetry.pcie import cuda_unavailable_reason, measure_pcie_peak
from djinn.telemetry.wire_capture import WireCapture, capture_available

from benchmarks.collectors import NVML_INTERVAL_S, Collectors
from benchmarks.results import ResultsWriter

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILE = Path(__file__).parent / "data" / "prompt.json"
SERVER_LOG_TAIL_CHARS = 20_000


def pytest_addoption(parser):
    group = parser.getgroup("djinn", "Djinn benchmarks")
    group.addoption("--djinn-server", default=None, metavar="HOST:PORT",
                    help="use this running server instead of starting one")
    group.addoption("--djinn-model", default="auto",
                    help="auto (tiny-llama on CPU, llama-2-7b on a GPU), a catalogue name, or a local checkpoint path")
    group.addoption("--djinn-device", default="auto", help="auto, cpu or cuda:N")
    group.addoption("--runs", type=int, default=25, help="measured runs per baseline (the seed: 30 with 5 discarded)")
    group.addoption("--warmup-runs", type=int, default=5, help="runs before the measured ones, discarded")
    group.addoption("--gap-trials", type=int, default=3, help="trials per phase and mode of the gap experiment")
    group.addoption("--djinn-results", default=str(REPO / "results"), help="folder for raw result JSON")
    group.addoption("--blind-tokens", type=int, default=None,
                    help="new tokens per semantic_blind run (default: all of them for models under 1 GB, else 3)")
    group.addoption("--ring-model", default="auto",
                    help="ring buffer: auto (tiny-llama on CPU, llama-2-13b on a GPU) or a catalogue name")
    group.addoption("--ring-budget-gb", type=float, default=None,
                    help="ring buffer: device budget in GiB (default: 10 on a GPU, on a CPU one below the model's size)")
    group.addoption("--ring-num-layers", type=int, default=None,
                    help="ring buffer: truncate the model to this many layers (a llama-2-70b that fits host RAM)")
    group.addoption("--ring-new-tokens", type=int, default=50, help="ring buffer: new tokens per run")
    group.addoption("--blind-runs", type=int, default=None,
                    help="measured semantic_blind runs (default: --runs for models under 1 GB, else 2)")
    group.addoption("--exp3-model", default="auto",
                    help="exp3: auto (tiny-llama on CPU, llama-2-13b on a GPU), a catalogue name or a checkpoint path")
    group.addoption("--exp3-layers", default=None, metavar="N,N,...",
                    help="exp3: breakpoint layers (default: 5 spread over the depth, [1,10,20,30,39] for 40 layers)")
    group.addoption("--exp3-seq-lens", default=None, metavar="S,S,...",
                    help="exp3: prompt lengths of the resume benchmark (default: 512,2048 on a GPU, 64,256 on a CPU)")
    group.addoption("--exp3-rounds", type=int, default=None,
                    help="exp3: measured resumes per baseline, layer and length (default: 9 on a GPU, 3 on a CPU)")
    group.addoption("--exp3-idle-ms", type=float, default=None,
                    help="exp3: how long each parked session sits idle before its timed restore, in every "
                         "baseline (default: 20; 0 restores right after the offload)")
    group.addoption("--exp3-sessions", type=int, default=None,
                    help="exp3: sessions of the oversubscription benchmark (default: on a GPU as many as make the "
                         "demand --exp3-demand-factor x the device's memory; 6 on a CPU)")
    group.addoption("--exp3-demand-factor", type=float, default=None,
                    help="exp3: oversubscription demand (weights + all sessions' KV) over the device's memory "
                         "(default: 1.2)")
    group.addoption("--exp3-context-tokens", type=int, default=None,
                    help="exp3: prompt tokens per session (default: ~1.3 GB of KV each on a GPU, 96 on a CPU)")
    group.addoption("--exp3-new-tokens", type=int, default=4, help="exp3: tokens each session decodes")
    group.addoption("--exp3-budget-gb", type=float, default=None,
                    help="exp3: the oversubscription server's --vram-budget-gb, GiB (default on a GPU: the server's "
                         "own, what the device has free; on a CPU, the weights and 40%% of the sessions' KV)")


def pytest_collection_modifyitems(config, items):
    """A module with a `run_order(items) -> items` function orders its own tests, in the
    slots they were collected in (the transport benchmark runs torch RPC's last)."""
    by_module: dict = {}
    for index, item in enumerate(items):
        if hasattr(item.module, "run_order"):
            by_module.setdefault(item.module, []).append(index)
    for module, slots in by_module.items():
        for slot, item in zip(slots, module.run_order([items[i] for i in slots])):
            items[slot] = item


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and any("benchmarks" in str(a) for a in config.args):
        raise pytest.UsageError("the benchmarks share one device and must run serially: drop -n for benchmarks/ "
                                "(run the correctness tests in tests/ with -n auto instead)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    server = item.funcargs.get("djinn_server") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(server, ServerProcess):
        report.sections.append(("djinn server log", server.log()[-SERVER_LOG_TAIL_CHARS:]))
    return report


# -- where and what -----------------------------------------------------------------
@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    device = pytestconfig.getoption("--djinn-device")
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class BenchModel:
    """The model under test, on the device (native baseline) and on the host (the client's copy)."""
    name: str
    local: torch.nn.Module
    client_copy: torch.nn.Module
    dtype: torch.dtype
    weight_bytes: int

    def load(self, mode: str, client) -> RemoteModel:
        """The model in a mode: run here for the native baseline, through the server otherwise."""
        if resolve_mode(mode).weights == "local":
            return load_local(self.local)
        return client.load(self.client_copy, mode=mode)

    @property
    def shape(self) -> dict:
        cfg = self.local.config
        return {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                "vocab": cfg.vocab_size, "dtype": str(self.dtype).removeprefix("torch."),
                "weight_bytes": self.weight_bytes}


@pytest.fixture(scope="session")
def bench_model(pytestconfig, bench_device) -> BenchModel:
    name = pytestconfig.getoption("--djinn-model")
    if name == "auto":
        name = models.default_model_name(bench_device)
    local = models.build(name, seed=0, device=bench_device)
    client_copy = local if bench_device == "cpu" else models.to_host(local)
    weight_bytes = sum(p.numel() * p.element_size() for p in local.state_dict().values())
    return BenchModel(name, local, client_copy, next(local.parameters()).dtype, weight_bytes)


@pytest.fixture(scope="session")
def prompt_ids() -> torch.Tensor:
    ids = json.loads(PROMPT_FILE.read_text())["token_ids"]
    return torch.tensor([ids], dtype=torch.long)


# -- the server -------------------------------------------------------------------------
@dataclass(frozen=True)
class ExternalServer:
    host_port: str

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def log(self) -> str:
        return "(external server: its log is wherever it was started)"


@pytest.fixture(scope="session")
def djinn_server(pytestconfig, bench_device, tmp_path_factory):
    """A server on the benchmark's device, started once per session (or --djinn-server)."""
    external = pytestconfig.getoption("--djinn-server")
    if external:
        yield ExternalServer(external)
        return
    log = tmp_path_factory.mktemp("djinn-server") / "server.log"
    with ServerProcess("--device", bench_device, "--deterministic", "--log-level", "INFO", log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def deterministic_kernels():
    """This process on deterministic kernels for a module (`djinn.reproducibility`); the
    servers above always are. A GPU's fused attention kernels decode differently from
    run to run, so repeated runs and the modes only compare bit for bit this way."""
    with deterministic_region():
        yield


@pytest.fixture(scope="session")
def djinn_client(djinn_server):
    with djinn.connect(djinn_server.host_port, timeout_s=600) as client:
        yield client


@pytest.fixture(scope="session")
def djinn_graph_server(bench_device, tmp_path_factory):
    """A second server that decodes through CUDA-graph slots (`--decode-graphs`)."""
    log = tmp_path_factory.mktemp("djinn-graph-server") / "server.log"
    with ServerProcess("--device", bench_device, "--decode-graphs", "--deterministic", "--log-level", "INFO",
                       log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def djinn_graph_client(djinn_graph_server):
    # The first decode step compiles the graph (about 40 s for the 7B shape on an H100).
    with djinn.connect(djinn_graph_server.host_port, timeout_s=900) as client:
        yield client


# -- collectors ----------------------------------------------------------------------------
def _gpu_index(device: str) -> int | None:
    return (torch.device(device).index or 0) if device.startswith("cuda") else None


@pytest.fixture
def nvml(bench_device):
    """NvmlSampler factory for the benchmark's GPU; skips where NVML has no GPU."""
    index = _gpu_index(bench_device)
    ok, reason = nvml_available(index or 0) if index is not None else (False, "the benchmark device is the CPU")
    if not ok:
        pytest.skip(f"NVML: {reason}")
    return lambda: NvmlSampler(index, NVML_INTERVAL_S)


@pytest.fixture
def wire_capture():
    """WireCapture factory (port → context manager); skips without CAP_NET_RAW."""
    ok, reason = capture_available()
    if not ok:
        pytest.skip(f"wire capture: {reason}")
    return WireCapture


@pytest.fixture
def collectors(bench_device, djinn_server) -> Collectors:
    """NVML + wire capture around a measured region, each where it can run."""
    return Collectors(_gpu_index(bench_device), djinn_server.port)


@pytest.fixture
def graph_collectors(bench_device, djinn_graph_server) -> Collectors:
    return Collectors(_gpu_index(bench_device), djinn_graph_server.port)


# Telemetry has its own fixtures, which skip or record their reasons; the doctor leaves it out.
DOCTOR_TELEMETRY_CHECKS = ("nvml", "wire_capture")


@pytest.fixture(scope="session")
def doctor(bench_device):
    """`python -m djinn.doctor`'s checks for the benchmark's device (CUDA, GPU memory, pinned
    memory, host memory); skips with the failed checks' reasons. PCIe is `pcie_peak`'s."""
    from djinn.doctor import run_checks

    on_cuda = bench_device.startswith("cuda")
    checks = run_checks(on_cuda, measure_pcie=False, device_index=_gpu_index(bench_device) or 0)
    failed = [c for c in checks if c.required and not c.ok and c.name not in DOCTOR_TELEMETRY_CHECKS]
    if failed:
        pytest.skip("environment check failed: " + "; ".join(str(c) for c in failed))
    return checks


@pytest.fixture(scope="session")
def pcie_peak(bench_device):
    """Pinned host→device bandwidth, measured once: the physical bound for streaming."""
    reason = cuda_unavailable_reason() if bench_device.startswith("cuda") else "the benchmark device is the CPU"
    if reason:
        pytest.skip(f"pcie_peak: {reason}")
    return measure_pcie_peak(device=bench_device)


@pytest.fixture(scope="session")
def results_writer(pytestconfig, bench_device) -> ResultsWriter:
    return ResultsWriter(Path(pytestconfig.getoption("--djinn-results")), REPO, bench_device)


@pytest.fixture
def progress(request):
    """Print a progress line past pytest's capture, so long benchmarks show they move."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def say(text: str) -> None:
        if reporter is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"  [{request.node.name}] {text}")
    return say

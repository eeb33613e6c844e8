"""The benchmark suite's infrastructure: options, the server, the model, collectors, results.

Benchmarks share one device and run serially (`-n 0`), or on a GPU host one GPU per xdist
worker (`benchmarks/gpu_workers.py`); correctness tests in tests/ are the ones to run with `-n auto`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import djinn
from djinn.client import RemoteModel, load_local
from djinn.modes import resolve as resolve_mode
from djinn.reproducibility import KernelConfig, current_kernel_config, deterministic_region
from djinn import models
from djinn.link import LinkSpecError, parse_link_spec
from djinn.link.emulated import EmulatedLink, link_unavailable_reason
from djinn.telemetry.nvml import NvmlSampler, nvml_available
from djinn.telemetry.hbm import HbmBandwidth, measure_hbm
from djinn.telemetry.pcie import cuda_unavailable_reason, measure_pcie_peak
from djinn.telemetry.wire_capture import WireCapture, capture_available

from benchmarks.collectors import NVML_INTERVAL_S, Collectors
from benchmarks.gpu_workers import XDIST_GPUS_VARIABLE, gpu_ids, pin_worker, xdist_refusal
from benchmarks.launcher import ServerSpec
from benchmarks.ledger import Ledger
from benchmarks.results import ResultsWriter
from benchmarks.threads import THREADS

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILE = Path(__file__).parent / "data" / "prompt.json"


# Folder for the raw JSON of a run: untracked (.gitignore); curated evidence is copied under
# results/<experiment>/<stamp>-<device>/ by hand, with that experiment's index.
DEFAULT_RESULTS = REPO / "runs"


def pytest_addoption(parser):
    """One scheme: every option is --djinn-*, one group per experiment. The exp3 options also
    answer to their old --exp3-* names, which benchmarks/exp3_plan.py still reads."""
    suite = parser.getgroup("djinn", "Djinn benchmarks: the whole suite")
    suite.addoption("--djinn-server", default=None, metavar="HOST:PORT",
                    help="use this running server instead of starting one")
    suite.addoption("--djinn-model", default="auto",
                    help="auto (tiny-llama on CPU, llama-2-7b on a GPU), a catalogue name, or a local checkpoint path")
    suite.addoption("--djinn-device", default="auto", help="auto, cpu or cuda:N")
    suite.addoption("--djinn-link", default=None, metavar="RATE[,rtt=TIME][,mtu=N][,gso=on|off][,delay=KIND]",
                    help="run the servers behind an emulated link (djinn.link: their own network namespace, "
                         "a veth pair shaped by tc), e.g. 25gbit,rtt=50us; needs root")
    suite.addoption("--djinn-runs", type=int, default=None,
                    help="measured runs per baseline (default: the seed's 25 after 5 discarded; 10 after 2 on "
                         "models over 1 GB, benchmarks/plans.py says why)")
    suite.addoption("--djinn-warmup-runs", type=int, default=None, help="runs before the measured ones, discarded")
    suite.addoption("--djinn-results", default=str(DEFAULT_RESULTS),
                    help="folder for raw result JSON (default: runs/, ignored by git)")
    suite.addoption("--djinn-blind-tokens", type=int, default=None,
                    help="new tokens per semantic_blind run (default: all of them for models under 1 GB, else 3)")
    suite.addoption("--djinn-blind-runs", type=int, default=None,
                    help="measured semantic_blind runs (default: --djinn-runs for models under 1 GB, else 2)")
    link = parser.getgroup("djinn-link", "Djinn: the link sweep (-m link_sweep)")
    link.addoption("--djinn-sweep-rate", default=None, metavar="RATE",
                   help="the sweep link's rate (default: --djinn-link's, else 1gbit on CPU and 25gbit on a GPU)")
    link.addoption("--djinn-sweep-rtts", default="0,50us,200us,1ms,5ms", metavar="TIME,TIME,...",
                   help="round trips the sweep sets on the link")
    # 12 x 63 paired decode steps: the off-server growth's interval is then ~±0.05 RTT at 1 ms on the
    # 2-core machine, and a round trip of the sweep ~40 s per RTT there.
    link.addoption("--djinn-sweep-rounds", type=int, default=12,
                   help="rounds per RTT (native, then loopback and link in lockstep); every decode step is a pair")
    link.addoption("--djinn-sweep-tokens", type=int, default=64, help="new tokens of each full_djinn generation")
    link.addoption("--djinn-sweep-blind-runs", type=int, default=3, help="semantic_blind runs per RTT")
    link.addoption("--djinn-sweep-blind-rtts", default="1ms", metavar="TIME,TIME,...",
                   help="round trips semantic_blind runs at (it ships the whole model every token)")
    gap = parser.getgroup("djinn-gap", "Djinn: the semantic translation gap (-m gap)")
    gap.addoption("--djinn-gap-trials", type=int, default=3, help="trials per phase and mode")
    ring = parser.getgroup("djinn-ring", "Djinn: ring-buffer streaming (-m ring_buffer)")
    ring.addoption("--djinn-ring-model", default="auto",
                   help="auto (tiny-llama on CPU, llama-2-13b on a GPU), a catalogue name or a checkpoint path")
    ring.addoption("--djinn-ring-budget-gb", type=float, default=None,
                   help="device budget in GiB (default: 10 on a GPU, on a CPU one below the model's size)")
    ring.addoption("--djinn-ring-num-layers", default=None, metavar="N|host",
                   help="truncate the model to N layers, or 'host': as many as the host can hold pinned "
                        "beside what the device holds (benchmarks.ring_scale; llama-2-70b)")
    ring.addoption("--djinn-ring-new-tokens", type=int, default=50, help="new tokens per run")
    exp3 = parser.getgroup("djinn-exp3", "Djinn: breakpoints and memory virtualization (-m exp3)")
    exp3.addoption("--djinn-exp3-model", "--exp3-model", default="auto",
                   help="auto (tiny-llama on CPU, llama-2-13b on a GPU), a catalogue name or a checkpoint path")
    exp3.addoption("--djinn-exp3-layers", "--exp3-layers", default=None, metavar="N,N,...",
                   help="breakpoint layers (default: 5 spread over the depth, [1,10,20,30,39] for 40 layers)")
    exp3.addoption("--djinn-exp3-seq-lens", "--exp3-seq-lens", default=None, metavar="S,S,...",
                   help="prompt lengths of the resume benchmark (default: 512,2048 on a GPU, 64,256 on a CPU)")
    exp3.addoption("--djinn-exp3-rounds", "--exp3-rounds", type=int, default=None,
                   help="measured resumes per baseline, layer and length (default: 9 on a GPU, 3 on a CPU)")
    exp3.addoption("--djinn-exp3-idle-ms", "--exp3-idle-ms", type=float, default=None,
                   help="how long each parked session sits idle before its timed restore, in every "
                        "baseline (default: 20; 0 restores right after the offload)")
    exp3.addoption("--djinn-exp3-sessions", "--exp3-sessions", type=int, default=None,
                   help="sessions of the oversubscription benchmark (default: on a GPU as many as make the demand "
                        "--djinn-exp3-demand-factor x the device's memory; 6 on a CPU)")
    exp3.addoption("--djinn-exp3-demand-factor", "--exp3-demand-factor", type=float, default=None,
                   help="oversubscription demand (weights + all sessions' KV) over the device's memory "
                        "(default: 1.2)")
    exp3.addoption("--djinn-exp3-context-tokens", "--exp3-context-tokens", type=int, default=None,
                   help="prompt tokens per session (default: ~1.3 GB of KV each on a GPU, 96 on a CPU)")
    exp3.addoption("--djinn-exp3-new-tokens", "--exp3-new-tokens", type=int, default=4,
                   help="tokens each session decodes")
    exp3.addoption("--djinn-exp3-budget-gb", "--exp3-budget-gb", type=float, default=None,
                   help="the oversubscription server's --vram-budget-gb, GiB (default on a GPU: the server's own, "
                        "what the device has free; on a CPU, the weights and 40%% of the sessions' KV)")
    tenancy = parser.getgroup("djinn-multitenant", "Djinn: concurrent tenants of one server (-m multitenant)")
    tenancy.addoption("--djinn-tenancy-step-token-budget", type=int, default=None, metavar="TOKENS",
                      help="the server's --step-token-budget (default: the server's own): a smaller one splits "
                           "joining tenants' prompts over more turns, each delaying a decode step less")
    scale = parser.getgroup("djinn-scale", "Djinn: a pool of servers, one per GPU (-m scale)")
    scale.addoption("--djinn-scale-servers", default="auto", metavar="N,N,...",
                    help="pool sizes (default: 1,2,4 servers up to the GPUs, one GPU each; 1,2 on a CPU)")
    scale.addoption("--djinn-scale-clients-per-server", type=int, default=2,
                    help="client processes per server, each decoding one full_djinn session (default: 2, so "
                         "that a server always has the next request queued)")
    scale.addoption("--djinn-scale-pool", default="auto", choices=("auto", "static", "ray"),
                    help="servers as Ray actors (ray), launched by the suite (static), or ray where it is "
                         "installed (auto)")
    scale.addoption("--djinn-scale-model", default="auto",
                    help="auto (tiny-llama on CPU, llama-2-7b on a GPU), or a catalogue name or checkpoint path "
                         "that every server loads (--model)")
    scale.addoption("--djinn-scale-new-tokens", type=int, default=None,
                    help="tokens each client decodes per round (default: 32 on a GPU, 8 on a CPU)")
    scale.addoption("--djinn-scale-rounds", type=int, default=None,
                    help="measured rounds per pool size (default: 5 on a GPU, 3 on a CPU)")


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


_WRITER = pytest.StashKey["ResultsWriter"]()


def pytest_configure(config):
    workers = getattr(config.option, "numprocesses", None)
    if workers and any("benchmarks" in str(a) for a in config.args):  # the controller: a GPU for each worker
        gpus = gpu_ids(torch.cuda.device_count() if torch.cuda.is_available() else 0)
        refusal = xdist_refusal(workers if isinstance(workers, int) else len(gpus) + 1, len(gpus))
        if refusal:
            raise pytest.UsageError(refusal)
        os.environ[XDIST_GPUS_VARIABLE] = ",".join(gpus)  # the workers inherit it
    pin_worker()  # a worker: its one GPU, before anything touches CUDA
    link = config.getoption("--djinn-link", None)
    if link is not None:
        try:
            parse_link_spec(link)
        except LinkSpecError as exc:
            raise pytest.UsageError(f"--djinn-link: {exc}") from None
    # djinn-compare tests timings on the per-round samples, which the JSON holds only when asked.
    if hasattr(config.option, "benchmark_save_data"):
        config.option.benchmark_save_data = True


def pytest_benchmark_update_machine_info(config, machine_info):
    """The thread pin every timing depends on, in pytest-benchmark's JSON too (the kernels are
    each benchmark's `kernels`: this hook runs before the session enters its configuration)."""
    machine_info["djinn_threads"] = config.stash[THREADS].as_dict()


@pytest.fixture(autouse=True)
def _kernels_in_extra_info(request, server_launcher):
    """Both sides' kernel configuration beside every timing: this process's and each server's
    (written after the test, when the servers it started are known; the dict is the one
    pytest-benchmark serialises at the end of the session)."""
    extra_info = request.getfixturevalue("benchmark").extra_info if "benchmark" in request.fixturenames else None
    yield
    if extra_info is not None:
        servers = server_launcher.describe()
        extra_info["kernels"] = {
            "pytest": current_kernel_config().as_dict(),
            "servers": {s["name"]: s["kernels"] for s in servers}}
        links = {s["name"]: s["link"] for s in servers if s["link"]}
        if links:
            extra_info["links"] = links


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    writer = config.stash.get(_WRITER, None)
    if writer is not None and writer.written:
        terminalreporter.write_line(writer.summary_line())


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

    def load(self, mode: str, client, decode: str = "auto") -> RemoteModel:
        """The model in a mode: run here for the native baseline, through the server otherwise."""
        if resolve_mode(mode).weights == "local":
            return load_local(self.local)
        return client.load(self.client_copy, mode=mode, decode=decode)

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
def djinn_link(pytestconfig):
    """The emulated link of --djinn-link for the session's servers (None: loopback); skips with the
    reason where namespaces cannot be made. Torn down at the end, also after a failure."""
    text = pytestconfig.getoption("--djinn-link")
    if text is None:
        yield None
        return
    reason = link_unavailable_reason()
    if reason:
        pytest.skip(f"--djinn-link {text}: {reason}")
    with EmulatedLink(parse_link_spec(text)) as link:
        yield link


@pytest.fixture(scope="session")
def djinn_server(pytestconfig, bench_device, server_launcher, djinn_link):
    """A server on the benchmark's device, started once per session (or --djinn-server), behind
    --djinn-link's link when one is given."""
    external = pytestconfig.getoption("--djinn-server")
    if external:
        return ExternalServer(external)
    return server_launcher.start("djinn", ServerSpec(bench_device), link=djinn_link)


@pytest.fixture(scope="session", autouse=True)
def deterministic_kernels() -> KernelConfig:
    """This process on deterministic kernels for the whole session, entered before any test
    touches the device so cuBLAS's first handle already reads the fixed workspace: the local
    baselines then run the configuration every benchmark server runs (`ServerSpec.deterministic`).
    A GPU's fused attention kernels decode differently from run to run, so repeated runs and
    the modes only compare bit for bit this way."""
    with deterministic_region() as kernels:
        yield kernels


@pytest.fixture(scope="session")
def djinn_client(djinn_server):
    with djinn.connect(djinn_server.host_port, timeout_s=600) as client:
        yield client


@pytest.fixture(scope="session")
def djinn_fast_server(bench_device, server_launcher, djinn_link):
    """A second server as a user starts one: the GPU's default kernels and, on CUDA, the fast path
    by default (its loads ask for it by name, so a CPU runs the same forward eagerly)."""
    return server_launcher.start("djinn-fast", ServerSpec(bench_device, deterministic=False, exact=False),
                                 link=djinn_link)


@pytest.fixture(scope="session")
def djinn_fast_client(djinn_fast_server):
    # The first decode step compiles the model's step (a minute or more for the 7B shape).
    with djinn.connect(djinn_fast_server.host_port, timeout_s=900) as client:
        yield client


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    """What this session measured, for the criteria tests (benchmarks.ledger)."""
    return Ledger()


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


def _capture_interface(link: EmulatedLink | None) -> str:
    # Over a link the capture watches the client's veth end: Ethernet frames as the link carries them.
    return link.client_interface if link is not None else "lo"


@pytest.fixture
def collectors(bench_device, djinn_server, djinn_link) -> Collectors:
    """NVML + wire capture around a measured region, each where it can run."""
    return Collectors(_gpu_index(bench_device), djinn_server.port, _capture_interface(djinn_link))


@pytest.fixture
def fast_collectors(bench_device, djinn_fast_server, djinn_link) -> Collectors:
    return Collectors(_gpu_index(bench_device), djinn_fast_server.port, _capture_interface(djinn_link))


# Telemetry has its own fixtures, which skip or record their reasons; the doctor leaves it out.
DOCTOR_TELEMETRY_CHECKS = ("nvml", "wire_capture", "network_link")


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
def hbm_peak(bench_device) -> HbmBandwidth | None:
    """The GPU's measured copy bandwidth and datasheet peak, once; None on a CPU (no HBM to bound)."""
    return measure_hbm(bench_device) if bench_device.startswith("cuda") else None


@pytest.fixture(scope="session")
def results_writer(pytestconfig, bench_device, deterministic_kernels) -> ResultsWriter:
    """Raw JSON under --djinn-results, each file with the run's threads and kernel configuration."""
    writer = ResultsWriter(Path(pytestconfig.getoption("--djinn-results")), REPO, bench_device,
                           facts={"threads": pytestconfig.stash[THREADS].as_dict(),
                                  "kernels": deterministic_kernels.as_dict()})
    pytestconfig.stash[_WRITER] = writer
    return writer


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

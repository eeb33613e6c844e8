"""Experiment 3 (seed 004): memory oversubscription — more sessions' KV than the device holds.

N sessions each prefill a C-token prompt (~1.3 GB of KV each on the llama-2-13b shape)
and then decode `--exp3-new-tokens` tokens round robin. On a GPU N is sized so that the
demand (weights + N x KV) is 1.2x the device's memory (`--exp3-demand-factor`), so idle
sessions' KV has to move, and the server keeps its own default budget.

- `test_pytorch_eager`: the same sessions in this process, every KV cache kept on the
  device, until out of memory: the N at which it fails. (On a CPU there is no device
  memory to exhaust: the N at which weights + N x KV pass the same budget, accounted.)
- `test_djinn_oversubscription`: a server on deterministic kernels; all N sessions
  prefilled and decoded to completion while the server pages LRU sessions' KV to pinned
  host memory and back. Memory over time comes from the server's stats after every
  request (accounted: weights + resident KV, and the bytes on the host) and, on a GPU,
  from NVML (physical). The page-in bandwidth is compared with the pinned PCIe peak
  measured in the same run. pytest-benchmark times the whole workload. Then each
  session's tokens are checked: on a CPU against HF generate, on a GPU against the same
  prompt decoded alone on the same server afterwards (its solo reference, no paging).

Writes `results/exp3/<stamp>-oversubscription.json` and the memory-virtualization
figure, then checks the goals (issue 12): the demand exceeds the device's memory; every
session completes with 0 failures and its reference's tokens; on a GPU, page-in at
>= 90% of the PCIe peak. The JSON also says how much of the device stayed unused at the
peak: the price of the budget's reserve.
"""
from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import pytest
import torch

import djinn
from djinn import kv, models
from djinn.decoding import forward_last
from djinn.errors import DjinnError
from djinn.telemetry.pcie import measure_pcie_peak

from benchmarks import exp3_plan
from benchmarks.collectors import Collectors
from benchmarks.exp3_figures import plot_memory_virtualization
from benchmarks.launcher import ServerSpec
from benchmarks.results import environment

pytestmark = pytest.mark.exp3

GIB = 1 << 30
PROMPT_SEED = 40  # session i's prompt: seeded PROMPT_SEED + i
REMOTE_TIMEOUT_S = 1800.0  # uploading a 13B model through loopback takes a while
MIN_FRACTION_OF_PCIE_PEAK = 0.9  # issue 12's goal for KV page-in


@dataclass
class Oversubscription:
    name: str
    device: str
    local: torch.nn.Module | None  # on the device, for the eager baseline; released before the server starts
    host_copy: torch.nn.Module  # what the client uploads
    weight_bytes: int
    sessions: int
    context_tokens: int
    new_tokens: int
    kv_per_token: int
    budget_bytes: int | None  # None: the server's own default
    device_capacity_bytes: int | None  # None on a CPU
    demand_factor: float
    vocab_size: int

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def session_kv_bytes(self) -> int:
        return (self.context_tokens + self.new_tokens) * self.kv_per_token

    @property
    def demand_bytes(self) -> int:
        return self.weight_bytes + self.sessions * self.session_kv_bytes

    def prompt(self, index: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (1, self.context_tokens),
                             generator=torch.Generator().manual_seed(PROMPT_SEED + index))

    def release_local(self) -> None:
        self.local = None
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        return {"model": self.name, "device": self.device, "weight_bytes": self.weight_bytes,
                "sessions": self.sessions, "context_tokens": self.context_tokens, "new_tokens": self.new_tokens,
                "session_kv_bytes": self.session_kv_bytes, "demand_bytes": self.demand_bytes,
                "requested_budget_bytes": self.budget_bytes, "device_capacity_bytes": self.device_capacity_bytes,
                "demand_factor_target": self.demand_factor,
                "demand_over_device": (self.demand_bytes / self.device_capacity_bytes
                                       if self.device_capacity_bytes else None)}

    def plan(self) -> str:
        where = (f"{self.demand_bytes / GIB:.1f} GiB of demand = {self.demand_bytes / self.device_capacity_bytes:.2f}x "
                 f"the device's {self.device_capacity_bytes / GIB:.1f} GiB" if self.device_capacity_bytes else
                 f"{self.demand_bytes / GIB:.2f} GiB of demand on a {self.budget_bytes / GIB:.2f} GiB budget")
        return (f"exp3 oversubscription plan: {self.name}, {self.sessions} sessions x {self.context_tokens} + "
                f"{self.new_tokens} tokens ({self.session_kv_bytes / GIB:.2f} GiB of KV each) beside "
                f"{self.weight_bytes / GIB:.1f} GiB of weights: {where}; server budget: "
                + ("its default (free device memory)" if self.budget_bytes is None else f"{self.budget_bytes / GIB:.2f} GiB"))


@pytest.fixture(scope="module")
def setup(pytestconfig, bench_device) -> Oversubscription:
    name = exp3_plan.model_name(pytestconfig)
    local = models.build(name, seed=0, device=bench_device)
    host_copy = local if bench_device == "cpu" else models.to_host(local)
    dtype = next(local.parameters()).dtype
    weight_bytes = sum(t.numel() * t.element_size() for t in local.state_dict().values())
    kv_per_token = models.kv_bytes_per_token(local.config, dtype)
    context = exp3_plan.context_tokens(pytestconfig, local.config, dtype)
    new_tokens = pytestconfig.getoption("--exp3-new-tokens")
    sessions = exp3_plan.sessions(pytestconfig, weight_bytes, (context + new_tokens) * kv_per_token)
    budget = exp3_plan.budget_bytes(pytestconfig, weight_bytes, sessions * (context + new_tokens) * kv_per_token)
    setup = Oversubscription(name, bench_device, local, host_copy, weight_bytes, sessions, context, new_tokens,
                             kv_per_token, budget, exp3_plan.device_capacity_bytes(pytestconfig),
                             exp3_plan.demand_factor(pytestconfig), local.config.vocab_size)
    print(setup.plan())
    return setup


LEDGER = "exp3_oversubscription"  # the session ledger's section: "eager" and "djinn" results


def test_pytorch_eager(setup, progress, ledger):
    """Each session's KV cache kept on the device, as plain PyTorch would: the N at out-of-memory."""
    if setup.local is None:
        pytest.skip("the device copy of the model was released already")
    caches, oom_at, reason = [], None, None
    started = time.perf_counter()
    try:
        for index in range(setup.sessions):
            if not setup.on_cuda and setup.weight_bytes + (index + 1) * setup.session_kv_bytes > setup.budget_bytes:
                oom_at, reason = index + 1, "accounted: weights + KV past the budget (a CPU has no device to fill)"
                break
            cache = kv.from_pairs([])
            try:
                forward_last(setup.local, setup.prompt(index).to(setup.device), cache)
            except torch.OutOfMemoryError as exc:
                oom_at, reason = index + 1, f"torch.OutOfMemoryError: {str(exc).splitlines()[0]}"
                break
            caches.append(cache)
            if (index + 1) % 10 == 0:
                progress(f"{index + 1} sessions on the device")
        peak = torch.cuda.max_memory_allocated(setup.device) if setup.on_cuda else None
    finally:
        caches.clear()
        setup.release_local()
    ledger.record(LEDGER, "eager", {"sessions_completed": setup.sessions if oom_at is None else oom_at - 1,
                                    "oom_at_session": oom_at, "oom": reason, "peak_allocated_bytes": peak,
                                    "wall_s": time.perf_counter() - started})
    progress(f"PyTorch eager: {'no out-of-memory' if oom_at is None else f'out of memory at session {oom_at}'} "
             f"of {setup.sessions}")


def test_djinn_oversubscription(setup, benchmark, server_launcher, results_writer, progress, ledger):
    setup.release_local()  # the server gets the device
    progress(setup.plan())
    pcie = measure_pcie_peak(device=setup.device) if setup.on_cuda else None
    if setup.on_cuda:
        torch.cuda.empty_cache()
    benchmark.group = f"exp3-oversubscription-{setup.name}"
    gpu_index = (torch.device(setup.device).index or 0) if setup.on_cuda else None
    # Deterministic kernels (the launcher's default): each session's tokens are compared with its
    # solo reference bit for bit.
    server = server_launcher.start("exp3-oversubscription", ServerSpec(
        setup.device, vram_budget_gb=None if setup.budget_bytes is None else setup.budget_bytes / GIB))
    with ExitStack() as stack:  # the server goes with the test: it holds the whole device
        stack.callback(server.stop)
        client = stack.enter_context(djinn.connect(server.host_port, timeout_s=REMOTE_TIMEOUT_S))
        remote = client.load(setup.host_copy, mode="full_djinn")
        if setup.on_cuda:
            setup.host_copy = None  # uploaded: its host memory is the paged KV's now
            gc.collect()
        run = Workload(setup, client, remote, progress)
        run.region_started = time.perf_counter()  # the NVML sampler's clock starts here, give or take its start
        with Collectors(gpu_index, None).region(watch_wire=False) as telemetry:
            benchmark.pedantic(run, rounds=1, iterations=1)
        stats = client.stats()
        per_session = [s.stats() for s in run.sessions]
        for s in run.sessions:
            s.close()
        if setup.on_cuda:
            run.solo_references()
        else:  # the model is on the host already
            run.check_tokens_against_hf()

    paging = stats["paging"]
    memory = stats["memory"]
    page_in_gbps = paging["page_in_gbps"]
    nvml_peak = telemetry.nvml.mem_used_max_bytes if telemetry.nvml else None
    mismatched = [i for i, ref in run.references.items() if not torch.equal(run.tokens[i], ref)]
    data = {
        "experiment": "exp3_oversubscription", **setup.describe(),
        "server_budget_bytes": memory["budget_bytes"], "server_memory": memory,
        "sessions_completed": run.completed, "failures": run.failures,
        "reference": "solo run on the same server" if setup.on_cuda else "HF generate",
        "sessions_checked": len(run.references), "sessions_mismatched": mismatched,
        "paging": paging, "page_in_gbps_by_session": [p["page_in_gbps"] for p in per_session],
        "per_session": per_session, "pcie_peak": asdict(pcie) if pcie else None,
        "page_in_fraction_of_pcie_peak": page_in_gbps / pcie.h2d_pinned_gbps if pcie and page_in_gbps else None,
        # The price of the reserve: device memory no process used at the busiest moment (NVML, physical).
        "device_unused_at_peak_bytes": telemetry.nvml.mem_total_bytes - nvml_peak if nvml_peak else None,
        "nvml_total_bytes": telemetry.nvml.mem_total_bytes if telemetry.nvml else None,
        "tokens": {i: t.tolist() for i, t in run.tokens.items()},
        "reference_tokens": {i: t.tolist() for i, t in run.references.items()},
        "nvml_peak_used_bytes": nvml_peak,
        "eager": ledger.results(LEDGER).get("eager"), "workload_s": run.wall_s, "references_s": run.references_s, "timeline": run.timeline,
        "device_capacity_bytes": setup.device_capacity_bytes,
        "nvml_samples": ([{"t_s": s.t_s - (run.t0 - run.region_started), "mem_used_bytes": s.mem_used_bytes}
                          for s in telemetry.nvml.samples] if telemetry.nvml else None),
        "telemetry": telemetry.as_extra_info(),
        "environment": environment(results_writer.device, results_writer.repo),
    }
    data["budget_bytes"] = memory["budget_bytes"]  # the figure's budget line: what the server used
    path = results_writer.write(f"exp3/{results_writer.stamp}-oversubscription.json", data)
    figure = plot_memory_virtualization(data, path.with_suffix(".png"))
    ledger.record(LEDGER, "djinn", data)
    benchmark.extra_info.update({
        "model": setup.name, "sessions": setup.sessions, "sessions_completed": run.completed,
        "demand_bytes": setup.demand_bytes, "budget_bytes": memory["budget_bytes"],
        "demand_over_device": data["demand_over_device"], "sessions_mismatched": len(mismatched),
        "bytes_paged_out": paging["bytes_out"], "bytes_paged_in": paging["bytes_in"],
        "page_in_gbps": page_in_gbps, "page_in_fraction_of_pcie_peak": data["page_in_fraction_of_pcie_peak"],
        "ooms_recovered": memory["ooms_recovered"], "ooms_failed": memory["ooms_failed"],
        "eager_oom_at_session": (data["eager"] or {}).get("oom_at_session"), **telemetry.as_extra_info()})
    progress(f"{run.completed}/{setup.sessions} sessions completed, {len(mismatched)} of {len(run.references)} "
             f"differ from their reference; {paging['bytes_out'] / GIB:.2f} GiB paged out, page-in "
             f"{page_in_gbps or 0:.1f} GB/s; {memory['ooms_recovered']} allocation failures recovered; "
             f"wrote {path} and {figure}")

    if setup.device_capacity_bytes:
        assert setup.demand_bytes >= setup.device_capacity_bytes, \
            f"the run must oversubscribe the device: {setup.plan()}"
    assert setup.demand_bytes > memory["budget_bytes"], "the run must oversubscribe the budget"
    assert not run.failures, run.failures[:3]
    assert run.completed == setup.sessions
    assert paging["bytes_out"] > 0 and paging["bytes_in"] > 0
    assert len(run.references) == setup.sessions and not mismatched, \
        f"paged sessions must decode what they decode alone: sessions {mismatched[:10]} differ"
    if pcie is not None:
        assert data["page_in_fraction_of_pcie_peak"] >= MIN_FRACTION_OF_PCIE_PEAK, \
            (page_in_gbps, pcie.h2d_pinned_gbps)


class Workload:
    """All sessions prefilled, then decoded round robin; the server's memory sampled after every request."""

    def __init__(self, setup: Oversubscription, client, remote, progress):
        self.setup, self.client, self.remote, self.progress = setup, client, remote, progress
        self.sessions: list = []
        self.tokens: dict[int, torch.Tensor] = {}
        self.references: dict[int, torch.Tensor] = {}
        self.failures: list[dict] = []
        self.timeline: list[dict] = []
        self.completed = 0
        self.wall_s = 0.0
        self.references_s = 0.0
        self.region_started = self.t0 = time.perf_counter()
        self._demand = setup.weight_bytes

    def __call__(self) -> None:
        s = self.setup
        self.t0 = time.perf_counter()
        self._sample("start")
        self.sessions = [self.remote.session() for _ in range(s.sessions)]
        alive = []
        for index, session in enumerate(self.sessions):
            if self._request(index, "prefill", lambda: session.prefill(s.prompt(index))):
                alive.append(index)
                self._demand += s.context_tokens * s.kv_per_token
                self.tokens[index] = torch.empty(1, 0, dtype=torch.long)
            self._sample("prefill")
            if (index + 1) % 10 == 0:
                self.progress(f"{index + 1} sessions prefilled")
        for step in range(s.new_tokens):
            for index in list(alive):
                if self._request(index, "decode", lambda: self._decode(index)):
                    self._demand += s.kv_per_token if step else 0
                else:
                    alive.remove(index)
                self._sample("decode")
            self.progress(f"decode round {step + 1}/{s.new_tokens}")
        self.completed = len(alive)
        self.wall_s = time.perf_counter() - self.t0

    def check_tokens_against_hf(self) -> None:
        """Each session's tokens against HF generate on the client's copy (affordable on a CPU only)."""
        s = self.setup
        self.references = {i: s.host_copy.generate(s.prompt(i), max_new_tokens=s.new_tokens, do_sample=False,
                                                   pad_token_id=0)[:, s.context_tokens:] for i in self.tokens}

    def solo_references(self) -> None:
        """Each prompt decoded alone on the same server once every session is closed: nothing paged."""
        s = self.setup
        started = time.perf_counter()
        for index in self.tokens:
            with self.remote.session() as solo:
                solo.prefill(s.prompt(index))
                self.references[index] = solo.generate(max_new_tokens=s.new_tokens)
            if (index + 1) % 20 == 0:
                self.progress(f"{index + 1} solo references")
        self.references_s = time.perf_counter() - started

    def _decode(self, index: int) -> None:
        self.tokens[index] = torch.cat([self.tokens[index], self.sessions[index].generate(max_new_tokens=1)], dim=1)

    def _request(self, index: int, op: str, call) -> bool:
        try:
            call()
            return True
        except DjinnError as exc:
            self.failures.append({"session": index, "op": op, "error": f"{type(exc).__name__}: {exc}"})
            return False

    def _sample(self, event: str) -> None:
        memory = self.client.stats()["memory"]
        self.timeline.append({"t_s": time.perf_counter() - self.t0, "event": event, "demand_bytes": self._demand,
                              "device_bytes": memory["weights_bytes"] + memory["kv_bytes"],
                              "host_bytes": memory["kv_host_bytes"],
                              "device_allocated_bytes": memory.get("device_allocated_bytes")})


def test_djinn_holds_more_sessions_than_eager(setup, progress, ledger):
    held = ledger.results(LEDGER)
    missing = [name for name in ("eager", "djinn") if name not in held]
    if missing:
        pytest.skip(f"compares the eager and djinn runs of this session; {' and '.join(missing)} did not run")
    eager, djinn_run = held["eager"], held["djinn"]
    progress(f"djinn: {djinn_run['sessions_completed']}/{setup.sessions} sessions, demand "
             f"{setup.demand_bytes / GIB:.1f} GiB on a {djinn_run['server_budget_bytes'] / GIB:.1f} GiB budget; "
             f"PyTorch eager: " + ("no out-of-memory" if eager["oom_at_session"] is None
                                   else f"out of memory at session {eager['oom_at_session']}"))
    if eager["oom_at_session"] is None:
        pytest.skip(f"PyTorch eager held all {setup.sessions} sessions: the device was not oversubscribed for it")
    assert djinn_run["sessions_completed"] > eager["sessions_completed"]

"""Experiment 3 (seed 004): breakpoints — correctness, steering, and resume latency by depth.

`test_breakpoint_identity` parks the 72-token prompt's forward after every decoder layer on the
server, resumes it with the unmodified activation and checks bit-identical logits and
100% token accuracy against the same server's uninterrupted run; at the middle layer
it scales the activation by 0.9 (steering) and reports how much the output moves.

`test_resume_latency[baseline-S…-L…]`: a breakpoint parks the prefill of an S-token
prompt after decoder layer N, the user scales the activation by 0.9 and, after the
session has sat idle for `--exp3-idle-ms` (20 ms; the same in every baseline), resumes. Three
ways back to the ready state (layers 0..N's KV and the modified activation on the
device, layer N+1 next):
- `recompute`: nothing was kept (stateless): the forward runs again from layer 0 to N
  in this process and the activation is scaled on the device;
- `manual_offload`: user code had copied the activation (scaled) and layers 0..N of the
  KV to pinned host memory; they are copied back in this process;
- `djinn_resume`: the server had paged the parked session's KV to host (`offload`); the
  client sends the scaled activation and the server pages the KV back: IO_WAIT ->
  ready, timed by the server (`io_wait_ms`).
`ready_ms` is that time (the crossover figure's top row). Every baseline then runs
layers N+1.. to the logits: `total_ms` (djinn's includes the wire both ways; the
bottom row). pytest-benchmark times each resume call. `test_crossover` writes
`exp3/<stamp>-resume.json` under --djinn-results, the figure, and judges what this
session's ledger holds (benchmarks.goals.exp3_resume; the latency goals on a GPU).

The server decodes on deterministic kernels (`--deterministic`), as this process does for the
in-process baselines (the session's `deterministic_kernels`): the same configuration on both
sides of every ratio.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import pytest
import torch

import djinn
from djinn import models
from djinn.transport import Codec

from benchmarks import exp3_plan
from benchmarks.exp3_restore import ManualOffload, park
from benchmarks.exp3_figures import plot_resume_crossover
from benchmarks.goals.exp3_resume import Identity, ResumePoint, exp3_resume_criteria
from benchmarks.launcher import ServerSpec
from benchmarks.stats import Spread

pytestmark = pytest.mark.exp3

BASELINES = ("recompute", "manual_offload", "djinn_resume")
STEER_SCALE = 0.9  # the seed's steering: the middle layer's activation times 0.9
IDENTITY_NEW_TOKENS = 8
PROMPT_SEED = 4
REMOTE_TIMEOUT_S = 1800.0  # uploading a 13B model through loopback takes a while
LEDGER = "exp3_resume"


def pytest_generate_tests(metafunc):
    if "breakpoint_layer" in metafunc.fixturenames:
        metafunc.parametrize("baseline", BASELINES)
        metafunc.parametrize("seq_len", exp3_plan.seq_lens(metafunc.config), ids=lambda s: f"S{s}")
        metafunc.parametrize("breakpoint_layer", exp3_plan.layers(metafunc.config), ids=lambda n: f"L{n}")


def run_order(items: list) -> list:
    """The baselines of each (prompt length, layer) point back to back, so each ratio compares
    measurements taken seconds apart, not minutes: the host's speed drifts between blocks."""
    def rank(item) -> tuple:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if "baseline" not in params:
            return (2,) if item.name == "test_crossover" else (0,)
        return 1, params["seq_len"], params["breakpoint_layer"], BASELINES.index(params["baseline"])
    return sorted(items, key=rank)


# -- setup --------------------------------------------------------------------------------------
@dataclass
class Exp3Setup:
    name: str
    device: str
    local: torch.nn.Module  # on the device: the in-process baselines
    remote: djinn.RemoteModel  # the same weights on the server, full_djinn
    rounds: int
    idle_s: float  # a parked session's idle time before its timed restore (exp3_plan.IDLE_AT_BREAKPOINT_MS)

    @property
    def num_layers(self) -> int:
        return self.local.config.num_hidden_layers

    def prompt(self, tokens: int) -> torch.Tensor:
        vocab = self.local.config.vocab_size
        return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(PROMPT_SEED))

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def idle_at_breakpoint(self) -> None:
        """The parked session's idle time before its timed restore, the same in every baseline."""
        self.sync()
        time.sleep(self.idle_s)


@pytest.fixture(scope="module")
def exp3(pytestconfig, bench_device, server_launcher):
    name = exp3_plan.model_name(pytestconfig)
    local = models.build(name, seed=0, device=bench_device)
    host_copy = local if bench_device == "cpu" else models.to_host(local)
    server = server_launcher.start("exp3-resume", ServerSpec(bench_device))
    with djinn.connect(server.host_port, timeout_s=REMOTE_TIMEOUT_S) as client:
        remote = client.load(host_copy, mode="full_djinn", logits_codec=Codec.RAW)
        yield Exp3Setup(name, bench_device, local, remote, exp3_plan.rounds(pytestconfig),
                        exp3_plan.idle_s(pytestconfig))


# -- correctness ----------------------------------------------------------------------------------
def test_breakpoint_identity(exp3, prompt_ids, progress, ledger):
    """Resume with the unmodified activation at every layer: bit-identical logits, identical tokens."""
    ids = prompt_ids
    reference = exp3.remote.generate(ids, max_new_tokens=IDENTITY_NEW_TOKENS, return_logits=True)
    ref_logits = exp3.remote.last_logits[:, 0]
    mismatched, token_matches = [], 0
    for layer in range(exp3.num_layers):
        with exp3.remote.session() as s:
            logits = s.resume(s.run_to_layer(ids, layer))
            tokens = s.generate(IDENTITY_NEW_TOKENS)
        if not torch.equal(logits, ref_logits):
            mismatched.append(layer)
        token_matches += int((tokens == reference[:, ids.shape[1]:]).sum())
    middle = exp3.num_layers // 2
    with exp3.remote.session() as s:
        steered = s.resume(s.run_to_layer(ids, middle) * STEER_SCALE)
        steered_tokens = s.generate(IDENTITY_NEW_TOKENS)
    change = float((steered.float() - ref_logits.float()).norm() / ref_logits.float().norm())
    identity = {
        "layers_checked": exp3.num_layers, "layers_bit_identical": exp3.num_layers - len(mismatched),
        "layers_mismatched": mismatched,
        "token_accuracy": token_matches / (exp3.num_layers * IDENTITY_NEW_TOKENS),
        "steering": {"layer": middle, "scale": STEER_SCALE, "relative_logit_change": change,
                     "top1_changed": bool(steered.argmax(-1) != ref_logits.argmax(-1)),
                     "token_agreement": float((steered_tokens == reference[:, ids.shape[1]:]).float().mean())},
    }
    ledger.record(LEDGER, "identity", (identity, Identity(exp3.num_layers, tuple(mismatched),
                                                          identity["token_accuracy"], change)))
    progress(f"bit-identical at {exp3.num_layers - len(mismatched)}/{exp3.num_layers} layers; steering at layer "
             f"{middle} x{STEER_SCALE} moved the logits by {change:.2%}")
    assert not mismatched, f"resumed logits differ from the uninterrupted run at layers {mismatched}"
    assert identity["token_accuracy"] == 1.0
    assert change > 0, "steering must change the output"


# -- resume latency ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resume:
    ready_ms: float  # IO_WAIT -> ready: the KV and the modified activation on the device
    total_ms: float  # resume -> logits
    restored_bytes: int  # host -> device bytes of the restore (0 for recompute)


def _recompute(exp3: Exp3Setup, ids: torch.Tensor, layer: int) -> Resume:
    started = time.perf_counter()
    parked, _cache = park(exp3.local, ids, layer)
    steered = parked.activation * STEER_SCALE
    exp3.sync()
    ready = time.perf_counter()
    parked.resume(steered)
    exp3.sync()
    return Resume((ready - started) * 1e3, (time.perf_counter() - started) * 1e3, 0)


def _manual_offload_setup(exp3: Exp3Setup, ids: torch.Tensor, layer: int):
    """User code at the breakpoint: activation (scaled) and KV of layers 0..N to (pinned) host memory."""
    offloaded = ManualOffload.of(*park(exp3.local, ids, layer), STEER_SCALE)
    exp3.idle_at_breakpoint()
    return (offloaded,), {}


def _manual_offload(exp3: Exp3Setup, offloaded: ManualOffload) -> Resume:
    started = time.perf_counter()
    activation = offloaded.restore(exp3.device)
    exp3.sync()
    ready = time.perf_counter()
    offloaded.parked.resume(activation)
    exp3.sync()
    return Resume((ready - started) * 1e3, (time.perf_counter() - started) * 1e3, offloaded.nbytes)


def _djinn_setup(exp3: Exp3Setup, ids: torch.Tensor, layer: int, open_sessions: list):
    while open_sessions:
        open_sessions.pop().close()
    s = exp3.remote.session()
    open_sessions.append(s)
    steered = s.run_to_layer(ids, layer) * STEER_SCALE
    paged = s.offload()  # idle at the breakpoint: its KV goes to host, as memory pressure would send it
    exp3.idle_at_breakpoint()  # the server idles this long and the request's round trip more
    return (s, steered, paged), {}


def _djinn_resume(s, steered: torch.Tensor, paged: int) -> Resume:
    started = time.perf_counter()
    s.resume(steered)
    total = (time.perf_counter() - started) * 1e3
    return Resume(s.last_reply["io_wait_ms"], total, paged + steered.nbytes)


def test_resume_latency(exp3, baseline, seq_len, breakpoint_layer, benchmark, progress, ledger):
    if breakpoint_layer >= exp3.num_layers:
        pytest.skip(f"layer {breakpoint_layer} is past the {exp3.num_layers} layers of {exp3.name}")
    benchmark.group = f"exp3-resume-{exp3.name}-S{seq_len}"
    ids = exp3.prompt(seq_len).to(exp3.device if baseline != "djinn_resume" else "cpu")
    measured: list[Resume] = []
    open_sessions: list = []

    if baseline == "recompute":
        target = lambda: measured.append(_recompute(exp3, ids, breakpoint_layer))  # noqa: E731
        setup = exp3.idle_at_breakpoint  # stateless: nothing kept at the breakpoint
    elif baseline == "manual_offload":
        target = lambda *args: measured.append(_manual_offload(exp3, *args))  # noqa: E731
        setup = lambda: _manual_offload_setup(exp3, ids, breakpoint_layer)  # noqa: E731
    else:
        target = lambda *args: measured.append(_djinn_resume(*args))  # noqa: E731
        setup = lambda: _djinn_setup(exp3, ids, breakpoint_layer, open_sessions)  # noqa: E731
    try:
        benchmark.pedantic(target, setup=setup, rounds=exp3.rounds, warmup_rounds=1, iterations=1)
    finally:
        for s in open_sessions:
            s.close()
        gc.collect()
    measured = measured[-exp3.rounds:]  # warm-up rounds append too
    ready, total = Spread.of([r.ready_ms for r in measured]), Spread.of([r.total_ms for r in measured])
    point = {"baseline": baseline, "seq_len": seq_len, "layer": breakpoint_layer, "rounds": len(measured),
             "idle_ms": exp3.idle_s * 1e3,
             "ready_ms": ready.median, "ready_ms_q1": ready.q1, "ready_ms_q3": ready.q3,
             "total_ms": total.median, "total_ms_q1": total.q1, "total_ms_q3": total.q3,
             "ready_ms_runs": [r.ready_ms for r in measured], "total_ms_runs": [r.total_ms for r in measured],
             "restored_bytes": measured[-1].restored_bytes}
    if point["restored_bytes"]:
        point["restore_gbps"] = point["restored_bytes"] / point["ready_ms"] / 1e6
    ledger.record(LEDGER, (seq_len, breakpoint_layer, baseline),
                  (point, ResumePoint(baseline, seq_len, breakpoint_layer, tuple(point["ready_ms_runs"]))))
    benchmark.extra_info.update({"model": exp3.name, **{k: v for k, v in point.items() if not k.endswith("_runs")}})
    progress(f"ready {point['ready_ms']:.2f} ms, to logits {point['total_ms']:.2f} ms")


def test_crossover(exp3, results_writer, progress, ledger):
    held = ledger.results(LEDGER)
    identity = held.pop("identity", None)
    if not held and identity is None:
        pytest.skip("nothing of exp3's resume was measured in this session")
    points = [point for point, _ in held.values()]
    data = {"experiment": "exp3_resume", "model": exp3.name,
            "model_shape": {"layers": exp3.num_layers, "hidden": exp3.local.config.hidden_size,
                            "dtype": str(next(exp3.local.parameters()).dtype).removeprefix("torch.")},
            "steer_scale": STEER_SCALE, "rounds": exp3.rounds, "idle_at_breakpoint_ms": exp3.idle_s * 1e3,
            "identity": identity[0] if identity else None, "points": points,
            "definitions": {"ready_ms": "IO_WAIT -> ready: layers 0..N's KV and the scaled activation on the device "
                                        "(recompute: layers 0..N run again; djinn_resume: the server's io_wait_ms)",
                            "idle_at_breakpoint_ms": "how long each parked session sat idle before its timed "
                                                     "restore, in every baseline (djinn_resume's server: this "
                                                     "and the request's round trip)",
                            "total_ms": "resume -> the logits of the last position (djinn_resume: the client's "
                                        "wall time of the resume request, wire included)"}}
    data["ratios"] = _ratios(points)
    verdict = exp3_resume_criteria(identity[1] if identity else None, [p for _, p in held.values()],
                                   exp3.device.startswith("cuda"))
    data["verdict"] = verdict.as_dict()
    data["environment"] = results_writer.environment()  # the figure names the device
    path = results_writer.write(f"exp3/{results_writer.stamp}-resume.json", data)
    figure = plot_resume_crossover(data, path.with_suffix(".png")) if points else None
    progress(f"wrote {path}" + (f" and {figure}" if figure else ""))
    assert verdict.passed, "\n" + verdict.summary()


def _ratios(points: list[dict]) -> list[dict]:
    """djinn_resume's ready time over the other baselines', per prompt length and layer."""
    ready = {(p["seq_len"], p["layer"], p["baseline"]): p["ready_ms"] for p in points}
    ratios = []
    for seq_len, layer in sorted({(p["seq_len"], p["layer"]) for p in points}):
        values = {b: ready.get((seq_len, layer, b)) for b in BASELINES}
        if None not in values.values():
            ratios.append({"seq_len": seq_len, "layer": layer,
                           "djinn_vs_manual": values["djinn_resume"] / values["manual_offload"],
                           "djinn_vs_recompute": values["djinn_resume"] / values["recompute"]})
    return ratios

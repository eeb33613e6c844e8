"""Experiment 2.1 (seed 000): LLM decode with a KV cache, four baselines side by side.

Each baseline generates 50 tokens from the 72-token prompt, `--runs` measured runs
after `--warmup-runs` discarded ones. pytest-benchmark times each run; extra_info
holds per-token latency, bytes per token, GPU utilisation, the queue / compute /
transfer split and energy. `test_success_criteria` then checks the seed's claims
as ratios between baselines measured in this same run.

Every baseline decodes on deterministic kernels (the `deterministic_kernels` fixture,
the servers' `--deterministic`): on a GPU the default fused attention kernels give
different logits from run to run, so neither the runs nor the modes would compare.
"""
from __future__ import annotations

import statistics
from dataclasses import astuple, dataclass

import pytest
import torch

from djinn.client import GenerationStats

from benchmarks.plans import run_plan
from benchmarks.results import RunRecord

BASELINES = ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn")
# full_djinn on a server with --decode-graphs: the dedicated-runtime decode step (static
# KV cache, CUDA graph). Its logits differ from eager in the last bits, and on seeded random
# weights, whose top logits are often near ties, that flips tokens (on the H100 at the 5th
# new token of 50): its agreement with native_pytorch is reported, not required.
GRAPH_BASELINE = "full_djinn_graphs"
ALL_BASELINES = (*BASELINES, GRAPH_BASELINE)
NEW_TOKENS = 50
BATCH_SIZES = (1,)

# The seed's success criteria, as ratios within one run.
MAX_BYTES_RATIO_FULL_VS_BLIND = 1 / 1000
MIN_LATENCY_RATIO_BLIND_VS_FULL = 30.0
MAX_LATENCY_FACTOR_FULL_VS_NATIVE = 1.25  # full_djinn adds one loopback round trip per token to the same forward
MAX_LATENCY_FACTOR_GRAPHS_VS_NATIVE = 1.0  # issue 3's goal for the dedicated runtime, on a GPU
GPU_SCALE_BYTES = 1 << 30  # the 30x latency claim is about a multi-GB model, where shipping weights dominates

pytestmark = [pytest.mark.exp2, pytest.mark.exp2_1, pytest.mark.usefixtures("deterministic_kernels")]


@dataclass(frozen=True)
class BaselineResult:
    tokens: torch.Tensor
    stats: tuple[GenerationStats, ...]
    sm_util_pct: float | None

    @property
    def per_token_ms(self) -> float:
        return statistics.median(s.per_token_ms for s in self.stats)

    @property
    def wire_bytes_per_token(self) -> float:
        return statistics.fmean(s.decode_bytes_sent_per_token + s.decode_bytes_received_per_token for s in self.stats)


RESULTS: dict[tuple[str, int], BaselineResult] = {}


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("baseline", ALL_BASELINES)
def test_decode(baseline, batch_size, benchmark, bench_model, prompt_ids, results_writer, progress, pytestconfig,
                request):
    benchmark.group = f"exp2_1-decode-{bench_model.name}-bs{batch_size}"
    graphs = baseline == GRAPH_BASELINE
    client = request.getfixturevalue("djinn_graph_client" if graphs else "djinn_client")
    collectors = request.getfixturevalue("graph_collectors" if graphs else "collectors")
    remote = bench_model.load("full_djinn" if graphs else baseline, client)
    ids = prompt_ids.repeat(batch_size, 1)
    new_tokens, runs, warmup = astuple(run_plan(
        baseline, bench_model.weight_bytes, pytestconfig, new_tokens=NEW_TOKENS,
        runs=pytestconfig.getoption("--runs"), warmup=pytestconfig.getoption("--warmup-runs")))
    outputs: list[tuple[torch.Tensor, GenerationStats]] = []

    def run_once():
        outputs.append((remote.generate(ids, max_new_tokens=new_tokens), remote.last_stats))
        if len(outputs) % 5 == 0:
            progress(f"{len(outputs)} runs, last {remote.last_stats.per_token_ms:.2f} ms/token")

    for _ in range(warmup):
        run_once()
    outputs.clear()
    with collectors.region(watch_wire=baseline != "native_pytorch") as telemetry:
        benchmark.pedantic(run_once, rounds=runs, warmup_rounds=0, iterations=1)

    stats = [s for _, s in outputs]
    assert all(torch.equal(t, outputs[0][0]) for t, _ in outputs), "greedy decoding must be deterministic"
    tokens_total = sum(s.new_tokens * s.batch for s in stats)
    energy = telemetry.energy_j
    info = {
        "baseline": baseline, "model": bench_model.name, "batch_size": batch_size, "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens, "runs": runs, "warmup_runs": warmup,
        "per_token_ms": statistics.median(s.per_token_ms for s in stats),
        "total_ms": statistics.median(s.total_ms for s in stats),
        "bytes_per_token_sent": statistics.fmean(s.decode_bytes_sent_per_token for s in stats),
        "bytes_per_token_received": statistics.fmean(s.decode_bytes_received_per_token for s in stats),
        "payload_bytes_per_token_sent": statistics.fmean(s.decode_payload_sent_per_token for s in stats),
        "payload_bytes_per_token_received": statistics.fmean(s.decode_payload_received_per_token for s in stats),
        "queue_ms": statistics.fmean(s.queue_ms for s in stats),
        "compute_ms": statistics.fmean(s.compute_ms for s in stats),
        "transfer_ms": statistics.fmean(s.transfer_ms for s in stats),
        "energy_per_token_j": energy / tokens_total if energy is not None else None,
        **telemetry.as_extra_info(),
    }
    if telemetry.wire is not None:
        info["wire_capture_bytes_per_run"] = telemetry.wire.wire_bytes / runs
    benchmark.extra_info.update(info)
    progress(f"median {info['per_token_ms']:.2f} ms/token, "
             f"{info['bytes_per_token_sent'] + info['bytes_per_token_received']:.0f} B/token on the wire")

    results_writer.baseline_runs(
        baseline, model_id=bench_model.name, model_shape=bench_model.shape, prompt_tokens=ids.shape[1],
        new_tokens=new_tokens, batch_size=batch_size,
        runs=[RunRecord(run_id=i + 1, total_ms=s.total_ms, per_token_ms=s.per_token_ms, tokens_generated=s.new_tokens,
                        gpu_util_pct=telemetry.sm_util_pct, memory_bw_util_pct=telemetry.membw_util_pct,
                        host_to_device_mb=s.bytes_sent / 1e6, device_to_host_mb=s.bytes_received / 1e6,
                        queue_ms=s.queue_ms, compute_ms=s.compute_ms, transfer_ms=s.transfer_ms)
              for i, s in enumerate(stats)],
        # The tokens themselves: identity across baselines stays checkable between separate runs.
        extra={"telemetry": telemetry.as_extra_info(), "tokens": outputs[0][0].tolist()})
    RESULTS[(baseline, batch_size)] = BaselineResult(outputs[0][0], tuple(stats), telemetry.sm_util_pct)


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"bs{b}")
def test_success_criteria(batch_size, bench_model, results_writer):
    missing = [b for b in BASELINES if (b, batch_size) not in RESULTS]
    if missing:
        pytest.skip(f"the criteria compare baselines of one run; not measured in this run: {', '.join(missing)}")
    # The graph baseline is the optional dedicated-runtime check: judged when it ran.
    r = {b: RESULTS[(b, batch_size)] for b in ALL_BASELINES if (b, batch_size) in RESULTS}
    graphs = r.get(GRAPH_BASELINE)
    native, blind, full = r["native_pytorch"], r["semantic_blind"], r["full_djinn"]
    prompt = native.tokens.shape[1] - native.stats[0].new_tokens
    ratios = {
        "full_vs_blind_bytes_per_token": full.wire_bytes_per_token / blind.wire_bytes_per_token,
        "blind_vs_full_latency": blind.per_token_ms / full.per_token_ms,
        "full_vs_native_latency": full.per_token_ms / native.per_token_ms,
        "partially_aware_vs_full_latency": r["partially_aware"].per_token_ms / full.per_token_ms,
    }
    if graphs is not None:
        ratios["full_graphs_vs_native_latency"] = graphs.per_token_ms / native.per_token_ms
    results_writer.write(f"exp2_1/{results_writer.stamp}-bs{batch_size}.json", {
        "experiment": "exp2_1", "model": bench_model.name, "model_shape": bench_model.shape, "ratios": ratios,
        "per_token_ms": {b: x.per_token_ms for b, x in r.items()},
        "wire_bytes_per_token": {b: x.wire_bytes_per_token for b, x in r.items()},
        "gpu_sm_util_pct": {b: x.sm_util_pct for b, x in r.items()},
        "graphs_new_tokens_agreeing_with_native": None if graphs is None else _agreeing_prefix(
            graphs.tokens[:, prompt:], native.tokens[:, prompt:]),
        "criteria": {"max_bytes_ratio_full_vs_blind": MAX_BYTES_RATIO_FULL_VS_BLIND,
                     "min_latency_ratio_blind_vs_full": MIN_LATENCY_RATIO_BLIND_VS_FULL,
                     "max_latency_factor_full_vs_native": MAX_LATENCY_FACTOR_FULL_VS_NATIVE,
                     "max_latency_factor_graphs_vs_native_gpu": MAX_LATENCY_FACTOR_GRAPHS_VS_NATIVE}})

    failures = [f"{b} tokens differ from native_pytorch" for b in list(r)[1:]
                if b != GRAPH_BASELINE and not torch.equal(r[b].tokens, native.tokens[:, :r[b].tokens.shape[1]])]
    if ratios["full_vs_blind_bytes_per_token"] > MAX_BYTES_RATIO_FULL_VS_BLIND:
        failures.append(f"full_djinn/semantic_blind bytes per token {ratios['full_vs_blind_bytes_per_token']:.2e}")
    if ratios["full_vs_native_latency"] > MAX_LATENCY_FACTOR_FULL_VS_NATIVE:
        failures.append(f"full_djinn/native latency {ratios['full_vs_native_latency']:.2f}x")
    if graphs is not None and str(results_writer.device).startswith("cuda") \
            and ratios["full_graphs_vs_native_latency"] > MAX_LATENCY_FACTOR_GRAPHS_VS_NATIVE:
        failures.append(f"full_djinn_graphs/native latency {ratios['full_graphs_vs_native_latency']:.2f}x")
    gpu_scale = bench_model.weight_bytes >= GPU_SCALE_BYTES
    if gpu_scale and ratios["blind_vs_full_latency"] < MIN_LATENCY_RATIO_BLIND_VS_FULL:
        failures.append(f"semantic_blind/full_djinn latency {ratios['blind_vs_full_latency']:.1f}x")
    assert not failures, f"{failures}; ratios {ratios}"
    if not gpu_scale:
        pytest.skip(f"blind/full latency ratio measured {ratios['blind_vs_full_latency']:.1f}x; the seed's "
                    f"{MIN_LATENCY_RATIO_BLIND_VS_FULL:.0f}x claim is for multi-GB models, where shipping the weights "
                    f"dominates ({bench_model.name} holds {bench_model.weight_bytes / 1e6:.0f} MB)")


def _agreeing_prefix(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """How many leading columns of `tokens` equal `reference`'s in every row."""
    differs = (tokens != reference[:, :tokens.shape[1]]).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else tokens.shape[1]

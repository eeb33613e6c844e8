"""Experiment 3, interventions (issue 18): the nnbench tasks, Djinn's declarative interventions
against the same edits made by local HF forward hooks on the same device.

Tasks (ndif-team/nnbench's methodologies, on the llama-2-13b shape on a GPU, tiny-llama on a CPU):
- `logit_lens`: the final norm and unembedding of every decoder layer's output at the last
  position, one forward (a `save(..., lens=True)` per layer, logits="none");
- `steer_two_layers`: a steering vector added at two layers, one forward, the last logits;
- `steer_every_step`: a vector added at one layer at every decode step of a 50-token greedy
  generation: one `trace_generate` request, the tokens;
- `activation_patching`: the clean prompt's output of the middle layer replaced into the
  corrupted prompt's run (a one-token change), the last logits: two requests (save, replace).

`test_task[<task>]` runs rounds of the local hooks (in this process, on the device, plain hooks
from benchmarks/local_hooks.py) and of Djinn back to back, with an empty request's round trip
in each round; pytest-benchmark times Djinn's runs. Each task checks its result equal to the
local hooks' (bit for bit: both sides on deterministic kernels) and counts the payload on the
wire against what it sent and asked for. `test_interventions_verdict` writes
`exp3/<stamp>-interventions.json` under --djinn-results and judges the ledger
(benchmarks.goals.exp3_interventions: within 1.2x local + one round trip per request on a GPU).

The server loads the model itself (`--model NAME`, the catalogue's seeded weights, bit for bit
the ones built here): no weights cross the wire.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import djinn
from djinn import interventions as iv
from djinn import kv, models
from djinn.decoding import forward_logits
from djinn.transport import Codec

from benchmarks import exp3_plan
from benchmarks.goals.exp3_interventions import TASKS, TaskResult, interventions_criteria
from benchmarks.launcher import ServerSpec
from benchmarks.local_hooks import edit_of, greedy_generate, hooked, lens, recorder
from benchmarks.stats import Spread

pytestmark = pytest.mark.exp3

LEDGER = "exp3_interventions"
NEW_TOKENS = 50  # the issue: steering every decode step of 50 tokens
WARMUP_ROUNDS = 2
VECTOR_SEED = 18
STEER_SCALE = 4.0  # the steering vector's norm over sqrt(hidden): it moves the output, as nnbench's alpha does
REMOTE_TIMEOUT_S = 600.0


@dataclass
class Setup:
    name: str
    device: str
    local: torch.nn.Module  # on the device: the local hooks' model
    remote: djinn.RemoteModel  # the server's own copy, attached by name
    client: djinn.Client
    prompt: torch.Tensor  # [1, tokens], on the CPU
    corrupted: torch.Tensor  # the prompt with one token changed (activation patching's minimal pair)
    vector: torch.Tensor  # [hidden] in the model's dtype, on the CPU
    rounds: int

    @property
    def num_layers(self) -> int:
        return self.local.config.num_hidden_layers

    @property
    def steer_layers(self) -> tuple[int, int]:
        return self.num_layers // 3, 2 * self.num_layers // 3

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)


@pytest.fixture(scope="module")
def setup(pytestconfig, bench_device, server_launcher, prompt_ids):
    name = exp3_plan.model_name(pytestconfig)
    local = models.build(name, seed=0, device=bench_device)
    server = server_launcher.start("exp3-interventions", ServerSpec(bench_device, extra=("--model", name)))
    hidden = local.config.hidden_size
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(VECTOR_SEED)) * STEER_SCALE / hidden ** 0.5
    prompt = prompt_ids[:, :min(prompt_ids.shape[1], models.max_positions(local.config))]
    corrupted = prompt.clone()
    corrupted[0, prompt.shape[1] // 2] = (corrupted[0, prompt.shape[1] // 2] + 1) % local.config.vocab_size
    with djinn.connect(server.host_port, timeout_s=REMOTE_TIMEOUT_S) as client:
        remote = client.load(name, mode="full_djinn", logits_codec=Codec.RAW)
        assert remote.model.device.type == "meta", "the server should have attached its own copy: no upload"
        yield Setup(name, bench_device, local, remote, client, prompt, corrupted,
                    vector.to(next(local.parameters()).dtype), exp3_plan.rounds(pytestconfig))


# -- the tasks: (local hooks, Djinn), each returning its outputs on the CPU ------------------------------
@dataclass(frozen=True)
class Task:
    local: Callable[[Setup], dict[str, torch.Tensor]]
    djinn: Callable[[Setup, "djinn.RemoteSession | None"], dict[str, torch.Tensor]]
    sent: Callable[[Setup], int]  # payload bytes Djinn sends: the ids and the interventions' tensors
    session: bool = False  # runs in a session, opened before its round and closed after (untimed)


def _cpu(values: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in values.items()}


def _logit_lens_local(s: Setup) -> dict:
    seen = {i: [] for i in range(s.num_layers)}
    last = slice(-1, None)  # the last position, as a view: no index tensor copied to the device at each layer
    with hooked(s.local, [("layer", i, recorder(seen[i], last)) for i in range(s.num_layers)]):
        forward_logits(s.local, s.on_device(s.prompt), kv.from_pairs([]))
    return _cpu({f"lens.layer.{i}": lens(s.local, seen[i][0]) for i in range(s.num_layers)})


def _logit_lens_djinn(s: Setup, _session) -> dict:
    given = [iv.save("layer", i, positions=[-1], lens=True) for i in range(s.num_layers)]
    return s.remote.trace(s.prompt, given, logits="none").saved


def _steer_two_local(s: Setup) -> dict:
    vector = s.on_device(s.vector)
    with hooked(s.local, [("layer", layer, edit_of("add", vector)) for layer in s.steer_layers]):
        logits = forward_logits(s.local, s.on_device(s.prompt), kv.from_pairs([]))[:, -1]
    return _cpu({"logits": logits})


def _steer_two_djinn(s: Setup, _session) -> dict:
    return {"logits": s.remote.trace(s.prompt, [iv.add("layer", layer, s.vector) for layer in s.steer_layers]).logits}


def _steer_every_step_local(s: Setup) -> dict:
    vector = s.on_device(s.vector)
    tokens, _, _ = greedy_generate(s.local, s.on_device(s.prompt), NEW_TOKENS,
                                   lambda step: [("layer", s.steer_layers[0], edit_of("add", vector))])
    return _cpu({"tokens": tokens})


def _steer_every_step_djinn(s: Setup, session) -> dict:
    return {"tokens": session.trace_generate(s.prompt, NEW_TOKENS, [iv.add("layer", s.steer_layers[0],
                                                                           s.vector)]).tokens}


def _patching_local(s: Setup) -> dict:
    layer, clean = s.num_layers // 2, []
    with hooked(s.local, [("layer", layer, recorder(clean))]):
        forward_logits(s.local, s.on_device(s.prompt), kv.from_pairs([]))
    with hooked(s.local, [("layer", layer, edit_of("replace", clean[0]))]):
        logits = forward_logits(s.local, s.on_device(s.corrupted), kv.from_pairs([]))[:, -1]
    return _cpu({"logits": logits})


def _patching_djinn(s: Setup, _session) -> dict:
    layer = s.num_layers // 2
    clean = s.remote.trace(s.prompt, [iv.save("layer", layer)], logits="none").saved[f"layer.{layer}"]
    return {"logits": s.remote.trace(s.corrupted, [iv.replace("layer", layer, clean)]).logits, "patched": clean}


def _hidden_bytes(s: Setup) -> int:
    return s.prompt.shape[1] * s.local.config.hidden_size * s.vector.element_size()


TASK_DEFINITIONS = {
    "logit_lens": Task(_logit_lens_local, _logit_lens_djinn, lambda s: s.prompt.nbytes),
    "steer_two_layers": Task(_steer_two_local, _steer_two_djinn, lambda s: s.prompt.nbytes + 2 * s.vector.nbytes),
    "steer_every_step": Task(_steer_every_step_local, _steer_every_step_djinn,
                             lambda s: s.prompt.nbytes + s.vector.nbytes, session=True),
    # Two forwards' ids; the clean activation comes back from the first and goes out with the second.
    "activation_patching": Task(_patching_local, _patching_djinn, lambda s: 2 * s.prompt.nbytes + _hidden_bytes(s)),
}
assert tuple(TASK_DEFINITIONS) == TASKS


def _outputs_equal(local: dict, djinn_out: dict) -> bool:
    return all(key in djinn_out and torch.equal(djinn_out[key], value) for key, value in local.items())


@pytest.mark.parametrize("task", TASKS)
def test_task(setup, task, benchmark, progress, ledger):
    definition = TASK_DEFINITIONS[task]
    benchmark.group = f"exp3-interventions-{setup.name}"
    local_ms, rtt_ms, djinn_ms = [], [], []
    outputs: dict = {}
    sessions: list = []  # the round's session, for a task that runs in one

    def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
        started = time.perf_counter()
        out = fn()
        setup.sync()
        return (time.perf_counter() - started) * 1e3, out

    def local_round():
        while sessions:
            sessions.pop().close()
        if definition.session:
            sessions.append(setup.remote.session())
        elapsed, outputs["local"] = timed(lambda: definition.local(setup))
        local_ms.append(elapsed)
        started = time.perf_counter()
        setup.client.hello()  # an empty request's round trip, in the same round
        rtt_ms.append((time.perf_counter() - started) * 1e3)

    def djinn_round():
        before = setup.client.counters.snapshot()
        elapsed, outputs["djinn"] = timed(lambda: definition.djinn(setup, sessions[0] if sessions else None))
        outputs["wire"] = setup.client.counters.since(before)
        djinn_ms.append(elapsed)

    try:
        for _ in range(WARMUP_ROUNDS):
            local_round()
            djinn_round()
        for samples in (local_ms, rtt_ms, djinn_ms):
            samples.clear()
        benchmark.pedantic(djinn_round, setup=local_round, rounds=setup.rounds, warmup_rounds=0, iterations=1)
    finally:
        for session in sessions:
            session.close()

    local_out, djinn_out, wire = outputs["local"], outputs["djinn"], outputs["wire"]
    equal = _outputs_equal(local_out, djinn_out)
    received = sum(t.nbytes for t in djinn_out.values())
    expected = definition.sent(setup) + received
    requests = wire.messages_sent  # of the last round: the task's requests and nothing else
    result = TaskResult(task, requests, tuple(djinn_ms), tuple(local_ms), tuple(rtt_ms), equal,
                        wire.sent_payload + wire.received_payload, expected,
                        wire.sent_framing + wire.received_framing)
    djinn_spread, local_spread, rtt_spread = Spread.of(djinn_ms), Spread.of(local_ms), Spread.of(rtt_ms)
    record = {"task": task, "requests": requests, "equal_to_local_hooks": equal,
              "payload_bytes": result.payload_bytes, "expected_payload_bytes": expected,
              "framing_bytes": result.framing_bytes,
              **djinn_spread.as_dict("djinn", "ms"), **local_spread.as_dict("local_hooks", "ms"),
              **rtt_spread.as_dict("round_trip", "ms"),
              "djinn_ms_runs": djinn_ms, "local_hooks_ms_runs": local_ms, "round_trip_ms_runs": rtt_ms}
    ledger.record(LEDGER, task, (record, result))
    benchmark.extra_info.update({"model": setup.name, **{k: v for k, v in record.items() if not k.endswith("_runs")}})
    progress(f"{task}: djinn {djinn_spread.median:.2f} ms, local hooks {local_spread.median:.2f} ms, round trip "
             f"{rtt_spread.median:.3f} ms; equal: {equal}; payload {result.payload_bytes} B (asked {expected} B)")
    assert equal, f"{task}: Djinn's result differs from the local hooks' ({sorted(local_out)})"


def test_interventions_verdict(setup, results_writer, progress, ledger):
    held = ledger.results(LEDGER)
    if not held:
        pytest.skip("no intervention task was measured in this session")
    on_gpu = setup.device.startswith("cuda")
    verdict = interventions_criteria([result for _, result in held.values()], on_gpu)
    cfg = setup.local.config
    data = {"experiment": "exp3_interventions", "model": setup.name,
            "model_shape": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                            "dtype": str(next(setup.local.parameters()).dtype).removeprefix("torch.")},
            "prompt_tokens": setup.prompt.shape[1], "new_tokens": NEW_TOKENS, "steer_layers": setup.steer_layers,
            "rounds": setup.rounds, "tasks": [record for record, _ in held.values()],
            "anchor_nnbench_a100_qwen2.5_1.5b_ms": {"logit_lens": 73, "steer_two_layers": 42, "steer_every_step": 344},
            "verdict": verdict.as_dict(), "environment": results_writer.environment()}
    path = results_writer.write(f"exp3/{results_writer.stamp}-interventions.json", data)
    progress(f"wrote {path}\n{verdict.summary()}")
    assert verdict.passed, "\n" + verdict.summary()

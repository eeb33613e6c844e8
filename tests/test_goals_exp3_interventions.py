"""The intervention goals are pure functions of what was measured: here on results made up to
sit on each side of each bound."""
from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.goals.exp3_interventions import TASKS, TaskResult, allowance_ms, interventions_criteria
from benchmarks.verdict import Outcome

ROUNDS = 9


def result(task: str = "steer_two_layers", djinn: float = 10.0, local: float = 9.0, rtt: float = 0.2,
           **changes) -> TaskResult:
    base = TaskResult(task, 2 if task == "activation_patching" else 1, (djinn,) * ROUNDS, (local,) * ROUNDS,
                      (rtt,) * ROUNDS, True, 1000, 1000, 120)
    return replace(base, **changes)


def all_tasks(**changes) -> list[TaskResult]:
    return [result(task, **changes) for task in TASKS]


def test_the_allowance_is_1_2x_local_plus_a_round_trip_per_request():
    assert allowance_ms(10.0, 0.5, 2) == pytest.approx(13.0)


def test_within_the_allowance_passes_on_a_gpu():
    verdict = interventions_criteria(all_tasks(), on_gpu=True)
    assert verdict.passed, verdict.summary()
    assert verdict.check("steer_every_step_one_request").outcome is Outcome.PASSED


def test_slower_than_the_allowance_fails_on_a_gpu_and_is_only_reported_on_a_cpu():
    slow = all_tasks(djinn=12.0, local=9.0, rtt=0.2)  # allowance 11.0
    gpu = interventions_criteria(slow, on_gpu=True)
    assert not gpu.passed
    assert gpu.check("logit_lens_vs_local_hooks_plus_round_trips").outcome is Outcome.FAILED
    cpu = interventions_criteria(slow, on_gpu=False)
    assert cpu.passed and cpu.check("logit_lens_vs_local_hooks_plus_round_trips").outcome is Outcome.SKIPPED


def test_round_trips_count_per_request():
    # 12.5 ms against 1.2 x 10 + 2 x 0.3 = 12.6 ms: within for two requests, not for one.
    patching = result("activation_patching", djinn=12.5, local=10.0, rtt=0.3)
    assert interventions_criteria([patching], on_gpu=True).check(
        "activation_patching_vs_local_hooks_plus_round_trips").outcome is Outcome.PASSED
    one = replace(patching, requests=1)
    assert interventions_criteria([one], on_gpu=True).check(
        "activation_patching_vs_local_hooks_plus_round_trips").outcome is Outcome.FAILED


@pytest.mark.parametrize("change, failing", [
    ({"equal": False}, "steer_two_layers_equal_to_local_hooks"),
    ({"payload_bytes": 1001}, "steer_two_layers_payload_bytes"),
])
def test_inequality_and_extra_bytes_fail_on_any_machine(change, failing):
    for on_gpu in (True, False):
        verdict = interventions_criteria([result(**change)], on_gpu)
        assert verdict.check(failing).outcome is Outcome.FAILED


def test_steering_every_step_in_more_than_one_request_fails():
    verdict = interventions_criteria([result("steer_every_step", requests=50)], on_gpu=False)
    assert verdict.check("steer_every_step_one_request").outcome is Outcome.FAILED


def test_a_task_that_did_not_run_is_skipped_not_passed():
    verdict = interventions_criteria([result("logit_lens")], on_gpu=True)
    assert verdict.check("activation_patching_measured").outcome is Outcome.SKIPPED

"""The scale goal as a pure function: N servers >= 0.9 x N x one server's aggregate tokens/s."""
from __future__ import annotations

import pytest

from benchmarks.goals.scale import MIN_EFFICIENCY, ScalePoint, efficiency, scale_criteria
from benchmarks.verdict import Outcome

ROUNDS = 5


def point(servers: int, per_round: float, *, clients_per_server: int = 2, digests=None, sessions=None,
          jitter: float = 0.01) -> ScalePoint:
    clients = clients_per_server * servers
    rounds = tuple(per_round * (1 + jitter * (i - ROUNDS // 2)) for i in range(ROUNDS))
    return ScalePoint(servers, clients, rounds, 30.0,
                      tuple(sessions or [clients_per_server] * servers),
                      tuple(digests or [f"d{i}" for i in range(clients)]))


def test_linear_scaling_is_efficiency_one():
    assert efficiency(point(4, 400.0), point(1, 100.0)).ratio == pytest.approx(1.0)


@pytest.mark.parametrize("servers, aggregate, outcome", [
    (2, 2 * 100.0 * 0.95, Outcome.PASSED),
    (4, 4 * 100.0 * 0.95, Outcome.PASSED),
    (2, 2 * 100.0 * 0.6, Outcome.FAILED),
    (4, 4 * 100.0 * 0.8, Outcome.FAILED),
])
def test_the_bound_on_a_gpu(servers, aggregate, outcome):
    verdict = scale_criteria([point(1, 100.0), point(servers, aggregate)], on_gpu=True)
    assert verdict.check(f"scale_efficiency_N{servers}").outcome is outcome
    assert verdict.passed is (outcome is Outcome.PASSED)


def test_an_interval_straddling_the_bound_is_not_a_failure():
    noisy = point(2, 2 * 100.0 * MIN_EFFICIENCY, jitter=0.2)
    assert scale_criteria([point(1, 100.0, jitter=0.2), noisy], on_gpu=True).passed


def test_on_a_cpu_the_bound_is_reported_not_judged():
    check = scale_criteria([point(1, 100.0), point(2, 100.0)], on_gpu=False).check("scale_efficiency_N2")
    assert check.outcome is Outcome.SKIPPED and "CPU" in check.message


def test_without_the_single_server_run_the_bound_is_skipped():
    assert scale_criteria([point(2, 200.0)], on_gpu=True).check("scale_efficiency_N2").outcome is Outcome.SKIPPED


def test_tokens_that_depend_on_the_pool_size_fail():
    verdict = scale_criteria([point(1, 100.0), point(2, 200.0, digests=["d0", "x", "d2", "d3"])], on_gpu=True)
    check = verdict.check("tokens_same_at_every_pool_size")
    assert check.outcome is Outcome.FAILED and check.measured == [1]


def test_uneven_sessions_fail():
    verdict = scale_criteria([point(1, 100.0), point(2, 200.0, sessions=[4, 0])], on_gpu=True)
    assert verdict.check("sessions_even_N2").outcome is Outcome.FAILED


def test_nothing_ran():
    assert scale_criteria([], on_gpu=True).checks[0].outcome is Outcome.SKIPPED

"""The determinism probe's verdict on synthetic process outputs: the fastest fixed-workspace
configuration that repeated bit for bit within and across processes."""
from __future__ import annotations

from benchmarks.probes.decode_determinism import combine, recommend


def _runs(ms: float, digests: list[str], attention: str = "math") -> dict:
    return {"attention": attention, "ms_per_token_runs": [ms, ms], "digests": digests}


def test_a_configuration_that_repeats_is_recommended_over_a_faster_one_that_does_not():
    results = [
        *combine("default", None, False, [_runs(20.0, ["a", "a", "a"], "auto")], [_runs(20.0, ["a"], "auto")]),
        *combine("ws", ":32768:2", False, [_runs(21.0, ["b", "c", "b"], "auto")], [_runs(21.0, ["b"], "auto")]),
        *combine("det", ":32768:2", True, [_runs(24.0, ["d", "d", "d"])], [_runs(24.0, ["d"])]),
        *combine("det4", ":4096:8", True, [_runs(40.0, ["e", "e", "e"])], [_runs(40.0, ["e"])]),
    ]
    assert [r.repeats_in_process for r in results] == [True, False, True, True]
    best = recommend(results)
    # The default workspace is not deterministic by construction, however it repeated here.
    assert best["setting"] == "det" and best["ms_per_token_median"] == 24.0
    assert best["ms_vs_default_kernels"] == 24.0 / 20.0
    assert best["constant"] == ('DETERMINISTIC = DeterministicKernels(cublas_workspace_config=":32768:2", '
                                'algorithms=True, fused_attention=())')


def test_logits_that_differ_between_processes_disqualify():
    results = combine("det", ":32768:2", True, [_runs(24.0, ["d", "d", "d"], "flash")], [_runs(24.0, ["x"], "flash")])
    assert results[0].same_across_processes is False and recommend(results) is None


def test_a_backend_that_cannot_run_is_recorded_not_recommended():
    results = combine("det", ":4096:8", True, [{"attention": "cudnn", "error": "No available kernel"}], [])
    assert results[0].error == "No available kernel" and recommend(results) is None

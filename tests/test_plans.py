"""How many runs and tokens each baseline gets (benchmarks/plans.py)."""
from types import SimpleNamespace

from benchmarks.plans import (BLIND_TOKENS, LARGE_MODEL_BYTES, LARGE_RUNS, LARGE_WARMUP, SEED_RUNS, SEED_WARMUP,
                              measured_runs, run_plan)


def options(**given):
    values = {"--djinn-runs": None, "--djinn-warmup-runs": None, "--djinn-blind-tokens": None,
              "--djinn-blind-runs": None, **given}
    return SimpleNamespace(getoption=values.__getitem__)


def test_small_models_get_the_seeds_runs():
    assert measured_runs(options(), LARGE_MODEL_BYTES) == (SEED_RUNS, SEED_WARMUP)


def test_large_models_get_fewer_runs():
    assert measured_runs(options(), LARGE_MODEL_BYTES + 1) == (LARGE_RUNS, LARGE_WARMUP)
    assert LARGE_RUNS < SEED_RUNS


def test_given_options_apply_to_every_model():
    assert measured_runs(options(**{"--djinn-runs": 7, "--djinn-warmup-runs": 0}), 10 * LARGE_MODEL_BYTES) == (7, 0)


def test_blind_modes_make_few_tokens_and_others_keep_theirs():
    config = options()
    assert run_plan("full_djinn", 1, config, new_tokens=50, runs=25, warmup=5).new_tokens == 50
    blind = run_plan("semantic_blind", 2 * LARGE_MODEL_BYTES, config, new_tokens=50, runs=25, warmup=5)
    assert blind.new_tokens == BLIND_TOKENS and blind.runs < 25

"""Each experiment's goals as pure functions of its results: `exp2_1_criteria(results) -> Verdict`, ...

They read typed results (what the ledger holds), compute nothing from the machine, and
are unit-tested on synthetic inputs in tests/test_goals_*.py.
"""

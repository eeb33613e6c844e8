"""exp2.1's criteria helpers: how far the graph runtime's tokens agree with native's."""
from __future__ import annotations

import torch

from benchmarks.test_exp2_1_decode import _agreeing_prefix


def test_agreeing_prefix_counts_columns_up_to_the_first_divergence_in_any_row():
    reference = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert _agreeing_prefix(reference.clone(), reference) == 4
    diverged = reference.clone()
    diverged[1, 2] = 9
    assert _agreeing_prefix(diverged, reference) == 2
    assert _agreeing_prefix(reference[:, :3], reference) == 3, "a shorter run agrees over its own length"

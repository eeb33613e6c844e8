"""Teacher-forced equivalence: exact, equivalent within tolerance, or silently wrong."""
from __future__ import annotations

import pytest
import torch

from djinn import models
from djinn.client import load_local
from djinn.equivalence import Equivalence, judge, stepper, teacher_forced_logits


def test_identical_logits_are_exact():
    ref = torch.randn(1, 5, 32)
    assert judge(ref, ref.clone()).verdict is Equivalence.EXACT


def test_last_bit_noise_is_equivalent():
    ref = torch.randn(1, 5, 32)
    noisy = ref + 1e-4 * torch.randn_like(ref)
    result = judge(ref, noisy)
    assert result.verdict is Equivalence.EQUIVALENT and 0 < result.max_abs_diff < 1e-3


def test_a_wrong_step_is_silently_wrong_even_when_the_argmax_agrees():
    ref = torch.randn(1, 5, 32)
    wrong = ref.clone()
    wrong[0, 3] = ref[0, 3] * 0.5  # same argmax at that step, logits off by half
    result = judge(ref, wrong)
    assert result.top1_agreement == 1.0 and result.verdict is Equivalence.SILENTLY_WRONG


def test_flipped_near_ties_beyond_the_allowed_share_are_silently_wrong():
    ref = torch.zeros(1, 10, 4)
    ref[..., 0] = 1.0
    flipped = ref.clone()
    flipped[0, :5, 1] = 1.001  # within tolerance of the logits, but half the steps pick another token
    result = judge(ref, flipped)
    assert result.top1_agreement == 0.5 and result.verdict is Equivalence.SILENTLY_WRONG


def test_shapes_must_match():
    with pytest.raises(ValueError):
        judge(torch.zeros(1, 3, 4), torch.zeros(1, 4, 4))


def test_teacher_forced_logits_feed_the_given_tokens_not_the_greedy_pick(tiny_model, hf_greedy):
    prompt = torch.tensor([[5, 6, 7]])
    forced = torch.tensor([[11, 12, 13]])  # not what greedy decoding would pick
    with torch.no_grad(), stepper(load_local(tiny_model), prompt) as step:
        logits = teacher_forced_logits(step, prompt, forced)
        full = tiny_model(torch.cat([prompt, forced], dim=1)).logits[:, prompt.shape[1] - 1:]
    assert logits.shape == (1, 4, models.CATALOGUE[models.TINY_MODEL].config().vocab_size)
    assert judge(full.float(), logits).verdict is not Equivalence.SILENTLY_WRONG

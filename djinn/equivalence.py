"""Teacher-forced equivalence: is a path that is not bit-exact by design still the same model?

A greedy comparison of two generations cannot tell: seeded random weights give near-tie
logits, one last-bit difference flips a token and every later step then sees another
sequence. Teacher-forced, both sides are fed the reference's tokens, so each step's logits
answer for that step alone. Reported as nnbench does: exact, equivalent within tolerance,
or silently wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Callable, Iterator

import torch

from djinn import generation

# A step maps the ids fed at this step (the prompt, then one token) to the last position's
# logits [batch, vocab]; it holds its own KV between calls.
Stepper = Callable[[torch.Tensor], torch.Tensor]

# fp16 decoding differs from eager in the last bits by design (graph capture, fused kernels):
# a logit moves by a few fp16 ulps of its magnitude. 1e-2 relative to the step's largest |logit|
# is ~10 fp16 ulps near 1.0, far below the gap of a wrong layer or position.
DEFAULT_RELATIVE_TOLERANCE = 1e-2
# Top-1 agreement the equivalent verdict needs: steps whose top two logits are closer than the
# tolerance may pick either, so agreement can fall short of 1 without anything being wrong.
DEFAULT_MIN_TOP1_AGREEMENT = 0.9


class Equivalence(str, Enum):
    EXACT = "exact"
    EQUIVALENT = "equivalent"
    SILENTLY_WRONG = "silently_wrong"


@dataclass(frozen=True)
class TeacherForced:
    verdict: Equivalence
    steps: int
    max_abs_diff: float
    max_rel_diff: float  # max |Δ| over the step's largest |reference logit|, worst step
    top1_agreement: float  # fraction of steps (x batch) whose argmax equals the reference's
    relative_tolerance: float
    min_top1_agreement: float

    def as_dict(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        return data


def teacher_forced_logits(step: Stepper, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Feed `prompt`, then each of `tokens` [batch, n] in turn; the logits of every step,
    [batch, n + 1, vocab] (step 0 is the prompt's last position)."""
    logits = [step(prompt).float().cpu()]
    for i in range(tokens.shape[1]):
        logits.append(step(tokens[:, i:i + 1]).float().cpu())
    return torch.stack(logits, dim=1)


def judge(reference: torch.Tensor, candidate: torch.Tensor, *,
          relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
          min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT) -> TeacherForced:
    """Compare teacher-forced logits [batch, steps, vocab] step by step."""
    if reference.shape != candidate.shape:
        raise ValueError(f"teacher-forced logits differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    ref, cand = reference.float(), candidate.float()
    diff = (cand - ref).abs()
    scale = ref.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    rel = float((diff.amax(dim=-1) / scale).max())
    agreement = float((cand.argmax(-1) == ref.argmax(-1)).float().mean())
    if torch.equal(ref, cand):
        verdict = Equivalence.EXACT
    elif rel <= relative_tolerance and agreement >= min_top1_agreement:
        verdict = Equivalence.EQUIVALENT
    else:
        verdict = Equivalence.SILENTLY_WRONG
    return TeacherForced(verdict, ref.shape[1], float(diff.max()), rel, agreement, relative_tolerance,
                         min_top1_agreement)


@contextmanager
def stepper(remote, prompt: torch.Tensor) -> Iterator[Stepper]:
    """A `RemoteModel` (any mode, local included) as a Stepper that returns every step's logits,
    for greedy decoding of `prompt` (its batch and length; the stepper is then fed it first).

    Uses the model's step driver, the one object of the client that feeds a step its input;
    `generate` would feed back its own greedy pick instead of the reference's token."""
    plan = generation.plan(remote.model, prompt, None, None, None, None,
                           {"do_sample": False, "max_new_tokens": 1})
    driver = remote._driver(plan, want_logits=True, want_scores=False)
    try:
        yield lambda ids: driver.step(ids).logits
    finally:
        driver.close()

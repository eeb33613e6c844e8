"""The suite's statistics: one spread per figure, and intervals for ratios between baselines.

A timing on a shared host moves with whatever else runs there, so a comparison between
two baselines is made from interleaved rounds (A B A B ..., each pair seconds apart in the
same warm state) and judged by the bootstrap interval of its ratio, never by two medians
taken minutes apart. numpy only: the percentile bootstrap needs nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A 95% interval: the "bootstrap 95% confidence interval of the ratio".
CONFIDENCE = 0.95
# Resamples per interval: the interval's ends move by well under 1% between seeds at 2000
# (measured on 25-round samples), and an interval costs a few milliseconds.
BOOTSTRAP_RESAMPLES = 2000
# Fixed, so that one run's verdict is a function of its samples alone.
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of n samples: the one statistic every figure shows."""
    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Spread":
        if not len(samples):
            raise ValueError("a spread needs at least one sample")
        q1, median, q3 = np.percentile(np.asarray(samples, dtype=float), [25, 50, 75])
        return cls(float(median), float(q1), float(q3), len(samples))

    def as_dict(self, prefix: str, unit: str) -> dict:
        """extra_info keys that carry their unit and statistic: `per_token_ms_median`, ..."""
        return {f"{prefix}_{unit}_median": self.median, f"{prefix}_{unit}_q1": self.q1,
                f"{prefix}_{unit}_q3": self.q3, f"{prefix}_n": self.n}


@dataclass(frozen=True)
class RatioEstimate:
    """numerator / denominator: the ratio of medians and its bootstrap interval."""
    ratio: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE
    paired: bool = True

    def __str__(self) -> str:
        return f"{self.ratio:.3g}x [{self.low:.3g}, {self.high:.3g}] ({self.confidence:.0%} CI, n={self.n})"

    def as_dict(self) -> dict:
        return {"ratio_of_medians": self.ratio, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "confidence": self.confidence, "paired": self.paired}


def _interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], *, confidence: float = CONFIDENCE,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> RatioEstimate:
    """Ratio of medians of interleaved rounds: round i of each side was measured back to back,
    so the bootstrap resamples rounds (pairs), keeping what a slow spell did to both sides."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired samples need two equal, non-empty lengths; got {a.shape} and {b.shape}")
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    resampled = np.median(a[picks], axis=1) / np.median(b[picks], axis=1)
    low, high = _interval(resampled, confidence)
    return RatioEstimate(float(np.median(a) / np.median(b)), low, high, len(a), confidence, paired=True)


def unpaired_ratio(numerator: Sequence[float], denominator: Sequence[float], *, confidence: float = CONFIDENCE,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> RatioEstimate:
    """Ratio of medians of two independent samples (two runs), each resampled on its own."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("a ratio needs samples on both sides")
    rng = np.random.default_rng(seed)
    resampled = (np.median(a[rng.integers(0, len(a), size=(resamples, len(a)))], axis=1)
                 / np.median(b[rng.integers(0, len(b), size=(resamples, len(b)))], axis=1))
    low, high = _interval(resampled, confidence)
    return RatioEstimate(float(np.median(a) / np.median(b)), low, high, min(len(a), len(b)), confidence,
                         paired=False)


def percentile_ratio(numerator: Sequence[float], denominator: Sequence[float], q: float, *,
                     confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> RatioEstimate:
    """Ratio of the q-th percentiles of two independent samples (a tail latency against another's),
    each resampled on its own; `ratio` is that of the samples' own percentiles."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("a ratio needs samples on both sides")
    rng = np.random.default_rng(seed)
    resampled = (np.percentile(a[rng.integers(0, len(a), size=(resamples, len(a)))], q, axis=1)
                 / np.percentile(b[rng.integers(0, len(b), size=(resamples, len(b)))], q, axis=1))
    low, high = _interval(resampled, confidence)
    return RatioEstimate(float(np.percentile(a, q) / np.percentile(b, q)), low, high, min(len(a), len(b)),
                         confidence, paired=False)


def paired_difference_over(numerator: Sequence[float], denominator: Sequence[float], scale: float, *,
                           confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> RatioEstimate:
    """median(numerator[i] - denominator[i]) / scale of paired samples, with the bootstrap interval
    over pairs: how much of `scale` (a link's round trip) a latency grew by. The median of the
    differences, not the difference of the medians: each pair was measured back to back, so what a
    slow spell did to both cancels in its difference."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a) or scale <= 0:
        raise ValueError(f"paired samples need two equal, non-empty lengths and a positive scale; got {a.shape}, "
                         f"{b.shape} and {scale}")
    differences = a - b
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    resampled = np.median(differences[picks], axis=1) / scale
    low, high = _interval(resampled, confidence)
    return RatioEstimate(float(np.median(differences) / scale), low, high, len(a), confidence, paired=True)

"""Evaluation statistics shared by every task and by ``prefopt-report``.

Pure Python (no torch import), so the report tool can use them without torch. Inputs may be tensors,
numpy arrays or sequences of numbers; they are read as flat lists of floats.

* **win rate** is always a head-to-head comparison: how often the policy's score beats the reference's
  on the *same* prompt, seed or episode (a tie counts one half).
* **implicit-reward accuracy** (TRL's ``rewards/accuracies``) is something else: how often DPO's implicit
  reward ``(lp_c - ref_c) - (lp_r - ref_r)`` ranks a held-out pair the way the label does. Tasks that
  only have labelled pairs report it under that name (:func:`implicit_reward_accuracy`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["implicit_reward_accuracy", "mean_and_se", "win_rate"]


def _floats(values: Any) -> list[float]:
    """A flat list of floats from a tensor, an array or an iterable of numbers."""
    if hasattr(values, "detach"):  # a torch tensor (possibly on a GPU)
        values = values.detach().double().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):  # a numpy array
        values = values.reshape(-1).tolist()
    return [float(v) for v in values]


def mean_and_se(values: Any) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n)); the error is 0.0 for one value."""
    xs = _floats(values)
    if not xs:
        raise ValueError("mean_and_se of no values")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(variance / n)


def win_rate(scores: Any, baseline: Any) -> dict[str, float]:
    """How often ``scores[i]`` beats ``baseline[i]`` (the same prompt, seed or episode), head to head.

    Returns ``win_rate`` (a tie counts one half), ``win_rate_strict`` (ties count as losses) and ``tie_rate``.
    """
    a, b = _floats(scores), _floats(baseline)
    if len(a) != len(b) or not a:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists; got {len(a)} and {len(b)}")
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    n = len(a)
    return {"win_rate": (wins + 0.5 * ties) / n, "win_rate_strict": wins / n, "tie_rate": ties / n}


def implicit_reward_accuracy(policy_chosen: Iterable, policy_rejected: Iterable, reference_chosen: Iterable,
                             reference_rejected: Iterable) -> float:
    """Fraction of pairs whose implicit reward margin ``(lp_c - ref_c) - (lp_r - ref_r)`` is positive
    (an exact tie counts one half): how often the policy moved towards the label relative to the reference."""
    pc, pr, rc, rr = (_floats(v) for v in (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    margins = [(a - c) - (b - d) for a, b, c, d in zip(pc, pr, rc, rr)]
    if not margins or not len(pc) == len(pr) == len(rc) == len(rr):
        raise ValueError("implicit_reward_accuracy needs four equally long, non-empty lists")
    return (sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)) / len(margins)

"""Per-sample scores turned into preference pairs or rankings.

``scores`` is ``[G, K]``: ``K`` samples of one group (one prompt, context or start state), higher is better.

Pair rules (:func:`score_pairs`, option ``feedback.rule``):

* ``best_vs_worst``: one pair per group, the highest score against the lowest (the first highest and the
  last lowest, so a group of equal scores gives the pair ``(0, K-1)``).
* ``all_pairs``: every pair ``(a, b)``, ``a < b``, of the group, the higher score chosen (``a`` when equal).

Ties, as the pair teachers make them: a pair whose score gap is ``<= margin`` is a *tie* (``tie = True``,
the first item chosen by convention), which :class:`~prefopt.module.PreferenceModule` drops (``loss.ties=drop``,
the default: only pairs *above the margin* are trained on) or counts half each way (``loss.ties=half``).
With ``margin = 0`` only exactly equal scores tie.

Rankings (:func:`score_ranking`): the group sorted best first (stable: equal scores keep their order), with
the pair ``(a, b)`` of positions tied when their gap is ``<= margin`` (used by the all-pairs ranking loss;
the Plackett-Luce loss takes the order as strict).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.errors import PrefoptError, check_choice
from prefopt.feedback.losses import pair_indices
from prefopt.feedback.teach import Ranking, sort_scores

PAIR_RULES = ("best_vs_worst", "all_pairs")


@dataclass
class ScorePairs:
    """Pairs as indices into ``[G, K]``: ``group``, ``chosen``, ``rejected`` int64 ``[P]`` and ``tie`` bool ``[P]``."""

    group: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    tie: torch.Tensor


def _check(scores, margin) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise PrefoptError(f"scores of shape {tuple(scores.shape)}; allowed: [G, K] with K >= 2 samples per group")
    if not bool(torch.isfinite(scores).all()):
        raise PrefoptError("scores contain NaN or inf; every score must be a finite number")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise PrefoptError(f"feedback.margin={margin!r} is not supported; allowed: a number >= 0")
    return scores


def score_pairs(scores, rule: str = "best_vs_worst", margin: float = 0.0) -> ScorePairs:
    """Pairs from scores by ``rule`` (see the module docstring)."""
    check_choice("feedback.rule", rule, PAIR_RULES)
    scores = _check(scores, margin)
    groups, k = scores.shape
    if rule == "best_vs_worst":
        best = scores.argmax(dim=1)  # the first maximum
        worst = k - 1 - scores.flip(1).argmin(dim=1)  # the last minimum
        group = torch.arange(groups)
        chosen, rejected = best, worst
    else:
        a, b = pair_indices(k)
        group = torch.arange(groups).repeat_interleave(a.numel())
        a, b = a.repeat(groups), b.repeat(groups)
        second = scores[group, b] > scores[group, a]
        chosen, rejected = torch.where(second, b, a), torch.where(second, a, b)
    gap = scores[group, chosen] - scores[group, rejected]
    return ScorePairs(group, chosen, rejected, gap <= margin)


def score_ranking(scores, margin: float = 0.0) -> Ranking:
    """Each group sorted best first, with ties within ``margin`` (see the module docstring)."""
    scores = _check(scores, margin)
    order = sort_scores(scores)
    ranked = scores.gather(1, order)
    a, b = pair_indices(scores.shape[1])
    return Ranking(order, (ranked[:, a] - ranked[:, b]) <= margin, torch.ones(scores.shape[0], dtype=torch.bool))

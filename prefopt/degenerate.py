"""Preference data that cannot teach anything is refused before training; partly degenerate data is named.

A pair is uninformative when its chosen sample is identical to its rejected one (every tensor equal: the DPO
gradient of such a pair is exactly zero) or when it is a tie. :func:`check_pairs` refuses a round whose pairs are
all uninformative (or that has no pairs at all) with one :class:`~prefopt.errors.PrefoptError`, and logs one
warning with the counts when only some are. It runs on the round's pairs before the module and trainer are built.
"""

from __future__ import annotations

import logging

import torch

from prefopt.data.pairs import TensorPairs
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


def identical_rows(pairs: TensorPairs) -> torch.Tensor:
    """bool ``[N]``: True where every chosen tensor equals the rejected one (NaN never equal)."""
    same = torch.ones(len(pairs), dtype=torch.bool)
    for key, chosen in pairs.chosen.items():
        rejected = pairs.rejected[key]
        if chosen.shape != rejected.shape:
            return torch.zeros(len(pairs), dtype=torch.bool)
        same &= (chosen == rejected).reshape(len(pairs), -1).all(dim=1)
    return same


def check_pairs(pairs, where: str) -> None:
    """Refuse pairs that are all identical or ties (or none); warn with the counts when some are."""
    if not isinstance(pairs, TensorPairs):  # other datasets (feedback kinds, HF datasets) are checked by their loaders
        return
    total = len(pairs)
    if total == 0:
        raise PrefoptError(f"{where}: there are no preference pairs (the teacher skipped every pair, or the data is "
                           "empty); check domain.task.teacher (skip_threshold) or the preference data")
    identical = identical_rows(pairs)
    tie = pairs.tie.bool() & ~identical
    counts = f"{int(identical.sum())} with chosen identical to rejected, {int(tie.sum())} ties"
    useless = int((identical | tie).sum())
    if useless == total:
        raise PrefoptError(f"{where}: all {total} preference pairs are uninformative ({counts}); there is no "
                           "preference to learn. Check the teacher (domain.task.teacher: kind, equal_threshold) or the "
                           "preference data")
    if useless:
        log.warning("prefopt: warning: %s: %d of %d preference pairs are uninformative (%s); they add no gradient",
                    where, useless, total, counts)

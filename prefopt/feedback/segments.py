"""Groups of trajectory segments for binary, ranking and score feedback in the control domain.

The control task collects *pairs* of segments (two branches from one start state, or two windows); its
:meth:`collect_pairs` labels them with a teacher. :func:`segment_groups` runs that same collection with a
:class:`RecordingTeacher`, which keeps the per-step rewards and masks it is shown and answers "first item"
for every pair, so the segments come back unlabelled and in collection order. ``K / 2`` consecutive pairs
form a group of ``K`` segments (a segment carries its own observations, so a group needs no shared
condition; under ``pairing=branch`` each pair in it shares a start state). With ``K = 2`` the segments are
exactly those of ``feedback=pairs``.
"""

from __future__ import annotations

import torch

from prefopt.data.teachers import Labels, ScriptedTeacher
from prefopt.errors import PrefoptError
from prefopt.feedback.data import Groups


class RecordingTeacher(ScriptedTeacher):
    """Keeps the rewards and masks of the pairs it is asked about; prefers the first item, keeps every pair."""

    def label(self, r1, r2, mask1=None, mask2=None, generator=None) -> Labels:
        self.seen = (torch.as_tensor(r1), torch.as_tensor(r2), mask1, mask2)
        n = self.seen[0].shape[0]
        return Labels(torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))

    __call__ = label


def segment_groups(task, policy, size: int, num_pairs: int, stream: int, desc: str) -> Groups:
    """``num_pairs`` collected pairs regrouped into groups of ``size`` segments, with per-step rewards."""
    if size % 2:
        raise PrefoptError(f"feedback.group_size={size}: control groups are made of collected segment pairs; "
                           "allowed: an even number")
    recorder = RecordingTeacher()
    pairs = task.collect_pairs(policy, num_pairs, stream, desc=desc, teacher=recorder)
    r1, r2, m1, m2 = recorder.seen
    count = (len(pairs) * 2) // size
    if count == 0:
        raise PrefoptError(f"feedback.group_size={size} is larger than the {2 * len(pairs)} collected segments")
    used = count * size // 2

    def regroup(first, second):  # [P, ...] pairs -> [G, K, ...], pair p's two items next to each other
        both = torch.stack([first[:used], second[:used]], dim=1)
        return both.reshape(count, size, *both.shape[2:])

    items = {k: regroup(pairs.chosen[k], pairs.rejected[k]) for k in pairs.chosen}
    # the whole segments' rewards: with explore_steps the learner sees a prefix, the teacher judges it all
    rewards = regroup(r1, r2).to(torch.float64)
    mask = None if m1 is None else regroup(torch.as_tensor(m1), torch.as_tensor(m2)).bool()
    # branch pairs start from one state: their returns compare with each other only (see Groups.start_size)
    return Groups(items, {}, rewards, mask, start_size=2 if task.pairing == "branch" else None)

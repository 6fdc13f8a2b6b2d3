"""Scripted teachers for labels, scores and rankings; score -> pairs / ranking rules; datasets from groups."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.data.teachers import ScriptedTeacher
from prefopt.errors import PrefoptError
from prefopt.feedback.convert import score_pairs, score_ranking
from prefopt.feedback.data import Groups, TensorRankings, TensorSamples
from prefopt.feedback.teach import binary_labels, rank, teacher_scores


# ------------------------------------------------------------------------------------------ teachers
def test_rank_k2_matches_the_pair_teacher():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(200, 2, 5, generator=g)
    r[:3, 1] = r[:3, 0]  # exact draws go to the first item, as for pairs
    for kind in ("oracle", "myopic"):
        teacher = ScriptedTeacher(kind)
        ranking = rank(teacher, r)
        labels = teacher.label(r[:, 0], r[:, 1])
        assert torch.equal(ranking.order[:, 0], labels.preference)  # first ranked = preferred item


def test_rank_oracle_by_hand_with_ties_and_skip():
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.05, -1.0]])
    ranking = rank(ScriptedTeacher("equal", equal_threshold=0.1, skip_threshold=0.5), rewards)
    assert ranking.order.tolist() == [[1, 2, 0], [1, 0, 2]]
    # position pairs (0,1), (0,2), (1,2): group 1 has |0.05 - 0| < 0.1 tied
    assert ranking.tie.tolist() == [[False, False, False], [True, False, False]]
    assert ranking.keep.tolist() == [True, False]  # best return 0.05 <= skip threshold


def test_stochastic_ranking_follows_bradley_terry_for_two_items():
    teacher = ScriptedTeacher("stochastic", beta=1.0)
    r = torch.tensor([[0.0, 1.0]]).repeat(20000, 1)
    first_is_second = (rank(teacher, r).order[:, 0] == 1).double().mean()
    assert float(first_is_second) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.015)


def test_mistakes_swap_one_adjacent_pair():
    teacher = ScriptedTeacher("mistake", eps=1.0)
    order = rank(teacher, torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(50, 1)).order
    moved = (order != torch.arange(4)).sum(1)
    assert bool((moved == 2).all())  # exactly one adjacent swap per group
    assert bool(((order[:, :-1] - order[:, 1:]).abs().max(1).values <= 2).all())


def test_binary_labels_median_and_threshold():
    rewards = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert binary_labels(ScriptedTeacher(), rewards).label.tolist() == [0, 1, 0, 1]  # median 2 (lower middle)
    labels = binary_labels(ScriptedTeacher("equal", equal_threshold=0.5), rewards, threshold=2.2)
    assert labels.label.tolist() == [0, 1, 0, 1] and labels.keep.tolist() == [True, True, False, True]
    assert binary_labels(ScriptedTeacher("mistake", eps=1.0), rewards, threshold=2.5).label.tolist() == [1, 0, 1, 0]
    # group_mean: relative to the mean of each group of 2 (means 2.5 and 2.5), then groups (1, 5), (3, 3)
    assert binary_labels(ScriptedTeacher(), rewards, threshold="group_mean", group_size=2).label.tolist() == [0, 1, 0, 1]
    grouped = binary_labels(ScriptedTeacher(), torch.tensor([1.0, 5.0, 3.0, 3.0]), threshold="group_mean", group_size=2)
    assert grouped.label.tolist() == [0, 1, 0, 0]
    with pytest.raises(PrefoptError, match="feedback.threshold='mean' is not supported"):
        binary_labels(ScriptedTeacher(), rewards, threshold="mean")


def test_binary_labels_judge_samples_against_their_start_state():
    # two start states, two branches each: a high one (returns -10, -12) and a low one (-100, -90). The oracle
    # prefers -10 over -12 and -90 over -100; an absolute cut (the median, -56) labels the start states instead
    returns = torch.tensor([-10.0, -12.0, -100.0, -90.0])
    assert binary_labels(ScriptedTeacher(), returns).label.tolist() == [1, 1, 0, 0]
    for threshold in ("median", "group_mean", 0.0):
        labels = binary_labels(ScriptedTeacher(), returns, threshold=threshold, group_size=2, start_size=2)
        assert labels.label.tolist() == [1, 0, 0, 1], threshold
    # per-step rewards with a mask: the advantage of the masked returns; a group of 4 made of 2 start states
    steps = torch.tensor([[-5.0, -5.0, 9.0], [-6.0, -6.0, 0.0], [-50.0, -50.0, 0.0], [-40.0, -50.0, 0.0]])
    mask = torch.tensor([[True, True, False]] + [[True, True, True]] * 3)
    labels = binary_labels(ScriptedTeacher(), steps, mask, threshold="group_mean", group_size=4, start_size=2)
    assert labels.label.tolist() == [1, 0, 0, 1]
    # the equal threshold applies to the advantage: pair 2's gap of 10 (advantages +-5) is too close to call at 6
    equal = binary_labels(ScriptedTeacher("equal", equal_threshold=6.0), returns, start_size=2, threshold=0.0)
    assert equal.keep.tolist() == [False, False, False, False]
    assert binary_labels(ScriptedTeacher("equal", equal_threshold=1.5), returns, start_size=2,
                         threshold=0.0).keep.tolist() == [False, False, True, True]
    with pytest.raises(PrefoptError, match="4 items do not split into start states of 3"):
        binary_labels(ScriptedTeacher(), returns, start_size=3)


def test_scores_and_rankings_of_samples_from_two_start_states():
    # one group of 4: two branch pairs, from a high start (-10, -12) and a low one (-100, -90)
    returns = torch.tensor([[-10.0, -12.0, -100.0, -90.0]])
    assert rank(ScriptedTeacher(), returns).order.tolist() == [[0, 1, 3, 2]]  # the start states first
    assert teacher_scores(ScriptedTeacher(), returns, start_size=2).tolist() == [[1.0, -1.0, -5.0, 5.0]]
    ranking = rank(ScriptedTeacher("equal", equal_threshold=3.0), returns, start_size=2)
    assert ranking.order.tolist() == [[3, 0, 1, 2]]  # advantages 5, 1, -1, -5
    # ties on the advantages: |5 - 1| = 4, |5 + 1| = 6, |5 + 5| = 10, |1 + 1| = 2 (tie), |1 + 5| = 6, |-1 + 5| = 4
    assert ranking.tie.tolist() == [[False, False, False, True, False, False]]


def test_scores_are_discounted_returns_and_refuse_mistakes():
    r = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])  # one group, two items, two steps
    assert teacher_scores(ScriptedTeacher("myopic", gamma=0.5), r).tolist() == [[0.5 + 2.0, 4.0]]
    with pytest.raises(PrefoptError, match="eps=0.1: a teacher that makes mistakes gives no scores"):
        teacher_scores(ScriptedTeacher("mistake"), r)


# ---------------------------------------------------------------------------------------- conversion
SCORES = torch.tensor([[0.2, 0.9, 0.9, -1.0], [1.0, 1.0, 1.0, 1.0]])


def test_best_vs_worst_pairs():
    pairs = score_pairs(SCORES, "best_vs_worst")
    assert pairs.group.tolist() == [0, 1]
    assert pairs.chosen.tolist() == [1, 0] and pairs.rejected.tolist() == [3, 3]
    assert pairs.tie.tolist() == [False, True]  # an all-equal group is a tie


def test_all_pairs_above_a_margin():
    pairs = score_pairs(SCORES[:1], "all_pairs", margin=0.5)
    got = list(zip(pairs.chosen.tolist(), pairs.rejected.tolist(), pairs.tie.tolist()))
    # (0,1): 0.9 > 0.2 by 0.7; (0,2) same; (0,3): 1.2; (1,2): equal -> tie; (1,3), (2,3): 1.9
    assert got == [(1, 0, False), (2, 0, False), (0, 3, False), (1, 2, True), (1, 3, False), (2, 3, False)]
    assert score_pairs(SCORES[:1], "all_pairs", margin=0.8).tie.tolist() == [True, True, False, True, False, False]


def test_score_ranking_and_errors():
    ranking = score_ranking(SCORES[:1], margin=0.0)
    assert ranking.order.tolist() == [[1, 2, 0, 3]]
    assert ranking.tie.tolist() == [[True, False, False, False, False, False]]
    with pytest.raises(PrefoptError, match="feedback.rule='worst' is not supported; allowed: best_vs_worst, all_pairs"):
        score_pairs(SCORES, "worst")
    with pytest.raises(PrefoptError, match="K >= 2"):
        score_pairs(torch.zeros(3, 1))
    with pytest.raises(PrefoptError, match="NaN or inf"):
        score_ranking(torch.tensor([[0.0, float("nan")]]))


# ------------------------------------------------------------------------------------------ datasets
def test_groups_to_rankings_and_pairs():
    items = {"a": torch.arange(2 * 3 * 2.0).reshape(2, 3, 2)}
    groups = Groups(items, {"obs": torch.tensor([[7.0], [8.0]])}, torch.tensor([[0.0, 2.0, 1.0], [5.0, 4.0, 3.0]]))
    ranking = rank(ScriptedTeacher(), groups.rewards)
    data = groups.ranked(ranking.order, ranking.keep, ranking.tie)
    assert isinstance(data, TensorRankings) and data.k == 3
    assert data.items["a"][0].tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]
    pairs = score_pairs(groups.rewards, "best_vs_worst")
    tp = groups.pairs(pairs.group, pairs.chosen, pairs.rejected, pairs.tie)
    assert tp.chosen["a"].tolist() == [[2.0, 3.0], [6.0, 7.0]] and tp.shared["obs"].tolist() == [[7.0], [8.0]]


def test_sample_schema_errors():
    with pytest.raises(PrefoptError, match="label must be"):
        TensorSamples({"y": torch.zeros(3, 2)}, None, torch.tensor([0, 2, 1]))
    with pytest.raises(PrefoptError, match="K >= 2"):
        TensorRankings({"y": torch.zeros(3, 1, 2)})

"""Each domain trains one small round on each feedback kind through prefopt.train (tiny sizes)."""

from __future__ import annotations

import pytest

from prefopt.train import train

KINDS = [["feedback=binary"], ["feedback=ranking", "loss=plackett_luce"], ["feedback=scores"]]


def _check(summary, kind):
    assert summary["feedback"] == kind
    assert summary["train"]["train/loss"] == pytest.approx(summary["train"]["train/loss"])  # logged and finite
    assert 0.0 <= summary["eval"]["win_rate"] <= 1.0


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[0])
def test_diffusion_digits_trains_on_each_kind(make_config, kind):
    pytest.importorskip("diffusers")
    from tests.test_diffusion_digits import TINY

    # the base model and the sampled groups are cached across the kinds by the shared cache folder
    _check(train(make_config("domain=diffusion", *TINY, *kind, "feedback.group_size=2")), kind[0].split("=")[1])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[0])
def test_sequence_chorales_trains_on_each_kind(make_config, kind):
    pytest.importorskip("music21")
    from tests.test_sequence_chorales import TINY

    _check(train(make_config(*TINY, *kind, "feedback.group_size=2", "domain.task.rounds=1")), kind[0].split("=")[1])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[0])
def test_control_trains_on_each_kind(make_config, kind):
    pytest.importorskip("gymnasium")
    from tests.test_control_task import TINY

    summary = train(make_config("domain=control", *TINY, *kind, "feedback.group_size=2"))
    _check(summary, kind[0].split("=")[1])
    # the 12 branch pairs' 24 segments: 24 labelled samples, 12 rankings of two, 12 best-vs-worst pairs
    assert summary["eval"]["num_pairs"] == {"feedback=binary": 24, "feedback=ranking": 12,
                                            "feedback=scores": 12}[kind[0]]
    # held-out validation on the task's held-out pairs, as feedback=pairs reports it
    names = ["val/loss", "val/rewards/accuracies"] + (["val/rewards/label_accuracies", "val/kl"]
                                                       if kind[0] == "feedback=binary" else [])
    for name in names:
        assert summary["train"][name] == pytest.approx(summary["train"][name]), name  # logged and finite
    assert 0.0 <= summary["train"]["val/rewards/accuracies"] <= 1.0


def test_control_groups_of_two_are_the_pairs_segments(make_config):
    pytest.importorskip("gymnasium")
    import torch
    from hydra.utils import instantiate

    from tests.test_control_task import TINY

    cfg = make_config("domain=control", *TINY)
    task = instantiate(cfg.domain.task)
    policy = task.build_policy()
    pairs = task.pairs(policy, 0)
    groups = task.groups(policy, 0, 2)
    assert groups.items["obs"].shape[:2] == (len(pairs), 2)
    got = {tuple(x.flatten().tolist()) for x in groups.items["obs"].flatten(0, 1)}
    want = {tuple(x.flatten().tolist()) for x in torch.cat([pairs.chosen["obs"], pairs.rejected["obs"]])}
    assert got == want
    # the oracle's ranking of each group agrees with the pair teacher's label
    from prefopt.feedback.teach import rank
    order = rank(task.teacher, groups.rewards, groups.mask).order
    chosen_first = {tuple(g[o[0]].flatten().tolist()) for g, o in zip(groups.items["obs"], order)}
    assert chosen_first == {tuple(x.flatten().tolist()) for x in pairs.chosen["obs"]}


def test_control_binary_labels_are_the_pair_teachers_answers(make_config):
    """Binary labels of branch pairs judge each branch against the other from its start state: the pair
    teacher's chosen segment is desirable, its rejected one undesirable, under every threshold rule."""
    pytest.importorskip("gymnasium")
    from hydra.utils import instantiate

    from prefopt.feedback.data import sample_conditions
    from prefopt.feedback.train import FeedbackConfig, feedback_from_groups
    from tests.test_control_task import TINY

    cfg = make_config("domain=control", *TINY, "domain.task.num_pairs=24")
    task = instantiate(cfg.domain.task)
    policy = task.build_policy()
    pairs = task.pairs(policy, 0)
    groups = task.groups(policy, 0, 2)
    assert groups.start_size == 2
    chosen = {tuple(x.flatten().tolist()) for x in pairs.chosen["obs"]}
    rejected = {tuple(x.flatten().tolist()) for x in pairs.rejected["obs"]}
    for threshold in ("median", "group_mean"):
        data = feedback_from_groups(groups, FeedbackConfig(kind="binary", group_size=2, threshold=threshold),
                                    task.teacher, sample_conditions(policy))
        assert len(data) == 2 * len(pairs)
        # the actions are judged given the observations: KTO's mismatched rows pair them with other actions
        assert sorted(data.items) == ["actions"] and sorted(data.condition) == ["mask", "obs"]
        for obs, label in zip(data.condition["obs"], data.label.tolist()):
            assert tuple(obs.flatten().tolist()) in (chosen if label == 1 else rejected), threshold

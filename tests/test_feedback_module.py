"""Binary and ranking feedback modules on a tiny stochastic toy policy: layouts, shared draws, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prefopt.errors import PrefoptError
from prefopt.feedback.data import (
    TensorRankings,
    TensorSamples,
    concatenate_ranked,
    mismatched_samples,
    split_ranked,
)
from prefopt.feedback.module import BinaryFeedbackModule, RankingFeedbackModule, draw_groups
from prefopt.policy import PreferencePolicy
from tests.toy import LossRecorder, loader, trainer


class GroupNoisyRegression(PreferencePolicy):
    """log p(y | x) = -||net(x + 0.1 * noise) - y||^2; rows i, i + N/group, ... share one noise draw."""

    stochastic = True
    lora_targets = ("0", "2")

    def draw(self, samples, generator=None, group: int = 2):
        rows = samples["x"].shape[0] // group
        noise = torch.randn(rows, 3, generator=generator)
        return torch.cat([noise] * group)

    def log_likelihood(self, network, samples, draw=None):
        noise = draw if draw is not None else torch.zeros_like(samples["x"])
        return -((network(samples["x"] + 0.1 * noise) - samples["y"]) ** 2).sum(-1)


class PairOnlyDraw(GroupNoisyRegression):
    def draw(self, samples, generator=None):  # an adapter that only knows the pair draw
        return super().draw(samples, generator, 2)


def make_policy(cls=GroupNoisyRegression, seed=0):
    torch.manual_seed(seed)
    return cls(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)))


def target(x):
    return torch.stack([x.sum(-1), x[:, 0] - x[:, 1]], -1)


def binary_data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    label = torch.arange(n) % 2
    noise = torch.where(label[:, None] == 1, torch.tensor(0.1), torch.tensor(1.5))
    y = target(x) + noise * torch.randn(n, 2, generator=g)
    return TensorSamples({"y": y}, {"x": x}, label)


def ranking_data(groups=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, 3, generator=g)
    scale = torch.tensor([0.1, 0.7, 1.5])[:k]  # rank 0 is closest to the target
    y = target(x)[:, None] + scale[None, :, None] * torch.randn(groups, k, 2, generator=g)
    return TensorRankings({"y": y}, {"x": x})


def test_ranking_layout_round_trip_and_k2_is_the_pair_layout():
    data = ranking_data(groups=5, k=3)
    batch = data[torch.arange(5)]
    samples, k = concatenate_ranked(batch)
    assert k == 3 and samples["y"].shape == (15, 2)
    assert torch.equal(samples["y"][5 * 2 + 4], data.items["y"][4, 2])  # row i + j*G is rank j of group i
    assert torch.equal(samples["x"][5 + 1], data.shared["x"][1])
    values = torch.arange(15.0)
    assert torch.equal(split_ranked(values, 3)[4], torch.tensor([4.0, 9.0, 14.0]))
    two = TensorRankings({"y": data.items["y"][:, :2]}, {"x": data.shared["x"]})[torch.arange(5)]
    from prefopt.policy import concatenate_pairs
    pair = concatenate_pairs({"chosen_y": two["ranked_y"][:, 0], "rejected_y": two["ranked_y"][:, 1],
                              "x": two["x"]})
    assert torch.equal(concatenate_ranked(two)[0]["y"], pair["y"]) and torch.equal(concatenate_ranked(two)[0]["x"], pair["x"])


def test_mismatched_rows_rotate_samples_not_conditions():
    batch = binary_data(n=4)[torch.arange(4)]
    rolled = mismatched_samples(batch)
    assert torch.equal(rolled["x"], batch["x"])
    assert torch.equal(rolled["y"], batch["sample_y"][[3, 0, 1, 2]])  # (x_1, y_n), (x_2, y_1), ...


def test_group_members_share_one_draw():
    module = RankingFeedbackModule(make_policy(), loss={"loss_type": "plackett_luce", "beta": 0.5})
    seen = []
    original = module.policy.log_likelihood

    def spy(network, samples, draw=None):
        seen.append(draw)
        return original(network, samples, draw)

    module.policy.log_likelihood = spy
    module.ranked_logps(ranking_data(groups=4, k=3)[torch.arange(4)], torch.Generator().manual_seed(0))
    draw = seen[0]
    assert torch.equal(draw[0:4], draw[4:8]) and torch.equal(draw[0:4], draw[8:12])
    assert not torch.equal(draw[0], draw[1])
    assert seen[1] is draw  # the reference sees the same draw


def test_pair_only_draw_is_a_clear_error_for_rankings():
    module = RankingFeedbackModule(make_policy(PairOnlyDraw), loss={"loss_type": "plackett_luce", "beta": 0.5})
    with pytest.raises(PrefoptError, match=r"draw\(samples, generator, group=K\)"):
        module.ranked_logps(ranking_data(groups=4, k=3)[torch.arange(4)], torch.Generator().manual_seed(0))


class BrokenGroupDraw(GroupNoisyRegression):
    def draw(self, samples, generator=None, group: int = 2):  # takes group, fails inside for its own reason
        raise TypeError("draw: group noise of the wrong type")


class KeywordDraw(GroupNoisyRegression):
    def draw(self, samples, generator=None, **options):
        return super().draw(samples, generator, **options)


def test_whether_draw_takes_group_is_read_from_its_signature():
    from prefopt.feedback.module import draws_groups

    assert draws_groups(make_policy()) and draws_groups(make_policy(KeywordDraw))
    assert not draws_groups(make_policy(PairOnlyDraw))
    samples = {"x": torch.zeros(6, 3)}
    assert draw_groups(make_policy(KeywordDraw), samples, torch.Generator().manual_seed(0), 3).shape == (6, 3)
    # a TypeError raised inside a draw that takes group is the adapter's own error, passed on unchanged
    with pytest.raises(TypeError, match="group noise of the wrong type"):
        draw_groups(make_policy(BrokenGroupDraw), samples, None, 3)


def test_kto_mismatched_kl_scores_the_rotated_rows():
    module = BinaryFeedbackModule(make_policy(), loss={"loss_type": "kto", "beta": 0.5})
    batch = binary_data(n=8)[torch.arange(8)]
    logps, ref, kl = module.sample_logps(batch, torch.Generator().manual_seed(0))
    assert logps.shape == (8,) and float(kl) == 0.0  # the reference is still the policy: log-ratios are 0
    with torch.no_grad():
        module.policy.network[2].bias.add_(0.3)
    _, _, kl = module.sample_logps(batch, torch.Generator().manual_seed(0))
    # by hand: the mean log-ratio of (x_i, y_{i-1}) under the same draws
    rolled = mismatched_samples(batch)
    draw = module.policy.draw({"x": torch.cat([batch["x"]] * 2)}, torch.Generator().manual_seed(0))[8:]
    u = (module.policy.log_likelihood(module.policy.network, rolled, draw)
         - module.policy.log_likelihood(module.reference.network, rolled, draw))
    assert float(kl) == pytest.approx(max(0.0, float(u.detach().mean())), rel=1e-5)


def test_bad_options_are_one_line_errors():
    with pytest.raises(PrefoptError, match=r"loss_type \(feedback=binary\)='sigmoid' is not supported"):
        BinaryFeedbackModule(make_policy(), loss={"loss_type": "sigmoid", "beta": 0.1})
    with pytest.raises(PrefoptError, match="loss.kl='pairs' is not supported; allowed: mismatched, batch"):
        BinaryFeedbackModule(make_policy(), loss={"loss_type": "kto", "beta": 0.1, "kl": "pairs"})
    with pytest.raises(PrefoptError, match="needs a reference model"):
        BinaryFeedbackModule(make_policy(), loss={"loss_type": "kto", "beta": 0.1}, reference="none")
    with pytest.raises(PrefoptError, match="reference=precomputed caches pair batches only"):
        RankingFeedbackModule(make_policy(), loss={"loss_type": "sigmoid", "beta": 0.1}, reference="precomputed")


def _train(module, data, epochs=3):
    recorder = LossRecorder()
    before = {k: v.clone() for k, v in module.policy.network.state_dict().items()}
    ref_before = ({k: v.clone() for k, v in module.reference.network.state_dict().items()}
                  if getattr(module.reference, "network", None) is not None else None)
    trainer(max_epochs=epochs, callbacks=[recorder]).fit(module, loader(data, batch_size=16))
    after = module.policy.network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trainable params changed
    if ref_before is not None:
        assert all(torch.equal(ref_before[k], v) for k, v in module.reference.network.state_dict().items())
    return recorder.losses


@pytest.mark.parametrize("loss", [{"loss_type": "kto", "beta": 0.5},
                                  {"loss_type": "kto", "beta": 0.5, "kl": "batch", "desirable_weight": 1.3},
                                  {"loss_type": "apo_zero_unpaired", "beta": 0.5}])
def test_binary_trains(loss):
    module = BinaryFeedbackModule(make_policy(), loss=loss, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = binary_data()
    losses = _train(module, data)
    logps, ref, _ = module.sample_logps(data[torch.arange(len(data))], torch.Generator().manual_seed(1))
    u = (logps - ref).detach()
    assert float(u[data.label == 1].mean()) > float(u[data.label == 0].mean())  # desirable samples gained
    assert sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.parametrize("loss,reference", [({"loss_type": "plackett_luce", "beta": 0.5}, "copy"),
                                            ({"loss_type": "sigmoid", "beta": 0.5}, "copy"),
                                            ({"loss_type": "ipo", "beta": 0.5}, "sync"),
                                            ({"loss_type": "cpl", "beta": 0.5}, "none")])
def test_ranking_trains(loss, reference):
    module = RankingFeedbackModule(make_policy(), loss=loss, reference=reference,
                                   optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = ranking_data()
    losses = _train(module, data)
    logps, _, _ = module.ranked_logps(data[torch.arange(len(data))], torch.Generator().manual_seed(1))
    assert sum(losses[-4:]) < sum(losses[:4])
    assert float((logps[:, 0] > logps[:, 2]).float().mean()) > 0.5


def test_ranking_trains_with_adapter_reference():
    module = RankingFeedbackModule(make_policy(), loss={"loss_type": "plackett_luce", "beta": 0.5},
                                   reference={"name": "adapter", "rank": 2},
                                   optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    base = {k: v.clone() for k, v in module.policy.network.state_dict().items() if "lora" not in k}
    lora = {k: v.clone() for k, v in module.policy.network.state_dict().items() if "lora_B" in k}
    trainer(max_epochs=2).fit(module, loader(ranking_data(), batch_size=16))
    state = module.policy.network.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # the reference (base weights) is frozen
    assert any(not torch.equal(v, state[k]) for k, v in lora.items())


def test_pairs_train_the_binary_and_ranking_modules():
    from tests.toy import make_pairs

    pairs = make_pairs(n=64)
    batch = pairs[torch.arange(8)]
    module = BinaryFeedbackModule(make_policy(), loss={"loss_type": "kto", "beta": 0.5})
    from prefopt.feedback.data import pairs_as_ranking, pairs_as_samples
    samples = pairs_as_samples(batch)
    assert samples["label"].tolist() == [1] * 8 + [0] * 8
    assert torch.equal(samples["sample_y"][8:], batch["rejected_y"]) and torch.equal(samples["x"][8:], batch["x"])
    ranked = pairs_as_ranking(batch)
    assert torch.equal(ranked["ranked_y"][:, 1], batch["rejected_y"]) and ranked["tie"].shape == (8, 1)
    _train(module, pairs, epochs=1)
    pl = RankingFeedbackModule(make_policy(), loss={"loss_type": "plackett_luce", "beta": 0.5})
    _train(pl, pairs, epochs=1)


def test_binary_metrics_by_hand():
    from prefopt.feedback.module import binary_metrics

    rewards = torch.tensor([0.5, -0.2, 0.1, 0.4])  # b * u; samples 0, 1 desirable; pairs (0, 2) and (1, 3)
    desirable = torch.tensor([True, True, False, False])
    m = binary_metrics(rewards, -rewards, desirable)  # APO-zero: signs measured from 0
    assert float(m["rewards/label_accuracies"]) == pytest.approx(0.25)  # only 0.5 (desirable, > 0)
    assert float(m["rewards/chosen"]) == pytest.approx(0.15) and float(m["rewards/rejected"]) == pytest.approx(0.25)
    assert float(m["rewards/margins"]) == pytest.approx(-0.1) and float(m["logps/rejected"]) == pytest.approx(-0.25)
    assert "rewards/accuracies" not in m
    m = binary_metrics(rewards, -rewards, desirable, reference_point=0.15)  # KTO: b * z0 = 0.15
    assert float(m["rewards/label_accuracies"]) == pytest.approx(0.5)  # margins 0.35, -0.35, -0.05, 0.25
    m = binary_metrics(rewards, -rewards, desirable, 0.15, pair_weight=torch.ones(4))
    assert float(m["rewards/accuracies"]) == pytest.approx(0.5)  # 0.5 > 0.1, -0.2 < 0.4
    m = binary_metrics(rewards, -rewards, desirable, 0.15, pair_weight=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert float(m["rewards/accuracies"]) == 1.0 and float(m["rewards/label_accuracies"]) == 1.0  # pair 1 tied


def sequence_batch():
    # right-padded prompt + completion rows: row 0 prompt [5, 6], completion [7]; row 1 prompt [8], completion [9, 10]
    return {"sample_input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 10, 0]]),
            "sample_attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]),
            "sample_completion_mask": torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]]),
            "label": torch.tensor([1, 0])}


def test_mismatched_sequences_are_a_prompt_with_the_previous_rows_completion():
    rows = mismatched_samples(sequence_batch())  # TRL: (x_1, y_n), (x_2, y_1)
    assert rows["input_ids"].tolist() == [[5, 6, 9, 10], [8, 7, 0, 0]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert rows["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]


class TokenPolicy(PreferencePolicy):
    """log p(completion | prompt) = sum of w[token] over the scored (completion) tokens: deterministic."""

    def log_likelihood(self, network, samples, draw=None):
        scored = (samples["completion_mask"] * samples["attention_mask"]).float()
        return (network(samples["input_ids"]).squeeze(-1) * scored).sum(-1)


def test_kto_mismatched_kl_for_sequences_by_hand():
    torch.manual_seed(0)
    module = BinaryFeedbackModule(TokenPolicy(nn.Embedding(11, 1)), loss={"loss_type": "kto", "beta": 0.5})
    with torch.no_grad():
        module.policy.network.weight.copy_(torch.arange(11.0)[:, None] * 0.1)
        module.reference.network.weight.zero_()
    logps, ref, kl = module.sample_logps(sequence_batch())
    assert logps.tolist() == pytest.approx([0.7, 1.9]) and ref.tolist() == [0.0, 0.0]
    # mismatched rows: completion [9, 10] after prompt [5, 6], completion [7] after prompt [8]: 1.9 and 0.7
    assert float(kl) == pytest.approx((1.9 + 0.7) / 2)
    with torch.no_grad():
        module.policy.network.weight[7] = -3.0  # the mismatched rows 9 + 10 = 1.9 and -3: mean < 0, clamped
    assert float(module.sample_logps(sequence_batch())[2]) == 0.0


def test_no_condition_falls_back_to_the_batch_estimate_with_one_notice(caplog):
    from prefopt.feedback import module as feedback_module

    feedback_module._NOTICED.discard(feedback_module.NO_CONDITION)
    g = torch.Generator().manual_seed(0)
    data = TensorSamples({"x": torch.randn(8, 3, generator=g), "y": torch.randn(8, 2, generator=g)}, None,
                         torch.arange(8) % 2)  # nothing but the samples: nothing to mismatch
    module = BinaryFeedbackModule(make_policy(), loss={"loss_type": "kto", "beta": 0.5})
    with torch.no_grad():
        module.policy.network[2].bias.add_(0.3)
    with caplog.at_level("WARNING", logger="prefopt.feedback.module"):
        for _ in range(2):
            logps, ref, kl = module.sample_logps(data[torch.arange(8)], torch.Generator().manual_seed(0))
    assert float(kl) == pytest.approx(max(0.0, float((logps - ref).detach().mean())))  # the batch's own log-ratios
    notices = [r.getMessage() for r in caplog.records if "loss.kl=mismatched" in r.getMessage()]
    assert notices == [f"prefopt: notice: {feedback_module.NO_CONDITION}"]


def test_ranking_metrics_by_hand():
    from prefopt.feedback.module import ranking_metrics

    # two rankings of 3, best first; pairs (0,1), (0,2), (1,2)
    rewards = torch.tensor([[0.3, 0.1, 0.2], [-0.1, 0.4, -0.5]])
    m = ranking_metrics(rewards, 2 * rewards)
    # ordered: group 0: 0.3>0.1 yes, 0.3>0.2 yes, 0.1>0.2 no; group 1: -0.1>0.4 no, -0.1>-0.5 yes, 0.4>-0.5 yes
    assert float(m["rewards/accuracies"]) == pytest.approx(4 / 6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1) and float(m["rewards/rejected"]) == pytest.approx(-0.15)
    assert float(m["rewards/margins"]) == pytest.approx(0.25) and float(m["logps/rejected"]) == pytest.approx(-0.3)
    tie = torch.tensor([[False, False, True], [True, False, False]])  # the two wrong pairs are ties
    assert float(ranking_metrics(rewards, rewards, tie)["rewards/accuracies"]) == 1.0


def test_pairs_split_into_samples_keep_the_policys_conditions():
    from prefopt.feedback.data import can_mismatch, pairs_as_samples

    batch = {"chosen_obs": torch.tensor([[1.0], [2.0]]), "rejected_obs": torch.tensor([[1.5], [2.5]]),
             "chosen_actions": torch.tensor([[0.1], [0.2]]), "rejected_actions": torch.tensor([[0.3], [0.4]]),
             "tie": torch.tensor([False, True])}
    plain = pairs_as_samples(batch)
    assert sorted(plain) == ["label", "sample_actions", "sample_obs", "weight"] and not can_mismatch(plain)
    split = pairs_as_samples(batch, ("obs",))
    assert sorted(split) == ["label", "obs", "sample_actions", "weight"] and can_mismatch(split)
    assert split["obs"].flatten().tolist() == [1.0, 2.0, 1.5, 2.5] and split["label"].tolist() == [1, 1, 0, 0]
    assert split["weight"].tolist() == [1.0, 0.0, 1.0, 0.0]
    rows = mismatched_samples(split)  # each observation with the previous row's actions
    assert rows["obs"].flatten().tolist() == [1.0, 2.0, 1.5, 2.5]
    assert rows["actions"].flatten().tolist() == pytest.approx([0.4, 0.1, 0.2, 0.3])

"""Binary and ranking feedback on the diffusion adapter: K rows share one (t, noise) draw; a few steps train."""

from __future__ import annotations

import pytest
import torch

from prefopt.feedback.data import TensorRankings, TensorSamples, concatenate_ranked
from prefopt.feedback.module import BinaryFeedbackModule, RankingFeedbackModule, draw_groups
from tests.toy import loader, trainer

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from prefopt.adapters.diffusion import DiffusionPolicy  # noqa: E402
from tests.test_diffusion import tiny_unet  # noqa: E402


def policy():
    return DiffusionPolicy(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))


def rankings(groups=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorRankings({"images": torch.rand(groups, k, 1, 8, 8, generator=g) * 2 - 1},
                          {"class_labels": torch.arange(groups) % 3})


def test_the_k_samples_of_a_group_share_one_draw():
    samples, k = concatenate_ranked(rankings()[torch.arange(4)])
    draw = draw_groups(policy(), samples, torch.Generator().manual_seed(0), k)
    assert draw.timesteps.shape == (12,)
    for j in (1, 2):
        assert torch.equal(draw.timesteps[:4], draw.timesteps[4 * j: 4 * j + 4])
        assert torch.equal(draw.noise[:4], draw.noise[4 * j: 4 * j + 4])
    assert not torch.equal(draw.noise[0], draw.noise[1])
    single = draw_groups(policy(), {"images": samples["images"][:5], "class_labels": samples["class_labels"][:5]},
                         torch.Generator().manual_seed(0), 1)
    assert single.timesteps.shape == (5,) and not torch.equal(single.noise[0], single.noise[1])


def test_group_two_is_the_pair_draw_bit_for_bit():
    samples, _ = concatenate_ranked(rankings(k=2)[torch.arange(4)])
    p = policy()
    pair = p.draw(samples, torch.Generator().manual_seed(3))
    two = p.draw(samples, torch.Generator().manual_seed(3), group=2)
    assert torch.equal(pair.timesteps, two.timesteps) and torch.equal(pair.noise, two.noise)


@pytest.mark.parametrize("kind", ["binary", "ranking"])
def test_diffusion_trains_on_each_kind(kind):
    if kind == "binary":
        g = torch.Generator().manual_seed(0)
        data = TensorSamples({"images": torch.rand(8, 1, 8, 8, generator=g) * 2 - 1},
                             {"class_labels": torch.arange(8) % 3}, torch.arange(8) % 2)
        module = BinaryFeedbackModule(policy(), loss={"loss_type": "kto", "beta": 100.0})
    else:
        data = rankings(groups=8)
        module = RankingFeedbackModule(policy(), loss={"loss_type": "plackett_luce", "beta": 100.0})
    before = {k: v.clone() for k, v in module.policy.network.state_dict().items()}
    trainer(max_epochs=1).fit(module, loader(data, batch_size=4))
    after = module.policy.network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in module.reference.network.state_dict().items())

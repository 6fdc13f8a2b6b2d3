"""Control adapter: segment log-likelihoods checked against hand computations."""

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn
from torch.distributions import Normal

from prefopt.adapters.control import CategoricalMLP, ControlPolicy, GaussianMLP, policy_network_for
from prefopt.errors import PrefoptError


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def _tiny_gaussian(w=0.5, b=0.1, log_std=-0.3, squash=True):
    """A 1-d obs -> 1-d action Gaussian whose mean is ``w * s + b`` (no hidden layer)."""
    net = GaussianMLP(1, 1, hidden=(), log_std=log_std, low=[-2.0] if squash else None,
                      high=[2.0] if squash else None)
    with torch.no_grad():
        net.body[0].weight.fill_(w)
        net.body[0].bias.fill_(b)
    return net


def _squashed_logp(a, s, w=0.5, b=0.1, log_std=-0.3, half=2.0):
    """log pi(a|s) for a = half * tanh(u), u ~ N(w s + b, exp(log_std)): Gaussian density of u minus
    log |da/du| = log(half) + log(1 - tanh(u)^2)."""
    y = a / half
    u = math.atanh(y)
    return _normal_logpdf(u, w * s + b, math.exp(log_std)) - math.log(half) - math.log(1 - y * y)


def test_squashed_gaussian_step_log_prob_matches_hand_computation():
    net = _tiny_gaussian()
    obs = torch.tensor([[[0.3], [-1.2]]])
    actions = torch.tensor([[[1.0], [-0.4]]])
    got = ControlPolicy(net).log_likelihood(net, {"obs": obs, "actions": actions})
    want = _squashed_logp(1.0, 0.3) + _squashed_logp(-0.4, -1.2)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, abs=1e-5)


def test_action_on_or_beyond_the_bound_is_clipped_inside_and_finite():
    net = _tiny_gaussian()
    obs = torch.zeros(1, 3, 1)
    actions = torch.tensor([[[2.0], [2.5], [-2.0]]])  # on the upper bound, beyond it, on the lower bound
    policy = ControlPolicy(net)
    logp = policy.step_log_probs(net, obs, actions)[0]
    assert torch.isfinite(logp).all()
    # the action is moved eps (1e-6 of the half-width 2) inside the bound; in float32 that is:
    inside = float(np.float32(2.0 - 2.0e-6))
    assert logp[0].item() == pytest.approx(_squashed_logp(inside, 0.0), rel=1e-4)
    assert logp[1].item() == logp[0].item()  # beyond the bound scores as the bound
    assert logp[2].item() == pytest.approx(_squashed_logp(-inside, 0.0), rel=1e-4)
    # and gradients through a clipped action stay finite
    net.zero_grad()
    policy.log_likelihood(net, {"obs": obs, "actions": actions}).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_unsquashed_gaussian_is_a_plain_diagonal_gaussian():
    net = _tiny_gaussian(squash=False)
    obs, actions = torch.tensor([[[2.0]]]), torch.tensor([[[5.0]]])  # no bounds: 5 is an ordinary action
    got = ControlPolicy(net).log_likelihood(net, {"obs": obs, "actions": actions}).item()
    assert got == pytest.approx(_normal_logpdf(5.0, 0.5 * 2.0 + 0.1, math.exp(-0.3)), abs=1e-5)


def test_discounting_alpha_and_masking_of_a_gaussian_segment():
    net = _tiny_gaussian()
    obs = torch.tensor([[[0.1], [0.2], [0.3]], [[-0.5], [0.7], [9.0]]])
    actions = torch.tensor([[[0.5], [-1.0], [1.5]], [[0.2], [0.9], [-1.9]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the last step of row 2 is padding
    gamma, alpha = 0.9, 2.0
    got = ControlPolicy(net, gamma=gamma, alpha=alpha).log_likelihood(
        net, {"obs": obs, "actions": actions, "mask": mask})
    want = []
    for row in range(2):
        total = 0.0
        for t in range(3):
            if mask[row, t]:
                total += gamma ** t * _squashed_logp(actions[row, t, 0].item(), obs[row, t, 0].item())
        want.append(alpha * total)
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    lengths = ControlPolicy(net).lengths({"obs": obs, "actions": actions, "mask": mask})
    assert lengths.tolist() == [3.0, 2.0]


def _tiny_categorical():
    """Logits ``[s, 0, -s]`` for a 1-d observation ``s``."""
    net = CategoricalMLP(1, 3, hidden=())
    with torch.no_grad():
        net.body[0].weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
        net.body[0].bias.zero_()
    return net


def _categorical_logp(a, s):
    logits = [s, 0.0, -s]
    return logits[a] - math.log(sum(math.exp(x) for x in logits))


def test_categorical_segment_log_likelihood_with_mask_and_discount():
    net = _tiny_categorical()
    obs = torch.tensor([[[1.0], [0.5], [-2.0]], [[0.0], [3.0], [1.0]]])
    actions = torch.tensor([[0, 2, 1], [1, 0, 2]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    gamma = 0.5
    got = ControlPolicy(net, gamma=gamma).log_likelihood(net, {"obs": obs, "actions": actions, "mask": mask})
    want = [sum(gamma ** t * _categorical_logp(int(actions[0, t]), obs[0, t, 0].item()) for t in range(3)),
            _categorical_logp(1, 0.0)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_padding_values_never_reach_the_result():
    net = _tiny_categorical()
    policy = ControlPolicy(net)
    obs = torch.tensor([[[1.0], [0.0]]])
    mask = torch.tensor([[True, False]])
    a = policy.log_likelihood(net, {"obs": obs, "actions": torch.tensor([[2, 0]]), "mask": mask})
    b = policy.log_likelihood(net, {"obs": obs, "actions": torch.tensor([[2, 1]]), "mask": mask})
    assert a.item() == b.item() == pytest.approx(_categorical_logp(2, 1.0), abs=1e-6)


def test_deterministic_actions():
    policy = ControlPolicy(_tiny_gaussian(w=0.5, b=0.1))
    act = policy.act(torch.tensor([[1.0]]), deterministic=True)
    assert act.item() == pytest.approx(2.0 * math.tanh(0.6), abs=1e-6)  # the squashed mean
    cat = ControlPolicy(_tiny_categorical())
    assert cat.act(torch.tensor([[2.0], [-2.0]]), deterministic=True).tolist() == [0, 2]


def test_mean_bound_limits_the_pre_tanh_mean():
    net = GaussianMLP(1, 1, hidden=(), low=[-1.0], high=[1.0], mean_bound=3.0)
    with torch.no_grad():
        net.body[0].weight.fill_(0.0)
        net.body[0].bias.fill_(100.0)
    loc = net(torch.zeros(1, 1)).base_dist.mean
    assert loc.item() == pytest.approx(3.0 * math.tanh(100.0 / 3.0), abs=1e-5)
    with pytest.raises(PrefoptError, match="mean_bound"):
        GaussianMLP(1, 1, mean_bound=0.0)


class _UserNet(nn.Module):
    """A user's network returning a per-dimension Normal (not Independent)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, obs):
        return Normal(obs[..., :2], self.scale.expand(2))


def test_any_distribution_network_can_be_wrapped():
    policy = ControlPolicy(_UserNet())
    obs = torch.tensor([[[0.0, 1.0], [1.0, -1.0]]])
    actions = torch.tensor([[[0.5, 1.0], [1.0, 0.0]]])
    got = policy.log_likelihood(policy.network, {"obs": obs, "actions": actions}).item()
    want = sum(_normal_logpdf(actions[0, t, d].item(), obs[0, t, d].item(), 0.5) for t in range(2) for d in range(2))
    assert got == pytest.approx(want, abs=1e-5)


def test_bad_inputs_raise_clear_errors():
    class NotADistribution(nn.Module):
        def forward(self, obs):
            return obs

    with pytest.raises(PrefoptError, match="Distribution"):
        ControlPolicy(NotADistribution()).log_likelihood(
            NotADistribution(), {"obs": torch.zeros(1, 2, 1), "actions": torch.zeros(1, 2, 1)})
    with pytest.raises(PrefoptError, match=r"\[N, H, obs_dim\]"):
        ControlPolicy(_tiny_gaussian()).log_likelihood(_tiny_gaussian(), {"obs": torch.zeros(2, 1),
                                                                          "actions": torch.zeros(2, 1)})
    with pytest.raises(PrefoptError, match="gamma"):
        ControlPolicy(_tiny_gaussian(), gamma=0.0)
    with pytest.raises(PrefoptError, match="alpha"):
        ControlPolicy(_tiny_gaussian(), alpha=-1.0)


def test_policy_network_for_reads_the_spaces():
    box = spaces.Box(-1.0, 1.0, (3,))
    net = policy_network_for(box, spaces.Box(-2.0, 2.0, (2,)), hidden=(8,))
    assert isinstance(net, GaussianMLP) and net.squash and net.high.tolist() == [2.0, 2.0]
    assert not policy_network_for(box, spaces.Box(-np.inf, np.inf, (2,)), hidden=(8,)).squash
    assert not policy_network_for(box, spaces.Box(-2.0, 2.0, (2,)), hidden=(8,), squash=False).squash
    cat = policy_network_for(box, spaces.Discrete(4), hidden=(8,))
    assert isinstance(cat, CategoricalMLP) and cat(torch.zeros(1, 3)).logits.shape == (1, 4)
    with pytest.raises(PrefoptError, match="observation space"):
        policy_network_for(spaces.Discrete(3), spaces.Discrete(2))
    with pytest.raises(PrefoptError, match="action space"):
        policy_network_for(box, spaces.MultiDiscrete([2, 2]))

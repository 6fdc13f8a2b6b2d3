"""Robot-control policies: the log-likelihood of a trajectory segment under a stochastic policy.

A segment's log-likelihood is ``sum_t gamma^t * log pi(a_t | s_t)`` over its real steps (a boolean
``mask`` marks padding), optionally scaled by CPL's ``alpha``. Any ``nn.Module`` that maps observations
``[..., obs_dim]`` to a ``torch.distributions.Distribution`` over actions can be wrapped; two are shipped:
:class:`GaussianMLP` (diagonal Gaussian, optionally tanh-squashed into the action bounds) and
:class:`CategoricalMLP` (``Discrete`` action spaces).

Samples are dicts with ``obs`` ``[N, H, obs_dim]``, ``actions`` ``[N, H, act_dim]`` (or ``[N, H]`` integer
actions) and an optional ``mask`` ``[N, H]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.distributions import (AffineTransform, Categorical, Distribution, Independent, Normal, TanhTransform,
                                 TransformedDistribution)

from prefopt.errors import PrefoptError
from prefopt.policy import PreferencePolicy


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``Linear`` layers of the given sizes with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


# The distributions are built with validate_args=False: torch's argument validation reads tensor values (a
# host-device sync on every call) and raises on a NaN parameter. Without it a NaN parameter gives a NaN
# log-likelihood, which the training module's non-finite check reports, naming the batch.


class SquashedNormal(TransformedDistribution):
    """A diagonal Gaussian pushed through tanh and an affine map onto ``[low, high]``.

    ``log_prob`` of an action on (or beyond) the boundary, where the density is infinite, is computed for
    the action moved ``eps`` (relative to the half-width) inside the bounds, so it stays finite.
    """

    def __init__(self, loc, scale, low, high, eps: float = 1e-6):
        self.low, self.high, self.eps = low, high, eps
        half = (high - low) / 2
        super().__init__(Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False),
                         [TanhTransform(), AffineTransform(low + half, half, event_dim=1)], validate_args=False)

    def log_prob(self, value):
        margin = (self.high - self.low) / 2 * self.eps
        return super().log_prob(torch.max(torch.min(value, self.high - margin), self.low + margin))

    @property
    def mean(self):  # the squashed mean action (the mode of the base Gaussian pushed through)
        return self.transforms[1](torch.tanh(self.base_dist.mean))


class GaussianMLP(nn.Module):
    """obs -> diagonal Gaussian over actions, with a state-independent learned log standard deviation.

    With ``low``/``high`` bounds the Gaussian is tanh-squashed into them (:class:`SquashedNormal`);
    without, it is an unbounded ``Independent(Normal)``. ``mean_bound`` softly limits the Gaussian's mean
    to ``(-mean_bound, mean_bound)`` (``loc = b tanh(raw / b)``): with a squash, a mean far beyond the
    tanh's saturation makes every sample the same boundary action, whose pre-tanh value float32 cannot
    recover, so neither cloning nor DPO should be able to push it there.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64), log_std: float = -0.5,
                 low: Sequence[float] | None = None, high: Sequence[float] | None = None,
                 mean_bound: float | None = None):
        super().__init__()
        if mean_bound is not None and not float(mean_bound) > 0:
            raise PrefoptError(f"mean_bound={mean_bound!r} must be > 0 (or None for no bound)")
        self.mean_bound = float(mean_bound) if mean_bound is not None else None
        self.body = mlp([obs_dim, *hidden, act_dim])
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std)))
        squash = low is not None and high is not None
        self.squash = squash
        self.register_buffer("low", torch.as_tensor(low if squash else [-1.0] * act_dim, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high if squash else [1.0] * act_dim, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> Distribution:
        loc = self.body(obs)
        if self.mean_bound is not None:
            loc = self.mean_bound * torch.tanh(loc / self.mean_bound)
        scale = self.log_std.clamp(-10.0, 2.0).exp().expand_as(loc)
        if self.squash:
            return SquashedNormal(loc, scale, self.low, self.high)
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


class CategoricalMLP(nn.Module):
    """obs -> categorical distribution over ``n_actions`` discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.body = mlp([obs_dim, *hidden, n_actions])

    def forward(self, obs: torch.Tensor) -> Distribution:
        return Categorical(logits=self.body(obs), validate_args=False)


def policy_network_for(observation_space, action_space, hidden: Sequence[int] = (64, 64),
                       log_std: float = -0.5, squash: bool = True, mean_bound: float | None = None) -> nn.Module:
    """A policy network for gymnasium spaces: Box observations; Box or Discrete actions.

    A bounded Box action space gets a tanh-squashed :class:`GaussianMLP` (``squash=True``), an unbounded
    one (or ``squash=False``) a plain diagonal Gaussian; ``Discrete`` gets a :class:`CategoricalMLP`.
    """
    from gymnasium import spaces

    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise PrefoptError(f"observation space {observation_space} is not supported; allowed: a flat Box "
                           "(wrap the env with gymnasium.wrappers.FlattenObservation)")
    obs_dim = observation_space.shape[0]
    if isinstance(action_space, spaces.Discrete):
        return CategoricalMLP(obs_dim, int(action_space.n), hidden)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        bounded = squash and bool(action_space.is_bounded("both"))
        return GaussianMLP(obs_dim, action_space.shape[0], hidden, log_std,
                           low=action_space.low.tolist() if bounded else None,
                           high=action_space.high.tolist() if bounded else None, mean_bound=mean_bound)
    raise PrefoptError(f"action space {action_space} is not supported; allowed: Discrete or a flat Box")


class ControlPolicy(PreferencePolicy):
    """Discounted segment log-likelihood of a distribution-valued policy network.

    Args:
        network: ``obs -> torch.distributions.Distribution`` over actions.
        gamma: per-step discount of the log-likelihood (``1`` weighs every step alike); step ``t`` counts
            from the start of the segment.
        alpha: scale of the whole sum (CPL's temperature lives here or in the loss's ``beta``; with both,
            the loss sees ``beta * alpha * sum_t gamma^t log pi``).

    What a subclass may change: :meth:`step_log_probs` (e.g. to feed an observation history or a
    recurrent state to the network); the discounting and masking stay in :meth:`log_likelihood`.
    """

    lora_targets = ("body.0", "body.2")
    fsdp_unit = False  # the network returns a Distribution, whose tensors FSDP's backward hooks cannot see
    sample_conditions = ("obs", "mask")  # what a segment's actions are judged given (KTO's mismatched rows)

    def __init__(self, network: nn.Module, gamma: float = 1.0, alpha: float = 1.0):
        super().__init__(network)
        if not 0.0 < gamma <= 1.0:
            raise PrefoptError(f"gamma={gamma!r} must be in (0, 1]")
        if not float(alpha) > 0.0:
            raise PrefoptError(f"alpha={alpha!r} must be > 0")
        self.gamma, self.alpha = float(gamma), float(alpha)

    def step_log_probs(self, network: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(a_t | s_t)`` per step, shape ``[N, H]``.

        A network whose distribution scores each action dimension separately (a plain ``Normal`` rather
        than ``Independent(Normal, 1)``) returns ``[N, H, act_dim]``; the dimensions are summed.
        """
        dist = network(obs)
        if not isinstance(dist, Distribution):
            raise PrefoptError(f"{type(network).__name__} returned {type(dist).__name__}; a control policy network "
                               "must return a torch.distributions.Distribution over actions")
        logp = dist.log_prob(actions)
        if logp.dim() > 2:
            logp = logp.flatten(2).sum(-1)
        return logp

    def log_likelihood(self, network: nn.Module, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        """``alpha * sum_t gamma^t log pi(a_t | s_t)`` over each segment's real steps, shape ``[N]``.

        Subclasses change the per-step term through :meth:`step_log_probs`, not this method, so that the
        discounting and the padding mask stay the same for every control policy.
        """
        obs, actions = samples["obs"], samples["actions"]
        if obs.dim() != 3:
            raise PrefoptError(f"control samples: 'obs' has shape {tuple(obs.shape)}; expected [N, H, obs_dim] "
                               "(a segment of H steps per sample)")
        logp = self.step_log_probs(network, obs, actions)
        if logp.shape != obs.shape[:2]:
            raise PrefoptError(f"control policy: per-step log-probs have shape {tuple(logp.shape)}, expected "
                               f"{tuple(obs.shape[:2])}; check the 'actions' shape {tuple(actions.shape)}")
        horizon = logp.shape[-1]
        weights = self.gamma ** torch.arange(horizon, device=logp.device, dtype=logp.dtype)
        mask = samples.get("mask")
        if mask is not None:
            # where() rather than a product: a padded step's log-prob may be -inf or NaN
            logp = torch.where(mask.bool(), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        return self.alpha * (logp * weights).sum(-1)

    def lengths(self, samples: Mapping[str, Any]) -> torch.Tensor:
        """Real steps per segment ``[N]`` (the mask's count, or ``H``): what length-normalized losses divide by."""
        mask = samples.get("mask")
        if mask is None:
            obs = samples["obs"]
            return torch.full(obs.shape[:1], obs.shape[1], device=obs.device, dtype=obs.dtype)
        return mask.sum(-1).to(torch.float32)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """An action for each observation: a sample, or the distribution's mean/mode if deterministic."""
        dist = self.network(obs)
        if not deterministic:
            return dist.sample()
        if isinstance(dist, Categorical):
            return dist.probs.argmax(-1)
        try:
            return dist.mean
        except NotImplementedError:  # e.g. a user's TransformedDistribution: fall back to the mode
            return dist.mode


__all__ = ["CategoricalMLP", "ControlPolicy", "GaussianMLP", "SquashedNormal", "mlp", "policy_network_for"]

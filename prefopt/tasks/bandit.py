"""A contextual bandit: the smallest domain, for smoke tests and quick ablations (seconds on a CPU).

Context ``x ~ N(0, I)``; action ``a`` in ``[-1, 1]^act_dim``; true reward ``-||a - tanh(W x)||^2`` with a
fixed random ``W``. The base policy is an untrained tanh-Gaussian MLP. Pairs are two actions sampled from
the current policy for one context, labelled by a scripted teacher. It is a control problem with
segments of length one, so it uses the control adapter unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from prefopt.adapters.control import ControlPolicy, GaussianMLP
from prefopt.data.pairs import TensorPairs
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.feedback.data import Groups
from prefopt.metrics import mean_and_se, win_rate
from prefopt.tasks.base import Task


class BanditTask(Task):
    name = "bandit"

    def __init__(self, obs_dim: int = 4, act_dim: int = 2, hidden: Sequence[int] = (32, 32),
                 num_pairs: int = 512, num_eval: int = 512, batch_size: int = 64, rounds: int = 1,
                 teacher: Mapping[str, Any] | None = None, seed: int = 0):
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, tuple(hidden)
        self.num_pairs, self.num_eval, self.batch_size, self.rounds = num_pairs, num_eval, batch_size, rounds
        self.teacher = ScriptedTeacher(**dict(teacher or {}), seed=seed)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.weights = torch.randn(obs_dim, act_dim, generator=generator)

    def reward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return -((actions - torch.tanh(obs @ self.weights)) ** 2).sum(-1)

    def contexts(self, n: int, stream: int) -> torch.Tensor:
        return torch.randn(n, self.obs_dim, generator=torch.Generator().manual_seed(self.seed * 7919 + stream))

    def build_policy(self) -> ControlPolicy:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            network = GaussianMLP(self.obs_dim, self.act_dim, self.hidden, log_std=-0.5,
                                  low=[-1.0] * self.act_dim, high=[1.0] * self.act_dim)
        return ControlPolicy(network)

    def pairs(self, policy: ControlPolicy, round_index: int) -> TensorPairs:
        obs = self.contexts(self.num_pairs, stream=1 + round_index)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 31 + round_index)
            first, second = policy.act(obs), policy.act(obs)
        labels = self.teacher.label(self.reward(obs, first), self.reward(obs, second))
        ordered = to_pairs({"actions": first[:, None]}, {"actions": second[:, None]}, labels)
        return TensorPairs.from_ordered(ordered, shared={"obs": obs[:, None]})

    def groups(self, policy: ControlPolicy, round_index: int, size: int) -> Groups:
        """``size`` actions of the policy per context, ``2 * num_pairs`` actions in all (binary, ranking, scores)."""
        obs = self.contexts(max(1, 2 * self.num_pairs // size), stream=1 + round_index)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 31 + round_index)
            actions = torch.stack([policy.act(obs) for _ in range(size)], dim=1)  # [G, K, act_dim]
        return Groups({"actions": actions[:, :, None]}, {"obs": obs[:, None]}, self.reward(obs[:, None], actions))

    @torch.no_grad()
    def evaluate(self, reference: ControlPolicy, policy: ControlPolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        obs = self.contexts(self.num_eval, stream=10_000)
        ref_reward = self.reward(obs, reference.act(obs, deterministic=True))
        pol_reward = self.reward(obs, policy.act(obs, deterministic=True))
        (ref_mean, ref_se), (pol_mean, pol_se) = mean_and_se(ref_reward), mean_and_se(pol_reward)
        return {"reference": {"reward_mean": ref_mean, "reward_se": ref_se},
                "policy": {"reward_mean": pol_mean, "reward_se": pol_se},
                "win_rate": win_rate(pol_reward, ref_reward)["win_rate"]}

"""Judging a control policy against the reference: true episodic return, head to head on the same reset
seeds, and the teacher's agreement with the policy's implicit reward on held-out pairs."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from prefopt.adapters.control import ControlPolicy
from prefopt.data.pairs import TensorPairs
from prefopt.metrics import mean_and_se, win_rate
from prefopt.policy import split_pairs
from prefopt.tasks.control.rollouts import policy_actor, rollout


def episode_returns(envs, policy: ControlPolicy, seeds: Sequence[int], deterministic: bool, torch_seed: int,
                    desc: str) -> torch.Tensor:
    """True return of one episode per reset seed (mean actions when ``deterministic``)."""
    return rollout(envs, policy_actor(policy, deterministic), seeds, desc=desc, torch_seed=torch_seed).returns


def compare_returns(reference_returns: torch.Tensor, policy_returns: torch.Tensor) -> dict[str, Any]:
    """Mean and standard error of each side's returns, the head-to-head win rate on the same seeds (ties
    count half), and the improvement with its unpaired and paired standard errors."""
    (ref_mean, ref_se), (pol_mean, pol_se) = mean_and_se(reference_returns), mean_and_se(policy_returns)
    diff_mean, diff_se_paired = mean_and_se(policy_returns - reference_returns)
    diff_se = math.sqrt(ref_se ** 2 + pol_se ** 2)
    return {
        "reference": {"return_mean": ref_mean, "return_se": ref_se},
        "policy": {"return_mean": pol_mean, "return_se": pol_se},
        "win_rate": win_rate(policy_returns, reference_returns)["win_rate"],
        "improvement": diff_mean,
        "improvement_se": diff_se,
        "improvement_se_paired": diff_se_paired,
        "beats_reference_by_2se": bool(diff_mean > 2 * diff_se),
    }


@torch.no_grad()
def teacher_agreement(pairs: TensorPairs | None, reference: ControlPolicy, policy: ControlPolicy) -> dict[str, float]:
    """How often the teacher's label agrees with the implicit reward ``log pi - log pi_ref``
    (``teacher_agreement``, DPO's implicit-reward accuracy) and with ``log pi`` alone
    (``teacher_agreement_logp``, CPL's), on the non-tied held-out pairs."""
    if pairs is None or len(pairs) == 0:
        return {}
    keep = ~pairs.tie
    if not keep.any():
        return {}
    samples = policy.concatenate({**{f"chosen_{k}": v[keep] for k, v in pairs.chosen.items()},
                                  **{f"rejected_{k}": v[keep] for k, v in pairs.rejected.items()}})
    logps = policy.log_likelihood(policy.network, samples)
    ref = reference.log_likelihood(reference.network, samples)
    (c, r), (rc, rr) = split_pairs(logps), split_pairs(ref)
    return {"teacher_agreement": float(((c - rc) > (r - rr)).double().mean()),
            "teacher_agreement_logp": float((c > r).double().mean()),
            "heldout_pairs": int(keep.sum())}


__all__ = ["compare_returns", "episode_returns", "teacher_agreement"]

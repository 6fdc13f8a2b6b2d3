"""Pairs of trajectory segments from rollouts (``pairing``).

* ``branch`` (:func:`branch_pairs`): the two episodes of a pair share a reset seed and their actions up to a
  random step ``t0``; the pair is their segments ``[t0, t0 + H)``, which start from the same state.
* ``same_start`` / ``random`` (:func:`window_pairs`): whole episodes cut into windows ``[kH, (k+1)H)``
  (:func:`split_windows`), paired by episode seed and window, or at random (:func:`pair_windows`).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from prefopt.errors import PrefoptError
from prefopt.tasks.control.adapt import BranchingImpossible
from prefopt.tasks.control.rollouts import Rollouts, rollout


def split_windows(rollouts: Rollouts, horizon: int) -> dict[str, torch.Tensor]:
    """Cut every episode into windows ``[kH, (k+1)H)``: tensors ``[E, K, H, ...]`` and ``mask [E, K, H]``."""
    e, t = rollouts.mask.shape
    k = max(1, math.ceil(t / horizon))
    pad = k * horizon - t

    def cut(x):
        x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, pad]) if pad else x
        return x.reshape(e, k, horizon, *x.shape[2:])

    return {"obs": cut(rollouts.obs), "actions": cut(rollouts.actions), "rewards": cut(rollouts.rewards),
            "mask": cut(rollouts.mask)}


def pair_windows(windows: Mapping[str, torch.Tensor], pairing: str, num_pairs: int,
                 generator: torch.Generator, min_steps: int = 1) -> tuple[dict, dict]:
    """Two aligned sets of windows ``[P, H, ...]`` (items a and b of each pair)."""
    mask = windows["mask"]
    e, k = mask.shape[:2]
    real = mask.sum(-1) >= min_steps  # [E, K]
    if pairing == "same_start":
        first, second = torch.arange(0, e - 1, 2), torch.arange(1, e, 2)
        a_ep = first[:, None].expand(-1, k)
        b_ep = second[:, None].expand(-1, k)
        win = torch.arange(k)[None, :].expand(first.shape[0], -1)
        ok = real[a_ep, win] & real[b_ep, win]
        a_idx, b_idx = (a_ep[ok], win[ok]), (b_ep[ok], win[ok])
    else:
        flat = real.flatten().nonzero().flatten()
        if flat.numel() < 2:
            raise PrefoptError("pairing=random needs at least 2 windows with real steps")
        i = flat[torch.randint(0, flat.numel(), (num_pairs,), generator=generator)]
        j = flat[(torch.searchsorted(flat, i) + torch.randint(1, flat.numel(), (num_pairs,), generator=generator))
                 % flat.numel()]
        a_idx, b_idx = (i // k, i % k), (j // k, j % k)
    count = min(num_pairs, a_idx[0].numel())
    pick = torch.randperm(a_idx[0].numel(), generator=generator)[:count].sort().values
    a = {name: value[a_idx[0][pick], a_idx[1][pick]] for name, value in windows.items()}
    b = {name: value[b_idx[0][pick], b_idx[1][pick]] for name, value in windows.items()}
    return a, b


def window_pairs(envs, act, num_pairs: int, seed_base: int, generator: torch.Generator, desc: str, *, pairing: str,
                 segment_length: int, episode_limit: int, collect_steps: int | None) -> tuple[dict, dict]:
    """``same_start``/``random``: whole episodes cut into windows ``[kH, (k+1)H)``, then paired."""
    per_episode = max(1, math.ceil(episode_limit / segment_length))
    episodes = 2 * math.ceil(num_pairs / per_episode)
    episodes = envs.num_envs * math.ceil(episodes / envs.num_envs)
    seeds = [seed_base + (i // 2 if pairing == "same_start" else i) for i in range(episodes)]
    data = rollout(envs, act, seeds, collect_steps, desc=desc, torch_seed=seed_base)
    return pair_windows(split_windows(data, segment_length), pairing, num_pairs, generator)


def branch_pairs(envs, act, num_pairs: int, seed_base: int, generator: torch.Generator, desc: str, *,
                 segment_length: int, episode_limit: int, explore_steps: int | None, env_id: str) -> tuple[dict, dict]:
    """``branch``: the two episodes of a pair share a reset seed and, until step ``t0``, their actions;
    the pair is their segments ``[t0, t0 + H)``, which start from one state (in a deterministic env).

    ``act`` is ``(obs, step) -> actions``, or with ``explore_steps`` a tuple ``(sampled, mean)`` of two such
    functions: draws in ``[t0, t0 + explore_steps)``, mean actions elsewhere."""
    horizon, limit = segment_length, episode_limit
    per_batch = envs.num_envs // 2
    count = per_batch * math.ceil(num_pairs / per_batch)
    # branch points sorted, so one batch of envs runs for about as long as its pairs need
    t0 = torch.randint(0, max(1, limit - horizon + 1), (count,), generator=generator).sort().values
    parts_a, parts_b = [], []
    for start in range(0, count, per_batch):
        branch = t0[start:start + per_batch]
        steps = np.repeat(branch.numpy(), 2)

        def act_shared(obs, step, steps=steps):
            if isinstance(act, tuple):  # explore_steps: draws in [t0, t0 + k), mean actions elsewhere
                action, mean = act[0](obs, step), act[1](obs, step)
                offset = step - steps
                explore = (offset >= 0) & (offset < explore_steps)
                return np.where(explore.reshape((-1,) + (1,) * (action.ndim - 1)), action, mean)
            action = act(obs, step)
            prefix = steps[0::2] > step
            if prefix.any():
                second = action[1::2]
                second[prefix] = action[0::2][prefix]
            return action

        seeds = [seed_base + start + i // 2 for i in range(2 * per_batch)]
        data = rollout(envs, act_shared, seeds, int(branch.max()) + horizon, desc=desc,
                       torch_seed=seed_base + start)
        index = branch[:, None] + torch.arange(horizon)  # [P, H]

        def window(tensor, first):
            total = int(index.max()) + 1
            if tensor.shape[1] < total:  # every episode ended before some pair's window
                pad = [0, 0] * (tensor.dim() - 2) + [0, total - tensor.shape[1]]
                tensor = torch.nn.functional.pad(tensor, pad)
            return tensor[first::2][torch.arange(index.shape[0])[:, None], index]

        a = {k: window(getattr(data, k), 0) for k in ("obs", "actions", "rewards", "mask")}
        b = {k: window(getattr(data, k), 1) for k in ("obs", "actions", "rewards", "mask")}
        both = a["mask"][:, 0] & b["mask"][:, 0]
        if both.any() and not torch.allclose(a["obs"][both, 0], b["obs"][both, 0], atol=1e-5, rtol=1e-5):
            raise BranchingImpossible(
                f"pairing=branch: {env_id} is not deterministic given its reset seed and actions (two "
                "episodes with the same seed and the same actions reached different states)")
        parts_a.append({k: v[both] for k, v in a.items()})
        parts_b.append({k: v[both] for k, v in b.items()})
    a = {k: torch.cat([p[k] for p in parts_a]) for k in parts_a[0]}
    b = {k: torch.cat([p[k] for p in parts_b]) for k in parts_b[0]}
    return a, b


__all__ = ["branch_pairs", "pair_windows", "split_windows", "window_pairs"]

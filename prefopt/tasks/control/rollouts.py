"""Episodes on ``gymnasium.make_vec`` environments, one per reset seed, padded into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from prefopt.adapters.control import ControlPolicy
from prefopt.errors import PrefoptError


@dataclass
class Rollouts:
    """Episodes padded to the longest: ``obs [E, T, obs_dim]``, ``actions [E, T, act_dim]`` (``[E, T]``
    int64 for ``Discrete``), ``rewards [E, T]``, ``mask [E, T]`` (True = a real step), ``seeds [E]``."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    seeds: torch.Tensor

    @property
    def returns(self) -> torch.Tensor:
        return (self.rewards.double() * self.mask).sum(-1)

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def make_envs(env_id: str, num_envs: int, env_kwargs: Mapping[str, Any] | None = None,
              vectorization_mode: str = "sync"):
    """``gymnasium.make_vec`` with a clear error for an unknown env id or bad kwargs."""
    import gymnasium as gym

    try:
        return gym.make_vec(env_id, num_envs=int(num_envs), vectorization_mode=vectorization_mode,
                            **dict(env_kwargs or {}))
    except gym.error.Error as err:
        raise PrefoptError(f"env_id={env_id!r} (env_kwargs={dict(env_kwargs or {})}): gymnasium cannot make it: "
                           f"{err}") from None
    except TypeError as err:
        raise PrefoptError(f"env_kwargs={dict(env_kwargs or {})} for {env_id!r}: {err}") from None


def rollout(envs, act: Callable[[np.ndarray, int], np.ndarray], seeds: Sequence[int],
            max_steps: int | None = None, desc: str = "rollouts", torch_seed: int | None = None) -> Rollouts:
    """Run one episode per reset seed, ``envs.num_envs`` at a time, with ``act(obs, step) -> actions``.

    An episode ends at termination or truncation (or after ``max_steps`` steps); the vector env's
    autoreset steps after that are ignored. ``torch_seed`` seeds torch's RNG for the rollouts (restored
    afterwards), so sampled actions are reproducible.
    """
    with torch.random.fork_rng(devices=[]):
        if torch_seed is not None:
            torch.manual_seed(int(torch_seed))
        return _rollout(envs, act, seeds, max_steps, desc)


def _rollout(envs, act, seeds, max_steps, desc) -> Rollouts:
    n_envs = envs.num_envs
    space = envs.single_action_space
    discrete = hasattr(space, "n")
    bounded = not discrete and bool(np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)))
    batches = []
    bar = tqdm(total=len(seeds), desc=desc, unit="ep", leave=False, dynamic_ncols=True)
    for start in range(0, len(seeds), n_envs):
        chunk = list(seeds[start:start + n_envs])
        used = len(chunk)
        chunk = chunk + [chunk[-1]] * (n_envs - used)  # a short last batch fills the spare envs
        obs, _ = envs.reset(seed=[int(s) for s in chunk])
        alive = np.ones(n_envs, dtype=bool)
        rec: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "mask": []}
        steps = 0
        while alive[:used].any() and (max_steps is None or steps < max_steps):
            obs = np.asarray(obs, dtype=np.float32)
            action = np.asarray(act(obs, steps))
            # the env gets actions inside its bounds; the record keeps what the policy drew
            next_obs, reward, terminated, truncated, _ = envs.step(
                np.clip(action, space.low, space.high) if bounded else action)
            rec["obs"].append(obs)
            rec["actions"].append(action)
            rec["rewards"].append(np.where(alive, reward, 0.0))
            rec["mask"].append(alive.copy())
            alive &= ~(np.asarray(terminated) | np.asarray(truncated))
            obs, steps = next_obs, steps + 1
        batches.append({k: np.stack(v, axis=1)[:used] for k, v in rec.items()})
        bar.update(used)
    bar.close()
    horizon = max(b["obs"].shape[1] for b in batches)

    def cat(key, dtype):
        parts = [np.pad(b[key], [(0, 0), (0, horizon - b[key].shape[1])] + [(0, 0)] * (b[key].ndim - 2))
                 for b in batches]
        return torch.from_numpy(np.concatenate(parts).astype(dtype))

    return Rollouts(obs=cat("obs", np.float32), actions=cat("actions", np.int64 if discrete else np.float32),
                    rewards=cat("rewards", np.float32), mask=cat("mask", bool),
                    seeds=torch.as_tensor([int(s) for s in seeds], dtype=torch.int64))


def policy_actor(policy: ControlPolicy, deterministic: bool) -> Callable[[np.ndarray, int], np.ndarray]:
    """``(obs, step) -> actions`` for :func:`rollout` from a policy; sampling uses torch's global RNG, so
    seed it (``rollout(..., torch_seed=...)``) for reproducible rollouts."""

    @torch.no_grad()
    def act(obs: np.ndarray, step: int) -> np.ndarray:
        return policy.act(torch.from_numpy(obs), deterministic=deterministic).numpy()

    return act


__all__ = ["Rollouts", "make_envs", "policy_actor", "rollout"]

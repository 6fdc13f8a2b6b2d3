"""Robot control on gymnasium: DPO on teacher-labelled pairs of trajectory segments, end to end.

One round of the loop (``rounds > 1`` is iterative / online DPO)::

    current policy --rollouts on gymnasium.make_vec envs--> segments of H steps --teacher--> pairs
        --> DPO against the frozen reference --> evaluate (true episodic return) --> next round

**Base policy** (``base.kind``): ``bc`` clones a configurable behaviour policy (``base.behaviour`` names
one of :data:`BEHAVIOURS` or a ``"package.module:function"`` of your own; ``base.behaviours.<name>``
holds its options) from its rollouts: the mean action is regressed onto the behaviour's actions
(cross-entropy for ``Discrete``), and the Gaussian's standard deviation is set to ``exp(log_std)``, the
exploration noise of the later rollouts. ``checkpoint``
loads network weights (``base.path``: a ``.safetensors`` state dict as written by this task, or a
Lightning ``.ckpt`` of a prefopt run). ``scratch`` starts from a freshly initialised network. The
behaviour data and the cloned network are cached with :func:`prefopt.cache.cached_tensors`, keyed by
everything that determines them, so a sweep over losses or seeds builds them once.

**Pairs** (``pairing``): with ``branch`` (the default) the two episodes of a pair start from one reset
seed and take the same actions up to a random step ``t0``; the pair is their segments ``[t0, t0 + H)``,
which start from the same state, so the teacher compares only what the policy's draws did from there
(this needs an env that is deterministic given its seed and actions, which is checked). ``same_start``
runs the pair's episodes from one reset seed without shared actions and compares their windows
``[kH, (k+1)H)``; ``random`` pairs windows of all episodes at random. ``explore_steps`` (branch only)
draws just the first ``k`` steps from ``t0`` and takes mean actions elsewhere. The default ``gamma=0.9``
discounts the segment log-likelihood, which weighs the steps near ``t0``, where the two segments of a
branch pair still share their state (see the README section "Control domain" for why). The teacher
(:class:`~prefopt.data.teachers.ScriptedTeacher`) sees the per-step true rewards. ``offline``
replaces the first round's pairs with a user's dataset read by
:func:`prefopt.data.segments.load_segment_pairs` (``.npz`` or an HF ``datasets`` folder).

**Evaluation**: the reference (the policy before any training) and the trained policy each run
``eval_episodes`` episodes from the fixed reset seeds ``eval_seed + i``; reported are mean and standard
error of the true return, the win rate on the same seeds (ties count half), and the teacher's agreement
with the policy's implicit reward on held-out pairs (pairs of the reference's rollouts, labelled by the
teacher). ``returns.png`` plots the return per round (``prefopt.train`` writes the final weights to
``policy.safetensors``, loadable with ``base.kind=checkpoint``).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from prefopt.adapters.control import ControlPolicy, policy_network_for
from prefopt.cache import cached_tensors
from prefopt.data.pairs import TensorPairs
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.errors import PrefoptError, check_choice
from prefopt.policy import split_pairs
from prefopt.reference import eval_mode
from prefopt.tasks.base import Task, win_rate
from prefopt.tasks.bandit import mean_and_se

BASE_KINDS = ("bc", "checkpoint", "scratch")
PAIRINGS = ("branch", "same_start", "random")

# seed streams (kept far apart so that no two purposes share reset seeds)
_STREAM_BEHAVIOUR, _STREAM_HELDOUT, _STREAM_ROUND = 1 << 20, 2 << 20, 3 << 20


def _plain(value):
    """A Hydra ``DictConfig``/``ListConfig`` as plain Python containers (other values pass through)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ------------------------------------------------------------------------------------ behaviours
# A behaviour is ``f(obs [n, obs_dim] np.ndarray, rng: np.random.Generator, action_space, **options)``
# returning one action per row. ``action_space`` is the single env's space.

def random_behaviour(obs, rng, action_space, **options):
    """Uniformly random actions of the action space."""
    if options:
        raise PrefoptError(f"behaviour 'random' takes no options; found {sorted(options)}")
    n = obs.shape[0]
    if hasattr(action_space, "n"):
        return rng.integers(0, int(action_space.n), size=n)
    return rng.uniform(action_space.low, action_space.high, size=(n, *action_space.shape)).astype(np.float32)


def pendulum_energy(obs, rng, action_space, gain: float = 1.0, kp: float = 10.0, kd: float = 2.0,
                    top: float = 0.6, noise: float = 0.0, max_torque: float = 2.0):
    """Energy-pumping swing-up with a PD controller near the top, for ``Pendulum-v1``.

    With ``theta`` the angle from upright and ``w`` its rate, the pendulum's energy per unit inertia is
    ``E = w^2 / 2 + 15 cos(theta)`` (``15 = 3 g / 2 l``), 15 when upright at rest. Away from the top
    (``|theta| >= top``) the torque is ``gain * w * (15 - E)``; near it ``-(kp theta + kd w)``. Gaussian
    noise of std ``noise`` is added and the torque is clipped to ``max_torque`` and the action bounds.
    The defaults swing up almost optimally (return about -150); a small ``gain``, weak ``kp``/``kd`` or a
    low ``max_torque`` make a mediocre behaviour.
    """
    if obs.shape[1] != 3:
        raise PrefoptError(f"behaviour 'pendulum_energy' expects Pendulum's 3 observations (cos, sin, rate); "
                           f"found {obs.shape[1]}")
    cos, sin, rate = obs[:, 0], obs[:, 1], obs[:, 2]
    theta = np.arctan2(sin, cos)
    energy = 0.5 * rate ** 2 + 15.0 * cos
    torque = np.where(np.abs(theta) < top, -(kp * theta + kd * rate), gain * rate * (15.0 - energy))
    torque = np.clip(torque + noise * rng.standard_normal(torque.shape), -max_torque, max_torque)
    return np.clip(torque[:, None], action_space.low, action_space.high).astype(np.float32)


def cartpole_balance(obs, rng, action_space, k_angle: float = 1.0, k_rate: float = 0.5, k_pos: float = 0.0,
                     k_vel: float = 0.0, epsilon: float = 0.0):
    """Push right when ``k_angle theta + k_rate theta' + k_pos x + k_vel x' > 0``, for ``CartPole-v1``.

    With probability ``epsilon`` a random action is taken instead.
    """
    if obs.shape[1] != 4:
        raise PrefoptError(f"behaviour 'cartpole_balance' expects CartPole's 4 observations; found {obs.shape[1]}")
    score = k_pos * obs[:, 0] + k_vel * obs[:, 1] + k_angle * obs[:, 2] + k_rate * obs[:, 3]
    action = (score > 0).astype(np.int64)
    explore = rng.random(obs.shape[0]) < epsilon
    return np.where(explore, rng.integers(0, 2, size=obs.shape[0]), action)


BEHAVIOURS: dict[str, Callable[..., np.ndarray]] = {
    "random": random_behaviour,
    "pendulum_energy": pendulum_energy,
    "cartpole_balance": cartpole_balance,
}


def resolve_behaviour(kind: str) -> Callable[..., np.ndarray]:
    """A behaviour function from its name in :data:`BEHAVIOURS` or a ``"package.module:function"`` path."""
    if kind in BEHAVIOURS:
        return BEHAVIOURS[kind]
    if isinstance(kind, str) and ":" in kind:
        module_name, _, attr = kind.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise PrefoptError(f"base.behaviour.kind={kind!r}: cannot import it ({err})") from None
        if not callable(function):
            raise PrefoptError(f"base.behaviour.kind={kind!r} is not callable")
        return function
    raise PrefoptError(f"base.behaviour.kind={kind!r} is not supported; allowed: {', '.join(BEHAVIOURS)} "
                       "or 'package.module:function'")


# -------------------------------------------------------------------------------------- rollouts

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


# ------------------------------------------------------------------------------------ the task

class ControlTask(Task):
    """DPO for a gymnasium control policy; see the module docstring. Options (all in the config):

    Args:
        env_id, env_kwargs, num_envs, vectorization_mode: the environments (``gymnasium.make_vec``).
        hidden, log_std, squash, mean_bound: the policy network
            (:func:`~prefopt.adapters.control.policy_network_for`).
        gamma, alpha: discount and scale of the segment log-likelihood (:class:`ControlPolicy`).
        base: ``kind`` (bc, checkpoint, scratch), ``behaviour`` (a name), ``behaviours`` (options per name),
            ``episodes``, ``epochs``, ``lr``, ``batch_size``, ``seed`` (of the base build, shared across runs),
            ``path``.
        explore_steps: with ``pairing=branch``, draw only the first ``k`` steps of a segment and take the
            policy's mean action before and after them; the pair keeps those ``k`` steps (judged by the
            teacher on the whole segment).
        segment_length: ``H``, steps per segment. pairing: ``branch``, ``same_start`` or ``random``.
        num_pairs: pairs per round. num_heldout: held-out pairs for the agreement metric (0 = none).
        collect_steps: cap on the steps of a collected episode (``null`` = the env's own limit).
        teacher: :class:`~prefopt.data.teachers.ScriptedTeacher` options. rounds, batch_size: the loop.
        eval_episodes, eval_seed, eval_deterministic: evaluation episodes (seeds ``eval_seed + i``).
        offline: ``null`` or ``{path, split, num_pairs}``: the first round trains on this dataset.
        validate: also return the held-out pairs as Lightning validation data (``val/*`` metrics).
        train_log_std: let DPO change the Gaussian's log standard deviation (default: only the mean).
        torch_threads: ``torch.set_num_threads`` for the run (``null`` leaves torch's default).
    """

    name = "control"

    def __init__(self, env_id: str = "Pendulum-v1", env_kwargs: Mapping[str, Any] | None = None,
                 num_envs: int = 32, vectorization_mode: str = "sync", hidden: Sequence[int] = (64, 64),
                 log_std: float = -0.5, squash: bool = True, mean_bound: float | None = 3.0, gamma: float = 0.9,
                 alpha: float = 1.0, base: Mapping[str, Any] | None = None, segment_length: int = 50,
                 pairing: str = "branch", explore_steps: int | None = None, num_pairs: int = 1024,
                 num_heldout: int = 256, collect_steps: int | None = None, teacher: Mapping[str, Any] | None = None,
                 rounds: int = 1, batch_size: int = 64, eval_episodes: int = 50, eval_seed: int = 1_000_000,
                 eval_deterministic: bool = True, offline: Mapping[str, Any] | None = None, validate: bool = True,
                 train_log_std: bool = False, torch_threads: int | None = 1, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None):
        check_choice("domain.task.pairing", pairing, PAIRINGS)
        for option, value, low in (("segment_length", segment_length, 1), ("num_pairs", num_pairs, 1),
                                   ("rounds", rounds, 1), ("batch_size", batch_size, 1),
                                   ("eval_episodes", eval_episodes, 1), ("num_envs", num_envs, 1),
                                   ("num_heldout", num_heldout, 0)):
            if int(value) < low:
                raise PrefoptError(f"domain.task.{option}={value!r} must be an integer >= {low}")
        if pairing != "random" and int(num_envs) % 2:
            raise PrefoptError(f"domain.task.num_envs={num_envs} must be even with pairing={pairing} "
                               "(episodes run in pairs from one reset seed)")
        self.env_id, self.env_kwargs = str(env_id), dict(_plain(env_kwargs) or {})
        self.num_envs, self.vectorization_mode = int(num_envs), str(vectorization_mode)
        self.hidden, self.log_std, self.squash = tuple(_plain(hidden)), float(log_std), bool(squash)
        self.mean_bound = float(mean_bound) if mean_bound is not None else None
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.base = {"kind": "bc", "behaviour": "random", "behaviours": {}, "episodes": 32, "epochs": 100,
                     "lr": 1e-3, "batch_size": 256, "seed": 0, "path": None}
        unknown = set(_plain(base) or {}) - set(self.base)
        if unknown:
            raise PrefoptError(f"domain.task.base has unknown keys {sorted(unknown)}; allowed: {', '.join(self.base)}")
        self.base.update(_plain(base) or {})
        check_choice("domain.task.base.kind", self.base["kind"], BASE_KINDS)
        self.segment_length, self.pairing = int(segment_length), pairing
        self.explore_steps = int(explore_steps) if explore_steps else None
        if self.explore_steps is not None and not (pairing == "branch" and 1 <= self.explore_steps <= segment_length):
            raise PrefoptError(f"domain.task.explore_steps={explore_steps!r} needs pairing=branch and "
                               f"1 <= explore_steps <= segment_length={segment_length}")
        self.num_pairs, self.num_heldout = int(num_pairs), int(num_heldout)
        self.collect_steps = int(collect_steps) if collect_steps else None
        self.teacher_options = dict(_plain(teacher) or {})
        self.teacher = ScriptedTeacher(**self.teacher_options, seed=int(seed))
        self.rounds, self.batch_size = int(rounds), int(batch_size)
        self.eval_episodes, self.eval_seed = int(eval_episodes), int(eval_seed)
        self.eval_deterministic = bool(eval_deterministic)
        self.offline = dict(_plain(offline)) if offline else None
        if self.offline is not None:
            unknown = set(self.offline) - {"path", "split", "num_pairs"}
            if unknown or not self.offline.get("path"):
                raise PrefoptError(f"domain.task.offline={self.offline}: needs 'path' (a .npz file or a datasets "
                                   "folder) and may have 'split' and 'num_pairs'")
        self.validate, self.train_log_std, self.seed = bool(validate), bool(train_log_std), int(seed)
        if torch_threads:
            # tiny MLPs run fastest on one thread (several threads cost 10x or more on a busy CPU)
            torch.set_num_threads(int(torch_threads))
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prefopt"
        self._envs = None
        self._heldout: TensorPairs | None = None
        self._reference_eval: dict[str, Any] | None = None
        self._history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------- envs & policy
    @property
    def envs(self):
        if self._envs is None:
            self._envs = make_envs(self.env_id, self.num_envs, self.env_kwargs, self.vectorization_mode)
        return self._envs

    def _env_key(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "env_kwargs": self.env_kwargs}

    def new_network(self) -> torch.nn.Module:
        return policy_network_for(self.envs.single_observation_space, self.envs.single_action_space,
                                  self.hidden, self.log_std, self.squash, self.mean_bound)

    def _wrap(self, network: torch.nn.Module) -> ControlPolicy:
        return ControlPolicy(network, gamma=self.gamma, alpha=self.alpha)

    def build_policy(self) -> ControlPolicy:
        kind = self.base["kind"]
        with torch.random.fork_rng():
            torch.manual_seed(int(self.base["seed"]))
            network = self.new_network()
        if kind == "checkpoint":
            load_network_weights(network, self.base["path"])
        elif kind == "bc":
            key = {**self._env_key(), "net": {"hidden": list(self.hidden), "log_std": self.log_std,
                                              "squash": self.squash, "mean_bound": self.mean_bound},
                   "base": {**{k: self.base[k] for k in ("episodes", "epochs", "lr", "batch_size", "seed")},
                            "behaviour": self.behaviour_spec(), "collect_steps": self.collect_steps}}
            state = cached_tensors(self.cache_dir, "control_base", key, lambda: self._clone_behaviour(network))
            network.load_state_dict(state)
        if not self.train_log_std and isinstance(getattr(network, "log_std", None), torch.nn.Parameter):
            network.log_std.requires_grad_(False)  # DPO moves the mean; exploration noise stays as set
        policy = self._wrap(network)
        self.heldout_pairs(policy)
        return policy

    def behaviour_data(self) -> dict[str, torch.Tensor]:
        """Rollouts of the behaviour policy (cached): ``obs``, ``actions``, ``mask``, ``returns``."""
        kind, options = self.behaviour_spec()
        function = resolve_behaviour(kind)
        key = {**self._env_key(), "behaviour": {"kind": kind, **options}, "episodes": int(self.base["episodes"]),
               "seed": int(self.base["seed"]), "collect_steps": self.collect_steps}

        def build():
            rng = np.random.default_rng(int(self.base["seed"]))
            space = self.envs.single_action_space
            seeds = [_STREAM_BEHAVIOUR + int(self.base["seed"]) * 10_007 + i for i in range(int(self.base["episodes"]))]
            try:
                data = rollout(self.envs, lambda obs, step: function(obs, rng, space, **options), seeds,
                               self.collect_steps, desc=f"behaviour {kind}")
            except TypeError as err:
                raise PrefoptError(f"base.behaviour={kind!r} with options {options}: {err}") from None
            return {"obs": data.obs, "actions": data.actions, "mask": data.mask, "returns": data.returns}

        return cached_tensors(self.cache_dir, "control_bc_data", key, build)

    def behaviour_spec(self) -> tuple[str, dict[str, Any]]:
        """``(kind, options)`` of the behaviour: ``base.behaviour`` names it and ``base.behaviours[kind]``
        holds its options (one entry per behaviour, so switching is one override); a mapping
        ``{kind: ..., <options>}`` in ``base.behaviour`` works too."""
        behaviour = self.base["behaviour"]
        if isinstance(behaviour, Mapping):
            options = dict(behaviour)
            return str(options.pop("kind", "random")), options
        options = dict((self.base.get("behaviours") or {}).get(behaviour) or {})
        return str(behaviour), options

    def _clone_behaviour(self, network: torch.nn.Module) -> dict[str, torch.Tensor]:
        data = self.behaviour_data()
        mask = data["mask"]
        obs, actions = data["obs"][mask], data["actions"][mask]
        discrete = actions.dtype == torch.int64
        generator = torch.Generator().manual_seed(int(self.base["seed"]))
        params = [p for name, p in network.named_parameters() if name != "log_std"]
        optimizer = torch.optim.Adam(params, lr=float(self.base["lr"]))
        size, batch = obs.shape[0], int(self.base["batch_size"])
        bar = tqdm(range(int(self.base["epochs"])), desc="behaviour cloning", leave=False, dynamic_ncols=True)
        for _ in bar:
            order = torch.randperm(size, generator=generator)
            for start in range(0, size, batch):
                idx = order[start:start + batch]
                dist = network(obs[idx])
                if discrete:
                    loss = -dist.log_prob(actions[idx]).mean()
                else:
                    loss = ((dist.mean - actions[idx]) ** 2).sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            bar.set_postfix(loss=loss.item())
        return {k: v.detach().clone() for k, v in network.state_dict().items()}

    # ------------------------------------------------------------------------------------ pairs
    def collect_pairs(self, policy: ControlPolicy, num_pairs: int, stream: int, desc: str,
                      teacher: ScriptedTeacher | None = None) -> TensorPairs:
        """``num_pairs`` pairs of segments from stochastic rollouts of ``policy``, labelled by ``teacher``
        (the task's teacher by default)."""
        teacher = teacher or self.teacher
        generator = torch.Generator().manual_seed(stream)
        act = policy_actor(policy, deterministic=False)
        if self.pairing == "branch" and self.explore_steps:
            act_mean = policy_actor(policy, deterministic=True)
            act = (act, act_mean)
        collect = self._branch_pairs if self.pairing == "branch" else self._window_pairs
        a_parts: list[dict] = []
        b_parts: list[dict] = []
        have, batch_index, empty = 0, 0, 0
        while have < num_pairs:
            a, b = collect(act, num_pairs - have, stream * 1_000_003 + batch_index * 100_003, generator, desc)
            have += a["mask"].shape[0]
            empty = empty + 1 if a["mask"].shape[0] == 0 else 0
            if empty >= 5:
                raise PrefoptError(f"{self.env_id}: rollouts of the policy yield no segment pairs (episodes too "
                                   f"short for segment_length={self.segment_length} with pairing={self.pairing}?)")
            a_parts.append(a)
            b_parts.append(b)
            batch_index += 1
        a = {k: torch.cat([p[k] for p in a_parts])[:num_pairs] for k in a_parts[0]}
        b = {k: torch.cat([p[k] for p in b_parts])[:num_pairs] for k in b_parts[0]}
        # a generator per call: a round's labels do not depend on earlier rounds (whose pairs may come
        # from prefopt's pair cache without calling this method)
        labels = teacher.label(a.pop("rewards"), b.pop("rewards"), a["mask"], b["mask"],
                               generator=torch.Generator().manual_seed(stream + 1))
        if not labels.keep.any():
            raise PrefoptError(f"the teacher skipped all {len(labels)} pairs (teacher={self.teacher_options})")
        if self.pairing == "branch" and self.explore_steps:
            # the learner sees the explored steps; the teacher judged them by the whole segment
            a = {k: v[:, :self.explore_steps] for k, v in a.items()}
            b = {k: v[:, :self.explore_steps] for k, v in b.items()}
        return TensorPairs.from_ordered(to_pairs(a, b, labels))

    def episode_limit(self) -> int:
        """Steps of a collected episode: ``collect_steps``, capped by the env's own time limit."""
        spec_limit = self.env_kwargs.get("max_episode_steps")
        if spec_limit is None and self.envs.spec is not None:
            spec_limit = self.envs.spec.max_episode_steps
        limits = [x for x in (self.collect_steps, spec_limit) if x]
        if not limits:
            raise PrefoptError(f"{self.env_id} has no time limit: set domain.task.collect_steps")
        return int(min(limits))

    def _window_pairs(self, act, num_pairs, seed_base, generator, desc):
        """``same_start``/``random``: whole episodes cut into windows ``[kH, (k+1)H)``, then paired."""
        per_episode = max(1, math.ceil(self.episode_limit() / self.segment_length))
        episodes = 2 * math.ceil(num_pairs / per_episode)
        episodes = self.num_envs * math.ceil(episodes / self.num_envs)
        seeds = [seed_base + (i // 2 if self.pairing == "same_start" else i) for i in range(episodes)]
        data = rollout(self.envs, act, seeds, self.collect_steps, desc=desc, torch_seed=seed_base)
        return pair_windows(split_windows(data, self.segment_length), self.pairing, num_pairs, generator)

    def _branch_pairs(self, act, num_pairs, seed_base, generator, desc):
        """``branch``: the two episodes of a pair share a reset seed and, until step ``t0``, their actions;
        the pair is their segments ``[t0, t0 + H)``, which start from one state (in a deterministic env)."""
        horizon, limit = self.segment_length, self.episode_limit()
        per_batch = self.num_envs // 2
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
                    explore = (offset >= 0) & (offset < self.explore_steps)
                    return np.where(explore.reshape((-1,) + (1,) * (action.ndim - 1)), action, mean)
                action = act(obs, step)
                prefix = steps[0::2] > step
                if prefix.any():
                    second = action[1::2]
                    second[prefix] = action[0::2][prefix]
                return action

            seeds = [seed_base + start + i // 2 for i in range(2 * per_batch)]
            data = rollout(self.envs, act_shared, seeds, int(branch.max()) + horizon, desc=desc,
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
                raise PrefoptError(
                    f"pairing=branch: {self.env_id} is not deterministic given its reset seed and actions (two "
                    "episodes with the same seed and the same actions reached different states); use "
                    "pairing=same_start or random")
            parts_a.append({k: v[both] for k, v in a.items()})
            parts_b.append({k: v[both] for k, v in b.items()})
        a = {k: torch.cat([p[k] for p in parts_a]) for k in parts_a[0]}
        b = {k: torch.cat([p[k] for p in parts_b]) for k in parts_b[0]}
        return a, b

    def pairs(self, policy: ControlPolicy, round_index: int):
        if round_index == 0 and self.offline is not None:
            return self.offline_pairs()
        stream = _STREAM_ROUND + self.seed * 1_009 + round_index
        return self.collect_pairs(policy, self.num_pairs, stream, desc=f"round {round_index} rollouts")

    def groups(self, policy: ControlPolicy, round_index: int, size: int):
        """Groups of ``size`` segments for binary, ranking and score feedback: the round's pairs, regrouped."""
        from prefopt.feedback.segments import segment_groups

        stream = _STREAM_ROUND + self.seed * 1_009 + round_index
        return segment_groups(self, policy, size, self.num_pairs, stream, desc=f"round {round_index} rollouts")

    def offline_pairs(self):
        from prefopt.data.segments import load_segment_pairs

        path, split = self.offline["path"], self.offline.get("split")
        num_pairs = self.offline.get("num_pairs")
        try:
            data = load_segment_pairs(path, split=split)
        except PrefoptError as first:
            if "teacher" not in str(first):
                raise
            data = load_segment_pairs(path, self.teacher, num_pairs=num_pairs, seed=self.seed, split=split)
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        if data.obs_dim != obs_space.shape[0]:
            raise PrefoptError(f"{path}: segments have obs_dim={data.obs_dim} but {self.env_id} observations have "
                               f"{obs_space.shape[0]}")
        discrete = hasattr(act_space, "n")
        if data.discrete != discrete or (not discrete and data.act_dim != act_space.shape[0]):
            found = "discrete actions" if data.discrete else f"act_dim={data.act_dim}"
            wanted = f"Discrete({act_space.n})" if discrete else f"act_dim={act_space.shape[0]}"
            raise PrefoptError(f"{path}: segments have {found} but {self.env_id} needs {wanted}")
        return data

    def heldout_pairs(self, reference: ControlPolicy) -> TensorPairs | None:
        """Held-out pairs of the reference's rollouts, labelled by the teacher (collected once)."""
        if self._heldout is None and self.num_heldout:
            # its own teacher (same options, own stream): the training labels do not depend on num_heldout
            teacher = ScriptedTeacher(**self.teacher_options, seed=self.seed * 7 + 12_345)
            self._heldout = self.collect_pairs(reference, self.num_heldout, _STREAM_HELDOUT + self.seed,
                                               desc="held-out rollouts", teacher=teacher)
        return self._heldout

    def val_pairs(self):
        return self._heldout if self.validate else None

    # -------------------------------------------------------------------------------- evaluation
    def episode_returns(self, policy: ControlPolicy, desc: str) -> torch.Tensor:
        seeds = [self.eval_seed + i for i in range(self.eval_episodes)]
        act = policy_actor(policy, self.eval_deterministic)
        return rollout(self.envs, act, seeds, desc=desc, torch_seed=self.eval_seed).returns

    @torch.no_grad()
    def agreement(self, reference: ControlPolicy, policy: ControlPolicy) -> dict[str, float]:
        """Teacher agreement with the implicit rewards ``log pi - log pi_ref`` and ``log pi`` (CPL's)."""
        pairs = self._heldout
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

    def evaluate(self, reference: ControlPolicy, policy: ControlPolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        # eval mode while evaluating only: Lightning keeps a module's mode, and the next round trains it
        with eval_mode(policy), eval_mode(reference):
            return self._evaluate(reference, policy, Path(output_dir), round_index)

    def _evaluate(self, reference: ControlPolicy, policy: ControlPolicy, output_dir: Path,
                  round_index: int) -> dict[str, Any]:
        if self._reference_eval is None:
            returns = self.episode_returns(reference, "eval reference")
            mean, se = mean_and_se(returns)
            self._reference_eval = {"returns": returns, "return_mean": mean, "return_se": se}
        ref_returns = self._reference_eval["returns"]
        pol_returns = self.episode_returns(policy, f"eval round {round_index}")
        (ref_mean, ref_se), (pol_mean, pol_se) = mean_and_se(ref_returns), mean_and_se(pol_returns)
        diff_mean, diff_se_paired = mean_and_se(pol_returns - ref_returns)
        diff_se = math.sqrt(ref_se ** 2 + pol_se ** 2)
        self._history.append({"round": round_index, "mean": pol_mean, "se": pol_se})
        plot = plot_returns(self._history, ref_mean, ref_se, output_dir / "returns.png", self.env_id)
        return {
            "env_id": self.env_id,
            "eval_episodes": self.eval_episodes,
            "reference": {"return_mean": ref_mean, "return_se": ref_se},
            "policy": {"return_mean": pol_mean, "return_se": pol_se},
            "win_rate": win_rate(pol_returns, ref_returns)["win_rate"],
            "improvement": diff_mean,
            "improvement_se": diff_se,
            "improvement_se_paired": diff_se_paired,
            "beats_reference_by_2se": bool(diff_mean > 2 * diff_se),
            **self.agreement(reference, policy),
            "plot": plot.name,
        }


# ---------------------------------------------------------------------------------- weights, plot

def load_network_weights(network: torch.nn.Module, path) -> None:
    """Load a ``.safetensors`` state dict (e.g. a run's ``policy.safetensors``), or a ``.ckpt``/``.pt`` (a
    prefopt Lightning checkpoint or a plain state dict, read with ``weights_only=True``) into ``network``."""
    if not path:
        raise PrefoptError("base.kind=checkpoint needs base.path (a .safetensors, .ckpt or .pt file)")
    path = Path(path)
    if not path.is_file():
        raise PrefoptError(f"base.path={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise PrefoptError(f"base.path={str(path)!r}: cannot be read with torch.load(weights_only=True): "
                               f"{err}") from None
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint of a prefopt run
            prefix = "policy.network."
            state = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not isinstance(state, dict) or not state:
        raise PrefoptError(f"base.path={str(path)!r}: holds no network weights")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise PrefoptError(f"base.path={str(path)!r} does not fit the policy network for this env "
                           f"(hidden sizes and spaces must match): {err}") from None


def plot_returns(history: list[dict[str, float]], ref_mean: float, ref_se: float, path: Path, title: str) -> Path:
    """Mean +- s.e. of the evaluation return after each round, against the reference's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [h["round"] + 1 for h in history]
    means = [ref_mean] + [h["mean"] for h in history]
    ses = [ref_se] + [h["se"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhspan(ref_mean - ref_se, ref_mean + ref_se, color="0.85", label="reference (+- s.e.)")
    ax.axhline(ref_mean, color="0.5", lw=1)
    ax.errorbar(rounds, means, yerr=ses, marker="o", capsize=3, label="policy")
    ax.set_xlabel("rounds of DPO done")
    ax.set_ylabel("episodic return")
    ax.set_xticks(rounds)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["BEHAVIOURS", "ControlTask", "Rollouts", "cartpole_balance", "load_network_weights", "make_envs",
           "pair_windows", "pendulum_energy", "plot_returns", "random_behaviour", "resolve_behaviour", "rollout",
           "split_windows"]

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
:func:`prefopt.tasks.control.segments.load_segment_pairs` (``.npz`` or an HF ``datasets`` folder).

**Evaluation**: the reference (the policy before any training) and the trained policy each run
``eval_episodes`` episodes from the fixed reset seeds ``eval_seed + i``; reported are mean and standard
error of the true return, the win rate on the same seeds (ties count half), and the teacher's agreement
with the policy's implicit reward on held-out pairs (pairs of the reference's rollouts, labelled by the
teacher). ``returns.png`` plots the return per round (``prefopt.train`` writes the final weights to
``policy.safetensors``, loadable with ``base.kind=checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from prefopt.adapters.control import ControlPolicy, policy_network_for
from prefopt.cache import cached_tensors
from prefopt.data.pairs import TensorPairs
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.errors import PrefoptError, check_choice
from prefopt.reference import eval_mode
from prefopt.tasks.base import Task
from prefopt.tasks.control.adapt import BranchingImpossible, behaviour_fits, notice, segment_plan
from prefopt.tasks.control.behaviours import resolve_behaviour
from prefopt.tasks.control.cloning import clone_behaviour
from prefopt.tasks.control.evaluation import compare_returns, episode_returns, teacher_agreement
from prefopt.tasks.control.pairing import branch_pairs, window_pairs
from prefopt.tasks.control.plotting import plot_returns
from prefopt.tasks.control.rollouts import make_envs, policy_actor, rollout
from prefopt.tasks.control.segments import UNLABELLED, read_segment_columns, segment_pairs_from_columns
from prefopt.tasks.control.weights import load_network_weights

BASE_KINDS = ("bc", "checkpoint", "scratch")
PAIRINGS = ("branch", "same_start", "random")

# seed streams (kept far apart so that no two purposes share reset seeds)
_STREAM_BEHAVIOUR, _STREAM_HELDOUT, _STREAM_ROUND, _STREAM_PROBE = 1 << 20, 2 << 20, 3 << 20, 4 << 20


def _plain(value):
    """A Hydra ``DictConfig``/``ListConfig`` as plain Python containers (other values pass through)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


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
                 train_log_std: bool = False, seed: int = 0,
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
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prefopt"
        self._envs = None
        self._heldout: TensorPairs | None = None
        self._behaviour: tuple[str, dict[str, Any]] | None = None  # the behaviour, checked against the env
        self._branch_limit: int | None = None  # branch points lie in [0, this - segment_length]
        self._reference_returns: torch.Tensor | None = None
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
            state = cached_tensors(self.cache_dir, "control_base", key, lambda: clone_behaviour(
                network, self.behaviour_data(), self.base["epochs"], self.base["lr"], self.base["batch_size"],
                self.base["seed"]))
            network.load_state_dict(state)
        if not self.train_log_std and isinstance(getattr(network, "log_std", None), torch.nn.Parameter):
            network.log_std.requires_grad_(False)  # DPO moves the mean; exploration noise stays as set
        policy = self._wrap(network)
        self.fit_segments(policy)
        self.heldout_pairs(policy)
        return policy

    def fit_segments(self, policy: ControlPolicy) -> None:
        """Segment length and branch points that fit the episodes ``policy`` runs (one probe batch of stochastic
        episodes from the base seed, so every run seed of a sweep gets the same plan); see
        :func:`~prefopt.tasks.control.adapt.segment_plan`."""
        seeds = [_STREAM_PROBE + int(self.base["seed"]) * 10_007 + i for i in range(self.num_envs)]
        probe = rollout(self.envs, policy_actor(policy, deterministic=False), seeds, self.episode_limit(),
                        desc="episode lengths", torch_seed=_STREAM_PROBE + int(self.base["seed"]))
        plan = segment_plan(probe.mask.sum(-1).numpy(), self.segment_length, self.episode_limit(), self.env_id)
        self.segment_length, self._branch_limit = plan.segment_length, plan.limit
        if self.explore_steps and self.explore_steps > self.segment_length:
            notice(f"explore_steps={self.explore_steps} > segment_length={self.segment_length}; "
                   f"explore_steps={self.segment_length} is used")
            self.explore_steps = self.segment_length

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
        ``{kind: ..., <options>}`` in ``base.behaviour`` works too. A behaviour that does not fit the env's
        spaces (``pendulum_energy`` on CartPole) is replaced by random actions, with a notice."""
        if self._behaviour is None:
            behaviour = self.base["behaviour"]
            if isinstance(behaviour, Mapping):
                options = dict(behaviour)
                kind = str(options.pop("kind", "random"))
            else:
                kind, options = str(behaviour), dict((self.base.get("behaviours") or {}).get(behaviour) or {})
            why = behaviour_fits(resolve_behaviour(kind), options, self.envs.single_observation_space,
                                 self.envs.single_action_space, seed=int(self.base["seed"]))
            if why is not None and kind != "random":
                notice(f"base.behaviour={kind!r} does not fit {self.env_id} ({why}); the base policy clones "
                       "random actions instead")
                kind, options = "random", {}
            self._behaviour = (kind, options)
        return self._behaviour[0], dict(self._behaviour[1])

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
            try:
                a, b = collect(act, num_pairs - have, stream * 1_000_003 + batch_index * 100_003, generator, desc)
            except BranchingImpossible as err:
                notice(f"{err}; pairs are windows of two episodes from one reset seed instead "
                       "(pairing=same_start)")
                self.pairing, self.explore_steps = "same_start", None
                return self.collect_pairs(policy, num_pairs, stream, desc, teacher)
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
        return window_pairs(self.envs, act, num_pairs, seed_base, generator, desc, pairing=self.pairing,
                            segment_length=self.segment_length, episode_limit=self._branch_limit or self.episode_limit(),
                            collect_steps=self.collect_steps)

    def _branch_pairs(self, act, num_pairs, seed_base, generator, desc):
        return branch_pairs(self.envs, act, num_pairs, seed_base, generator, desc, segment_length=self.segment_length,
                            episode_limit=self._branch_limit or self.episode_limit(), explore_steps=self.explore_steps,
                            env_id=self.env_id)

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
        path, split = self.offline["path"], self.offline.get("split")
        cols, layout, where = read_segment_columns(path, split)
        teacher = self.teacher if layout == UNLABELLED else None  # unlabelled segments are labelled by the teacher
        data = segment_pairs_from_columns(cols, layout, where, teacher, num_pairs=self.offline.get("num_pairs"),
                                          seed=self.seed)
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
        return episode_returns(self.envs, policy, seeds, self.eval_deterministic, self.eval_seed, desc)


    def resumed_round(self, round_index: int, result: dict[str, Any]) -> None:
        self._history.append({"round": round_index, "mean": result["policy"]["return_mean"],
                              "se": result["policy"]["return_se"]})  # returns.png keeps the rounds before a kill

    def evaluate(self, reference: ControlPolicy, policy: ControlPolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        # eval mode while evaluating only: Lightning keeps a module's mode, and the next round trains it
        with eval_mode(policy), eval_mode(reference):
            return self._evaluate(reference, policy, Path(output_dir), round_index)

    def _evaluate(self, reference: ControlPolicy, policy: ControlPolicy, output_dir: Path,
                  round_index: int) -> dict[str, Any]:
        if self._reference_returns is None:
            self._reference_returns = self.episode_returns(reference, "eval reference")
        pol_returns = self.episode_returns(policy, f"eval round {round_index}")
        result = compare_returns(self._reference_returns, pol_returns)
        self._history.append({"round": round_index, "mean": result["policy"]["return_mean"],
                              "se": result["policy"]["return_se"]})
        plot = plot_returns(self._history, result["reference"]["return_mean"], result["reference"]["return_se"],
                            output_dir / "returns.png", self.env_id)
        return {"env_id": self.env_id, "eval_episodes": self.eval_episodes, **result,
                **teacher_agreement(self._heldout, reference, policy), "plot": plot.name}

__all__ = ["ControlTask"]

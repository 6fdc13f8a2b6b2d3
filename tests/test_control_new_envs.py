"""`prefopt domain=control domain.task.env_id=<env>` on envs the Pendulum defaults were not tuned on: the behaviour
falls back to random actions, segments fit the episodes the policy runs, and pairing falls back when branching is
impossible, each with one notice. Only sizes are overridden here (pairs, episodes, epochs), never the behaviour, the
segment length or the pairing."""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np
import pytest
from hydra.utils import instantiate

from prefopt.tasks.control.adapt import behaviour_fits, segment_plan
from prefopt.tasks.control.behaviours import cartpole_balance, pendulum_energy, random_behaviour
from prefopt.tasks.control.rollouts import policy_actor, rollout
from prefopt.train import train

SIZES = ["domain.task.num_envs=8", "domain.task.hidden=[16]", "domain.task.base.episodes=8",
         "domain.task.base.epochs=2", "domain.task.num_pairs=32", "domain.task.num_heldout=16",
         "domain.task.eval_episodes=4", "domain.task.rounds=1", "domain.task.batch_size=16", "trainer.max_epochs=1",
         "trainer.enable_progress_bar=false"]


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefopt: notice: ")]


def test_behaviour_fit_is_judged_on_the_env_spaces():
    pendulum, cartpole = gym.make("Pendulum-v1"), gym.make("CartPole-v1")
    assert behaviour_fits(pendulum_energy, {}, pendulum.observation_space, pendulum.action_space) is None
    assert "expects Pendulum's 3 observations" in behaviour_fits(pendulum_energy, {}, cartpole.observation_space,
                                                                 cartpole.action_space)
    assert behaviour_fits(cartpole_balance, {}, cartpole.observation_space, cartpole.action_space) is None
    for env in (pendulum, cartpole, gym.make("MountainCarContinuous-v0")):
        assert behaviour_fits(random_behaviour, {}, env.observation_space, env.action_space) is None

    def wrong_shape(obs, rng, space):
        return np.zeros((obs.shape[0], 3), dtype=np.float32)
    assert "shape (8, 3)" in behaviour_fits(wrong_shape, {}, pendulum.observation_space, pendulum.action_space)


def test_segment_plan_by_hand(caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        # episodes that always reach the limit (Pendulum): nothing changes
        assert segment_plan(np.full(8, 200), 50, 200, "P") == (50, 200) and not _notices(caplog)
        # median 101 >= 2 * 50: the segment stays, branch points stay within the first 101 steps
        assert segment_plan(np.array([20, 101, 101, 300]), 50, 500, "C") == (50, 101) and not _notices(caplog)
        # median 23 < 2 * 50: segments of 23 // 2 = 11 steps
        assert segment_plan(np.array([9, 23, 23, 40, 60]), 50, 500, "CartPole-v1") == (11, 23)
    assert _notices(caplog) == ["prefopt: notice: CartPole-v1: episodes of the policy last 23 steps (median of 5), "
                                "too short for segment_length=50; segments of 11 steps are used instead"]


def test_cartpole_early_termination_with_the_pendulum_defaults(make_config, caplog):
    cfg = make_config("domain=control", "domain.task.env_id=CartPole-v1", *SIZES)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        task = instantiate(cfg.domain.task)
        policy = task.build_policy()
    notices = _notices(caplog)
    assert len(notices) == 2, notices
    assert "base.behaviour='pendulum_energy' does not fit CartPole-v1" in notices[0]
    assert task.behaviour_spec() == ("random", {})
    # the probe's median length, measured again here, sets the segment length
    seeds = [(4 << 20) + i for i in range(task.num_envs)]
    probe = rollout(task.envs, policy_actor(policy, False), seeds, 500, torch_seed=4 << 20)
    median = int(np.median(probe.mask.sum(-1).numpy()))
    assert median < 100 and task.segment_length == max(1, median // 2)
    assert f"last {median} steps" in notices[1]
    heldout = task.heldout_pairs(policy)
    assert heldout is not None and len(heldout) == 16
    # every held-out segment starts with a real step on both sides
    assert bool(heldout.chosen["mask"][:, 0].all()) and bool(heldout.rejected["mask"][:, 0].all())
    assert heldout.chosen["mask"].shape[1] == task.segment_length

    summary = train(cfg)  # the whole run, as `prefopt domain.task.env_id=CartPole-v1` does it
    assert summary["eval"]["env_id"] == "CartPole-v1" and summary["eval"]["num_pairs"] == 32
    assert 0.0 <= summary["eval"]["win_rate"] <= 1.0


def test_mountain_car_continuous_with_the_pendulum_defaults(make_config, caplog):
    cfg = make_config("domain=control", "domain.task.env_id=MountainCarContinuous-v0", *SIZES,
                      "domain.task.eval_episodes=2", "domain.task.num_envs=32")
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        summary = train(cfg)
    notices = _notices(caplog)
    assert len(notices) == 1 and "does not fit MountainCarContinuous-v0" in notices[0], notices  # 999-step episodes
    assert summary["eval"]["num_pairs"] == 32 and summary["eval"]["env_id"] == "MountainCarContinuous-v0"


class _NoisyPendulum(gym.Wrapper):
    """Pendulum whose steps add noise that its reset seed does not determine: branching cannot work."""

    def __init__(self):
        super().__init__(gym.make("Pendulum-v1", max_episode_steps=40))
        self.noise = np.random.default_rng()  # deliberately unseeded

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.env.unwrapped.state = self.env.unwrapped.state + self.noise.normal(0, 0.05, size=2)
        return obs, reward, terminated, truncated, info


def test_pairing_falls_back_when_branching_is_impossible(make_config, caplog):
    if "PrefoptNoisyPendulum-v0" not in gym.registry:
        gym.register("PrefoptNoisyPendulum-v0", entry_point=_NoisyPendulum, max_episode_steps=40)
    cfg = make_config("domain=control", "domain.task.env_id=PrefoptNoisyPendulum-v0", *SIZES)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        task = instantiate(cfg.domain.task)
        policy = task.build_policy()
    notices = _notices(caplog)
    assert len(notices) == 2, notices  # pendulum_energy fits this env; its 40-step episodes get 20-step segments
    assert "last 40 steps" in notices[0] and "segments of 20 steps" in notices[0]
    assert "is not deterministic" in notices[1] and "pairing=same_start" in notices[1]
    assert task.pairing == "same_start" and len(task.heldout_pairs(policy)) == 16
    pairs = task.pairs(policy, 0)
    assert len(pairs) == 32 and len(_notices(caplog)) == 2  # no new notice: same_start from now on
    # same_start windows [0, 20) and [20, 40) of two 40-step episodes: every step real
    assert bool(pairs.chosen["mask"].all()) and bool(pairs.rejected["mask"].all())

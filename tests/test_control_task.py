"""Control task: rollouts, pairing, offline data, checkpoints, and tiny end-to-end runs (Box and Discrete)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from prefopt.cli import config_dir
from prefopt.errors import PrefoptError
from prefopt.tasks.control import (ControlTask, Rollouts, cartpole_balance, pair_windows, pendulum_energy,
                                   policy_actor, resolve_behaviour, rollout, split_windows)
from prefopt.train import train

# a tiny Pendulum: 30-step episodes, a 2-epoch clone of 2 behaviour episodes, 4 envs
TINY = [
    "domain.task.env_kwargs={max_episode_steps: 30}",
    "domain.task.num_envs=4",
    "domain.task.hidden=[16]",
    "domain.task.base.episodes=2",
    "domain.task.base.epochs=2",
    "domain.task.segment_length=10",
    "domain.task.num_pairs=12",
    "domain.task.num_heldout=8",
    "domain.task.eval_episodes=3",
    "domain.task.batch_size=4",
    "domain.task.rounds=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]
EVAL_KEYS = {"reference", "policy", "win_rate", "teacher_agreement", "teacher_agreement_logp", "improvement",
             "improvement_se", "plot", "eval_episodes"}


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["domain=control", f"paths.output_dir={tmp_path / 'run'}",
                                           f"paths.cache_dir={tmp_path / 'cache'}", *TINY, *overrides])


def _task(tmp_path, **options):
    base = {"kind": "bc", "behaviour": "random", "episodes": 2, "epochs": 1}
    kwargs = dict(env_id="Pendulum-v1", env_kwargs={"max_episode_steps": 30}, num_envs=4, hidden=(8,),
                  base=base, segment_length=10, num_pairs=6, num_heldout=0, eval_episodes=2,
                  cache_dir=tmp_path / "cache")
    kwargs.update(options)
    return ControlTask(**kwargs)


def test_end_to_end_pendulum_writes_summary_plot_and_weights(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        from hydra.utils import instantiate as build

        build(_cfg(tmp_path).domain.task)  # constructing a task has no side effect on torch's threads
        assert torch.get_num_threads() == 2
        summary = train(_cfg(tmp_path))  # the run's torch_threads (default 1) is applied once, by train
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["eval"] == summary["eval"]
    ev = summary["eval"]
    assert EVAL_KEYS <= set(ev)
    assert set(ev["reference"]) == {"return_mean", "return_se"} and set(ev["policy"]) == {"return_mean", "return_se"}
    assert -30 * 16.3 <= ev["reference"]["return_mean"] <= 0  # Pendulum's reward per step is in [-16.3, 0]
    assert 0.0 <= ev["win_rate"] <= 1.0 and 0.0 <= ev["teacher_agreement"] <= 1.0
    assert ev["heldout_pairs"] >= 1 and ev["num_pairs"] == 12
    assert (run / ev["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "policy.safetensors").is_file()
    # the base policy and its behaviour data were cached, so a second task builds nothing
    from prefopt.cache import BUILD_COUNTS

    before = dict(BUILD_COUNTS)
    cfg = _cfg(tmp_path)
    from hydra.utils import instantiate

    task = instantiate(cfg.domain.task)
    task.num_heldout = 0
    task.build_policy()
    assert dict(BUILD_COUNTS) == before


def test_discrete_cartpole_runs_end_to_end(tmp_path):
    summary = train(_cfg(tmp_path, "domain.task.env_id=CartPole-v1",
                         "domain.task.base.behaviour=cartpole_balance",
                         "domain.task.env_kwargs={max_episode_steps: 40}"))
    ev = summary["eval"]
    assert EVAL_KEYS <= set(ev)
    assert 1 <= ev["reference"]["return_mean"] <= 40  # CartPole gives +1 per step, 40 steps at most


def test_cli_writes_summary(tmp_path):
    env = dict(os.environ, TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "prefopt.cli", "domain=control", f"paths.output_dir={tmp_path / 'run'}",
           f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "loss=ipo", "domain.task.num_heldout=0",
           "domain.task.teacher={kind: mistake, eps: 0.2}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss"] == "ipo" and summary["domain"] == "control"
    assert {"reference", "policy", "win_rate", "plot"} <= set(summary["eval"])
    assert "teacher_agreement" not in summary["eval"]  # no held-out pairs asked for


def test_rollout_masks_finished_episodes_and_is_reproducible(tmp_path):
    task = _task(tmp_path, env_id="CartPole-v1", env_kwargs={})
    policy = task.build_policy()
    act = policy_actor(policy, deterministic=False)
    first = rollout(task.envs, act, [1, 2, 3, 4, 5], desc="test", torch_seed=0)
    again = rollout(task.envs, act, [1, 2, 3, 4, 5], desc="test", torch_seed=0)
    assert len(first) == 5 and torch.equal(first.actions, again.actions)
    lengths = first.mask.sum(1)
    # a mask is True for a prefix of steps only; the reward of CartPole is 1 per real step
    for row, n in enumerate(lengths.tolist()):
        assert first.mask[row, :n].all() and not first.mask[row, n:].any()
    assert torch.equal(first.returns, lengths.double())
    assert first.actions.dtype == torch.int64


def test_branch_pairs_start_from_one_state(tmp_path):
    task = _task(tmp_path, pairing="branch", num_pairs=6)
    policy = task.build_policy()
    pairs = task.collect_pairs(policy, 6, stream=5, desc="test")
    assert len(pairs) == 6
    chosen, rejected = pairs.chosen, pairs.rejected
    assert torch.allclose(chosen["obs"][:, 0], rejected["obs"][:, 0])  # same state at the branch point
    assert not torch.equal(chosen["actions"], rejected["actions"])  # but their own draws from there
    assert chosen["obs"].shape == (6, 10, 3) and chosen["mask"].all()


def test_window_pairing_and_oracle_order():
    # two episodes of 4 steps, windows of 2: same_start pairs (ep0, k) with (ep1, k)
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]])
    obs = torch.arange(8, dtype=torch.float32).reshape(2, 4, 1)
    data = Rollouts(obs=obs, actions=obs.clone(), rewards=rewards, mask=torch.ones(2, 4, dtype=torch.bool),
                    seeds=torch.tensor([0, 0]))
    windows = split_windows(data, 2)
    assert windows["obs"].shape == (2, 2, 2, 1)
    a, b = pair_windows(windows, "same_start", 10, torch.Generator().manual_seed(0))
    assert a["rewards"].tolist() == [[1.0, 1.0], [0.0, 0.0]] and b["rewards"].tolist() == [[0.0, 0.0], [5.0, 5.0]]
    a, b = pair_windows(windows, "random", 7, torch.Generator().manual_seed(0))
    assert a["obs"].shape == (7, 2, 1)
    assert not any(torch.equal(x, y) for x, y in zip(a["obs"], b["obs"]))  # never a window with itself


def test_behaviours():
    rng = np.random.default_rng(0)
    from gymnasium import spaces

    box = spaces.Box(-2.0, 2.0, (1,))
    # hanging down (theta = pi), swinging with rate +1: the pump pushes along the rate, up to the bound
    obs = np.array([[-1.0, 0.0, 1.0], [1.0, 0.1, 0.0]], dtype=np.float32)
    torque = pendulum_energy(obs, rng, box, gain=1.0)
    assert torque[0, 0] == pytest.approx(2.0)  # 1 * 1 * (15 - (0.5 - 15)) = 29.5, clipped to 2
    theta = np.arctan2(0.1, 1.0)
    assert torque[1, 0] == pytest.approx(-10.0 * theta, rel=1e-5)  # PD near the top
    cart = cartpole_balance(np.array([[0, 0, 0.1, 0], [0, 0, -0.1, 0]], dtype=np.float32), rng, spaces.Discrete(2))
    assert cart.tolist() == [1, 0]
    import math

    assert resolve_behaviour("math:floor") is math.floor
    with pytest.raises(PrefoptError, match="allowed"):
        resolve_behaviour("nope")


def test_offline_npz_pairs_and_dimension_check(tmp_path):
    rng = np.random.default_rng(0)
    n, h = 5, 4
    path = tmp_path / "pairs.npz"
    np.savez(path, chosen_obs=rng.normal(size=(n, h, 3)).astype(np.float32),
             chosen_actions=rng.uniform(-2, 2, size=(n, h, 1)).astype(np.float32),
             rejected_obs=rng.normal(size=(n, h, 3)).astype(np.float32),
             rejected_actions=rng.uniform(-2, 2, size=(n, h, 1)).astype(np.float32))
    task = _task(tmp_path, offline={"path": str(path)})
    pairs = task.pairs(task.build_policy(), 0)
    assert len(pairs) == n
    # segments with rewards are labelled by the task's teacher
    seg = tmp_path / "segments.npz"
    rewards = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, h))
    np.savez(seg, obs=rng.normal(size=(n, h, 3)).astype(np.float32),
             actions=rng.uniform(-2, 2, size=(n, h, 1)).astype(np.float32), rewards=rewards)
    task = _task(tmp_path, offline={"path": str(seg), "num_pairs": 7})
    labelled = task.pairs(task.build_policy(), 0)
    assert len(labelled) == 7
    ids = labelled.pair_indices
    assert (ids[:, 0] > ids[:, 1]).all()  # the oracle prefers the segment with the larger return
    bad = tmp_path / "bad.npz"
    np.savez(bad, chosen_obs=np.zeros((2, h, 5), np.float32), chosen_actions=np.zeros((2, h, 1), np.float32),
             rejected_obs=np.zeros((2, h, 5), np.float32), rejected_actions=np.zeros((2, h, 1), np.float32))
    task = _task(tmp_path, offline={"path": str(bad)})
    with pytest.raises(PrefoptError, match="obs_dim=5"):
        task.pairs(task.build_policy(), 0)


def test_checkpoint_base_and_bad_options(tmp_path):
    task = _task(tmp_path)
    policy = task.build_policy()
    from prefopt.train import export_policy

    path = tmp_path / "w.safetensors"
    export_policy(policy, path)
    loaded = _task(tmp_path, base={"kind": "checkpoint", "path": str(path)}).build_policy()
    for (name, a), b in zip(policy.network.state_dict().items(), loaded.network.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(PrefoptError, match="does not fit"):
        _task(tmp_path, hidden=(4,), base={"kind": "checkpoint", "path": str(path)}).build_policy()
    with pytest.raises(PrefoptError, match="pairing"):
        _task(tmp_path, pairing="zigzag")
    with pytest.raises(PrefoptError, match="base.kind"):
        _task(tmp_path, base={"kind": "magic"})
    with pytest.raises(PrefoptError, match="env_id"):
        _task(tmp_path, env_id="NoSuchEnv-v0").build_policy()
    with pytest.raises(PrefoptError, match="num_envs"):
        _task(tmp_path, num_envs=3)


@pytest.mark.parametrize("overrides", [["reference=adapter", "reference.rank=2"], ["loss=cpl", "reference=none"]])
def test_lora_reference_and_reference_free_cpl(tmp_path, overrides):
    summary = train(_cfg(tmp_path, "domain.task.num_heldout=4", *overrides))
    ev = summary["eval"]
    assert {"reference", "policy", "win_rate", "teacher_agreement_logp"} <= set(ev)
    # the saved weights are a plain network's (LoRA merged), loadable as a checkpoint base
    path = tmp_path / "run" / "policy.safetensors"
    task = _task(tmp_path, hidden=(16,), base={"kind": "checkpoint", "path": str(path)})
    loaded = task.build_policy()
    assert not any("lora" in name for name in loaded.network.state_dict())

"""What lets the control defaults run on a gymnasium env they were not tuned on, each with a one-line notice:

* a base behaviour that does not fit the env's spaces (``pendulum_energy`` on CartPole) is replaced by random
  actions (:func:`fitting_behaviour`);
* segments are cut to the episode lengths the policy actually reaches, so an env that ends episodes early
  (CartPole falls after ~20 random steps) still yields pairs (:func:`segment_plan`);
* ``pairing=branch`` needs an env that is deterministic given its reset seed and actions; where it is not,
  pairs are windows of two episodes from one reset seed instead (``same_start``; the task catches
  :class:`BranchingImpossible`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import numpy as np

from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


class BranchingImpossible(PrefoptError):
    """``pairing=branch`` cannot work on this env (two episodes with one seed and the same actions diverge)."""


def notice(message: str) -> None:
    """One line about a default that prefopt changed to fit the env (console and the run's cli.log)."""
    log.warning("prefopt: notice: %s", message)


def _valid_actions(actions: np.ndarray, action_space, n: int) -> bool:
    if hasattr(action_space, "n"):
        return actions.shape == (n,) and np.issubdtype(actions.dtype, np.integer) \
            and bool(((actions >= 0) & (actions < int(action_space.n))).all())
    return actions.shape == (n, *action_space.shape) and bool(np.isfinite(actions).all())


def behaviour_fits(function: Callable[..., np.ndarray], options: dict[str, Any], observation_space, action_space,
                   probes: int = 8, seed: int = 0) -> str | None:
    """None when ``function`` returns valid actions for a batch of observations drawn from the env's observation
    space; otherwise why not (its error, or what it returned)."""
    observation_space.seed(seed)
    obs = np.stack([observation_space.sample() for _ in range(probes)]).astype(np.float32)
    try:
        actions = np.asarray(function(obs, np.random.default_rng(seed), action_space, **options))
    except (PrefoptError, ValueError, IndexError, TypeError) as err:
        return str(err)
    if not _valid_actions(actions, action_space, probes):
        return f"it returned actions of shape {actions.shape} and dtype {actions.dtype} for {probes} observations"
    return None


class SegmentPlan(NamedTuple):
    """``segment_length`` and the last step a segment may start at (branch points lie in ``[0, limit - H]``)."""

    segment_length: int
    limit: int


def segment_plan(episode_lengths: np.ndarray, segment_length: int, episode_limit: int, env_id: str) -> SegmentPlan:
    """Segments that fit the episodes the policy really runs.

    With ``L`` the median episode length of a probe: when ``L`` leaves room for at least two segments
    (``L >= 2 H``) nothing changes but the branch points, which stay within the first ``L`` steps (an episode
    that has ended yields no segment); otherwise ``H`` becomes ``max(1, L // 2)`` with a notice.
    Envs whose episodes always run to their time limit (Pendulum) keep ``H`` and ``limit`` as configured.
    """
    lengths = np.asarray(episode_lengths)
    typical = int(np.median(lengths)) if lengths.size else episode_limit
    typical = max(1, min(typical, episode_limit))
    horizon = int(segment_length)
    if typical < 2 * horizon:
        adapted = max(1, typical // 2)
        if adapted < horizon:
            notice(f"{env_id}: episodes of the policy last {typical} steps (median of {lengths.size}), too short for "
                   f"segment_length={horizon}; segments of {adapted} steps are used instead")
            horizon = adapted
    return SegmentPlan(segment_length=horizon, limit=typical)

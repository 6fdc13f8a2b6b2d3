"""Behaviour policies: scripted controllers whose rollouts the base policy is cloned from.

A behaviour is ``f(obs [n, obs_dim] np.ndarray, rng: np.random.Generator, action_space, **options)``
returning one action per row. ``action_space`` is the single env's space.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from prefopt.errors import PrefoptError


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


__all__ = ["BEHAVIOURS", "cartpole_balance", "pendulum_energy", "random_behaviour", "resolve_behaviour"]

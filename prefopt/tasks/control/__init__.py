"""The control domain: DPO for gymnasium control policies on teacher-labelled pairs of trajectory segments.

One file per step of the loop, each readable on its own:

* :mod:`~prefopt.tasks.control.behaviours`: scripted behaviour policies the base policy is cloned from.
* :mod:`~prefopt.tasks.control.rollouts`: episodes on vectorised environments, as padded tensors.
* :mod:`~prefopt.tasks.control.cloning`: behaviour cloning of the base policy.
* :mod:`~prefopt.tasks.control.pairing`: pairs of segments (branch, same-start or random windows).
* :mod:`~prefopt.tasks.control.segments`: offline datasets of segment pairs (``.npz`` / ``datasets`` folders).
* :mod:`~prefopt.tasks.control.evaluation`: return, win rate and teacher agreement against the reference.
* :mod:`~prefopt.tasks.control.plotting`, :mod:`~prefopt.tasks.control.weights`: ``returns.png``; loading weights.
* :mod:`~prefopt.tasks.control.task`: :class:`ControlTask`, which puts them together (see its docstring).
"""

from prefopt.tasks.control.behaviours import (BEHAVIOURS, cartpole_balance, pendulum_energy, random_behaviour,
                                              resolve_behaviour)
from prefopt.tasks.control.pairing import pair_windows, split_windows
from prefopt.tasks.control.plotting import plot_returns
from prefopt.tasks.control.rollouts import Rollouts, make_envs, policy_actor, rollout
from prefopt.tasks.control.task import ControlTask
from prefopt.tasks.control.weights import load_network_weights

__all__ = ["BEHAVIOURS", "ControlTask", "Rollouts", "cartpole_balance", "load_network_weights", "make_envs",
           "pair_windows", "pendulum_energy", "plot_returns", "policy_actor", "random_behaviour", "resolve_behaviour", "rollout",
           "split_windows"]

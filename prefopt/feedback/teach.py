"""Scripted teachers beyond pairs: binary labels, scores and rankings from the same oracle.

These extend :class:`prefopt.data.teachers.ScriptedTeacher` (B-Pref's knobs) from two items to one or
``K`` items, so that ``K = 2`` gives back the pair teacher's answer:

* **Returns** ``R`` (undiscounted) and the teacher's *perceived* returns ``D`` (myopia ``gamma`` applied),
  exactly as :meth:`ScriptedTeacher.label` computes them (per-step rewards ``[.., H]`` or one scalar).
* **Scores** (:func:`teacher_scores`) are ``D`` for a rational teacher (``beta = inf``). With a finite
  ``beta`` a standard Gumbel draw divided by ``beta`` is added: sorting such scores samples a ranking from
  the Plackett-Luce model with weights ``exp(beta D)`` -- for two items ``P(second first) =
  sigmoid(beta (D2 - D1))``, the pair teacher's Bradley-Terry rule; ``beta = 0`` gives a uniform random
  order. Mistakes (``eps``) have no meaning for a score, so a teacher with ``eps > 0`` refuses to score.
* **Rankings** (:func:`rank`): the items sorted by score, best first (a stable sort: an exact draw goes to
  the earlier item, as the pair teacher gives it to the first). Then, with probability ``eps``, one
  uniformly chosen adjacent pair of the ranking is swapped (for ``K = 2`` this is the pair teacher's label
  flip). Ties: the pair of positions ``(a, b)`` is tied when ``|R_a - R_b| < equal_threshold``. Skip: a group
  is kept only when its best return is above ``skip_threshold``.
* **Binary labels** (:func:`binary_labels`): an item is desirable when ``D > threshold`` (rational) or with
  probability ``sigmoid(beta (D - threshold))``, then flipped with probability ``eps``. ``threshold``
  is a number, ``"median"`` (the median ``D`` of the items labelled together, which makes the labels
  about half desirable, as KTO recommends) or ``"group_mean"`` (the mean ``D`` of the item's group of
  ``group_size`` consecutive items, e.g. the samples of one context or start state: a judgement relative
  to what is usual there). Skip: ``keep = R > skip_threshold``; equal: an item with ``|D - threshold| <
  equal_threshold`` is too close to call and is not kept.

  **Samples that share a start state** (``start_size``, from :attr:`~prefopt.feedback.data.Groups.start_size`):
  where runs of ``start_size`` consecutive items start from one state (control segments branched from one
  start state), a return says mostly *where* a sample started, not how well it acted from there. A label
  from it would judge the start state, which the policy cannot change: with ``threshold=median`` about two
  thirds of Pendulum's branch pairs got one label for both branches, and KTO pushed the policy's own
  swing-up actions down wherever the pendulum starts low (the policy got worse than the reference). So the
  teacher judges what the sample did: ``D`` is replaced by its *advantage*, ``D`` minus the mean ``D`` of its
  start state's items, before any threshold (a number, the median, the group mean) applies. For two
  branches the labels are then the pair teacher's answer: the better branch desirable, the other not.
  Scores and rankings are made from the same advantages (and ``R``'s, for ties): within a start state the
  order is the returns' order; across start states (a group of ``K = 4`` control segments holds two branch
  pairs) the samples are compared by how much better they did than the other branch from their start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.data.teachers import ScriptedTeacher
from prefopt.errors import PrefoptError
from prefopt.feedback.losses import pair_indices

THRESHOLDS = ("median", "group_mean")


@dataclass
class BinaryLabels:
    """``label`` int64 ``[N]`` (1 desirable, 0 undesirable) and ``keep`` bool ``[N]``."""

    label: torch.Tensor
    keep: torch.Tensor


@dataclass
class Ranking:
    """``order`` int64 ``[G, K]`` (item indices, best first), ``tie`` bool ``[G, K(K-1)/2]`` over the position
    pairs of :func:`~prefopt.feedback.losses.pair_indices`, ``keep`` bool ``[G]``."""

    order: torch.Tensor
    tie: torch.Tensor
    keep: torch.Tensor


def _generator(teacher: ScriptedTeacher, generator):
    gen = teacher._generator if generator is None else generator
    if not isinstance(gen, torch.Generator):
        raise PrefoptError(f"teacher generator of type {type(gen).__name__} is not supported; allowed: torch.Generator")
    return gen


def _returns(teacher: ScriptedTeacher, rewards, mask=None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(R, D) flattened to ``[M]`` and the leading shape; ``rewards`` is ``[..., H]`` per-step or ``[...]``."""
    r = torch.as_tensor(rewards).detach().cpu().to(torch.float64)
    m = None if mask is None else torch.as_tensor(mask).detach().cpu()
    if m is not None and r.dim() == m.dim() and m.shape == r.shape:
        lead = tuple(r.shape[:-1])
        flat_r, flat_m = r.reshape(-1, r.shape[-1]), m.reshape(-1, m.shape[-1])
    elif m is None:
        lead = tuple(r.shape)
        flat_r, flat_m = r.reshape(-1), None
    else:
        raise PrefoptError(f"teacher mask shape {tuple(m.shape)} does not match the rewards' shape {tuple(r.shape)}")
    return teacher.returns(flat_r, flat_m), teacher.returns(flat_r, flat_m, discounted=True), lead


def _item_returns(teacher: ScriptedTeacher, rewards, mask, dims: tuple[str, ...], what: str):
    """(R, D, leading shape) of items whose rewards are one scalar each (shape ``dims``) or per step (``dims``
    plus ``H``, with ``mask``; without one, every step is real)."""
    rewards = torch.as_tensor(rewards)
    if mask is None and rewards.dim() == len(dims) + 1:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    ret, disc, lead = _returns(teacher, rewards, mask)
    if len(lead) != len(dims):
        shape = ", ".join(dims)
        raise PrefoptError(f"{what}: rewards of shape {tuple(rewards.shape)}; allowed: [{shape}] or [{shape}, H]")
    return ret, disc, lead


def _runs(values: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``values`` ``[N]`` as ``[N / size, size]`` runs of consecutive items."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or values.numel() % size:
        raise PrefoptError(f"binary_labels: {values.numel()} items do not split into {what} of {size!r}")
    return values.reshape(-1, size)


def advantages(values: torch.Tensor, start_size: int | None) -> torch.Tensor:
    """``values`` ``[N]`` minus the mean of their run of ``start_size`` consecutive items (one start state);
    unchanged for ``None``. Within a run the order is kept; across runs, the values become comparable."""
    if start_size is None:
        return values
    runs = _runs(values, start_size, "start states")
    return (runs - runs.mean(1, keepdim=True)).reshape(-1)


def binary_labels(teacher: ScriptedTeacher, rewards, mask=None, threshold: float | str = "median",
                  generator=None, group_size: int = 1, start_size: int | None = None) -> BinaryLabels:
    """Desirable/undesirable labels for ``N`` items from their rewards ``[N]`` or ``[N, H]`` (with ``mask``).

    Without a mask a 2-D ``rewards`` is per-step ``[N, H]``; a 1-D one is one scalar per item. ``group_size``:
    items per group (for ``threshold="group_mean"``); ``start_size``: runs of this many consecutive items
    share a start state, and each item is judged by its advantage over them (see the module docstring).
    """
    ret, disc, _ = _item_returns(teacher, rewards, mask, ("N",), "binary_labels")
    disc = advantages(disc, start_size)  # judge what a sample did from its start state, not where it started
    if isinstance(threshold, str):
        if threshold not in THRESHOLDS:
            raise PrefoptError(f"feedback.threshold={threshold!r} is not supported; allowed: a number, median or "
                               "group_mean")
        if threshold == "group_mean":
            cut = _runs(disc, group_size, "groups").mean(1).repeat_interleave(group_size)
        else:
            cut = disc.median() if disc.numel() else torch.tensor(0.0, dtype=torch.float64)
    else:
        cut = torch.tensor(float(threshold), dtype=torch.float64)
    gen = _generator(teacher, generator)
    n = disc.shape[0]
    if teacher.rational:
        label = (disc > cut).to(torch.int64)
    else:
        p = torch.sigmoid(teacher.beta * (disc - cut)) if teacher.beta > 0 else torch.full((n,), 0.5, dtype=torch.float64)
        label = (torch.rand(n, generator=gen, dtype=torch.float64) < p).to(torch.int64)
    if teacher.eps > 0:
        flip = torch.rand(n, generator=gen, dtype=torch.float64) < teacher.eps
        label = torch.where(flip, 1 - label, label)
    keep = torch.ones(n, dtype=torch.bool)
    if teacher.skip_threshold is not None:
        keep &= ret > teacher.skip_threshold
    if teacher.equal_threshold is not None:
        keep &= (disc - cut).abs() >= teacher.equal_threshold
    return BinaryLabels(label, keep)


def teacher_scores(teacher: ScriptedTeacher, rewards, mask=None, generator=None,
                   start_size: int | None = None) -> torch.Tensor:
    """Scores ``[G, K]`` from rewards ``[G, K]`` (one scalar per item) or ``[G, K, H]`` per-step (with ``mask``);
    with ``start_size``, the advantages over each start state's items (see the module docstring)."""
    if teacher.eps > 0:
        raise PrefoptError(f"ScriptedTeacher eps={teacher.eps}: a teacher that makes mistakes gives no scores; "
                           "use eps=0 (kind oracle, stochastic, myopic, skip or equal) for feedback=scores")
    _, disc, lead = _item_returns(teacher, rewards, mask, ("G", "K"), "teacher scores")
    scores = advantages(disc, start_size).reshape(lead)
    if not teacher.rational:
        gen = _generator(teacher, generator)
        uniform = torch.rand(lead, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))
        scores = scores + gumbel / teacher.beta if teacher.beta > 0 else gumbel
    return scores


def sort_scores(scores: torch.Tensor) -> torch.Tensor:
    """Item indices ``[G, K]`` best first; equal scores keep their item order (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def rank(teacher: ScriptedTeacher, rewards, mask=None, generator=None, start_size: int | None = None) -> Ranking:
    """A ranking of each group's ``K`` items (see the module docstring); with ``start_size``, by advantage."""
    eps, teacher.eps = teacher.eps, 0.0  # scores without mistakes; the swaps below are the mistakes
    try:
        scores = teacher_scores(teacher, rewards, mask, generator, start_size)
    finally:
        teacher.eps = eps
    groups, k = scores.shape
    order = sort_scores(scores)
    if teacher.eps > 0 and k > 1:
        gen = _generator(teacher, generator)
        swap = torch.rand(groups, generator=gen, dtype=torch.float64) < teacher.eps
        where = torch.randint(0, k - 1, (groups,), generator=gen)
        rows = swap.nonzero().flatten()
        first, second = order[rows, where[rows]].clone(), order[rows, where[rows] + 1].clone()
        order[rows, where[rows]], order[rows, where[rows] + 1] = second, first
    ret, _, _ = _item_returns(teacher, rewards, mask, ("G", "K"), "rank")
    ret = advantages(ret, start_size).reshape(groups, k).gather(1, order)
    a, b = pair_indices(k)
    tie = torch.zeros(groups, a.numel(), dtype=torch.bool)
    if teacher.equal_threshold is not None:
        tie = (ret[:, a] - ret[:, b]).abs() < teacher.equal_threshold
    keep = torch.ones(groups, dtype=torch.bool)
    if teacher.skip_threshold is not None:
        keep = ret.max(dim=1).values > teacher.skip_threshold
    return Ranking(order, tie, keep)

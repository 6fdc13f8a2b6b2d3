"""Losses for feedback that is not one pair: per-sample labels (KTO), rankings of K samples.

Pure tensor functions, like :mod:`prefopt.losses`; nothing is reduced here and nothing knows a domain.
Notation as there: ``lp`` policy log-likelihood, ``ref`` reference log-likelihood, ``u = lp - ref``,
``b = beta``, ``ls(x) = log sigmoid(x)``.

Unpaired (binary) feedback, :func:`unpaired_loss` -- TRL 1.16 ``KTOTrainer._compute_loss``
(``trl/trainer/kto_trainer.py``: KL at lines 1442-1446, losses at 1447-1482, reduction at 1548)::

    kto                desirable    w_d (1 - sigmoid(b (u - z0)))
                       undesirable  w_u (1 - sigmoid(b (z0 - u)))
    apo_zero_unpaired  desirable    w_d (1 - sigmoid(b u))
                       undesirable  w_u sigmoid(b u)

``w_d, w_u`` are TRL's ``desirable_weight`` and ``undesirable_weight``. The batch loss is the mean of
these over *all* samples of the batch (TRL: ``losses.nanmean()`` over the concatenated desirable and
undesirable losses), so the weights scale terms but do not renormalise. The rewards are ``b u``.

``z0`` is KTO's reference point, an estimate of ``KL(pi || pi_ref)``; :func:`kto_kl` computes it as TRL
does (lines 1442-1446): ``z0 = max(0, mean(lp' - ref'))`` over a set of samples, detached (no gradient
flows through it). Which samples is the caller's choice (see :mod:`prefopt.feedback.module`): TRL
scores *mismatched* pairs, the completion of example ``i - 1`` under the prompt of example ``i``
(lines 1141-1157: the completions rotated by one within each batch).

Rankings (``K >= 2`` samples per group, best first; ``r_k = b u_k`` the implicit reward of rank ``k``):

``plackett_luce`` (:func:`plackett_luce_loss`) is the listwise DPO objective of Rafailov et al. 2023,
"Direct Preference Optimization", Appendix A.3 (the Plackett-Luce model, eq. 19 there, with the
DPO reparameterisation of the reward, eq. 20)::

    loss = - sum_{k=1}^{K} log( exp(r_k) / sum_{j=k}^{K} exp(r_j) )
         =   sum_{k=1}^{K-1} ( logsumexp(r_k, ..., r_K) - r_k )

(the ``k = K`` factor is 1). For ``K = 2`` it is ``logsumexp(r_1, r_2) - r_1 = -ls(r_1 - r_2)``, DPO's
sigmoid loss. This is also LiPO's "DPO-PL" baseline (Liu et al. 2024, "LiPO: Listwise Preference
Optimization through Learning-to-Rank", section 3). The order is taken as strict: ties are used by the
all-pairs loss only.

``all_pairs`` (:func:`ranking_pair_losses`): every pair ``(a, b)``, ``a < b``, of a group's ranking is a
preference pair ``a > b`` scored by the configured pairwise loss (:func:`prefopt.losses.preference_loss`),
with ties handled as :class:`prefopt.module.PreferenceModule` handles tied pairs (``drop`` or ``half``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from prefopt.errors import PrefoptError, check_choice
from prefopt.losses import preference_loss

UNPAIRED_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
LISTWISE_LOSS_TYPES: tuple[str, ...] = ("plackett_luce",)
TIE_MODES = ("drop", "half")
#: how KTO's reference point is estimated (see :class:`prefopt.feedback.module.BinaryFeedbackModule`)
KL_ESTIMATES: tuple[str, ...] = ("mismatched", "batch")


class UnpairedLossOutput(NamedTuple):
    losses: Tensor  # [N], weighted per-sample losses; the batch loss is their mean
    rewards: Tensor  # [N], detached b * u


class RankingLossOutput(NamedTuple):
    losses: Tensor  # [G] (plackett_luce) or [G, P] (all_pairs)
    weights: Tensor  # same shape: 0 for dropped (tied) terms, else 1
    rewards: Tensor  # [G, K], detached implicit rewards


def _check(name: str, value: Any, shape=None) -> Tensor:
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise PrefoptError(f"{name} must be a floating-point tensor; got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise PrefoptError(f"{name} has shape {tuple(value.shape)}; expected {tuple(shape)}")
    return value


def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or beta != beta:
        raise PrefoptError(f"beta={beta!r} is not supported; allowed: a finite number > 0")
    return float(beta)


def kto_kl(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """KTO's reference point ``max(0, mean(lp - ref))``, detached (a 0-dim tensor)."""
    return (policy_logps.detach() - ref_logps.detach()).mean().clamp(min=0)


def unpaired_loss(loss_type: str, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, beta: float,
                  kl: Tensor | float | None = None, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> UnpairedLossOutput:
    """Per-sample KTO / unpaired APO-zero losses (see the module docstring).

    Args:
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        policy_logps, ref_logps: ``[N]`` log-likelihoods of the samples.
        labels: ``[N]``, 1 (or True) for desirable, 0 for undesirable.
        beta: > 0.
        kl: KTO's reference point ``z0`` (from :func:`kto_kl`); required by ``kto``, must be ``None`` for
            ``apo_zero_unpaired`` (TRL computes no KL term for it).
        desirable_weight, undesirable_weight: >= 0.
    """
    check_choice("loss_type", loss_type, UNPAIRED_LOSS_TYPES)
    beta = _check_beta(beta)
    policy_logps = _check("policy_logps", policy_logps)
    if policy_logps.dim() != 1:
        raise PrefoptError(f"policy_logps has shape {tuple(policy_logps.shape)}; expected [N]")
    ref_logps = _check("ref_logps", ref_logps, policy_logps.shape).detach()
    if not torch.is_tensor(labels) or tuple(labels.shape) != tuple(policy_logps.shape):
        raise PrefoptError(f"labels must be a tensor of shape {tuple(policy_logps.shape)} with 0/1 values")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise PrefoptError(f"{name}={weight!r} is not supported; allowed: a number >= 0")
    if loss_type == "kto" and kl is None:
        raise PrefoptError("loss_type='kto' needs kl, the reference point z0 (see prefopt.feedback.losses.kto_kl)")
    if loss_type == "apo_zero_unpaired" and kl is not None:
        raise PrefoptError("loss_type='apo_zero_unpaired' uses no KL reference point; pass kl=None")

    desirable = labels.to(torch.bool)
    u = policy_logps - ref_logps
    if loss_type == "kto":
        z0 = torch.as_tensor(kl, dtype=u.dtype, device=u.device).detach()
        good = 1.0 - torch.sigmoid(beta * (u - z0))
        bad = 1.0 - torch.sigmoid(beta * (z0 - u))
    else:
        good = 1.0 - torch.sigmoid(beta * u)
        bad = torch.sigmoid(beta * u)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return UnpairedLossOutput(losses, (beta * u).detach())


def _rewards(policy_logps: Tensor, ref_logps: Tensor | None, beta: float) -> Tensor:
    return beta * (policy_logps if ref_logps is None else policy_logps - ref_logps)


def plackett_luce_loss(policy_logps: Tensor, ref_logps: Tensor | None, *, beta: float) -> RankingLossOutput:
    """Listwise DPO loss per group, ``[G]``, for ``[G, K]`` log-likelihoods ranked best first.

    Without ``ref_logps`` (a reference-free setting) the rewards are ``b * lp``.
    """
    beta = _check_beta(beta)
    policy_logps = _check("policy_logps", policy_logps)
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise PrefoptError(f"policy_logps has shape {tuple(policy_logps.shape)}; expected [G, K] with K >= 2")
    if ref_logps is not None:
        ref_logps = _check("ref_logps", ref_logps, policy_logps.shape).detach()
    r = _rewards(policy_logps, ref_logps, beta)
    # tail[:, k] = logsumexp(r[:, k:]): a reverse cumulative logsumexp
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    losses = (tail[:, :-1] - r[:, :-1]).sum(-1)
    return RankingLossOutput(losses, torch.ones_like(losses), r.detach())


def pair_indices(k: int, device=None) -> tuple[Tensor, Tensor]:
    """The ``K (K - 1) / 2`` pairs ``(a, b)``, ``a < b``, of a ranking of ``k``, in row-major order."""
    a, b = torch.triu_indices(k, k, offset=1, device=device)
    return a, b


def pairwise_losses_with_ties(loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              tie: Tensor | None = None, ties: str = "drop", *, chosen_lengths=None,
                              rejected_lengths=None, **loss_kwargs):
    """``preference_loss`` per pair with :class:`~prefopt.module.PreferenceModule`'s tie rule.

    Returns ``(losses [P], weights [P], output)``: ``drop`` gives tied pairs weight 0; ``half`` keeps them
    with the mean of the loss both ways round.
    """
    check_choice("loss.ties", ties, TIE_MODES)
    out = preference_loss(loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **loss_kwargs)
    losses, weights = out.losses, torch.ones_like(out.losses)
    if tie is not None:
        tie = tie.to(torch.bool)
        if ties == "drop":
            weights = (~tie).to(losses.dtype)
        else:
            swapped = preference_loss(loss_type, policy_rejected, policy_chosen, ref_rejected, ref_chosen,
                                      chosen_lengths=rejected_lengths, rejected_lengths=chosen_lengths,
                                      **loss_kwargs).losses
            losses = torch.where(tie, 0.5 * (losses + swapped), losses)
    return losses, weights, out


def ranking_pair_losses(loss_type, policy_logps: Tensor, ref_logps: Tensor | None, *, beta: float,
                        lengths: Tensor | None = None, tie: Tensor | None = None, ties: str = "drop",
                        **loss_kwargs) -> RankingLossOutput:
    """All pairs of each group's ranking with a pairwise loss: losses and weights ``[G, P]``.

    ``policy_logps``, ``ref_logps`` and ``lengths`` are ``[G, K]``, ranked best first; ``tie`` is
    ``[G, P]`` over the pairs of :func:`pair_indices` (True where the two samples are judged equal).
    """
    policy_logps = _check("policy_logps", policy_logps)
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise PrefoptError(f"policy_logps has shape {tuple(policy_logps.shape)}; expected [G, K] with K >= 2")
    groups, k = policy_logps.shape
    a, b = pair_indices(k, policy_logps.device)
    num = a.numel()
    if tie is not None and tuple(tie.shape) != (groups, num):
        raise PrefoptError(f"tie has shape {tuple(tie.shape)}; expected [G, K(K-1)/2] = {(groups, num)}")

    def pick(x, idx):
        return None if x is None else x[:, idx].reshape(-1)

    losses, weights, out = pairwise_losses_with_ties(
        loss_type, pick(policy_logps, a), pick(policy_logps, b), pick(ref_logps, a), pick(ref_logps, b),
        None if tie is None else tie.reshape(-1), ties, beta=beta, chosen_lengths=pick(lengths, a),
        rejected_lengths=pick(lengths, b), **loss_kwargs)
    rewards = _rewards(policy_logps, None if ref_logps is None else ref_logps.detach(), _check_beta(beta))
    return RankingLossOutput(losses.reshape(groups, num), weights.reshape(groups, num), rewards.detach())


def ranking_loss(loss_type, policy_logps: Tensor, ref_logps: Tensor | None, *, beta: float, **kwargs
                 ) -> RankingLossOutput:
    """``plackett_luce`` (listwise) or any pairwise ``loss_type`` over all pairs of the ranking."""
    if loss_type in LISTWISE_LOSS_TYPES:
        extra = {k: v for k, v in kwargs.items() if v is not None and k not in ("lengths", "tie", "ties")}
        if extra:
            raise PrefoptError(f"loss_type='plackett_luce' takes only beta; got options {sorted(extra)}")
        return plackett_luce_loss(policy_logps, ref_logps, beta=beta)
    return ranking_pair_losses(loss_type, policy_logps, ref_logps, beta=beta, **kwargs)

"""Lightning modules for binary and ranking feedback: :class:`~prefopt.module.PreferenceModule` with another
batch layout.

Everything but the training step is inherited: the reference strategies (``copy``, ``adapter``, ``sync``,
``none`` for reference-free losses), the seeded per-step draws, the optimizer and scheduler, the
non-finite guard and the hooks. Only how a batch becomes log-likelihoods and a loss differs.

Stochastic likelihoods (diffusion) draw their randomness once per batch and share it between the policy
and the reference, as for pairs. The draw is shared *within a group*: the pair layout has rows ``i`` and
``i + B`` share one draw; a ranking batch of ``K * G`` rows has rows ``i, i + G, ..., i + (K-1) G`` (the
``K`` samples of group ``i``) share one, which is ``policy.draw(samples, generator, group=K)``. A binary
batch draws one per row (``group=1``), or, when it also scores TRL's mismatched KL rows, one per
(sample, mismatched sample) couple (the pair draw, ``group=2``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch

from prefopt.errors import PrefoptError, check_choice
from prefopt.feedback.data import (
    concatenate_ranked,
    can_mismatch,
    concatenate_samples,
    is_pair_batch,
    mismatched_samples,
    pairs_as_ranking,
    pairs_as_samples,
    sample_conditions,
    split_ranked,
    stack_rows,
)
from prefopt.feedback.losses import (
    KL_ESTIMATES,
    LISTWISE_LOSS_TYPES,
    UNPAIRED_LOSS_TYPES,
    kto_kl,
    pair_indices,
    ranking_loss,
    unpaired_loss,
)
from prefopt.losses import LOSS_TYPES
from prefopt.module import PreferenceModule
from prefopt.policy import PreferencePolicy, split_pairs
from prefopt.reference import PrecomputedReference

log = logging.getLogger(__name__)

NO_CONDITION = ("loss.kl=mismatched: a batch marks no condition apart from its samples (no context, class, "
                "observation or prompt to pair another sample with, e.g. an unconditional model), so KTO's "
                "reference point there is the batch's own mean log-ratio, as with loss.kl=batch")
_NOTICED: set[str] = set()


def once(message: str) -> None:
    """Log ``message`` as a ``prefopt: notice:`` line, once per process."""
    if message not in _NOTICED:
        _NOTICED.add(message)
        log.warning("prefopt: notice: %s", message)


def draws_groups(policy: PreferencePolicy) -> bool:
    """Whether ``policy.draw`` takes ``group`` (rows sharing one draw), read from its signature."""
    parameters = inspect.signature(policy.draw).parameters.values()
    return any(p.name == "group" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               or p.kind == p.VAR_KEYWORD for p in parameters)


def draw_groups(policy: PreferencePolicy, samples: Mapping[str, Any], generator, group: int):
    """``policy.draw`` with ``group`` rows sharing one draw (``group=2`` is the pair draw every adapter has)."""
    if group == 2 or not policy.stochastic:
        return policy.draw(samples, generator)
    if not draws_groups(policy):
        raise PrefoptError(
            f"{type(policy).__name__}.draw shares one draw between the two rows of a pair only; binary and "
            f"ranking feedback need draw(samples, generator, group=K) (rows i, i + N/K, ... share one draw)"
        )
    return policy.draw(samples, generator, group=group)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask``; NaN where nothing is selected (no host sync)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp_min(1), torch.full_like(count, float("nan")))


class _FeedbackModule(PreferenceModule):
    """Shared construction: options of the feedback kind are taken out of ``loss`` before the base sees it."""

    kind = "feedback"
    allowed_losses: tuple[str, ...] = ()
    own_options: tuple[str, ...] = ()

    def configure_loss(self, options):
        return None  # the feedback losses (prefopt.feedback.losses) check their own options

    def __init__(self, policy: PreferencePolicy, loss: Mapping[str, Any] | None = None, **kwargs):
        loss = dict(loss or {})
        names = [loss.get("loss_type")] if isinstance(loss.get("loss_type"), str) else list(loss.get("loss_type") or [])
        for name in names:
            check_choice(f"loss_type (feedback={self.kind})", name, self.allowed_losses)
        self.options = {k: loss.pop(k) for k in self.own_options if k in loss}
        super().__init__(policy, loss=loss, **kwargs)
        if isinstance(self.reference, PrecomputedReference):
            raise PrefoptError(f"reference=precomputed caches pair batches only; feedback={self.kind} supports "
                               "reference=copy, adapter, sync or none")


class BinaryFeedbackModule(_FeedbackModule):
    """KTO / unpaired APO-zero on batches of single samples with a 0/1 ``label`` (see :mod:`prefopt.feedback`).

    Pair batches are accepted too: their chosen samples are desirable and their rejected ones undesirable
    (TRL's ``unpair_preference_dataset``); a tied pair's two samples are left out of the loss.

    ``loss`` holds ``loss_type`` (``kto`` or ``apo_zero_unpaired``), ``beta``, ``desirable_weight`` and
    ``undesirable_weight`` (TRL's defaults 1.0) and ``kl`` -- how KTO's reference point is estimated:

    * ``mismatched`` (default, TRL's choice): the mean log-ratio of the batch's conditions paired with the
      previous row's sample (one extra forward of the policy and the reference, both without gradient).
      The condition is the batch's condition tensors (a context, a class label; a control segment's
      observations, :attr:`ControlPolicy.sample_conditions`) or, for token sequences, each row's prompt: row
      ``i`` is scored as its prompt followed by row ``i - 1``'s completion, as TRL does
      (:func:`~prefopt.feedback.data.mismatched_samples`). A batch with nothing but its samples (an
      unconditional model) has nothing to mismatch: its own log-ratios are used, as with ``batch``, and a
      notice says so once.
    * ``batch``: the mean log-ratio of the batch's own (matched) samples, detached: no extra forward.
    """

    kind = "binary"
    allowed_losses = UNPAIRED_LOSS_TYPES
    own_options = ("desirable_weight", "undesirable_weight", "kl")

    def __init__(self, policy, loss=None, **kwargs):
        super().__init__(policy, loss, **kwargs)
        self.desirable_weight = float(self.options.get("desirable_weight", 1.0))
        self.undesirable_weight = float(self.options.get("undesirable_weight", 1.0))
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) >= 0:
                raise PrefoptError(f"loss.{name}={getattr(self, name)} is not supported; allowed: a number >= 0")
        self.kl_estimate = self.options.get("kl", "mismatched")
        check_choice("loss.kl", self.kl_estimate, KL_ESTIMATES)
        extra = sorted(set(self.loss_kwargs) - {"loss_type", "beta", "label_smoothing"})
        if extra or self.loss_kwargs.get("label_smoothing", 0.0) != 0.0:
            raise PrefoptError(f"loss options {extra or ['label_smoothing']} are not used by loss_type "
                               f"{self.loss_kwargs['loss_type']!r}; allowed: beta, desirable_weight, "
                               "undesirable_weight, kl")

    def sample_logps(self, batch: Mapping[str, Any], generator=None):
        """Policy and reference log-likelihoods ``[B]`` of the samples, and the KL reference point (or None)."""
        loss_type = self.loss_kwargs["loss_type"]
        samples = concatenate_samples(batch)
        mismatched = loss_type == "kto" and self.kl_estimate == "mismatched"
        if mismatched and not can_mismatch(batch):
            once(NO_CONDITION)
        if mismatched and can_mismatch(batch):  # one forward: the B samples, then their B mismatched rows
            both = stack_rows(samples, mismatched_samples(batch))  # row i and i + B share a draw
            draw = draw_groups(self.policy, both, generator, 2)
            logps = self.policy.log_likelihood(self.policy.network, both, draw)
            ref = self.reference.logps(self.policy, both, draw)
            (logps, kl_logps), (ref, kl_ref) = split_pairs(logps), split_pairs(ref)
            return logps, ref, kto_kl(kl_logps, kl_ref)
        draw = draw_groups(self.policy, samples, generator, 1)
        logps = self.policy.log_likelihood(self.policy.network, samples, draw)
        ref = self.reference.logps(self.policy, samples, draw)
        kl = kto_kl(logps, ref) if loss_type == "kto" else None
        return logps, ref, kl

    def _reduce_kl(self, kl):
        if kl is None or self._trainer is None or self.trainer.world_size == 1:
            return kl
        return self.trainer.strategy.reduce(kl.detach(), reduce_op="mean").clamp(min=0)  # TRL: gathered mean

    def _shared_step(self, batch, stage: str, index: int):
        from_pairs = is_pair_batch(batch)
        if from_pairs:
            batch = pairs_as_samples(batch, sample_conditions(self.policy))
        logps, ref, kl = self.sample_logps(batch, self._generator(stage, index))
        kl = self._reduce_kl(kl)
        if kl is not None and kl.dim():
            kl = kl.mean()
        label = batch["label"]
        out = unpaired_loss(self.loss_kwargs["loss_type"], logps, ref, label, beta=self.loss_kwargs["beta"], kl=kl,
                            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        weight = batch.get("weight")  # tied pairs split into samples carry weight 0
        loss = out.losses.mean() if weight is None else (out.losses * weight).sum() / weight.sum().clamp_min(1.0)
        if not self._check_finite(stage, index, batch, logps=logps, reference_logps=ref, loss=loss):
            return None
        self._log(stage, loss, out.rewards, logps, label.to(torch.bool), kl, batch_size=logps.shape[0],
                  pair_weight=(weight if weight is not None else torch.ones_like(logps)) if from_pairs else None)
        return loss

    def _log(self, stage, loss, rewards, logps, desirable, kl, batch_size, pair_weight=None):
        on_step = stage == "train"
        if on_step and not self._logger_writes_now():
            self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch_size, logger=False)
            return
        point = None if kl is None else self.loss_kwargs["beta"] * kl
        metrics = {"loss": loss.detach(), **binary_metrics(rewards, logps, desirable, point, pair_weight)}
        if kl is not None:
            metrics["kl"] = kl
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, on_step=on_step, on_epoch=not on_step,
                      batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}_loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, logger=False, sync_dist=not on_step)


def binary_metrics(rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor,
                   reference_point: torch.Tensor | float | None = None,
                   pair_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Metrics of a batch of labelled samples (TRL's names where TRL has one).

    ``rewards`` are the implicit rewards ``b u``; ``desirable`` the labels. ``rewards/chosen`` and
    ``logps/chosen`` average the desirable samples, ``.../rejected`` the undesirable ones (TRL's KTO metrics).
    ``rewards/label_accuracies``: the share of samples whose reward, measured from the loss's reference point
    (``b z0`` for KTO, 0 for APO-zero), has the label's sign: ``> 0`` for a desirable sample, ``< 0`` for an
    undesirable one (TRL has no accuracy for unpaired feedback; like its DPO accuracy, a tie is wrong).
    With ``pair_weight`` (samples split from pairs: chosen ``i``, rejected ``i + B``; 0 for a tied pair's
    samples, which no accuracy counts) also ``rewards/accuracies``, TRL's DPO metric: the share of kept pairs
    whose chosen reward is the larger.
    """
    rewards = rewards.detach()
    chosen, rejected = _masked_mean(rewards, desirable), _masked_mean(rewards, ~desirable)
    margin = rewards if reference_point is None else rewards - reference_point
    right = torch.where(desirable, margin > 0, margin < 0).to(rewards.dtype)
    kept = torch.ones_like(desirable) if pair_weight is None else pair_weight > 0  # a tied pair's samples: weight 0
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/label_accuracies": _masked_mean(right, kept),
               "logps/chosen": _masked_mean(logps.detach(), desirable),
               "logps/rejected": _masked_mean(logps.detach(), ~desirable)}
    if pair_weight is not None:
        chosen_r, rejected_r = split_pairs(rewards)
        metrics["rewards/accuracies"] = _masked_mean((chosen_r > rejected_r).to(rewards.dtype),
                                                     split_pairs(pair_weight)[0] > 0)
    return metrics


class RankingFeedbackModule(_FeedbackModule):
    """Rankings of ``K`` samples per group, scored in one forward of ``K * G`` rows.

    ``loss_type=plackett_luce`` is the listwise DPO loss; any pairwise loss type of :mod:`prefopt.losses`
    is applied to all ``K (K-1) / 2`` pairs of each ranking (ties by ``loss.ties``), averaged over the kept
    pairs of the batch. A pair batch is a batch of rankings of two (chosen first).
    """

    kind = "ranking"
    allowed_losses = LOSS_TYPES + LISTWISE_LOSS_TYPES

    def __init__(self, policy, loss=None, **kwargs):
        super().__init__(policy, loss, **kwargs)
        if self.listwise:
            extra = sorted(set(self.loss_kwargs) - {"loss_type", "beta", "label_smoothing"})
            if extra or self.loss_kwargs.get("label_smoothing", 0.0) != 0.0:
                raise PrefoptError(f"loss options {extra or ['label_smoothing']} are not used by loss_type "
                                   "'plackett_luce'; allowed: beta")

    @property
    def listwise(self) -> bool:
        return self.loss_kwargs["loss_type"] in LISTWISE_LOSS_TYPES

    def ranked_logps(self, batch: Mapping[str, Any], generator=None):
        """Policy and reference log-likelihoods and lengths ``[G, K]``, one forward each."""
        samples, k = concatenate_ranked(batch)
        draw = draw_groups(self.policy, samples, generator, k)
        logps = self.policy.log_likelihood(self.policy.network, samples, draw)
        ref = self.reference.logps(self.policy, samples, draw)
        lengths = self.policy.lengths(samples)

        def grid(x):
            return None if x is None else split_ranked(x, k)

        return grid(logps), grid(ref), grid(lengths)

    def _shared_step(self, batch, stage: str, index: int):
        if is_pair_batch(batch):
            batch = pairs_as_ranking(batch)
        logps, ref, lengths = self.ranked_logps(batch, self._generator(stage, index))
        kwargs = dict(self.loss_kwargs)
        loss_type = kwargs.pop("loss_type")
        if self.listwise:
            out = ranking_loss(loss_type, logps, ref, beta=kwargs["beta"])
        else:
            out = ranking_loss(loss_type, logps, ref, lengths=lengths, tie=batch.get("tie"), ties=self.ties, **kwargs)
        loss = (out.losses * out.weights).sum() / out.weights.sum().clamp_min(1.0)
        if not self._check_finite(stage, index, batch, logps=logps, reference_logps=ref, loss=loss):
            return None
        self._log(stage, loss, out.rewards, logps, batch.get("tie"), batch_size=logps.shape[0])
        return loss

    def _log(self, stage, loss, rewards, logps, tie, batch_size):
        on_step = stage == "train"
        if on_step and not self._logger_writes_now():
            self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch_size, logger=False)
            return
        metrics = {"loss": loss.detach(), **ranking_metrics(rewards, logps, tie)}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, on_step=on_step, on_epoch=not on_step,
                      batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}_loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, logger=False, sync_dist=not on_step)


def ranking_metrics(rewards: torch.Tensor, logps: torch.Tensor, tie: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """Metrics of a batch of rankings ``[G, K]``, best first (TRL's DPO names).

    ``rewards/chosen`` and ``logps/chosen`` average the top samples, ``.../rejected`` the bottom ones;
    ``rewards/accuracies``: the share of the rankings' untied pairs ``(a, b)``, ``a`` ranked above ``b``, whose
    implicit rewards are in that order (for ``K = 2``, TRL's DPO accuracy).
    """
    rewards = rewards.detach()
    a, b = pair_indices(rewards.shape[1], rewards.device)
    ordered = rewards[:, a] > rewards[:, b]
    keep = torch.ones_like(ordered) if tie is None else ~tie.to(torch.bool)
    chosen, rejected = rewards[:, 0].mean(), rewards[:, -1].mean()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": _masked_mean(ordered.to(rewards.dtype), keep),
            "logps/chosen": logps[:, 0].detach().mean(), "logps/rejected": logps[:, -1].detach().mean()}

"""The one LightningModule: a policy, a frozen reference, a DPO-family loss. It never imports a domain."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch

from prefopt.errors import PrefoptError, check_choice
from prefopt.losses import REFERENCE_FREE, LossConfig, compute_loss
from prefopt.policy import PreferencePolicy, split_pairs
from prefopt.reference import ReferenceStrategy, make_reference

TIE_MODES = ("drop", "half")
NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(PrefoptError):
    """A log-likelihood or the loss became NaN or infinite during training."""


def disable_dropout_layers(module: torch.nn.Module) -> int:
    """Set ``p = 0`` on every dropout layer of ``module`` (TRL's ``disable_dropout_in_model``, extended from
    ``nn.Dropout`` to every ``torch.nn`` dropout layer); returns how many were changed.

    With dropout on, the policy's log-likelihood of a sample is noisy in training mode and differs from the
    reference's (which is scored in eval mode) on the same sample, so the log-ratios start away from 0.
    Dropout that a model applies functionally (e.g. an attention-probability dropout rate passed to
    ``scaled_dot_product_attention``) is not a layer and is not touched: set it to 0 in the model's config.
    """
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for layer in layers:
        layer.p = 0.0
    return len(layers)


def _loss_options(loss: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """``(options, ties)`` of a ``loss`` mapping (``loss_type``, ``beta``, options, ``ties``)."""
    loss = dict(loss or {"loss_type": "sigmoid", "beta": 0.1})
    ties = loss.pop("ties", "drop")
    check_choice("loss.ties", ties, TIE_MODES)
    if "loss_type" not in loss or "beta" not in loss:
        raise PrefoptError(f"loss needs 'loss_type' and 'beta'; got keys {sorted(loss)}")
    return loss, ties


def loss_config(loss: LossConfig | Mapping[str, Any] | None) -> tuple[LossConfig, str]:
    """``(LossConfig, ties)`` from a ``loss`` mapping (``loss_type``, ``beta``, options, ``ties``) or a config."""
    if isinstance(loss, LossConfig):
        return loss, "drop"
    options, ties = _loss_options(loss)
    try:
        return LossConfig.from_mapping(options), ties
    except PrefoptError as err:
        raise PrefoptError(f"loss: {err}") from None


def check_loss_reference(loss: LossConfig | str | Sequence[str], reference: ReferenceStrategy) -> None:
    """A loss that needs reference log-likelihoods cannot run with a strategy that provides none.

    ``loss`` is a :class:`~prefopt.losses.LossConfig` or loss-type name(s) (every type outside
    :data:`~prefopt.losses.REFERENCE_FREE` needs a reference, the feedback losses included)."""
    names = loss.loss_type if isinstance(loss, LossConfig) else ([loss] if isinstance(loss, str) else list(loss))
    needs_ref = [t for t in names if t not in REFERENCE_FREE]
    if needs_ref and not reference.provides_reference:
        raise PrefoptError(
            f"loss_type {needs_ref} needs a reference model but reference={reference.name} provides none; use "
            f"another reference strategy, or a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})")


class PreferenceModule(L.LightningModule):
    """Trains ``policy`` with a DPO-family loss against a reference.

    Args:
        policy: the adapter (a :class:`~prefopt.policy.PreferencePolicy`).
        loss: a :class:`~prefopt.losses.LossConfig`, or a mapping of its fields (``loss_type``, ``beta``,
            ``label_smoothing`` and loss options) plus ``ties``: ``"drop"`` (tied pairs are left out of
            the loss) or ``"half"`` (each tie counts as half a preference each way). Checked here, once.
        reference: a strategy name (``copy``, ``adapter``, ``precomputed``, ``none``, ``sync``), a mapping
            with ``name`` and options, or a :class:`~prefopt.reference.ReferenceStrategy`.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``); AdamW(lr=1e-4) by default.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimizer step.
        seed: seeds the per-step draws of stochastic likelihoods (step ``k`` always sees the same draw,
            so a resumed run reproduces an uninterrupted one).
        nonfinite: ``"raise"`` stops on a NaN/inf log-likelihood or loss (after saving the last good
            state as ``nonfinite-last-good.ckpt`` in the trainer's folder); ``"skip"`` skips that batch.
        disable_dropout: set every dropout layer of the policy and the reference to ``p = 0`` (TRL's
            ``disable_dropout=True``), after the reference strategy is attached, so LoRA dropout is off
            too. ``False`` keeps the network's dropout in training.
    """

    def __init__(self, policy: PreferencePolicy, loss: LossConfig | Mapping[str, Any] | None = None,
                 reference: str | Mapping[str, Any] | ReferenceStrategy = "copy",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0, nonfinite: str = "raise",
                 disable_dropout: bool = True, ties: str | None = None):
        super().__init__()
        if isinstance(loss, LossConfig):
            self.loss_kwargs, loss_ties = {"loss_type": loss.loss_type, "beta": loss.beta, **loss.options}, "drop"
        else:
            self.loss_kwargs, loss_ties = _loss_options(loss)
        self.ties = ties if ties is not None else loss_ties
        check_choice("loss.ties", self.ties, TIE_MODES)
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        self.policy = policy
        self.reference = make_reference(reference)
        self.loss_config = loss if isinstance(loss, LossConfig) else self.configure_loss(self.loss_kwargs)
        check_loss_reference(self.loss_config or self.loss_kwargs["loss_type"], self.reference)
        self.reference.attach(policy)
        if not isinstance(disable_dropout, bool):
            raise PrefoptError(f"disable_dropout={disable_dropout!r} is not supported; allowed: true, false")
        if disable_dropout:
            disable_dropout_layers(self.policy)
            disable_dropout_layers(self.reference)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.scheduler_factory = scheduler
        self.seed, self.nonfinite = int(seed), nonfinite
        self._last_reference_step = -1  # global_step of the last reference.after_step call

    def configure_loss(self, options: Mapping[str, Any]) -> LossConfig | None:
        """The pair loss's :class:`~prefopt.losses.LossConfig`, made (and checked) once. A subclass that trains
        another loss family (:mod:`prefopt.feedback`) returns ``None`` and checks its own options."""
        try:
            return LossConfig.from_mapping(options)
        except PrefoptError as err:
            raise PrefoptError(f"loss: {err}") from None

    # ----------------------------------------------------------------------------------------- steps
    def _generator(self, stage: str, index: int) -> torch.Generator:
        offset = {"train": 0, "val": 1 << 40, "prepare": 2 << 40}[stage]
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset + index)

    def pair_logps(self, batch: Mapping[str, Any], generator: torch.Generator | None = None):
        """Policy and reference log-likelihoods and lengths of a pair batch, one forward each."""
        samples = self.policy.concatenate(batch)
        draw = self.policy.draw(samples, generator)
        logps = self.policy.log_likelihood(self.policy.network, samples, draw)
        ref = self.reference.logps(self.policy, samples, draw)
        lengths = self.policy.lengths(samples)
        return logps, ref, lengths

    def _shared_step(self, batch, stage: str, index: int):
        logps, ref, lengths = self.pair_logps(batch, self._generator(stage, index))
        policy_chosen, policy_rejected = split_pairs(logps)
        ref_chosen, ref_rejected = split_pairs(ref) if ref is not None else (None, None)
        chosen_len, rejected_len = split_pairs(lengths) if lengths is not None else (None, None)
        out = compute_loss(self.loss_config, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                           chosen_len, rejected_len)
        losses = out.losses
        tie = batch.get("tie")
        weights = torch.ones_like(losses)
        if tie is not None:  # no `tie.any()` branch: on a GPU that would wait for the device every step
            tie = tie.to(torch.bool)
            if self.ties == "drop":
                weights = (~tie).to(losses.dtype)
            else:  # half: a tie is half a preference each way
                swapped = compute_loss(self.loss_config, policy_rejected, policy_chosen, ref_rejected, ref_chosen,
                                       rejected_len, chosen_len).losses
                losses = torch.where(tie, 0.5 * (losses + swapped), losses)
        loss = (losses * weights).sum() / weights.sum().clamp_min(1.0)
        if not self._check_finite(stage, index, batch, logps=logps, reference_logps=ref, loss=loss):
            return None
        self._log_metrics(stage, loss, out, policy_chosen, policy_rejected, weights, batch_size=losses.shape[0])
        return loss

    def _check_finite(self, stage, index, batch=None, **terms) -> bool:
        given = {name: value for name, value in terms.items() if value is not None}
        if not given or bool(torch.stack([torch.isfinite(v).all() for v in given.values()]).all()):  # one sync
            return True
        bad = [name for name, value in given.items() if not torch.isfinite(value).all()]
        where = f"{stage} batch {index} (epoch {self.current_epoch}, step {self.global_step})"
        inputs = [k for k, v in (batch or {}).items()
                  if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if inputs:  # the data, not the weights
            where += f"; the batch has NaN/inf in {', '.join(map(repr, inputs))}"
        if self.nonfinite == "skip" and stage == "train":
            self.print(f"prefopt: skipping {where}: non-finite {', '.join(bad)}")
            return False
        saved = ""
        if stage == "train" and self._trainer is not None:
            path = f"{self.trainer.default_root_dir}/nonfinite-last-good.ckpt"
            self.trainer.save_checkpoint(path, weights_only=False)  # the full state: a run can resume from it
            saved = f"; the last good state was saved to {path}"
        raise NonFiniteError(f"non-finite {', '.join(bad)} in {where}{saved}. Lower the learning rate or beta, "
                             "check the data for NaN/inf, or set nonfinite=skip to skip such batches")

    def _logger_writes_now(self) -> bool:
        """Whether the logger writes this training step (``log_every_n_steps``) or it ends an epoch.

        Each ``self.log`` call costs Lightning bookkeeping; on the other steps only the progress-bar loss
        is logged, so tiny models are not slowed down by metrics nobody sees.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True)) or bool(trainer.is_last_batch)

    def _log_metrics(self, stage, loss, out, policy_chosen, policy_rejected, weights, batch_size):
        on_step = stage == "train"
        if on_step and not self._logger_writes_now():
            self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch_size, logger=False)
            return
        keep = weights > 0
        chosen, rejected = out.chosen_rewards[keep], out.rejected_rewards[keep]
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": policy_chosen[keep].detach().mean(),
            "logps/rejected": policy_rejected[keep].detach().mean(),
        }
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, on_step=on_step, on_epoch=not on_step,
                      prog_bar=False, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}_loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, logger=False, sync_dist=not on_step)

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train", self.global_step)

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val", batch_idx)

    # ------------------------------------------------------------------------------------- hooks
    def on_train_start(self):
        self._last_reference_step = self.global_step  # a resumed run already synced at its restored step
        if self.reference.needs_prepare:
            loader = self.trainer.train_dataloader
            device_batches = (self._to_device(b) for b in loader)
            self.reference.prepare(self.policy, device_batches)

    def _to_device(self, batch):
        from lightning.pytorch.utilities import move_data_to_device
        return move_data_to_device(batch, self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # only after a batch that ended with an optimizer step: with gradient accumulation (or a skipped
        # non-finite batch) several batches end at the same global_step, and sync must move once per step
        if self.global_step != self._last_reference_step:
            self._last_reference_step = self.global_step
            self.reference.after_step(self.policy, self.global_step)

    def on_train_end(self):
        self.reference.finish(self.policy)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from prefopt.distributed import clip_fsdp_gradients

        if not clip_fsdp_gradients(self.trainer.strategy, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise PrefoptError(f"{type(self.policy).__name__} has no trainable parameters")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

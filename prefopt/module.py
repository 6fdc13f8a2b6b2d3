"""The one LightningModule: a policy, a frozen reference, a DPO-family loss. It never imports a domain."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import lightning as L
import torch

from prefopt.errors import PrefoptError, check_choice
from prefopt.losses import REFERENCE_FREE, preference_loss
from prefopt.policy import PreferencePolicy, split_pairs
from prefopt.reference import ReferenceStrategy, make_reference

TIE_MODES = ("drop", "half")
NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(PrefoptError):
    """A log-likelihood or the loss became NaN or infinite during training."""


def _loss_types(loss_type) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_loss_reference(loss_type, reference_name: str) -> None:
    """A loss that needs reference log-likelihoods cannot run with ``reference=none``."""
    needs_ref = [t for t in _loss_types(loss_type) if t not in REFERENCE_FREE]
    if reference_name == "none" and needs_ref:
        raise PrefoptError(
            f"loss_type {needs_ref} needs a reference model but reference=none; use reference=copy, "
            f"adapter, precomputed or sync, or a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})")


class PreferenceModule(L.LightningModule):
    """Trains ``policy`` with a DPO-family loss against a reference.

    Args:
        policy: the adapter (a :class:`~prefopt.policy.PreferencePolicy`).
        loss: keyword arguments of :func:`prefopt.losses.preference_loss` (``loss_type``, ``beta``,
            ``label_smoothing`` and loss options), plus ``ties``: ``"drop"`` (tied pairs are left out of
            the loss) or ``"half"`` (each tie counts as half a preference each way).
        reference: a strategy name (``copy``, ``adapter``, ``precomputed``, ``none``, ``sync``), a mapping
            with ``name`` and options, or a :class:`~prefopt.reference.ReferenceStrategy`.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``); AdamW(lr=1e-4) by default.
        scheduler: optional ``optimizer -> LRScheduler``, stepped every optimizer step.
        seed: seeds the per-step draws of stochastic likelihoods (step ``k`` always sees the same draw,
            so a resumed run reproduces an uninterrupted one).
        nonfinite: ``"raise"`` stops on a NaN/inf log-likelihood or loss (after saving the last good
            state as ``nonfinite-last-good.ckpt`` in the trainer's folder); ``"skip"`` skips that batch.
    """

    def __init__(self, policy: PreferencePolicy, loss: Mapping[str, Any] | None = None,
                 reference: str | Mapping[str, Any] | ReferenceStrategy = "copy",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0, nonfinite: str = "raise"):
        super().__init__()
        loss = dict(loss or {"loss_type": "sigmoid", "beta": 0.1})
        self.ties = loss.pop("ties", "drop")
        check_choice("loss.ties", self.ties, TIE_MODES)
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        if "loss_type" not in loss or "beta" not in loss:
            raise PrefoptError(f"loss needs 'loss_type' and 'beta'; got keys {sorted(loss)}")
        self.loss_kwargs = loss
        self.policy = policy
        self.reference = make_reference(reference)
        check_loss_reference(loss["loss_type"], self.reference.name)
        if self.reference.name == "sync" and getattr(policy.network, "peft_config", None):
            raise PrefoptError(
                f"reference=sync cannot be used with a peft (LoRA) network: {type(policy).__name__}.network is "
                f"a {type(policy.network).__name__} with adapters, whose reference is its base with the adapters "
                "disabled; use reference=adapter, or give sync a plain (un-wrapped) network")
        self.reference.attach(policy)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.scheduler_factory = scheduler
        self.seed, self.nonfinite = int(seed), nonfinite
        self._last_reference_step = -1  # global_step of the last reference.after_step call

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
        try:
            logps, ref, lengths = self.pair_logps(batch, self._generator(stage, index))
        except ValueError as err:  # torch.distributions refuses NaN arguments before any logp exists
            if "invalid values" not in str(err):
                raise
            self._check_finite(stage, index, batch, logps=torch.tensor(float("nan")))
            return None
        policy_chosen, policy_rejected = split_pairs(logps)
        ref_chosen, ref_rejected = split_pairs(ref) if ref is not None else (None, None)
        chosen_len, rejected_len = split_pairs(lengths) if lengths is not None else (None, None)
        args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        kwargs = dict(self.loss_kwargs, chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        loss_type = kwargs.pop("loss_type")
        out = preference_loss(loss_type, *args, **kwargs)
        losses = out.losses
        tie = batch.get("tie")
        weights = torch.ones_like(losses)
        if tie is not None:  # no `tie.any()` branch: on a GPU that would wait for the device every step
            tie = tie.to(torch.bool)
            if self.ties == "drop":
                weights = (~tie).to(losses.dtype)
            else:  # half: a tie is half a preference each way
                swapped = preference_loss(loss_type, policy_rejected, policy_chosen,
                                          ref_rejected, ref_chosen, **{**kwargs, "chosen_lengths": rejected_len,
                                                                       "rejected_lengths": chosen_len}).losses
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
        if self.reference.name == "precomputed":
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

"""The flow-matching default: Diffusion-DPO on the digits with a class-conditional flow-matching transformer.

The digits task of :mod:`prefopt.tasks.diffusion.digits` (same splits, candidates, teacher, rewards,
held-out judge, win rate, realism guard and titled grid) with another base model:

* **network**: a diffusers ``DiTTransformer2DModel`` (adaLN-zero blocks conditioned on the timestep and
  the class, patch size 2: an 8x8 digit is 16 tokens);
* **training**: rectified flow / flow matching as diffusers' SD3 training script does it, through the
  adapter's own surrogate: ``sigma`` from a ``FlowMatchEulerDiscreteScheduler`` (``shift``) at a
  logit-normal timestep, ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, AdamW + EMA; trained
  once and cached by every option in ``base``;
* **sampling**: the adapter's deterministic flow-matching Euler steps (the same noise gives comparable
  images for the reference and the policy).

The DiT's class embedding drops labels at random in training mode (diffusers' built-in 10% for
classifier-free guidance); the adapter switches that off (base training goes through it too), so the
policy and the reference see the same class in every forward.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from prefopt.adapters.diffusion import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, DiffusionDraw, DiffusionPolicy
from prefopt.errors import check_choice
from prefopt.tasks.diffusion.digits import NUM_CLASSES, DigitsDiffusionTask, fit_denoiser

#: the base flow model's defaults (every key is part of its cache key)
FLOW_BASE_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 4,
    "patch_size": 2,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "timestep_sampling": "logit_normal",
    "steps": 1000,
    "batch_size": 128,
    "lr": 2.0e-3,
    "ema_decay": 0.995,
    "seed": 0,
}
_DIT_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size")


def build_dit(config: Mapping[str, Any], image_size: int) -> nn.Module:
    """The class-conditional ``DiTTransformer2DModel`` of ``config``."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(in_channels=1, sample_size=image_size, num_embeds_ada_norm=NUM_CLASSES,
                                 **{k: int(config[k]) for k in _DIT_KEYS})


def build_flow_scheduler(config: Mapping[str, Any]):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(config["num_train_timesteps"]),
                                           shift=float(config["shift"]))


class FlowDigitsDiffusionTask(DigitsDiffusionTask):
    """Diffusion-DPO on the digits with a flow-matching DiT (see the module docstring).

    Args (beyond :class:`~prefopt.tasks.diffusion.digits.DigitsDiffusionTask`'s):
        base: overrides of :data:`FLOW_BASE_DEFAULTS` (the DiT, the flow schedule and its training).
        timestep_sampling: the DPO surrogate's timestep density: ``logit_normal`` (default), ``mode`` or
            ``uniform`` (see :mod:`prefopt.adapters.diffusion`).
        logit_mean, logit_std: the logit-normal's parameters.
        loss_weighting: ``none`` (default), ``sigma_sqrt`` or ``cosmap``.
    """

    name = "diffusion_flow"
    base_defaults = FLOW_BASE_DEFAULTS
    base_kind = "diffusion_flow_base"

    def __init__(self, *args, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, loss_weighting: str = "none", **kwargs):
        check_choice("domain.task.timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        check_choice("domain.task.loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        super().__init__(*args, **kwargs)
        check_choice("domain.task.base.timestep_sampling", self.base_config["timestep_sampling"], TIMESTEP_SAMPLINGS)
        self.timestep_sampling, self.loss_weighting = timestep_sampling, loss_weighting
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def base_key(self) -> dict[str, Any]:
        return {**super().base_key(), "model": "dit_flow"}

    def build_network(self) -> nn.Module:
        return build_dit(self.base_config, self.image_size)

    def build_scheduler(self):
        return build_flow_scheduler(self.base_config)

    def make_policy(self, network: nn.Module) -> DiffusionPolicy:
        return DiffusionPolicy(network, self.build_scheduler(), likelihood_scale=self.likelihood_scale,
                               timestep_sampling=self.timestep_sampling, logit_mean=self.logit_mean,
                               logit_std=self.logit_std, loss_weighting=self.loss_weighting,
                               draws_per_pair=self.draws_per_pair)

    def train_base(self) -> dict[str, torch.Tensor]:
        """Flow matching on the ``base`` split: the mean of the adapter's squared velocity error."""
        config = self.base_config
        images, labels = self._split("base")
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(int(config["seed"]))
            network = self.build_network()
            policy = DiffusionPolicy(network, self.build_scheduler(), timestep_sampling=config["timestep_sampling"])

            def flow_loss(x0, c, generator):
                # independent (t, noise) per image (the pair-sharing draw() is for preference batches)
                timesteps, noise = policy._timesteps_and_noise(x0.shape[0], tuple(x0.shape[1:]), generator)
                draw = DiffusionDraw(timesteps, noise, x0, {"class_labels": c})
                return -policy.log_likelihood(network, {}, draw).mean()

            return fit_denoiser(network, flow_loss, config, images, labels, "diffusion flow: base flow matching")

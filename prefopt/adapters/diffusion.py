"""Diffusion and flow-matching denoisers: Diffusion-DPO's surrogate log-likelihood of an image.

A diffusion model has no tractable likelihood, so Diffusion-DPO (Wallace et al. 2023, "Diffusion Model
Alignment Using Direct Preference Optimization") scores an image ``x0`` by how well the network denoises
it: draw a timestep ``t`` and noise ``eps``, noise the image, and compare the network's prediction with
its target::

    log_likelihood(x0) = -scale * mean_{c,h,w} (network(x_t, t, cond) - target)^2

The mean is over every non-batch dimension, in float32. Two kinds of noise schedule are supported:

* **Variance-preserving (DDPM-type) schedulers** (DDPM, DDIM, PNDM, DPM-Solver...): ``t`` is drawn uniformly
  from the integers ``[0, num_train_timesteps)``, ``x_t = scheduler.add_noise(x0, eps, t)`` and ``target =
  eps`` (``prediction_type="epsilon"``), ``scheduler.get_velocity(x0, eps, t)`` (``"v_prediction"``) or
  ``x0`` (``"sample"``).
* **Flow matching** (``FlowMatchEulerDiscreteScheduler``: SD3, Flux, Sana...), as diffusers' SD3 and Flux
  training scripts do it (``examples/dreambooth/train_dreambooth_sd3.py``, ``train_dreambooth_flux.py``):
  ``u`` from ``diffusers.training_utils.compute_density_for_timestep_sampling`` (``timestep_sampling``:
  ``logit_normal`` with ``logit_mean``/``logit_std``, ``mode`` with ``mode_scale``, or ``uniform``), the
  index ``floor(u * num_train_timesteps)`` into the training schedule (the scheduler as built, before any
  ``set_timesteps``: ``sigmas[i] = timesteps[i] / num_train_timesteps`` with the shift applied), ``t`` that
  schedule's timestep and ``sigma`` its sigma (the scripts' ``get_sigmas``). Then ``x_t = (1 - sigma) x0 +
  sigma eps``, ``target = eps - x0``, and the network gets the raw timestep value (SD3: ``t`` in ``[0,
  1000]``; Flux: ``t / 1000``, as diffusers passes it). ``loss_weighting`` (``none``, ``sigma_sqrt``,
  ``cosmap``) multiplies the squared error by ``compute_loss_weighting_for_sd3(loss_weighting, sigma)``.
  The defaults (logit-normal ``(0, 1)``, no weighting) are flow_grpo's SD3 DPO script's.

**Beta conventions.** With ``scale = 1`` (the default) prefopt's ``loss=sigmoid`` with ``beta = b``::

    -log sigmoid(b * ((lp_w - ref_w) - (lp_l - ref_l)))
        = -log sigmoid(b * ((ref_mse_w - ref_mse_l) - (mse_w - mse_l)))

* UNets (DDPM-type): this is exactly the loss of diffusers' research script ``examples/research_projects/
  diffusion_dpo/train_diffusion_dpo.py`` (``logits = ref_diff - model_diff``; ``-logsigmoid(beta_dpo *
  logits)``), whose default ``--beta_dpo`` is 2500: ``loss.beta=2500`` here is ``--beta_dpo 2500`` there. The
  paper's code (SalesforceAIResearch/DiffusionDPO) writes ``-logsigmoid(-0.5 * beta_dpo * (model_diff -
  ref_diff))``; ``likelihood_scale=0.5`` reproduces that form with the same beta.
* Flow matching: flow_grpo's ``scripts/train_sd3_dpo.py`` (yifan123/flow_grpo) computes ``-logsigmoid(-0.5 *
  beta * ((mse_w - ref_w) - (mse_l - ref_l)))`` with ``config.train.beta`` (100 in its ``config/dpo.py``);
  ``likelihood_scale=0.5`` reproduces it with the same beta. At ``scale = 1`` flow_grpo's beta is twice
  prefopt's.

The implicit rewards prefopt logs (``rewards/chosen`` = ``beta * (lp - ref)``) are in the same units.

**Shared draws.** :meth:`DiffusionPolicy.draw` draws one ``(t, eps)`` per *pair*: rows ``i`` and ``i + B``
(the chosen and the rejected image) get the same timestep and noise, and the module passes the same draw
to the policy and the reference. Where the batch carries an integer ``seed`` per example, that example's
``t`` and ``eps`` come from its seed alone (``reference=precomputed`` needs this). With ``draws_per_pair=K``
each pair gets ``K`` independent draws, scored in one forward of ``K * 2B`` rows, and the surrogate is their
mean (a lower-variance estimate for the same number of optimizer steps).

**Inputs.** A sample batch holds ``images`` (pixels in ``[-1, 1]``, ``[N, C, H, W]``) or ``latents``
(already encoded and scaled). With a ``vae`` (an ``AutoencoderKL``) images are encoded to the mean of the
latent distribution, times ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` where the VAE
has one). Conditioning is read from the samples by the network's family
(:mod:`prefopt.adapters.diffusion_families`): ``class_labels``, ``encoder_hidden_states`` (or ``input_ids``
encoded by ``text_encoder``), ``pooled_projections`` (SD3, Flux), ``text_embeds`` and ``time_ids`` (SDXL),
``encoder_attention_mask`` (PixArt). The frozen encodings are computed once per batch (in :meth:`draw`) and
shared by the policy and the reference forward.

What a subclass may change: :meth:`predict` (how the network is called: a model family of one's own),
:meth:`encode` (other autoencoders, or what is denoised), :meth:`conditioning` (what the network is given),
:meth:`target` (other parameterizations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from prefopt.adapters.diffusion_families import (ATTENTION_PROJECTIONS, FAMILIES, disable_label_dropout,
                                                 embeds_guidance, family_for, image_sequence_length,
                                                 required_inputs)
from prefopt.errors import PrefoptError, check_choice
from prefopt.policy import PreferencePolicy
from prefopt.reference import eval_mode

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: the prediction of a flow-matching network: the velocity ``noise - x0``
FLOW_PREDICTION = "flow_prediction"
SAMPLERS = ("ddim", "ddpm")
FLOW_SAMPLERS = ("euler",)
#: flow-matching schedulers whose training schedule (``timesteps``, ``sigmas``) prefopt reads
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
#: ``weighting_scheme`` of diffusers' ``compute_density_for_timestep_sampling`` (flow matching)
TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")
#: ``weighting_scheme`` of diffusers' ``compute_loss_weighting_for_sd3`` (flow matching)
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class DiffusionDraw:
    """What the policy and the reference forward of one batch share.

    Attributes:
        timesteps: ``[K * N]``, int64 (DDPM-type schedulers) or float (flow matching: the schedule's values);
            draw ``k`` of sample ``j`` is row ``k * N + j``, and rows ``i`` and ``i + N/2`` of each draw are equal.
        noise: ``[K * N, *x0.shape[1:]]``, laid out as ``timesteps``.
        inputs: the clean model inputs ``x0`` ``[N, ...]`` (encoded latents or pixels), or ``None`` to encode again.
        conditioning: keyword arguments of the network's forward (``class_labels``, ``encoder_hidden_states``,
            ...), ``[N, ...]`` each, or ``None`` to compute them again.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    inputs: torch.Tensor | None = None
    conditioning: dict[str, torch.Tensor] | None = None


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on ``device``; to a GPU through pinned memory, so the copy does not wait for the
    work already queued on the device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _is_flow_scheduler(scheduler) -> bool:
    return any(cls.__name__ in FLOW_SCHEDULERS for cls in type(scheduler).__mro__)


class DiffusionPolicy(PreferencePolicy):
    """Diffusion-DPO for a diffusers denoiser (UNet or transformer) under a DDPM-type or flow-matching schedule.

    Args:
        network: the denoiser; how it is called is its family's row in
            :data:`~prefopt.adapters.diffusion_families.FAMILIES` (a plain ``nn.Module`` of one's own is called
            as ``network(x_t, t, **conditioning)``; or override :meth:`predict`).
        scheduler: a diffusers noise scheduler: a variance-preserving one with ``add_noise`` (DDPM, DDIM,
            PNDM, DPM-Solver...; ``get_velocity`` too for ``v_prediction``) or ``FlowMatchEulerDiscreteScheduler``
            (flow matching). Other sigma-parameterized ones (Euler, Heun, LMS) are refused with a hint. Its
            config also builds the sampler.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` for DDPM-type schedulers (``None`` reads the
            scheduler's); a flow-matching scheduler implies ``flow_prediction`` (the velocity ``noise - x0``).
        vae: optional ``AutoencoderKL`` (frozen): the denoiser works on its scaled latents.
        text_encoder: optional frozen text encoder for ``input_ids`` (e.g. ``CLIPTextModel``).
        likelihood_scale: ``scale`` in the module docstring (1 = the diffusers Diffusion-DPO script's beta;
            0.5 = the DiffusionDPO paper's code and flow_grpo's SD3 DPO beta).
        sampler: what :meth:`generate` steps with: ``ddim`` (default; deterministic with ``eta=0``) or ``ddpm``
            for DDPM-type schedulers, ``euler`` (flow-matching Euler steps, deterministic) for flow matching.
        timestep_sampling: flow matching: ``logit_normal`` (default), ``mode`` or ``uniform`` (diffusers'
            ``compute_density_for_timestep_sampling``). DDPM-type schedulers draw integers uniformly
            (``uniform``, the only value they accept).
        logit_mean, logit_std: the logit-normal's parameters (defaults 0 and 1, as flow_grpo's DPO).
        mode_scale: the ``mode`` density's scale (1.29, diffusers' default).
        loss_weighting: flow matching: ``none`` (default), ``sigma_sqrt`` or ``cosmap``
            (``compute_loss_weighting_for_sd3``), a per-sample factor on the squared error.
        draws_per_pair: ``K``: average the surrogate over ``K`` independent ``(t, noise)`` draws per pair.
        embedded_guidance: the guidance value a guidance-distilled model (Flux dev: ``guidance_embeds``) gets in
            training, unless the samples carry ``guidance``; 3.5 as diffusers' Flux scripts and pipeline.
        lora_targets: module-name suffixes for ``reference=adapter``; ``None``: the family's default
            (attention projections; SD3 and Flux: both streams of the joint attention).
    """

    stochastic = True
    lora_targets = ATTENTION_PROJECTIONS

    def __init__(self, network: nn.Module, scheduler, prediction_type: str | None = None,
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 likelihood_scale: float = 1.0, sampler: str | None = None, timestep_sampling: str | None = None,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 loss_weighting: str = "none", draws_per_pair: int = 1, embedded_guidance: float = 3.5,
                 lora_targets: Sequence[str] | None = None):
        super().__init__(network)
        self.flow_matching = _is_flow_scheduler(scheduler)
        if self.flow_matching:
            prediction_type = self._check_flow(scheduler, prediction_type, timestep_sampling, loss_weighting)
            sampler = sampler or "euler"
            check_choice("sampler", sampler, FLOW_SAMPLERS)
        else:
            prediction_type = self._check_ddpm(scheduler, prediction_type, timestep_sampling, loss_weighting)
            sampler = sampler or "ddim"
            check_choice("sampler", sampler, SAMPLERS)
        if not float(likelihood_scale) > 0:
            raise PrefoptError(f"likelihood_scale={likelihood_scale!r} must be > 0")
        if int(draws_per_pair) != draws_per_pair or int(draws_per_pair) < 1:
            raise PrefoptError(f"draws_per_pair={draws_per_pair!r} must be an integer >= 1")
        if not float(logit_std) > 0:
            raise PrefoptError(f"logit_std={logit_std!r} must be > 0")
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.likelihood_scale, self.sampler = float(likelihood_scale), sampler
        self.timestep_sampling = timestep_sampling or ("logit_normal" if self.flow_matching else "uniform")
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.loss_weighting, self.draws_per_pair = loss_weighting, int(draws_per_pair)
        # How the network is called; a subclass that overrides predict() may bring any network.
        overrides_predict = type(self).predict is not DiffusionPolicy.predict
        self.family = family_for(network) if not overrides_predict else _family_or_generic(network)
        self.required = required_inputs(network, self.family)
        self.embedded_guidance = float(embedded_guidance) if embeds_guidance(network) else None
        disable_label_dropout(network)  # DiT: one pair, one label, for the policy and the reference
        if lora_targets is not None:
            self.lora_targets = tuple(lora_targets)
        elif type(self).lora_targets is DiffusionPolicy.lora_targets:  # not set by a subclass
            self.lora_targets = self.family.lora_targets
        # Frozen helpers are submodules so they follow the policy across devices; they never train.
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.text_encoder = text_encoder.requires_grad_(False).eval() if text_encoder is not None else None

    def _check_ddpm(self, scheduler, prediction_type, timestep_sampling, loss_weighting) -> str:
        if not callable(getattr(scheduler, "add_noise", None)):
            raise PrefoptError(f"scheduler {type(scheduler).__name__} has no add_noise(); allowed: a diffusers noise "
                               "scheduler with add_noise (DDPMScheduler, DDIMScheduler, PNDMScheduler...) or "
                               f"{', '.join(FLOW_SCHEDULERS)} (flow matching)")
        _check_forward_process(scheduler)
        if prediction_type is None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        if prediction_type == FLOW_PREDICTION:  # e.g. Sana's DPMSolverMultistepScheduler(use_flow_sigmas=True)
            raise PrefoptError(f"scheduler {type(scheduler).__name__} with prediction_type=flow_prediction: train a "
                               f"flow-matching model with {', '.join(FLOW_SCHEDULERS)} (shift = its flow_shift)")
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "v_prediction" and not callable(getattr(scheduler, "get_velocity", None)):
            raise PrefoptError(f"prediction_type=v_prediction needs scheduler.get_velocity(); "
                               f"{type(scheduler).__name__} has none")
        if timestep_sampling not in (None, "uniform"):
            raise PrefoptError(f"timestep_sampling={timestep_sampling!r} applies to flow-matching schedulers "
                               f"({', '.join(FLOW_SCHEDULERS)}); {type(scheduler).__name__} draws uniform integer "
                               "timesteps: allowed: uniform")
        if loss_weighting != "none":
            raise PrefoptError(f"loss_weighting={loss_weighting!r} applies to flow-matching schedulers "
                               f"({', '.join(FLOW_SCHEDULERS)}); allowed with {type(scheduler).__name__}: none")
        return prediction_type

    def _check_flow(self, scheduler, prediction_type, timestep_sampling, loss_weighting) -> str:
        if prediction_type not in (None, FLOW_PREDICTION):
            raise PrefoptError(f"prediction_type={prediction_type!r}: a flow-matching scheduler "
                               f"({type(scheduler).__name__}) trains the velocity; allowed: {FLOW_PREDICTION}")
        if timestep_sampling is not None:
            check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        # The training schedule: the scheduler as built (set_timesteps replaces these tables with the sampling
        # schedule, so they come from a fresh copy of its config, like the diffusers scripts' noise_scheduler_copy).
        fresh = type(scheduler).from_config(scheduler.config)
        timesteps, sigmas = fresh.timesteps.float().cpu(), fresh.sigmas.float().cpu()
        if timesteps.shape[0] != int(scheduler.config.num_train_timesteps) or sigmas.shape != timesteps.shape:
            raise PrefoptError(f"scheduler {type(scheduler).__name__}: its training schedule has "
                               f"{timesteps.shape[0]} timesteps, not num_train_timesteps="
                               f"{scheduler.config.num_train_timesteps}")
        # float32 and not a buffer, so a precision cast of the module (bf16-true) cannot round the table
        self._train_timesteps = timesteps  # indexed by draw() on the CPU
        self._train_table = {torch.device("cpu"): torch.stack([timesteps, sigmas])}  # per device, for flow_sigmas
        return FLOW_PREDICTION

    def train(self, mode: bool = True):
        """Switch the denoiser's mode; the VAE and text encoder stay in eval mode (keep that in overrides)."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def num_train_timesteps(self) -> int:
        """Size of the scheduler's training schedule (``config.num_train_timesteps``)."""
        return int(self.scheduler.config.num_train_timesteps)

    # --------------------------------------------------------------------------------- inputs
    @torch.no_grad()
    def encode(self, samples: Mapping[str, Any]) -> torch.Tensor:
        """Clean model inputs ``x0``: ``latents`` as given, or ``images`` (through the VAE if there is one).

        Override it to denoise something else (an action chunk, a trajectory): return ``x0`` of shape
        ``[N, ...]`` from the samples.
        """
        if "latents" in samples:
            return samples["latents"]
        if "images" not in samples:
            raise PrefoptError(f"diffusion samples need 'images' or 'latents'; found keys {sorted(samples)}")
        images = samples["images"]
        if self.vae is None:
            return images
        images = images.to(dtype=self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode` for generated samples: pixels in ``[-1, 1]``."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def conditioning(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Keyword arguments of the network's forward for ``samples``: the keys its family reads."""
        out = {key: samples[key] for key in self.family.inputs if key in samples}
        if "encoder_hidden_states" not in out and "input_ids" in samples:
            if self.text_encoder is None:
                raise PrefoptError("samples carry 'input_ids' but the diffusion policy has no text_encoder; "
                                   "pass text_encoder= or give 'encoder_hidden_states'")
            out["encoder_hidden_states"] = _output_hidden(self.text_encoder(samples["input_ids"]))
        missing = [key for key in self.required if key not in out]
        if missing:
            raise PrefoptError(f"{self.family.name} needs {', '.join(map(repr, missing))} in the samples "
                               f"(it reads {', '.join(self.family.inputs)}); found keys {sorted(samples)}")
        if self.embedded_guidance is not None and "guidance" not in out:
            n = next(v.shape[0] for v in out.values() if torch.is_tensor(v))
            out["guidance"] = torch.full((n,), self.embedded_guidance, device=next(iter(out.values())).device)
        return out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network predicts, by ``prediction_type``."""
        if self.prediction_type == FLOW_PREDICTION:
            return noise - x0
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    def predict(self, network: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's prediction for ``x_t`` at the scheduler's ``timesteps`` ``[N]``, shaped like ``x_t``.

        The one method to override for a denoiser whose call no family describes.
        """
        return self.family.call(network, x_t, timesteps, dict(conditioning))

    # ----------------------------------------------------------------------------------- draw
    def _timesteps_and_noise(self, count: int, shape: tuple[int, ...], generator: torch.Generator | None):
        """``count`` timesteps, then ``count`` noises, from one generator (on the CPU)."""
        if not self.flow_matching:
            timesteps = torch.randint(0, self.num_train_timesteps, (count,), generator=generator)
        else:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling(self.timestep_sampling, count, logit_mean=self.logit_mean,
                                                      logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                      generator=generator)
            # as the diffusers scripts; the clamp only matters where sigmoid rounds to exactly 1.0
            index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
            timesteps = self._train_timesteps[index]
        return timesteps, torch.randn((count, *shape), generator=generator)

    def draw(self, samples: Mapping[str, Any], generator: torch.Generator | None = None,
             group: int = 2) -> DiffusionDraw:
        """``draws_per_pair`` timesteps and noises per pair, repeated for its chosen and rejected rows.

        ``group``: how many rows share one draw (rows ``i, i + N/group, ...``): 2 for a pair batch, ``K`` for
        a ranking batch of ``K`` samples per group, 1 for single samples (:mod:`prefopt.feedback`).

        Drawn on the CPU from ``generator`` (or from each example's ``seed`` where the samples carry one,
        as ``reference=precomputed`` needs), then moved to the samples' device. The clean inputs and the
        conditioning are computed here once and reused by the policy's and the reference's forward.
        A subclass changes the *distribution* of ``t`` here (e.g. a truncated range), keeping the pairing.
        """
        x0 = self.encode(samples)
        n = x0.shape[0]
        if n % group:
            raise PrefoptError(f"a diffusion sample batch must hold {group}B rows ({group} per draw); got {n}")
        rows, shape, k = n // group, tuple(x0.shape[1:]), self.draws_per_pair
        seeds = samples.get("seed")
        if seeds is not None:
            drawn = [self._timesteps_and_noise(k, shape, torch.Generator().manual_seed(int(seed)))
                     for seed in seeds[:rows].tolist()]
            timesteps = torch.stack([t for t, _ in drawn], dim=1)  # [k, rows]
            noise = torch.stack([e for _, e in drawn], dim=1)
        else:
            timesteps, noise = self._timesteps_and_noise(k * rows, shape, generator)
        # [k, rows] -> [k, group, rows] -> [k * n]: rows i, i + n/group, ... of each draw share it
        timesteps = timesteps.reshape(k, 1, rows).expand(k, group, rows).reshape(k * n)
        noise = noise.reshape(k, 1, rows, *shape).expand(k, group, rows, *shape).reshape(k * n, *shape)
        timesteps = _to_device(timesteps, x0.device)
        noise = _to_device(noise, x0.device).to(x0.dtype)
        return DiffusionDraw(timesteps, noise, x0, self._group_conditioning(samples, group))

    def _group_conditioning(self, samples: Mapping[str, Any], group: int) -> dict[str, torch.Tensor]:
        """:meth:`conditioning`, computed once per group when the ``group`` rows sharing a draw share it too (a
        caption encoded once per pair, not twice), else per row."""
        keys = (*self.family.inputs, "input_ids")
        inputs = {k: v for k, v in samples.items() if k in keys and torch.is_tensor(v)}
        if group < 2 or not inputs or not all(_repeats(v, group) for v in inputs.values()):
            return self.conditioning(samples)
        rows = next(iter(inputs.values())).shape[0] // group
        cond = self.conditioning({k: v[:rows] for k, v in inputs.items()})
        return {k: torch.cat([v] * group) for k, v in cond.items()}

    # ----------------------------------------------------------------------------- likelihood
    def flow_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Sigma of each flow-matching timestep: the training schedule's sigma where ``t`` is one of its
        timesteps (diffusers' ``get_sigmas``), else ``t / num_train_timesteps``."""
        if timesteps.device not in self._train_table:
            self._train_table[timesteps.device] = self._train_table[torch.device("cpu")].to(timesteps.device)
        table_t, table_s = self._train_table[timesteps.device]
        timesteps = timesteps.float()
        match = timesteps[:, None] == table_t[None, :]
        return torch.where(match.any(dim=1), table_s[match.float().argmax(dim=1)],
                           timesteps / self.num_train_timesteps)

    def log_likelihood(self, network: nn.Module, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        """``-likelihood_scale * mean((predict(network, x_t, t, cond) - target)^2)`` per sample, shape ``[N]``.

        ``x_t`` is ``scheduler.add_noise(x0, noise, t)`` (DDPM-type) or ``(1 - sigma) x0 + sigma noise`` (flow
        matching) with the draw's ``t`` and noise; with ``K`` draws per sample, the mean over them. What a
        subclass changes is usually :meth:`predict`, :meth:`encode`, :meth:`conditioning` or :meth:`target`;
        this method only combines them.
        """
        if draw is None:
            draw = self.draw(samples)
        x0 = draw.inputs if draw.inputs is not None else self.encode(samples)
        cond = draw.conditioning if draw.conditioning is not None else self.conditioning(samples)
        timesteps, noise = draw.timesteps.to(x0.device), draw.noise.to(device=x0.device, dtype=x0.dtype)
        n = x0.shape[0]
        k = timesteps.shape[0] // n
        if k * n != timesteps.shape[0]:
            raise PrefoptError(f"the draw has {timesteps.shape[0]} timesteps for {n} samples (a multiple is needed)")
        if k > 1:  # K draws: one forward of K * N rows
            x0 = x0.repeat(k, *([1] * (x0.ndim - 1)))
            cond = {key: _repeat_rows(v, k, n) for key, v in cond.items()}
        dtype = _dtype(network)  # e.g. a half-precision network: inputs in its dtype, the error in float32
        cond = {key: _cast(v, dtype) for key, v in cond.items()}
        weight = None
        if self.flow_matching:
            sigma = self.flow_sigmas(timesteps).view(-1, *([1] * (x0.ndim - 1)))
            noisy = (1.0 - sigma) * x0.float() + sigma * noise.float()
            if self.loss_weighting != "none":
                from diffusers.training_utils import compute_loss_weighting_for_sd3

                weight = compute_loss_weighting_for_sd3(self.loss_weighting, sigma).float()
        else:
            noisy = self.scheduler.add_noise(x0, noise, timesteps)
        prediction = self.predict(network, noisy.to(dtype), timesteps, cond)
        error = (prediction.float() - self.target(x0, noise, timesteps).float()) ** 2
        if weight is not None:
            error = weight * error
        logps = -self.likelihood_scale * error.mean(dim=tuple(range(1, error.ndim)))
        return logps.view(k, n).mean(dim=0) if k > 1 else logps

    # ------------------------------------------------------------------------------- sampling
    def make_sampler(self):
        """The scheduler used by :meth:`generate`: DDIM or DDPM from the training scheduler's config, or
        ``FlowMatchEulerDiscreteScheduler`` (flow matching)."""
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if self.flow_matching:
            return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[self.sampler]
        return cls.from_config(self.scheduler.config, prediction_type=self.prediction_type)

    def _set_timesteps(self, sampler, num_inference_steps: int, device, network, shape) -> None:
        """The sampling schedule; a dynamically shifted flow schedule (Flux) as FluxPipeline sets it."""
        config = sampler.config
        if not (self.flow_matching and getattr(config, "use_dynamic_shifting", False)):
            sampler.set_timesteps(num_inference_steps, device=device)
            return
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = image_sequence_length(network, self.family, shape[-2], shape[-1])
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()
        sampler.set_timesteps(sigmas=sigmas, mu=mu, device=device)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, conditioning: Mapping[str, torch.Tensor] | None = None,
                 network: nn.Module | None = None, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 negative_conditioning: Mapping[str, torch.Tensor] | None = None, batch_size: int = 256,
                 seed: int | None = None, progress: bool = False) -> torch.Tensor:
        """Images (``[-1, 1]``, decoded when there is a VAE) from the initial ``noise`` ``[N, *x0 shape]``.

        With the default samplers (DDIM with ``eta = 0``; flow-matching Euler steps) the result is a
        deterministic function of ``noise`` and the conditioning, so two networks given the same noise produce
        comparable images. ``guidance_scale > 1`` applies classifier-free guidance against
        ``negative_conditioning`` (e.g. the encoding of the empty prompt), which must then be given; a
        guidance-distilled model (Flux dev) gets ``guidance_scale`` as its guidance input instead. ``seed``
        seeds the noise that a stochastic sampler (``ddpm``, or DDIM with ``eta > 0``) adds along the way.
        """
        network = self.network if network is None else network
        conditioning = dict(conditioning or {})
        embedded = self.embedded_guidance is not None
        if embedded:
            if negative_conditioning is not None:
                raise PrefoptError(f"{self.family.name} embeds guidance: guidance_scale is its guidance input; "
                                   "negative_conditioning is not used (leave it out)")
            conditioning.setdefault("guidance", torch.full((noise.shape[0],), float(guidance_scale)))
        elif guidance_scale != 1.0 and negative_conditioning is None:
            raise PrefoptError(f"guidance_scale={guidance_scale} needs negative_conditioning (e.g. the empty prompt)")
        use_cfg = guidance_scale != 1.0 and not embedded
        device, dtype = next(network.parameters()).device, _dtype(network)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        sampler = self.make_sampler()
        chunks = []
        starts = range(0, noise.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="sampling", leave=False)
        with eval_mode(network):
            for start in starts:
                stop = start + batch_size
                self._set_timesteps(sampler, int(num_inference_steps), device, network, noise.shape)
                x = noise[start:stop].to(device) * getattr(sampler, "init_noise_sigma", 1.0)
                rows = x.shape[0]
                cond = {k: _cast(v[start:stop].to(device), dtype) for k, v in conditioning.items()}
                neg = ({k: _cast(v[start:stop].to(device), dtype) for k, v in negative_conditioning.items()}
                       if use_cfg else None)
                for t in sampler.timesteps:
                    scale_input = getattr(sampler, "scale_model_input", None)
                    model_in = (scale_input(x, t) if scale_input is not None else x).to(dtype)
                    if neg is None:
                        pred = self.predict(network, model_in, t.expand(rows), cond)
                    else:
                        # a key the negative side leaves out (SDXL's time_ids) is the same for both halves
                        both = {k: torch.cat([neg.get(k, cond[k]), cond[k]]) for k in cond}
                        pred = self.predict(network, torch.cat([model_in, model_in]), t.expand(2 * rows), both)
                        uncond, text = pred.chunk(2)
                        pred = uncond + guidance_scale * (text - uncond)
                    x = sampler.step(pred.float(), t, x, generator=generator).prev_sample
                chunks.append(self.decode(x))
        return torch.cat(chunks)


def _family_or_generic(network: nn.Module):
    """The family of ``network``, or the generic call for a class none describes (``predict`` is overridden)."""
    try:
        return family_for(network)
    except PrefoptError:
        from prefopt.adapters.diffusion_families import GENERIC
        return GENERIC


def _check_forward_process(scheduler) -> None:
    """The UNet sees ``add_noise``'s output as is, so that must be the variance-preserving DDPM forward
    process ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPM, DDIM, PNDM, DPM-Solver...). Sigma-parameterized
    schedulers (Euler, Heun, LMS) return ``x0 + sigma_t eps`` and rescale the model input elsewhere."""
    name = type(scheduler).__name__
    hint = (f"build the training scheduler with DDPMScheduler.from_config({name.lower()}.config), or use "
            f"{', '.join(FLOW_SCHEDULERS)} for a flow-matching model")
    try:
        t = torch.tensor([int(scheduler.config.num_train_timesteps) // 2])
        signal = float(scheduler.add_noise(torch.ones(1, 1), torch.zeros(1, 1), t).flatten()[0])
    except Exception as err:  # e.g. a scheduler whose add_noise needs set_timesteps first
        raise PrefoptError(f"scheduler {name}: add_noise failed for a training timestep ({err}); {hint}") from None
    if not signal < 1.0 - 1e-6:
        raise PrefoptError(f"scheduler {name} noises as x0 + sigma * eps (its model input is rescaled elsewhere), "
                           f"not the variance-preserving DDPM forward process the UNet is trained on; {hint}")


def _repeats(value: torch.Tensor, group: int) -> bool:
    """Whether ``value`` is ``group`` copies of its first ``len / group`` rows."""
    if value.shape[0] % group:
        return False
    first, *others = value.chunk(group)
    return all(torch.equal(first, other) for other in others)


def _repeat_rows(value, k: int, n: int):
    """A per-sample tensor ``[n, ...]`` repeated ``k`` times along dim 0; anything else as is."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] == n:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() else value


def _dtype(network: nn.Module) -> torch.dtype:
    for parameter in network.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _output_hidden(out) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def pair_draw(timesteps: Sequence[float] | torch.Tensor, noise: torch.Tensor) -> DiffusionDraw:
    """A :class:`DiffusionDraw` from per-pair ``timesteps`` ``[B]`` and ``noise`` ``[B, ...]`` (tests, analysis).

    Integer timesteps become int64 (DDPM-type schedulers); float ones (a flow-matching schedule's) stay float.
    """
    timesteps = torch.as_tensor(timesteps)
    if not timesteps.is_floating_point():
        timesteps = timesteps.to(torch.int64)
    return DiffusionDraw(timesteps.repeat(2), noise.repeat(2, *([1] * (noise.ndim - 1))))


__all__ = ["ATTENTION_PROJECTIONS", "DiffusionDraw", "DiffusionPolicy", "FAMILIES", "FLOW_PREDICTION",
           "FLOW_SCHEDULERS", "LOSS_WEIGHTINGS", "PREDICTION_TYPES", "TIMESTEP_SAMPLINGS", "pair_draw"]

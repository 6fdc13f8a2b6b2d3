"""Diffusion models (diffusers UNets): Diffusion-DPO's surrogate log-likelihood of an image.

A diffusion model has no tractable likelihood, so Diffusion-DPO (Wallace et al. 2023, "Diffusion Model
Alignment Using Direct Preference Optimization") scores an image ``x0`` by how well the network denoises
it: draw a timestep ``t`` and noise ``eps``, noise the image with the scheduler (``x_t =
scheduler.add_noise(x0, eps, t)``), and compare the network's prediction with its target::

    log_likelihood(x0) = -scale * mean_{c,h,w} (network(x_t, t, cond) - target)^2

with ``target = eps`` (``prediction_type="epsilon"``), ``scheduler.get_velocity(x0, eps, t)``
(``"v_prediction"``) or ``x0`` (``"sample"``). The mean is over every non-batch dimension, in float32.

**Scale convention.** With ``scale = 1`` (the default) prefopt's ``loss=sigmoid`` with ``beta = b``::

    -log sigmoid(b * ((lp_w - ref_w) - (lp_l - ref_l)))
        = -log sigmoid(b * ((ref_mse_w - ref_mse_l) - (mse_w - mse_l)))

is exactly the loss of diffusers' research script ``examples/research_projects/diffusion_dpo/
train_diffusion_dpo.py`` (``logits = ref_diff - model_diff``; ``-logsigmoid(beta_dpo * logits)``), whose
default ``--beta_dpo`` is 2500: ``loss.beta=2500`` here is ``--beta_dpo 2500`` there. The original code of
the paper (SalesforceAIResearch/DiffusionDPO) writes ``-logsigmoid(-0.5 * beta_dpo * (model_diff -
ref_diff))``; ``likelihood_scale=0.5`` reproduces that form with the same beta (equivalently, its
``beta_dpo`` is twice prefopt's beta at ``scale = 1``). The implicit rewards prefopt logs
(``rewards/chosen`` = ``beta * (lp - ref)``) are in the same units.

**Shared draws.** :meth:`DiffusionPolicy.draw` draws one ``(t, eps)`` per *pair*: rows ``i`` and ``i + B``
(the chosen and the rejected image) get the same timestep and noise, and the module passes the same draw
to the policy and the reference. Where the batch carries an integer ``seed`` per example, that example's
``t`` and ``eps`` come from its seed alone (``reference=precomputed`` needs this).

**Inputs.** A sample batch holds ``images`` (pixels in ``[-1, 1]``, ``[N, C, H, W]``) or ``latents``
(already encoded and scaled). With a ``vae`` (an ``AutoencoderKL``) images are encoded to the mean of the
latent distribution, times ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` where the VAE
has one). Conditioning, all optional: ``class_labels`` ``[N]`` (class-conditional ``UNet2DModel``),
``encoder_hidden_states`` ``[N, L, D]`` (``UNet2DConditionModel``), or ``input_ids`` ``[N, L]`` encoded by
``text_encoder``. The frozen encodings are computed once per batch (in :meth:`draw`) and shared by the
policy and the reference forward.

What a subclass may change: :meth:`encode` (other autoencoders), :meth:`conditioning` (extra
conditioning such as SDXL's ``added_cond_kwargs``), :meth:`target` (other parameterizations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from prefopt.errors import PrefoptError, check_choice
from prefopt.policy import PreferencePolicy
from prefopt.reference import eval_mode

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddim", "ddpm")
#: diffusers' attention projections: what ``reference=adapter`` wraps in LoRA by default
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_CONDITIONING_INPUTS = ("class_labels", "encoder_hidden_states", "input_ids")


@dataclass
class DiffusionDraw:
    """What the policy and the reference forward of one batch share.

    Attributes:
        timesteps: int64 ``[N]``; rows ``i`` and ``i + N/2`` are equal.
        noise: ``[N, *x0.shape[1:]]``; rows ``i`` and ``i + N/2`` are equal.
        inputs: the clean model inputs ``x0`` (encoded latents or pixels), or ``None`` to encode again.
        conditioning: keyword arguments of the network's forward (``class_labels``,
            ``encoder_hidden_states``), or ``None`` to compute them again.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    inputs: torch.Tensor | None = None
    conditioning: dict[str, torch.Tensor] | None = None


def _output(out) -> torch.Tensor:
    """A diffusers model output (``.sample``), a tuple (``return_dict=False``) or a tensor."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on ``device``; to a GPU through pinned memory, so the copy does not wait for the
    work already queued on the device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DiffusionPolicy(PreferencePolicy):
    """Diffusion-DPO for a diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``).

    Args:
        network: the denoiser; called as ``network(x_t, t, **conditioning)``.
        scheduler: a diffusers noise scheduler whose ``add_noise`` is the DDPM forward process (DDPM, DDIM,
            PNDM, DPM-Solver...; ``get_velocity`` too for ``v_prediction``). Sigma-parameterized ones
            (Euler...) are refused with a hint: use ``DDPMScheduler.from_config`` of their config. Its config
            also builds the sampler.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``; ``None`` reads the scheduler's.
        vae: optional ``AutoencoderKL`` (frozen): the UNet works on its scaled latents.
        text_encoder: optional frozen text encoder for ``input_ids`` (e.g. ``CLIPTextModel``).
        likelihood_scale: ``scale`` in the module docstring (1 = the diffusers script's convention).
        sampler: ``ddim`` (deterministic with ``eta=0``: the same noise gives comparable images for two
            networks) or ``ddpm``; used by :meth:`generate`.
    """

    stochastic = True
    lora_targets = ATTENTION_PROJECTIONS

    def __init__(self, network: nn.Module, scheduler, prediction_type: str | None = None,
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 likelihood_scale: float = 1.0, sampler: str = "ddim"):
        super().__init__(network)
        if not callable(getattr(scheduler, "add_noise", None)):
            raise PrefoptError(f"scheduler {type(scheduler).__name__} has no add_noise(); allowed: a diffusers noise "
                               "scheduler with add_noise, e.g. DDPMScheduler, DDIMScheduler, PNDMScheduler")
        _check_forward_process(scheduler)
        if prediction_type is None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "v_prediction" and not callable(getattr(scheduler, "get_velocity", None)):
            raise PrefoptError(f"prediction_type=v_prediction needs scheduler.get_velocity(); "
                               f"{type(scheduler).__name__} has none")
        check_choice("sampler", sampler, SAMPLERS)
        if not float(likelihood_scale) > 0:
            raise PrefoptError(f"likelihood_scale={likelihood_scale!r} must be > 0")
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.likelihood_scale, self.sampler = float(likelihood_scale), sampler
        # Frozen helpers are submodules so they follow the policy across devices; they never train.
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.text_encoder = text_encoder.requires_grad_(False).eval() if text_encoder is not None else None

    def train(self, mode: bool = True):
        """Switch the denoiser's mode; the VAE and text encoder stay in eval mode (keep that in overrides)."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps ``t`` are drawn uniformly from ``[0, num_train_timesteps)`` of the noise scheduler."""
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
        """Keyword arguments of the network's forward for ``samples``."""
        out: dict[str, torch.Tensor] = {}
        if "class_labels" in samples:
            out["class_labels"] = samples["class_labels"]
        if "encoder_hidden_states" in samples:
            out["encoder_hidden_states"] = samples["encoder_hidden_states"]
        elif "input_ids" in samples:
            if self.text_encoder is None:
                raise PrefoptError("samples carry 'input_ids' but the diffusion policy has no text_encoder; "
                                   "pass text_encoder= or give 'encoder_hidden_states'")
            out["encoder_hidden_states"] = _output_hidden(self.text_encoder(samples["input_ids"]))
        return out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network predicts, by ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    # ----------------------------------------------------------------------------------- draw
    def draw(self, samples: Mapping[str, Any], generator: torch.Generator | None = None) -> DiffusionDraw:
        """One timestep and one noise per pair, repeated for its chosen and rejected rows.

        Drawn on the CPU from ``generator`` (or from each example's ``seed`` where the samples carry one,
        as ``reference=precomputed`` needs), then moved to the samples' device. The clean inputs and the
        conditioning are computed here once and reused by the policy's and the reference's forward.
        A subclass changes the *distribution* of ``t`` here (e.g. a truncated range), keeping the pairing.
        """
        x0 = self.encode(samples)
        n = x0.shape[0]
        if n % 2:
            raise PrefoptError(f"a diffusion sample batch must hold 2B rows (chosen then rejected); got {n}")
        half, shape = n // 2, tuple(x0.shape[1:])
        seeds = samples.get("seed")
        if seeds is not None:
            ts, noises = [], []
            for seed in seeds[:half].tolist():
                g = torch.Generator().manual_seed(int(seed))
                ts.append(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
                noises.append(torch.randn((1, *shape), generator=g))
            timesteps, noise = torch.cat(ts), torch.cat(noises)
        else:
            timesteps = torch.randint(0, self.num_train_timesteps, (half,), generator=generator)
            noise = torch.randn((half, *shape), generator=generator)
        timesteps = _to_device(timesteps.repeat(2), x0.device)
        noise = _to_device(noise.repeat(2, *([1] * len(shape))), x0.device).to(x0.dtype)
        return DiffusionDraw(timesteps, noise, x0, self._pair_conditioning(samples, half))

    def _pair_conditioning(self, samples: Mapping[str, Any], half: int) -> dict[str, torch.Tensor]:
        """:meth:`conditioning`, computed once per pair when both rows of every pair share it (a caption
        encoded once, not twice), else per row."""
        inputs = {k: v for k, v in samples.items() if k in _CONDITIONING_INPUTS and torch.is_tensor(v)}
        if not inputs or not all(torch.equal(v[:half], v[half:]) for v in inputs.values()):
            return self.conditioning(samples)
        cond = self.conditioning({k: v[:half] for k, v in inputs.items()})
        return {k: torch.cat([v, v]) for k, v in cond.items()}

    # ----------------------------------------------------------------------------- likelihood
    def log_likelihood(self, network: nn.Module, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        """``-likelihood_scale * mean((network(x_t, t, cond) - target)^2)`` per sample, shape ``[N]``.

        ``x_t = scheduler.add_noise(x0, noise, t)`` with the draw's ``t`` and noise. What a subclass changes
        is usually :meth:`encode` (what is denoised: images, latents, actions), :meth:`conditioning` (what
        the network is given) or :meth:`target`; this method only combines them.
        """
        if draw is None:
            draw = self.draw(samples)
        x0 = draw.inputs if draw.inputs is not None else self.encode(samples)
        cond = draw.conditioning if draw.conditioning is not None else self.conditioning(samples)
        timesteps, noise = draw.timesteps.to(x0.device), draw.noise.to(device=x0.device, dtype=x0.dtype)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        dtype = _dtype(network)  # e.g. a half-precision UNet: inputs in its dtype, the error in float32
        cond = {k: _cast(v, dtype) for k, v in cond.items()}
        prediction = _output(network(noisy.to(dtype), timesteps, **cond))
        error = (prediction.float() - self.target(x0, noise, timesteps).float()) ** 2
        return -self.likelihood_scale * error.mean(dim=tuple(range(1, error.ndim)))

    # ------------------------------------------------------------------------------- sampling
    def make_sampler(self):
        """The scheduler used by :meth:`generate` (DDIM or DDPM, from the training scheduler's config)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[self.sampler]
        return cls.from_config(self.scheduler.config, prediction_type=self.prediction_type)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, conditioning: Mapping[str, torch.Tensor] | None = None,
                 network: nn.Module | None = None, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 negative_conditioning: Mapping[str, torch.Tensor] | None = None, batch_size: int = 256,
                 seed: int | None = None, progress: bool = False) -> torch.Tensor:
        """Images (``[-1, 1]``, decoded when there is a VAE) from the initial ``noise`` ``[N, *x0 shape]``.

        With the default DDIM sampler (``eta = 0``) the result is a deterministic function of ``noise``
        and the conditioning, so two networks given the same noise produce comparable images.
        ``guidance_scale > 1`` applies classifier-free guidance against ``negative_conditioning``
        (e.g. the encoding of the empty prompt), which must then be given. ``seed`` seeds the noise that a
        stochastic sampler (``ddpm``, or DDIM with ``eta > 0``) adds along the way.
        """
        network = self.network if network is None else network
        conditioning = dict(conditioning or {})
        if guidance_scale != 1.0 and negative_conditioning is None:
            raise PrefoptError(f"guidance_scale={guidance_scale} needs negative_conditioning (e.g. the empty prompt)")
        device, dtype = next(network.parameters()).device, _dtype(network)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        sampler = self.make_sampler()
        sampler.set_timesteps(int(num_inference_steps), device=device)
        chunks = []
        starts = range(0, noise.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="sampling", leave=False)
        with eval_mode(network):
            for start in starts:
                stop = start + batch_size
                x = noise[start:stop].to(device) * sampler.init_noise_sigma
                cond = {k: _cast(v[start:stop].to(device), dtype) for k, v in conditioning.items()}
                neg = ({k: _cast(v[start:stop].to(device), dtype) for k, v in negative_conditioning.items()}
                       if guidance_scale != 1.0 else None)
                for t in sampler.timesteps:
                    model_in = sampler.scale_model_input(x, t).to(dtype)
                    if neg is None:
                        pred = _output(network(model_in, t, **cond))
                    else:
                        both = {k: torch.cat([neg[k], cond[k]]) for k in cond}
                        uncond, text = _output(network(torch.cat([model_in, model_in]), t, **both)).chunk(2)
                        pred = uncond + guidance_scale * (text - uncond)
                    x = sampler.step(pred.float(), t, x, generator=generator).prev_sample
                chunks.append(self.decode(x))
        return torch.cat(chunks)


def _check_forward_process(scheduler) -> None:
    """The UNet sees ``add_noise``'s output as is, so that must be the variance-preserving DDPM forward
    process ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPM, DDIM, PNDM, DPM-Solver...). Sigma-parameterized
    schedulers (Euler, Heun, LMS) return ``x0 + sigma_t eps`` and rescale the model input elsewhere."""
    name = type(scheduler).__name__
    hint = f"build the training scheduler with DDPMScheduler.from_config({name.lower()}.config)"
    try:
        t = torch.tensor([int(scheduler.config.num_train_timesteps) // 2])
        signal = float(scheduler.add_noise(torch.ones(1, 1), torch.zeros(1, 1), t).flatten()[0])
    except Exception as err:  # e.g. a scheduler whose add_noise needs set_timesteps first
        raise PrefoptError(f"scheduler {name}: add_noise failed for a training timestep ({err}); {hint}") from None
    if not signal < 1.0 - 1e-6:
        raise PrefoptError(f"scheduler {name} noises as x0 + sigma * eps (its model input is rescaled elsewhere), "
                           f"not the variance-preserving DDPM forward process the UNet is trained on; {hint}")


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


def pair_draw(timesteps: Sequence[int] | torch.Tensor, noise: torch.Tensor) -> DiffusionDraw:
    """A :class:`DiffusionDraw` from per-pair ``timesteps`` ``[B]`` and ``noise`` ``[B, ...]`` (tests, analysis)."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64)
    return DiffusionDraw(timesteps.repeat(2), noise.repeat(2, *([1] * (noise.ndim - 1))))


__all__ = ["ATTENTION_PROJECTIONS", "DiffusionDraw", "DiffusionPolicy", "PREDICTION_TYPES", "pair_draw"]

"""Text-to-image pipelines from a local folder: what Diffusion-DPO trains, and how captions are encoded.

One row per pipeline family says which component is the denoiser, how its captions are encoded (the
pipeline's own ``encode_prompt``, so the conditioning is exactly what the pipeline gives its denoiser at
inference) and whether sampling uses classifier-free guidance:

===============================  ===========  =================================================================
pipeline                         denoiser     conditioning (sample keys)
===============================  ===========  =================================================================
``StableDiffusionPipeline``      ``unet``     ``encoder_hidden_states``
``StableDiffusionXLPipeline``    ``unet``     ``encoder_hidden_states``, ``text_embeds`` (pooled), ``time_ids``
                                              (original size, crop, target size of each image)
``StableDiffusion3Pipeline``     transformer  ``encoder_hidden_states`` (CLIP-L, CLIP-G, T5), ``pooled_projections``
``FluxPipeline``                 transformer  ``encoder_hidden_states`` (T5), ``pooled_projections`` (CLIP);
                                              guidance-distilled models get the guidance value as an input
===============================  ===========  =================================================================

A subclass of one of these pipelines uses its parent's row. UNet pipelines train with a ``DDPMScheduler`` built
from the pipeline's scheduler config (as diffusers' Diffusion-DPO scripts); flow-matching pipelines with their
own ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from prefopt.errors import PrefoptError

Encode = Callable[..., dict[str, torch.Tensor]]


def _encode_sd(pipe, prompts, device, max_sequence_length):
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return {"encoder_hidden_states": embeds}


def _encode_sdxl(pipe, prompts, device, max_sequence_length):
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def _encode_sd3(pipe, prompts, device, max_sequence_length):
    prompts = list(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length or 256)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _encode_flux(pipe, prompts, device, max_sequence_length):
    prompts = list(prompts)
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length or 512)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@dataclass(frozen=True)
class PipelineFamily:
    """How one pipeline class is used.

    Attributes:
        name: the diffusers pipeline class name.
        denoiser: the component that is trained (``unet`` or ``transformer``).
        encode: ``(pipe, prompts, device, max_sequence_length) -> {sample key: [len(prompts), ...]}``.
        text_components: the components the encodings depend on (their weights key the cache).
        cfg: sampling uses classifier-free guidance against the empty prompt (Flux does not).
        time_ids: the UNet takes SDXL's size and crop micro-conditioning.
    """

    name: str
    denoiser: str
    encode: Encode
    text_components: tuple[str, ...]
    cfg: bool = True
    time_ids: bool = False


PIPELINE_FAMILIES: dict[str, PipelineFamily] = {f.name: f for f in (
    PipelineFamily("StableDiffusionPipeline", "unet", _encode_sd, ("text_encoder", "tokenizer")),
    PipelineFamily("StableDiffusionXLPipeline", "unet", _encode_sdxl,
                   ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), time_ids=True),
    PipelineFamily("StableDiffusion3Pipeline", "transformer", _encode_sd3,
                   ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")),
    PipelineFamily("FluxPipeline", "transformer", _encode_flux,
                   ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), cfg=False),
)}


def pipeline_family(pipe) -> PipelineFamily:
    """The row of :data:`PIPELINE_FAMILIES` for ``pipe``'s class (or its nearest base class in the table)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    raise PrefoptError(f"pipeline {type(pipe).__name__} is not supported for image preferences; supported: "
                       f"{', '.join(PIPELINE_FAMILIES)}")


def training_scheduler(pipe):
    """The noise scheduler training uses: the pipeline's flow-matching scheduler, or DDPM from its config."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def encode_prompts(pipe, family: PipelineFamily, prompts: Sequence[str], device, max_sequence_length=None,
                   batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The pipeline's encodings of ``prompts`` (on the CPU, in float32), batch by batch."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        out = family.encode(pipe, prompts[start:start + batch_size], device, max_sequence_length)
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def sdxl_time_ids(geometry: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's ``add_time_ids`` per image: original (height, width), crop (top, left), target (R, R): ``[N, 6]``."""
    target = torch.tensor([resolution, resolution], dtype=torch.float32).expand(geometry.shape[0], 2)
    return torch.cat([geometry.float(), target], dim=1)

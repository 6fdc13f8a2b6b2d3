"""How each diffusers denoiser is called: one row per model family.

:class:`~prefopt.adapters.diffusion.DiffusionPolicy` turns a batch into a noisy input ``x_t [N, C, H, W]``, the
scheduler's timesteps ``t [N]`` and a dict of conditioning tensors taken from the samples; the family of the
network says which sample keys it reads, which of them it cannot do without, how the network is called and what
``reference=adapter`` wraps in LoRA by default. The calls follow the diffusers pipelines and training scripts:

=============================  ==========================================================================
family                         call
=============================  ==========================================================================
``UNet2DModel``                ``network(x_t, t, class_labels=...)``
``UNet2DConditionModel``       ``network(x_t, t, encoder_hidden_states, added_cond_kwargs={text_embeds,
                               time_ids})`` (SDXL's micro-conditioning when the samples carry it)
``SD3Transformer2DModel``      ``network(hidden_states=x_t, timestep=t, encoder_hidden_states,
                               pooled_projections)``
``FluxTransformer2DModel``     ``x_t`` packed into 2x2 patches (``FluxPipeline._pack_latents``), ``img_ids``
                               from ``FluxPipeline._prepare_latent_image_ids``, ``txt_ids`` zeros, timestep
                               ``t / 1000``, ``guidance`` where the model embeds it; the output unpacked
``SanaTransformer2DModel``     ``network(x_t, timestep=t * timestep_scale, encoder_hidden_states,
                               encoder_attention_mask)``
``DiTTransformer2DModel``      ``network(x_t, timestep=t, class_labels)``
``PixArtTransformer2DModel``   ``network(x_t, encoder_hidden_states, timestep=t, added_cond_kwargs,
                               encoder_attention_mask)``
``Transformer2DModel``         class- (``class_labels``) or caption-conditioned (``encoder_hidden_states``)
=============================  ==========================================================================

DiT- and PixArt-type models that also predict the variance (``out_channels = 2 * in_channels``) give their
first half, as their pipelines do; their class-label dropout (for classifier-free guidance training) is turned
off, so the policy and the reference see the same labels (:func:`disable_label_dropout`). A network of a class
not in the table (and not a subclass of one) is called as ``network(x_t, t, **conditioning)`` when it is a plain
``nn.Module`` (a user's own denoiser); a diffusers model of another class is refused with the list of the
supported ones. To call any other model, subclass ``DiffusionPolicy`` and override
:meth:`~prefopt.adapters.diffusion.DiffusionPolicy.predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from prefopt.errors import PrefoptError

#: diffusers' attention projections (UNets, DiT, PixArt): what ``reference=adapter`` wraps in LoRA by default
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
#: MM-DiT joint attention (SD3, Flux): the image and the text stream's projections, as diffusers' SD3 and Flux
#: LoRA scripts and flow_grpo's SD3 scripts target them
JOINT_ATTENTION_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def output(out) -> torch.Tensor:
    """A diffusers model output (``.sample``), a tuple (``return_dict=False``) or a tensor."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _first_half_channels(prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """DiT/PixArt with a learned variance predict ``2C`` channels; the first ``C`` are the denoising target."""
    if prediction.shape[1] == 2 * x.shape[1]:
        return prediction[:, : x.shape[1]]
    return prediction


# ------------------------------------------------------------------------------------------ calls
def call_plain(network, x, t, cond):
    return output(network(x, t, **cond))


def call_unet_condition(network, x, t, cond):
    cond = dict(cond)
    added = {k: cond.pop(k) for k in ("text_embeds", "time_ids") if k in cond}
    if added:
        cond["added_cond_kwargs"] = added
    return output(network(x, t, **cond))


def call_sd3(network, x, t, cond):
    return output(network(hidden_states=x, timestep=t, return_dict=False, **cond))


def call_flux(network, x, t, cond):
    from diffusers import FluxPipeline

    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise PrefoptError(f"FluxTransformer2DModel packs 2x2 latent patches: latent height and width must be even, "
                           f"got {h}x{w}")
    packed = FluxPipeline._pack_latents(x, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
    text = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
    # diffusers' Flux pipeline and training scripts pass t / 1000 (the model multiplies by 1000 again)
    out = network(hidden_states=packed, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                  **cond)
    return FluxPipeline._unpack_latents(output(out), h, w, 1)


def call_sana(network, x, t, cond):
    # SanaPipeline multiplies the scheduler's timestep by the model's timestep_scale
    scale = float(getattr(_base(network).config, "timestep_scale", 1.0))
    return output(network(x, timestep=t * scale, return_dict=False, **cond))


def call_dit(network, x, t, cond):
    return _first_half_channels(output(network(x, timestep=t, **cond)), x)


def call_caption_transformer(network, x, t, cond):
    """PixArt-type (``AdaLayerNormSingle``): resolution and aspect ratio are optional extra conditioning."""
    cond = dict(cond)
    added = {k: cond.pop(k, None) for k in ("resolution", "aspect_ratio")}
    return _first_half_channels(output(network(x, timestep=t, added_cond_kwargs=added, **cond)), x)


def call_transformer_2d(network, x, t, cond):
    if "encoder_hidden_states" in cond:
        return call_caption_transformer(network, x, t, cond)
    return call_dit(network, x, t, cond)


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Family:
    """How one denoiser class is called.

    Attributes:
        name: the diffusers class name (``"generic"`` for a user's own ``nn.Module``).
        inputs: sample keys passed to the network as conditioning when the samples carry them.
        required: those of ``inputs`` the network cannot do without (a clear error when missing).
        call: ``(network, x_t, t, conditioning) -> prediction`` shaped like ``x_t``; ``t`` holds the
            scheduler's timestep values, ``[N]``.
        lora_targets: module-name suffixes ``reference=adapter`` wraps in LoRA by default.
        packed_patch: side of the latent patches the model's token sequence is made of (the image sequence
            length a dynamically shifted flow-matching sampler needs), or 0 to read ``config.patch_size``.
    """

    name: str
    inputs: tuple[str, ...]
    call: Call
    required: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    packed_patch: int = 0


GENERIC = Family("generic", ("class_labels", "encoder_hidden_states"), call_plain)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("UNet2DModel", ("class_labels",), call_plain),
    Family("UNet2DConditionModel", ("encoder_hidden_states", "class_labels", "text_embeds", "time_ids",
                                    "encoder_attention_mask"), call_unet_condition,
           required=("encoder_hidden_states",)),
    Family("SD3Transformer2DModel", ("encoder_hidden_states", "pooled_projections"), call_sd3,
           required=("encoder_hidden_states", "pooled_projections"), lora_targets=JOINT_ATTENTION_PROJECTIONS),
    Family("FluxTransformer2DModel", ("encoder_hidden_states", "pooled_projections", "guidance"), call_flux,
           required=("encoder_hidden_states", "pooled_projections"), lora_targets=JOINT_ATTENTION_PROJECTIONS,
           packed_patch=2),
    Family("SanaTransformer2DModel", ("encoder_hidden_states", "encoder_attention_mask", "guidance"), call_sana,
           required=("encoder_hidden_states",)),
    Family("DiTTransformer2DModel", ("class_labels",), call_dit, required=("class_labels",)),
    Family("PixArtTransformer2DModel", ("encoder_hidden_states", "encoder_attention_mask", "resolution",
                                        "aspect_ratio"), call_caption_transformer,
           required=("encoder_hidden_states",)),
    Family("Transformer2DModel", ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "resolution",
                                  "aspect_ratio"), call_transformer_2d),
)}


def _base(network: nn.Module) -> nn.Module:
    """The model under a peft wrapper."""
    return network.get_base_model() if callable(getattr(network, "get_base_model", None)) else network


def family_for(network: nn.Module) -> Family:
    """The row of :data:`FAMILIES` for ``network``'s class (or the nearest base class in the table).

    A plain ``nn.Module`` of another class gets :data:`GENERIC`; a diffusers model of another class is refused.
    """
    base = _base(network)
    for cls in type(base).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    if type(base).__module__.startswith("diffusers."):
        raise PrefoptError(
            f"denoiser {type(base).__name__} is not a supported model family; supported: {', '.join(FAMILIES)} "
            "(or a plain torch nn.Module called as network(x_t, t, **conditioning)). For another model, subclass "
            "DiffusionPolicy and override predict(network, x_t, timesteps, conditioning)")
    return GENERIC


def required_inputs(network: nn.Module, family: Family) -> tuple[str, ...]:
    """``family.required``, plus SDXL's ``text_embeds`` and ``time_ids`` for a UNet built with them."""
    config = getattr(_base(network), "config", None)
    if getattr(config, "addition_embed_type", None) == "text_time":
        return (*family.required, "text_embeds", "time_ids")
    return family.required


def disable_label_dropout(network: nn.Module) -> int:
    """Turn off the class-label dropout of diffusers' ``LabelEmbedding`` (DiT, ``Transformer2DModel`` with
    ``ada_norm_zero``): trained for classifier-free guidance, it replaces a random tenth of the labels by the
    null class in train mode, so the policy and the reference would score one pair under different labels.
    The null-class embedding stays, so guided sampling works as before. Returns how many were turned off."""
    count = 0
    for module in network.modules():
        if type(module).__name__ == "LabelEmbedding" and getattr(module, "dropout_prob", 0) > 0:
            module.dropout_prob = 0.0
            count += 1
    return count


def embeds_guidance(network: nn.Module) -> bool:
    """Whether the model takes a guidance value as an input (guidance-distilled Flux)."""
    return bool(getattr(getattr(_base(network), "config", None), "guidance_embeds", False))


def image_sequence_length(network: nn.Module, family: Family, height: int, width: int) -> int:
    """Tokens of a ``height x width`` latent: what a dynamically shifted flow-matching sampler needs (``mu``)."""
    patch = family.packed_patch or int(getattr(getattr(_base(network), "config", None), "patch_size", None) or 1)
    return (height // patch) * (width // patch)


__all__ = ["ATTENTION_PROJECTIONS", "FAMILIES", "Family", "GENERIC", "JOINT_ATTENTION_PROJECTIONS",
           "disable_label_dropout", "embeds_guidance", "family_for", "image_sequence_length", "output",
           "required_inputs"]

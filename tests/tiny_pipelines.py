"""Tiny diffusers text-to-image pipelines with random weights, saved with ``save_pretrained`` (no hub).

``save_tiny(kind, folder)`` writes a Stable Diffusion (``sd``), SDXL (``sdxl``), Stable Diffusion 3 (``sd3``)
or Flux (``flux``) pipeline with every component a few thousand parameters: CLIP text encoders and a CLIP
tokenizer from a hand-written byte-level vocabulary, a T5 encoder with a Unigram tokenizer built with
``tokenizers``, an ``AutoencoderKL`` with 4x downsampling and the family's denoiser.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TOKENS = 12  # tokenizer max length of the tiny CLIP tokenizers


def byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2/CLIP convention)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TOKENS)


def t5_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def clip_text(hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_text(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=80, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, layers_per_block=1,
                         **kwargs)


def unet(cross_attention_dim: int = 16, **kwargs):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
                                **kwargs)


def build_tiny(kind: str, folder: Path):
    """The pipeline object of ``kind`` (``sd``, ``sdxl``, ``sd3``, ``flux``) with random weights."""
    from diffusers import (DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)

    torch.manual_seed(0)
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(folder / "words"), unet=unet(),
            scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae(), text_encoder=clip_text(16), text_encoder_2=clip_text(16, projection=8),
            tokenizer=clip_tokenizer(folder / "words"), tokenizer_2=clip_tokenizer(folder / "words_2"),
            unet=unet(32, addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=6 * 4 + 8),
            scheduler=EulerDiscreteScheduler(num_train_timesteps=100, steps_offset=1))
    if kind == "sd3":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                              num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                              joint_attention_dim=32, caption_projection_dim=16,
                                              pooled_projection_dim=16, pos_embed_max_size=16),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(shift_factor=0.06),
            text_encoder=clip_text(8, projection=8), tokenizer=clip_tokenizer(folder / "words"),
            text_encoder_2=clip_text(8, projection=8), tokenizer_2=clip_tokenizer(folder / "words_2"),
            text_encoder_3=t5_text(32), tokenizer_3=t5_tokenizer())
    if kind == "flux":
        return FluxPipeline(
            transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                               pooled_projection_dim=16, guidance_embeds=True,
                                               axes_dims_rope=(2, 2, 4)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                      max_image_seq_len=64),
            vae=vae(shift_factor=0.06), text_encoder=clip_text(16), tokenizer=clip_tokenizer(folder / "words"),
            text_encoder_2=t5_text(32), tokenizer_2=t5_tokenizer())
    raise ValueError(kind)


def save_tiny(kind: str, folder: Path) -> Path:
    """``build_tiny(kind)`` saved to ``folder / kind``; returns that folder."""
    pipe = build_tiny(kind, folder)
    pipe.save_pretrained(str(folder / kind))
    return folder / kind

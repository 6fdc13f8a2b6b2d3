"""Diffusion-DPO on user data: a diffusers pipeline from a local folder + a table of image preferences.

The pipeline (``pretrained``: a ``save_pretrained`` folder of a Stable Diffusion, SDXL, Stable Diffusion 3
or Flux checkpoint; see :mod:`prefopt.tasks.diffusion.pipelines`) gives the denoiser to train (its UNet or
transformer), the frozen VAE (latent space) and text encoders, and the noise schedule. The preference pairs
come from a Pick-a-Pic style parquet file, a ``datasets`` folder, or a folder of image pairs with a CSV
(:mod:`prefopt.tasks.diffusion.data`).

**Encodings are computed once and cached.** Before training, every image of the table goes through the VAE
(the adapter's own :meth:`~prefopt.adapters.diffusion.DiffusionPolicy.encode`) and every distinct caption
(and the empty prompt, for guidance) through the pipeline's ``encode_prompt``; the results are cached on disk
in ``cache_dir`` (:func:`prefopt.cache.cached_tensors`), keyed by the model (the component folders' files:
names, sizes, modification times) and the data (a hash of the images and captions). Training epochs, the
evaluation and later runs on the same model and data read the cache: the VAE encoder and the text encoders
run once per model and data.

Evaluation (no reward model is assumed for user data):

* on held-out pairs (``val_fraction`` of the table, never trained on), each model's *preference accuracy*:
  how often its surrogate log-likelihood (averaged over ``eval_draws`` shared draws) is higher for the
  chosen than for the rejected image; ``implicit_reward_accuracy`` is the fraction of held-out pairs where
  the policy moved towards the human choice relative to the reference, ``(lp_w - ref_w) > (lp_l - ref_l)``
  (ties count one half);
* a PNG grid of reference (left) and policy (right) samples for held-out captions from the same noise;
* optionally (``eval_reward``), a pixel reward of :mod:`~prefopt.tasks.diffusion.rewards` on those samples
  and the policy's sample win rate under it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from prefopt.adapters.diffusion import DiffusionPolicy
from prefopt.cache import cached_tensors
from prefopt.errors import PrefoptError, check_choice
from prefopt.policy import concatenate_pairs, split_pairs
from prefopt.reference import eval_mode
from prefopt.metrics import mean_and_se, win_rate
from prefopt.tasks.base import Task
from prefopt.tasks.diffusion.data import (DATA_FORMATS, EncodedPairs, ImagePairs, folder_fingerprint, load_pipeline,
                                          load_preference_images, records_fingerprint)
from prefopt.tasks.diffusion.digits import DRAW_MODES
from prefopt.tasks.diffusion.grid import panel_titles, save_side_by_side
from prefopt.tasks.diffusion.pipelines import (encode_prompts, pipeline_family, sdxl_time_ids,
                                               training_scheduler)
from prefopt.tasks.diffusion.rewards import PIXEL_REWARDS

log = logging.getLogger(__name__)


class ImagePreferenceTask(Task):
    """Diffusion-DPO of a local diffusers pipeline on image preference pairs.

    Args:
        pretrained: local pipeline folder (``model_index.json``, ``unet/`` or ``transformer/``, ``vae/``,
            ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``).
        data: preference data (a parquet file or folder, a ``datasets`` folder, or images + CSV).
        data_format: ``auto``, ``parquet``, ``hf`` or ``folder``.
        split: the split of a ``DatasetDict`` folder.
        resolution: training image size; ``None`` = the pipeline's default (the denoiser's ``sample_size``, or
            the pipeline's ``default_sample_size``, times the VAE's downscale).
        max_pairs: use at most this many pairs (the first ones), ``None`` = all.
        val_fraction: held-out share of the pairs (at least one pair).
        batch_size: pairs per training batch.
        num_samples: held-out captions sampled for the grid (and ``eval_reward``).
        sample_steps, guidance_scale: sampler steps and guidance of those samples (classifier-free guidance
            against the empty prompt; a guidance-distilled Flux gets the value as its guidance input).
        eval_draws: shared draws averaged per held-out pair.
        eval_reward: optional pixel reward for the samples (``ink``, ``thickness``, ``compressibility``,
            ``jpeg_compressibility``).
        max_sequence_length: T5 tokens of SD3 / Flux captions (``None``: the pipeline's default, 256 / 512).
        draw: as in :class:`~prefopt.tasks.diffusion.digits.DigitsDiffusionTask`.
        likelihood_scale, draws_per_pair: see :mod:`prefopt.adapters.diffusion`.
        eval_device: where the one-time encoding and the evaluation run: ``auto`` (CUDA when available),
            ``cpu`` or ``cuda``.
        cache_dir: where the encodings are cached (``None``: ``~/.cache/prefopt``).
    """

    name = "diffusion_pairs"

    def __init__(self, pretrained: str, data: str, data_format: str = "auto", split: str = "train",
                 resolution: int | None = None, max_pairs: int | None = None, val_fraction: float = 0.1,
                 batch_size: int = 4, num_samples: int = 4, sample_steps: int = 25, guidance_scale: float = 5.0,
                 eval_draws: int = 4, eval_reward: str | None = None, max_sequence_length: int | None = None,
                 draw: str = "auto", likelihood_scale: float = 1.0,
                 draws_per_pair: int = 1, eval_device: str = "auto", rounds: int = 1, seed: int = 0,
                 cache_dir: str | None = None):
        check_choice("domain.task.data_format", data_format, DATA_FORMATS)
        check_choice("domain.task.draw", draw, DRAW_MODES)
        check_choice("domain.task.eval_device", eval_device, ("auto", "cpu", "cuda"))
        self.eval_device = eval_device
        if eval_reward is not None:
            check_choice("domain.task.eval_reward", eval_reward, tuple(PIXEL_REWARDS))
        if not 0.0 < float(val_fraction) < 1.0:
            raise PrefoptError(f"domain.task.val_fraction={val_fraction!r} must be in (0, 1)")
        if int(rounds) != 1:
            raise PrefoptError(f"domain.task.rounds={rounds!r}: a fixed preference table supports rounds=1 only")
        for name, value in (("batch_size", batch_size), ("num_samples", num_samples), ("eval_draws", eval_draws),
                            ("sample_steps", sample_steps), ("draws_per_pair", draws_per_pair),
                            ("max_sequence_length", max_sequence_length or 1)):
            if int(value) < 1:
                raise PrefoptError(f"domain.task.{name}={value!r} must be an integer >= 1")
        self.pretrained, self.data = pretrained, data
        self.data_format, self.split, self.resolution = data_format, split, resolution
        self.max_pairs, self.val_fraction = max_pairs, float(val_fraction)
        self.batch_size, self.num_samples = int(batch_size), int(num_samples)
        self.sample_steps, self.guidance_scale = int(sample_steps), float(guidance_scale)
        self.eval_draws, self.eval_reward = int(eval_draws), eval_reward
        self.max_sequence_length = int(max_sequence_length) if max_sequence_length else None
        self.draw, self.fixed_draw = draw, draw == "example"
        self.likelihood_scale, self.seed, self.rounds = float(likelihood_scale), int(seed), 1
        self.draws_per_pair = int(draws_per_pair)
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prefopt"
        self.pipe = self.family = self._policy = None
        self._split_records = self._encoded = None

    # ------------------------------------------------------------------------------ building
    def build_policy(self) -> DiffusionPolicy:
        pipe = load_pipeline(self.pretrained)
        family = pipeline_family(pipe)
        network = getattr(pipe, family.denoiser, None)
        vae = getattr(pipe, "vae", None)
        if network is None or vae is None:
            raise PrefoptError(f"pretrained={self.pretrained!r}: a {family.name} needs '{family.denoiser}' and "
                               "'vae' components")
        self.pipe, self.family = pipe, family
        if self.resolution is None:  # the pipeline's default image size
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            size = network.config.get("sample_size") or getattr(pipe, "default_sample_size", None)
            if not size:
                raise PrefoptError(f"pretrained={self.pretrained!r}: no default image size; set domain.task.resolution")
            self.resolution = int(size) * down
        # The policy holds the VAE (to decode samples); captions come in encoded, so no text encoder.
        self._policy = DiffusionPolicy(network, training_scheduler(pipe), vae=vae,
                                       likelihood_scale=self.likelihood_scale, draws_per_pair=self.draws_per_pair)
        return self._policy

    def _device(self) -> str:
        if self.eval_device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.eval_device

    def _records(self):
        if self._split_records is None:
            records = load_preference_images(self.data, self.data_format, self.split)
            if self.max_pairs is not None:
                records = records.subset(range(min(int(self.max_pairs), len(records))))
            if len(records) < 2:
                raise PrefoptError(f"data={self.data!r}: {len(records)} pair(s); need at least 2 (train + held-out)")
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = min(len(records) - 1, max(1, round(self.val_fraction * len(records))))
            self._split_records = (records, sorted(order[n_val:]), sorted(order[:n_val]))
        return self._split_records

    # ------------------------------------------------------------------------------ encoding
    def _component_key(self, *names: str) -> dict[str, Any]:
        root = Path(self.pretrained).expanduser().resolve()
        return {"pipeline": self.family.name, **{n: folder_fingerprint(root / n) for n in names}}

    def encodings(self) -> dict[str, Any]:
        """Latents of every image and conditioning of every caption of the table, from the cache when there.

        Returns ``latents_chosen``/``latents_rejected`` ``[P, C, h, w]``, ``geometry_chosen``/``_rejected``
        ``[P, 4]`` (original size and crop of each image), ``text`` (``{key: [U + 1, ...]}``, the last row the
        empty prompt), ``caption_index`` ``[P]`` and ``captions`` (the ``U`` distinct captions).
        """
        if self._encoded is not None:
            return self._encoded
        if self._policy is None:
            raise PrefoptError("ImagePreferenceTask: build_policy() must run before the pairs are encoded")
        records, _, _ = self._records()
        data_key = {"data": records_fingerprint(records), "pairs": len(records)}
        device = self._device()

        def build_latents():
            return encode_images(self._policy, records, self.resolution, device, self.batch_size)

        latents = cached_tensors(self.cache_dir, "diffusion_latents",
                                 {**self._component_key("vae"), **data_key, "resolution": self.resolution,
                                  "version": 1}, build_latents)
        captions = sorted(set(records.captions))

        def build_text():
            encoders = [getattr(self.pipe, n) for n in self.family.text_components if n.startswith("text_encoder")]
            encoders = [e for e in encoders if isinstance(e, torch.nn.Module)]
            try:
                for encoder in encoders:
                    encoder.to(device)
                return encode_prompts(self.pipe, self.family, [*captions, ""], device, self.max_sequence_length)
            finally:
                for encoder in encoders:
                    encoder.to("cpu")

        text = cached_tensors(self.cache_dir, "diffusion_text",
                              {**self._component_key(*self.family.text_components), "captions": captions,
                               "max_sequence_length": self.max_sequence_length, "version": 1}, build_text)
        position = {c: i for i, c in enumerate(captions)}
        self._encoded = {**latents, "text": text, "captions": captions,
                         "caption_index": torch.tensor([position[c] for c in records.captions], dtype=torch.int64)}
        return self._encoded

    def _dataset(self, indices: Sequence[int], seeds: torch.Tensor | None) -> EncodedPairs:
        enc = self.encodings()
        records = self._records()[0]
        idx = torch.tensor(list(indices), dtype=torch.int64)
        per_image = {}
        if self.family.time_ids:
            per_image["time_ids"] = (sdxl_time_ids(enc["geometry_chosen"][idx], self.resolution),
                                     sdxl_time_ids(enc["geometry_rejected"][idx], self.resolution))
        return EncodedPairs(enc["latents_chosen"][idx], enc["latents_rejected"][idx],
                            {k: v[:-1] for k, v in enc["text"].items()}, enc["caption_index"][idx],
                            records.tie[idx], per_image, seeds)

    def _seeds(self, n: int, offset: int) -> torch.Tensor:
        return (self.seed * 1_000_003 + offset) * 100_000 + torch.arange(n, dtype=torch.int64)

    def use_reference(self, reference) -> None:
        self.fixed_draw = self.draw == "example" or (self.draw == "auto" and reference.needs_fixed_draw)

    def pairs(self, policy: DiffusionPolicy, round_index: int) -> EncodedPairs:
        _, train, _ = self._records()
        return self._dataset(train, self._seeds(len(train), 1) if self.fixed_draw else None)

    def val_pairs(self) -> EncodedPairs:
        _, _, val = self._records()
        return self._dataset(val, self._seeds(len(val), 2))

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def held_out_logps(self, policy: DiffusionPolicy, networks: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
        """Per held-out pair and network: ``[P, 2]`` (chosen, rejected) log-likelihoods, averaged over draws."""
        _, _, val = self._records()
        dataset = self._dataset(val, None)
        totals = [torch.zeros(len(dataset), 2) for _ in networks]
        device = next(policy.parameters()).device
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            samples = concatenate_pairs(batch)
            index = batch["index"].cpu()
            for k in range(self.eval_draws):
                samples["seed"] = torch.cat([self._seeds(len(dataset), 1000 + k)[index]] * 2).to(device)
                draw = policy.draw(samples)
                for total, network in zip(totals, networks):
                    with eval_mode(network):
                        chosen, rejected = split_pairs(policy.log_likelihood(network, samples, draw).cpu())
                    total[index] += torch.stack([chosen, rejected], dim=1) / self.eval_draws
        return totals

    @torch.no_grad()
    def evaluate(self, reference: DiffusionPolicy, policy: DiffusionPolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        records, _, val = self._records()
        device = self._device()
        policy.to(device)  # Lightning hands the policy back on the CPU after fit
        reference.network.to(device)
        ref_lp, pol_lp = self.held_out_logps(policy, [reference.network, policy.network])
        keep = ~records.tie[torch.tensor(val, dtype=torch.int64)]
        if not bool(keep.any()):
            raise PrefoptError(f"data={self.data!r}: every held-out pair is a tie; raise val_fraction")
        ref_correct = (ref_lp[:, 0] > ref_lp[:, 1]).double()[keep]
        pol_correct = (pol_lp[:, 0] > pol_lp[:, 1]).double()[keep]
        margin = ((pol_lp[:, 0] - ref_lp[:, 0]) - (pol_lp[:, 1] - ref_lp[:, 1]))[keep]
        (ref_acc, ref_se), (pol_acc, pol_se) = mean_and_se(ref_correct), mean_and_se(pol_correct)
        result: dict[str, Any] = {
            "reference": {"preference_accuracy": ref_acc, "preference_accuracy_se": ref_se},
            "policy": {"preference_accuracy": pol_acc, "preference_accuracy_se": pol_se},
            "implicit_reward_accuracy": win_rate(margin, torch.zeros_like(margin))["win_rate"],
            "num_eval_pairs": int(keep.sum()),
        }
        result.update(self._samples(reference, policy, [records.captions[i] for i in val], output_dir,
                                    round_index, result))
        return result

    def sample_conditioning(self, prompts: Sequence[str]) -> tuple[dict, dict | None]:
        """The cached conditioning of ``prompts`` (held-out captions) and of the empty prompt, for sampling."""
        enc = self._encoded
        position = {c: i for i, c in enumerate(enc["captions"])}
        rows = torch.tensor([position[p] for p in prompts], dtype=torch.int64)
        cond = {k: v[rows] for k, v in enc["text"].items()}
        negative = {k: v[-1:].expand_as(cond[k]).clone() for k, v in enc["text"].items()}
        if self.family.time_ids:
            ids = sdxl_time_ids(torch.tensor([[self.resolution, self.resolution, 0, 0]] * len(prompts)),
                                self.resolution)
            cond["time_ids"], negative["time_ids"] = ids, ids.clone()
            if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):  # as the SDXL pipeline
                negative["encoder_hidden_states"] = torch.zeros_like(negative["encoder_hidden_states"])
                negative["text_embeds"] = torch.zeros_like(negative["text_embeds"])
        return cond, (negative if self.family.cfg else None)

    def _samples(self, reference, policy, captions, output_dir: Path, round_index: int, result) -> dict[str, Any]:
        prompts = list(captions[: self.num_samples])
        cond, negative = self.sample_conditioning(prompts)
        shape = self._encoded["latents_chosen"].shape[1:]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 77)
        noise = torch.randn((len(prompts), *shape), generator=generator)
        guided = self.guidance_scale != 1.0 and (negative is not None or policy.embedded_guidance is not None)
        kwargs = dict(num_inference_steps=self.sample_steps,
                      guidance_scale=self.guidance_scale if guided or policy.embedded_guidance is not None else 1.0,
                      negative_conditioning=negative if guided and negative is not None else None)
        ref_images = policy.generate(noise, cond, network=reference.network, seed=self.seed, **kwargs)
        pol_images = policy.generate(noise, cond, network=policy.network, seed=self.seed, **kwargs)
        path = output_dir / f"samples_round{round_index}.png"
        out: dict[str, Any] = {"grid": path.name, "prompts": prompts}
        titles = ("reference", "policy")
        if self.eval_reward is not None:
            reward = PIXEL_REWARDS[self.eval_reward]
            ref_r, pol_r = reward(ref_images.cpu(), None), reward(pol_images.cpu(), None)
            out["sample_reward"] = self.eval_reward
            out["sample_win_rate"] = win_rate(pol_r, ref_r)["win_rate"]
            result["reference"]["sample_reward_mean"] = mean_and_se(ref_r)[0]
            result["policy"]["sample_reward_mean"] = mean_and_se(pol_r)[0]
            titles = panel_titles(self.eval_reward, result["reference"]["sample_reward_mean"],
                                  result["policy"]["sample_reward_mean"], out["sample_win_rate"])
        save_side_by_side(ref_images.cpu(), pol_images.cpu(), torch.arange(len(prompts)), 1, path, upscale=1,
                          titles=titles)
        return out


@torch.no_grad()
def encode_images(policy: DiffusionPolicy, records, resolution: int, device: str,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Every pair's chosen and rejected image through the policy's VAE encoding (``policy.encode``), batch by
    batch on ``device``; also each image's original size and crop (``geometry``)."""
    from tqdm.auto import tqdm

    dataset = ImagePairs(records, resolution, geometry=True)
    vae = policy.vae
    vae.to(device)
    out: dict[str, list[torch.Tensor]] = {}
    try:
        loader = DataLoader(dataset, batch_size=max(batch_size, 8), shuffle=False)
        for batch in tqdm(loader, desc="encoding images", leave=False):
            for side in ("chosen", "rejected"):
                latents = policy.encode({"images": batch[f"{side}_images"].to(device)})
                out.setdefault(f"latents_{side}", []).append(latents.float().cpu())
                out.setdefault(f"geometry_{side}", []).append(batch[f"{side}_geometry"])
    finally:
        vae.to("cpu")
    return {k: torch.cat(v) for k, v in out.items()}

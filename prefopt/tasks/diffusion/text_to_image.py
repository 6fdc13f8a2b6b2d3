"""Diffusion-DPO on user data: a diffusers pipeline from a local folder + a table of image preferences.

The pipeline (``pretrained``: a ``save_pretrained`` folder, e.g. a Stable Diffusion checkpoint) gives the
UNet to train, the frozen VAE (latent space) and text encoder, the tokenizer and the noise schedule. The
preference pairs come from a Pick-a-Pic style parquet file, a ``datasets`` folder, or a folder of image
pairs with a CSV (:mod:`prefopt.tasks.diffusion.data`).

Evaluation (no reward model is assumed for user data):

* on held-out pairs (``val_fraction`` of the table, never trained on), each model's *preference accuracy*:
  how often its surrogate log-likelihood (averaged over ``eval_draws`` shared draws) is higher for the
  chosen than for the rejected image; ``win_rate`` is the fraction of held-out pairs where the policy moved
  towards the human choice relative to the reference, ``(lp_w - ref_w) > (lp_l - ref_l)`` (DPO's implicit
  reward accuracy; ties count one half);
* a PNG grid of reference (left) and policy (right) samples for held-out captions from the same noise;
* optionally (``eval_reward``), a pixel reward of :mod:`~prefopt.tasks.diffusion.rewards` on those samples
  and the policy's sample win rate under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from prefopt.adapters.diffusion import DiffusionPolicy
from prefopt.errors import PrefoptError, check_choice
from prefopt.policy import concatenate_pairs, split_pairs
from prefopt.reference import eval_mode
from prefopt.tasks.bandit import mean_and_se
from prefopt.tasks.base import Task, win_rate
from prefopt.tasks.diffusion.data import DATA_FORMATS, ImagePairs, load_pipeline, load_preference_images
from prefopt.tasks.diffusion.digits import DRAW_MODES
from prefopt.tasks.diffusion.rewards import PIXEL_REWARDS


class ImagePreferenceTask(Task):
    """Diffusion-DPO of a local diffusers pipeline on image preference pairs.

    Args:
        pretrained: local pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``...).
        data: preference data (a parquet file or folder, a ``datasets`` folder, or images + CSV).
        data_format: ``auto``, ``parquet``, ``hf`` or ``folder``.
        split: the split of a ``DatasetDict`` folder.
        resolution: training image size; ``None`` = the UNet's ``sample_size`` times the VAE's downscale.
        max_pairs: use at most this many pairs (the first ones), ``None`` = all.
        val_fraction: held-out share of the pairs (at least one pair).
        batch_size: pairs per training batch.
        num_samples: held-out captions sampled for the grid (and ``eval_reward``).
        sample_steps, guidance_scale: DDIM steps and classifier-free guidance of those samples.
        eval_draws: shared draws averaged per held-out pair.
        eval_reward: optional pixel reward for the samples (``ink``, ``thickness``, ``compressibility``,
            ``jpeg_compressibility``).
        draw, reference: as in :class:`~prefopt.tasks.diffusion.digits.DigitsDiffusionTask`.
        likelihood_scale: see :mod:`prefopt.adapters.diffusion`.
        eval_device: where the evaluation runs: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    name = "diffusion_pairs"

    def __init__(self, pretrained: str, data: str, data_format: str = "auto", split: str = "train",
                 resolution: int | None = None, max_pairs: int | None = None, val_fraction: float = 0.1,
                 batch_size: int = 4, num_samples: int = 4, sample_steps: int = 25, guidance_scale: float = 5.0,
                 eval_draws: int = 4, eval_reward: str | None = None, draw: str = "auto", reference: str = "copy",
                 likelihood_scale: float = 1.0, draws_per_pair: int = 1, eval_device: str = "auto", rounds: int = 1,
                 seed: int = 0):
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
                            ("sample_steps", sample_steps)):
            if int(value) < 1:
                raise PrefoptError(f"domain.task.{name}={value!r} must be an integer >= 1")
        self.pretrained, self.data = pretrained, data
        self.data_format, self.split, self.resolution = data_format, split, resolution
        self.max_pairs, self.val_fraction = max_pairs, float(val_fraction)
        self.batch_size, self.num_samples = int(batch_size), int(num_samples)
        self.sample_steps, self.guidance_scale = int(sample_steps), float(guidance_scale)
        self.eval_draws, self.eval_reward = int(eval_draws), eval_reward
        self.fixed_draw = draw == "example" or (draw == "auto" and reference == "precomputed")
        self.likelihood_scale, self.seed, self.rounds = float(likelihood_scale), int(seed), 1
        self.draws_per_pair = int(draws_per_pair)
        self.tokenizer = None
        self._split_records = None

    # ------------------------------------------------------------------------------ building
    def build_policy(self) -> DiffusionPolicy:
        from diffusers import DDPMScheduler

        pipe = load_pipeline(self.pretrained)
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise PrefoptError(f"pretrained={self.pretrained!r}: the pipeline has no 'unet' component")
        vae, text_encoder = getattr(pipe, "vae", None), getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        if text_encoder is None or self.tokenizer is None:
            raise PrefoptError(f"pretrained={self.pretrained!r}: a text-to-image pipeline needs 'text_encoder' and "
                               "'tokenizer' components")
        # Training noises with the DDPM forward process of the pipeline's schedule (as the diffusers script).
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.resolution is None:
            down = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            self.resolution = int(unet.config.sample_size) * down
        return DiffusionPolicy(unet, scheduler, vae=vae, text_encoder=text_encoder,
                               likelihood_scale=self.likelihood_scale, draws_per_pair=self.draws_per_pair)

    def _records(self):
        if self._split_records is None:
            records = load_preference_images(self.data, self.data_format, self.split)
            if self.max_pairs is not None:
                records = records.subset(range(min(int(self.max_pairs), len(records))))
            if len(records) < 2:
                raise PrefoptError(f"data={self.data!r}: {len(records)} pair(s); need at least 2 (train + held-out)")
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = min(len(records) - 1, max(1, round(self.val_fraction * len(records))))
            self._split_records = (records.subset(sorted(order[n_val:])), records.subset(sorted(order[:n_val])))
        return self._split_records

    def _seeds(self, n: int, offset: int) -> torch.Tensor:
        return (self.seed * 1_000_003 + offset) * 100_000 + torch.arange(n, dtype=torch.int64)

    def pairs(self, policy: DiffusionPolicy, round_index: int) -> ImagePairs:
        train, _ = self._records()
        seeds = self._seeds(len(train), 1) if self.fixed_draw else None
        return ImagePairs(train, self.resolution, self.tokenizer, seeds)

    def val_pairs(self) -> ImagePairs:
        _, val = self._records()
        return ImagePairs(val, self.resolution, self.tokenizer, self._seeds(len(val), 2))

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def held_out_logps(self, policy: DiffusionPolicy, networks: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
        """Per held-out pair and network: ``[P, 2]`` (chosen, rejected) log-likelihoods, averaged over draws."""
        _, val = self._records()
        dataset = ImagePairs(val, self.resolution, self.tokenizer)
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
        _, val = self._records()
        device = self.eval_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        policy.to(device)  # Lightning hands the policy back on the CPU after fit
        reference.network.to(device)
        ref_lp, pol_lp = self.held_out_logps(policy, [reference.network, policy.network])
        keep = ~val.tie
        if not bool(keep.any()):
            raise PrefoptError(f"data={self.data!r}: every held-out pair is a tie; raise val_fraction")
        ref_correct = (ref_lp[:, 0] > ref_lp[:, 1]).double()[keep]
        pol_correct = (pol_lp[:, 0] > pol_lp[:, 1]).double()[keep]
        margin = ((pol_lp[:, 0] - ref_lp[:, 0]) - (pol_lp[:, 1] - ref_lp[:, 1]))[keep]
        (ref_acc, ref_se), (pol_acc, pol_se) = mean_and_se(ref_correct), mean_and_se(pol_correct)
        result: dict[str, Any] = {
            "reference": {"preference_accuracy": ref_acc, "preference_accuracy_se": ref_se},
            "policy": {"preference_accuracy": pol_acc, "preference_accuracy_se": pol_se},
            "win_rate": win_rate(margin, torch.zeros_like(margin))["win_rate"],
            "num_eval_pairs": int(keep.sum()),
        }
        result.update(self._samples(reference, policy, val.captions, output_dir, round_index, result))
        return result

    def _samples(self, reference, policy, captions, output_dir: Path, round_index: int, result) -> dict[str, Any]:
        from prefopt.tasks.diffusion.grid import save_side_by_side

        prompts = list(captions[: self.num_samples])
        device = next(policy.parameters()).device
        ids = self.tokenizer(prompts + [""], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        hidden = policy.conditioning({"input_ids": ids})["encoder_hidden_states"]
        cond = {"encoder_hidden_states": hidden[:-1]}
        negative = {"encoder_hidden_states": hidden[-1:].expand_as(hidden[:-1])}
        unet = policy.network
        channels = int(unet.config.in_channels)
        size = int(unet.config.sample_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 77)
        noise = torch.randn((len(prompts), channels, size, size), generator=generator)
        kwargs = dict(num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale,
                      negative_conditioning=negative if self.guidance_scale != 1.0 else None)
        ref_images = policy.generate(noise, cond, network=reference.network, seed=self.seed, **kwargs)
        pol_images = policy.generate(noise, cond, network=policy.network, seed=self.seed, **kwargs)
        path = output_dir / f"samples_round{round_index}.png"
        save_side_by_side(ref_images.cpu(), pol_images.cpu(), torch.arange(len(prompts)), 1, path, upscale=1)
        out: dict[str, Any] = {"grid": path.name, "prompts": prompts}
        if self.eval_reward is not None:
            reward = PIXEL_REWARDS[self.eval_reward]
            ref_r, pol_r = reward(ref_images.cpu(), None), reward(pol_images.cpu(), None)
            out["sample_reward"] = self.eval_reward
            out["sample_win_rate"] = win_rate(pol_r, ref_r)["win_rate"]
            result["reference"]["sample_reward_mean"] = mean_and_se(ref_r)[0]
            result["policy"]["sample_reward_mean"] = mean_and_se(pol_r)[0]
        return out

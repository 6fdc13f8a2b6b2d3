"""Tiny random models, preference pairs and the runners the benchmarks time.

Runners (see :mod:`benchmarks.common`):

* :class:`LightningRunner`: prefopt's real training step: a :class:`prefopt.module.PreferenceModule` fitted by a
  Lightning ``Trainer`` for ``n`` steps (no logger, checkpointing or progress bar; everything else as in
  ``prefopt`` runs, including ``self.log`` of the TRL-named metrics every step).
* :class:`HandLoop`: the same math without Lightning and without the module: the adapter's
  ``concatenate``/``draw``/``log_likelihood``, :func:`prefopt.losses.preference_loss`, AdamW.
* :class:`FlowScriptLoop`: the same for flow matching (``FlowMatchEulerDiscreteScheduler``), the math of
  flow_grpo's SD3 DPO script.
* :class:`DiffusionScriptLoop`: the training step of diffusers' ``train_diffusion_dpo.py`` (research project)
  re-written as a plain loop (LoRA via ``unet.add_adapter``, reference = ``disable_adapters()``, one
  concatenated forward of chosen + rejected with shared t and noise, ``-logsigmoid(beta * (ref_diff -
  model_diff))``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import device, intervals, now
from prefopt.data.pairs import TensorPairs, collate_pairs
from prefopt.losses import preference_loss
from prefopt.policy import split_pairs

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*Trying to infer the `batch_size`.*")

LORA_RANK = 8


# ------------------------------------------------------------------------------------------- models
def gpt2(vocab: int, layers: int, width: int, positions: int, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=0)
    return GPT2LMHeadModel(config).float()


def unet(sample_size: int, width: int = 32, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4,
                                block_out_channels=(width, 2 * width), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's schedule


def control_network(obs_dim: int = 17, act_dim: int = 6, hidden=(256, 256), seed: int = 0) -> nn.Module:
    from prefopt.adapters.control import GaussianMLP

    torch.manual_seed(seed)
    return GaussianMLP(obs_dim, act_dim, hidden=hidden, low=[-1.0] * act_dim, high=[1.0] * act_dim)


# ------------------------------------------------------------------------------------------- policies
def sequence_policy(network):
    from prefopt.adapters.sequence import SequencePolicy

    return SequencePolicy(network, pad_id=0)


def diffusion_policy(network):
    from prefopt.adapters.diffusion import DiffusionPolicy

    return DiffusionPolicy(network, ddpm())


def flow_policy(network):
    """flow_grpo's SD3 DPO likelihood: logit-normal(0, 1) timesteps, no loss weighting, scale 0.5."""
    from prefopt.adapters.diffusion import DiffusionPolicy

    return DiffusionPolicy(network, flow_scheduler(), likelihood_scale=0.5)


def control_policy(network):
    from prefopt.adapters.control import ControlPolicy

    return ControlPolicy(network)


# ------------------------------------------------------------------------------------------- pairs
def sequence_tokens(n: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """Random word ids ``1 .. vocab - 2`` (0 is padding, ``vocab - 1`` is EOS); completions end with EOS."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab - 1, (n, prompt_len), generator=g)
    chosen = torch.randint(1, vocab - 1, (n, completion_len), generator=g)
    rejected = torch.randint(1, vocab - 1, (n, completion_len), generator=g)
    chosen[:, -1] = vocab - 1
    rejected[:, -1] = vocab - 1
    return prompt, chosen, rejected


def sequence_pairs(prompt, chosen, rejected) -> TensorPairs:
    n, p = prompt.shape
    c = chosen.shape[1]
    completion_mask = torch.cat([torch.zeros(n, p, dtype=torch.long), torch.ones(n, c, dtype=torch.long)], 1)
    attention = torch.ones(n, p + c, dtype=torch.long)
    sample = lambda comp: {"input_ids": torch.cat([prompt, comp], 1), "attention_mask": attention,  # noqa: E731
                           "completion_mask": completion_mask}
    return TensorPairs(sample(chosen), sample(rejected), {"seed": torch.arange(n)})


def diffusion_pairs(n: int, size: int, seed: int = 0, with_seed: bool = True) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    chosen = {"latents": torch.randn(n, 4, size, size, generator=g)}
    rejected = {"latents": torch.randn(n, 4, size, size, generator=g)}
    shared = {"encoder_hidden_states": torch.randn(n, 8, 32, generator=g)}
    if with_seed:
        shared["seed"] = torch.arange(n)
    return TensorPairs(chosen, rejected, shared)


def control_pairs(n: int, horizon: int = 50, obs_dim: int = 17, act_dim: int = 6, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    sample = lambda: {"obs": torch.randn(n, horizon, obs_dim, generator=g),  # noqa: E731
                      "actions": torch.rand(n, horizon, act_dim, generator=g) * 1.8 - 0.9}
    return TensorPairs(sample(), sample(), {"seed": torch.arange(n)})


def batches_of(pairs: TensorPairs, batch_size: int) -> list[dict[str, Any]]:
    """The pair batches a DataLoader without shuffling makes, already on the benchmark device."""
    from torch.utils.data import DataLoader

    return [{k: v.to(device()) for k, v in b.items()} for b in DataLoader(pairs, batch_size=batch_size)]


# ------------------------------------------------------------------------------------------- runners
class _Stamps:
    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        stamps = self.stamps = []

        class StepEnd(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                stamps.append(now())

        self.callback = StepEnd()


class LightningRunner:
    """prefopt's full training step: ``PreferenceModule`` + Lightning ``Trainer.fit`` for ``n`` steps."""

    def __init__(self, policy, pairs: TensorPairs, batch_size: int, loss: Mapping[str, Any], reference: Any = "copy",
                 lr: float = 1e-4, weight_decay: float = 0.01):
        from prefopt.module import PreferenceModule

        self.module = PreferenceModule(policy, loss=dict(loss), reference=reference,
                                       optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay))
        self.pairs, self.batch_size = pairs, batch_size

    def run(self, n: int) -> list[float]:
        import lightning as L
        from torch.utils.data import DataLoader

        for name in ("lightning.pytorch", "lightning.fabric"):  # lightning sets INFO when it is imported
            logging.getLogger(name).setLevel(logging.ERROR)
        stamps = _Stamps()
        trainer = L.Trainer(accelerator="auto", devices=1, max_steps=n, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, precision="32-true",
                            callbacks=[stamps.callback])
        # collate_pairs, as prefopt's tasks build their loaders
        loader = DataLoader(self.pairs, batch_size=self.batch_size, shuffle=False, collate_fn=collate_pairs)
        trainer.fit(self.module, train_dataloaders=loader)
        self.module._trainer = None  # let the finished trainer (and its optimizer state) be freed
        return intervals(stamps.stamps)


def _lora_config(targets):
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(targets), lora_dropout=0.0)


class HandLoop:
    """The same math as the module, written as a plain PyTorch loop (reference ``copy`` or ``adapter``)."""

    def __init__(self, policy, pairs: TensorPairs, batch_size: int, loss: Mapping[str, Any], reference: str = "copy",
                 lr: float = 1e-4, weight_decay: float = 0.01):
        self.policy = policy.to(device())
        self.batches = batches_of(pairs, batch_size)
        self.loss = dict(loss)
        self.reference = reference
        if reference == "copy":
            self.ref_net = copy.deepcopy(policy.network).requires_grad_(False).eval()
        elif reference == "adapter":
            from peft import get_peft_model

            policy.network = get_peft_model(policy.network, _lora_config(policy.lora_targets))
        else:
            raise ValueError(reference)
        self.lr, self.weight_decay = lr, weight_decay

    def _ref(self, samples, draw):
        with torch.no_grad():
            if self.reference == "copy":
                return self.policy.log_likelihood(self.ref_net, samples, draw)
            net = self.policy.network
            net.eval()
            with net.disable_adapter():
                out = self.policy.log_likelihood(net, samples, draw)
            net.train()
            return out

    def run(self, n: int) -> list[float]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.policy.train()
        kwargs = dict(self.loss)
        loss_type = kwargs.pop("loss_type")
        stamps = []
        for i in range(n):
            batch = self.batches[i % len(self.batches)]
            samples = self.policy.concatenate(batch)
            draw = self.policy.draw(samples, torch.Generator().manual_seed(i))
            logps = self.policy.log_likelihood(self.policy.network, samples, draw)
            ref = self._ref(samples, draw)
            chosen, rejected = split_pairs(logps)
            ref_chosen, ref_rejected = split_pairs(ref)
            loss = preference_loss(loss_type, chosen, rejected, ref_chosen, ref_rejected, **kwargs).losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stamps.append(now())
        opt.zero_grad(set_to_none=True)
        return intervals(stamps)


def _frozen_with_lora(network):
    """The scripts' setup: the frozen UNet on the device with a trainable LoRA on its attention projections."""
    from peft import LoraConfig

    unet = network.to(device()).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return unet


class _LoraScriptLoop:
    """A plain loop over pre-built batches of a LoRA UNet (the reference: adapters disabled): AdamW on the LoRA
    factors, :meth:`loss` per batch (what the two scripts differ in)."""

    def __init__(self, network, pairs: TensorPairs, batch_size: int, beta: float, lr: float = 1e-4,
                 weight_decay: float = 0.01):
        self.unet = _frozen_with_lora(network)
        self.batches = batches_of(pairs, batch_size)
        self.beta, self.lr, self.weight_decay = beta, lr, weight_decay

    def loss(self, unet, batch) -> torch.Tensor:
        raise NotImplementedError

    def run(self, n: int) -> list[float]:
        unet = self.unet
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        unet.train()
        stamps = []
        for i in range(n):
            loss = self.loss(unet, self.batches[i % len(self.batches)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stamps.append(now())
        return intervals(stamps)


class DiffusionScriptLoop(_LoraScriptLoop):
    """The training step of diffusers' ``train_diffusion_dpo.py``, as a plain loop on the same UNet and batch."""

    def __init__(self, network, pairs: TensorPairs, batch_size: int, beta: float, lr: float = 1e-4,
                 weight_decay: float = 0.01):
        super().__init__(network, pairs, batch_size, beta, lr, weight_decay)
        self.scheduler = ddpm()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device())

    def loss(self, unet, batch) -> torch.Tensor:
        latents = torch.cat([batch["chosen_latents"], batch["rejected_latents"]])
        half = latents.shape[0] // 2
        noise = torch.randn_like(latents[:half]).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (half,),
                                  device=latents.device).long().repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        hidden = batch["encoder_hidden_states"].repeat(2, 1, 1)
        pred = unet(noisy, timesteps, hidden).sample
        model_losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        model_diff = model_w - model_l
        with torch.no_grad():
            unet.disable_adapters()
            ref_pred = unet(noisy, timesteps, hidden).sample.detach()
            ref_losses = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            ref_w, ref_l = ref_losses.chunk(2)
            ref_diff = ref_w - ref_l
            unet.enable_adapters()
        return -F.logsigmoid(self.beta * (ref_diff - model_diff)).mean()


class FlowScriptLoop(_LoraScriptLoop):
    """Flow-matching Diffusion-DPO written as a plain loop, the math of flow_grpo's ``scripts/train_sd3_dpo.py``.

    LoRA via ``unet.add_adapter`` and the reference by ``disable_adapters()`` (as :class:`DiffusionScriptLoop`);
    per pair one logit-normal ``u`` (diffusers' ``compute_density_for_timestep_sampling``), the training
    schedule's timestep and sigma at ``int(u * 1000)``, one noise shared by chosen and rejected,
    ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``, and
    ``-logsigmoid(-0.5 * beta * ((mse_w - ref_w) - (mse_l - ref_l)))``.
    """

    def __init__(self, network, pairs: TensorPairs, batch_size: int, beta: float, lr: float = 1e-4,
                 weight_decay: float = 0.01):
        from diffusers.training_utils import compute_density_for_timestep_sampling
        super().__init__(network, pairs, batch_size, beta, lr, weight_decay)
        scheduler = flow_scheduler()
        self.timesteps, self.sigmas = scheduler.timesteps.to(device()), scheduler.sigmas.to(device())
        self.density = compute_density_for_timestep_sampling

    def loss(self, unet, batch) -> torch.Tensor:
        latents = torch.cat([batch["chosen_latents"], batch["rejected_latents"]])
        half = latents.shape[0] // 2
        u = self.density("logit_normal", half, logit_mean=0.0, logit_std=1.0)
        index = (u * 1000).long().clamp(0, 999).to(latents.device)
        timesteps = self.timesteps[index].repeat(2)
        sigma = self.sigmas[index].repeat(2).view(-1, 1, 1, 1)
        noise = torch.randn_like(latents[:half]).repeat(2, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        target = noise - latents
        hidden = batch["encoder_hidden_states"].repeat(2, 1, 1)
        pred = unet(noisy, timesteps, hidden).sample
        model_w, model_l = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]).chunk(2)
        with torch.no_grad():
            unet.disable_adapters()
            ref_pred = unet(noisy, timesteps, hidden).sample
            ref_w, ref_l = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]).chunk(2)
            unet.enable_adapters()
        return -F.logsigmoid(-0.5 * self.beta * ((model_w - ref_w) - (model_l - ref_l))).mean()

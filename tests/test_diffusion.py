"""Diffusion adapter: the Diffusion-DPO loss by hand, shared draws, LoRA reference, latents, rewards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prefopt.adapters.diffusion import DiffusionDraw, DiffusionPolicy, pair_draw
from prefopt.errors import PrefoptError
from prefopt.losses import preference_loss
from prefopt.module import PreferenceModule
from prefopt.policy import concatenate_pairs, split_pairs

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel  # noqa: E402

torch.set_num_threads(1)


def tiny_unet(seed: int = 0, classes: int | None = 3) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=4,
                       num_class_embeds=classes)


def perturbed(unet: UNet2DModel, seed: int = 1, scale: float = 0.05) -> UNet2DModel:
    other = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def pair_batch(b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"chosen_images": torch.rand(b, 1, 8, 8, generator=g) * 2 - 1,
            "rejected_images": torch.rand(b, 1, 8, 8, generator=g) * 2 - 1,
            "class_labels": torch.arange(b) % 3}


# ----------------------------------------------------------------------------------- the loss by hand
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sigmoid_loss_is_the_diffusion_dpo_objective(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    policy = DiffusionPolicy(perturbed(tiny_unet()), scheduler)
    reference = tiny_unet()
    batch = pair_batch()
    timesteps = [37, 801]
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    draw = pair_draw(timesteps, noise)
    samples = concatenate_pairs(batch)
    lp = policy.log_likelihood(policy.network, samples, draw)
    ref = policy.log_likelihood(reference, samples, draw)

    # by hand: x_t = sqrt(a) x0 + sqrt(1 - a) eps, the target, per-sample mean squared errors
    acp = scheduler.alphas_cumprod

    def mse(net, x0, c):
        a = acp[torch.tensor(timesteps)].view(-1, 1, 1, 1).float()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
                  "sample": x0}[prediction_type]
        with torch.no_grad():
            pred = net(x_t, torch.tensor(timesteps), class_labels=c).sample
        return ((pred - target) ** 2).mean(dim=(1, 2, 3))

    c = batch["class_labels"]
    mse_w, mse_l = mse(policy.network, batch["chosen_images"], c), mse(policy.network, batch["rejected_images"], c)
    ref_w, ref_l = mse(reference, batch["chosen_images"], c), mse(reference, batch["rejected_images"], c)
    # diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
    logits = (ref_w - ref_l) - (mse_w - mse_l)
    # the script's default beta, and one where the losses are far from saturation (a stricter check)
    for beta in (2500.0, 1.0 / float(logits.abs().max())):
        ours = preference_loss("sigmoid", *split_pairs(lp), *split_pairs(ref), beta=beta).losses
        expected = -F.logsigmoid(beta * logits)
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-6)
    assert 0.3 < float(expected.min()) and float(expected.max()) < 1.4 and expected[0] != expected[1]
    torch.testing.assert_close(lp.detach(), -torch.cat([mse_w, mse_l]), rtol=1e-5, atol=1e-6)


def test_likelihood_scale_half_is_the_papers_form():
    """SalesforceAIResearch/DiffusionDPO: -logsigmoid(-0.5 * beta * (model_diff - ref_diff))."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    policy = DiffusionPolicy(perturbed(tiny_unet()), scheduler, likelihood_scale=0.5)
    full = DiffusionPolicy(policy.network, scheduler)
    reference = tiny_unet()
    samples = concatenate_pairs(pair_batch())
    draw = pair_draw([3, 500], torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        mse = -full.log_likelihood(policy.network, samples, draw)
        ref_mse = -full.log_likelihood(reference, samples, draw)
        lp, ref = policy.log_likelihood(policy.network, samples, draw), policy.log_likelihood(reference, samples, draw)
    (mw, ml), (rw, rl) = split_pairs(mse), split_pairs(ref_mse)
    beta = 5000.0
    expected = -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl)))
    ours = preference_loss("sigmoid", *split_pairs(lp), *split_pairs(ref), beta=beta).losses
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- shared draws
def test_draw_is_shared_by_the_two_images_of_a_pair():
    policy = DiffusionPolicy(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    samples = concatenate_pairs(pair_batch(b=3))
    draw = policy.draw(samples, torch.Generator().manual_seed(0))
    assert draw.timesteps.shape == (6,) and draw.noise.shape == (6, 1, 8, 8)
    torch.testing.assert_close(draw.timesteps[:3], draw.timesteps[3:])
    torch.testing.assert_close(draw.noise[:3], draw.noise[3:])
    assert len(set(draw.timesteps[:3].tolist())) > 1 or not torch.equal(draw.noise[0], draw.noise[1])
    again = policy.draw(samples, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.noise, draw.noise)


def test_per_example_seed_fixes_the_draw():
    policy = DiffusionPolicy(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    batch = {**pair_batch(b=3), "seed": torch.tensor([11, 12, 13])}
    first = policy.draw(concatenate_pairs(batch), torch.Generator().manual_seed(0))
    second = policy.draw(concatenate_pairs(batch), torch.Generator().manual_seed(99))  # generator is ignored
    torch.testing.assert_close(first.noise, second.noise)
    torch.testing.assert_close(first.timesteps, second.timesteps)
    # an example's draw depends on its seed alone, not on its position or batch-mates
    alone = policy.draw(concatenate_pairs({k: v[2:] for k, v in batch.items()}))
    torch.testing.assert_close(alone.noise[0], first.noise[2])
    assert int(alone.timesteps[0]) == int(first.timesteps[2])


def test_policy_and_reference_see_the_same_draw():
    policy = DiffusionPolicy(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 2500.0}, reference="copy")
    seen = []
    original = policy.log_likelihood

    def spy(network, samples, draw=None):
        seen.append((network, draw))
        return original(network, samples, draw)

    policy.log_likelihood = spy
    logps, ref, _ = module.pair_logps(pair_batch(b=2), torch.Generator().manual_seed(3))
    assert len(seen) == 2 and seen[0][1] is seen[1][1] and seen[0][0] is not seen[1][0]
    # identical weights + the same draw -> identical values (a different draw would differ)
    torch.testing.assert_close(logps.detach(), ref)


def test_bad_options_raise_clear_errors():
    with pytest.raises(PrefoptError, match="prediction_type='x0'.*epsilon, v_prediction, sample"):
        DiffusionPolicy(tiny_unet(), DDPMScheduler(), prediction_type="x0")
    with pytest.raises(PrefoptError, match="add_noise"):
        DiffusionPolicy(tiny_unet(), object())
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    with pytest.raises(PrefoptError, match=r"x0 \+ sigma \* eps.*DDPMScheduler.from_config"):
        DiffusionPolicy(tiny_unet(), EulerDiscreteScheduler())
    DiffusionPolicy(tiny_unet(), DDIMScheduler())  # the same forward process as DDPM
    policy = DiffusionPolicy(tiny_unet(), DDPMScheduler())
    with pytest.raises(PrefoptError, match="'images' or 'latents'"):
        policy.draw({"pixels": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(PrefoptError, match="2B rows"):
        policy.draw({"images": torch.zeros(3, 1, 8, 8)})
    with pytest.raises(PrefoptError, match="text_encoder"):
        policy.conditioning({"input_ids": torch.zeros(2, 4, dtype=torch.long)})


# -------------------------------------------------------------------------------------- LoRA reference
def test_lora_reference_trains_adapters_and_leaves_base_weights_unchanged():
    from peft import PeftModel

    unet = tiny_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    policy = DiffusionPolicy(unet, DDPMScheduler(num_train_timesteps=1000))
    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 2500.0},
                              reference={"name": "adapter", "rank": 4, "alpha": 4},
                              optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    assert isinstance(policy.network, PeftModel)
    lora = {n: p.detach().clone() for n, p in policy.network.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert any(".to_q." in n for n in lora) and any(".to_out.0." in n for n in lora)
    optimizer = module.configure_optimizers()
    batch = pair_batch(b=4)
    for step in range(3):
        logps, ref, _ = module.pair_logps(batch, torch.Generator().manual_seed(step))
        out = preference_loss("sigmoid", *split_pairs(logps), *split_pairs(ref), beta=2500.0)
        optimizer.zero_grad()
        out.losses.mean().backward()
        optimizer.step()
    changed = [n for n, p in policy.network.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert changed, "LoRA weights did not train"
    # base weights untouched, and the reference (adapters disabled) is exactly the untrained network
    base = policy.network.get_base_model()
    for key, value in base.state_dict().items():
        if "lora_" not in key:
            name = key.replace(".base_layer", "")
            torch.testing.assert_close(value, base_state[name], msg=key)
    samples = concatenate_pairs(batch)
    draw = policy.draw(samples, torch.Generator().manual_seed(9))
    untrained = tiny_unet()
    with torch.no_grad():
        ref_now = module.reference.logps(policy, samples, draw)
        expected = policy.log_likelihood(untrained, samples, draw)
        trained = policy.log_likelihood(policy.network, samples, draw)
    torch.testing.assert_close(ref_now, expected)
    assert not torch.allclose(trained, expected)


# ---------------------------------------------------------------------------------------- latents
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=0.3)


def test_latent_space_uses_the_scaled_vae_mean():
    vae = tiny_vae()
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=4)
    policy = DiffusionPolicy(unet, DDPMScheduler(num_train_timesteps=100), vae=vae)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * 0.3
    torch.testing.assert_close(policy.encode({"images": images}), expected)
    draw = policy.draw({"images": images}, torch.Generator().manual_seed(0))
    assert draw.noise.shape == (4, 4, 8, 8)
    torch.testing.assert_close(draw.inputs, expected)
    lp = policy.log_likelihood(policy.network, {"images": images}, draw)
    assert lp.shape == (4,) and lp.requires_grad
    # given latents skip the VAE
    torch.testing.assert_close(policy.log_likelihood(policy.network, {"latents": expected},
                                                     DiffusionDraw(draw.timesteps, draw.noise)), lp)
    images_out = policy.generate(torch.randn(2, 4, 8, 8), num_inference_steps=2)
    assert images_out.shape == (2, 3, 16, 16) and images_out.abs().max() <= 1


def test_a_shared_caption_is_encoded_once_per_pair():
    class CountingEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.calls = torch.nn.Embedding(10, 16), []

        def forward(self, input_ids):
            self.calls.append(input_ids.shape[0])
            return (self.embed(input_ids),)

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    encoder = CountingEncoder()
    policy = DiffusionPolicy(unet, DDPMScheduler(num_train_timesteps=100), text_encoder=encoder)
    batch = {**{k: v for k, v in pair_batch(b=3).items() if k != "class_labels"},
             "input_ids": torch.randint(0, 10, (3, 5))}
    samples = concatenate_pairs(batch)
    draw = policy.draw(samples, torch.Generator().manual_seed(0))
    assert encoder.calls == [3] and draw.conditioning["encoder_hidden_states"].shape == (6, 5, 16)
    with torch.no_grad():
        expected = encoder.embed(samples["input_ids"])
    torch.testing.assert_close(draw.conditioning["encoder_hidden_states"], expected)
    assert policy.log_likelihood(unet, samples, draw).shape == (6,)


# ---------------------------------------------------------------------------------------- rewards
def test_rewards_by_hand():
    from prefopt.tasks.diffusion.rewards import compressibility, ink, jpeg_compressibility, thickness

    image = -torch.ones(1, 1, 8, 8)
    image[0, 0, 1:7, 3:5] = 1.0  # a stroke 2 wide, 6 long
    assert ink(image).item() == pytest.approx(12 / 64)
    # thickness = 2 * area / perimeter = 2 * 12 / (2 * (2 + 6)) = 1.5 pixels
    assert thickness(image).item() == pytest.approx(1.5)
    wide = -torch.ones(1, 1, 8, 8)
    wide[0, 0, 1:7, 2:6] = 1.0
    assert thickness(wide).item() == pytest.approx(2 * 24 / (2 * (4 + 6)))
    dimmer = torch.where(image > 0, torch.zeros_like(image), image)  # ink 0.5 on the stroke
    assert thickness(dimmer).item() == pytest.approx(1.5)  # brightness is not thickness
    assert ink(dimmer).item() == pytest.approx(6 / 64)
    noise = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert compressibility(image).item() > compressibility(noise).item()
    assert jpeg_compressibility(image).item() > jpeg_compressibility(noise).item()

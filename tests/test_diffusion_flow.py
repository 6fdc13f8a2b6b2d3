"""Flow matching in DiffusionPolicy: the surrogate by hand, flow_grpo's SD3 DPO loss, diffusers' timestep
sampling and loss weighting, shared draws, K draws per pair, gradients, Euler sampling and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from prefopt.adapters.diffusion import DiffusionPolicy, pair_draw
from prefopt.errors import PrefoptError
from prefopt.losses import preference_loss
from prefopt.module import PreferenceModule
from prefopt.policy import concatenate_pairs, split_pairs

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402

from tests.test_diffusion import perturbed  # noqa: E402

torch.set_num_threads(1)
N_TRAIN = 1000


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16)


def pair_batch(b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"chosen_latents": torch.randn(b, 4, 8, 8, generator=g),
            "rejected_latents": torch.randn(b, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
            "pooled_projections": torch.randn(b, 8, generator=g)}


def sd3_call(network, x_t, t, batch_or_samples):
    """SD3's forward as diffusers' SD3 scripts (and flow_grpo) call it."""
    with torch.no_grad():
        return network(hidden_states=x_t, timestep=t, encoder_hidden_states=batch_or_samples["encoder_hidden_states"],
                       pooled_projections=batch_or_samples["pooled_projections"], return_dict=False)[0]


def hand_sigma(index: int, shift: float) -> float:
    """FlowMatchEulerDiscreteScheduler's training sigma at ``index``, from its formulas: ``s = (N - i) / N``
    (``linspace(1, N, N)`` reversed, over N), shifted to ``shift * s / (1 + (shift - 1) * s)``."""
    s = (N_TRAIN - index) / N_TRAIN
    return shift * s / (1 + (shift - 1) * s)


# ----------------------------------------------------------------------------------- the surrogate by hand
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_surrogate_by_hand(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=shift)
    policy = DiffusionPolicy(tiny_sd3(), scheduler, likelihood_scale=0.7)
    assert policy.prediction_type == "flow_prediction" and policy.sampler == "euler"
    batch = pair_batch()
    samples = concatenate_pairs(batch)
    indices = [3, 640]
    sigma = torch.tensor([hand_sigma(i, shift) for i in indices])
    timesteps = sigma * N_TRAIN  # the schedule's timesteps are its sigmas times N
    torch.testing.assert_close(scheduler.timesteps[indices], timesteps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    draw = pair_draw(scheduler.timesteps[indices], noise)
    assert draw.timesteps.dtype == torch.float32  # float timesteps stay float
    lp = policy.log_likelihood(policy.network, samples, draw)

    x0 = samples["latents"]
    s = torch.cat([sigma, sigma]).view(-1, 1, 1, 1)
    eps = torch.cat([noise, noise])
    x_t = (1 - s) * x0 + s * eps
    pred = sd3_call(policy.network, x_t, torch.cat([timesteps, timesteps]), samples)
    expected = -0.7 * ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp.detach(), expected, rtol=1e-5, atol=1e-6)
    assert lp.dtype == torch.float32 and lp.requires_grad
    # sigma exactly as diffusers' get_sigmas: the schedule's sigma at the timestep's index
    t = draw.timesteps
    step_indices = [(scheduler.timesteps == v).nonzero().item() for v in t]
    assert torch.equal(policy.flow_sigmas(t), scheduler.sigmas[step_indices])
    # a timestep outside the schedule: t / N
    torch.testing.assert_close(policy.flow_sigmas(torch.tensor([123.25])), torch.tensor([0.12325]))


def test_set_timesteps_on_the_given_scheduler_does_not_change_the_training_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)  # the caller used it for sampling first
    policy = DiffusionPolicy(tiny_sd3(), scheduler)
    torch.testing.assert_close(policy.flow_sigmas(torch.tensor([1000.0])), torch.tensor([1.0]))
    fresh = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(policy._train_timesteps, fresh.timesteps)


@pytest.mark.parametrize("sampling", ["logit_normal", "mode", "uniform"])
def test_draw_is_diffusers_timestep_sampling(sampling):
    """diffusers' SD3/Flux scripts: u = compute_density_for_timestep_sampling(...), indices = (u * N).long(),
    timesteps = noise_scheduler_copy.timesteps[indices]; then noise. One per pair, repeated for the two rows."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    policy = DiffusionPolicy(tiny_sd3(), scheduler, timestep_sampling=sampling, logit_mean=0.3, logit_std=0.8,
                             mode_scale=0.9)
    samples = concatenate_pairs(pair_batch(b=3))
    draw = policy.draw(samples, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    u = compute_density_for_timestep_sampling(sampling, 3, logit_mean=0.3, logit_std=0.8, mode_scale=0.9, generator=g)
    timesteps = scheduler.timesteps[(u * N_TRAIN).long()]
    noise = torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(draw.timesteps, torch.cat([timesteps, timesteps]))
    assert torch.equal(draw.noise, torch.cat([noise, noise]))
    assert draw.timesteps.dtype == torch.float32


def test_defaults_are_flow_grpos_dpo_sampling():
    policy = DiffusionPolicy(tiny_sd3(), FlowMatchEulerDiscreteScheduler())
    assert (policy.timestep_sampling, policy.logit_mean, policy.logit_std, policy.loss_weighting) == \
        ("logit_normal", 0.0, 1.0, "none")


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weighting_by_hand(weighting):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = DiffusionPolicy(tiny_sd3(), scheduler)
    weighted = DiffusionPolicy(plain.network, scheduler, loss_weighting=weighting)
    samples = concatenate_pairs(pair_batch())
    indices = [100, 900]
    draw = pair_draw(scheduler.timesteps[indices], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        lp, lpw = plain.log_likelihood(plain.network, samples, draw), weighted.log_likelihood(plain.network, samples,
                                                                                              draw)
    s = torch.tensor([hand_sigma(i, 3.0) for i in indices] * 2)
    factor = s ** -2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    torch.testing.assert_close(lpw, factor * lp, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------- flow_grpo's loss
def test_likelihood_scale_half_is_flow_grpos_sd3_dpo_loss():
    """yifan123/flow_grpo scripts/train_sd3_dpo.py (lines 884-937 at commit ac4c86e): shared noise and
    timesteps for the chosen and rejected halves, ``noisy = (1 - sigmas) * x0 + sigmas * noise``, ``target =
    noise - x0``, ``theta_mse``/``ref_mse`` the per-sample mean squared errors, ``w_diff = model_w_err -
    ref_w_err``, ``l_diff = model_l_err - ref_l_err``, ``loss = -logsigmoid(-0.5 * beta * (w_diff - l_diff))``."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config
    reference = tiny_sd3()
    policy = DiffusionPolicy(perturbed(reference), scheduler, likelihood_scale=0.5)
    batch = pair_batch(b=3)
    samples = concatenate_pairs(batch)
    draw = policy.draw(samples, torch.Generator().manual_seed(11))
    with torch.no_grad():
        lp = policy.log_likelihood(policy.network, samples, draw)
        ref = policy.log_likelihood(reference, samples, draw)

    # flow_grpo, re-expressed: model_input is chosen then rejected, as its batches
    bsz = 3
    model_input, noise, timesteps = samples["latents"], draw.noise, draw.timesteps
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # its get_sigmas
    sigmas = scheduler.sigmas[step_indices].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    target = noise - model_input
    theta_mse = ((sd3_call(policy.network, noisy, timesteps, samples) - target) ** 2).reshape(2 * bsz, -1).mean(1)
    ref_mse = ((sd3_call(reference, noisy, timesteps, samples) - target) ** 2).reshape(2 * bsz, -1).mean(1)
    w_diff = theta_mse[:bsz] - ref_mse[:bsz]
    l_diff = theta_mse[bsz:] - ref_mse[bsz:]
    for beta in (100.0, 0.5 / float((w_diff - l_diff).abs().max())):  # flow_grpo's config/dpo.py beta; unsaturated
        expected = -F.logsigmoid(-0.5 * beta * (w_diff - l_diff))
        ours = preference_loss("sigmoid", *split_pairs(lp), *split_pairs(ref), beta=beta).losses
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert float(expected.max() - expected.min()) > 1e-3  # the pairs differ: a real check


# ------------------------------------------------------------------------------- draws, K, gradients
def test_flow_draw_is_shared_and_seeded():
    policy = DiffusionPolicy(tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    batch = {**pair_batch(b=3), "seed": torch.tensor([21, 22, 23])}
    draw = policy.draw(concatenate_pairs(batch), torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw.timesteps[:3], draw.timesteps[3:])
    torch.testing.assert_close(draw.noise[:3], draw.noise[3:])
    assert len(set(draw.timesteps[:3].tolist())) == 3
    alone = policy.draw(concatenate_pairs({k: v[1:2] for k, v in batch.items()}), torch.Generator().manual_seed(5))
    assert torch.equal(alone.noise[0], draw.noise[1]) and torch.equal(alone.timesteps[0], draw.timesteps[1])

    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 100.0}, reference="copy")
    seen = []
    original = policy.log_likelihood
    policy.log_likelihood = lambda network, samples, draw=None: seen.append(draw) or original(network, samples, draw)
    logps, ref, _ = module.pair_logps(pair_batch(b=2), torch.Generator().manual_seed(3))
    assert len(seen) == 2 and seen[0] is seen[1]
    torch.testing.assert_close(logps.detach(), ref)  # identical weights, the same draw


@pytest.mark.parametrize("flow", [True, False])
def test_k_draws_are_the_mean_of_k_single_draws(flow):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else DDPMScheduler(num_train_timesteps=1000)
    policy_k = DiffusionPolicy(tiny_sd3(), scheduler, draws_per_pair=3)  # DDPM: the same network, integer t
    single = DiffusionPolicy(policy_k.network, scheduler)
    batch = pair_batch(b=2)
    samples = concatenate_pairs(batch)
    draw = policy_k.draw(samples, torch.Generator().manual_seed(4))
    n = 4
    assert draw.timesteps.shape == (3 * n,) and draw.noise.shape == (3 * n, 4, 8, 8) and draw.inputs.shape[0] == n
    lp = policy_k.log_likelihood(policy_k.network, samples, draw)
    singles = []
    for k in range(3):
        rows = slice(k * n, (k + 1) * n)
        t, eps = draw.timesteps[rows], draw.noise[rows]
        assert torch.equal(t[:2], t[2:]) and torch.equal(eps[:2], eps[2:])  # pairs share each draw
        singles.append(single.log_likelihood(single.network, samples, pair_draw(t[:2], eps[:2])))
    assert len({float(s[0].detach()) for s in singles}) == 3  # three different draws
    torch.testing.assert_close(lp, torch.stack(singles).mean(0), rtol=1e-5, atol=1e-6)
    # per-example seeds fix all K draws of an example
    seeded = {**batch, "seed": torch.tensor([1, 2])}
    a = policy_k.draw(concatenate_pairs(seeded), torch.Generator().manual_seed(0))
    b = policy_k.draw(concatenate_pairs(seeded), torch.Generator().manual_seed(9))
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)


def test_gradients_reach_only_the_policy():
    policy = DiffusionPolicy(tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 100.0}, reference="copy",
                              optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    optimizer = module.configure_optimizers()
    before = {k: v.clone() for k, v in policy.network.state_dict().items()}
    ref_before = {k: v.clone() for k, v in module.reference.network.state_dict().items()}
    logps, ref, _ = module.pair_logps(pair_batch(b=2), torch.Generator().manual_seed(0))
    loss = preference_loss("sigmoid", *split_pairs(logps), *split_pairs(ref), beta=100.0).losses.mean()
    loss.backward()
    assert not ref.requires_grad
    assert all(p.grad is None for p in module.reference.network.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.network.parameters())
    optimizer.step()
    assert any(not torch.equal(v, before[k]) for k, v in policy.network.state_dict().items())
    for k, v in module.reference.network.state_dict().items():
        assert torch.equal(v, ref_before[k]), k


# ----------------------------------------------------------------------------------------- sampling
class TinyVelocity(torch.nn.Module):
    """A user's own denoiser: ``network(x_t, t, class_labels=...)`` (the generic call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.embed = torch.nn.Embedding(3, 2)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        out = self.conv(x) * (1 + t)
        if class_labels is not None:
            out = out + self.embed(class_labels)[:, :, None, None]
        return out


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_generate_is_flow_matching_euler_by_hand(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    network = TinyVelocity()
    policy = DiffusionPolicy(network, scheduler)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    images = policy.generate(noise, {"class_labels": labels}, num_inference_steps=4, batch_size=2)
    again = policy.generate(noise, {"class_labels": labels}, num_inference_steps=4, batch_size=3)
    torch.testing.assert_close(images, again)  # deterministic given the noise, whatever the chunking
    # by hand (FlowMatchEulerDiscreteScheduler.set_timesteps and step): 4 sigmas evenly from the training
    # schedule's largest to its smallest sigma, shifted, then 0; x <- x + (sigma_next - sigma) * v(x, sigma * N)
    lin = torch.linspace(1.0, hand_sigma(N_TRAIN - 1, shift), 4, dtype=torch.float64)
    sigmas = (shift * lin / (1 + (shift - 1) * lin)).tolist() + [0.0]
    x = noise.clone()
    with torch.no_grad():
        for i in range(4):
            v = network(x, torch.full((3,), sigmas[i] * N_TRAIN), class_labels=labels)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # classifier-free guidance: uncond + g * (cond - uncond) each step
    guided = policy.generate(noise, {"class_labels": labels}, num_inference_steps=4, guidance_scale=2.0,
                             negative_conditioning={"class_labels": torch.zeros(3, dtype=torch.long)})
    x = noise.clone()
    with torch.no_grad():
        for i in range(4):
            t = torch.full((3,), sigmas[i] * N_TRAIN)
            v_c = network(x, t, class_labels=labels)
            v_u = network(x, t, class_labels=torch.zeros(3, dtype=torch.long))
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + 2.0 * (v_c - v_u))
    torch.testing.assert_close(guided, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_flow_options_raise_clear_errors():
    from diffusers import EulerDiscreteScheduler

    network = TinyVelocity()
    with pytest.raises(PrefoptError, match=r"EulerDiscreteScheduler.*FlowMatchEulerDiscreteScheduler"):
        DiffusionPolicy(network, EulerDiscreteScheduler())
    with pytest.raises(PrefoptError, match=r"object has no add_noise.*FlowMatchEulerDiscreteScheduler"):
        DiffusionPolicy(network, object())
    from diffusers import DPMSolverMultistepScheduler

    sana_style = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    with pytest.raises(PrefoptError, match="flow_prediction: train a flow-matching model with FlowMatchEuler"):
        DiffusionPolicy(network, sana_style)
    flow = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(PrefoptError, match="timestep_sampling='normal'.*logit_normal, mode, uniform"):
        DiffusionPolicy(network, flow, timestep_sampling="normal")
    with pytest.raises(PrefoptError, match="loss_weighting='sigma'.*none, sigma_sqrt, cosmap"):
        DiffusionPolicy(network, flow, loss_weighting="sigma")
    with pytest.raises(PrefoptError, match="prediction_type='epsilon'.*flow_prediction"):
        DiffusionPolicy(network, flow, prediction_type="epsilon")
    with pytest.raises(PrefoptError, match="sampler='ddim'.*euler"):
        DiffusionPolicy(network, flow, sampler="ddim")
    with pytest.raises(PrefoptError, match="draws_per_pair=0"):
        DiffusionPolicy(network, flow, draws_per_pair=0)
    with pytest.raises(PrefoptError, match="timestep_sampling='logit_normal' applies to flow-matching"):
        DiffusionPolicy(network, DDPMScheduler(), timestep_sampling="logit_normal")
    with pytest.raises(PrefoptError, match="loss_weighting='cosmap' applies to flow-matching"):
        DiffusionPolicy(network, DDPMScheduler(), loss_weighting="cosmap")


def test_a_draw_shared_by_groups_of_three_and_by_single_rows():
    """``draw(..., group=K)`` (ranking feedback): rows i, i + N/K, ... share a draw, and conditioning shared by
    a whole group is computed once per group."""
    policy = DiffusionPolicy(tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0), draws_per_pair=2)
    g = torch.Generator().manual_seed(0)
    shared = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
              "pooled_projections": torch.randn(2, 8, generator=g)}
    samples = {"latents": torch.randn(6, 4, 8, 8, generator=g), **{k: torch.cat([v] * 3) for k, v in shared.items()}}
    calls = []
    original = policy.conditioning
    policy.conditioning = lambda s: calls.append(next(iter(s.values())).shape[0]) or original(s)
    draw = policy.draw(samples, torch.Generator().manual_seed(1), group=3)
    assert calls == [2]  # once per group
    torch.testing.assert_close(draw.conditioning["pooled_projections"], samples["pooled_projections"])
    t = draw.timesteps.view(2, 3, 2)  # [draw, member, group]
    assert torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 1], t[:, 2]) and not torch.equal(t[:, :, 0], t[:, :, 1])
    assert policy.log_likelihood(policy.network, samples, draw).shape == (6,)
    single = policy.draw(samples, torch.Generator().manual_seed(1), group=1)
    assert single.timesteps.shape == (12,) and calls == [2, 6]  # per row
    assert len(set(single.timesteps[:6].tolist())) == 6

"""The embedded default: Diffusion-DPO on scikit-learn's handwritten digits, on a CPU in minutes.

1. **Data.** ``sklearn.datasets.load_digits`` (1,797 real 8x8 images, 10 classes, shipped with the
   package), scaled to ``[-1, 1]`` (optionally resized to ``image_size``). A fixed permutation splits them
   into three disjoint parts: ``base`` (about two thirds: trains the base model), ``reward`` and ``judge``
   (the rest, half each: train the two digit classifiers).
2. **Base model.** A small class-conditional ``UNet2DModel`` (``num_class_embeds=10``) trained as a DDPM
   on the ``base`` split. Built once and cached by its config (:func:`prefopt.cache.cached_tensors`), so
   reruns and sweeps that share it never retrain it.
3. **Candidates.** For every class, ``pairs_per_class`` pairs of samples from the base model (DDIM),
   cached by the base config, the sampling settings and the seed.
4. **Labels.** A B-Pref :class:`~prefopt.data.teachers.ScriptedTeacher` compares the two images of a pair
   by the training ``reward`` (:mod:`prefopt.tasks.diffusion.rewards`).
5. **Evaluation.** The reference (the base model) and the trained policy sample ``eval_per_class`` images
   per class from the *same* initial noise. Scores: the mean held-out reward of each, the win rate (the
   policy's image beats the reference's image of the same noise and class under the held-out reward; ties
   count one half), the training reward of each, and a realism guard: the accuracy of the ``judge``
   classifier (trained on real digits the base model never saw) on the intended class. A PNG grid shows
   reference (left) and policy (right) samples of the same noise side by side, each panel titled with its
   mean held-out reward.

:mod:`prefopt.tasks.diffusion.flow_digits` runs the same task on a flow-matching transformer: a subclass
changes the base model through :meth:`DigitsDiffusionTask.build_network`, :meth:`~DigitsDiffusionTask.
build_scheduler`, :meth:`~DigitsDiffusionTask.make_policy` and :meth:`~DigitsDiffusionTask.train_base`.

Rewards and their held-out judges: ``ink`` -> ``thickness``, ``legibility`` (``reward`` classifier, a
small CNN) -> ``legibility`` under the ``judge`` classifier (an MLP trained on other digits),
``compressibility`` (PNG) -> ``jpeg_compressibility``. ``eval_reward`` overrides the pairing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.adapters.diffusion import DiffusionPolicy
from prefopt.cache import cached_tensors
from prefopt.data.pairs import TensorPairs
from prefopt.feedback.data import Groups
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.errors import PrefoptError, check_choice
from prefopt.metrics import mean_and_se, win_rate
from prefopt.tasks.base import Task
from prefopt.tasks.diffusion.grid import panel_titles, save_side_by_side
from prefopt.tasks.diffusion.rewards import HELD_OUT, PIXEL_REWARDS, REWARDS, Legibility

log = logging.getLogger(__name__)

DRAW_MODES = ("auto", "step", "example")
NUM_CLASSES = 10

#: the base model's defaults (every key is part of its cache key)
BASE_DEFAULTS: dict[str, Any] = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "steps": 1000,
    "batch_size": 128,
    "lr": 2.0e-3,
    "ema_decay": 0.995,
    "seed": 0,
}
_UNET_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
              "attention_head_dim", "norm_num_groups")
_SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type")


# ------------------------------------------------------------------------------------------ data
def digit_images(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ``[N, 1, S, S]`` in ``[-1, 1]`` and their labels ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.tensor(digits.target, dtype=torch.int64)


def digit_splits(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Disjoint ``base`` / ``reward`` / ``judge`` index sets (2/3, 1/6, 1/6) from a fixed permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = (2 * n) // 3, (2 * n) // 3 + (n - (2 * n) // 3) // 2
    return {"base": perm[:a], "reward": perm[a:b], "judge": perm[b:]}


# ----------------------------------------------------------------------------------- classifiers
class DigitClassifier(nn.Module):
    """A small digit classifier on ``[N, 1, S, S]`` images: ``cnn`` (the reward) or ``mlp`` (the judge)."""

    def __init__(self, kind: str = "cnn", image_size: int = 8):
        super().__init__()
        check_choice("classifier kind", kind, ("cnn", "mlp"))
        if kind == "cnn":
            self.body = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.SiLU(),
                nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * ((image_size + 1) // 2) ** 2, NUM_CLASSES))
        else:
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 128), nn.SiLU(),
                                      nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, kind: str, image_size: int, seed: int,
                     epochs: int = 300) -> DigitClassifier:
    """Full-batch AdamW with light shift augmentation (one pixel), deterministic given ``seed``."""
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        model = DigitClassifier(kind, image_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(epochs):
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(shifted), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


# ---------------------------------------------------------------------------------- base model
def build_unet(config: Mapping[str, Any], image_size: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=image_size, in_channels=1, out_channels=1, num_class_embeds=NUM_CLASSES,
                       **{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                          for k, v in config.items() if k in _UNET_KEYS})


def build_scheduler(config: Mapping[str, Any]):
    from diffusers import DDPMScheduler

    return DDPMScheduler(clip_sample=True, **{k: config[k] for k in _SCHEDULER_KEYS})


def fit_denoiser(network: nn.Module, loss_fn, config: Mapping[str, Any], images: torch.Tensor,
                 labels: torch.Tensor, desc: str) -> dict[str, torch.Tensor]:
    """Train ``network`` on random minibatches of ``(images, labels)``; returns the EMA weights.

    ``loss_fn(x0, labels, generator)`` is the denoising loss of a batch (it draws its timesteps and noise
    from ``generator``). AdamW with a one-cycle schedule, gradient clipping at 1 and an EMA of the weights,
    for ``config["steps"]`` steps of ``config["batch_size"]`` images; deterministic given ``config["seed"]``.
    """
    from tqdm.auto import tqdm

    ema = {k: v.detach().clone() for k, v in network.state_dict().items()}
    steps, batch = int(config["steps"]), int(config["batch_size"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(config["lr"]), weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, float(config["lr"]), total_steps=steps,
                                                      pct_start=0.05)
    generator = torch.Generator().manual_seed(int(config["seed"]))
    decay = float(config["ema_decay"])
    network.train()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        loss = loss_fn(images[idx], labels[idx], generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            for k, v in network.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1.0 - decay)
                else:
                    ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema


def train_base(config: Mapping[str, Any], images: torch.Tensor, labels: torch.Tensor,
               image_size: int) -> dict[str, torch.Tensor]:
    """DDPM training of the class-conditional UNet; returns the EMA weights as a state dict."""
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(int(config["seed"]))
        unet = build_unet(config, image_size)
        scheduler = build_scheduler(config)
        policy = DiffusionPolicy(unet, scheduler)

        def ddpm_loss(x0, c, generator):
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, policy.num_train_timesteps, (x0.shape[0],), generator=generator)
            prediction = unet(scheduler.add_noise(x0, noise, t), t, class_labels=c).sample
            return F.mse_loss(prediction, policy.target(x0, noise, t))

        return fit_denoiser(unet, ddpm_loss, config, images, labels, "diffusion digits: base DDPM")


# ---------------------------------------------------------------------------------------- task
class DigitsDiffusionTask(Task):
    """Diffusion-DPO on the scikit-learn digits (see the module docstring).

    Args:
        image_size: side of the images (8 = the native resolution; larger sizes are bilinear resizes).
        base: overrides of :data:`BASE_DEFAULTS` (UNet, noise schedule, DDPM training).
        reward: the training reward, one of ``ink, thickness, compressibility, jpeg_compressibility,
            legibility``.
        eval_reward: the held-out reward of the evaluation; ``None`` = the held-out judge of ``reward``.
        pairs_per_class: candidate pairs sampled from the base model per class.
        sample_steps: DDIM steps for candidates and evaluation samples.
        eval_per_class: evaluation samples per class (reference and policy each).
        grid_per_class: samples per class in the PNG grid.
        teacher: options of the :class:`~prefopt.data.teachers.ScriptedTeacher` (``kind``, ``eps``...).
        draw: ``step`` (a fresh timestep and noise for every training step), ``example`` (a per-example
            ``seed`` fixes each example's draw; needed by ``reference=precomputed``) or ``auto``
            (``example`` exactly when the reference strategy ``needs_fixed_draw``, see :meth:`use_reference`).
        likelihood_scale: see :mod:`prefopt.adapters.diffusion` (1 = the diffusers script's beta).
        draws_per_pair: ``(t, noise)`` draws averaged per pair in the surrogate (the adapter's ``K``).
    """

    name = "diffusion_digits"
    #: the base model's defaults and the cache kind of its weights (a subclass with another model sets both)
    base_defaults: Mapping[str, Any] = BASE_DEFAULTS
    base_kind = "diffusion_digits_base"

    def __init__(self, image_size: int = 8, base: Mapping[str, Any] | None = None, reward: str = "ink",
                 eval_reward: str | None = None, pairs_per_class: int = 100, sample_steps: int = 25,
                 eval_per_class: int = 50, grid_per_class: int = 8, batch_size: int = 64, rounds: int = 1,
                 teacher: Mapping[str, Any] | None = None, draw: str = "auto",
                 likelihood_scale: float = 1.0, draws_per_pair: int = 1, seed: int = 0,
                 cache_dir: str | None = None):
        check_choice("domain.task.reward", reward, REWARDS)
        eval_reward = eval_reward or HELD_OUT[reward]
        check_choice("domain.task.eval_reward", eval_reward, REWARDS)
        check_choice("domain.task.draw", draw, DRAW_MODES)
        unknown = sorted(set(base or {}) - set(self.base_defaults))
        if unknown:
            raise PrefoptError(f"domain.task.base has unknown keys {unknown}; allowed: {', '.join(self.base_defaults)}")
        for name, value in (("image_size", image_size), ("pairs_per_class", pairs_per_class),
                            ("sample_steps", sample_steps), ("eval_per_class", eval_per_class),
                            ("batch_size", batch_size), ("rounds", rounds), ("draws_per_pair", draws_per_pair)):
            if int(value) < 1:
                raise PrefoptError(f"domain.task.{name}={value!r} must be an integer >= 1")
        self.image_size, self.reward_name, self.eval_reward_name = int(image_size), reward, eval_reward
        self.base_config = {**self.base_defaults, **dict(base or {})}
        self.base_config = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.base_config.items()}
        self.pairs_per_class, self.sample_steps = int(pairs_per_class), int(sample_steps)
        self.eval_per_class, self.grid_per_class = int(eval_per_class), int(grid_per_class)
        self.batch_size, self.rounds, self.seed = int(batch_size), int(rounds), int(seed)
        self.teacher = ScriptedTeacher(**dict(teacher or {}), seed=self.seed)
        self.draw, self.fixed_draw = draw, draw == "example"
        self.likelihood_scale, self.draws_per_pair = float(likelihood_scale), int(draws_per_pair)
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prefopt"
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._classifiers: dict[str, DigitClassifier] = {}

    # ----------------------------------------------------------------------------- artefacts
    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            self._data = digit_images(self.image_size)
        return self._data

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data
        idx = digit_splits(images.shape[0])[name]
        return images[idx], labels[idx]

    def classifier(self, role: str) -> DigitClassifier:
        """The ``reward`` (CNN) or ``judge`` (MLP) classifier, trained on its own split and cached."""
        if role not in self._classifiers:
            kind = "cnn" if role == "reward" else "mlp"
            config = {"role": role, "kind": kind, "image_size": self.image_size, "split_seed": 0, "epochs": 300,
                      "version": 1}

            def build():
                return train_classifier(*self._split(role), kind, self.image_size, seed=1 + (role == "judge"),
                                        epochs=300).state_dict()

            model = DigitClassifier(kind, self.image_size)
            model.load_state_dict(cached_tensors(self.cache_dir, "diffusion_digits_classifier", config, build))
            self._classifiers[role] = model.eval().requires_grad_(False)
        return self._classifiers[role]

    def train_reward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reward_name == "legibility":
            return Legibility(self.classifier("reward"))(images, labels)
        return PIXEL_REWARDS[self.reward_name](images, labels)

    def eval_reward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.eval_reward_name == "legibility":
            return Legibility(self.classifier("judge"))(images, labels)
        return PIXEL_REWARDS[self.eval_reward_name](images, labels)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: 1 where the judge classifier reads the intended class (the realism guard)."""
        return (self.classifier("judge")(images.float()).argmax(-1) == labels).float()

    def base_key(self) -> dict[str, Any]:
        return {**self.base_config, "image_size": self.image_size, "data": "sklearn_digits", "split_seed": 0,
                "version": 1}

    # ---------------------------------------------------------------------------- base model
    def build_network(self) -> nn.Module:
        """The untrained denoiser of :attr:`base_config`."""
        return build_unet(self.base_config, self.image_size)

    def build_scheduler(self):
        """The noise scheduler of :attr:`base_config` (training and sampling)."""
        return build_scheduler(self.base_config)

    def make_policy(self, network: nn.Module) -> DiffusionPolicy:
        """The adapter around ``network`` with this task's likelihood options."""
        return DiffusionPolicy(network, self.build_scheduler(), likelihood_scale=self.likelihood_scale,
                               draws_per_pair=self.draws_per_pair)

    def train_base(self) -> dict[str, torch.Tensor]:
        """The base model's weights, trained from scratch on the ``base`` split (called on a cache miss)."""
        return train_base(self.base_config, *self._split("base"), self.image_size)

    def build_policy(self) -> DiffusionPolicy:
        started = time.perf_counter()
        state = cached_tensors(self.cache_dir, self.base_kind, self.base_key(), self.train_base)
        log.info("%s: base model ready (%.1fs)", self.name, time.perf_counter() - started)
        network = self.build_network()
        network.load_state_dict(state)
        return self.make_policy(network)

    def _noise(self, n: int, stream: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return torch.randn((n, 1, self.image_size, self.image_size), generator=generator)

    def candidates(self, policy: DiffusionPolicy, round_index: int) -> dict[str, torch.Tensor]:
        """Two base-model samples per pair, ``pairs_per_class`` pairs per class (cached for round 0)."""
        n = self.pairs_per_class * NUM_CLASSES
        labels = torch.arange(NUM_CLASSES).repeat_interleave(self.pairs_per_class)

        def build():
            noise = self._noise(2 * n, stream=1 + round_index)
            images = policy.generate(noise, {"class_labels": labels.repeat(2)}, num_inference_steps=self.sample_steps,
                                     seed=self.seed * 1_000_003 + 1 + round_index, progress=True)
            return {"first": images[:n], "second": images[n:], "labels": labels}

        if round_index > 0:  # later rounds sample from the current policy: nothing to reuse
            return build()
        config = {"base": self.base_key(), "pairs_per_class": self.pairs_per_class, "steps": self.sample_steps,
                  "sampler": policy.sampler, "seed": self.seed, "version": 1}
        return cached_tensors(self.cache_dir, "diffusion_digits_candidates", config, build)

    def use_reference(self, reference) -> None:
        self.fixed_draw = self.draw == "example" or (self.draw == "auto" and reference.needs_fixed_draw)

    def pairs(self, policy: DiffusionPolicy, round_index: int) -> TensorPairs:
        cand = self.candidates(policy, round_index)
        first, second, labels = cand["first"], cand["second"], cand["labels"]
        teacher_labels = self.teacher.label(self.train_reward(first, labels), self.train_reward(second, labels))
        ordered = to_pairs({"images": first}, {"images": second}, teacher_labels)
        shared = {"class_labels": labels}
        if self.fixed_draw:
            seed_base = (self.seed * 1_000_003 + 7 * round_index) * 100_000
            shared["seed"] = seed_base + torch.arange(labels.shape[0], dtype=torch.int64)
        return TensorPairs.from_ordered(ordered, shared=shared)

    def groups(self, policy: DiffusionPolicy, round_index: int, size: int) -> Groups:
        """``size`` samples per class label and group, ``2 * pairs_per_class`` samples per class in all
        (binary, ranking and score feedback, :mod:`prefopt.feedback`); ``size=2`` gives the pairs' images."""
        per_class = max(1, 2 * self.pairs_per_class // size)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        n = labels.shape[0]
        images = policy.generate(self._noise(size * n, stream=1 + round_index), {"class_labels": labels.repeat(size)},
                                 num_inference_steps=self.sample_steps, seed=self.seed * 1_000_003 + 1 + round_index,
                                 progress=True)
        images = images.reshape(size, n, *images.shape[1:]).transpose(0, 1)  # [G, K, C, H, W]
        rewards = self.train_reward(images.flatten(0, 1), labels.repeat_interleave(size)).reshape(n, size)
        shared = {"class_labels": labels}
        if self.fixed_draw:
            shared["seed"] = (self.seed * 1_000_003 + 7 * round_index) * 100_000 + torch.arange(n, dtype=torch.int64)
        return Groups({"images": images}, shared, rewards)

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, reference: DiffusionPolicy, policy: DiffusionPolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        n = self.eval_per_class * NUM_CLASSES
        labels = torch.arange(NUM_CLASSES).repeat_interleave(self.eval_per_class)
        noise = self._noise(n, stream=1_000_000)  # the same noise and classes for both models
        cond = {"class_labels": labels}
        steps = self.sample_steps
        ref_images = reference.generate(noise, cond, num_inference_steps=steps, seed=self.seed, progress=True)
        pol_images = policy.generate(noise, cond, num_inference_steps=steps, seed=self.seed, progress=True)
        ref_eval, pol_eval = self.eval_reward(ref_images, labels), self.eval_reward(pol_images, labels)
        ref_train, pol_train = self.train_reward(ref_images, labels), self.train_reward(pol_images, labels)
        ref_acc, pol_acc = self.accuracy(ref_images, labels), self.accuracy(pol_images, labels)

        def scores(eval_r, train_r, acc):
            (m, se), (tm, tse), (am, ase) = mean_and_se(eval_r), mean_and_se(train_r), mean_and_se(acc)
            return {"reward_mean": m, "reward_se": se, "train_reward_mean": tm, "train_reward_se": tse,
                    "accuracy": am, "accuracy_se": ase}

        grid_path = output_dir / f"samples_round{round_index}.png"
        wins = win_rate(pol_eval, ref_eval)["win_rate"]
        titles = panel_titles(self.eval_reward_name, float(ref_eval.mean()), float(pol_eval.mean()), wins)
        save_side_by_side(ref_images, pol_images, labels, self.grid_per_class, grid_path, titles=titles)
        result = {
            "reward": self.reward_name,
            "eval_reward": self.eval_reward_name,
            "reference": scores(ref_eval, ref_train, ref_acc),
            "policy": scores(pol_eval, pol_train, pol_acc),
            "win_rate": wins,
            "realism_gap": float(pol_acc.mean() - ref_acc.mean()),
            "num_eval": n,
            "grid": grid_path.name,
        }
        return result

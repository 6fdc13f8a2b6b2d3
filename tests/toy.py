"""A tiny stochastic policy and pair data for module-level tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from prefopt.data.pairs import TensorPairs
from prefopt.policy import PreferencePolicy
from prefopt.tasks.base import EpochShuffleSampler


class NoisyRegression(PreferencePolicy):
    """log p(y | x) = -||net(x + 0.1 * noise) - y||^2, with the noise a shared per-pair draw."""

    stochastic = True
    lora_targets = ("0", "2")

    def draw(self, samples, generator=None):
        half = samples["x"].shape[0] // 2
        if "seed" in samples:
            noise = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(int(s)))
                                 for s in samples["seed"][:half]])
        else:
            noise = torch.randn(half, 3, generator=generator)
        return torch.cat([noise, noise])

    def log_likelihood(self, network, samples, draw=None):
        noise = draw if draw is not None else torch.zeros_like(samples["x"])
        return -((network(samples["x"] + 0.1 * noise) - samples["y"]) ** 2).sum(-1)


def make_policy(seed: int = 0) -> NoisyRegression:
    torch.manual_seed(seed)
    return NoisyRegression(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)))


def make_pairs(n: int = 64, seed: int = 0, with_seed: bool = True) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    target = torch.stack([x.sum(-1), x[:, 0] - x[:, 1]], -1)
    chosen = target + 0.1 * torch.randn(n, 2, generator=g)
    rejected = target + torch.randn(n, 2, generator=g)
    shared = {"x": x}
    if with_seed:
        shared["seed"] = torch.arange(n) + 1000 * seed
    return TensorPairs({"y": chosen}, {"y": rejected}, shared)


def loader(pairs, batch_size: int = 16, seed: int = 0):
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, sampler=EpochShuffleSampler(len(pairs), seed))


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs:  # a skipped batch (training_step returned None) has no loss
            self.losses.append(float(outputs["loss"]))


def trainer(max_epochs: int = 2, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    options.update(kwargs)
    return L.Trainer(**options)

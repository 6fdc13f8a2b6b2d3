"""What a domain provides to the training loop in :mod:`prefopt.train`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prefopt.data.pairs import collate_pairs
from prefopt.policy import PreferencePolicy
from prefopt.reference import ReferenceStrategy


class EpochShuffleSampler(DistributedSampler):
    """A shuffle whose order depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint sees
    the same order in its remaining epochs as an uninterrupted run.

    Under ``torch.distributed`` (``trainer=ddp``/``fsdp``) rank ``r`` of ``W`` takes positions ``r, r + W, ...``
    of that order (padded with its first positions, as ``DistributedSampler`` does, so every rank gets as many
    examples): ``W`` ranks with batch ``B`` step through the same examples as one process with batch ``W * B``.
    It is a ``DistributedSampler`` only so that Lightning keeps it instead of wrapping it in a sampler that
    reshuffles; the rank and world size are read when iterating, after the process group exists.
    """

    def __init__(self, size: int, seed: int = 0):  # DistributedSampler.__init__ would need the process group
        self.size, self.seed, self.epoch = size, seed, 0

    @property
    def num_replicas(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        world = self.num_replicas
        if world == 1:
            return iter(order)
        total = len(self) * world
        order = (order * (total // max(self.size, 1) + 1))[:total]  # pad: repeat the start of the order
        return iter(order[self.rank:total:world])

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)


class Task(ABC):
    """A domain. The loop is: ``build_policy`` once, then per round ``pairs`` -> train -> ``evaluate``.

    ``rounds > 1`` is iterative (online) DPO: each round collects fresh pairs with the current policy,
    and that round's reference is the policy as the round starts. ``evaluate`` always compares against
    the policy as it was before any training (``reference``).

    Optional, looked up by name: ``groups(policy, round_index, size) -> prefopt.feedback.data.Groups`` gives
    ``size`` candidates per group with their true rewards, which ``feedback=binary|ranking|scores`` turn into
    labels, rankings or scores (see ``prefopt.feedback.train``); without it a task supports pairs only.
    """

    name = "task"
    rounds: int = 1
    batch_size: int = 16
    seed: int = 0

    @abstractmethod
    def build_policy(self) -> PreferencePolicy:
        """The base policy (pretrained, loaded, or fresh) that training starts from."""

    @abstractmethod
    def pairs(self, policy: PreferencePolicy, round_index: int) -> Dataset:
        """The preference pairs of a round, as a dataset of pair-batch rows (see :mod:`prefopt.policy`)."""

    def use_reference(self, reference: ReferenceStrategy) -> None:
        """Called once, before :meth:`build_policy`, with the run's reference strategy, so the task can
        provide what the strategy needs (ask its flags, e.g. ``reference.needs_fixed_draw``; never its name)."""

    def val_pairs(self) -> Dataset | None:
        """Held-out pairs scored by the validation loop, or ``None``."""
        return None

    @abstractmethod
    def evaluate(self, reference: PreferencePolicy, policy: PreferencePolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        """Held-out scores of the reference and the policy.

        A task that generates (samples, rollouts) includes ``win_rate``: how often the policy's generation
        beats the reference's on the same prompt, seed or episode (:func:`prefopt.metrics.win_rate`). A task
        that only has labelled pairs reports ``implicit_reward_accuracy`` instead
        (:func:`prefopt.metrics.implicit_reward_accuracy`)."""

    def resumed_round(self, round_index: int, result: dict[str, Any]) -> None:
        """A round evaluated before the run was killed: a resumed run reuses its ``result`` (what ``evaluate``
        returned) instead of calling ``evaluate`` again. A task that keeps a per-round history (for a plot) adds
        it here; the default does nothing."""

    def dataloader(self, dataset: Dataset, train: bool = True) -> DataLoader:
        sampler = EpochShuffleSampler(len(dataset), self.seed) if train else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                          collate_fn=collate_pairs)

"""The one interface prefopt needs from a model: a (surrogate) log-likelihood per sample.

A *pair batch* is a dict. Keys that start with ``chosen_`` and ``rejected_`` hold the two samples of
each pair (same shapes, ``B`` pairs on dim 0); every other tensor key (conditioning, ``seed``,
``index``, ``tie``) is shared by both samples of a pair. :meth:`PreferencePolicy.concatenate` turns a
pair batch into one batch of ``2B`` samples, chosen first, so one forward scores both.

Subclasses implement :meth:`log_likelihood` and, if the likelihood is a stochastic surrogate (as in
diffusion), :meth:`draw`. Nothing here knows about Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch
from torch import nn

CHOSEN, REJECTED = "chosen_", "rejected_"


def concatenate_pairs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Chosen then rejected along dim 0; shared tensors are repeated so row ``i`` and ``i + B`` match."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key.startswith(CHOSEN):
            name = key[len(CHOSEN):]
            other = batch.get(REJECTED + name)
            if other is None:
                raise KeyError(f"pair batch has {key!r} but no {REJECTED + name!r}")
            out[name] = torch.cat([value, other], dim=0)
        elif key.startswith(REJECTED):
            continue
        elif torch.is_tensor(value):
            out[key] = torch.cat([value, value], dim=0)
        else:
            out[key] = value
    return out


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`concatenate_pairs` for a per-sample tensor: (chosen, rejected)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PreferencePolicy(nn.Module, ABC):
    """A model family's policy with a log-likelihood.

    ``self.network`` is the trainable module; the reference strategies copy it, wrap it in LoRA, or
    score with it before training. :meth:`log_likelihood` takes the network explicitly so the same code
    computes the policy's and the reference's numbers.

    What a subclass may change:
      * :meth:`log_likelihood` (required): per-sample log-likelihood, shape ``[N]``.
      * :meth:`draw`: randomness of a stochastic surrogate, drawn once per batch and shared by the
        policy and the reference and by both samples of a pair. Set ``stochastic = True`` too.
      * :meth:`lengths`: per-sample lengths for length-normalized losses (sequence-like models).
      * ``lora_targets``: module names that ``reference=adapter`` wraps in LoRA by default.
      * ``fsdp_unit``: whether ``trainer=fsdp`` makes ``network`` an FSDP unit of its own. FSDP finds the
        tensors a unit's forward returns to hook its backward, so a network whose forward returns something
        else (a ``torch.distributions.Distribution``) must set it to ``False``: it then stays in the root
        unit, whose output (the loss) FSDP does see.
    """

    stochastic: bool = False
    lora_targets: tuple[str, ...] = ()
    fsdp_unit: bool = True

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def concatenate(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Pair batch of ``B`` pairs -> sample batch of ``2B`` samples (chosen first)."""
        return concatenate_pairs(batch)

    def draw(self, samples: Mapping[str, Any], generator: torch.Generator | None = None) -> Any:
        """Randomness for ``samples`` (``2B`` rows, pairs at ``i`` and ``i + B`` sharing one draw).

        Deterministic likelihoods return ``None``. Where ``samples`` carries an integer ``seed`` per
        example, a stochastic policy must derive that example's draw from it alone, so the draw is the
        same every epoch (``reference=precomputed`` relies on this).
        """
        return None

    @abstractmethod
    def log_likelihood(self, network: nn.Module, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        """Per-sample (surrogate) log-likelihood, shape ``[N]``, of ``samples`` under ``network``."""

    def lengths(self, samples: Mapping[str, Any]) -> torch.Tensor | None:
        """Per-sample lengths ``[N]`` for length-normalized losses, or ``None``."""
        return None

    def forward(self, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        return self.log_likelihood(self.network, samples, draw)

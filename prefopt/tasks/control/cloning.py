"""Behaviour cloning of the base policy (``base.kind=bc``) from a behaviour's rollouts."""

from __future__ import annotations

from typing import Mapping

import torch
from tqdm.auto import tqdm


def clone_behaviour(network: torch.nn.Module, data: Mapping[str, torch.Tensor], epochs: int, lr: float, batch_size: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """Behaviour cloning: regress the network's mean action onto the behaviour's actions (cross-entropy for
    discrete actions) with Adam; ``log_std`` is left as set. Returns the trained state dict."""
    mask = data["mask"]
    obs, actions = data["obs"][mask], data["actions"][mask]
    discrete = actions.dtype == torch.int64
    generator = torch.Generator().manual_seed(int(seed))
    params = [p for name, p in network.named_parameters() if name != "log_std"]
    optimizer = torch.optim.Adam(params, lr=float(lr))
    size, batch = obs.shape[0], int(batch_size)
    bar = tqdm(range(int(epochs)), desc="behaviour cloning", leave=False, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, batch):
            idx = order[start:start + batch]
            dist = network(obs[idx])
            if discrete:
                loss = -dist.log_prob(actions[idx]).mean()
            else:
                loss = ((dist.mean - actions[idx]) ** 2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.set_postfix(loss=loss.item())
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


__all__ = ["clone_behaviour"]

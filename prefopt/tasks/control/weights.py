"""Loading a policy network's weights from a file (``base.kind=checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import torch

from prefopt.errors import PrefoptError


def load_network_weights(network: torch.nn.Module, path) -> None:
    """Load a ``.safetensors`` state dict (e.g. a run's ``policy.safetensors``), or a ``.ckpt``/``.pt`` (a
    prefopt Lightning checkpoint or a plain state dict, read with ``weights_only=True``) into ``network``."""
    if not path:
        raise PrefoptError("base.kind=checkpoint needs base.path (a .safetensors, .ckpt or .pt file)")
    path = Path(path)
    if not path.is_file():
        raise PrefoptError(f"base.path={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise PrefoptError(f"base.path={str(path)!r}: cannot be read with torch.load(weights_only=True): "
                               f"{err}") from None
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint of a prefopt run
            prefix = "policy.network."
            state = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not isinstance(state, dict) or not state:
        raise PrefoptError(f"base.path={str(path)!r}: holds no network weights")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise PrefoptError(f"base.path={str(path)!r} does not fit the policy network for this env "
                           f"(hidden sizes and spaces must match): {err}") from None


__all__ = ["load_network_weights"]

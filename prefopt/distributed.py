"""Scale-out helpers on Lightning's own engines (``trainer=ddp``, ``trainer=fsdp``); nothing home-made.

FSDP flattens the parameters of each wrapped unit into one tensor and (without ``use_orig_params``) needs
every parameter of a unit to agree on ``requires_grad``. A preference module holds a trainable policy
network next to a frozen reference network, so wrapping the module as one unit would mix the two.
:class:`PreferenceFSDPStrategy` wraps each network as its own FSDP unit: the policy's unit is all trainable,
the reference's unit (``reference=copy`` or ``sync``) is all frozen and is sharded separately, and the
root unit keeps whatever is left (nothing, for the sequence and diffusion adapters). A policy whose network
returns something other than tensors (the control adapter's ``Distribution``) sets ``fsdp_unit = False``:
its networks stay in the root unit, trainable and frozen parameters mixed, which ``use_orig_params=True``
accepts. Both networks have the same structure, so their shards line up parameter by parameter on every
rank, which is what ``reference=sync``'s in-place ``ref <- a * policy + (1 - a) * ref`` needs.

``reference=adapter`` keeps frozen base weights and trainable LoRA weights in one network: that unit is mixed,
which FSDP accepts with ``use_orig_params=True`` (Lightning's default, kept here).
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def preference_networks(model: nn.Module) -> list[nn.Module]:
    """The modules to wrap as separate FSDP units: ``policy.network`` and the reference's ``network``, if any
    (none when the policy says ``fsdp_unit = False``)."""
    networks = []
    policy = getattr(model, "policy", None)
    if not getattr(policy, "fsdp_unit", True):
        return networks
    if isinstance(getattr(policy, "network", None), nn.Module):
        networks.append(policy.network)
    reference = getattr(model, "reference", None)
    if isinstance(getattr(reference, "network", None), nn.Module):
        networks.append(reference.network)
    return networks


def preference_wrap_policy(model: nn.Module):
    """An FSDP ``auto_wrap_policy`` that makes each of :func:`preference_networks` an FSDP unit of its own."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    targets = preference_networks(model)
    return CustomPolicy(lambda module: any(module is target for target in targets))


class PreferenceFSDPStrategy(FSDPStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` with a default wrap policy that puts the
    policy network and the frozen reference network in separate FSDP units (see the module docstring).

    Every argument is passed to ``FSDPStrategy``; an explicit ``auto_wrap_policy`` replaces the default one.
    FSDP needs GPUs (torch's FSDP refuses CPU-only runs); use ``trainer=ddp`` on CPU.
    """

    strategy_name = "prefopt_fsdp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._default_wrap = "auto_wrap_policy" not in self.kwargs

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self._default_wrap:
            self.kwargs["auto_wrap_policy"] = preference_wrap_policy(model)
        return super()._setup_model(model)


def clip_fsdp_gradients(strategy, gradient_clip_val, gradient_clip_algorithm) -> bool:
    """Clip by norm through FSDP's own ``clip_grad_norm_`` (Lightning's FSDP precision plugin refuses
    ``gradient_clip_algorithm="norm"``). Returns whether it clipped: ``False`` when not under FSDP."""
    if not isinstance(strategy, FSDPStrategy) or not gradient_clip_val:
        return False
    if gradient_clip_algorithm not in (None, "norm"):
        return False  # "value" clipping works under FSDP through Lightning's own path
    strategy.model.clip_grad_norm_(gradient_clip_val)
    return True


def is_fsdp(trainer) -> bool:
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def load_policy_state(template: nn.Module, state: dict) -> nn.Module:
    """Load the ``policy.*`` entries of a module's full state dict into ``template`` (a plain policy)."""
    prefix = "policy."
    policy_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    template.load_state_dict(policy_state, strict=True)
    return template


def unwrapped_policy(trainer, template: nn.Module) -> nn.Module:
    """After ``fit`` under FSDP the module's networks are sharded FSDP units on the GPUs (in low precision
    with a mixed-precision policy): gather the full-precision weights on every rank, on the CPU, into
    ``template``, a plain copy of the policy taken before ``fit``, for evaluation, export and the next round."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
        state = root.state_dict()
    return load_policy_state(template, state)

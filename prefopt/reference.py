"""Where the reference log-likelihoods come from.

Each strategy is an ``nn.Module`` so that whatever it holds (a frozen copy, a cache) is part of the
Lightning module's state dict: a resumed run gets its reference back from the checkpoint instead of
taking the trained policy as its reference.

==============  =========================================================================
``copy``        frozen deep copy of the policy network (eval mode, no grad, not optimized)
``adapter``     peft LoRA on the policy; the reference is the same network, adapters disabled
``precomputed`` reference log-likelihoods computed once before training, read from a cache
``none``        no reference (reference-free losses only)
``sync``        TR-DPO: a copy updated every ``sync_every`` steps, ref <- a * policy + (1 - a) * ref
==============  =========================================================================
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from prefopt.errors import PrefoptError
from prefopt.policy import PreferencePolicy, split_pairs

REFERENCE_TYPES = ("copy", "adapter", "precomputed", "none", "sync")

#: per peft-wrapped network: its adapter layers (peft's BaseTunerLayer and AuxiliaryTrainingWrapper modules)
_ADAPTER_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list[nn.Module]]" = weakref.WeakKeyDictionary()


def _adapter_layers(network: nn.Module) -> list[nn.Module]:
    layers = _ADAPTER_LAYERS.get(network)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        layers = _ADAPTER_LAYERS[network] = [m for m in network.modules() if isinstance(m, kinds)]
    return layers


@contextmanager
def adapters_disabled(network: nn.Module):
    """``network.disable_adapter()`` of a peft model with LoRA-type adapters, at a fraction of its cost.

    peft's context scans the whole model for its adapter status on every entry (``get_model_status``) and
    walks every module twice to switch the layers; at the reference's one call per step that is several
    milliseconds, more than a small denoiser's forward. This switches the same layers (``enable_adapters``
    on each, as ``disable_adapter_layers``/``enable_adapter_layers`` do), found once per network. Prompt-type
    adapters, a bias in the LoRA config, or layers already disabled go through peft's own context.
    """
    config = network.peft_config[network.active_adapter]
    layers = _adapter_layers(network)
    if (config.is_prompt_learning or getattr(config, "is_adaption_prompt", False)
            or getattr(config, "bias", "none") != "none" or network._adapters_disabled
            or any(getattr(layer, "disable_adapters", False) for layer in layers)):
        with network.disable_adapter():
            yield network
        return
    for layer in layers:
        layer.enable_adapters(False)
    network._adapters_disabled = True
    try:
        yield network
    finally:
        network._adapters_disabled = False
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def eval_mode(module: nn.Module):
    """Temporarily put ``module`` and its submodules in eval mode (no dropout); each gets its mode back after.

    Where no submodule overrides ``nn.Module.train``, the ``training`` flags are set directly (what ``train``
    does, without its recursion through ``__setattr__``: a quarter of the cost on a diffusers UNet, where the
    reference pays it every step). Otherwise (e.g. a Hugging Face model, whose ``train`` also manages its
    kernels) ``module.eval()``, then ``module.train(mode)`` with the mode ``module`` had.
    """
    modules = list(module.modules())
    if any(type(m).train is not nn.Module.train for m in modules):
        was_training = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)
        return
    flags = [m.training for m in modules]
    for m in modules:
        m.__dict__["training"] = False
    try:
        yield module
    finally:
        for m, flag in zip(modules, flags):
            m.__dict__["training"] = flag


class ReferenceStrategy(nn.Module):
    """Base class. ``logps`` returns reference log-likelihoods ``[2B]`` (or ``None``) for ``samples``.

    A strategy says what it needs and provides through class flags; code outside this module asks the
    flags, never the strategy's ``name`` (which is for messages and summaries only).
    """

    name = "base"
    #: a stochastic policy must give every example a fixed draw (a per-example ``seed`` in the pairs)
    needs_fixed_draw = False
    #: :meth:`prepare` must be called with the training batches before the first step
    needs_prepare = False
    #: :meth:`logps` returns reference log-likelihoods (``False``: only reference-free losses can be used)
    provides_reference = True

    def attach(self, policy: PreferencePolicy) -> None:
        """Called once when the training module is built, before the optimizer sees the policy. A strategy
        that cannot work with ``policy`` raises a :class:`~prefopt.errors.PrefoptError` here."""

    def prepare(self, policy: PreferencePolicy, batches: Iterable[Mapping[str, Any]]) -> None:
        """Called at the start of training with the training batches (already on the device)."""

    def logps(self, policy: PreferencePolicy, samples: Mapping[str, Any], draw: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def after_step(self, policy: PreferencePolicy, step: int) -> None:
        """Called after every optimizer step with the number of steps done so far."""

    def frozen_policy(self, policy: PreferencePolicy) -> PreferencePolicy | None:
        """The policy as it was when this strategy was attached, built from the weights the strategy already
        holds (no copy), for judging the trained policy against it; ``None`` when the strategy holds no fixed
        copy of those weights (the caller then copies ``policy.network`` once)."""
        return None

    def finish(self, policy: PreferencePolicy) -> None:
        """Called when training ends (e.g. to merge LoRA weights into the policy)."""


class CopyReference(ReferenceStrategy):
    """A frozen deep copy of the policy network."""

    name = "copy"

    def __init__(self):
        super().__init__()
        self.network: nn.Module | None = None

    def attach(self, policy: PreferencePolicy) -> None:
        self.network = copy.deepcopy(policy.network).requires_grad_(False).eval()

    @torch.no_grad()
    def logps(self, policy, samples, draw):
        with eval_mode(self.network):  # Lightning may flip module modes; the reference never drops out
            return policy.log_likelihood(self.network, samples, draw)

    def frozen_policy(self, policy):
        return policy_view(policy, self.network)


class SyncReference(CopyReference):
    """TR-DPO (Gorbatovski et al. 2024): every ``sync_every`` steps ref <- alpha * policy + (1 - alpha) * ref.

    ``alpha = 1`` is a hard copy ("hard update"); smaller alphas are soft updates.
    """

    name = "sync"

    def __init__(self, sync_every: int = 64, alpha: float = 0.6):
        super().__init__()
        if int(sync_every) < 1:
            raise PrefoptError(f"reference.sync_every={sync_every!r} must be an integer >= 1")
        if not 0.0 < float(alpha) <= 1.0:
            raise PrefoptError(f"reference.alpha={alpha!r} must be in (0, 1]")
        self.sync_every, self.alpha = int(sync_every), float(alpha)

    def attach(self, policy):
        if getattr(policy.network, "peft_config", None):
            raise PrefoptError(
                f"reference=sync cannot be used with a peft (LoRA) network: {type(policy).__name__}.network is "
                f"a {type(policy.network).__name__} with adapters, whose reference is its base with the adapters "
                "disabled; use reference=adapter, or give sync a plain (un-wrapped) network")
        super().attach(policy)

    def frozen_policy(self, policy):
        return None  # the copy moves towards the policy during training

    @torch.no_grad()
    def after_step(self, policy, step):
        if step % self.sync_every:
            return
        for ref, new in zip(self.network.parameters(), policy.network.parameters()):
            ref.lerp_(new.detach(), self.alpha)
        for ref, new in zip(self.network.buffers(), policy.network.buffers()):
            ref.copy_(new)


class AdapterReference(ReferenceStrategy):
    """peft LoRA on the policy network; the reference is the same network with its adapters disabled.

    No second copy of the weights is kept. ``targets`` defaults to the policy's ``lora_targets``.
    At the end of training the adapters stay in place (``merge_on_finish=False``) or are merged into the
    base weights, which is what a next round of iterative DPO wants.
    """

    name = "adapter"

    def __init__(self, rank: int = 8, alpha: float | None = None, targets: Iterable[str] | None = None,
                 dropout: float = 0.0, merge_on_finish: bool = False):
        super().__init__()
        if int(rank) < 1:
            raise PrefoptError(f"reference.rank={rank!r}: reference=adapter needs LoRA with rank >= 1")
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.targets = list(targets) if targets else None
        self.dropout, self.merge_on_finish = float(dropout), bool(merge_on_finish)

    def attach(self, policy):
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(policy.network, PeftModel):
            return  # adapters the policy already has: disabling them is not the policy as it is now
        targets = self.targets or list(policy.lora_targets)
        if not targets:
            raise PrefoptError(
                f"reference=adapter needs LoRA target modules: {type(policy).__name__} names none in "
                "lora_targets; set reference.targets to module names of the network")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=self.dropout)
        try:
            policy.network = get_peft_model(policy.network, config)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise PrefoptError(f"reference.targets={targets}: {err}") from None
        # new adapters start at zero: disabled, they are the policy as attached (a weak reference, so the
        # network does not become a submodule of this strategy)
        self._fresh = weakref.ref(policy.network)

    @torch.no_grad()
    def logps(self, policy, samples, draw):
        with adapters_disabled(policy.network), eval_mode(policy.network):
            return policy.log_likelihood(policy.network, samples, draw)

    def finish(self, policy):
        if self.merge_on_finish:
            policy.network = policy.network.merge_and_unload()

    def frozen_policy(self, policy):
        # valid while the base weights stay as attached: adapters this strategy added, never merged into them
        fresh = getattr(self, "_fresh", None)
        if fresh is None or fresh() is not policy.network or self.merge_on_finish:
            return None
        return policy_view(policy, AdaptersDisabled(policy.network))


class AdaptersDisabled(nn.Module):
    """A peft-wrapped network seen with its adapters disabled: every call of it, or of one of its methods,
    runs inside ``disable_adapter()``. It holds no weights of its own (the wrapped network is shared)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(self._modules["model"], name)
        if not callable(value) or isinstance(value, nn.Module):
            return value
        model = self._modules["model"]

        def without_adapters(*args, **kwargs):
            with adapters_disabled(model):
                return value(*args, **kwargs)

        return without_adapters


def policy_view(policy: PreferencePolicy, network: nn.Module) -> PreferencePolicy:
    """``policy`` with ``network`` in place of its own; every other attribute and submodule (a frozen VAE or
    text encoder, say) is shared with ``policy``, not copied."""
    view = copy.copy(policy)
    view._modules = dict(policy._modules)  # the shallow copy shared this dict; the view gets its own
    view._modules["network"] = network
    return view


class PrecomputedReference(ReferenceStrategy):
    """Reference log-likelihoods computed once, with the untrained policy, over the training set.

    The batches must carry an integer ``index`` per example (the cache row). For a stochastic
    likelihood (diffusion) they must also carry a per-example ``seed``, so the draw an example sees in
    training is the draw its cached value was computed with. The cache is part of the state dict, so
    a resumed run reads it back instead of recomputing it with the trained policy.
    """

    name = "precomputed"
    needs_fixed_draw = True
    needs_prepare = True

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.empty(0, 2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "cache")
        if saved is not None:
            self.cache = torch.empty_like(saved, device=self.cache.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _check(policy, batch):
        if "index" not in batch:
            raise PrefoptError("reference=precomputed needs an integer 'index' per example in the batches; "
                               f"found keys {sorted(batch)}")
        if policy.stochastic and "seed" not in batch:
            raise PrefoptError(
                f"reference=precomputed with the stochastic {type(policy).__name__} needs a fixed draw per "
                "example: the batches must carry a per-example 'seed' (use reference=copy or adapter otherwise)")

    @torch.no_grad()
    def prepare(self, policy, batches):
        if self.cache.numel():
            return  # restored from a checkpoint
        indices, values = [], []
        with eval_mode(policy.network):
            for batch in batches:
                self._check(policy, batch)
                samples = policy.concatenate(batch)
                logps = policy.log_likelihood(policy.network, samples, policy.draw(samples))
                indices.append(batch["index"].reshape(-1).to(torch.int64))
                values.append(torch.stack(split_pairs(logps.float()), dim=1))
        device = values[0].device if values else next(policy.network.parameters()).device
        index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.int64, device=device)
        value = torch.cat(values) if values else torch.empty(0, 2, device=device)
        # Under DDP each rank scored only its shard of the training set: every rank takes all the rows,
        # so each example is scored once and all ranks read the same cache.
        index, value = _all_gather_rows(index.to(device), value)
        if not index.numel():
            raise PrefoptError("reference=precomputed found no training batches to precompute")
        cache = torch.full((int(index.max()) + 1, 2), float("nan"), device=device)
        cache[index] = value  # an index seen twice (DDP pads shards to equal size) carries the same value
        self.cache = cache

    def logps(self, policy, samples, draw):
        if not self.cache.numel():
            raise PrefoptError("reference=precomputed was asked for values before its cache was built")
        index = samples["index"]
        index = index[: index.shape[0] // 2]
        if int(index.max()) >= self.cache.shape[0] or torch.isnan(self.cache[index]).any():
            raise PrefoptError("reference=precomputed has no cached value for some batch indices "
                               f"{index.tolist()}: the cache covers the training set only")
        values = self.cache[index]
        return torch.cat([values[:, 0], values[:, 1]])


def _all_gather_rows(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(index [n], values [n, 2])`` rows of every rank when ``torch.distributed`` runs several processes
    (ranks may hold different numbers of rows); the rows unchanged otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index, values
    world = dist.get_world_size()
    count = torch.tensor([index.numel()], dtype=torch.int64, device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    size = int(max(int(c) for c in counts))
    padded_index = torch.full((size,), -1, dtype=torch.int64, device=values.device)
    padded_index[: index.numel()] = index
    padded_values = torch.zeros(size, values.shape[1], dtype=values.dtype, device=values.device)
    padded_values[: values.shape[0]] = values
    all_index = [torch.empty_like(padded_index) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_index, padded_index)
    dist.all_gather(all_values, padded_values)
    index, values = torch.cat(all_index), torch.cat(all_values)
    keep = index >= 0
    return index[keep], values[keep]


class NoReference(ReferenceStrategy):
    """No reference model: only reference-free losses (simpo, cpl, sft) may be used."""

    name = "none"
    provides_reference = False

    def logps(self, policy, samples, draw):
        return None


_STRATEGIES = {cls.name: cls for cls in (CopyReference, AdapterReference, PrecomputedReference, NoReference,
                                         SyncReference)}


def make_reference(strategy: str | ReferenceStrategy | Mapping[str, Any], **options) -> ReferenceStrategy:
    """Build a strategy from its name (``"copy"``), a mapping with a ``name`` key, or pass one through."""
    if isinstance(strategy, ReferenceStrategy):
        return strategy
    if isinstance(strategy, Mapping):
        options = {**strategy, **options}
        strategy = options.pop("name", None)
    if strategy not in _STRATEGIES:
        raise PrefoptError(f"reference={strategy!r} is not supported; allowed: {', '.join(REFERENCE_TYPES)}")
    try:
        return _STRATEGIES[strategy](**options)
    except TypeError as err:
        raise PrefoptError(f"reference={strategy}: bad options {sorted(options)} ({err})") from None

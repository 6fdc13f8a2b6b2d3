"""The training loop behind the CLI: build a task, train round by round, evaluate, write ``summary.json``."""

from __future__ import annotations

import copy
import inspect
import json
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from prefopt.atomic import atomic_write
from prefopt.cache import cached_tensors
from prefopt.checkpoint_io import KeepLogsWithCheckpoints, RecordRunSignature, check_checkpoint_file, check_resume, \
    check_resume_allow, finished_run_summary, run_signature, train_metrics as checkpoint_metrics
from prefopt.data.pairs import TensorPairs
from prefopt.degenerate import check_pairs
from prefopt.distributed import is_fsdp, unwrapped_policy
from prefopt.errors import PrefoptError, check_choice
from prefopt.feedback.train import (check_loss as check_feedback_loss, feedback_config, module_class, round_dataloader,
                                   round_feedback)
from prefopt.losses import LOSS_ALIASES
from prefopt.module import NONFINITE_MODES, PreferenceModule, check_loss_reference, loss_config
from prefopt.reference import ReferenceStrategy, make_reference, policy_view
from prefopt.resume import keep_round_checkpoint, read_progress, record_round, restore_round_end, round_checkpoint
from prefopt.runlock import check_not_finished, hold_run_folder, write_run_record
from prefopt.tasks.base import Task
from prefopt.validation import summary_json, validate_options


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _resolve_ckpt(ckpt_path, checkpoint_dir: Path) -> str | None:
    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        if not last.exists():
            raise PrefoptError(f"ckpt_path=last but {last} does not exist; run once without ckpt_path, or "
                               "point hydra.run.dir at the folder of the run to resume")
        path = last
    else:
        path = Path(str(ckpt_path))
        if not path.exists():
            raise PrefoptError(f"ckpt_path={ckpt_path!r}: no such checkpoint file; allowed: last (this run "
                               "folder's checkpoints/last.ckpt), a path to a .ckpt file, or null")
    if not path.is_dir():  # a folder is a sharded (FSDP) checkpoint: the strategy reads and checks it
        try:
            check_checkpoint_file(path)
        except PrefoptError as err:
            raise PrefoptError(f"ckpt_path={ckpt_path}: {err}") from None
    return str(path)


_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _check_options(node, key: str, passed: Mapping[str, Any] = MappingProxyType({})) -> None:
    """Every option of a ``_target_`` node (and of its nested ones) must be a parameter of the target, and
    every parameter without a default must be given (unless the node is a ``_partial_``)."""
    if OmegaConf.is_list(node):
        for i, item in enumerate(node):
            _check_options(item, f"{key}[{i}]")
        return
    if not OmegaConf.is_dict(node):
        return
    for name, value in node.items_ex(resolve=False):
        if OmegaConf.is_config(value):
            _check_options(value, f"{key}.{name}")
    if "_target_" not in node:
        return
    target = node._target_
    try:
        signature = inspect.signature(get_object(target))
    except (ValueError, TypeError, ImportError, AttributeError):  # no signature to check against, or Hydra's error
        return
    params = signature.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    given = {str(name) for name in node if str(name) not in _HYDRA_KEYS} | set(passed)
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(given - set(accepted))
    if unknown:
        raise PrefoptError(f"{key} ({target}): unknown option(s) {', '.join(map(repr, unknown))}; allowed: "
                           f"{', '.join(accepted)}")
    if not node.get("_partial_", False):
        missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in given]
        if missing:
            raise PrefoptError(f"{key} ({target}): missing option(s) {', '.join(map(repr, missing))}")


def _instantiate(node, key: str, **kwargs):
    """``hydra.utils.instantiate`` whose config errors come out as one PrefoptError naming ``key``.

    The options are checked against the target's signature first (:func:`_check_options`). Hydra wraps
    whatever the target raises; a PrefoptError and Lightning's MisconfigurationException are bad
    configuration, so they are unwrapped. Anything else is left as it is (a bug keeps its traceback).
    """
    _check_options(node, key, kwargs)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        target = node.get("_target_", "?") if OmegaConf.is_config(node) else "?"
        if isinstance(cause, PrefoptError):
            raise PrefoptError(f"{key}: {cause}") from None
        if isinstance(cause, MisconfigurationException):
            raise PrefoptError(f"{key} ({target}): {cause}") from None
        raise


def validate_config(cfg: DictConfig) -> ReferenceStrategy:
    """Check the run's options before any expensive work (building models, generating pairs).

    The loss options are checked by making the run's :class:`~prefopt.losses.LossConfig`; the reference
    strategy is built (its options checked) and matched against the loss; the optimizer and scheduler are
    built on a dummy parameter. Every failure is a PrefoptError naming the option. Returns the reference
    strategy (unattached), whose capability flags the task is told about.
    """
    validate_options(cfg)  # types, ranges and paths of the generic options (prefopt.validation)
    try:
        seed = int(str(cfg.seed))
    except ValueError:
        raise PrefoptError(f"seed={cfg.seed!r} is not supported; allowed: an integer") from None
    del seed
    check_choice("nonfinite", cfg.get("nonfinite", "raise"), NONFINITE_MODES)
    threads = cfg.get("torch_threads", None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrefoptError(f"torch_threads={threads!r} is not supported; allowed: an integer >= 1, or null "
                           "(torch's default)")
    if not isinstance(cfg.get("disable_dropout", True), bool):
        raise PrefoptError(f"disable_dropout={cfg.disable_dropout!r} is not supported; allowed: true, false")
    loss = _container(cfg.loss)
    reference = make_reference(_container(cfg.reference))
    if not check_feedback_loss(cfg, loss):  # True: a binary or ranking layout, whose losses are checked there
        check_loss_reference(loss_config(loss)[0], reference)
    probe = [torch.nn.Parameter(torch.zeros(1))]
    for key in ("optimizer", "scheduler"):
        if not cfg.get(key):
            continue
        factory = _instantiate(cfg[key], key)
        try:
            made = factory(probe)
        except (ValueError, TypeError) as err:
            raise PrefoptError(f"{key} ({cfg[key].get('_target_', '?')}): {err}; check the options under {key}") \
                from None
        if key == "optimizer":
            probe = made
    return reference


def _summary_loss(loss_type):
    """The loss type(s) as the summary records them, aliases resolved (``dpo`` is written ``sigmoid``)."""
    loss_type = _container(loss_type)
    if isinstance(loss_type, str):
        return LOSS_ALIASES.get(loss_type, loss_type)
    return [LOSS_ALIASES.get(name, name) for name in loss_type]


def export_policy(policy, path: Path) -> str:
    """Write the policy network's weights to ``path`` as safetensors (atomically); return what was written.

    A peft (LoRA) network is exported with its adapters merged into the base weights (``"merged-lora"``):
    the file loads into the plain, un-wrapped network with ``load_state_dict``. Any other network is
    exported as its ``state_dict()`` (``"state_dict"``).
    """
    from safetensors.torch import save

    network, kind = policy.network, "state_dict"
    if getattr(network, "peft_config", None) and hasattr(network, "merge_and_unload"):
        network, kind = copy.deepcopy(network).merge_and_unload(), "merged-lora"
    # copies: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network.state_dict().items()}
    data = save(tensors, metadata={"format": kind})  # one key: safetensors orders several keys at random
    atomic_write(path, data)
    return kind


def build_module(cfg: DictConfig, policy, round_index: int = 0) -> PreferenceModule:
    """The Lightning module for one round, from the ``loss``, ``reference`` and ``optimizer`` configs."""
    scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    return module_class(cfg)(policy, loss=_container(cfg.loss), reference=_container(cfg.reference),
                            optimizer=_instantiate(cfg.optimizer, "optimizer"), scheduler=scheduler,
                            seed=int(cfg.seed) + round_index, nonfinite=cfg.get("nonfinite", "raise"),
                            disable_dropout=cfg.get("disable_dropout", True))


def frozen_baseline(module: PreferenceModule, fsdp: bool = False):
    """The policy before training, for evaluation: a view of the reference weights the module's strategy
    already holds (``copy``: its frozen copy; ``adapter``: the network with its new adapters disabled), so
    each frozen weight is held once; otherwise (``sync``, ``precomputed``, ``none``, or FSDP, which wraps the
    networks in place) the policy with a frozen copy of its ``network`` only (frozen parts such as a VAE or a
    text encoder are shared). Call it before training."""
    view = None if fsdp else module.reference.frozen_policy(module.policy)
    if view is None:
        view = policy_view(module.policy, copy.deepcopy(module.policy.network).requires_grad_(False).eval())
    return view


def build_trainer(cfg: DictConfig, output_dir: Path, round_index: int, resuming: bool = False) -> L.Trainer:
    """The round's trainer. It always gets :class:`~prefopt.checkpoint_io.KeepLogsWithCheckpoints`, which
    keeps the logs in step with the checkpoints (and, when ``resuming``, keeps the rows logged before)."""
    logger = _instantiate(cfg.logger, "logger", version=f"round_{round_index}") if cfg.get("logger") else False
    callbacks = [_instantiate(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items()
                 if c is not None]
    callbacks.append(KeepLogsWithCheckpoints(resume_loggers=[logger] if resuming and logger else []))
    return _instantiate(cfg.trainer, "trainer", default_root_dir=str(output_dir), logger=logger, callbacks=callbacks)


def round_pairs(cfg: DictConfig, task: Task, policy, round_index: int, reference: ReferenceStrategy | None = None):
    """The round's pairs. The first round's come from the base policy alone, so they are cached, keyed by
    the task's config: every run of a sweep that varies only the loss, beta or reference reuses them."""
    if round_index > 0 or not cfg.get("cache_pairs", True):
        return task.pairs(policy, round_index)
    built = []

    def build():
        pairs = task.pairs(policy, round_index)
        built.append(pairs)
        return pairs.to_tensors() if isinstance(pairs, TensorPairs) else {}

    key = {"task": _container(cfg.domain.task), "round": round_index}
    if reference is not None and reference.needs_fixed_draw:  # such pairs may carry per-example seeds
        key["reference_needs_fixed_draw"] = True
    flat = cached_tensors(cfg.paths.cache_dir, f"pairs-{cfg.domain.name}", key, build)
    if built and not isinstance(built[0], TensorPairs):
        return built[0]  # a dataset type the cache cannot hold: used as built
    return TensorPairs.from_tensors(flat) if flat else task.pairs(policy, round_index)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one configured job end to end and return its summary (also written as ``summary.json``).

    The run folder is locked for the run, and a finished run in it is not overwritten (prefopt.runlock)."""
    with hold_run_folder(Path(cfg.paths.output_dir)):
        check_not_finished(Path(cfg.paths.output_dir), cfg.get("ckpt_path"), cfg.get("overwrite", False))
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    strategy = validate_config(cfg)
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"), output_dir / "checkpoints")
    allow = check_resume_allow(cfg.get("resume_allow"))
    if ckpt_path:  # the loss, reference, domain of the checkpoint's run, before anything is built
        check_resume(ckpt_path, run_signature(cfg), allow)
        if (done := finished_run_summary(output_dir, ckpt_path, cfg)) is not None:
            return done  # resuming a finished run changes nothing
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("torch_threads") is not None:  # the run's one thread policy, before any model is built
        torch.set_num_threads(int(cfg.torch_threads))
    task: Task = _instantiate(cfg.domain.task, "domain.task")
    task.use_reference(strategy)
    policy = task.build_policy()
    baseline = None  # the policy before any training, which evaluate() judges against (made in round 0)
    signature = run_signature(cfg, policy.network)  # saved in every checkpoint; a resume must match it
    changes = check_resume(ckpt_path, signature, allow) if ckpt_path else []  # resume_allow: recorded changes
    write_run_record(output_dir)  # a resume's .hydra/, held back by the CLI until the checks above passed
    checkpoints = output_dir / "checkpoints"
    progress = read_progress(output_dir, ckpt_path, task.rounds, cfg.get("trainer"))

    rounds: list[dict[str, Any]] = []
    train_metrics: dict[str, float] = {}
    for round_index in range(task.rounds):
        if round_index < len(progress.done):  # finished and evaluated before a kill: its end state, its result
            module = build_module(cfg, policy, round_index)
            if baseline is None:
                baseline = frozen_baseline(module)
            end = round_checkpoint(checkpoints, round_index) if round_index < task.rounds - 1 else ckpt_path
            restore_round_end(module, end)
            policy = module.policy
            rounds.append(progress.done[round_index]["entry"])
            task.resumed_round(round_index, rounds[-1])
            train_metrics = progress.done[round_index]["train"]
            continue
        pairs_only = feedback_config(cfg).kind == "pairs"
        pairs = round_pairs(cfg, task, policy, round_index, strategy) if pairs_only else round_feedback(
            cfg, task, policy, round_index)
        check_pairs(pairs, f"round {round_index} pairs")  # all identical or ties: refused before training
        val = task.val_pairs()  # held-out pairs; the binary and ranking modules score them too (prefopt.feedback)
        module = build_module(cfg, policy, round_index)
        resume_from = ckpt_path if round_index == progress.resume_round else None  # else: the round starts fresh
        if resume_from and progress.resume_finished and not Path(resume_from).is_dir():
            # its last epoch is in the checkpoint (a kill during the evaluation or before summary.json): nothing to
            # train, and fitting would only start (and empty) the round's logs
            if baseline is None:
                baseline = frozen_baseline(module)
            restore_round_end(module, resume_from)
            policy, train_metrics = module.policy, progress.resume_metrics
        else:
            trainer = build_trainer(cfg, output_dir, round_index, resuming=bool(resume_from))
            trainer.callbacks.append(RecordRunSignature(signature, round_index, changes))
            plain = copy.deepcopy(module.policy) if is_fsdp(trainer) else None  # FSDP wraps the networks in place
            if baseline is None:
                baseline = frozen_baseline(module, fsdp=plain is not None)
            trainer.fit(module, train_dataloaders=round_dataloader(cfg, task, pairs),
                        val_dataloaders=task.dataloader(val, train=False) if val is not None else None,
                        ckpt_path=resume_from, weights_only=True)
            policy = module.policy if plain is None else unwrapped_policy(trainer, plain)
            train_metrics = checkpoint_metrics(trainer)
        if round_index < task.rounds - 1 and rank_zero_only.rank == 0:  # the next round overwrites last.ckpt
            keep_round_checkpoint(checkpoints, round_index)
        result = task.evaluate(baseline, policy, output_dir, round_index)
        rounds.append({"round": round_index, "num_pairs": len(pairs), **result})
        if rank_zero_only.rank == 0:
            record_round(checkpoints, round_index, rounds[-1], train_metrics)

    summary = {
        "domain": cfg.domain.name,
        "loss": _summary_loss(cfg.loss.loss_type),
        "feedback": feedback_config(cfg).kind,
        "beta": float(cfg.loss.beta),
        "reference": cfg.reference.name,
        "seed": int(cfg.seed),
        "train": train_metrics,
        "eval": rounds[-1],
        "rounds": rounds,
    }
    if changes:  # options changed on purpose when resuming (resume_allow)
        summary["resume_changes"] = changes
    if rank_zero_only.rank == 0:  # under DDP every rank has the same result; one writes it
        # the weights first: summary.json marks a finished run, which a resume leaves as it is
        export_policy(policy, output_dir / "policy.safetensors")
        atomic_write(output_dir / "summary.json", summary_json(summary))  # strict JSON: NaN -> null
        # Kept out of summary.json so that one config and seed always give the same summary.
        timing = {"wall_time_s": round(time.perf_counter() - started, 2)}
        atomic_write(output_dir / "timing.json", json.dumps(timing))
    return summary

"""The training loop behind the CLI: build a task, train round by round, evaluate, write ``summary.json``."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from prefopt.cache import cached_tensors
from prefopt.checkpoint_io import KeepLogsWithCheckpoints, RecordRunSignature, check_checkpoint_file, check_resume, \
    run_signature
from prefopt.data.pairs import TensorPairs
from prefopt.distributed import is_fsdp, unwrapped_policy
from prefopt.errors import PrefoptError, check_choice
from prefopt.feedback.train import (check_loss as check_feedback_loss, feedback_config, module_class, round_dataloader,
                                   round_feedback)
from prefopt.losses import REFERENCE_FREE, preference_loss
from prefopt.module import NONFINITE_MODES, TIE_MODES, PreferenceModule, check_loss_reference
from prefopt.reference import make_reference
from prefopt.runlock import check_not_finished, hold_run_folder
from prefopt.tasks.base import Task
from prefopt.validation import summary_json, validate_options


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _instantiate(node, key: str, **kwargs):
    """``hydra.utils.instantiate`` whose config errors come out as one PrefoptError naming ``key``.

    Hydra wraps whatever the target raises; a PrefoptError, a bad or missing keyword argument and
    Lightning's MisconfigurationException are bad configuration, so they are unwrapped. Anything else
    is left as it is (a bug should keep its traceback).
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        target = node.get("_target_", "?") if OmegaConf.is_config(node) else "?"
        if isinstance(cause, PrefoptError):
            raise PrefoptError(f"{key}: {cause}") from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise PrefoptError(f"{key} ({target}): {cause}; check the options under {key}") from None
        if isinstance(cause, MisconfigurationException):
            raise PrefoptError(f"{key} ({target}): {cause}") from None
        raise


def _loss_names(loss_type) -> list:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type or [])


def validate_config(cfg: DictConfig) -> None:
    """Check the run's options before any expensive work (building models, generating pairs).

    The loss options go through :func:`prefopt.losses.preference_loss` once on a dummy batch; the
    reference strategy is built (its options checked) and matched against the loss; the optimizer and
    scheduler are built on a dummy parameter. Every failure is a PrefoptError naming the option.
    """
    validate_options(cfg)  # types, ranges and paths of the generic options (prefopt.validation)
    try:
        seed = int(str(cfg.seed))
    except ValueError:
        raise PrefoptError(f"seed={cfg.seed!r} is not supported; allowed: an integer") from None
    del seed
    check_choice("nonfinite", cfg.get("nonfinite", "raise"), NONFINITE_MODES)
    loss = dict(_container(cfg.loss))
    check_choice("loss.ties", loss.pop("ties", "drop"), TIE_MODES)
    if "loss_type" not in loss or "beta" not in loss:
        raise PrefoptError(f"loss needs 'loss_type' and 'beta'; got keys {sorted(loss)}")
    loss_type, beta = loss.pop("loss_type"), loss.pop("beta")
    names = _loss_names(loss_type)
    reference_free = all(isinstance(n, str) and n in REFERENCE_FREE for n in names)
    dummy = torch.zeros(2)
    try:
        if not check_feedback_loss(cfg, {"loss_type": loss_type, "beta": beta, **loss}):  # True: checked there
            preference_loss(loss_type, dummy, dummy, None if reference_free else dummy, None if reference_free else dummy,
                            beta=beta, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2), **loss)
    except PrefoptError as err:
        raise PrefoptError(f"loss: {err}") from None
    reference = make_reference(_container(cfg.reference))
    check_loss_reference(loss_type, reference.name)
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return kind


def build_module(cfg: DictConfig, policy, round_index: int = 0) -> PreferenceModule:
    """The Lightning module for one round, from the ``loss``, ``reference`` and ``optimizer`` configs."""
    scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    return module_class(cfg)(policy, loss=_container(cfg.loss), reference=_container(cfg.reference),
                            optimizer=_instantiate(cfg.optimizer, "optimizer"), scheduler=scheduler,
                            seed=int(cfg.seed) + round_index, nonfinite=cfg.get("nonfinite", "raise"))


def build_trainer(cfg: DictConfig, output_dir: Path, round_index: int, resuming: bool = False) -> L.Trainer:
    """The round's trainer. It always gets :class:`~prefopt.checkpoint_io.KeepLogsWithCheckpoints`, which
    keeps the logs in step with the checkpoints (and, when ``resuming``, keeps the rows logged before)."""
    logger = _instantiate(cfg.logger, "logger", version=f"round_{round_index}") if cfg.get("logger") else False
    callbacks = [_instantiate(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items()
                 if c is not None]
    callbacks.append(KeepLogsWithCheckpoints(resume_loggers=[logger] if resuming and logger else []))
    return _instantiate(cfg.trainer, "trainer", default_root_dir=str(output_dir), logger=logger, callbacks=callbacks)


def round_pairs(cfg: DictConfig, task: Task, policy, round_index: int):
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
    validate_config(cfg)
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"), output_dir / "checkpoints")
    if ckpt_path:  # the loss, reference, domain of the checkpoint's run, before anything is built
        check_resume(ckpt_path, run_signature(cfg))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task: Task = _instantiate(cfg.domain.task, "domain.task")
    policy = task.build_policy()
    signature = run_signature(cfg, policy.network)  # saved in every checkpoint; a resume must match it
    if ckpt_path:
        check_resume(ckpt_path, signature)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    if ckpt_path and task.rounds > 1:
        raise PrefoptError(f"ckpt_path resumes single-round runs only; this task has rounds={task.rounds}")

    rounds: list[dict[str, Any]] = []
    train_metrics: dict[str, float] = {}
    for round_index in range(task.rounds):
        pairs_only = feedback_config(cfg).kind == "pairs"
        pairs = round_pairs(cfg, task, policy, round_index) if pairs_only else round_feedback(cfg, task, policy,
                                                                                              round_index)
        val = task.val_pairs() if pairs_only else None
        module = build_module(cfg, policy, round_index)
        trainer = build_trainer(cfg, output_dir, round_index, resuming=bool(ckpt_path))
        trainer.callbacks.append(RecordRunSignature(signature))
        plain = copy.deepcopy(module.policy) if is_fsdp(trainer) else None  # FSDP wraps the networks in place
        trainer.fit(module, train_dataloaders=round_dataloader(cfg, task, pairs),
                    val_dataloaders=task.dataloader(val, train=False) if val is not None else None,
                    ckpt_path=ckpt_path, weights_only=True)
        policy = module.policy if plain is None else unwrapped_policy(trainer, plain)
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.startswith(("train/", "val/"))}
        result = task.evaluate(reference, policy, output_dir, round_index)
        rounds.append({"round": round_index, "num_pairs": len(pairs), **result})

    summary = {
        "domain": cfg.domain.name,
        "loss": _container(cfg.loss.loss_type),
        "feedback": feedback_config(cfg).kind,
        "beta": float(cfg.loss.beta),
        "reference": cfg.reference.name,
        "seed": int(cfg.seed),
        "train": train_metrics,
        "eval": rounds[-1],
        "rounds": rounds,
    }
    if rank_zero_only.rank == 0:  # under DDP every rank has the same result; one writes it
        atomic_write_text(output_dir / "summary.json", summary_json(summary))  # strict: NaN -> null
        export_policy(policy, output_dir / "policy.safetensors")
        # Kept out of summary.json so that one config and seed always give the same summary.
        timing = {"wall_time_s": round(time.perf_counter() - started, 2)}
        atomic_write_text(output_dir / "timing.json", json.dumps(timing))
    return summary

"""The training loop behind the CLI: build a task, train round by round, evaluate, write ``summary.json``."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefopt.cache import cached_tensors
from prefopt.data.pairs import TensorPairs
from prefopt.errors import PrefoptError
from prefopt.module import PreferenceModule
from prefopt.tasks.base import Task


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
        if not last.is_file():
            raise PrefoptError(f"ckpt_path=last but {last} does not exist; run once without ckpt_path, or "
                               "point hydra.run.dir at the folder of the run to resume")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise PrefoptError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return str(ckpt_path)


def build_module(cfg: DictConfig, policy, round_index: int = 0) -> PreferenceModule:
    """The Lightning module for one round, from the ``loss``, ``reference`` and ``optimizer`` configs."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return PreferenceModule(policy, loss=_container(cfg.loss), reference=_container(cfg.reference),
                            optimizer=instantiate(cfg.optimizer), scheduler=scheduler,
                            seed=int(cfg.seed) + round_index, nonfinite=cfg.get("nonfinite", "raise"))


def build_trainer(cfg: DictConfig, output_dir: Path, round_index: int) -> L.Trainer:
    logger = instantiate(cfg.logger, version=f"round_{round_index}") if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return instantiate(cfg.trainer, default_root_dir=str(output_dir), logger=logger, callbacks=callbacks)


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
    """Run one configured job end to end and return its summary (also written as ``summary.json``)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task: Task = instantiate(cfg.domain.task)
    policy = task.build_policy()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"), output_dir / "checkpoints")
    if ckpt_path and task.rounds > 1:
        raise PrefoptError(f"ckpt_path resumes single-round runs only; this task has rounds={task.rounds}")

    rounds: list[dict[str, Any]] = []
    train_metrics: dict[str, float] = {}
    for round_index in range(task.rounds):
        pairs = round_pairs(cfg, task, policy, round_index)
        val = task.val_pairs()
        module = build_module(cfg, policy, round_index)
        trainer = build_trainer(cfg, output_dir, round_index)
        trainer.fit(module, train_dataloaders=task.dataloader(pairs),
                    val_dataloaders=task.dataloader(val, train=False) if val is not None else None,
                    ckpt_path=ckpt_path)
        policy = module.policy
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.startswith(("train/", "val/"))}
        result = task.evaluate(reference, policy, output_dir, round_index)
        rounds.append({"round": round_index, "num_pairs": len(pairs), **result})

    summary = {
        "domain": cfg.domain.name,
        "loss": _container(cfg.loss.loss_type),
        "beta": float(cfg.loss.beta),
        "reference": cfg.reference.name,
        "seed": int(cfg.seed),
        "train": train_metrics,
        "eval": rounds[-1],
        "rounds": rounds,
    }
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    # Kept out of summary.json so that one config and seed always give the same summary.
    timing = {"wall_time_s": round(time.perf_counter() - started, 2)}
    atomic_write_text(output_dir / "timing.json", json.dumps(timing))
    return summary

"""Checkpoints that survive a kill and load without pickle, and logs that stay in step with them.

* :class:`AtomicCheckpointIO` (wired into every trainer by ``conf/trainer/default.yaml``) writes a
  checkpoint to a temporary file in the same folder, fsyncs it and renames it over the target, so a
  kill during a write leaves the previous checkpoint intact, never half a file. It loads with
  ``torch.load(weights_only=True)`` and turns a truncated or foreign file into one clear
  :class:`~prefopt.errors.PrefoptError`.
* :class:`KeepLogsWithCheckpoints` (added to every trainer by :func:`prefopt.train.build_trainer`)
  flushes the loggers whenever a checkpoint is written, and, when a run resumes, puts back the CSV
  rows logged before the checkpoint. Lightning's ``CSVLogger`` deletes an existing ``metrics.csv``
  when it starts, so without this a resumed run would lose the rows of the first part of the run.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prefopt.atomic import atomic_path, atomic_write
from prefopt.errors import PrefoptError

log = logging.getLogger(__name__)


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """A cheap check that ``path`` is a complete ``torch.save`` archive (its zip directory is intact).

    A file cut short by a kill or a full disk loses the zip directory at its end, so this catches
    it without reading the tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise PrefoptError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise PrefoptError(f"checkpoint {path}: is empty (0 bytes); it was not written completely. "
                           "Resume from an earlier checkpoint, or start the run again without ckpt_path")
    if not zipfile.is_zipfile(path):
        raise PrefoptError(f"checkpoint {path}: is truncated or is not a torch checkpoint (no zip directory at "
                           "its end). Resume from an earlier checkpoint, or start again without ckpt_path")
    return path


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object: the file needs full pickle
        raise PrefoptError(
            f"checkpoint {path}: holds objects that cannot be loaded without pickle "
            f"(prefopt loads checkpoints with weights_only=True): {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise PrefoptError(f"checkpoint {path}: cannot be read ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'no details'}); it is damaged or was "
                           "not written by torch.save. Resume from an earlier checkpoint") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target's folder, fsync, ``os.replace``; load weights only.

    Lightning's own writer goes through a temporary file in the system temp folder and a move, which is
    a copy (not atomic) when that folder is on another disk, and it does not fsync.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if weights_only is False:
            raise PrefoptError(f"checkpoint {path}: weights_only=False was asked for; prefopt loads checkpoints "
                               "with weights_only=True only (no pickle)")
        return load_checkpoint_file(path, map_location=map_location)


# ----------------------------------------------------------------------------------------------- logs
def _backup_path(metrics_file: Path) -> Path:
    return metrics_file.with_name(metrics_file.name + ".before-resume")


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a CSV file; a last row cut short by a kill is dropped."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if None not in row.values() and None not in row]
    return [row for row in rows if row.get("step", "") != ""]


class KeepLogsWithCheckpoints(L.Callback):
    """Flush the loggers with every checkpoint; on resume, keep the CSV rows logged before it.

    ``resume_loggers``: the loggers of a trainer that is about to resume from a checkpoint. Here, before
    ``fit`` (so before the CSV logger deletes ``metrics.csv``), each CSV logger's earlier rows are copied
    to ``metrics.csv.before-resume``; once the checkpoint is restored, the rows of the steps before it
    are written back and the copy is removed (a copy left by a resume that was itself interrupted is
    used again). Rows of steps at or after the checkpoint, logged by the interrupted run after its last
    checkpoint, are dropped: the resumed run logs those steps again.
    """

    def __init__(self, resume_loggers: Sequence[Logger] = ()):
        self._pending: list[tuple[CSVLogger, list[dict[str, str]]]] = []
        if rank_zero_only.rank != 0:
            return
        for logger in resume_loggers:
            if not isinstance(logger, CSVLogger):
                continue
            metrics_file = Path(logger.log_dir) / "metrics.csv"
            backup = _backup_path(metrics_file)
            if not backup.is_file() and metrics_file.is_file():
                atomic_write(backup, metrics_file.read_bytes())
            if backup.is_file():
                self._pending.append((logger, _read_rows(backup)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the logs' "step" column counts batches that ended a step (skipped batches too), which is not always
        # global_step; it is restored from the checkpoint by now
        resumed_at = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger, rows in self._pending:
            kept = [row for row in rows if int(float(row["step"])) < resumed_at]
            writer = logger.experiment  # the CSV writer; creating it deleted the old metrics.csv
            writer.metrics[:0] = kept
            writer.save()
            _backup_path(Path(logger.log_dir) / "metrics.csv").unlink(missing_ok=True)
            log.info("resumed at step %d: kept %d of %d earlier log rows in %s", resumed_at, len(kept), len(rows),
                     logger.log_dir)
        self._pending.clear()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # everything logged up to this checkpoint reaches the disk before the checkpoint does
        for logger in trainer.loggers:
            logger.save()


# ------------------------------------------------------------------------------ what a checkpoint was trained with
#: the checkpoint key that holds :func:`run_signature`
SIGNATURE_KEY = "prefopt_run"


def network_signature(network: torch.nn.Module) -> dict[str, Any]:
    """The network's shape, not its values: a hash of every state_dict entry's name, shape and dtype, and counts."""
    import hashlib

    state = network.state_dict()
    text = "\n".join(f"{name}:{tuple(value.shape)}:{value.dtype}" for name, value in sorted(state.items()))
    return {"hash": hashlib.sha256(text.encode()).hexdigest()[:16], "tensors": len(state),
            "numel": int(sum(value.numel() for value in state.values()))}


def run_signature(cfg, network: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by a run of ``cfg``: the domain, the base network's signature
    (taken before any LoRA wrapping), the loss options, the reference strategy and the feedback kind."""
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    feedback = cfg.get("feedback")
    signature = {"domain": str(cfg.domain.name), "loss": plain(cfg.loss), "reference": plain(cfg.reference),
                 "feedback": str(feedback.get("kind", "pairs")) if feedback is not None else "pairs"}
    if network is not None:
        signature["network"] = network_signature(network)
    return signature


def train_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The ``train/`` and ``val/`` metrics Lightning holds now (``summary.json``'s ``train`` section)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}


class RecordRunSignature(L.Callback):
    """Writes :func:`run_signature` into every checkpoint (``checkpoint["prefopt_run"]``), so that a resume can
    check that it continues the same run (:func:`check_resume`), with the round the checkpoint belongs to and the
    training metrics at that point (``prefopt_round``, ``prefopt_train_metrics``: :mod:`prefopt.resume`)."""

    def __init__(self, signature: dict[str, Any], round_index: int = 0, changes: Sequence[dict] = ()):
        self.signature, self.round_index, self.changes = signature, int(round_index), list(changes)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[SIGNATURE_KEY] = self.signature
        if self.changes:
            checkpoint[CHANGES_KEY] = self.changes
        checkpoint["prefopt_round"] = self.round_index
        checkpoint["prefopt_train_metrics"] = train_metrics(trainer)


def _differences(saved: Any, current: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for name in sorted(set(saved) | set(current), key=str):
            found += _differences(saved.get(name, "<not set>"), current.get(name, "<not set>"), f"{key}.{name}")
        return found
    return [] if saved == current else [(key.lstrip("."), saved, current)]


#: what ``resume_allow`` may name: parts of the run signature a resume may change on purpose (the loss options:
#: the checkpoint's weights and optimizer state load the same whatever the loss)
RESUME_ALLOW = ("loss",)
#: the checkpoint key listing the deliberate changes of earlier resumes (``resume_allow``), kept for the summary
CHANGES_KEY = "prefopt_resume_changes"


def check_resume_allow(value: Any) -> tuple[str, ...]:
    """``resume_allow`` as a tuple of names from :data:`RESUME_ALLOW`; anything else is one PrefoptError."""
    from omegaconf import OmegaConf

    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if value in (None, ""):
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or any(name not in RESUME_ALLOW for name in names):
        raise PrefoptError(f"resume_allow={value!r} is not supported; allowed: a list of {', '.join(RESUME_ALLOW)} "
                           "(e.g. resume_allow=[loss]: resume with other loss options than the checkpoint's), or []")
    return tuple(names)


def _read_signed(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the loader names the problem
        return load_checkpoint_file(path)


def check_resume(ckpt_path: str | os.PathLike, signature: dict[str, Any],
                 allow: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Refuse to resume from a checkpoint of another run: one PrefoptError naming every option that differs.

    Only the keys of ``signature`` are compared: the config's (a signature without ``network``) before the task
    is built, then the network's once it is built, both before any pairs are made. Differences under a key named
    in ``allow`` (``resume_allow``, :data:`RESUME_ALLOW`) are deliberate: they are returned (``option``,
    ``checkpoint``, ``run``, and the checkpoint's ``epoch`` and ``global_step``), after the changes of earlier
    resumes that the checkpoint lists, for the summary.
    A checkpoint written before checkpoints carried their config is checked on its network alone (the names and
    shapes of its ``policy.network.*`` tensors, when the network was not LoRA-wrapped)."""
    path = Path(ckpt_path)
    if path.is_dir():  # a sharded (FSDP) checkpoint: the strategy reads and checks it
        return []
    checkpoint = _read_signed(path)
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    saved = checkpoint.get(SIGNATURE_KEY)
    if saved is None:
        state = checkpoint.get("state_dict", {})
        prefix = "policy.network."
        network = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if "network" not in signature or not network or any("base_model." in k for k in network):
            return []
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in network.items()}
        saved = {"network": network_signature(_ShapesOnly(shapes))}
        signature = {"network": signature["network"]}
    found = _differences({k: saved.get(k, "<not recorded>") for k in signature}, signature, "")
    differs = [(k, a, b) for k, a, b in found if k.split(".")[0] not in allow]
    if differs:
        what = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in differs[:6])
        what += f"; and {len(differs) - 6} more" if len(differs) > 6 else ""
        hint = " (or, for loss options, add resume_allow=[loss] to change them on purpose)" \
            if all(k.split(".")[0] in RESUME_ALLOW for k, _, _ in differs) else ""
        raise PrefoptError(f"ckpt_path={ckpt_path}: the checkpoint was written by another run: {what}. Resume with "
                           f"the options the run was started with{hint}, or start a new run without ckpt_path")
    at = {"epoch": int(checkpoint.get("epoch", -1)) + 1, "global_step": int(checkpoint.get("global_step", 0))}
    earlier = list(checkpoint.get(CHANGES_KEY) or [])
    return earlier + [{"option": k, "checkpoint": a, "run": b, **at} for k, a, b in found]


class _ShapesOnly(torch.nn.Module):
    """Stands in for a network in :func:`network_signature` when only names, shapes and dtypes are known."""

    def __init__(self, shapes: dict[str, tuple]):
        super().__init__()
        self._shapes = shapes

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in self._shapes.items()}


def finished_run_summary(output_dir: Path, ckpt_path: str | None, cfg) -> dict[str, Any] | None:
    """The summary of the finished run in ``output_dir`` when ``ckpt_path`` resumes it with nothing left to train
    (its ``last.ckpt`` is at ``trainer.max_epochs`` / ``max_steps`` and ``summary.json`` is there), else None.
    Resuming a finished run is then a no-op that leaves every file as it was."""
    import json

    summary = Path(output_dir) / "summary.json"
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if not ckpt_path or not summary.is_file() or not last.is_file() or Path(ckpt_path).resolve() != last.resolve():
        return None
    from prefopt.resume import checkpoint_finished

    checkpoint = load_checkpoint_file(last)  # read whole: a damaged checkpoint is named even when nothing is left
    if not checkpoint_finished(checkpoint, cfg.get("trainer")):
        return None
    step, epoch = int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", -1))
    log.warning("prefopt: the run in %s already finished (epoch %d, step %d); nothing to resume, its files are kept",
                output_dir, epoch + 1, step)
    return json.loads(summary.read_text())

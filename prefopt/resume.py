"""Where a killed run picks up again (``ckpt_path=last``), so that a resumed run ends with the files of an
uninterrupted one.

A run leaves, besides ``checkpoints/last.ckpt`` (written at the end of every epoch):

* in every checkpoint, the round it belongs to and the training metrics at that point
  (:data:`ROUND_KEY`, :data:`METRICS_KEY`; written by :class:`~prefopt.checkpoint_io.RecordRunSignature`);
* after each round's evaluation, ``checkpoints/round_<i>.json``: that round's entry of ``summary.json`` and its
  training metrics, written atomically;
* before each evaluation of a round that another round follows, ``checkpoints/round_<i>.ckpt``: the round's last
  checkpoint, kept because the next round overwrites ``last.ckpt``.

:func:`read_progress` reads these back. A round with its ``round_<i>.json`` is done: the resumed run restores its
final weights (:func:`restore_round_end`) and reuses its result instead of training and evaluating it again. The
round of ``last.ckpt`` resumes from it; when that checkpoint is the round's last epoch (a kill during the
evaluation, or between the last epoch and ``summary.json``), nothing is left to train: its weights are restored and
its training metrics are read from the checkpoint, so the summary's ``train`` section is the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.atomic import atomic_path, atomic_write
from prefopt.checkpoint_io import load_checkpoint_file
from prefopt.errors import PrefoptError

ROUND_KEY = "prefopt_round"
METRICS_KEY = "prefopt_train_metrics"
_ROUND_FILE = re.compile(r"round_(\d+)\.json")


def round_record(checkpoint_dir: Path, round_index: int) -> Path:
    return Path(checkpoint_dir) / f"round_{round_index}.json"


def round_checkpoint(checkpoint_dir: Path, round_index: int) -> Path:
    return Path(checkpoint_dir) / f"round_{round_index}.ckpt"


def checkpoint_finished(checkpoint: dict, trainer_cfg) -> bool:
    """True when ``checkpoint`` is at ``trainer.max_epochs`` / ``max_steps``: its round has nothing left to train."""
    trainer_cfg = trainer_cfg or {}
    max_epochs, max_steps = trainer_cfg.get("max_epochs"), trainer_cfg.get("max_steps", -1)
    step, epoch = int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", -1))
    return (max_steps not in (None, -1) and step >= max_steps) or (max_epochs not in (None, -1)
                                                                   and epoch + 1 >= max_epochs)


@dataclass
class Progress:
    """What an interrupted run finished. ``done``: the entries (round result, training metrics) of the rounds that
    were evaluated, in order. ``resume_round``: the round of the checkpoint resumed from (None: a fresh run);
    ``resume_finished``: that checkpoint is its round's last epoch; ``resume_metrics``: its training metrics."""

    done: list[dict[str, Any]] = field(default_factory=list)
    resume_round: int | None = None
    resume_finished: bool = False
    resume_metrics: dict[str, float] = field(default_factory=dict)


def read_progress(output_dir: Path, ckpt_path: str | None, rounds: int, trainer_cfg) -> Progress:
    """The progress of the run in ``output_dir`` that ``ckpt_path`` resumes (an empty one when not resuming)."""
    if not ckpt_path:
        return Progress()
    if Path(ckpt_path).is_dir():  # a sharded (FSDP) checkpoint: resumed by the strategy, one round only
        if rounds > 1:
            raise PrefoptError(f"ckpt_path={ckpt_path}: a sharded (FSDP) checkpoint resumes single-round runs only; "
                               f"this task has rounds={rounds}")
        return Progress(resume_round=0)
    checkpoint = load_checkpoint_file(ckpt_path)
    resume_round = int(checkpoint.get(ROUND_KEY, 0))
    checkpoints = Path(output_dir) / "checkpoints"
    if rounds > 1 and Path(ckpt_path).resolve() != (checkpoints / "last.ckpt").resolve():
        raise PrefoptError(f"ckpt_path={ckpt_path}: a run of several rounds (rounds={rounds}) resumes from its own "
                           "folder only: ckpt_path=last with hydra.run.dir set to the run's folder")
    done = []
    while len(done) < rounds and round_record(checkpoints, len(done)).is_file():
        try:
            done.append(json.loads(round_record(checkpoints, len(done)).read_text()))
        except (OSError, ValueError) as err:
            raise PrefoptError(f"{round_record(checkpoints, len(done))}: cannot be read ({err}); it records a "
                               "finished round of this run. Start the run again without ckpt_path") from None
    if resume_round not in (len(done), len(done) - 1):
        raise PrefoptError(f"ckpt_path={ckpt_path}: the checkpoint is of round {resume_round}, but the run folder "
                           f"records {len(done)} finished round(s); the folder mixes two runs. Start the run again "
                           "without ckpt_path")
    finished = checkpoint_finished(checkpoint, trainer_cfg)
    if not finished:  # more epochs asked for (trainer.max_epochs raised): the checkpoint's round trains on
        done = done[:resume_round]
    for index in range(min(len(done), rounds - 1)):
        if not round_checkpoint(checkpoints, index).is_file():
            raise PrefoptError(f"{round_checkpoint(checkpoints, index)}: missing; it holds the weights that round "
                               f"{index} ended with. Start the run again without ckpt_path")
    return Progress(done=done, resume_round=resume_round,
                    resume_finished=finished,
                    resume_metrics=dict(checkpoint.get(METRICS_KEY) or {}))


def restore_round_end(module, path: str | os.PathLike) -> None:
    """Load the weights a round ended with into the round's freshly built ``module`` and finish the round as
    ``on_train_end`` does (e.g. merge LoRA adapters), without training."""
    checkpoint = load_checkpoint_file(path)
    module.load_state_dict(checkpoint["state_dict"])
    module.reference.finish(module.policy)


def keep_round_checkpoint(checkpoint_dir: Path, round_index: int) -> None:
    """Keep the round's last checkpoint as ``round_<i>.ckpt`` (the next round overwrites ``last.ckpt``)."""
    last = Path(checkpoint_dir) / "last.ckpt"
    if not last.is_file():
        return
    target = round_checkpoint(checkpoint_dir, round_index)
    with atomic_path(target) as tmp:
        try:
            os.link(last, tmp)  # a second name for the file: last.ckpt is replaced, never written in place
        except OSError:
            tmp.write_bytes(last.read_bytes())


def record_round(checkpoint_dir: Path, round_index: int, entry: dict[str, Any], train: dict[str, float]) -> None:
    """Write ``round_<i>.json``: the round is evaluated; a resumed run reuses ``entry`` and ``train``."""
    if Path(checkpoint_dir).is_dir():  # no checkpoints (enable_checkpointing=false): nothing can resume
        atomic_write(round_record(checkpoint_dir, round_index), json.dumps({"entry": entry, "train": train}))

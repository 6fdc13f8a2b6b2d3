"""Reliability, round 2 (issue 15): run folders, checkpoints that carry their config, options validated once.

Most bad inputs run the real CLI in this process (:func:`cli`: ``prefopt.cli.main`` with ``sys.argv`` patched,
``SystemExit`` caught, stderr captured), so a case costs a config composition, not a Python start; a few
cases run it as a subprocess to prove the real exit status. Every CLI case checks exit status 2, exactly one
``prefopt: error:`` line naming the option or file, no traceback, and that the run folder and the cache were not
changed (:func:`snapshot`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import compose_config
from prefopt import cli as cli_module
from prefopt import runlock
from prefopt.errors import PrefoptError
from prefopt.train import train

SMALL = ["domain=bandit", "domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=16",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (hidden ones too) -> the sha256 of its bytes. The empty lock file a run
    leaves (``.prefopt-run.lock``, an OS lock's anchor, never deleted: that would race) is not counted."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            if path.is_file() and path.name != runlock.LOCK_NAME:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def cli(capsys, run_dir: Path, cache: Path, *overrides: str) -> tuple[int, str, str]:
    """``prefopt <SMALL> <overrides>`` in this process: (exit status, stdout, stderr)."""
    argv = ["prefopt", *SMALL, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *overrides]
    old = sys.argv
    sys.argv = argv
    code = 0
    try:
        cli_module.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, names) -> str:
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert code == 2, (code, err[-3000:])
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ run folders
def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s run lock until its stdin closes."""
    code = ("import sys; from prefopt.runlock import acquire; acquire(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold_in_another_process(run)
    try:
        before = snapshot(run)
        code, _, err = cli(capsys, run, tmp_path / "cache")
        line = assert_one_error(code, err, (str(run), "in use by another run", f"pid {holder.pid}", "started"))
        assert "host" in line
        assert snapshot(run) == before  # no .hydra/, no log, nothing written by the refused run
        with pytest.raises(PrefoptError, match=f"pid {holder.pid}"):  # the Python API refuses the same way
            train(compose_config(tmp_path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    runlock.acquire(run)  # the holder has gone: its lock went with it (no stale lock after a kill either)
    runlock.release(run)


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    runlock.acquire(tmp_path)
    runlock.acquire(tmp_path)
    runlock.release(tmp_path)
    assert (tmp_path / runlock.HOLDER_NAME).is_file()  # still held once
    runlock.release(tmp_path)
    assert not (tmp_path / runlock.HOLDER_NAME).exists() and not runlock._held


def _finished(folder: Path) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 7\n")
    (folder / "summary.json").write_text('{"seed": 7}')
    (folder / "policy.safetensors").write_bytes(b"weights")
    return folder


def _interrupted(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    return folder


@pytest.mark.parametrize("make, what", [(_finished, "a finished run (summary.json)"),
                                        (_interrupted, "an interrupted run (checkpoints/last.ckpt)")])
def test_a_fresh_run_into_a_used_folder_is_refused(tmp_path, capsys, make, what):
    run = make(tmp_path / "run")
    before = snapshot(run)
    code, _, err = cli(capsys, run, tmp_path / "cache")
    assert_one_error(code, err, (str(run), what, "ckpt_path=last", "overwrite=true"))
    assert snapshot(run) == before  # .hydra/config.yaml still the finished run's
    with pytest.raises(PrefoptError, match="refusing to overwrite"):
        train(compose_config(tmp_path))


def test_overwrite_true_replaces_a_finished_run(tmp_path, capsys):
    run = _finished(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    code, out, err = cli(capsys, run, tmp_path / "cache", "overwrite=true", "seed=3")
    assert code == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["seed"] == 3
    assert "seed: 3" in (run / ".hydra" / "config.yaml").read_text()
    assert (run / "policy.safetensors").read_bytes() != b"weights"
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own results are replaced
    assert not runlock._held  # released at the end of the run
    code, _, err = cli(capsys, run, tmp_path / "cache", "overwrite=maybe")
    assert_one_error(code, err, ("overwrite='maybe'", "true, false"))


def test_default_run_folders_cannot_collide():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=cli_module.config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["domain=bandit"], return_hydra_config=True)
    run_dir, sweep_dir = (OmegaConf.select(cfg, key) for key in ("hydra.run.dir", "hydra.sweep.dir"))
    stamp, _, suffix = Path(run_dir).name.rpartition("_")
    assert time.strptime(stamp, "%Y-%m-%d_%H-%M-%S")  # the time stamp is kept
    pid, _, random = suffix.partition("-")
    assert pid == str(os.getpid()) and len(random) == 4 and int(random, 16) >= 0
    assert Path(sweep_dir).name.endswith(suffix)
    assert runlock.run_id() == suffix  # the same for the whole process (DDP ranks get the folder from rank 0)


def test_a_refused_run_exits_2_as_a_real_process(tmp_path):
    run = _finished(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "prefopt.cli", *SMALL, f"hydra.run.dir={run}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert_one_error(done.returncode, done.stderr, ("refusing to overwrite",))
    assert "Warning" not in done.stderr

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


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (tests/conftest.py)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (hidden ones too) -> the sha256 of its bytes. The empty lock file of a run
    (``.prefopt-run.lock``, an OS lock's anchor; a SIGKILLed run leaves it) is not counted."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            if path.is_file() and path.name != runlock.LOCK_NAME:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def cli(capsys, run_dir: Path, cache: Path, *overrides: str) -> tuple[int, str, str]:
    """``prefopt <SMALL> <overrides>`` in this process: (exit status, stdout, stderr)."""
    other = any(o.startswith(("domain=", "experiment=")) for o in overrides)  # SMALL's task sizes are the bandit's
    small = [o for o in SMALL if not o.startswith("domain")] if other else SMALL
    argv = ["prefopt", *small, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *overrides]
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


def test_the_lock_file_is_deleted_at_the_end_without_letting_two_runs_hold_the_folder(tmp_path):
    fcntl = pytest.importorskip("fcntl")  # POSIX; elsewhere the lock file stays

    lock_path = tmp_path / runlock.LOCK_NAME
    runlock.acquire(tmp_path)
    late = os.open(lock_path, os.O_RDWR)  # a second run that opened the lock file just before the holder let go
    runlock.release(tmp_path)
    assert not lock_path.exists()  # deleted (while still locked)
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the late run gets the lock, of the deleted file...
    assert not runlock._names_file(lock_path, late)  # ...sees it (acquire retries then), so it holds nothing
    runlock.acquire(tmp_path)  # a third run locks the file the path names now
    try:
        assert lock_path.exists() and not runlock._names_file(lock_path, late)
        holder = runlock._held[tmp_path.resolve()][0]
        assert runlock._names_file(lock_path, holder._fd)
    finally:
        os.close(late)
        runlock.release(tmp_path)


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
    assert not (run / runlock.LOCK_NAME).exists() and not (run / runlock.HOLDER_NAME).exists()  # and its files gone
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


# --------------------------------------------------------------------------- checkpoints carry their config
API = [o for o in SMALL if o != "domain=bandit"]


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory) -> Path:
    """A short bandit run's folder (module-wide; the tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    train(compose_config(root, *API))
    return root


def _copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source / "run", target / "run", ignore=shutil.ignore_patterns(runlock.LOCK_NAME))
    (target / "run" / "summary.json").unlink()  # an interrupted run: resumable
    return target / "run"


def test_checkpoints_record_the_run_they_belong_to(finished_checkpoint):
    from prefopt.tasks.bandit import BanditTask

    saved = torch.load(finished_checkpoint / "run" / "checkpoints" / "last.ckpt", weights_only=True)["prefopt_run"]
    assert saved["domain"] == "bandit" and saved["feedback"] == "pairs" and saved["reference"]["name"] == "copy"
    assert saved["loss"]["loss_type"] == "sigmoid" and saved["loss"]["beta"] == 0.1
    network = saved["network"]
    # GaussianMLP(4 -> 32 -> 32 -> 2) with a log-std per action: weights, biases and log_std
    assert network["numel"] == sum(p.numel() for p in BanditTask().build_policy().network.state_dict().values())
    assert len(network["hash"]) == 16


RESUME_MISMATCH = [  # overrides -> words the one error line must hold; refused before Hydra rewrites .hydra/
    (("loss=ipo",), ("loss.loss_type: checkpoint 'sigmoid', this run 'ipo'",)),
    (("loss.beta=0.5",), ("loss.beta: checkpoint 0.1, this run 0.5",)),
    (("reference=sync",), ("reference.name: checkpoint 'copy', this run 'sync'",)),
    (("loss=cdpo", "loss.label_smoothing=0.2"), ("loss.label_smoothing: checkpoint 0.0, this run 0.2",)),
    (("feedback=binary", "loss=kto"), ("feedback: checkpoint 'pairs', this run 'binary'",)),
]


@pytest.mark.parametrize("overrides, names", RESUME_MISMATCH, ids=lambda v: ",".join(v) if isinstance(v, tuple) else "")
def test_resuming_with_other_options_is_refused_naming_what_differs(finished_checkpoint, tmp_path, capsys,
                                                                     overrides, names):
    run = _copy_run(finished_checkpoint, tmp_path)
    before = snapshot(run, tmp_path / "cache")
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", *overrides)
    line = assert_one_error(code, err, ("ckpt_path=", "another run", *names))
    assert "state_dict" not in line and "Missing key" not in err
    assert snapshot(run, tmp_path / "cache") == before


@pytest.mark.parametrize("strip", [False, True], ids=["signed", "older checkpoint without a signature"])
def test_resuming_another_models_checkpoint_is_refused_before_pairs_are_built(finished_checkpoint, tmp_path, capsys,
                                                                               monkeypatch, strip):
    from prefopt.tasks.bandit import BanditTask

    run = _copy_run(finished_checkpoint, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    if strip:
        checkpoint = torch.load(last, weights_only=True)
        del checkpoint["prefopt_run"]
        torch.save(checkpoint, last)
    monkeypatch.setattr(BanditTask, "pairs", lambda *a: pytest.fail("pairs were built"))
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text("# the run's own record\n")
    results = {k: v for k, v in snapshot(run).items() if not k.endswith("cli.log")}
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", "domain.task.hidden=[16]")
    line = assert_one_error(code, err, ("ckpt_path=", "network.hash", "network.numel"))
    assert "size mismatch" not in err and "state_dict" not in line
    # nothing changed, .hydra/ included: the network is checked before the resume's config is saved
    assert {k: v for k, v in snapshot(run).items() if not k.endswith("cli.log")} == results
    assert (run / ".hydra" / "config.yaml").read_text() == "# the run's own record\n"
    assert not runlock._pending_records
    # the Python API refuses the same way
    with pytest.raises(PrefoptError, match="network.hash"):
        train(compose_config(tmp_path, *API, "ckpt_path=last", "domain.task.hidden=[16]"))


# ------------------------------------------------------------------------------- options validated once
@dataclass(frozen=True)
class BadRun:
    """A CLI run that must stop with exit 2 and one error line holding ``names``, before anything is built.
    ``files(tmp)`` writes the files the overrides name (formatted with ``{tmp}``)."""

    id: str
    overrides: tuple[str, ...]
    names: tuple[str, ...]
    files: Callable[[Path], None] = field(default=lambda tmp: None)

    def __str__(self) -> str:
        return self.id


def _file_and_folder(tmp: Path) -> None:
    (tmp / "data.jsonl").write_text('{"a": 1}\n')
    (tmp / "model").mkdir()


BAD_RUNS = [
    BadRun("max_epochs not a number", ("trainer.max_epochs=abc",), ("trainer.max_epochs='abc'", "an integer >= -1")),
    BadRun("max_epochs a fraction", ("trainer.max_epochs=1.5",), ("trainer.max_epochs=1.5", "an integer")),
    BadRun("max_epochs below -1", ("trainer.max_epochs=-2",), ("trainer.max_epochs=-2",)),
    BadRun("max_steps not a number", ("++trainer.max_steps=ten",), ("trainer.max_steps='ten'",)),
    BadRun("log_every_n_steps zero", ("trainer.log_every_n_steps=0",), ("trainer.log_every_n_steps=0", ">= 1")),
    BadRun("limit_train_batches above 1.0", ("trainer.limit_train_batches=1.5",),
           ("trainer.limit_train_batches=1.5", "a fraction in [0, 1.0]")),
    BadRun("limit_train_batches negative", ("trainer.limit_train_batches=-1",), ("trainer.limit_train_batches=-1",)),
    BadRun("accumulate_grad_batches zero", ("++trainer.accumulate_grad_batches=0",),
           ("trainer.accumulate_grad_batches=0",)),
    BadRun("gradient_clip_val negative", ("++trainer.gradient_clip_val=-1",), ("trainer.gradient_clip_val=-1",)),
    BadRun("val_check_interval zero", ("++trainer.val_check_interval=0",), ("trainer.val_check_interval=0",)),
    BadRun("progress bar not a boolean", ("trainer.enable_progress_bar=maybe",),
           ("trainer.enable_progress_bar='maybe'", "true or false")),
    BadRun("num_pairs not a number", ("domain.task.num_pairs=lots",), ("domain.task.num_pairs='lots'", ">= 1")),
    BadRun("num_pairs zero", ("domain.task.num_pairs=0",), ("domain.task.num_pairs=0", ">= 1")),
    BadRun("num_pairs a boolean", ("domain.task.num_pairs=true",), ("domain.task.num_pairs=True",)),
    BadRun("num_eval zero", ("domain.task.num_eval=0",), ("domain.task.num_eval=0",)),
    BadRun("num_heldout negative (0 means none)", ("++domain.task.num_heldout=-1",),
           ("domain.task.num_heldout=-1", ">= 0")),
    BadRun("batch_size zero", ("domain.task.batch_size=0",), ("domain.task.batch_size=0",)),
    BadRun("batch_size a fraction", ("domain.task.batch_size=2.5",), ("domain.task.batch_size=2.5",)),
    BadRun("rounds zero", ("domain.task.rounds=0",), ("domain.task.rounds=0",)),
    BadRun("seed negative", ("seed=-1",), ("seed=-1", "[0, 2**32)")),
    BadRun("seed of 2**32", ("seed=4294967296",), ("seed=4294967296", "[0, 2**32)")),
    BadRun("seed a fraction", ("seed=1.5",), ("seed=1.5",)),
    BadRun("task seed negative", ("domain.task.seed=-3",), ("domain.task.seed=-3",)),
    BadRun("overwrite not a boolean", ("overwrite=maybe",), ("overwrite='maybe'", "true, false")),
    BadRun("feedback file missing", ("feedback=binary", "loss=kto", "feedback.path={tmp}/no/labels.jsonl"),
           ("feedback.path=", "no/labels.jsonl", "no such file or folder")),
    BadRun("control base checkpoint missing", ("domain=control", "domain.task.base.kind=checkpoint",
                                               "domain.task.base.path={tmp}/nope.safetensors"),
           ("domain.task.base.path=", "nope.safetensors", "no such file")),
    BadRun("sequence pairs file missing", ("experiment=sequence_local_lm", "domain.task.pairs_path={tmp}/no.parquet",
                                           "domain.task.model_path={tmp}/model"),
           ("domain.task.pairs_path=", "no.parquet", "no such file"), _file_and_folder),
    BadRun("sequence model folder is a file", ("experiment=sequence_local_lm", "domain.task.pairs_path={tmp}/data.jsonl",
                                               "domain.task.model_path={tmp}/data.jsonl"),
           ("domain.task.model_path=", "data.jsonl", "is a file; allowed: a folder"), _file_and_folder),
]


@pytest.mark.parametrize("case", BAD_RUNS, ids=str)
def test_bad_options_stop_before_anything_is_built(case, finished_checkpoint, tmp_path, capsys, monkeypatch):
    """One line, exit 2, no traceback; the shared cache (holding a real pairs entry) and the run folder keep
    no trace of the run beyond Hydra's record of it (.hydra/, cli.log)."""
    import shutil

    from prefopt.tasks.bandit import BanditTask

    monkeypatch.setattr(BanditTask, "__init__", lambda *a, **k: pytest.fail("the task was built"))
    cache = tmp_path / "cache"
    shutil.copytree(finished_checkpoint / "cache", cache)
    case.files(tmp_path)
    before = snapshot(cache)
    overrides = [o.format(tmp=tmp_path) for o in case.overrides]
    code, _, err = cli(capsys, tmp_path / "run", cache, *overrides)
    assert_one_error(code, err, case.names)
    assert snapshot(cache) == before
    left = {p.name for p in (tmp_path / "run").iterdir()} - {".hydra", "cli.log", runlock.LOCK_NAME}
    assert not left, left


def test_the_tables_hold_distinct_cases():
    ids = [case.id for case in BAD_RUNS + BAD_WEIGHTS + BAD_DATA] + [str(o) for o, _ in RESUME_MISMATCH]
    assert len(set(ids)) == len(ids) >= 30


def test_a_bad_option_exits_2_as_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "prefopt.cli", *SMALL, f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=abc"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert_one_error(done.returncode, done.stderr, ("trainer.max_epochs='abc'",))
    assert not (tmp_path / "cache").exists()


def test_summary_json_is_strict_json(tmp_path, monkeypatch):
    from prefopt.tasks.bandit import BanditTask
    from prefopt.validation import summary_json

    text = summary_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.0, "e": float("-inf")}})
    refuse = lambda name: pytest.fail(f"{name} in strict JSON")  # noqa: E731
    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [1.0, None], "c": {"d": 2.0, "e": None},
                                                       "nonfinite": ["a", "b[1]", "c.e"]}
    original = BanditTask.evaluate

    def evaluate(self, *args):
        result = original(self, *args)
        result["policy"]["reward_se"] = float("nan")
        return result
    monkeypatch.setattr(BanditTask, "evaluate", evaluate)
    train(compose_config(tmp_path, *API))
    written = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=refuse)
    assert written["eval"]["policy"]["reward_se"] is None
    assert written["nonfinite"] == ["eval.policy.reward_se", "rounds[0].policy.reward_se"]


# ------------------------------------------------------------------------------------------ degenerate data
def _rewrite_pairs(monkeypatch, change) -> None:
    from prefopt.tasks.bandit import BanditTask

    original = BanditTask.pairs

    def pairs(self, policy, round_index):
        made = original(self, policy, round_index)
        change(made)
        return made
    monkeypatch.setattr(BanditTask, "pairs", pairs)


def _identical(pairs, rows=slice(None)):
    pairs.rejected["actions"][rows] = pairs.chosen["actions"][rows]


def _all_ties(pairs):
    pairs.tie[:] = True


@pytest.mark.parametrize("change, names", [
    (_identical, ("round 0 pairs", "all 64 preference pairs are uninformative", "64 with chosen identical to rejected")),
    (_all_ties, ("all 64", "0 with chosen identical to rejected, 64 ties")),
    (lambda p: (_identical(p, slice(0, 10)), p.tie[10:].fill_(True)), ("all 64", "10 with chosen identical", "54 ties")),
], ids=["identical", "ties", "both"])
def test_pairs_that_teach_nothing_are_refused_before_training(tmp_path, monkeypatch, change, names):
    import lightning as L

    _rewrite_pairs(monkeypatch, change)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(PrefoptError) as info:
        train(compose_config(tmp_path, *API, "cache_pairs=false"))
    for name in names:
        assert name in str(info.value)


def test_some_identical_pairs_are_named_in_a_warning(tmp_path, monkeypatch, caplog):
    from prefopt.degenerate import check_pairs
    from prefopt.tasks.bandit import BanditTask

    task = BanditTask(num_pairs=64, num_eval=8)
    pairs = task.pairs(task.build_policy(), 0)
    _identical(pairs, slice(0, 5))
    with caplog.at_level("WARNING", logger="prefopt"):
        check_pairs(pairs, "round 0 pairs")
    assert "round 0 pairs: 5 of 64 preference pairs are uninformative (5 with chosen identical to rejected, 0 ties)" \
        in caplog.text


def test_a_teacher_that_ties_everything_is_refused_by_the_cli(tmp_path, capsys):
    code, _, err = cli(capsys, tmp_path / "run", tmp_path / "cache", "domain.task.teacher.kind=equal",
                       "+domain.task.teacher.equal_threshold=1e9", "cache_pairs=false")
    assert_one_error(code, err, ("round 0 pairs", "all 64", "64 ties", "equal_threshold"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ garbage weights
def _model_folder(tmp: Path, **files: bytes) -> None:
    from safetensors.torch import save

    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp / "data.jsonl").write_text('{"a": 1}\n')
    whole = save({"w": torch.randn(64, 64)})
    for name, data in files.items():
        name = name.replace("__", ".")
        (folder / name).write_bytes(whole[: len(whole) // 2] if data == b"cut" else whole if data == b"ok" else data)


class Boom:
    def __reduce__(self):  # unpickling this would write a file: the test checks it never is
        return (Path.write_text, (Path("/tmp/prefopt-unpickled-marker"), "unpickled"))


def _pickle_bin(tmp: Path) -> None:
    import pickle

    _model_folder(tmp)
    (tmp / "model" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom()}))


SEQ = ("experiment=sequence_local_lm", "domain.task.pairs_path={tmp}/data.jsonl", "domain.task.model_path={tmp}/model")
BAD_WEIGHTS = [
    BadRun("cut safetensors in a model folder", SEQ, ("domain.task.model_path", "model.safetensors",
                                                      "not a complete safetensors file"),
           lambda tmp: _model_folder(tmp, model__safetensors=b"cut")),
    BadRun("text named .safetensors in a model folder", SEQ, ("model.safetensors", "header too large"),
           lambda tmp: _model_folder(tmp, model__safetensors=b"{not weights}")),
    BadRun("pickle .bin weights only", SEQ, ("domain.task.model_path=", "pytorch_model.bin", "never unpickles"),
           _pickle_bin),
    BadRun("cut .safetensors as the control base", ("domain=control", "domain.task.base.kind=checkpoint",
                                                    "domain.task.base.path={tmp}/model/base.safetensors"),
           ("domain.task.base.path", "base.safetensors", "not a complete safetensors file"),
           lambda tmp: _model_folder(tmp, base__safetensors=b"cut")),
]


@pytest.mark.parametrize("case", BAD_WEIGHTS, ids=str)
def test_garbage_weights_are_refused_unread(case, finished_checkpoint, tmp_path, capsys, monkeypatch):
    marker = Path("/tmp/prefopt-unpickled-marker")
    marker.unlink(missing_ok=True)
    test_bad_options_stop_before_anything_is_built(case, finished_checkpoint, tmp_path, capsys, monkeypatch)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- resume (part)
def test_resuming_a_finished_run_changes_nothing(finished_checkpoint, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_checkpoint / "run", run, ignore=shutil.ignore_patterns(runlock.LOCK_NAME))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # max_epochs=1
    before = snapshot(run)
    summary = train(compose_config(tmp_path, *API, "ckpt_path=last"))
    assert snapshot(run) == before  # summary.json, policy.safetensors, metrics.csv, checkpoints: unchanged
    assert summary == json.loads((run / "summary.json").read_text())
    # with more epochs to go the resume trains on (and rewrites the results)
    train(compose_config(tmp_path, *API, "ckpt_path=last", "trainer.max_epochs=2"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert json.loads((run / "summary.json").read_text())["train"]


# ------------------------------------------------------------------------------------------- data decoding
def _data(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(data)


def _gzip_jsonl(tmp: Path) -> None:
    import gzip

    (tmp / "labels.jsonl").write_bytes(gzip.compress(b'{"obs": [0, 0, 0, 0], "label": 1}\n'))


FEEDBACK = ("feedback=binary", "loss=kto")
BAD_DATA = [
    BadRun("gzip JSONL", (*FEEDBACK, "feedback.path={tmp}/labels.jsonl"), ("feedback.path=", "labels.jsonl",
                                                                           "gzip-compressed", "gunzip")),
    BadRun("Latin-1 JSONL", (*FEEDBACK, "feedback.path={tmp}/labels.jsonl"),
           ("labels.jsonl", "is not UTF-8 text", "line 2"), _data("labels.jsonl", b'{"a": 1}\n{"name": "caf\xe9"}\n')),
    BadRun("text named .parquet", (*FEEDBACK, "feedback.path={tmp}/labels.parquet"),
           ("labels.parquet", "is not a parquet file", "the file is text"), _data("labels.parquet", b"a,b\n1,2\n")),
    BadRun("text named .npz", (*FEEDBACK, "feedback.path={tmp}/labels.npz"),
           ("labels.npz", "is not a NumPy .npz (zip) archive", "the file is text"), _data("labels.npz", b"1 2 3\n")),
    BadRun("empty .parquet", (*FEEDBACK, "feedback.path={tmp}/labels.parquet"),
           ("labels.parquet", "the file is empty"), _data("labels.parquet", b"")),
]
BAD_DATA[0] = BadRun(BAD_DATA[0].id, BAD_DATA[0].overrides, BAD_DATA[0].names, _gzip_jsonl)


@pytest.mark.parametrize("case", BAD_DATA, ids=str)
def test_data_files_that_do_not_match_their_format_are_refused(case, finished_checkpoint, tmp_path, capsys,
                                                               monkeypatch):
    test_bad_options_stop_before_anything_is_built(case, finished_checkpoint, tmp_path, capsys, monkeypatch)
    assert "pickle" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ a deliberate change on resume
def test_resume_allow_loss_changes_the_loss_on_purpose_and_records_it(finished_checkpoint, tmp_path, capsys):
    run = _copy_run(finished_checkpoint, tmp_path)
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", "loss.beta=0.5")
    assert_one_error(code, err, ("loss.beta: checkpoint 0.1, this run 0.5", "resume_allow=[loss]"))
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", "loss.beta=0.5", "resume_allow=[loss]",
                       "trainer.max_epochs=2")
    assert code == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["beta"] == 0.5
    assert summary["resume_changes"] == [{"option": "loss.beta", "checkpoint": 0.1, "run": 0.5, "epoch": 1,
                                          "global_step": 2}]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["prefopt_run"]["loss"]["beta"] == 0.5 and saved["prefopt_resume_changes"] == summary["resume_changes"]
    assert "ckpt_path=last" in (run / ".hydra" / "overrides.yaml").read_text()  # the resume's record, once checked
    # the network is never an allowed change, and resume_allow names what it allows
    (run / "summary.json").unlink()  # interrupted again (a finished run's resume is a no-op that builds nothing)
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", "resume_allow=[loss]",
                       "loss.beta=0.5", "domain.task.hidden=[16]")
    assert_one_error(code, err, ("network.hash",))
    code, _, err = cli(capsys, run, tmp_path / "cache", "ckpt_path=last", "resume_allow=[network]")
    assert_one_error(code, err, ("resume_allow=['network']", "allowed: a list of loss"))

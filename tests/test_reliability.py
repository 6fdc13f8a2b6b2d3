"""Reliability (issue 8): one clear error per bad input, a NaN guard, runs that survive a kill, safe loading,
determinism. Everything runs on the bandit domain and the shared data loaders.

Bad inputs are a table: :data:`BAD_INPUTS` holds :class:`BadInput` rows (what to do in a fresh folder, the
error type, the words the message must contain). A domain adds its own (images, token ids, model folders) in
its own test file the same way::

    from test_reliability import BadInput, check_bad_input

    BAD_INPUTS = [BadInput("token id out of vocabulary", lambda tmp: ..., names=("token", "vocab")), ...]

    @pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
    def test_bad_inputs(case, tmp_path):
        check_bad_input(case, tmp_path)
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open

from conftest import compose_config
from prefopt import cache as cache_module
from prefopt.checkpoint_io import AtomicCheckpointIO, load_checkpoint_file
from prefopt.data.pairs import TensorPairs
from prefopt.tasks.control.segments import load_segment_pairs
from prefopt.data.teachers import ScriptedTeacher
from prefopt.errors import PrefoptError
from prefopt.module import NonFiniteError, PreferenceModule
from prefopt.reference import PrecomputedReference
from prefopt.tasks.bandit import BanditTask
from prefopt.tasks.base import EpochShuffleSampler
from prefopt.train import train
from toy import loader, make_pairs, make_policy

SMALL = ["domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=16",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------ bad inputs
@dataclass(frozen=True)
class BadInput:
    """One bad input: ``run(tmp)`` must raise ``error`` with every string of ``names`` in its message."""

    id: str
    run: Callable[[Path], Any]
    names: tuple[str, ...]
    error: type[BaseException] = PrefoptError

    def __str__(self) -> str:
        return self.id


def check_bad_input(case: BadInput, tmp_path: Path) -> None:
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    message = str(info.value)
    for name in case.names:
        assert name in message, f"{case.id}: {name!r} not in the message {message!r}"
    assert "\n" not in message.strip(), f"{case.id}: the message should be one line: {message!r}"


def _run_config(*overrides: str) -> Callable[[Path], Any]:
    return lambda tmp: train(compose_config(tmp, *SMALL, *overrides))


def config_case(id: str, *overrides: str, names: tuple[str, ...], error=PrefoptError) -> BadInput:
    return BadInput(id, _run_config(*overrides), names, error)


def _with_file(make: Callable[[Path], Path], then: Callable[[Path, Path], Any]) -> Callable[[Path], Any]:
    """Write a file with ``make(tmp)``, then ``then(tmp, file)``."""
    return lambda tmp: then(tmp, make(tmp))


def _ckpt_run(*overrides: str) -> Callable[[Path, Path], Any]:
    return lambda tmp, path: train(compose_config(tmp, *SMALL, f"ckpt_path={path}", *overrides))


def _bytes_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _torch_file(name: str, obj) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp / name)
        return tmp / name
    return make


def _truncated_checkpoint(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, tmp / "whole.ckpt")
    data = (tmp / "whole.ckpt").read_bytes()
    (tmp / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.ckpt"


class NotATensor:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def _segments(n: int = 4, h: int = 3, obs_dim: int = 2, **changes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cols = {"chosen_obs": rng.normal(size=(n, h, obs_dim)).astype(np.float32),
            "chosen_actions": rng.normal(size=(n, h, 1)).astype(np.float32),
            "rejected_obs": rng.normal(size=(n, h, obs_dim)).astype(np.float32),
            "rejected_actions": rng.normal(size=(n, h, 1)).astype(np.float32)}
    cols.update(changes)
    return {k: v for k, v in cols.items() if v is not None}


def _npz(**cols) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        tmp.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / "pairs.npz", **cols)
        return tmp / "pairs.npz"
    return make


def _damaged_npz(tmp: Path) -> Path:
    path = _npz(**_segments(n=64))(tmp)
    data = bytearray(path.read_bytes())
    start = data.index(b"chosen_obs.npy") + 400  # inside that member's array bytes
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return path


def _load(tmp: Path, path: Path, **kwargs):
    return load_segment_pairs(path, **kwargs)


def _nan_obs() -> np.ndarray:
    obs = _segments()["chosen_obs"].copy()
    obs[2, 1, 0] = np.nan
    return obs


def _ab_labels(labels) -> dict[str, np.ndarray]:
    s = _segments()
    return {"obs_a": s["chosen_obs"], "actions_a": s["chosen_actions"], "obs_b": s["rejected_obs"],
            "actions_b": s["rejected_actions"], "label": np.asarray(labels, dtype=np.float32)}


def _precomputed_without_seeds(tmp: Path):
    policy = make_policy()  # stochastic: its draw depends on the batch, not on the example
    batch = next(iter(loader(make_pairs(16, with_seed=False), batch_size=8)))
    PrecomputedReference().prepare(policy, [batch])


def _sync_on_peft(tmp: Path):
    from peft import LoraConfig, get_peft_model

    policy = make_policy()
    policy.network = get_peft_model(policy.network, LoraConfig(r=2, target_modules=["0", "2"]))
    PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 0.1}, reference="sync")


def _adapter_without_targets(tmp: Path):
    policy = make_policy()
    policy.lora_targets = ()
    PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 0.1}, reference="adapter")


def _tensor_pairs(chosen: torch.Tensor, rejected: torch.Tensor):
    return lambda tmp: TensorPairs({"y": chosen}, {"y": rejected})


BAD_INPUTS: list[BadInput] = [
    # ---- loss options (checked before any model is built)
    config_case("unknown loss type", "loss.loss_type=dpo_typo", names=("loss_type='dpo_typo'", "sigmoid", "ipo")),
    config_case("beta zero", "loss.beta=0", names=("beta=0", "> 0")),
    config_case("beta negative", "loss.beta=-0.5", names=("beta=-0.5", "> 0")),
    config_case("label smoothing out of range", "loss=cdpo", "loss.label_smoothing=0.7",
                names=("label_smoothing=0.7", "[0, 0.5)")),
    config_case("label smoothing with a loss that ignores it", "loss=ipo", "loss.label_smoothing=0.1",
                names=("label_smoothing=0.1", "'ipo'")),
    config_case("unknown loss option", "+loss.gamma=1", names=("'gamma'", "known options")),
    config_case("unknown ties mode", "loss.ties=maybe", names=("loss.ties='maybe'", "drop", "half")),
    # ---- reference strategies and the combinations that cannot work
    config_case("unknown reference", "reference.name=frozen", names=("reference='frozen'", "copy", "sync")),
    config_case("reference-based loss with reference=none", "reference=none",
                names=("reference=none", "'sigmoid'", "simpo")),
    config_case("adapter without LoRA (rank 0)", "reference=adapter", "reference.rank=0",
                names=("reference.rank=0", "LoRA")),
    config_case("adapter with LoRA targets that do not exist", "reference=adapter", "reference.targets=[nope]",
                names=("reference.targets", "nope")),
    config_case("sync every 0 steps", "reference=sync", "reference.sync_every=0", names=("reference.sync_every=0",)),
    config_case("sync alpha out of range", "reference=sync", "reference.alpha=1.5", names=("reference.alpha=1.5", "(0, 1]")),
    config_case("an option the reference does not take", "+reference.rank=4", names=("reference=copy", "rank")),
    BadInput("precomputed with per-step randomness", _precomputed_without_seeds, names=("reference=precomputed", "'seed'")),
    BadInput("sync on a network that is already a peft model", _sync_on_peft, names=("reference=sync", "peft")),
    BadInput("adapter on a policy without LoRA targets", _adapter_without_targets,
             names=("reference=adapter", "lora_targets")),
    # ---- run options
    config_case("unknown nonfinite mode", "nonfinite=ignore", names=("nonfinite='ignore'", "raise", "skip")),
    config_case("zero torch threads", "torch_threads=0", names=("torch_threads=0", "integer >= 1")),
    config_case("disable_dropout not a bool", "disable_dropout=maybe", names=("disable_dropout='maybe'", "true")),
    config_case("seed that is not an integer", "seed=abc", names=("seed='abc'", "integer")),
    config_case("negative learning rate", "optimizer.lr=-1", names=("optimizer", "learning rate: -1")),
    # ---- teacher and task options
    config_case("unknown teacher kind", "domain.task.teacher.kind=oracel",
                names=("domain.task", "kind='oracel'", "oracle")),
    config_case("teacher mistake rate out of range", "domain.task.teacher.kind=mistake", "+domain.task.teacher.eps=2",
                names=("domain.task", "eps=2", "0 <= eps <= 1")),
    config_case("unknown task option", "+domain.task.horizon=3", names=("domain.task", "'horizon'")),
    # ---- checkpoints to resume from
    config_case("ckpt_path=last without a checkpoint", "ckpt_path=last", names=("ckpt_path=last", "last.ckpt")),
    config_case("ckpt_path that does not exist", "ckpt_path=/no/such/run.ckpt",
                names=("/no/such/run.ckpt", "no such checkpoint")),
    BadInput("truncated checkpoint", _with_file(_truncated_checkpoint, _ckpt_run()), names=("cut.ckpt", "truncated")),
    BadInput("empty checkpoint", _with_file(_bytes_file("empty.ckpt", b""), _ckpt_run()), names=("empty.ckpt", "empty")),
    BadInput("a text file as checkpoint", _with_file(_bytes_file("notes.ckpt", b"epoch=3\n" * 20), _ckpt_run()),
             names=("notes.ckpt", "not a torch checkpoint")),
    BadInput("checkpoint that needs pickle", _with_file(_torch_file("pickled.ckpt", {"obj": NotATensor()}), _ckpt_run()),
             names=("pickled.ckpt", "without pickle")),
    BadInput("ckpt_path with a multi-round task", _with_file(_torch_file("ok.ckpt", {}), _ckpt_run("domain.task.rounds=2")),
             names=("ckpt_path", "rounds=2")),
    BadInput("checkpoint loaded with weights_only=False",
             _with_file(_torch_file("ok.ckpt", {}), lambda tmp, p: AtomicCheckpointIO().load_checkpoint(p, weights_only=False)),
             names=("weights_only=False",)),
    # ---- pair tensors
    BadInput("chosen and rejected of different shapes", _tensor_pairs(torch.zeros(4, 2), torch.zeros(4, 3)),
             names=("chosen_y (4, 2)", "rejected_y (4, 3)", "same shape")),
    BadInput("chosen and rejected of different dtypes",
             _tensor_pairs(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float64)), names=("torch.float64", "dtype")),
    # ---- preference files (offline segment pairs)
    BadInput("missing preference file", lambda tmp: load_segment_pairs(tmp / "nope.npz"), names=("nope.npz", "no such file")),
    BadInput("empty preference file", _with_file(_npz(), _load), names=("pairs.npz", "empty")),
    BadInput("preference file of unknown format", _with_file(_bytes_file("pairs.csv", b"a,b\n1,2\n"), _load),
             names=("pairs.csv", "unknown format", ".npz")),
    BadInput("unreadable preference file", _with_file(_bytes_file("broken.npz", b"PK\x03\x04 not really a zip"), _load),
             names=("broken.npz", "cannot be read")),
    BadInput("damaged preference file", _with_file(_damaged_npz, _load), names=("pairs.npz", "'chosen_obs'", "damaged")),
    BadInput("preference file that needs pickle",
             _with_file(_npz(**_segments(chosen_obs=np.array([None, {"a": 1}] * 2, dtype=object))), _load),
             names=("pairs.npz", "pickle")),
    BadInput("misnamed column", _with_file(_npz(**_segments(rejected_actions=None, rejected_action=np.zeros((4, 3, 1)))), _load),
             names=("missing keys: rejected_actions", "unexpected keys: rejected_action")),
    BadInput("unknown columns", _with_file(_npz(states=np.zeros((4, 3, 2))), _load), names=("no known layout", "states")),
    BadInput("chosen and rejected observations of different sizes",
             _with_file(_npz(**_segments(rejected_obs=np.zeros((4, 3, 5), np.float32))), _load),
             names=("obs_dim mismatch", "'rejected_obs'")),
    BadInput("NaN in the observations", _with_file(_npz(**_segments(chosen_obs=_nan_obs())), _load),
             names=("'chosen_obs'", "NaN or inf", "row 2")),
    BadInput("label other than chosen/rejected/tie", _with_file(_npz(**_ab_labels([0, 2, 1, 0.5])), _load),
             names=("'label' row 1", "0 (a preferred)", "0.5 (tie)")),
    BadInput("teacher for an already labelled file",
             _with_file(_npz(**_segments()), lambda tmp, p: load_segment_pairs(p, teacher=ScriptedTeacher())),
             names=("pairs.npz", "already labelled")),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_inputs(case, tmp_path):
    check_bad_input(case, tmp_path)


def test_the_table_has_at_least_twenty_distinct_bad_inputs():
    assert len({case.id for case in BAD_INPUTS}) == len(BAD_INPUTS) >= 20


def test_config_errors_come_before_any_expensive_work(tmp_path, monkeypatch):
    """Loss, reference, optimizer and run options are checked before the task builds models or pairs."""
    def refuse(*args, **kwargs):
        raise AssertionError("the task was built before the config was checked")
    monkeypatch.setattr(BanditTask, "__init__", refuse)
    for override in ("loss.beta=0", "reference=none", "optimizer.lr=-1", "loss.ties=x", "ckpt_path=last"):
        with pytest.raises(PrefoptError):
            train(compose_config(tmp_path / override.replace("=", "_"), *SMALL, override))


# --------------------------------------------------------------------------------------------- the CLI
def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _cli(tmp: Path, run_dir: str, *overrides: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefopt.cli", "domain=bandit", f"hydra.run.dir={tmp / run_dir}",
               f"paths.cache_dir={tmp / 'cache'}", "trainer.enable_progress_bar=false", *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **popen)


def test_cli_bad_inputs_are_one_clear_line_and_a_nonzero_exit(tmp_path):
    cases = {  # overrides -> words the error must name
        ("domain=nope",): ("prefopt: error: domain=nope", "bandit"),  # the allowed options are listed
        ("loss=nope",): ("prefopt: error: loss=nope", "sigmoid"),
        ("loss.label_smoothing=2",): ("prefopt: error: loss: label_smoothing=2", "[0, 0.5)"),
        ("domain.task.teacher.kind=nope",): ("prefopt: error: domain.task", "oracle"),
        # Adam steps of 1e30 overflow at once: the NaN guard stops the run after saving the last good state
        ("optimizer.lr=1e30",): ("prefopt: error: non-finite", "train batch", "nonfinite-last-good.ckpt"),
    }
    procs = {args: _cli(tmp_path, f"run{i}", *SMALL, *args) for i, args in enumerate(cases)}  # side by side
    for args, names in cases.items():
        out, err = procs[args].communicate(timeout=600)
        assert procs[args].returncode != 0, args
        assert "Traceback" not in err, (args, err)
        for name in names:
            assert name in err, (args, name, err)
        if names[0].startswith("prefopt: error"):
            assert procs[args].returncode == 2
            assert sum(line.startswith("prefopt: error") for line in err.splitlines()) == 1
    nan_run = tmp_path / f"run{list(cases).index(('optimizer.lr=1e30',))}"
    assert load_checkpoint_file(nan_run / "nonfinite-last-good.ckpt")["global_step"] >= 1
    assert not (nan_run / "summary.json").exists()


# --------------------------------------------------------------------------------------- NaN guard
def _inject_nan(monkeypatch, index: int) -> list[int]:
    """Make pair ``index`` of the bandit's first round have a NaN context; returns the number of pairs."""
    size: list[int] = []
    original = BanditTask.pairs

    def pairs(self, policy, round_index):
        made = original(self, policy, round_index)
        made.shared["obs"][index] = float("nan")
        size.append(len(made))
        return made
    monkeypatch.setattr(BanditTask, "pairs", pairs)
    return size


def test_nan_in_a_batch_stops_the_run_naming_the_batch_after_saving_the_last_good_state(tmp_path, monkeypatch):
    size = _inject_nan(monkeypatch, index=37)
    cfg = compose_config(tmp_path, "domain.task.num_pairs=64", "domain.task.batch_size=16", "trainer.max_epochs=2",
                         "cache_pairs=false")
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    order = list(EpochShuffleSampler(size[0], seed=0))
    batch = order.index(37) // 16  # the first epoch's batch that holds pair 37
    message = str(info.value)
    # NaN observations give NaN policy and reference log-likelihoods (the distributions do not validate
    # their arguments: that would sync every step), hence a NaN loss
    assert (f"non-finite logps, reference_logps, loss in train batch {batch} (epoch 0, step {batch}); the batch "
            "has NaN/inf in 'obs'") in message
    saved = load_checkpoint_file(tmp_path / "run" / "nonfinite-last-good.ckpt")
    assert saved["global_step"] == batch
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nonfinite_skip_trains_on_past_the_bad_batch(tmp_path, monkeypatch, capsys):
    _inject_nan(monkeypatch, index=37)
    cfg = compose_config(tmp_path, "domain.task.num_pairs=64", "domain.task.batch_size=16", "trainer.max_epochs=2",
                         "cache_pairs=false", "nonfinite=skip")
    summary = train(cfg)
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prefopt: skipping")]
    assert len(skipped) == 2 and all("NaN/inf in 'obs'" in line for line in skipped)  # once per epoch
    assert all(math.isfinite(float(r["train/loss"])) for r in _metric_rows(tmp_path / "run"))
    assert math.isfinite(summary["eval"]["policy"]["reward_mean"])
    weights = load_file(str(tmp_path / "run" / "policy.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


# ------------------------------------------------------------------------------------ interruption
def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "round_0" / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/loss")]


def _losses_by_step(run_dir: Path) -> dict[int, str]:
    rows = _metric_rows(run_dir)
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {int(r["step"]): r["train/loss"] for r in rows}


class PauseAt(L.Callback):
    """Test helper for the CLI runs below (``+callbacks.pause._target_=test_reliability.PauseAt``): before the
    batch of global step ``step``, write ``marker`` and wait (until a SIGTERM, or ``seconds``), so that a test
    can kill the run at a known point in the middle of an epoch."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.05)


def _pause(step: int, marker: Path) -> list[str]:
    return ["+callbacks.pause._target_=test_reliability.PauseAt", f"+callbacks.pause.step={step}",
            f"+callbacks.pause.marker={marker}"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_killed_runs_resume_to_the_same_parameters_and_logged_losses(tmp_path):
    """SIGTERM in the middle of an epoch, resume, SIGKILL the resumed run in the middle of a later epoch, resume
    again: the result equals an uninterrupted run's (the last checkpoint's parameters, every logged loss,
    summary.json, policy.safetensors)."""
    epochs, per_epoch = 6, 8
    args = ["domain.task.num_pairs=128", "domain.task.num_eval=64", "domain.task.batch_size=16",
            f"trainer.max_epochs={epochs}", "trainer.log_every_n_steps=1"]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    killed = _cli(tmp_path, "killed", *args, *_pause(13, tmp_path / "pause13"))  # epoch 1, its 6th batch
    train(compose_config(tmp_path / "full", *args))  # uninterrupted, in this process while that one starts
    _wait_for(tmp_path / "pause13", killed)
    killed.send_signal(signal.SIGTERM)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "ckpt_path=last" in err and "Traceback" not in err
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert load_checkpoint_file(last)["global_step"] == per_epoch  # the end of epoch 0

    resumed = _cli(tmp_path, "killed", *args, "ckpt_path=last", *_pause(29, tmp_path / "pause29"))  # epoch 3
    _wait_for(tmp_path / "pause29", resumed)
    resumed.send_signal(signal.SIGKILL)
    resumed.communicate(timeout=60)
    assert resumed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert load_checkpoint_file(last)["global_step"] == 3 * per_epoch  # the end of epoch 2

    again = _cli(tmp_path, "killed", *args, "ckpt_path=last")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]

    a, b = (load_checkpoint_file(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("full/run", "killed"))
    assert a["global_step"] == b["global_step"] == epochs * per_epoch
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    full_losses, resumed_losses = _losses_by_step(tmp_path / "full" / "run"), _losses_by_step(tmp_path / "killed")
    assert sorted(full_losses) == list(range(epochs * per_epoch))
    assert resumed_losses == full_losses  # no row lost, none twice, every loss the same
    for name in ("summary.json", "policy.safetensors"):
        assert (tmp_path / "full" / "run" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)

    def dies_half_way(obj, handle):
        handle.write(b"PK\x03\x04" + b"\0" * 100)  # the start of a zip, then the process "dies"
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


# ----------------------------------------------------------------------------------- safe loading
def test_truncated_checkpoint_is_refused_when_resuming(tmp_path):
    cfg = compose_config(tmp_path, *SMALL)
    train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 200])
    with pytest.raises(PrefoptError, match=r"ckpt_path=last: checkpoint .*last.ckpt: is truncated"):
        train(compose_config(tmp_path, *SMALL, "ckpt_path=last"))
    # a file whose end survived but whose middle is damaged is caught when Lightning reads it
    damaged = bytearray(data)
    damaged[len(data) // 3: len(data) // 3 + 2000] = b"\0" * 2000
    last.write_bytes(bytes(damaged))
    with pytest.raises(PrefoptError, match="last.ckpt: cannot be read"):
        train(compose_config(tmp_path, *SMALL, "ckpt_path=last"))


def test_truncated_cache_entry_is_rebuilt(tmp_path):
    key, kind = {"what": "test"}, "reliability"
    built = lambda: {"x": torch.arange(1000.0)}  # noqa: E731
    first = cache_module.cached_tensors(tmp_path, kind, key, built)
    path = cache_module.entry_path(tmp_path, kind, key)
    data = path.read_bytes()
    count = cache_module.BUILD_COUNTS[kind]
    cache_module.cached_tensors(tmp_path, kind, key, built)
    assert cache_module.BUILD_COUNTS[kind] == count  # a valid entry is reused
    path.write_bytes(data[: len(data) // 2])
    again = cache_module.cached_tensors(tmp_path, kind, key, built)
    assert cache_module.BUILD_COUNTS[kind] == count + 1 and torch.equal(again["x"], first["x"])
    assert path.read_bytes() == data  # rewritten whole
    path.with_suffix(".sha256").unlink()  # killed between the data and its checksum
    cache_module.cached_tensors(tmp_path, kind, key, built)
    assert cache_module.BUILD_COUNTS[kind] == count + 2


def test_truncated_pairs_cache_is_rebuilt_by_a_run(tmp_path):
    summary = train(compose_config(tmp_path, *SMALL))
    entries = list((tmp_path / "cache" / "pairs-bandit").glob("*.safetensors"))
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    again = train(compose_config(tmp_path / "again", *SMALL, f"paths.cache_dir={tmp_path / 'cache'}"))
    assert again == summary
    assert len(load_file(str(entries[0]))["tie"]) == 64


@pytest.mark.parametrize("reference", ["copy", "adapter", "precomputed", "sync"])
def test_checkpoints_load_without_pickle_and_the_policy_is_exported(tmp_path, reference):
    cfg = compose_config(tmp_path, *SMALL, f"reference={reference}")
    train(cfg)
    run = tmp_path / "run"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    exported = load_file(str(run / "policy.safetensors"))
    with safe_open(str(run / "policy.safetensors"), "pt") as handle:
        kind = handle.metadata()["format"]
    fresh = BanditTask(num_pairs=64, num_eval=32).build_policy()
    fresh.network.load_state_dict(exported)  # strict: the exported weights fit the plain network
    if reference == "adapter":
        assert kind == "merged-lora"
        lora = {k: v for k, v in checkpoint["state_dict"].items() if "lora_B" in k}
        assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the adapters trained...
        base = BanditTask(num_pairs=64, num_eval=32).build_policy().network.state_dict()
        assert any(not torch.equal(exported[k], base[k]) for k in base)  # ...and are merged into the export
    else:
        assert kind == "state_dict"
        for name, value in exported.items():
            assert torch.equal(value, checkpoint["state_dict"][f"policy.network.{name}"]), name


# ------------------------------------------------------------------------------------- determinism
def test_one_config_and_seed_give_the_same_summary(tmp_path):
    args = ["domain.task.num_pairs=128", "domain.task.num_eval=64", "domain.task.batch_size=32",
            "trainer.max_epochs=2", "reference=sync", "reference.sync_every=2"]
    first = compose_config(tmp_path / "a", *args)
    second = compose_config(tmp_path / "b", *args, f"paths.cache_dir={tmp_path / 'other-cache'}")
    other_seed = compose_config(tmp_path / "c", *args, "seed=1")
    for cfg in (first, second, other_seed):
        train(cfg)
    text = [(tmp_path / d / "run" / "summary.json").read_text() for d in "abc"]
    assert text[0] == text[1]
    assert (tmp_path / "a" / "run" / "policy.safetensors").read_bytes() == \
        (tmp_path / "b" / "run" / "policy.safetensors").read_bytes()
    assert json.loads(text[2])["eval"] != json.loads(text[0])["eval"]  # the seed does matter
    assert "wall_time_s" not in text[0] and (tmp_path / "a" / "run" / "timing.json").is_file()

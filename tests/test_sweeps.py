"""Hydra multirun sweeps share one cache; corrupted entries are rebuilt; Optuna search; launcher configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from prefopt import cache
from prefopt.cli import config_dir
from prefopt.report import write_report
from prefopt.train import train

FAST = ["domain=bandit", "domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=32",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def _prefopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "prefopt.cli", *args], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2x2 sweep (loss x beta) over one seed, run as the CLI runs it."""
    root = tmp_path_factory.mktemp("sweep")
    _prefopt("-m", "loss=sigmoid,ipo", "loss.beta=0.1,0.5", *FAST, f"hydra.sweep.dir={root / 'sweep'}",
             f"paths.cache_dir={root / 'cache'}", cwd=root)
    return root


def test_multirun_writes_one_summary_per_run(sweep):
    summaries = sorted((sweep / "sweep").glob("*/summary.json"))
    assert len(summaries) == 4
    # run folders are named by their overrides, shortened with a hash when too long for a file name
    assert all(len(p.parent.name) <= 150 for p in summaries)
    seen = {(s["loss"], s["beta"]) for s in (json.loads(p.read_text()) for p in summaries)}
    assert seen == {("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.5)}


def test_the_sweep_builds_its_pairs_once(sweep):
    entries = list((sweep / "cache" / "pairs-bandit").glob("*.safetensors"))
    assert len(entries) == 1, entries  # the four runs share one task config, so one entry
    logs = [p.read_text() for p in (sweep / "sweep").glob("*/cli.log")]
    assert len(logs) == 4
    assert sum("cache: built pairs-bandit" in text for text in logs) == 1
    assert sum("cache: reused pairs-bandit" in text for text in logs) == 3
    # built before the first run finished, and never rewritten by a later run
    first_done = min(p.stat().st_mtime for p in (sweep / "sweep").glob("*/summary.json"))
    assert entries[0].stat().st_mtime <= first_done


def test_a_rerun_reuses_the_cache_and_reproduces_the_run(sweep, tmp_path):
    entry = next((sweep / "cache" / "pairs-bandit").glob("*.safetensors"))
    stamp = entry.stat().st_mtime_ns
    summaries = [json.loads(p.read_text()) for p in (sweep / "sweep").glob("*/summary.json")]
    swept = next(s for s in summaries if (s["loss"], s["beta"]) == ("ipo", 0.5))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, "loss=ipo", "loss.beta=0.5", f"paths.output_dir={tmp_path}",
                                          f"paths.cache_dir={sweep / 'cache'}"])
    before = cache.BUILD_COUNTS["pairs-bandit"]
    summary = train(cfg)
    assert cache.BUILD_COUNTS["pairs-bandit"] == before
    assert entry.stat().st_mtime_ns == stamp
    assert summary["eval"] == swept["eval"]


def test_the_report_has_one_row_per_configuration(sweep):
    result = write_report(sweep / "sweep")
    rows = [line for line in result["table"].splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 4
    assert result["table"].splitlines()[0].startswith("| loss | loss.beta | runs |")
    assert "win_rate" in result["table"].splitlines()[0]
    assert (sweep / "sweep" / "report.csv").read_text().count("\n") == 5  # header + 4 rows
    for name in ("report.md", "runs.csv", "beta_win_rate.png", "curves_train_loss.png"):
        assert (sweep / "sweep" / name).is_file(), name
    assert (sweep / "sweep" / "beta_win_rate.png").read_bytes()[:4] == b"\x89PNG"


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no checksum"])
def test_a_damaged_cache_entry_is_rebuilt_not_used(tmp_path, damage):
    config = {"what": "test", "damage": damage}
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(1000, dtype=torch.float32)}

    first = cache.cached_tensors(tmp_path, "unit", config, build)
    entry = cache.entry_path(tmp_path, "unit", config)
    if damage == "flipped byte":
        _corrupt(entry)
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:
        entry.with_suffix(".sha256").unlink()
    again = cache.cached_tensors(tmp_path, "unit", config, build)
    assert len(built) == 2
    torch.testing.assert_close(again["x"], first["x"])
    assert cache.cached_tensors(tmp_path, "unit", config, build)["x"].shape == (1000,)
    assert len(built) == 2  # the rebuilt entry is valid and used


def test_a_corrupted_pairs_entry_is_rebuilt_by_train(tmp_path):
    def config(name):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("train", overrides=[*FAST, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / name}",
                                               f"paths.cache_dir={tmp_path / 'cache'}"])

    before = cache.BUILD_COUNTS["pairs-bandit"]
    first = train(config("a"))
    assert cache.BUILD_COUNTS["pairs-bandit"] == before + 1
    entry = next((tmp_path / "cache" / "pairs-bandit").glob("*.safetensors"))
    _corrupt(entry)
    second = train(config("b"))
    assert cache.BUILD_COUNTS["pairs-bandit"] == before + 2
    assert second["eval"] == first["eval"]
    assert entry.with_suffix(".sha256").read_text().strip() == cache._digest(entry)


def test_optuna_search_runs_two_trials_and_returns_the_metric(tmp_path):
    sweep_dir = tmp_path / "optuna"
    _prefopt("hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST, "trainer.max_epochs=1",
             f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    assert len(summaries) == 2
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(s["eval"]["win_rate"] for s in summaries))
    assert set(best["best_params"]) == {"loss.beta", "optimizer.lr"}
    result = write_report(sweep_dir, plots=False)
    assert len([line for line in result["table"].splitlines()[2:] if line.startswith("|")]) == 2
    assert "Optuna best" in (sweep_dir / "report.md").read_text()


def _hydra_config(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_launcher_configs_compose():
    joblib = _hydra_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
    slurm = _hydra_config("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu"
    sized = _hydra_config("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = sized.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)


def test_fsdp_config_builds_the_project_strategy():
    cfg = _hydra_config("trainer=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP")
    strategy = instantiate(cfg.trainer.strategy)
    from torch.distributed.fsdp import ShardingStrategy

    from prefopt.distributed import PreferenceFSDPStrategy
    assert isinstance(strategy, PreferenceFSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert cfg.trainer.accelerator == "gpu"

"""Every loss and reference config composes and trains a few steps through prefopt.train (bandit domain)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefopt.cli import config_dir
from prefopt.errors import PrefoptError
from prefopt.losses import REFERENCE_FREE
from prefopt.train import train
from pathlib import Path

CONF = Path(config_dir())
LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
REFERENCES = sorted(p.stem for p in (CONF / "reference").glob("*.yaml"))
SMALL = ["domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=16",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


def _is_reference_free(cfg) -> bool:
    types = cfg.loss.loss_type
    return all(t in REFERENCE_FREE for t in ([types] if isinstance(types, str) else types))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_config_trains(make_config, loss):
    cfg = make_config(f"loss={loss}", *SMALL)
    summary = train(cfg)
    assert summary["loss"] == (cfg.loss.loss_type if isinstance(cfg.loss.loss_type, str)
                               else list(cfg.loss.loss_type))
    assert summary["train"]["train/loss"] == pytest.approx(summary["train"]["train/loss"])  # finite, not NaN
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert f"train/{key}" in summary["train"]
    assert 0.0 <= summary["eval"]["win_rate"] <= 1.0


@pytest.mark.parametrize("reference", REFERENCES)
def test_every_reference_config_trains(make_config, reference):
    cfg = make_config(f"reference={reference}", *SMALL)
    if reference == "none":
        with pytest.raises(PrefoptError, match="reference=none"):
            train(cfg)
        cfg = make_config("reference=none", "loss=simpo", *SMALL, subdir="simpo")
    summary = train(cfg)
    assert summary["reference"] == reference
    assert (Path(cfg.paths.output_dir) / "summary.json").is_file()


@pytest.mark.parametrize("loss", [name for name in LOSSES])
def test_reference_none_accepts_exactly_the_reference_free_losses(make_config, loss):
    cfg = make_config(f"loss={loss}", "reference=none", *SMALL)
    if _is_reference_free(cfg):
        assert train(cfg)["reference"] == "none"
    else:
        with pytest.raises(PrefoptError, match="needs a reference model"):
            train(cfg)


def test_summary_json_has_the_documented_keys(make_config):
    cfg = make_config(*SMALL, "seed=3", "loss=ipo", "loss.beta=0.2")
    train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert {"domain", "loss", "beta", "reference", "seed", "train", "eval"} <= set(summary)
    assert (summary["domain"], summary["loss"], summary["beta"], summary["seed"]) == ("bandit", "ipo", 0.2, 3)
    assert {"reference", "policy", "win_rate"} <= set(summary["eval"])


def test_cli_help_lists_the_config_groups():
    out = subprocess.run([sys.executable, "-m", "prefopt.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    groups = out.split("== Hydra's listing: every config group and its options ==")[1]
    for group in ("domain", "loss", "reference", "trainer", "logger", "experiment", "hparams_search"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"\n{group}: {', '.join(options)}\n" in groups, group


def test_cli_bad_loss_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "prefopt.cli", "domain=bandit", f"hydra.run.dir={tmp_path}",
                             "loss.loss_type=dpo_typo", *SMALL], capture_output=True, text=True)
    assert result.returncode == 2
    assert "dpo_typo" in result.stderr and "sigmoid" in result.stderr
    assert "Traceback" not in result.stderr


def test_ckpt_path_last_resumes_to_the_uninterrupted_result(make_config):
    args = ["domain.task.num_pairs=128", "domain.task.num_eval=64", "domain.task.batch_size=32"]
    full = train(make_config(*args, "trainer.max_epochs=4", subdir="full"))
    train(make_config(*args, "trainer.max_epochs=2", subdir="split"))
    with pytest.raises(PrefoptError, match="ckpt_path=last"):
        train(make_config(*args, "trainer.max_epochs=4", "ckpt_path=last", subdir="elsewhere"))
    resumed = train(make_config(*args, "trainer.max_epochs=4", "ckpt_path=last", subdir="split"))
    assert resumed["eval"] == full["eval"]
    assert resumed["train"] == pytest.approx(full["train"], rel=1e-6)

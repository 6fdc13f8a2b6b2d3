"""What a user meets at the command line: prefopt's own --help, one-line messages for misspelt groups and options,
missing mandatory values and missing optional packages, a quiet console and the summary every run ends with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from prefopt.cli import (check_mandatory, config_dir, config_error_message, missing_extra_message, _missing_module)
from prefopt.errors import PrefoptError
from prefopt.run_summary import format_run_summary, headline

REPO = Path(__file__).resolve().parent.parent
TINY = ["domain=bandit", "domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=32",
        "trainer.max_epochs=1"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(*args: str, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefopt.cli", *args], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _compose_error(*overrides: str) -> BaseException:
    with pytest.raises(Exception) as caught:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            compose("train", overrides=list(overrides), return_hydra_config=True)
    return caught.value


# ------------------------------------------------------------------------------------ misspellings
@pytest.mark.parametrize("override, expected", [
    ("domian=control", "domian: there is no such config group or option; did you mean 'domain'?"),
    ("loss.bta=0.1", "loss.bta: there is no such option under loss; did you mean 'beta'?"),
    ("domain.task.num_pairz=3", "domain.task.num_pairz: there is no such option under domain.task; "
                                "did you mean 'num_pairs'?"),
    ("domain=contrl", "domain=contrl: there is no such domain option; did you mean 'control'?"),
    ("reference=adaptor", "reference=adaptor: there is no such reference option; did you mean 'adapter'?"),
])
def test_a_misspelt_group_or_option_gets_the_closest_valid_name(override, expected):
    assert config_error_message(_compose_error(override)) == expected


def test_a_name_like_no_option_lists_what_is_allowed():
    options = sorted(p.stem for p in (Path(config_dir()) / "domain").glob("*.yaml"))
    assert config_error_message(_compose_error("domain=xyzzy")) == \
        f"domain=xyzzy: there is no such domain option; allowed: {', '.join(options)}"


def test_mandatory_values_left_unset_are_named_in_one_error():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=sequence_local_lm", "paths.output_dir=unused"])
    with pytest.raises(PrefoptError) as caught:
        check_mandatory(cfg)
    assert str(caught.value) == ("domain.task.model_path, domain.task.pairs_path: mandatory values not set; "
                                 "add domain.task.model_path=... domain.task.pairs_path=... to the command")
    check_mandatory(OmegaConf.create({"a": 1, "b": {"c": "x"}}))  # nothing missing: no error


# ---------------------------------------------------------------------------------- missing extras
def test_a_missing_optional_package_names_its_extra():
    assert missing_extra_message("music21", "sequence") == \
        'the sequence domain needs music21, which is not installed; install it with: pip install "prefopt[sequence]"'
    # a module that several extras hold: the domain's own extra is named, otherwise the small one
    assert missing_extra_message("peft", "diffusion").endswith('pip install "prefopt[diffusion]"')
    assert missing_extra_message("peft", "control").endswith('pip install "prefopt[lora]"')
    assert missing_extra_message("mujoco.viewer", "control").startswith("the MuJoCo envs need mujoco")
    assert missing_extra_message("torch", "control") is None  # a core dependency is no extra's business
    # found behind Hydra's wrapping of what an instantiated target raised
    try:
        try:
            raise ModuleNotFoundError("No module named 'music21'", name="music21")
        except ModuleNotFoundError as inner:
            raise InstantiationException("Error in call to target") from inner
    except InstantiationException as outer:
        assert _missing_module(outer) == "music21"
    assert _missing_module(ValueError("x")) is None


# ------------------------------------------------------------------------------------------ summary
def test_the_run_summary_names_the_headline_the_win_rate_and_the_files(tmp_path):
    summary = {"domain": "control", "loss": "sigmoid", "beta": 1.0, "reference": "copy", "seed": 0,
               "rounds": [{}, {}],
               "eval": {"env_id": "Pendulum-v1", "win_rate": 0.9,
                        "reference": {"return_mean": -535.55, "return_se": 15.46, "episodes": 50},
                        "policy": {"return_mean": -151.1, "return_se": 12.77, "episodes": 50}}}
    for name in ("summary.json", "policy.safetensors", "returns.png"):
        (tmp_path / name).write_text("x")
    lines = format_run_summary(summary, tmp_path).splitlines()
    assert lines[0] == ("prefopt: control (Pendulum-v1) finished: loss sigmoid (beta 1.0), reference copy, seed 0, "
                        "2 rounds")
    assert lines[1] == "  return_mean: reference -535.5 ± 15.5 -> policy -151.1 ± 12.8"
    assert lines[2].startswith("  win rate: 0.900 ")
    assert lines[3] == f"  run folder: {tmp_path}"
    listed = [line.split()[0].rstrip(",") for line in lines[4:]]
    assert listed == ["summary.json", "policy.safetensors", "returns.png", "summary.txt"]  # no checkpoint, no logs
    # reward_mean is the headline when there is no return; a number without a _se has no spread
    assert headline({"reference": {"accuracy": 0.5, "reward_mean": 1.0, "reward_se": 0.1},
                     "policy": {"accuracy": 0.7, "reward_mean": 2.0}}) == ("reward_mean", 1.0, 0.1, 2.0, None)
    assert headline({"win_rate": 0.5}) is None


# ---------------------------------------------------------------------------------- the command line
def test_the_command_line_help_mistakes_and_a_quiet_run(tmp_path):
    """Several prefopt commands side by side: --help; a misspelt group; a missing mandatory value; a missing
    optional package; an iterative bandit run, whose console must be quiet and end with the summary."""
    blocked = tmp_path / "blocked" / "music21"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'music21'\", name='music21')\n")
    procs = {
        "help": _start("--help", cwd=tmp_path),
        "typo": _start("domian=control", f"hydra.run.dir={tmp_path / 'typo'}", cwd=tmp_path),
        "mandatory": _start("experiment=sequence_local_lm", f"hydra.run.dir={tmp_path / 'mandatory'}", cwd=tmp_path),
        "extra": _start("domain=sequence", f"hydra.run.dir={tmp_path / 'extra'}", f"paths.cache_dir={tmp_path / 'c1'}",
                        cwd=tmp_path, PYTHONPATH=os.pathsep.join([str(blocked.parent), str(REPO)])),
        "run": _start("experiment=bandit_online", *TINY, "domain.task.rounds=2", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.cache_dir={tmp_path / 'c2'}", cwd=tmp_path),
    }
    out = {name: proc.communicate(timeout=600) + (proc.returncode,) for name, proc in procs.items()}

    text, _, code = out["help"]
    assert code == 0 and text.startswith("prefopt: DPO-family preference optimization")
    ours, hydras = text.split("== Hydra's listing: every config group and its options ==")
    for group in ("domain", "loss", "reference", "trainer", "experiment"):
        assert f"\n  {group} " in ours, group  # a line that says what the group is for
    examples = ours.split("Examples:")[1].strip().splitlines()
    assert len(examples) == 5 and all(line.strip().startswith("prefopt") for line in examples)
    for group in ("domain:", "loss:", "reference:", "trainer:", "experiment:"):
        assert f"\n{group} " in hydras, group
    assert "control" in hydras.split("\ndomain: ")[1].splitlines()[0]

    for name, words in {"typo": ["domian", "'domain'"],
                        "mandatory": ["domain.task.model_path", "domain.task.pairs_path", "mandatory"],
                        "extra": ["music21", 'pip install "prefopt[sequence]"']}.items():
        _, err, code = out[name]
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("prefopt: error: "), (name, err)
        assert all(word in lines[0] for word in words), (name, err)
    assert "+domian" not in out["typo"][1]

    stdout, stderr, code = out["run"]
    assert code == 0, stderr[-3000:]
    console = stdout + stderr
    for noise in ("Tip:", "eval mode", "exists and is not empty", "validation_step", "Warning"):
        assert noise not in console, noise
    assert console.count("GPU available") == 1  # two rounds, two Trainers, one line
    run = tmp_path / "run"
    written = (run / "summary.txt").read_text()
    assert stdout.rstrip().endswith(written.rstrip())
    saved = json.loads((run / "summary.json").read_text())
    assert written.splitlines()[0].startswith("prefopt: bandit finished: loss sigmoid (beta 0.1), reference copy, "
                                              "seed 0, 2 rounds")
    ref, pol = saved["eval"]["reference"], saved["eval"]["policy"]
    assert f"reward_mean: reference {ref['reward_mean']:.4g} ± {ref['reward_se']:.3g} -> policy " \
           f"{pol['reward_mean']:.4g} ± {pol['reward_se']:.3g}" in written
    assert f"win rate: {saved['eval']['win_rate']:.3f}" in written and f"run folder: {run}" in written

"""prefopt-report on hand-made sweep folders: exact means and standard errors, failed runs listed, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from prefopt.errors import PrefoptError
from prefopt.report import build_sweep, main, write_report


def _run(root: Path, overrides: list[str], summary: dict | None = None, error: str | None = None,
         curve: list[float] | None = None) -> Path:
    folder = root / ",".join(overrides)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "paths.cache_dir=/tmp/x"]))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "timing.json").write_text(json.dumps({"wall_time_s": 2.0}))
    if error is not None:
        (folder / "error.txt").write_text(error)
    if curve is not None:
        (folder / "logs" / "round_0").mkdir(parents=True)
        rows = ["epoch,step,train/loss,train/rewards/accuracies"]
        rows += [f"0,{step},{value},0.5" for step, value in enumerate(curve)]
        (folder / "logs" / "round_0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


def _summary(loss: str, beta: float, seed: int, win_rate: float, reward: float, train_loss: float) -> dict:
    return {"domain": "bandit", "loss": loss, "beta": beta, "reference": "copy", "seed": seed,
            "train": {"train/loss": train_loss, "train/rewards/accuracies": 0.75},
            "eval": {"round": 0, "num_pairs": 64, "win_rate": win_rate,
                     "policy": {"reward_mean": reward, "reward_se": 0.01},
                     "reference": {"reward_mean": -2.0, "reward_se": 0.01}}}


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for seed, (win, reward, loss) in enumerate([(0.5, -1.0, 0.6), (0.6, -1.5, 0.5), (0.7, -2.0, 0.4)]):
        _run(root, ["domain=bandit", "loss=sigmoid", "loss.beta=0.1", f"seed={seed}"],
             _summary("sigmoid", 0.1, seed, win, reward, loss), curve=[0.7, 0.6 - 0.1 * seed])
    _run(root, ["domain=bandit", "loss=ipo", "loss.beta=0.1", "seed=0"], _summary("ipo", 0.1, 0, 0.8, -1.2, 0.3),
         curve=[0.9, 0.5])
    _run(root, ["domain=bandit", "loss=ipo", "loss.beta=0.1", "seed=1"],
         error="PrefoptError: non-finite loss in train batch 3\nmore detail")
    _run(root, ["domain=bandit", "loss=ipo", "loss.beta=0.1", "seed=2"])  # started, never finished
    _run(root, ["domain=bandit", "loss=ipo", "loss.beta=0.5", "seed=0"], error="PrefoptError: boom")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_rows_are_configurations_with_mean_and_se_over_seeds(sweep_dir):
    result = write_report(sweep_dir)
    lines = result["table"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["loss", "loss.beta", "runs"]
    assert header[3:6] == ["policy.reward_mean", "reference.reward_mean", "win_rate"]
    assert "train/loss" in header and "wall_time_s" in header
    assert "seed" not in header and "domain" not in header  # seeds are averaged; domain is the same everywhere
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
            for line in lines[2:]}
    assert set(rows) == {("sigmoid", "0.1"), ("ipo", "0.1"), ("ipo", "0.5")}
    sigmoid = dict(zip(header, rows[("sigmoid", "0.1")]))
    # win rates 0.5, 0.6, 0.7: mean 0.6, s.e. = 0.1 / sqrt(3) = 0.0577
    assert sigmoid["win_rate"] == "0.6 ± 0.058"
    assert sigmoid["policy.reward_mean"] == "-1.5 ± 0.29"  # -1, -1.5, -2: s.e. 0.5 / sqrt(3)
    assert sigmoid["runs"] == "3/3"
    ipo = dict(zip(header, rows[("ipo", "0.1")]))
    assert (ipo["runs"], ipo["win_rate"]) == ("1/3", "0.8")  # one seed: no s.e.
    assert dict(zip(header, rows[("ipo", "0.5")]))["win_rate"] == "n/a"  # every run failed: still a row


def test_csv_has_numbers_and_the_failed_runs_are_listed(sweep_dir):
    write_report(sweep_dir, plots=False)
    with open(sweep_dir / "report.csv") as handle:
        rows = {(r["loss"], r["loss.beta"]): r for r in csv.DictReader(handle)}
    assert float(rows[("sigmoid", "0.1")]["win_rate_mean"]) == pytest.approx(0.6)
    assert float(rows[("sigmoid", "0.1")]["win_rate_se"]) == pytest.approx(0.1 / math.sqrt(3))
    assert float(rows[("sigmoid", "0.1")]["train/loss_mean"]) == pytest.approx(0.5)
    assert rows[("ipo", "0.1")]["win_rate_se"] == ""  # undefined for a single seed
    assert (rows[("ipo", "0.1")]["runs"], rows[("ipo", "0.1")]["completed"]) == ("3", "1")
    with open(sweep_dir / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert sorted(r["status"] for r in runs) == ["failed", "failed", "incomplete", "ok", "ok", "ok", "ok"]
    report = (sweep_dir / "report.md").read_text()
    assert "## Failed or incomplete runs (3)" in report
    assert "non-finite loss in train batch 3" in report and "more detail" not in report  # first line only
    assert "seed=2 | incomplete" in report
    assert "7 runs: 4 completed, 2 failed, 1 incomplete; 3 configurations." in report
    assert "`domain=bandit`" in report


def test_plots_are_pngs_from_summaries_and_csv_logs(sweep_dir, tmp_path):
    result = write_report(sweep_dir, out_dir=tmp_path / "out")
    names = {p.name for p in result["pictures"]}
    assert {"beta_win_rate.png", "beta_policy_reward_mean.png", "curves_train_loss.png",
            "curves_train_rewards_accuracies.png"} <= names
    for picture in result["pictures"]:
        assert picture.parent == tmp_path / "out" and picture.read_bytes()[:4] == b"\x89PNG"
    assert "![beta_win_rate](beta_win_rate.png)" in (tmp_path / "out" / "report.md").read_text()
    assert not (sweep_dir / "report.md").exists()


def test_a_broken_summary_is_listed_as_failed(sweep_dir):
    folder = _run(sweep_dir, ["domain=bandit", "loss=sigmoid", "loss.beta=0.1", "seed=9"])
    (folder / "summary.json").write_text('{"eval": ')  # cut short
    sweep = build_sweep(sweep_dir)
    broken = next(r for r in sweep.runs if r.path == folder)
    assert broken.status == "failed" and "not valid JSON" in broken.error
    assert next(g for g in sweep.groups if g.config["loss"] == "sigmoid").stat("win_rate")[2] == 3


def test_runs_without_hydra_files_are_grouped_by_their_summary(tmp_path):
    for seed, win in [(0, 0.25), (1, 0.75)]:
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(_summary("hinge", 0.2, seed, win, -1.0, 0.1)))
    sweep = build_sweep(tmp_path)
    assert len(sweep.groups) == 1 and sweep.fixed["loss"] == "hinge"
    assert sweep.groups[0].stat("win_rate")[:2] == pytest.approx((0.5, 0.25))


def test_cli_prints_the_table_and_reports_errors(sweep_dir, tmp_path, capsys):
    main([str(sweep_dir), "--no-plots"])
    out = capsys.readouterr().out
    assert out.startswith("| loss | loss.beta | runs |") and "3 failed or incomplete runs" in out
    assert not list(sweep_dir.glob("*.png"))
    (tmp_path / "empty").mkdir()
    for folder, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no runs")]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(PrefoptError, match="holds no runs"):
        build_sweep(tmp_path / "empty")

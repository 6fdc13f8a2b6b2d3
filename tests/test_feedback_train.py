"""feedback=pairs|binary|ranking|scores through prefopt.train (bandit domain), the sweep, and feedback files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.feedback.data import TensorRankings, TensorSamples
from prefopt.feedback.files import load_feedback
from prefopt.train import train

SMALL = ["domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=16",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


@pytest.mark.parametrize("overrides,metrics", [
    (["feedback=binary"], ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]),
    (["feedback=binary", "loss=apo_zero_unpaired", "reference=sync"], ["rewards/margins"]),
    (["feedback=ranking", "loss=plackett_luce"], ["rewards/accuracies", "rewards/margins"]),
    (["feedback=ranking", "loss=simpo", "reference=none"], ["rewards/accuracies"]),
    (["feedback=scores"], ["rewards/accuracies"]),
    (["feedback=scores", "feedback.to=ranking", "feedback.group_size=3", "loss=ipo"], ["rewards/accuracies"]),
    (["loss=kto"], ["kl", "rewards/accuracies"]),  # pairs split into desirable and undesirable samples
])
def test_each_feedback_kind_trains_through_train(make_config, overrides, metrics):
    cfg = make_config(*overrides, *SMALL)
    summary = train(cfg)
    assert summary["feedback"] == cfg.feedback.kind
    for key in metrics:
        assert summary["train"][f"train/{key}"] == pytest.approx(summary["train"][f"train/{key}"])  # logged, finite
    assert 0.0 <= summary["eval"]["win_rate"] <= 1.0


def test_sample_counts_follow_the_pair_budget(make_config):
    from hydra.utils import instantiate

    from prefopt.feedback.train import round_dataloader, round_feedback

    cfg = make_config("feedback=ranking", *SMALL)
    task = instantiate(cfg.domain.task)
    data = round_feedback(cfg, task, task.build_policy(), 0)
    assert isinstance(data, TensorRankings) and len(data) == 2 * 64 // 4 and data.k == 4
    reward = task.reward(data.shared["obs"][:, 0][:, None], data.items["actions"][:, :, 0])
    assert bool((reward[:, :-1] >= reward[:, 1:]).all())  # the oracle ranks best first
    cfg = make_config("feedback=binary", *SMALL, subdir="b")
    data = round_feedback(cfg, task, task.build_policy(), 0)
    assert isinstance(data, TensorSamples) and len(data) == 128 and int(data.label.sum()) == 64  # median split
    # a batch holds as many samples as a batch of 16 pairs: 32 single samples, or 8 rankings of 4
    assert round_dataloader(cfg, task, data).batch_size == 32 and task.batch_size == 16
    assert round_dataloader(cfg, task, TensorRankings({"a": torch.zeros(8, 4, 1)})).batch_size == 8


@pytest.mark.parametrize("overrides,match", [
    (["feedback=binary", "loss=sigmoid"], r"loss_type \(feedback=binary\)='sigmoid' is not supported; allowed: kto"),
    (["feedback=ranking", "loss=kto"], "trains on binary feedback"),
    (["feedback=binary", "reference=none"], "needs a reference model"),
    (["feedback=scores", "feedback.rule=median"], "feedback.rule='median' is not supported"),
    (["feedback=ranking", "feedback.group_size=1"], "feedback.group_size=1 is not supported"),
    (["feedback=binary", "+loss.label_smoothing=0.1"], "not used by loss_type 'kto'"),
    (["feedback=ranking", "reference=precomputed"], "reference=precomputed caches pair batches only"),
])
def test_bad_feedback_options_fail_before_training(make_config, overrides, match):
    with pytest.raises(PrefoptError, match=match):
        train(make_config(*overrides, *SMALL))


def test_multirun_sweeps_the_feedback_kinds(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = ["-m", "domain=bandit", "feedback=pairs,binary,ranking", *SMALL, "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run([sys.executable, "-m", "prefopt.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = sorted(json.loads(p.read_text())["feedback"] for p in (tmp_path / "sweep").rglob("summary.json"))
    assert kinds == ["binary", "pairs", "ranking"]


# ------------------------------------------------------------------------------------------- files
def _write(path: Path, rows: list[dict]):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".npz":
        np.savez(path, **{k: np.asarray([r[k] for r in rows]) for k in rows[0]})
    else:
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _bandit_rows(kind: str, n: int = 32, k: int = 3):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        obs = torch.randn(1, 4, generator=g).tolist()
        if kind == "binary":
            rows.append({"obs": obs, "sample_actions": torch.rand(1, 2, generator=g).tolist(), "label": i % 2})
        else:
            row = {"obs": obs, "sample_actions": torch.rand(k, 1, 2, generator=g).tolist()}
            row["scores" if kind == "scores" else "tie"] = (
                torch.randn(k, generator=g).tolist() if kind == "scores" else [False] * (k * (k - 1) // 2))
            rows.append(row)
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".npz", ""])
@pytest.mark.parametrize("kind", ["binary", "ranking", "scores"])
def test_feedback_files_round_trip(tmp_path, kind, suffix):
    rows = _bandit_rows(kind)
    path = _write(tmp_path / f"data{suffix or '_folder'}{suffix}", rows)
    loaded = load_feedback(kind, path)
    if kind == "binary":
        assert loaded.label.tolist() == [r["label"] for r in rows]
        assert torch.allclose(loaded.items["actions"], torch.tensor([r["sample_actions"] for r in rows]))
    elif kind == "ranking":
        assert loaded.k == 3 and torch.allclose(loaded.shared["obs"], torch.tensor([r["obs"] for r in rows]))
    else:
        assert torch.allclose(loaded.rewards, torch.tensor([r["scores"] for r in rows], dtype=torch.float64))


def test_a_feedback_file_trains_the_bandit(make_config, tmp_path):
    path = _write(tmp_path / "scores.jsonl", _bandit_rows("scores"))
    summary = train(make_config("feedback=scores", f"feedback.path={path}", "feedback.rule=all_pairs", *SMALL))
    assert summary["eval"]["num_pairs"] == 32 * 3  # all pairs of the 32 groups of 3


@pytest.mark.parametrize("kind,rows,match", [
    # binary label not 0/1/bool
    ("binary", [{"sample_actions": [0.0], "label": 1}, {"sample_actions": [1.0], "label": "yes"}],
     r"row 1, column 'label' holds str 'yes'; allowed: 0, 1, true or false"),
    ("binary", [{"sample_actions": [0.0], "label": 1}, {"sample_actions": [1.0], "label": 0.5}],
     r"row 1, column 'label' is not 0 or 1; allowed: 0, 1, true or false"),
    ("binary", [{"sample_actions": [0.0], "label": [1]}], r"row 0, column 'label' has shape \[1\]; allowed: 0, 1"),
    # scores not numbers, or the wrong number of them
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [1.0, 2.0]},
                {"sample_actions": [[0.0], [1.0]], "scores": [1.0, "high"]}],
     r"row 1, column 'scores' holds str 'high'; allowed: a list of K = 2 finite numbers per row"),
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [True, False]}], r"row 0, column 'scores' holds booleans"),
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [1.0, 2.0]},
                {"sample_actions": [[0.0], [1.0]], "scores": [1.0, 2.0, 3.0]}],
     r"row 1, column 'scores' has shape \[3\] but row 0 has \[2\]; allowed: a list of K = 2"),
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [1.0, 2.0]},
                {"sample_actions": [[0.0], [1.0]], "scores": [1.0, float("inf")]}],
     r"row 1, column 'scores' contains NaN or inf"),
    # ranking tie of the wrong length or type
    ("ranking", [{"sample_actions": [[0.0], [1.0], [2.0]], "tie": [False, True]}],
     r"row 0, column 'tie' has shape \[2\]; allowed: a list of K\(K-1\)/2 = 3 booleans"),
    ("ranking", [{"sample_actions": [[0.0], [1.0]], "tie": [0]}, {"sample_actions": [[0.0], [1.0]], "tie": [2]}],
     r"row 1, column 'tie' holds values other than booleans or 0/1"),
    ("ranking", [{"sample_actions": [[0.0], [1.0]], "tie": [None]}], r"row 0, column 'tie' holds NoneType 'None'"),
    # a sample or condition column of the wrong type
    ("binary", [{"sample_actions": [0.0], "label": 1}, {"sample_actions": ["left"], "label": 0}],
     r"row 1, column 'sample_actions' holds str 'left'; allowed: numbers, booleans and \(nested\) lists"),
    ("binary", [{"sample_actions": [0.0], "obs": {"x": 1}, "label": 1}], r"row 0, column 'obs' holds dict"),
    ("ranking", [{"sample_actions": [[0.0, 1.0], [1.0]]}], r"row 0, column 'sample_actions' holds nested lists of "
                                                          r"different shapes"),
])
def test_wrong_column_types_name_the_file_row_and_column(tmp_path, kind, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrefoptError, match=match) as info:
        load_feedback(kind, path)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")


def test_wrong_column_types_in_parquet_and_npz(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sample_actions": [[0.0], [1.0]], "label": ["1", "0"]}), tmp_path / "b.parquet")
    with pytest.raises(PrefoptError, match=r"b.parquet: row 0, column 'label' holds str '1'"):
        load_feedback("binary", tmp_path / "b.parquet")
    np.savez(tmp_path / "s.npz", sample_actions=np.zeros((2, 2, 1)), scores=np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(PrefoptError, match=r"s.npz: row 0, column 'scores' holds str_ 'a'"):
        load_feedback("scores", tmp_path / "s.npz")


@pytest.mark.parametrize("kind,rows,match", [
    ("binary", [{"sample_actions": [0.0, 1.0]}], "needs a 'label' column"),
    ("binary", [{"sample_actions": [0.0], "label": 2}], "row 0, column 'label' is not 0 or 1"),
    ("binary", [{"obs": [1.0], "label": 1}], "needs at least one sample_<key> column"),
    ("ranking", [{"sample_actions": [[0.0], [1.0]]}, {"sample_actions": [[0.0]]}],
     r"row 1, column 'sample_actions' has shape \[1, 1\] but row 0 has \[2, 1\]"),
    ("ranking", [{"sample_actions": [[0.0]]}], "K=1 samples"),
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [1.0]}],
     r"row 0, column 'scores' has shape \[1\]; allowed: a list of K = 2 finite numbers"),
    ("scores", [{"sample_actions": [[0.0], [1.0]], "scores": [1.0, float("nan")]}], "NaN or inf"),
])
def test_schema_errors_are_one_clear_line(tmp_path, kind, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrefoptError, match=match) as info:
        load_feedback(kind, path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PrefoptError, match="no such file"):
        load_feedback("binary", tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PrefoptError, match="suffix '.csv' is not supported"):
        load_feedback("binary", tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text("{not json}\n")
    with pytest.raises(PrefoptError, match="line 1 is not a JSON object"):
        load_feedback("binary", tmp_path / "y.jsonl")


def test_a_binary_file_keeps_the_policys_conditions(tmp_path):
    from types import SimpleNamespace

    from prefopt.feedback.train import round_feedback

    rows = [{"sample_obs": [[0.0, 1.0]], "sample_actions": [[0.5]], "label": i % 2} for i in range(4)]
    path = _write(tmp_path / "segments.jsonl", rows)
    cfg = {"feedback": {"kind": "binary", "path": str(path)}}
    data = round_feedback(cfg, SimpleNamespace(rounds=1), SimpleNamespace(sample_conditions=("obs", "mask")), 0)
    # a control file writes sample_obs; the observations are what the actions are judged given
    assert sorted(data.items) == ["actions"] and sorted(data.condition) == ["obs"]
    assert data.label.tolist() == [0, 1, 0, 1]
    plain = round_feedback(cfg, SimpleNamespace(rounds=1), SimpleNamespace(), 0)
    assert sorted(plain.items) == ["actions", "obs"] and plain.condition == {}

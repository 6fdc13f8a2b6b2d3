"""The shared evaluation statistics (prefopt.metrics) and the atomic-write helper (prefopt.atomic)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from prefopt.atomic import atomic_path, atomic_write
from prefopt.metrics import implicit_reward_accuracy, mean_and_se, win_rate


def test_mean_and_se_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3 / 4)
    for values in ([1.0, 2.0, 3.0, 6.0], torch.tensor([1.0, 2.0, 3.0, 6.0]), np.array([1, 2, 3, 6])):
        mean, se = mean_and_se(values)
        assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3 / 4), rel=1e-15)
    assert mean_and_se([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_and_se([])


def test_win_rate_is_head_to_head_with_ties_half():
    result = win_rate(torch.tensor([1.0, 0.0, 0.5, 0.25]), [0.0, 0.0, 1.0, 0.25])
    assert result == {"win_rate": (1 + 0.5 + 0 + 0.5) / 4, "win_rate_strict": 0.25, "tie_rate": 0.5}
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])


def test_implicit_reward_accuracy_by_hand():
    # margins (pc - rc) - (pr - rr): (2-0)-(0-0)=2 > 0; (0-1)-(0-0)=-1; (1-1)-(1-1)=0 (half)
    assert implicit_reward_accuracy([2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]) == 1.5 / 3


def test_metrics_and_report_do_not_import_torch():
    code = ("import sys, prefopt.metrics, prefopt.atomic, prefopt.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]

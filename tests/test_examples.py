"""Every example runs end to end in its fast mode and reaches what it claims."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str, monkeypatch):
    monkeypatch.setenv("PREFOPT_EXAMPLE_FAST", "1")
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timeseries_forecaster_beats_its_reference(monkeypatch):
    example = load_example("timeseries_forecaster", monkeypatch)
    result = example.main()
    assert result["policy_mse"] < result["reference_mse"]
    assert result["win_rate"] > 0.6
    assert math.log(2) > result["final_train_loss"]  # below the loss of an untrained policy (log 2)

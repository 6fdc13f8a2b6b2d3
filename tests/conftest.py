"""Shared test helpers: compose the Hydra config with test-sized settings and output under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from prefopt.cli import config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub in the tests

FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def compose_config(tmp_path: Path, *overrides: str, fast: bool = True):
    """The ``train`` config with output and cache folders under ``tmp_path``, on the seconds-long bandit domain
    unless the overrides pick a domain or an experiment (``prefopt`` itself defaults to the control domain)."""
    picks_domain = any(o.lstrip("+~").startswith(("domain=", "experiment=")) for o in overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*([] if picks_domain else ["domain=bandit"]),
                                           f"paths.output_dir={tmp_path / 'run'}",
                                           f"paths.cache_dir={tmp_path / 'cache'}",
                                           *(FAST if fast else []), *overrides])


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides: str, subdir: str = ""):
        return compose_config(tmp_path / subdir if subdir else tmp_path, *overrides)
    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run much faster on one thread, above all on a busy machine; restored after the module.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""The digits default runs end to end through the Hydra config (tiny settings), and its artefacts are cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt.cache import BUILD_COUNTS
from prefopt.errors import PrefoptError
from prefopt.tasks.diffusion.digits import DigitsDiffusionTask, digit_images, digit_splits
from prefopt.train import train

pytest.importorskip("diffusers")
torch.set_num_threads(1)

TINY = ["domain.task.base.steps=30", "domain.task.base.batch_size=32", "domain.task.base.block_out_channels=[8,16]",
        "domain.task.base.norm_num_groups=4", "domain.task.pairs_per_class=2", "domain.task.eval_per_class=2",
        "domain.task.grid_per_class=2", "domain.task.sample_steps=3", "domain.task.batch_size=8",
        "trainer.max_epochs=1"]


def test_digits_runs_through_hydra_and_reuses_its_cache(make_config, tmp_path):
    cfg = make_config("domain=diffusion", *TINY)
    assert cfg.loss.beta == 2500 and "reference" not in cfg.domain.task  # tasks ask flags, not names
    before = dict(BUILD_COUNTS)
    summary = train(cfg)
    built = {k: BUILD_COUNTS[k] - before.get(k, 0) for k in BUILD_COUNTS}
    assert built.get("diffusion_digits_base") == 1 and built.get("diffusion_digits_candidates") == 1
    assert built.get("diffusion_digits_classifier") == 1  # the judge (the reward is ink)
    ev = summary["eval"]
    assert summary["domain"] == "diffusion" and ev["reward"] == "ink" and ev["eval_reward"] == "thickness"
    assert ev["num_pairs"] == 20 and ev["num_eval"] == 20
    for side in ("reference", "policy"):
        assert 0.0 <= ev[side]["accuracy"] <= 1.0 and ev[side]["reward_mean"] > 0
    assert 0.0 <= ev["win_rate"] <= 1.0
    assert ev["realism_gap"] == pytest.approx(ev["policy"]["accuracy"] - ev["reference"]["accuracy"])
    run = Path(cfg.paths.output_dir)
    assert json.loads((run / "summary.json").read_text())["eval"]["win_rate"] == ev["win_rate"]
    grid = run / ev["grid"]
    from PIL import Image

    with Image.open(grid) as image:  # 10 rows of 2 reference | 2 policy samples, 4x upscaled
        assert image.format == "PNG" and image.width > image.height / 10 * 4

    # a second run with another loss reuses the base model, the candidates and the classifier
    before = dict(BUILD_COUNTS)
    again = train(make_config("domain=diffusion", *TINY, "loss=ipo", "loss.beta=0.1",
                              f"paths.cache_dir={tmp_path / 'cache'}", subdir="ipo"))
    assert all(BUILD_COUNTS[k] == before.get(k, 0) for k in ("diffusion_digits_base", "diffusion_digits_candidates",
                                                             "diffusion_digits_classifier"))
    assert again["eval"]["reference"]["reward_mean"] == ev["reference"]["reward_mean"]  # same base, same noise


def test_digits_through_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "prefopt.cli", "domain=diffusion", f"hydra.run.dir={tmp_path}",
                             f"paths.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false", *TINY],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["domain"] == "diffusion" and (tmp_path / summary["eval"]["grid"]).is_file()
    assert (tmp_path / "policy.safetensors").is_file()


def test_digits_precomputed_reference_and_legibility(make_config):
    cfg = make_config("domain=diffusion", *TINY, "reference=precomputed", "domain.task.reward=legibility")
    summary = train(cfg)
    ev = summary["eval"]
    assert summary["reference"] == "precomputed" and ev["eval_reward"] == "legibility"
    for side in ("reference", "policy"):
        assert 0.0 <= ev[side]["reward_mean"] <= 1.0 and 0.0 <= ev[side]["train_reward_mean"] <= 1.0


def test_digits_lora_reference(make_config):
    summary = train(make_config("domain=diffusion", *TINY, "reference=adapter", "reference.rank=2"))
    assert summary["reference"] == "adapter" and 0.0 <= summary["eval"]["win_rate"] <= 1.0


def test_precomputed_draw_needs_per_example_seeds(tmp_path):
    from prefopt.reference import make_reference

    task = DigitsDiffusionTask(cache_dir=str(tmp_path))
    task.use_reference(make_reference("precomputed"))  # its needs_fixed_draw flag, not its name
    assert task.fixed_draw
    task.use_reference(make_reference("copy"))
    assert not task.fixed_draw
    assert DigitsDiffusionTask(draw="example", cache_dir=str(tmp_path)).fixed_draw


def test_digits_data_and_splits():
    images, labels = digit_images()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1 and images.max() == 1
    assert labels.unique().tolist() == list(range(10))
    splits = digit_splits(len(images))
    sets = [set(v.tolist()) for v in splits.values()]
    assert sum(map(len, sets)) == 1797 and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert digit_images(16)[0].shape == (1797, 1, 16, 16)


@pytest.mark.parametrize("option, value, message", [
    ("reward", "beauty", "domain.task.reward='beauty' is not supported"),
    ("draw", "sometimes", "domain.task.draw='sometimes'"),
    ("base", {"channels": 3}, r"unknown keys \['channels'\]"),
    ("pairs_per_class", 0, "pairs_per_class=0 must be"),
])
def test_digits_bad_options(tmp_path, option, value, message):
    with pytest.raises(PrefoptError, match=message):
        DigitsDiffusionTask(**{option: value}, cache_dir=str(tmp_path))

"""The flow-matching digits default (experiment=diffusion_flow) at tiny sizes, and the titled image grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefopt.cache import BUILD_COUNTS
from prefopt.errors import PrefoptError
from prefopt.tasks.diffusion.grid import panel_titles, save_side_by_side
from prefopt.train import train

pytest.importorskip("diffusers")
torch.set_num_threads(1)

TINY = ["experiment=diffusion_flow", "domain.task.base.steps=30", "domain.task.base.batch_size=32",
        "domain.task.base.num_layers=1", "domain.task.base.num_attention_heads=2", "domain.task.pairs_per_class=2",
        "domain.task.eval_per_class=2", "domain.task.grid_per_class=2", "domain.task.sample_steps=3",
        "domain.task.batch_size=8", "trainer.max_epochs=1"]


def test_flow_digits_runs_through_hydra_and_caches_its_base_model(make_config, tmp_path):
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from prefopt.tasks.diffusion.flow_digits import FlowDigitsDiffusionTask

    cfg = make_config(*TINY)
    assert cfg.domain.task._target_.endswith("FlowDigitsDiffusionTask") and cfg.domain.name == "diffusion_flow"
    before = dict(BUILD_COUNTS)
    summary = train(cfg)
    built = {k: BUILD_COUNTS[k] - before.get(k, 0) for k in BUILD_COUNTS}
    assert built.get("diffusion_flow_base") == 1 and not built.get("diffusion_digits_base")
    ev = summary["eval"]
    assert summary["domain"] == "diffusion_flow" and ev["eval_reward"] == "thickness" and ev["num_eval"] == 20
    assert ev["realism_gap"] == pytest.approx(ev["policy"]["accuracy"] - ev["reference"]["accuracy"])
    run = Path(cfg.paths.output_dir)
    assert json.loads((run / "summary.json").read_text())["eval"]["win_rate"] == ev["win_rate"]

    # the trained policy is the flow DiT; the exported weights load into it and differ from the cached base
    task = FlowDigitsDiffusionTask(base=dict(cfg.domain.task.base), cache_dir=cfg.paths.cache_dir)
    policy = task.build_policy()  # from the cache: no second training
    assert BUILD_COUNTS["diffusion_flow_base"] == before.get("diffusion_flow_base", 0) + 1
    assert isinstance(policy.network, DiTTransformer2DModel) and policy.flow_matching
    assert isinstance(policy.scheduler, FlowMatchEulerDiscreteScheduler) and policy.sampler == "euler"
    from safetensors.torch import load_file

    trained = load_file(str(run / "policy.safetensors"))
    base = policy.network.state_dict()
    assert set(trained) == set(base) and any(not torch.equal(trained[k], base[k]) for k in base)


def test_flow_base_is_deterministic_and_sees_its_class_in_train_mode(tmp_path):
    from prefopt.tasks.diffusion.flow_digits import FlowDigitsDiffusionTask

    task = FlowDigitsDiffusionTask(base={"num_layers": 1, "num_attention_heads": 2}, cache_dir=str(tmp_path))
    network = task.make_policy(task.build_network()).network.train()
    x, t = torch.randn(64, 1, 8, 8), torch.full((64,), 500.0)
    labels = torch.arange(64) % 10
    with torch.no_grad():  # diffusers' DiT drops 10% of the labels in train mode; the adapter switches that off
        first, second = network(x, t, class_labels=labels).sample, network(x, t, class_labels=labels).sample
    assert torch.equal(first, second)
    # the base model's cache key holds every base option (and differs from the DDPM digits model's)
    other = FlowDigitsDiffusionTask(base={"num_layers": 1, "num_attention_heads": 2, "shift": 3.0},
                                    cache_dir=str(tmp_path))
    assert task.base_key() != other.base_key() and task.base_key()["model"] == "dit_flow"
    assert other.build_scheduler().config.shift == 3.0


@pytest.mark.parametrize("option, value, message", [
    ("timestep_sampling", "cosine", "domain.task.timestep_sampling='cosine'"),
    ("loss_weighting", "snr", "domain.task.loss_weighting='snr'"),
    ("base", {"block_out_channels": [8]}, r"unknown keys \['block_out_channels'\]"),
    ("base", {"timestep_sampling": "cosine"}, "domain.task.base.timestep_sampling='cosine'"),
])
def test_flow_digits_bad_options(tmp_path, option, value, message):
    from prefopt.tasks.diffusion.flow_digits import FlowDigitsDiffusionTask

    with pytest.raises(PrefoptError, match=message):
        FlowDigitsDiffusionTask(**{option: value}, cache_dir=str(tmp_path))


def test_grid_panels_are_titled(tmp_path):
    from PIL import Image

    labels = torch.arange(3).repeat_interleave(2)
    images = torch.zeros(6, 1, 8, 8)
    titles = panel_titles("thickness", 1.3474, 1.44, 0.998)
    assert titles == ("reference: thickness 1.347", "policy: thickness 1.440, wins 100%")
    save_side_by_side(images, images, labels, 2, tmp_path / "a.png", titles=titles)
    save_side_by_side(images, images, labels, 2, tmp_path / "b.png", titles=(titles[0], "policy"))
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        a, b = torch.tensor(list(a.convert("L").getdata())).view(a.height, a.width), \
            torch.tensor(list(b.convert("L").getdata())).view(b.height, b.width)
    body = 3 * (8 * 6 + 2) + 2  # three rows of 6x upscaled 8x8 images with 2-pixel padding
    header = a.shape[0] - body
    assert header > 8 and a.shape[0] == b.shape[0]
    half = a.shape[1] // 2
    # black title text above each panel; the samples themselves are black too, the header's background white
    assert (a[:header, :half] < 64).any() and (a[:header, half:] < 64).any()
    assert a[: header // 4].float().mean() > 250  # a white margin above the text
    # same reference title, another policy title: the left header is unchanged, the right one is not
    assert torch.equal(a[:header, : b.shape[1] // 2 - 30], b[:header, : b.shape[1] // 2 - 30])
    assert a.shape[1] != b.shape[1] or not torch.equal(a[:header], b[:header])

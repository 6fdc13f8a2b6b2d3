"""Stable Diffusion, SDXL, SD3 and Flux pipelines in the image-preference path (experiment=diffusion_pickapic),
each a tiny random pipeline saved under tmp_path; and the on-disk cache of VAE latents and text encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefopt.cache import BUILD_COUNTS
from prefopt.errors import PrefoptError
from prefopt.train import train

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch.set_num_threads(1)

from test_diffusion_data import write_pickapic  # noqa: E402
from tiny_pipelines import save_tiny  # noqa: E402

DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def overrides(pipe_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["experiment=diffusion_pickapic", f"domain.task.pretrained={pipe_dir}", f"domain.task.data={data}",
            "domain.task.resolution=32", "domain.task.max_sequence_length=8", "domain.task.batch_size=2",
            "domain.task.val_fraction=0.25", "domain.task.num_samples=2", "domain.task.sample_steps=2",
            "domain.task.eval_draws=2", "domain.task.eval_reward=jpeg_compressibility", "trainer.max_epochs=1",
            "optimizer.lr=1e-2", *extra]


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_pipeline_family_trains_with_lora_on_pickapic(kind, tmp_path, make_config):
    from safetensors import safe_open

    from prefopt.adapters.diffusion_families import family_for
    from prefopt.tasks.diffusion.data import load_pipeline

    pipe_dir = save_tiny(kind, tmp_path / "models")
    write_pickapic(tmp_path / "prefs.parquet", n=8)
    cfg = make_config(*overrides(pipe_dir, tmp_path / "prefs.parquet"))
    summary = train(cfg)
    ev = summary["eval"]
    assert summary["reference"] == "adapter" and ev["num_pairs"] == 6 and ev["num_eval_pairs"] == 2
    assert 0.0 <= ev["implicit_reward_accuracy"] <= 1.0 and 0.0 <= ev["sample_win_rate"] <= 1.0 and len(ev["prompts"]) == 2
    run = Path(cfg.paths.output_dir)
    assert (run / ev["grid"]).read_bytes()[:4] == b"\x89PNG"
    # the export is the pipeline's denoiser with trained LoRA merged into the family's targets only
    denoiser = getattr(load_pipeline(pipe_dir), DENOISER[kind])
    base, targets = denoiser.state_dict(), family_for(denoiser).lora_targets
    with safe_open(str(run / "policy.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "merged-lora"
        trained = {k: handle.get_tensor(k) for k in handle.keys()}
    assert set(trained) == set(base)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.rsplit(".", 1)[0].endswith(targets) for k in changed), sorted(changed)[:4]


def _count_calls(monkeypatch, cls, name: str, counter: dict, key: str) -> None:
    """Count the outermost calls of ``cls.name`` (a CLIP model with projection runs a CLIPTextModel inside)."""
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        counter[key] += counter["depth"] == 0
        counter["depth"] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter["depth"] -= 1

    monkeypatch.setattr(cls, name, counted)


def test_latents_and_text_encodings_are_cached_across_epochs_and_runs(tmp_path, make_config, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from prefopt.tasks.diffusion.text_to_image import ImagePreferenceTask

    calls = {"vae": 0, "text": 0, "depth": 0}
    _count_calls(monkeypatch, AutoencoderKL, "encode", calls, "vae")
    _count_calls(monkeypatch, CLIPTextModel, "forward", calls, "text")
    _count_calls(monkeypatch, CLIPTextModelWithProjection, "forward", calls, "text")
    pipe_dir = save_tiny("sdxl", tmp_path / "models")
    write_pickapic(tmp_path / "prefs.parquet", n=8)
    args = overrides(pipe_dir, tmp_path / "prefs.parquet", "trainer.max_epochs=3")
    before = dict(BUILD_COUNTS)
    train(make_config(*args))
    # one batch of 8 pairs: chosen and rejected through the VAE once each; 8 captions + "" through both text
    # encoders once, for 3 epochs, the validation and the evaluation (its samples reuse the cached captions)
    assert calls == {"vae": 2, "text": 2, "depth": 0}
    assert BUILD_COUNTS["diffusion_latents"] == before.get("diffusion_latents", 0) + 1
    assert BUILD_COUNTS["diffusion_text"] == before.get("diffusion_text", 0) + 1

    calls.update(vae=0, text=0)
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    train(make_config(*args, "loss=ipo", "loss.beta=0.1", cache, subdir="second"))  # another run, same cache
    assert calls == {"vae": 0, "text": 0, "depth": 0}

    # the cached latents are the VAE's (mode of the latent distribution times the scaling factor)
    task = ImagePreferenceTask(pretrained=str(pipe_dir), data=str(tmp_path / "prefs.parquet"), resolution=32,
                               max_sequence_length=8, cache_dir=str(tmp_path / "cache"))
    policy = task.build_policy()
    pairs = task.pairs(policy, 0)
    assert calls == {"vae": 0, "text": 0, "depth": 0}
    from prefopt.tasks.diffusion.data import image_tensor, open_image

    records, train_rows, _ = task._records()
    first = records.chosen[train_rows[0]]
    with torch.no_grad():
        expected = policy.vae.encode(image_tensor(open_image(first, "x"), 32)[None]).latent_dist.mode()
    torch.testing.assert_close(pairs[0]["chosen_latents"], expected[0] * policy.vae.config.scaling_factor)
    caption = records.captions[train_rows[0]]
    with torch.no_grad():
        embeds = task.pipe.encode_prompt([caption], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(pairs[0]["encoder_hidden_states"], embeds[0][0])
    torch.testing.assert_close(pairs[0]["text_embeds"], embeds[2][0])
    # a 20 (wide) x 24 image: shorter side to 32 gives 32 x round(24 * 1.6) = 38 rows, center crop from row 3
    assert pairs[0]["chosen_time_ids"].tolist() == [24, 20, 3, 0, 32, 32]

    # other data: encoded again
    write_pickapic(tmp_path / "other.parquet", n=6)
    calls.update(vae=0, text=0)
    train(make_config(*overrides(pipe_dir, tmp_path / "other.parquet"), cache, subdir="third"))
    assert calls == {"vae": 2, "text": 2, "depth": 0}  # keyed by the data: 6 other pairs, another caption set


def test_unsupported_pipeline_is_named(tmp_path):
    from prefopt.tasks.diffusion.pipelines import pipeline_family

    class OtherPipeline:
        pass

    with pytest.raises(PrefoptError, match="OtherPipeline is not supported .*StableDiffusionXLPipeline"):
        pipeline_family(OtherPipeline())

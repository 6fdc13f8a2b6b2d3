"""Diffusion user data: Pick-a-Pic parquet / datasets folder / images + CSV, and a tiny Stable Diffusion
pipeline saved to tmp_path that loads through the real loading path and trains a few steps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.tasks.diffusion.data import ImagePairs, load_pipeline, load_preference_images
from prefopt.train import train

pytest.importorskip("diffusers")
torch.set_num_threads(1)


def png_bytes(value: int, size: int = 20, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size + 4), (value, 255 - value, value // 2)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_pickapic(path: Path, n: int = 6) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0][:n]
    rows = [{"caption": f"a cat number {i}", "jpg_0": png_bytes(10 * i), "jpg_1": png_bytes(200 - 10 * i, fmt="JPEG"),
             "label_0": labels[i], "label_1": 1.0 - labels[i]} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return rows


def decoded(source) -> tuple:
    from PIL import Image

    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")
    return image.getpixel((0, 0))


def test_parquet_orders_pairs_by_label_and_keeps_ties(tmp_path):
    rows = write_pickapic(tmp_path / "prefs.parquet")
    records = load_preference_images(tmp_path / "prefs.parquet")
    assert len(records) == 6 and records.tie.tolist() == [False, False, True, False, False, False]
    assert records.chosen[0] == rows[0]["jpg_0"] and records.rejected[0] == rows[0]["jpg_1"]  # label_0 = 1
    assert records.chosen[1] == rows[1]["jpg_1"] and records.rejected[1] == rows[1]["jpg_0"]  # label_0 = 0
    assert records.captions[4] == "a cat number 4"
    pairs = ImagePairs(records, resolution=16)
    row = pairs[1]
    assert row["chosen_images"].shape == (3, 16, 16) and row["chosen_images"].min() >= -1
    # the chosen image of pair 1 is jpg_1 (a JPEG of value 190): red channel near 190
    assert abs((row["chosen_images"][0, 0, 0].item() + 1) * 127.5 - 190) < 4


def test_datasets_folder_and_image_features(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    table = {"caption": ["x", "y", "z"], "jpg_0": [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 20, 30)],
             "jpg_1": [Image.new("RGB", (8, 8), (v, v, v)) for v in (110, 120, 130)], "label_0": [0.0, 1.0, 0.5]}
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float32")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(tmp_path / "hf"))
    records = load_preference_images(tmp_path / "hf")
    assert records.tie.tolist() == [False, False, True]
    assert decoded(records.chosen[0]) == (110, 110, 110) and decoded(records.chosen[1]) == (20, 20, 20)
    with pytest.raises(PrefoptError, match="split='test' not found; allowed: train"):
        load_preference_images(tmp_path / "hf", split="test")


def test_folder_with_csv(tmp_path):
    from PIL import Image

    for name, value in (("a.png", 0), ("b.png", 255), ("c.png", 128)):
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text("image_0,image_1,label_0,caption\na.png,b.png,0,dark vs light\n"
                                        "b.png,c.png,1,light vs gray\n")
    records = load_preference_images(tmp_path)
    assert [Path(p).name for p in records.chosen] == ["b.png", "b.png"]
    assert [Path(p).name for p in records.rejected] == ["a.png", "c.png"]
    assert records.captions == ["dark vs light", "light vs gray"]
    (tmp_path / "pairs.csv").write_text("chosen,rejected\nc.png,a.png\n")
    assert [Path(p).name for p in load_preference_images(tmp_path / "pairs.csv").chosen] == ["c.png"]


@pytest.mark.parametrize("content, message", [
    ("image_0,image_1,label_0\na.png,b.png,2\n", r"row 2: label_0='2'; allowed: 1 .*0 .*0.5"),
    ("image_0,image_1,label_0\na.png,missing.png,1\n", r"row 2: image 'missing.png' not found"),
    ("first,second\na.png,a.png\n", r"found columns \['first', 'second'\]; allowed: image_0"),
])
def test_folder_errors_name_the_row(tmp_path, content, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "pairs.csv").write_text(content)
    with pytest.raises(PrefoptError, match=message):
        load_preference_images(tmp_path)


def test_parquet_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"jpg_0": b"x", "jpg_1": b"y"}]), str(tmp_path / "bad.parquet"))
    with pytest.raises(PrefoptError, match=r"missing columns \['label_0'\]"):
        load_preference_images(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"jpg_0": b"x", "jpg_1": b"y", "label_0": 1.0}]),
                   str(tmp_path / "bytes.parquet"))
    records = load_preference_images(tmp_path / "bytes.parquet")
    with pytest.raises(PrefoptError, match="row 0: not a readable image"):
        ImagePairs(records, 8)[0]
    with pytest.raises(PrefoptError, match="no such file"):
        load_preference_images(tmp_path / "nothing.parquet")
    with pytest.raises(PrefoptError, match="model_index.json"):
        load_pipeline(tmp_path)


# ------------------------------------------------------------------------------ tiny SD pipeline
def byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2/CLIP convention)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def save_tiny_sd(path: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = path / "tokenizer_files"
    words.mkdir(parents=True)
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(words), model_max_length=12)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path / "sd"))
    return path / "sd"


def test_tiny_stable_diffusion_trains_on_pickapic_parquet(tmp_path, make_config):
    pipe_dir = save_tiny_sd(tmp_path / "models")
    write_pickapic(tmp_path / "prefs.parquet", n=8)
    cfg = make_config("experiment=diffusion_pickapic", f"domain.task.pretrained={pipe_dir}",
                      f"domain.task.data={tmp_path / 'prefs.parquet'}", "domain.task.batch_size=2",
                      "domain.task.val_fraction=0.25", "domain.task.num_samples=2", "domain.task.sample_steps=2",
                      "domain.task.eval_draws=2", "domain.task.eval_reward=jpeg_compressibility",
                      "trainer.max_epochs=1", "optimizer.lr=1e-2")
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    ev = summary["eval"]
    assert summary["reference"] == "adapter" and summary["domain"] == "diffusion_pickapic"
    assert ev["num_pairs"] == 6 and ev["num_eval_pairs"] == 2
    assert 0.0 <= ev["implicit_reward_accuracy"] <= 1.0 and 0.0 <= ev["policy"]["preference_accuracy"] <= 1.0
    assert 0.0 <= ev["sample_win_rate"] <= 1.0 and len(ev["prompts"]) == 2
    assert (run / ev["grid"]).is_file() and (run / ev["grid"]).read_bytes()[:4] == b"\x89PNG"
    assert summary["train"]["train/loss"] > 0
    # the exported policy is the loaded UNet with trained LoRA merged into the attention projections only
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    base = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet")).state_dict()
    with safe_open(str(run / "policy.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "merged-lora"
        trained = {k: handle.get_tensor(k) for k in handle.keys()}
    assert set(trained) == set(base)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)

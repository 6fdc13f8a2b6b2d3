"""Diffusion user data: Pick-a-Pic parquet / datasets folder / images + CSV (the pipelines that train on it:
tests/test_diffusion_pipelines.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.tasks.diffusion.data import ImagePairs, load_pipeline, load_preference_images

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

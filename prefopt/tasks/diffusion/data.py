"""User data for Diffusion-DPO: preference tables of image pairs, and pipelines from a local folder.

Three layouts of preference data are read (``format="auto"`` tells them apart):

``parquet``
    A Pick-a-Pic style table (``yuvalkirstain/pickapic_v2``): columns ``jpg_0`` and ``jpg_1`` (encoded
    image bytes, or ``{"bytes": ...}`` structs), ``label_0`` (1 = image 0 preferred, 0 = image 1 preferred,
    0.5 = tie; ``label_1``, if present, must be ``1 - label_0``) and ``caption``.
``hf``
    A folder written by ``datasets``' ``save_to_disk`` with the same columns (``jpg_0``/``jpg_1`` may also be
    ``Image`` features). A ``DatasetDict`` folder uses ``split`` (default ``train``).
``folder``
    A folder with image files and a CSV (``pairs.csv``, or the only ``*.csv``; or give the CSV file itself):
    either columns ``image_0, image_1, label_0`` (Pick-a-Pic semantics) or ``chosen, rejected``; an optional
    ``caption`` column. Image paths are relative to the CSV's folder.

Every pair becomes ``chosen`` / ``rejected`` image sources, a caption and a ``tie`` flag (for a tie the
first image is ``chosen`` by convention; the training module drops ties or counts them half, per
``loss.ties``). Images are decoded lazily by :class:`ImagePairs`, so a large table is not held decoded.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from prefopt.data.folders import load_dataset_folder
from prefopt.errors import PrefoptError, check_choice

DATA_FORMATS = ("auto", "parquet", "hf", "folder")
PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0")


@dataclass
class PreferenceRecords:
    """Undecoded preference pairs: each source is encoded bytes, a file path, or a ``PIL.Image``."""

    chosen: list[Any]
    rejected: list[Any]
    captions: list[str]
    tie: torch.Tensor
    source: str
    rows: list[int]  # the row of each pair in the source table (for error messages)

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, indices: Sequence[int]) -> "PreferenceRecords":
        indices = list(indices)
        return PreferenceRecords([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                                 [self.captions[i] for i in indices], self.tie[indices], self.source,
                                 [self.rows[i] for i in indices])


def _label(value: Any, where: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = math.nan
    if label not in (0.0, 0.5, 1.0):
        raise PrefoptError(f"{where}: label_0={value!r}; allowed: 1 (first image preferred), 0 (second), 0.5 (tie)")
    return label


def _image_value(value: Any, where: str) -> Any:
    if isinstance(value, dict):  # a datasets/pyarrow Image struct: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise PrefoptError(f"{where}: the image is missing")
    if not isinstance(value, (bytes, bytearray, str, Path)) and not hasattr(value, "convert"):  # a PIL image
        raise PrefoptError(f"{where}: is {type(value).__name__}; allowed: encoded image bytes, an image file path or "
                           "a {'bytes': ...} image struct")
    return value


def _from_pickapic_rows(rows: Sequence[dict[str, Any]], source: str) -> PreferenceRecords:
    chosen, rejected, captions, tie, kept = [], [], [], [], []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        label = _label(row["label_0"], where)
        if "label_1" in row and row["label_1"] is not None and abs(float(row["label_1"]) - (1.0 - label)) > 1e-6:
            raise PrefoptError(f"{where}: label_0={row['label_0']!r} and label_1={row['label_1']!r} do not sum to 1")
        first, second = _image_value(row["jpg_0"], where + " jpg_0"), _image_value(row["jpg_1"], where + " jpg_1")
        chosen.append(second if label == 0.0 else first)
        rejected.append(first if label == 0.0 else second)
        caption = row.get("caption")
        captions.append("" if caption is None else str(caption))
        tie.append(label == 0.5)
        kept.append(i)
    return PreferenceRecords(chosen, rejected, captions, torch.tensor(tie, dtype=torch.bool), source, kept)


def _check_columns(columns: Sequence[str], source: str) -> None:
    missing = [c for c in PICKAPIC_COLUMNS if c not in columns]
    if missing:
        raise PrefoptError(f"{source}: missing columns {missing}; found {sorted(columns)}; a Pick-a-Pic style "
                           "table needs jpg_0, jpg_1 (images), label_0 (1, 0 or 0.5) and optionally caption")


def load_parquet(path: Path) -> PreferenceRecords:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as err:  # pyarrow raises several types for a bad file
        raise PrefoptError(f"{path}: not a readable parquet file ({err})") from None
    _check_columns(table.column_names, str(path))
    wanted = [c for c in (*PICKAPIC_COLUMNS, "label_1", "caption") if c in table.column_names]
    return _from_pickapic_rows(table.select(wanted).to_pylist(), str(path))


def load_hf_folder(path: Path, split: str = "train") -> PreferenceRecords:
    dataset = load_dataset_folder(path, split)
    _check_columns(dataset.column_names, str(path))
    wanted = [c for c in (*PICKAPIC_COLUMNS, "label_1", "caption") if c in dataset.column_names]
    # Decode nothing yet: Image features come back as {"bytes", "path"} structs.
    from datasets import Image as ImageFeature

    for column in ("jpg_0", "jpg_1"):
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return _from_pickapic_rows(dataset.select_columns(wanted).to_list(), str(path))


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "pairs.csv").is_file():
        return path / "pairs.csv"
    found = sorted(path.glob("*.csv"))
    if len(found) != 1:
        raise PrefoptError(f"{path}: expected pairs.csv or exactly one *.csv file in the folder; found "
                           f"{[p.name for p in found] or 'none'}")
    return found[0]


def load_folder(path: Path) -> PreferenceRecords:
    table = _find_csv(path)
    root = table.parent
    try:
        with open(table, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError:
        raise PrefoptError(f"{table}: is not UTF-8 text; the pairs table must be a UTF-8 CSV file") from None
    except OSError as err:
        raise PrefoptError(f"{table}: cannot be read ({err.strerror or type(err).__name__})") from None
    if {"chosen", "rejected"} <= set(columns):
        mode = "chosen"
    elif {"image_0", "image_1", "label_0"} <= set(columns):
        mode = "pickapic"
    else:
        raise PrefoptError(f"{table}: found columns {columns}; allowed: image_0, image_1, label_0 (1, 0 or 0.5) "
                           "or chosen, rejected; plus an optional caption")
    chosen, rejected, captions, tie = [], [], [], []
    for i, row in enumerate(rows):
        where = f"{table} row {i + 2}"  # row 1 is the header
        if mode == "chosen":
            first, second, label = row["chosen"], row["rejected"], 1.0
        else:
            first, second, label = row["image_0"], row["image_1"], _label(row["label_0"], where)
        paths = []
        for name in (first, second):
            if not name:
                raise PrefoptError(f"{where}: an image path is empty")
            file = (root / name).resolve()
            if not file.is_file():
                raise PrefoptError(f"{where}: image {name!r} not found (looked for {file})")
            paths.append(str(file))
        chosen.append(paths[1] if label == 0.0 else paths[0])
        rejected.append(paths[0] if label == 0.0 else paths[1])
        captions.append(row.get("caption") or "")
        tie.append(label == 0.5)
    return PreferenceRecords(chosen, rejected, captions, torch.tensor(tie, dtype=torch.bool), str(table),
                             list(range(2, len(rows) + 2)))


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.suffix == ".csv":
            return "folder"
    elif path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        if list(path.glob("*.csv")):
            return "folder"
        if list(path.glob("*.parquet")):
            return "parquet"
    else:
        raise PrefoptError(f"preference data {path}: no such file or folder")
    raise PrefoptError(f"preference data {path}: cannot tell its format; allowed: a .parquet file (or a folder of "
                       "them), a datasets save_to_disk folder, or a folder with image files and a CSV; or set "
                       "the format explicitly")


def load_preference_images(path: str | Path, format: str = "auto", split: str = "train") -> PreferenceRecords:
    """Read image preference pairs from ``path`` (see the module docstring for the layouts)."""
    check_choice("data_format", format, DATA_FORMATS)
    path = Path(path).expanduser()
    if not path.exists():
        raise PrefoptError(f"preference data {path}: no such file or folder")
    format = detect_format(path) if format == "auto" else format
    if format == "parquet":
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        if not files:
            raise PrefoptError(f"{path}: no .parquet files")
        parts = [load_parquet(f) for f in files]
        if len(parts) == 1:
            records = parts[0]
        else:
            records = PreferenceRecords(
                [x for p in parts for x in p.chosen], [x for p in parts for x in p.rejected],
                [x for p in parts for x in p.captions], torch.cat([p.tie for p in parts]), str(path),
                [x for p in parts for x in p.rows])
    elif format == "hf":
        records = load_hf_folder(path, split)
    else:
        records = load_folder(path)
    if len(records) == 0:
        raise PrefoptError(f"{path}: no preference pairs found")
    return records


# ------------------------------------------------------------------------------------- images
def open_image(source: Any, where: str):
    """A ``PIL.Image`` in RGB from bytes, a path or an image."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = f" ({source})" if isinstance(source, (str, Path)) else ""
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS PIL warns, over twice that it refuses: both refused
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray)):
                image = Image.open(io.BytesIO(source))
            elif isinstance(source, (str, Path)):
                image = Image.open(source)
            else:
                image = source
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PrefoptError(f"{where}{name}: the image is too large to decode safely ({str(err).splitlines()[0]}); "
                           f"images over PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels are refused "
                           "(a decompression bomb?); resize it, or raise that limit in Python") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PrefoptError(f"{where}{name}: not a readable image ({err})") from None
    return image.convert("RGB")


def image_tensor(image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, center-crop a square, scale to ``[-1, 1]``: ``[3, R, R]``."""
    return prepare_image(image, resolution)[0]


def prepare_image(image, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """:func:`image_tensor` and the geometry SDXL conditions on: original (height, width), crop (top, left)."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (array.permute(2, 0, 1) / 127.5 - 1.0).contiguous(), (height, width, top, left)


class ImagePairs(Dataset):
    """Pair-batch rows (see :mod:`prefopt.policy`) from :class:`PreferenceRecords`, decoded on access.

    Row ``i``: ``chosen_images`` / ``rejected_images`` ``[3, R, R]``, ``input_ids`` (the tokenized
    caption, when a tokenizer is given), ``tie``, ``index``, with ``seeds`` the example's ``seed`` and with
    ``geometry`` each image's original (height, width) and crop (top, left) (``chosen_geometry``...).
    """

    def __init__(self, records: PreferenceRecords, resolution: int, tokenizer=None,
                 seeds: torch.Tensor | None = None, geometry: bool = False):
        self.records, self.resolution, self.seeds, self.geometry = records, int(resolution), seeds, geometry
        self.input_ids = None
        if tokenizer is not None:
            self.input_ids = tokenizer(records.captions, padding="max_length", truncation=True,
                                       max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        where = f"{self.records.source} row {self.records.rows[i]}"
        row = {"tie": self.records.tie[i], "index": torch.tensor(i, dtype=torch.int64)}
        for side, source in (("chosen", self.records.chosen[i]), ("rejected", self.records.rejected[i])):
            image, geometry = prepare_image(open_image(source, where), self.resolution)
            row[f"{side}_images"] = image
            if self.geometry:
                row[f"{side}_geometry"] = torch.tensor(geometry, dtype=torch.int64)
        if self.input_ids is not None:
            row["input_ids"] = self.input_ids[i]
        if self.seeds is not None:
            row["seed"] = self.seeds[i]
        return row


class EncodedPairs(Dataset):
    """Pair-batch rows from encodings computed once (see :mod:`prefopt.tasks.diffusion.text_to_image`).

    Args:
        chosen, rejected: latents ``[P, C, h, w]`` of each pair's images.
        text: per-caption conditioning tensors ``[U, ...]`` (shared by both rows of a pair).
        caption_index: ``[P]``, the row of ``text`` of each pair.
        per_image: per-image conditioning, ``{key: (chosen [P, ...], rejected [P, ...])}`` (SDXL's ``time_ids``).
        tie, seeds: as in :class:`ImagePairs`.
    """

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, text: dict[str, torch.Tensor],
                 caption_index: torch.Tensor, tie: torch.Tensor, per_image: dict | None = None,
                 seeds: torch.Tensor | None = None):
        self.chosen, self.rejected, self.text, self.caption_index = chosen, rejected, text, caption_index
        self.tie, self.per_image, self.seeds = tie, dict(per_image or {}), seeds

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {"chosen_latents": self.chosen[i], "rejected_latents": self.rejected[i], "tie": self.tie[i],
               "index": torch.tensor(i, dtype=torch.int64)}
        for key, value in self.text.items():
            row[key] = value[self.caption_index[i]]
        for key, (chosen, rejected) in self.per_image.items():
            row["chosen_" + key], row["rejected_" + key] = chosen[i], rejected[i]
        if self.seeds is not None:
            row["seed"] = self.seeds[i]
        return row


# ---------------------------------------------------------------------------------- cache keys
def _source_digest(source: Any, sha) -> None:
    if isinstance(source, (bytes, bytearray)):
        sha.update(b"b")
        sha.update(bytes(source))
    elif isinstance(source, (str, Path)):
        stat = Path(source).stat()
        sha.update(f"p{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:  # a decoded PIL image
        sha.update(b"i")
        sha.update(source.tobytes())


def records_fingerprint(records: PreferenceRecords) -> str:
    """A hash of the pairs' images (bytes, or path + size + modification time) and captions, in order."""
    import hashlib

    sha = hashlib.sha256()
    for chosen, rejected, caption in zip(records.chosen, records.rejected, records.captions):
        _source_digest(chosen, sha)
        _source_digest(rejected, sha)
        sha.update(caption.encode() + b"\0")
    return sha.hexdigest()[:32]


def folder_fingerprint(path: str | Path) -> list[tuple[str, int, int]]:
    """``(name, size, modification time)`` of every file under a model folder: a cheap key for its weights."""
    path = Path(path)
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in files]


# ----------------------------------------------------------------------------------- pipelines
def load_pipeline(path: str | Path):
    """A diffusers pipeline from a local folder (``save_pretrained`` layout with ``model_index.json``).

    Nothing is downloaded: ``local_files_only=True``. Returns the pipeline; its ``unet``, ``vae``,
    ``text_encoder``, ``tokenizer`` and ``scheduler`` are what the tasks use.
    """
    from diffusers import DiffusionPipeline

    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        raise PrefoptError(f"pretrained={str(path)!r}: expected a local pipeline folder with model_index.json "
                           "(as written by save_pretrained); models are never downloaded at run time")
    try:
        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise PrefoptError(f"pretrained={str(path)!r}: could not load the pipeline ({err})") from None

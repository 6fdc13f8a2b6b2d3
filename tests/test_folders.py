"""The one reader of `datasets` folders that the control, diffusion and sequence loaders share."""

from __future__ import annotations

import pytest

from prefopt.data.folders import load_dataset_folder
from prefopt.errors import PrefoptError

datasets = pytest.importorskip("datasets")


def test_splits_are_picked_named_or_refused(tmp_path):
    rows = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_dataset_folder(tmp_path / "dd", "test")["x"] == [1]
    with pytest.raises(PrefoptError, match=r"split=None not found; allowed: train, test"):
        load_dataset_folder(tmp_path / "dd")
    datasets.DatasetDict({"only": rows}).save_to_disk(str(tmp_path / "one"))
    assert load_dataset_folder(tmp_path / "one")["x"] == [1, 2, 3]  # the only split needs no name
    rows.save_to_disk(str(tmp_path / "plain"))  # a single Dataset has no splits: `split` is not consulted
    assert load_dataset_folder(tmp_path / "plain", "train")["x"] == [1, 2, 3]


def test_a_folder_datasets_cannot_read_is_named(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.json").write_text("{not json")
    with pytest.raises(PrefoptError, match=r"junk: cannot be read as a datasets folder"):
        load_dataset_folder(tmp_path / "junk")
    with pytest.raises(PrefoptError, match=r"missing: cannot be read"):
        load_dataset_folder(tmp_path / "missing")

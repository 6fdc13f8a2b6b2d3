"""Binary, ranking and score feedback read from files: JSON lines, parquet, ``.npz`` or a ``datasets`` folder.

A file is a table of named columns, one row per sample (binary) or per group (ranking, scores). Columns
named ``sample_<key>`` hold what is judged; ``<key>`` is the name the domain's adapter reads (``actions``
and ``obs`` for control and the bandit, ``images`` and ``class_labels`` for diffusion, ...). Every other
column, apart from the kind's own columns below, is a condition shared by the row's samples. Values are
numbers or nested lists of numbers of one shape per column; floats become float32, integers int64,
booleans bool.

=========  ==================================================================================================
kind       columns
=========  ==================================================================================================
binary     ``label`` 0/1 or bool (1 desirable); ``sample_<key>`` one sample per row; other columns: condition
ranking    ``sample_<key>``: the group's ``K >= 2`` samples, best first; optional ``tie`` (``K(K-1)/2`` bools
           over the position pairs (0,1), (0,2), ..., (K-2,K-1)); other columns: shared by the group
scores     ``sample_<key>``: the group's ``K >= 2`` samples; ``scores``: ``K`` numbers (higher is better);
           other columns: shared by the group
=========  ==================================================================================================

Suffixes: ``.jsonl`` / ``.json`` (one JSON object a line), ``.parquet``, ``.npz``; a folder is read as a
``datasets`` folder (``save_to_disk``), with ``split`` naming its split when it has several.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefopt.data.folders import load_dataset_folder
from prefopt.errors import PrefoptError
from prefopt.feedback.data import SAMPLE, Groups, TensorRankings, TensorSamples

FILE_KINDS = ("binary", "ranking", "scores")


def read_columns(path: str | Path, split: str | None = None) -> dict[str, Any]:
    """The file's columns as ``name -> list or array``; a clear error for unreadable files."""
    path = Path(path)
    if path.is_dir():
        return load_dataset_folder(path, split).to_dict()
    if not path.exists():
        raise PrefoptError(f"feedback.path={str(path)!r}: no such file or folder")
    if path.suffix in (".jsonl", ".json"):
        columns: dict[str, list] = {}
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PrefoptError(f"{path}: line {number} is not a JSON object ({err.msg})") from None
                if not isinstance(row, dict):
                    raise PrefoptError(f"{path}: line {number} is a {type(row).__name__}; each line must be an object")
                if columns and set(row) != set(columns):
                    raise PrefoptError(f"{path}: line {number} has columns {sorted(row)}; line 1 has {sorted(columns)}")
                for key, value in row.items():
                    columns.setdefault(key, []).append(value)
        return columns
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except Exception as err:  # pyarrow raises several types for a damaged or foreign file
            raise PrefoptError(f"{path}: not a readable parquet file ({err})") from None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    raise PrefoptError(f"feedback.path={str(path)!r}: suffix {path.suffix!r} is not supported; allowed: .jsonl, "
                       ".json, .parquet, .npz, or a datasets folder (save_to_disk)")


VALUES = "numbers, booleans and (nested) lists of them, one shape per column"


class _BadValue(ValueError):
    """A row value that is not a number, a boolean or a rectangular list of them."""


def _shape(value) -> tuple[int, ...]:
    """The shape of one row's value; :class:`_BadValue` says what is wrong with it."""
    if isinstance(value, (bool, int, float, np.bool_, np.number)):
        return ()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.shape
    if isinstance(value, (list, tuple, np.ndarray)):
        shapes = {_shape(item) for item in value}
        if len(shapes) > 1:
            raise _BadValue(f"holds nested lists of different shapes {sorted(shapes)}")
        return (len(value), *(shapes.pop() if shapes else ()))
    raise _BadValue(f"holds {type(value).__name__} {str(value)[:40]!r}")


def _bad_row(path, name: str, values, allowed: str) -> PrefoptError:
    """The error naming the first row of a column whose value has the wrong type or shape."""
    first = None
    for row, value in enumerate(values):
        try:
            shape = _shape(value)
        except _BadValue as err:
            return PrefoptError(f"{path}: row {row}, column {name!r} {err}; allowed: {allowed}")
        if first is None:
            first = shape
        elif shape != first:
            return PrefoptError(f"{path}: row {row}, column {name!r} has shape {list(shape)} but row 0 has "
                                f"{list(first)}; allowed: {allowed} (pad sequences to one length, with a mask column)")
    return PrefoptError(f"{path}: column {name!r} cannot be read as an array; allowed: {allowed}")


def _row_error(path, name: str, rows, what: str, allowed: str) -> PrefoptError:
    """The error naming the first row where ``rows`` (bool ``[N]``) is True."""
    row = int(np.flatnonzero(np.asarray(rows))[0])
    return PrefoptError(f"{path}: row {row}, column {name!r} {what}; allowed: {allowed}")


def _tensor(path, name: str, values, allowed: str = VALUES) -> torch.Tensor:
    """A column as a tensor: floats float32, integers int64, booleans bool; a wrong row is named."""
    try:
        array = np.asarray(values)
    except ValueError:
        array = np.asarray(values, dtype=object)
    if array.dtype.kind not in "biuf":
        raise _bad_row(path, name, values, allowed)
    if array.dtype.kind == "b":
        return torch.from_numpy(array.copy())
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1) if array.ndim else np.isfinite(array)
    if not finite.all():
        raise _row_error(path, name, ~finite, "contains NaN or inf", "finite values")
    return torch.from_numpy(array.astype(np.float32))


def _per_row(path, name: str, tensor: torch.Tensor, shape: tuple[int, ...], allowed: str) -> None:
    """Each row of ``tensor`` must have ``shape``; else the error names row 0 (all rows share one shape here)."""
    if tuple(tensor.shape[1:]) != shape:
        raise PrefoptError(f"{path}: row 0, column {name!r} has shape {list(tensor.shape[1:])}; allowed: {allowed}")


def _split(path, columns: dict[str, Any], own: tuple[str, ...], kind: str):
    if not columns:
        raise PrefoptError(f"{path}: no rows")
    items = {k[len(SAMPLE):]: _tensor(path, k, v) for k, v in columns.items() if k.startswith(SAMPLE)}
    if not items:
        raise PrefoptError(f"{path}: feedback={kind} needs at least one sample_<key> column (what is judged); "
                           f"found columns {sorted(columns)}")
    rest = {k: _tensor(path, k, v) for k, v in columns.items() if not k.startswith(SAMPLE) and k not in own}
    return items, rest


def _group_size(path, items: dict[str, torch.Tensor]) -> int:
    sizes = {k: tuple(v.shape[:2]) if v.dim() >= 2 else None for k, v in items.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise PrefoptError(f"{path}: every sample_<key> column must hold a list of the group's K samples, the "
                           f"same K in every column; got row shapes {sizes}")
    k = next(iter(sizes.values()))[1]
    if k < 2:
        raise PrefoptError(f"{path}: groups of K={k} samples; rankings and scores need K >= 2")
    return k


def _read(path, split, kind: str, own: str, required: str | None = None):
    """The file's columns, its ``sample_<key>`` items and its other columns (without the kind's ``own``);
    ``required`` describes ``own`` when the kind needs it."""
    columns = read_columns(path, split)
    if required is not None and own not in columns:
        raise PrefoptError(f"{path}: feedback={kind} needs a {own!r} column ({required}); "
                           f"found columns {sorted(columns)}")
    return (columns, *_split(path, columns, (own,), kind))


def load_binary(path, split: str | None = None) -> TensorSamples:
    columns, items, condition = _read(path, split, "binary", "label", "1 desirable, 0 undesirable")
    allowed = "0, 1, true or false (1 = desirable), one per row"
    label = _tensor(path, "label", columns["label"], allowed)
    _per_row(path, "label", label, (), allowed)
    if label.dtype != torch.bool and not bool(((label == 0) | (label == 1)).all()):
        raise _row_error(path, "label", ~((label == 0) | (label == 1)).numpy(), "is not 0 or 1", allowed)
    return TensorSamples(items, condition, label.to(torch.int64))


def load_ranking(path, split: str | None = None) -> TensorRankings:
    columns, items, shared = _read(path, split, "ranking", "tie")
    k = _group_size(path, items)
    tie = None
    if "tie" in columns:
        allowed = f"a list of K(K-1)/2 = {k * (k - 1) // 2} booleans (or 0/1) per row"
        tie = _tensor(path, "tie", columns["tie"], allowed)
        _per_row(path, "tie", tie, (k * (k - 1) // 2,), allowed)
        if tie.dtype != torch.bool:
            ok = ((tie == 0) | (tie == 1)).all(dim=1)
            if not bool(ok.all()):
                raise _row_error(path, "tie", (~ok).numpy(), "holds values other than booleans or 0/1", allowed)
            tie = tie.bool()
    return TensorRankings(items, shared, tie)


def load_scores(path, split: str | None = None) -> Groups:
    columns, items, shared = _read(path, split, "scores", "scores", "K numbers per row")
    k = _group_size(path, items)
    allowed = f"a list of K = {k} finite numbers per row, one per sample"
    scores = _tensor(path, "scores", columns["scores"], allowed)
    if scores.dtype == torch.bool:
        raise PrefoptError(f"{path}: row 0, column 'scores' holds booleans; allowed: {allowed}")
    _per_row(path, "scores", scores, (k,), allowed)
    return Groups(items, shared, scores.to(torch.float64))


LOADERS = {"binary": load_binary, "ranking": load_ranking, "scores": load_scores}


def load_feedback(kind: str, path, split: str | None = None):
    """The file at ``path`` read as feedback ``kind`` (see the module docstring for the schema)."""
    if kind not in LOADERS:
        raise PrefoptError(f"feedback={kind} reads no file; allowed with feedback.path: {', '.join(FILE_KINDS)}")
    return LOADERS[kind](path, split)

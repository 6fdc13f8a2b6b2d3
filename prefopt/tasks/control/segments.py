"""Offline datasets of preference pairs of trajectory segments.

A segment is a short stretch of a trajectory: observations ``[H, obs_dim]`` and
actions ``[H, act_dim]`` (continuous, float) or ``[H]`` (discrete, integer).
:class:`SegmentPairs` holds ``N`` pairs of segments, each pair ordered as
(chosen, rejected), all padded to one length ``H``.

File formats
------------
:func:`load_segment_pairs` reads a ``.npz`` archive (loaded with
``allow_pickle=False``; object arrays are refused) or a folder written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. In both the
data is a set of named columns, ``N`` rows each. In a ``.npz`` every array is
rectangular; in a datasets folder a row of a sequence column may have its own
length ``H_i`` and is padded (zeros, mask False) to the longest row. Exactly one
of three layouts must be used, and no other keys may be present:

1. **chosen/rejected** (already ordered):
   ``chosen_obs`` [N, H, obs_dim], ``chosen_actions`` [N, H, act_dim] float or
   [N, H] int, ``rejected_obs``, ``rejected_actions``; optional
   ``chosen_mask``, ``rejected_mask`` [N, H] (bool or 0/1; True = real step) and
   ``tie`` [N] (bool or 0/1).
2. **a/b with label**: ``obs_a``, ``actions_a``, ``obs_b``, ``actions_b``, optional
   ``mask_a``, ``mask_b``, and a required ``label`` [N] with values
   0 (``a`` preferred), 1 (``b`` preferred) or 0.5 (tie). This is the convention of
   :class:`prefopt.data.teachers.Labels`. Ties keep ``a`` as chosen.
3. **segments with rewards** (unlabelled): ``obs`` [N, H, obs_dim], ``actions``,
   ``rewards`` [N, H], optional ``mask`` [N, H]. Random pairs of distinct
   segments are drawn (``num_pairs``, default N, seeded) and labelled with a
   :class:`~prefopt.data.teachers.ScriptedTeacher`; pairs the teacher skips are
   dropped, ties are kept with ``tie = True``.

Observations may be of any real dtype and are stored as float32; integer
actions are stored as int64 and must be non-negative. All values must be
finite, including padding. Float columns of a datasets folder are read through
its numpy formatter, which yields float32 (rewards included).

:func:`save_segment_pairs` writes the chosen/rejected layout (with masks and
``tie``) to either format, so a saved dataset loads back unchanged.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from prefopt.atomic import atomic_path
from prefopt.data.folders import load_dataset_folder
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.errors import PrefoptError

PAIRED_KEYS = ("chosen_obs", "chosen_actions", "rejected_obs", "rejected_actions")
PAIRED_OPTIONAL = ("chosen_mask", "rejected_mask", "tie")
AB_KEYS = ("obs_a", "actions_a", "obs_b", "actions_b", "label")
AB_OPTIONAL = ("mask_a", "mask_b")
SEGMENT_KEYS = ("obs", "actions", "rewards")
SEGMENT_OPTIONAL = ("mask",)
LABEL_VALUES = (0.0, 1.0, 0.5)
UNLABELLED = "segments with rewards"  # the layout that needs a teacher

_LAYOUTS = {
    "chosen/rejected": (PAIRED_KEYS, PAIRED_OPTIONAL),
    "a/b with label": (AB_KEYS, AB_OPTIONAL),
    UNLABELLED: (SEGMENT_KEYS, SEGMENT_OPTIONAL),
}


def _describe_layouts() -> str:
    return "; ".join(
        f"{name}: {', '.join(req)} (optional: {', '.join(opt)})" for name, (req, opt) in _LAYOUTS.items()
    )


# ----------------------------------------------------------------------------------------------
# Array normalisation and checks. ``where`` names the source (file path or "<arrays>").


def _real_array(x, key: str, where: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise PrefoptError(f"{where}: key {key!r} has dtype {arr.dtype}; allowed: bool, int or float numbers")
    return arr


def _pad_rows(x, key: str, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of possibly different lengths -> ([N, H, ...] array, [N, H] mask or None if none padded)."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        return _real_array(x, key, where), None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy(), None
    if not isinstance(x, (Sequence, np.ndarray)):
        raise PrefoptError(f"{where}: key {key!r} has type {type(x).__name__}; allowed: an array or a list of per-row arrays")
    rows = [_real_array(r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else r, f"{key}[{i}]", where)
            for i, r in enumerate(x)]
    if not rows:
        return np.zeros((0,)), None
    tail = rows[0].shape[1:]
    for i, r in enumerate(rows):
        if r.ndim == 0 or r.shape[1:] != tail:
            raise PrefoptError(
                f"{where}: key {key!r} row {i} has shape {r.shape}; every row must be [H_i{''.join(', ' + str(d) for d in tail)}] like row 0"
            )
    lengths = [r.shape[0] for r in rows]
    h = max(lengths)
    dtype = np.result_type(*rows)
    out = np.zeros((len(rows), h) + tail, dtype=dtype)
    mask = np.zeros((len(rows), h), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, (None if min(lengths) == h else mask)


def _first_bad_row(arr: np.ndarray) -> int | None:
    if arr.dtype.kind != "f":
        return None
    ok = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    return None if ok.all() else int(np.argmin(ok))


def _check_finite(arr: np.ndarray, key: str, where: str) -> None:
    row = _first_bad_row(arr)
    if row is not None:
        raise PrefoptError(f"{where}: key {key!r} has NaN or inf in row {row}; all values must be finite")


def _as_mask(arr: np.ndarray, key: str, where: str, shape: tuple[int, int]) -> np.ndarray:
    if arr.shape != shape:
        raise PrefoptError(f"{where}: key {key!r} has shape {arr.shape}; expected {shape} ([N, H] of the segments)")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise PrefoptError(f"{where}: key {key!r} must hold bool or 0/1 values; found others")
        arr = arr != 0
    return arr


def _side(obs, actions, mask, names: tuple[str, str, str], where: str) -> dict[str, np.ndarray]:
    """Normalise one side (obs, actions, mask) of a set of segments; H not yet unified."""
    ko, ka, km = names
    obs, obs_pad = _pad_rows(obs, ko, where)
    actions, act_pad = _pad_rows(actions, ka, where)
    if obs.ndim != 3:
        raise PrefoptError(f"{where}: key {ko!r} has shape {obs.shape}; expected [N, H, obs_dim]")
    if actions.dtype.kind == "f":
        if actions.ndim != 3:
            raise PrefoptError(
                f"{where}: key {ka!r} is float with shape {actions.shape}; expected [N, H, act_dim] (or int [N, H] for discrete actions)"
            )
    elif actions.dtype.kind in "iu":
        if actions.ndim != 2:
            raise PrefoptError(
                f"{where}: key {ka!r} is integer (discrete) with shape {actions.shape}; expected [N, H] (or float [N, H, act_dim])"
            )
    else:
        raise PrefoptError(f"{where}: key {ka!r} has dtype {actions.dtype}; allowed: float (continuous) or int (discrete)")
    if obs.shape[:2] != actions.shape[:2]:
        raise PrefoptError(
            f"{where}: keys {ko!r} {obs.shape} and {ka!r} {actions.shape} disagree on [N, H]; they must match"
        )
    _check_finite(obs, ko, where)
    _check_finite(actions, ka, where)
    if actions.dtype.kind == "i" and (actions < 0).any():
        row = int(np.argmax((actions < 0).any(axis=1)))
        raise PrefoptError(f"{where}: key {ka!r} has a negative discrete action in row {row}; allowed: >= 0")
    n, h = obs.shape[:2]
    full = np.ones((n, h), dtype=bool)
    for pad in (obs_pad, act_pad):
        if pad is not None:
            full &= pad
    if obs_pad is not None or act_pad is not None:
        lo = np.full(n, h) if obs_pad is None else obs_pad.sum(1)
        la = np.full(n, h) if act_pad is None else act_pad.sum(1)
        if (lo != la).any():
            row = int(np.argmax(lo != la))
            raise PrefoptError(f"{where}: row {row} has {lo[row]} steps in {ko!r} but {la[row]} in {ka!r}; they must match")
    obs = obs.astype(np.float32)
    actions = actions.astype(np.float32 if actions.dtype.kind == "f" else np.int64)
    if mask is not None:
        m, _ = _pad_rows(mask, km, where)
        if m.shape[0] == n and m.ndim == 2 and m.shape[1] < h:  # ragged mask rows: pad with False
            m = np.concatenate([m, np.zeros((n, h - m.shape[1]), dtype=m.dtype)], axis=1)
        full &= _as_mask(m, km, where, (n, h))
    return {"obs": obs, "actions": actions, "mask": full}


def _pad_to(arr: np.ndarray, h: int) -> np.ndarray:
    if arr.shape[1] == h:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[1] = (0, h - arr.shape[1])
    return np.pad(arr, pad)


def _check_sides(a: dict, b: dict, names_a: tuple[str, str], names_b: tuple[str, str], where: str) -> None:
    (oa, aa), (ob, ab) = names_a, names_b
    if a["obs"].shape[0] != b["obs"].shape[0]:
        raise PrefoptError(f"{where}: {oa!r} has {a['obs'].shape[0]} rows but {ob!r} has {b['obs'].shape[0]}; they must match")
    if a["obs"].shape[2:] != b["obs"].shape[2:]:
        raise PrefoptError(f"{where}: obs_dim mismatch: {oa!r} {a['obs'].shape} vs {ob!r} {b['obs'].shape}")
    if a["actions"].ndim != b["actions"].ndim or a["actions"].shape[2:] != b["actions"].shape[2:]:
        raise PrefoptError(f"{where}: action shape mismatch: {aa!r} {a['actions'].shape} vs {ab!r} {b['actions'].shape}")
    if (a["actions"].dtype.kind == "f") != (b["actions"].dtype.kind == "f"):
        raise PrefoptError(
            f"{where}: action dtype mismatch: {aa!r} is {a['actions'].dtype} but {ab!r} is {b['actions'].dtype}; both must be float or both int"
        )


# ----------------------------------------------------------------------------------------------


class SegmentPairs(Dataset):
    """``N`` preference pairs of segments, ordered (chosen, rejected), padded to length ``H``.

    Each item is a dict: ``chosen_obs`` float32 [H, obs_dim], ``chosen_actions``
    float32 [H, act_dim] or int64 [H], ``chosen_mask`` bool [H] (True = real step), the
    same three for ``rejected_``, ``tie`` (bool scalar) and ``index`` (int64 scalar,
    the item's position). Batch items with :func:`collate` (torch's default collation).

    Inputs may be arrays/tensors ``[N, H, ...]`` or lists of per-row arrays ``[H_i, ...]``;
    short rows and a shorter side are zero-padded and masked. ``source`` names the origin in
    error messages. ``pair_indices`` (optional, int64 [N, 2]) records, for pairs built from
    segments, which segments became chosen and rejected.
    """

    def __init__(
        self,
        chosen_obs,
        chosen_actions,
        rejected_obs,
        rejected_actions,
        chosen_mask=None,
        rejected_mask=None,
        tie=None,
        *,
        source: str = "<arrays>",
        pair_indices=None,
    ):
        where = str(source)
        c = _side(chosen_obs, chosen_actions, chosen_mask, ("chosen_obs", "chosen_actions", "chosen_mask"), where)
        r = _side(rejected_obs, rejected_actions, rejected_mask, ("rejected_obs", "rejected_actions", "rejected_mask"), where)
        _check_sides(c, r, ("chosen_obs", "chosen_actions"), ("rejected_obs", "rejected_actions"), where)
        n = c["obs"].shape[0]
        if n == 0:
            raise PrefoptError(f"{where}: contains 0 pairs; need at least one")
        h = max(c["obs"].shape[1], r["obs"].shape[1])
        if h == 0:
            raise PrefoptError(f"{where}: segments have length 0; need at least one step")
        for side, prefix in ((c, "chosen"), (r, "rejected")):
            empty = ~side["mask"].any(axis=1)
            if empty.any():
                raise PrefoptError(
                    f"{where}: {prefix} segment in row {int(np.argmax(empty))} has no real step (mask all False); need at least one"
                )
        discrete = c["actions"].dtype.kind != "f"
        act_dtype = torch.int64 if discrete else torch.float32
        self.chosen_obs = torch.from_numpy(_pad_to(c["obs"], h).astype(np.float32))
        self.rejected_obs = torch.from_numpy(_pad_to(r["obs"], h).astype(np.float32))
        self.chosen_actions = torch.from_numpy(_pad_to(c["actions"], h)).to(act_dtype)
        self.rejected_actions = torch.from_numpy(_pad_to(r["actions"], h)).to(act_dtype)
        self.chosen_mask = torch.from_numpy(_pad_to(c["mask"], h))
        self.rejected_mask = torch.from_numpy(_pad_to(r["mask"], h))
        if tie is None:
            self.tie = torch.zeros(n, dtype=torch.bool)
        else:
            t = _real_array(tie.detach().cpu().numpy() if isinstance(tie, torch.Tensor) else tie, "tie", where)
            self.tie = torch.from_numpy(_as_mask(t.reshape(-1) if t.size == n else t, "tie", where, (n,)).copy())
        self.pair_indices = None if pair_indices is None else torch.as_tensor(pair_indices, dtype=torch.int64)
        self.source = where

    # -- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.chosen_obs.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.chosen_obs.shape[1])

    @property
    def obs_dim(self) -> int:
        return int(self.chosen_obs.shape[2])

    @property
    def discrete(self) -> bool:
        """True when actions are integer indices ([H] per segment)."""
        return self.chosen_actions.dtype == torch.int64

    @property
    def act_dim(self) -> int | None:
        """Action vector size; None for discrete actions."""
        return None if self.discrete else int(self.chosen_actions.shape[2])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"SegmentPairs index {i} out of range for {n} pairs")
        i = int(i) % n
        return {
            "chosen_obs": self.chosen_obs[i],
            "chosen_actions": self.chosen_actions[i],
            "chosen_mask": self.chosen_mask[i],
            "rejected_obs": self.rejected_obs[i],
            "rejected_actions": self.rejected_actions[i],
            "rejected_mask": self.rejected_mask[i],
            "tie": self.tie[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """All columns as numpy arrays, in the chosen/rejected file layout."""
        return {
            "chosen_obs": self.chosen_obs.numpy(),
            "chosen_actions": self.chosen_actions.numpy(),
            "chosen_mask": self.chosen_mask.numpy(),
            "rejected_obs": self.rejected_obs.numpy(),
            "rejected_actions": self.rejected_actions.numpy(),
            "rejected_mask": self.rejected_mask.numpy(),
            "tie": self.tie.numpy(),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch :class:`SegmentPairs` items; every segment already has length H, so default collation."""
    return default_collate(items)


# ----------------------------------------------------------------------------------------------


def pair_segments(
    obs,
    actions,
    rewards,
    teacher: ScriptedTeacher,
    mask=None,
    *,
    num_pairs: int | None = None,
    seed: int = 0,
    source: str = "<arrays>",
) -> SegmentPairs:
    """Pair unlabelled segments at random and label each pair with ``teacher``.

    ``num_pairs`` pairs (default N) of two distinct segments are drawn uniformly with
    ``numpy.random.default_rng(seed)``; the teacher sees their ``rewards`` [N, H]
    (padding masked out). Skipped pairs are dropped; if all are, PrefoptError.
    """
    where = str(source)
    if not isinstance(teacher, ScriptedTeacher):
        raise PrefoptError(f"{where}: teacher of type {type(teacher).__name__} is not a ScriptedTeacher")
    seg = _side(obs, actions, mask, ("obs", "actions", "mask"), where)
    rew, rew_pad = _pad_rows(rewards, "rewards", where)
    n, h = seg["obs"].shape[:2]
    if rew.dtype.kind not in "iuf" or rew.ndim != 2:
        raise PrefoptError(f"{where}: key 'rewards' has shape {rew.shape} dtype {rew.dtype}; expected numbers [N, H]")
    if rew.shape[0] != n or rew.shape[1] > h:
        raise PrefoptError(f"{where}: key 'rewards' has shape {rew.shape} but the segments are [N, H] = {(n, h)}")
    rew = _pad_to(rew, h)
    _check_finite(rew, "rewards", where)
    if n < 2:
        raise PrefoptError(f"{where}: has {n} segment(s); pairing needs at least 2")
    num_pairs = n if num_pairs is None else int(num_pairs)
    if num_pairs < 1:
        raise PrefoptError(f"{where}: num_pairs={num_pairs}; allowed: >= 1")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=num_pairs)
    second = (first + rng.integers(1, n, size=num_pairs)) % n  # always a different segment
    m = seg["mask"]
    labels = teacher.label(rew[first], rew[second], m[first], m[second])
    if not labels.keep.any():
        raise PrefoptError(f"{where}: the teacher skipped all {num_pairs} pairs (skip_threshold={teacher.skip_threshold})")
    items = {k: torch.from_numpy(seg[k]) for k in ("obs", "actions", "mask")}
    items["id"] = torch.arange(n)
    ordered = to_pairs(
        {k: v[torch.from_numpy(first)] for k, v in items.items()},
        {k: v[torch.from_numpy(second)] for k, v in items.items()},
        labels,
    )
    c, r = ordered.chosen, ordered.rejected
    return SegmentPairs(
        c["obs"], c["actions"], r["obs"], r["actions"], c["mask"], r["mask"], ordered.tie,
        source=where, pair_indices=torch.stack([c["id"], r["id"]], dim=1),
    )


# ----------------------------------------------------------------------------------------------
# Reading files.


def _is_datasets_folder(p: Path) -> bool:
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def _read_npz(p: Path) -> dict[str, Any]:
    where = str(p)
    try:
        data = np.load(p, allow_pickle=False)
    except ValueError as e:  # pickled / object content, or not an npz at all
        raise PrefoptError(f"{where}: cannot be read as a .npz archive without pickle ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise PrefoptError(f"{where}: cannot be read as a .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise PrefoptError(f"{where}: holds a single array, not a .npz archive of named arrays")
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:
                raise PrefoptError(f"{where}: key {key!r} cannot be loaded without pickle ({e}); store numeric arrays") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:  # e.g. a bad CRC: the file is damaged
                raise PrefoptError(f"{where}: key {key!r} cannot be read ({type(e).__name__}: {e}); the file is damaged") from None
    return out


def _read_datasets(p: Path, split: str | None) -> dict[str, Any]:
    ds = load_dataset_folder(p, split)
    if len(ds) == 0 or not ds.column_names:
        return {}
    cols = ds.with_format("numpy")[:]
    return {k: cols[k] for k in ds.column_names}


def _choose_layout(keys: set[str], where: str) -> str:
    found = ", ".join(sorted(keys)) or "none"
    layout = None
    for name, (req, opt) in _LAYOUTS.items():
        if keys & set(req) - {"label"}:
            layout = name
            break
    if layout is None:
        raise PrefoptError(f"{where}: no known layout; found keys: {found}. Expected one of: {_describe_layouts()}")
    req, opt = _LAYOUTS[layout]
    missing = [k for k in req if k not in keys]
    extra = sorted(keys - set(req) - set(opt))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected keys: {', '.join(extra)}")
        raise PrefoptError(
            f"{where}: {'; '.join(parts)} for the {layout} layout (found: {found}). "
            f"Expected: {', '.join(req)}; optional: {', '.join(opt)}"
        )
    return layout


def _labels_to_swap_tie(label, where: str) -> tuple[np.ndarray, np.ndarray]:
    lab = np.asarray(label)
    if lab.dtype.kind not in "biuf":
        raise PrefoptError(f"{where}: key 'label' has dtype {lab.dtype}; allowed values: 0 (a preferred), 1 (b preferred), 0.5 (tie)")
    lab = lab.astype(np.float64)
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 1:
        raise PrefoptError(f"{where}: key 'label' has shape {lab.shape}; expected [N]")
    bad = ~np.isin(lab, LABEL_VALUES)
    if bad.any():
        row = int(np.argmax(bad))
        raise PrefoptError(
            f"{where}: key 'label' row {row} is {float(lab[row])}; allowed values: 0 (a preferred), 1 (b preferred), 0.5 (tie)"
        )
    return lab == 1.0, lab == 0.5


def load_segment_pairs(
    path: str | os.PathLike,
    teacher: ScriptedTeacher | None = None,
    *,
    num_pairs: int | None = None,
    seed: int = 0,
    split: str | None = None,
) -> SegmentPairs:
    """Load preference pairs of segments from a ``.npz`` file or a datasets folder.

    See the module docstring for the three layouts. ``teacher`` (with ``num_pairs``
    and ``seed``) is required for, and only allowed with, the segments-with-rewards
    layout. ``split`` picks a split of a saved ``DatasetDict`` (optional when it has one).
    """
    cols, layout, where = read_segment_columns(path, split)
    return segment_pairs_from_columns(cols, layout, where, teacher, num_pairs=num_pairs, seed=seed)


def read_segment_columns(path: str | os.PathLike, split: str | None = None) -> tuple[dict[str, Any], str, str]:
    """The columns of a ``.npz`` file or datasets folder, checked, with their layout (its name in the module
    docstring; :data:`UNLABELLED` needs a teacher) and the path as messages name it."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise PrefoptError(f"{where}: no such file or folder")
    if p.is_file() and p.suffix == ".npz":
        cols = _read_npz(p)
    elif _is_datasets_folder(p):
        cols = _read_datasets(p, split)
    else:
        kind = "folder" if p.is_dir() else f"file with suffix {p.suffix!r}"
        raise PrefoptError(
            f"{where}: unknown format ({kind}); allowed: a .npz file or a folder saved by datasets save_to_disk"
        )
    if not cols:
        raise PrefoptError(f"{where}: is empty (no arrays or no rows)")
    layout = _choose_layout(set(cols), where)
    lengths = {k: len(v) for k, v in cols.items() if np.ndim(v) > 0}
    scalars = [k for k, v in cols.items() if np.ndim(v) == 0]
    if scalars:
        raise PrefoptError(f"{where}: key {scalars[0]!r} is a scalar; every key must have one row per example")
    if len(set(lengths.values())) > 1:
        raise PrefoptError(f"{where}: keys have different numbers of rows: {lengths}; they must all match")
    if 0 in lengths.values():
        raise PrefoptError(f"{where}: is empty (0 rows)")
    return cols, layout, where


def segment_pairs_from_columns(cols: dict[str, Any], layout: str, where: str, teacher: ScriptedTeacher | None = None,
                               *, num_pairs: int | None = None, seed: int = 0) -> SegmentPairs:
    """:class:`SegmentPairs` from the columns :func:`read_segment_columns` read (see :func:`load_segment_pairs`)."""
    if layout == UNLABELLED:
        if teacher is None:
            raise PrefoptError(
                f"{where}: holds unlabelled segments (obs, actions, rewards); pass teacher=ScriptedTeacher(...) to label them"
            )
        return pair_segments(
            cols["obs"], cols["actions"], cols["rewards"], teacher, cols.get("mask"),
            num_pairs=num_pairs, seed=seed, source=where,
        )
    if teacher is not None:
        raise PrefoptError(f"{where}: is already labelled ({layout} layout); teacher is only for segments with rewards")
    if layout == "chosen/rejected":
        return SegmentPairs(
            cols["chosen_obs"], cols["chosen_actions"], cols["rejected_obs"], cols["rejected_actions"],
            cols.get("chosen_mask"), cols.get("rejected_mask"), cols.get("tie"), source=where,
        )
    # a/b with label: build unordered, then swap rows where b is preferred.
    swap, tie = _labels_to_swap_tie(cols["label"], where)
    ab = SegmentPairs(
        cols["obs_a"], cols["actions_a"], cols["obs_b"], cols["actions_b"],
        cols.get("mask_a"), cols.get("mask_b"), tie, source=where,
    )
    s = torch.from_numpy(swap)
    for name in ("obs", "actions", "mask"):
        a, b = getattr(ab, f"chosen_{name}"), getattr(ab, f"rejected_{name}")
        sel = s.reshape((-1,) + (1,) * (a.ndim - 1))
        setattr(ab, f"chosen_{name}", torch.where(sel, b, a))
        setattr(ab, f"rejected_{name}", torch.where(sel, a, b))
    return ab


def save_segment_pairs(pairs: SegmentPairs, path: str | os.PathLike) -> Path:
    """Write ``pairs`` in the chosen/rejected layout: ``.npz`` if ``path`` ends so, else a datasets folder."""
    p = Path(path)
    cols = pairs.arrays()
    if p.suffix == ".npz":
        with atomic_path(p) as tmp:
            np.savez(tmp, **cols)
    else:
        import datasets

        datasets.Dataset.from_dict({k: list(v) for k, v in cols.items()}).save_to_disk(str(p))
    return p


__all__ = [
    "AB_KEYS",
    "LABEL_VALUES",
    "PAIRED_KEYS",
    "SEGMENT_KEYS",
    "UNLABELLED",
    "SegmentPairs",
    "collate",
    "load_segment_pairs",
    "pair_segments",
    "read_segment_columns",
    "save_segment_pairs",
    "segment_pairs_from_columns",
]

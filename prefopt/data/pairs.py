"""A dataset of preference pairs held as tensors, yielding pair-batch rows (see :mod:`prefopt.policy`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset, default_collate

from prefopt.data.teachers import OrderedPairs
from prefopt.errors import PrefoptError


class TensorPairs(Dataset):
    """Pairs whose samples are dicts of tensors with the pair on dim 0.

    Row ``i`` is ``{"chosen_<k>": chosen[k][i], "rejected_<k>": rejected[k][i], <shared k>: shared[k][i],
    "tie": tie[i], "index": i}``. ``shared`` holds what both samples of a pair share (a context, a class
    label, a per-example ``seed``).
    """

    def __init__(self, chosen: Mapping[str, torch.Tensor], rejected: Mapping[str, torch.Tensor],
                 shared: Mapping[str, torch.Tensor] | None = None, tie: torch.Tensor | None = None):
        if set(chosen) != set(rejected):
            raise PrefoptError(f"chosen keys {sorted(chosen)} and rejected keys {sorted(rejected)} must match")
        sizes = {k: v.shape[0] for k, v in [*chosen.items(), *(shared or {}).items()]}
        if len(set(sizes.values())) > 1:
            raise PrefoptError(f"pair tensors disagree on the number of pairs: {sizes}")
        for key in chosen:
            c, r = chosen[key], rejected[key]
            if c.shape != r.shape or c.dtype != r.dtype:
                raise PrefoptError(f"chosen_{key} {tuple(c.shape)} {c.dtype} and rejected_{key} {tuple(r.shape)} "
                                   f"{r.dtype} must have the same shape and dtype")
        self.chosen, self.rejected, self.shared = dict(chosen), dict(rejected), dict(shared or {})
        self.size = next(iter(sizes.values())) if sizes else 0
        self.tie = tie.bool() if tie is not None else torch.zeros(self.size, dtype=torch.bool)

    @classmethod
    def from_ordered(cls, pairs: OrderedPairs, shared: Mapping[str, torch.Tensor] | None = None) -> "TensorPairs":
        """From a teacher's :func:`~prefopt.data.teachers.to_pairs`; ``shared`` is indexed by the kept rows."""
        kept = {k: v[pairs.index] for k, v in (shared or {}).items()}
        return cls(pairs.chosen, pairs.rejected, kept, pairs.tie)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors (for :func:`prefopt.cache.cached_tensors`); :meth:`from_tensors` inverts it."""
        flat = {f"{part}.{k}": v for part in ("chosen", "rejected", "shared") for k, v in getattr(self, part).items()}
        flat["tie"] = self.tie
        return flat

    @classmethod
    def from_tensors(cls, flat: Mapping[str, torch.Tensor]) -> "TensorPairs":
        parts: dict[str, dict[str, torch.Tensor]] = {"chosen": {}, "rejected": {}, "shared": {}}
        for key, value in flat.items():
            if key != "tie":
                part, name = key.split(".", 1)
                parts[part][name] = value
        return cls(parts["chosen"], parts["rejected"], parts["shared"], flat.get("tie"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        """Row ``i``; with a 1-D tensor of indices, those rows already stacked into a batch."""
        row = {f"chosen_{k}": v[i] for k, v in self.chosen.items()}
        row.update({f"rejected_{k}": v[i] for k, v in self.rejected.items()})
        row.update({k: v[i] for k, v in self.shared.items()})
        row["tie"] = self.tie[i]
        row["index"] = torch.as_tensor(i, dtype=torch.int64)
        return row

    def __getitems__(self, indices: list[int]) -> "PairRows":
        """What a ``DataLoader`` fetches for one batch: see :class:`PairRows` and :func:`collate_pairs`."""
        return PairRows(self, indices)


class PairRows(Sequence):
    """The rows of one batch of a :class:`TensorPairs`, cut with one index per tensor by :meth:`batch`.

    :func:`collate_pairs` takes that batch as it is (no row-by-row stacking); any other ``collate_fn``
    sees an ordinary sequence of rows, built when it reads them.
    """

    def __init__(self, pairs: TensorPairs, indices: list[int]):
        self.pairs, self.indices = pairs, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.pairs[i] for i in self.indices[k]]
        return self.pairs[self.indices[k]]

    def batch(self) -> dict[str, torch.Tensor]:
        return self.pairs[torch.as_tensor(self.indices, dtype=torch.int64)]


def collate_pairs(rows: Any) -> Any:
    """A ``DataLoader`` ``collate_fn``: a :class:`TensorPairs` batch is cut in one step, other datasets' rows
    go through ``default_collate``. The batch is the same either way."""
    return rows.batch() if isinstance(rows, PairRows) else default_collate(rows)

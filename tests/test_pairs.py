"""TensorPairs batches: cut in one step by collate_pairs, identical to row-by-row collation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset, default_collate

from prefopt.data.pairs import PairRows, TensorPairs, collate_pairs
from prefopt.tasks.base import EpochShuffleSampler


def _pairs(n=11):
    g = torch.Generator().manual_seed(0)
    return TensorPairs({"x": torch.randn(n, 3, 2, generator=g), "m": torch.rand(n, 3, generator=g) > 0.5},
                       {"x": torch.randn(n, 3, 2, generator=g), "m": torch.rand(n, 3, generator=g) > 0.5},
                       {"seed": torch.arange(n) * 7}, tie=torch.rand(n, generator=g) > 0.7)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_collate_pairs_gives_the_row_by_row_batches():
    pairs = _pairs()
    fast = DataLoader(pairs, batch_size=4, sampler=EpochShuffleSampler(len(pairs), 3), collate_fn=collate_pairs)
    slow = DataLoader(pairs, batch_size=4, sampler=EpochShuffleSampler(len(pairs), 3),
                      collate_fn=lambda rows: default_collate([rows[k] for k in range(len(rows))]))
    batches = list(zip(fast, slow, strict=True))
    assert [len(f["index"]) for f, _ in batches] == [4, 4, 3]
    for f, s in batches:
        _assert_same(f, s)
    assert sorted(torch.cat([f["index"] for f, _ in batches]).tolist()) == list(range(len(pairs)))


def test_default_collate_and_subsets_still_see_rows():
    pairs = _pairs()
    rows = pairs.__getitems__([5, 2])
    assert isinstance(rows, PairRows) and len(rows) == 2 and int(rows[1]["index"]) == 2
    _assert_same(default_collate(rows), rows.batch())  # a DataLoader without collate_pairs gets the same batch
    (batch,) = DataLoader(Subset(pairs, [9, 1, 4]), batch_size=3)
    assert batch["index"].tolist() == [9, 1, 4]
    assert torch.equal(batch["chosen_x"], pairs.chosen["x"][[9, 1, 4]])

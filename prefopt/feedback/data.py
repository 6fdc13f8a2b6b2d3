"""Batch layouts and datasets for binary and ranking feedback, built from groups of candidate samples.

Batch layouts (compare the pair batch of :mod:`prefopt.policy`):

* **binary** (one sample per row): keys ``sample_<k>`` hold what the label judges (an action, an image, a
  sequence); other tensor keys are the sample's *condition* (a context, a class label, a seed), and
  ``label`` is 1 (desirable) or 0 (undesirable). :func:`concatenate_samples` strips the prefix.
  :func:`mismatched_samples` pairs each condition with the previous row's sample (TRL's KL batch).
* **ranking** (one group of ``K`` samples per row): keys ``ranked_<k>`` are ``[G, K, ...]``, best first;
  other tensor keys are shared by the group; ``tie`` (optional) is ``[G, K(K-1)/2]`` over the position
  pairs of :func:`~prefopt.feedback.losses.pair_indices`. :func:`concatenate_ranked` lays the ``K``
  samples of the ``G`` groups out as ``K * G`` rows, rank by rank, so rows ``i, i + G, ..., i + (K-1) G``
  are group ``i`` (for ``K = 2`` exactly the pair layout: chosen first).

A task that supports these kinds provides :class:`Groups`: ``K`` candidate samples per group with their true
rewards; the scripted teachers (:mod:`prefopt.feedback.teach`) or a score rule (:mod:`prefopt.feedback.convert`)
turn them into a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from prefopt.data.pairs import PairRows, TensorPairs
from prefopt.errors import PrefoptError
from prefopt.policy import CHOSEN, REJECTED

SAMPLE, RANKED = "sample_", "ranked_"
#: batch keys that are bookkeeping, not a condition of the sample
BOOKKEEPING = frozenset({"label", "index", "tie", "score", "weight"})


# ---------------------------------------------------------------------------------------- layouts
def concatenate_samples(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Binary batch of ``B`` rows -> the policy's sample batch of ``B`` rows (prefix stripped)."""
    out = {k[len(SAMPLE):] if k.startswith(SAMPLE) else k: v for k, v in batch.items() if k not in ("label", "weight")}
    return out


def sample_conditions(policy) -> tuple[str, ...]:
    """The sample keys a policy scores a sample *given* (``policy.sample_conditions``; a control segment's
    ``obs`` and ``mask``: its actions are the sample): binary rows keep them as their condition."""
    return tuple(getattr(policy, "sample_conditions", ()))


def has_condition(batch: Mapping[str, Any]) -> bool:
    """Whether a binary batch has condition tensors apart from its samples (so mismatching changes anything)."""
    return any(torch.is_tensor(v) and not k.startswith(SAMPLE) and k not in BOOKKEEPING and k != "seed"
               for k, v in batch.items())


SEQUENCE_KEYS = ("input_ids", "completion_mask")


def is_sequence_batch(batch: Mapping[str, Any]) -> bool:
    """Whether the samples are token sequences that hold their prompt and completion in one row (the sequence
    adapter's layout: ``input_ids``, ``completion_mask``, optional ``attention_mask``, right-padded)."""
    return all(SAMPLE + k in batch for k in SEQUENCE_KEYS)


def can_mismatch(batch: Mapping[str, Any]) -> bool:
    """Whether :func:`mismatched_samples` can pair a sample with another row's condition."""
    return has_condition(batch) or is_sequence_batch(batch)


def _splice_sequences(samples: dict[str, Any]) -> dict[str, Any]:
    """Row ``i``: the prompt of row ``i`` followed by the completion of row ``i - 1``, right-padded."""
    ids, completion = samples["input_ids"], samples["completion_mask"].bool()
    attention = samples.get("attention_mask")
    real = torch.ones_like(completion) if attention is None else attention.bool()
    prompt, answer = real & ~completion, real & completion
    previous = torch.roll(torch.arange(ids.shape[0], device=ids.device), shifts=1)
    rows = [(ids[i][prompt[i]], ids[j][answer[j]]) for i, j in zip(range(ids.shape[0]), previous.tolist())]
    width = max(1, max(len(p) + len(c) for p, c in rows))
    pad = ids[~real][0] if bool((~real).any()) else torch.zeros((), dtype=ids.dtype)  # masked: any id does
    out_ids = torch.full((ids.shape[0], width), int(pad), dtype=ids.dtype, device=ids.device)
    out_attention = torch.zeros_like(out_ids, dtype=real.dtype if attention is None else attention.dtype)
    out_completion = torch.zeros_like(out_ids, dtype=samples["completion_mask"].dtype)
    for i, (p, c) in enumerate(rows):
        out_ids[i, :len(p) + len(c)] = torch.cat([p, c])
        out_attention[i, :len(p) + len(c)] = 1
        out_completion[i, len(p):len(p) + len(c)] = 1
    out = dict(samples, input_ids=out_ids, completion_mask=out_completion)
    if attention is not None:
        out["attention_mask"] = out_attention
    return out


def mismatched_samples(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Row ``i`` gets the condition of row ``i`` and the sample of row ``i - 1`` (row 0 the last sample).

    TRL's KL batch: ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``. The condition is the batch's condition
    tensors, or, for token sequences (:func:`is_sequence_batch`), each row's prompt: row ``i`` becomes its
    own prompt followed by row ``i - 1``'s completion, as TRL concatenates them.
    """
    if not has_condition(batch) and is_sequence_batch(batch):
        return _splice_sequences(concatenate_samples(batch))
    rolled = {k: torch.roll(v, shifts=1, dims=0) if k.startswith(SAMPLE) else v for k, v in batch.items()}
    return concatenate_samples(rolled)


def stack_rows(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Two sample batches as one (``first`` then ``second``); token sequences are right-padded to one width."""
    out: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if not torch.is_tensor(a):
            out[key] = a
            continue
        if a.dim() == 2 and key in ("input_ids", "attention_mask", "completion_mask") and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            # padding: attention and completion 0; the ids there are never attended or scored
            a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in (a, b))
        out[key] = torch.cat([a, b])
    return out


def concatenate_ranked(batch: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Ranking batch of ``G`` groups of ``K`` -> sample batch of ``K * G`` rows, rank by rank; returns ``K`` too."""
    out: dict[str, Any] = {}
    sizes = {tuple(v.shape[:2]) for k, v in batch.items() if k.startswith(RANKED)}
    if len(sizes) != 1:
        raise PrefoptError(f"a ranking batch needs ranked_<key> tensors of one shape [G, K, ...]; got {sorted(sizes)}")
    groups, k = sizes.pop()
    for key, value in batch.items():
        if key.startswith(RANKED):
            out[key[len(RANKED):]] = value.transpose(0, 1).reshape(k * groups, *value.shape[2:])
        elif key == "tie":
            continue
        elif torch.is_tensor(value):
            out[key] = torch.cat([value] * k, dim=0)
        else:
            out[key] = value
    return out, k


def is_pair_batch(batch: Mapping[str, Any]) -> bool:
    return any(k.startswith(CHOSEN) for k in batch)


def pairs_as_samples(batch: Mapping[str, Any], conditions: tuple[str, ...] = ()) -> dict[str, Any]:
    """A pair batch of ``B`` pairs as a binary batch of ``2B`` samples: the chosen samples desirable, the rejected
    ones undesirable (TRL's ``unpair_preference_dataset``); a tied pair's samples get ``weight`` 0. The sample
    keys in ``conditions`` (:func:`sample_conditions`) become the rows' condition."""
    out: dict[str, Any] = {}
    size = None
    for key, value in batch.items():
        if key.startswith(CHOSEN):
            name = key[len(CHOSEN):]
            out[name if name in conditions else SAMPLE + name] = torch.cat([value, batch[REJECTED + name]])
            size = value.shape[0]
        elif key.startswith(REJECTED) or key == "tie":
            continue
        elif torch.is_tensor(value):
            out[key] = torch.cat([value, value])
        else:
            out[key] = value
    device = next(v for k, v in out.items() if k.startswith(SAMPLE) or k in conditions).device
    out["label"] = torch.cat([torch.ones(size, dtype=torch.int64, device=device),
                              torch.zeros(size, dtype=torch.int64, device=device)])
    tie = batch.get("tie")
    if tie is not None:
        out["weight"] = (~torch.cat([tie, tie]).to(torch.bool)).float()
    return out


def pairs_as_ranking(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A pair batch as a ranking batch of ``K = 2`` (chosen first)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key.startswith(CHOSEN):
            name = key[len(CHOSEN):]
            out[RANKED + name] = torch.stack([value, batch[REJECTED + name]], dim=1)
        elif key.startswith(REJECTED):
            continue
        elif key == "tie":
            out["tie"] = value.to(torch.bool).reshape(-1, 1)
        else:
            out[key] = value
    return out


def split_ranked(values: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`concatenate_ranked` for a per-sample tensor: ``[K * G] -> [G, K]``."""
    return values.reshape(k, -1).transpose(0, 1)


# ---------------------------------------------------------------------------------------- datasets
class _TensorRows(Dataset):
    """Rows cut from dicts of tensors with the row on dim 0; batches are cut with one index per tensor."""

    def __init__(self, parts: Mapping[str, Mapping[str, torch.Tensor]], extra: Mapping[str, torch.Tensor]):
        sizes = {f"{p}{k}": v.shape[0] for p, d in parts.items() for k, v in d.items()}
        sizes.update({k: v.shape[0] for k, v in extra.items()})
        if len(set(sizes.values())) > 1:
            raise PrefoptError(f"{type(self).__name__} tensors disagree on the number of rows: {sizes}")
        self.parts, self.extra = {p: dict(d) for p, d in parts.items()}, dict(extra)
        self.size = next(iter(sizes.values())) if sizes else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        row = {f"{p}{k}": v[i] for p, d in self.parts.items() for k, v in d.items()}
        row.update({k: v[i] for k, v in self.extra.items()})
        row["index"] = torch.as_tensor(i, dtype=torch.int64)
        return row

    def __getitems__(self, indices: list[int]) -> PairRows:
        return PairRows(self, indices)  # collate_pairs cuts the batch in one step


class TensorSamples(_TensorRows):
    """Binary feedback: ``items`` (what is judged), ``condition`` (per-row context) and ``label`` ``[N]``."""

    def __init__(self, items: Mapping[str, torch.Tensor], condition: Mapping[str, torch.Tensor] | None = None,
                 label: torch.Tensor | None = None):
        if label is None:
            raise PrefoptError("binary feedback needs a label per sample (1 desirable, 0 undesirable)")
        label = torch.as_tensor(label)
        if label.dim() != 1 or not bool(((label == 0) | (label == 1)).all()):
            raise PrefoptError("binary feedback: label must be [N] with values 0 (undesirable) or 1 (desirable)")
        super().__init__({SAMPLE: items, "": condition or {}}, {"label": label.to(torch.int64)})
        self.items, self.condition, self.label = dict(items), dict(condition or {}), label.to(torch.int64)


class TensorRankings(_TensorRows):
    """Ranking feedback: ``items`` ``[G, K, ...]`` best first, ``shared`` ``[G, ...]``, ``tie`` ``[G, K(K-1)/2]``."""

    def __init__(self, items: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor] | None = None,
                 tie: torch.Tensor | None = None):
        ks = {k: tuple(v.shape[:2]) for k, v in items.items()}
        if not ks or len(set(ks.values())) != 1 or min(v.dim() for v in items.values()) < 2:
            raise PrefoptError(f"ranking feedback needs item tensors of one shape [G, K, ...]; got {ks}")
        groups, k = next(iter(ks.values()))
        if k < 2:
            raise PrefoptError(f"ranking feedback needs K >= 2 samples per group; got K={k}")
        pairs = k * (k - 1) // 2
        tie = torch.zeros(groups, pairs, dtype=torch.bool) if tie is None else torch.as_tensor(tie).bool()
        if tuple(tie.shape) != (groups, pairs):
            raise PrefoptError(f"ranking tie has shape {tuple(tie.shape)}; expected [G, K(K-1)/2] = {(groups, pairs)}")
        super().__init__({RANKED: items, "": shared or {}}, {"tie": tie})
        self.items, self.shared, self.tie, self.k = dict(items), dict(shared or {}), tie, k


# ------------------------------------------------------------------------------------------ groups
@dataclass
class Groups:
    """``K`` candidate samples for each of ``G`` groups, with their true rewards.

    Attributes:
        items: per-sample tensors ``[G, K, ...]`` (what a teacher judges).
        shared: per-group tensors ``[G, ...]`` (context, class label, prompt); the condition of every sample.
        rewards: true rewards ``[G, K]`` (one per sample) or ``[G, K, H]`` per step (with ``mask``).
        mask: optional bool ``[G, K, H]``; False marks padding steps.
        start_size: runs of this many consecutive samples of a group start from one state (control segments
            branched from one start state: 2), so their rewards are comparable with each other only; ``None``:
            every sample's reward is comparable with every other's. Binary labels judge a sample by its reward
            relative to its start state's (:func:`prefopt.feedback.teach.binary_labels`).
    """

    items: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    rewards: torch.Tensor
    mask: torch.Tensor | None = None
    start_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rewards.shape[:2])

    def flat_items(self) -> dict[str, torch.Tensor]:
        g, k = self.shape
        return {key: v.reshape(g * k, *v.shape[2:]) for key, v in self.items.items()}

    def flat_shared(self) -> dict[str, torch.Tensor]:
        k = self.shape[1]
        return {key: v.repeat_interleave(k, dim=0) for key, v in self.shared.items()}

    def flat_rewards(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        g, k = self.shape
        r = self.rewards.reshape(g * k, *self.rewards.shape[2:])
        m = None if self.mask is None else self.mask.reshape(g * k, *self.mask.shape[2:])
        return r, m

    def ranked(self, order: torch.Tensor, keep: torch.Tensor, tie: torch.Tensor) -> TensorRankings:
        """The kept groups with their items sorted by ``order`` ``[G, K]``."""
        rows = keep.nonzero().flatten()
        items = {}
        for key, v in self.items.items():
            idx = order[rows].reshape(rows.numel(), order.shape[1], *([1] * (v.dim() - 2))).expand(
                -1, -1, *v.shape[2:])
            items[key] = v[rows].gather(1, idx.to(v.device))
        return TensorRankings(items, {k: v[rows] for k, v in self.shared.items()}, tie[rows])

    def pairs(self, group: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
              tie: torch.Tensor) -> TensorPairs:
        """Pairs by indices into ``[G, K]`` (see :func:`prefopt.feedback.convert.score_pairs`)."""
        pick = {key: (v[group, chosen], v[group, rejected]) for key, v in self.items.items()}
        return TensorPairs({k: c for k, (c, _) in pick.items()}, {k: r for k, (_, r) in pick.items()},
                           {k: v[group] for k, v in self.shared.items()}, tie)

"""Your own preference pairs of token sequences, for any autoregressive token model.

A pairs file has one row per pair with the columns

``prompt_ids``    list of ints: the conditioning prefix (may be empty if ``bos_id`` is set)
``chosen_ids``    list of ints: the preferred completion (not empty)
``rejected_ids``  list of ints: the other completion (not empty)
``tie``           optional bool/0/1: the two are equally good (see ``loss.ties``)

and is read from JSON lines (``.jsonl``/``.json``, one object a line), parquet (``.parquet``) or a folder
written by Hugging Face ``datasets`` (``Dataset.save_to_disk``; for a ``DatasetDict`` the ``split`` is
used). The tokens can be anything a model was trained on: amino acids of a protein language model,
SMILES tokens of a molecule model, codec tokens of an audio model, or text.

:class:`SequencePairsTask` aligns a model with such pairs: a Hugging Face causal LM loaded with
``from_pretrained`` from a local folder (``model_path``), or any ``nn.Module`` built by Hydra
(``network``, optionally with ``weights`` from a safetensors file). Its evaluation scores held-out pairs
(``val_path``, or a ``val_fraction`` of the rows) with the reference and the policy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prefopt.adapters.sequence import SequencePolicy, base_network, load_causal_lm, pad_sequences
from prefopt.data.pairs import TensorPairs
from prefopt.data.folders import load_dataset_folder
from prefopt.errors import PrefoptError
from prefopt.metrics import implicit_reward_accuracy
from prefopt.policy import split_pairs
from prefopt.reference import eval_mode
from prefopt.tasks.base import Task
from prefopt.tasks.sequence.task import sequence_dataloader

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _context_length(config, network) -> int | None:
    """The most positions the model takes (``n_positions``, ``max_position_embeddings``...), or None if unknown."""
    for owner in (config, network):
        for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_len", "max_seq_len"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _read_rows(path: Path, split: str) -> list[dict[str, Any]]:
    if path.is_dir():
        return load_dataset_folder(path, split).to_list()
    if not path.is_file():
        raise PrefoptError(f"pairs file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows, number = [], 0
        try:
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise PrefoptError(f"{path}:{number}: not a JSON object ({err.msg}); a pairs file has one "
                                           "JSON object per line") from None
                    if not isinstance(row, dict):
                        raise PrefoptError(f"{path}:{number}: found {type(row).__name__}; allowed: a JSON object")
                    rows.append(row)
        except UnicodeDecodeError:
            raise PrefoptError(f"{path}: is not UTF-8 text (near line {number + 1}); JSON lines must be UTF-8") \
                from None
        except OSError as err:
            raise PrefoptError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(str(path)).to_pylist()
        except (OSError, pyarrow.ArrowException) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PrefoptError(f"{path}: not a readable parquet file ({detail})") from None
    raise PrefoptError(f"pairs file {str(path)!r}: suffix {path.suffix!r} is not supported; allowed: .jsonl, .json, "
                       ".parquet, or a datasets folder (save_to_disk)")


def _token_list(value: Any, where: str, column: str, vocab_size: int | None) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise PrefoptError(f"{where}: {column} is {type(value).__name__}; allowed: a list of token ids")
    out = []
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise PrefoptError(f"{where}: {column} holds {token!r}; allowed: integers >= 0")
        if vocab_size is not None and token >= vocab_size:
            raise PrefoptError(f"{where}: {column} holds token {token}, outside the model's vocabulary "
                               f"(size {vocab_size})")
        out.append(int(token))
    return out


def read_pairs(path: str | Path, split: str = "train", vocab_size: int | None = None) -> list[dict[str, Any]]:
    """Validated rows ``{"prompt_ids", "chosen_ids", "rejected_ids", "tie"}`` of a pairs file."""
    path = Path(path).expanduser()
    rows = _read_rows(path, split)
    if not rows:
        raise PrefoptError(f"pairs file {str(path)!r} has no rows")
    out = []
    for number, row in enumerate(rows, start=1):
        where = f"{path} row {number}"
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise PrefoptError(f"{where}: missing columns {missing}; found {sorted(row)}; a pairs row needs "
                               f"{', '.join(COLUMNS)} (and optionally tie)")
        clean = {c: _token_list(row[c], where, c, vocab_size) for c in COLUMNS}
        for column in ("chosen_ids", "rejected_ids"):
            if not clean[column]:
                raise PrefoptError(f"{where}: {column} is empty; a completion needs at least one token")
        tie = row.get("tie", False)
        if tie is None:
            tie = False
        if tie not in (True, False, 0, 1):
            raise PrefoptError(f"{where}: tie={tie!r}; allowed: true/false or 0/1")
        clean["tie"] = bool(tie)
        out.append(clean)
    return out


def pairs_from_rows(rows: Sequence[Mapping[str, Any]], pad_id: int = 0, bos_id: int | None = None,
                    max_length: int | None = None, source: str = "pairs") -> TensorPairs:
    """A :class:`TensorPairs` of ``prompt + completion`` sequences (``chosen_*``/``rejected_*`` keys).

    An empty prompt becomes ``[bos_id]`` (an error without one: nothing would predict the first token).
    With ``max_length`` a sequence is cut at its end; a prompt that leaves no room for a completion token
    is an error.
    """
    chosen, rejected, prompt_lengths = [], [], []
    for number, row in enumerate(rows, start=1):
        prompt = list(row["prompt_ids"])
        if not prompt:
            if bos_id is None:
                raise PrefoptError(f"{source} row {number}: prompt_ids is empty; set bos_id to the token that "
                                   "starts a sequence (nothing predicts the first token otherwise)")
            prompt = [int(bos_id)]
        if max_length is not None and len(prompt) >= max_length:
            raise PrefoptError(f"{source} row {number}: the prompt has {len(prompt)} tokens, which leaves no room "
                               f"for a completion within max_length={max_length}")
        cut = None if max_length is None else max_length
        chosen.append((prompt + list(row["chosen_ids"]))[:cut])
        rejected.append((prompt + list(row["rejected_ids"]))[:cut])
        prompt_lengths.append(len(prompt))
    width = max(len(s) for s in chosen + rejected)
    items_c = pad_sequences(chosen, prompt_lengths, pad_id, width)
    items_r = pad_sequences(rejected, prompt_lengths, pad_id, width)
    tie = torch.tensor([bool(r.get("tie", False)) for r in rows], dtype=torch.bool)
    return TensorPairs(items_c, items_r, tie=tie)


class SequencePairsTask(Task):
    """DPO of a token model on a pairs file; see the module docstring.

    Args:
        pairs_path: the training pairs (JSONL, parquet or a datasets folder).
        model_path: a local folder with a Hugging Face causal LM (``save_pretrained``); or
        network: an ``nn.Module`` (Hydra builds it from a ``_target_`` node), with optional
        weights: a safetensors file of its state dict.
        val_path: held-out pairs; without it, ``val_fraction`` of the rows (a fixed random subset) are held out.
        split: the split of a ``DatasetDict`` folder (``val_split`` for ``val_path``).
        pad_id: token id written into padding (never attended to or scored); ``None`` takes the model
            config's ``pad_token_id``, then its ``eos_token_id``, then 0.
        bos_id: the token put in front of an empty prompt.
        max_length: cut sequences to this many tokens (``None``: no limit).
        lora_targets: module names for ``reference=adapter`` (``None``: the adapter's defaults).
        dtype: dtype the Hugging Face model is loaded in.
    """

    name = "sequence_pairs"

    def __init__(self, pairs_path: str, model_path: str | None = None, network: nn.Module | None = None,
                 weights: str | None = None, val_path: str | None = None, val_fraction: float = 0.1,
                 split: str = "train", val_split: str = "test", pad_id: int | None = None,
                 bos_id: int | None = None, max_length: int | None = None,
                 lora_targets: Sequence[str] | None = None, dtype: str = "float32", batch_size: int = 8,
                 rounds: int = 1, seed: int = 0, cache_dir: str | None = None):
        if (model_path is None) == (network is None):
            raise PrefoptError("set exactly one of model_path (a local Hugging Face causal LM folder) and network "
                               f"(an nn.Module); got model_path={model_path!r}, network="
                               f"{type(network).__name__ if network is not None else None}")
        if network is not None and not isinstance(network, nn.Module):
            raise PrefoptError(f"network is a {type(network).__name__}; allowed: an nn.Module (a Hydra node with "
                               "_target_ builds one)")
        if not 0 <= val_fraction < 1:
            raise PrefoptError(f"val_fraction={val_fraction!r} must be in [0, 1)")
        if int(rounds) != 1:
            raise PrefoptError(f"rounds={rounds}: a pairs file gives one round of pairs; allowed: 1")
        self.pairs_path, self.model_path, self.network, self.weights = pairs_path, model_path, network, weights
        self.val_path, self.val_fraction, self.split, self.val_split = val_path, float(val_fraction), split, val_split
        self.pad_id, self.bos_id, self.max_length = pad_id, bos_id, max_length
        self.lora_targets, self.dtype = lora_targets, dtype
        self.batch_size, self.rounds, self.seed = int(batch_size), 1, int(seed)
        self._train: list[dict[str, Any]] | None = None
        self._val: list[dict[str, Any]] | None = None

    def build_policy(self) -> SequencePolicy:
        if self.model_path is not None:
            network = load_causal_lm(self.model_path, dtype=self.dtype)
        else:
            network = self.network
            if self.weights:
                from safetensors.torch import load_file

                if not Path(self.weights).is_file():
                    raise PrefoptError(f"weights={self.weights!r}: no such safetensors file")
                try:
                    network.load_state_dict(load_file(self.weights))
                except RuntimeError as err:
                    raise PrefoptError(f"weights={self.weights!r} do not fit the network: {err}") from None
        config = getattr(base_network(network), "config", None)
        pad_id = self.pad_id
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config, "eos_token_id", None)
        if isinstance(pad_id, (list, tuple)):
            pad_id = pad_id[0] if pad_id else None
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self.vocab_size = getattr(config, "vocab_size", None) or getattr(network, "vocab_size", None)
        self.context = _context_length(config, network)
        self._load()
        return SequencePolicy(network, pad_id=self.pad_id, lora_targets=self.lora_targets)

    def _load(self) -> None:
        if self._train is not None:
            return
        rows = read_pairs(self.pairs_path, self.split, self.vocab_size)
        self._check_context(rows, self.pairs_path, "pairs_path")
        if self.val_path:
            val = read_pairs(self.val_path, self.val_split, self.vocab_size)
            self._check_context(val, self.val_path, "val_path")
            self._train, self._val = rows, val
            return
        n_val = int(math.floor(self.val_fraction * len(rows)))
        if n_val == 0:
            self._train, self._val = rows, []
            return
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self._val = [rows[i] for i in order[:n_val]]
        self._train = [rows[i] for i in sorted(order[n_val:])]

    def _check_context(self, rows, path, option: str) -> None:
        """Sequences longer than the model's context are refused before training, naming the longest and the limit
        (an index error in the middle of training otherwise). ``max_length`` is the explicit way to cut them (as
        TRL's ``max_length``: a sequence's end is cut); what it cuts is checked after the cut. A model that does not
        say its context (``n_positions``, ``max_position_embeddings``...) is not checked."""
        limit = getattr(self, "context", None)
        if limit is None:
            return
        cut = int(self.max_length) if self.max_length is not None else None
        lengths = [max(len(r["prompt_ids"]), 1) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        lengths = [min(n, cut) if cut is not None else n for n in lengths]
        longest = max(lengths, default=0)
        if longest > limit:
            row = lengths.index(longest) + 1
            after = f" after max_length={cut}" if cut is not None else ""
            raise PrefoptError(f"domain.task.{option}={path}: row {row} is {longest} tokens long{after} (prompt + "
                               f"completion), longer than the model's context of {limit} positions "
                               f"({sum(n > limit for n in lengths)} of {len(lengths)} rows are); shorten the data, or "
                               f"set domain.task.max_length={limit} to cut each sequence's end")

    def _dataset(self, rows, source) -> TensorPairs:
        return pairs_from_rows(rows, self.pad_id, self.bos_id, self.max_length, source)

    def pairs(self, policy: SequencePolicy, round_index: int) -> TensorPairs:
        self._load()
        return self._dataset(self._train, str(self.pairs_path))

    def val_pairs(self) -> Dataset | None:
        self._load()
        return self._dataset(self._val, str(self.val_path or self.pairs_path)) if self._val else None

    def dataloader(self, dataset: Dataset, train: bool = True) -> DataLoader:
        return sequence_dataloader(dataset, self.batch_size, self.seed, train)

    @torch.no_grad()
    def evaluate(self, reference: SequencePolicy, policy: SequencePolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        """Held-out pairs (the training pairs if none are held out) under the reference and the policy.

        Per model: ``accuracy`` (the chosen completion is more likely than the rejected one),
        ``margin_mean`` (mean ``log p(chosen) - log p(rejected)``) and ``chosen_nll_per_token``.
        ``implicit_reward_accuracy``: the fraction of pairs that the DPO implicit reward of the policy ranks
        right, ``(lp_c - ref_c) - (lp_r - ref_r) > 0`` (an exact tie counts one half); ``tie`` pairs are left
        out. (There is no head-to-head ``win_rate`` here: the task generates nothing.)
        """
        self._load()
        rows = [r for r in (self._val or self._train) if not r["tie"]]
        if not rows:
            raise PrefoptError("evaluate: every held-out pair is a tie; nothing to rank")
        dataset = self._dataset(rows, "eval pairs")
        loader = self.dataloader(dataset, train=False)
        out: dict[str, Any] = {}
        scores = {}
        for name, model in (("reference", reference), ("policy", policy)):
            device = next(model.parameters()).device
            chosen, rejected, chosen_len = [], [], []
            with eval_mode(model.network):
                for batch in loader:
                    samples = model.concatenate({k: v.to(device) for k, v in batch.items()})
                    c, r = split_pairs(model.log_likelihood(model.network, samples).cpu())
                    chosen.append(c), rejected.append(r), chosen_len.append(split_pairs(model.lengths(samples).cpu())[0])
            c, r, length = torch.cat(chosen), torch.cat(rejected), torch.cat(chosen_len)
            out[name] = {"accuracy": float((c > r).double().mean()), "margin_mean": float((c - r).mean()),
                         "chosen_nll_per_token": float(-c.sum() / length.sum())}
            scores[name] = (c, r)
        (pc, pr), (rc, rr) = scores["policy"], scores["reference"]
        return {"reference": out["reference"], "policy": out["policy"],
                "implicit_reward_accuracy": implicit_reward_accuracy(pc, pr, rc, rr),
                "eval_pairs": len(rows)}


__all__ = ["COLUMNS", "SequencePairsTask", "pairs_from_rows", "read_pairs"]

"""Autoregressive sequence models: the log-likelihood of a completion given a prompt.

A sample is one token sequence, ``prompt + completion``, padded to the batch's length:

``input_ids``       int64 ``[N, T]``: the tokens (padding may sit on either side; its value does not matter)
``attention_mask``  ``[N, T]``: 1 for real tokens (prompt and completion), 0 for padding
``completion_mask`` ``[N, T]``: 1 for the completion tokens, the ones that are scored

The log-likelihood of a sample is ``sum_t log p(x_t | x_<t)`` over its completion tokens only: the prompt
conditions but is not scored, padding is neither attended to nor scored. The logits at position ``t - 1``
predict token ``t``; the LM head runs only at the scored positions where the network allows it (Hugging
Face's ``logits_to_keep``, or its backbone and head apart; see :meth:`SequencePolicy.scored_logits`), as
TRL's ``logits_to_keep`` and fused head do, and the log-probabilities of those positions come from
``cross_entropy(reduction="none")``, so no full ``[N, T, V]`` log-softmax is materialized. The
first position of a row can not be scored (nothing predicts it): start every sequence with a BOS token or
a prompt. :meth:`SequencePolicy.lengths` gives the completion lengths for length-normalized losses.

A pair batch holds ``chosen_*`` and ``rejected_*`` versions of the three tensors, padded to the same ``T``
(the prompt is the same in both, so it is stored inside each sequence). The module concatenates them
and this adapter scores all ``2B`` sequences in one forward.

The network is any ``nn.Module`` that maps ``input_ids`` (and, if its ``forward`` takes them,
``attention_mask`` and ``position_ids``) to next-token logits ``[N, T, V]``, returned as a tensor, as the
first item of a tuple, or as an output object's ``.logits`` (Hugging Face causal LMs). Position ids are
``cumsum(attention_mask) - 1``, so a left-padded row sees the same positions as the unpadded one.
:func:`load_causal_lm` loads a Hugging Face causal LM with ``from_pretrained`` from a local folder.

Sampling (:meth:`SequencePolicy.sample`) uses the key/value cache when the network's ``forward`` takes
one (``cache`` in current transformers, ``past_key_values`` in older ones and the same protocol in
:class:`prefopt.tasks.sequence.model.MelodyTransformer`), and recomputes the prefix every step otherwise.
The token at each step is drawn by inverse-CDF from one uniform per row, taken from a seeded generator, so
two models sampled with the same seed use the same random numbers (common random numbers: their samples
differ only where their distributions do).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.errors import PrefoptError
from prefopt.policy import PreferencePolicy
from prefopt.reference import eval_mode

#: LoRA targets when the network names none itself: GPT-2 (and prefopt's MelodyTransformer, which uses
#: the same names) and the Llama/Mistral/Qwen family. peft wraps every module whose name ends in one of
#: these and only complains when none matches.
DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj")


def base_network(network: nn.Module) -> nn.Module:
    """The module under a peft wrapper (``PeftModel.get_base_model()``), else ``network`` itself."""
    get_base = getattr(network, "get_base_model", None)
    return get_base() if callable(get_base) else network


def _forward_parameters(network: nn.Module) -> frozenset[str]:
    base = base_network(network)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward: pass ids only
        return frozenset()
    return frozenset(name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _cache_argument(params: frozenset[str]) -> str | None:
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _logits_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not torch.is_tensor(logits):
        raise PrefoptError(f"the sequence network returned {type(output).__name__}; allowed: a logits tensor "
                           "[N, T, V], a tuple whose first item is one, or an object with .logits")
    return logits


def _cache_of(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


#: config attributes that change a causal LM's logits after its output embedding (TRL's fused head reads the same)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _backbone_and_head(network: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, output embedding) of a Hugging Face causal LM whose logits are ``head(last_hidden_state)``."""
    base = base_network(network)
    get_head = getattr(base, "get_output_embeddings", None)
    backbone = getattr(base, "base_model", None)
    if not callable(get_head) or backbone is None or backbone is base:
        return None
    head = get_head()
    if type(head) is not nn.Linear:
        return None
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return backbone, head


def _hidden_of(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if not torch.is_tensor(hidden):
        raise PrefoptError(f"the sequence network's backbone returned {type(output).__name__}; expected an output "
                           "with .last_hidden_state")
    return hidden


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1`` (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def call_network(network: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **extra: Any) -> Any:
    """Call ``network`` with the keyword arguments its ``forward`` accepts; returns its raw output."""
    params = _forward_parameters(network)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None and "attention_mask" in params:
        kwargs["attention_mask"] = attention_mask
    if attention_mask is not None and "position_ids" in params and "position_ids" not in extra:
        kwargs["position_ids"] = position_ids(attention_mask)
    if "use_cache" in params and "use_cache" not in extra:
        kwargs["use_cache"] = False
    kwargs.update({k: v for k, v in extra.items() if k in params})
    return network(input_ids, **kwargs)


class SequencePolicy(PreferencePolicy):
    """Completion log-likelihood of an autoregressive token model (see the module docstring).

    Args:
        network: ids (+ attention mask, position ids) -> logits ``[N, T, V]``; a Hugging Face causal LM works.
        pad_id: the token written into padding by :meth:`sample` (never scored, never attended to).
        lora_targets: module names ``reference=adapter`` wraps in LoRA; ``None`` uses peft's table for a
            Hugging Face model type it knows and :data:`DEFAULT_LORA_TARGETS` otherwise.

    What a subclass may change: :meth:`logits` (e.g. to add conditioning inputs); the gathering and
    masking stay in :meth:`log_likelihood`.
    """

    def __init__(self, network: nn.Module, pad_id: int = 0, lora_targets: Sequence[str] | None = None):
        super().__init__(network)
        self.pad_id = int(pad_id)
        self._lora_targets = tuple(lora_targets) if lora_targets else None

    @property
    def lora_targets(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._lora_targets:
            return self._lora_targets
        model_type = getattr(getattr(base_network(self.network), "config", None), "model_type", None)
        if model_type:
            try:
                from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known
            except ImportError:  # pragma: no cover - peft moved it
                known = {}
            if model_type in known:
                return tuple(known[model_type])
        return DEFAULT_LORA_TARGETS

    # ------------------------------------------------------------------------------ likelihood
    def logits(self, network: nn.Module, samples: Mapping[str, Any]) -> torch.Tensor:
        """Next-token logits ``[N, T, V]`` of the samples' ``input_ids`` under ``network``."""
        return _logits_of(call_network(network, samples["input_ids"], samples.get("attention_mask")))

    def scored_logits(self, network: nn.Module, samples: Mapping[str, Any], rows: torch.Tensor,
                      cols: torch.Tensor) -> torch.Tensor:
        """The logits ``[K, V]`` at positions ``(rows, cols)`` only (each predicts the token after it).

        The LM head runs on as few positions as the network allows, and the columns after the last
        predicting position are not fed at all (a causal model's outputs before them do not depend on them):

        1. a ``forward`` that takes ``logits_to_keep`` (Hugging Face causal LMs, :class:`MelodyTransformer`;
           ``num_logits_to_keep`` in older transformers): the logits from the first predicting column on;
        2. a Hugging Face causal LM without it, whose logits are its output embedding applied to the last
           hidden state (no logit scaling or soft-capping in its config): the backbone, then the head on the
           ``K`` kept hidden states;
        3. any other ids -> logits module, or a subclass that overrides :meth:`logits`: the full logits.
        """
        if type(self).logits is not SequencePolicy.logits or rows.numel() == 0:
            return self.logits(network, samples)[rows, cols]
        first, last = torch.stack([cols.min(), cols.max()]).tolist()
        ids, attention = samples["input_ids"][:, : last + 1], samples.get("attention_mask")
        attention = None if attention is None else attention[:, : last + 1]
        params = _forward_parameters(network)
        keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        if keep_arg is not None:
            logits = _logits_of(call_network(network, ids, attention, **{keep_arg: last + 1 - first}))
            return logits[rows, cols - first]
        split = _backbone_and_head(network)
        if split is not None:
            backbone, head = split
            hidden = _hidden_of(call_network(backbone, ids, attention))
            return head(hidden[rows, cols])
        return self.logits(network, samples)[rows, cols]

    @staticmethod
    def _check(samples: Mapping[str, Any]) -> None:
        for key in ("input_ids", "completion_mask"):
            if key not in samples:
                raise PrefoptError(f"sequence samples need {key!r} ([N, T]); found keys {sorted(samples)}")
        ids, scored = samples["input_ids"], samples["completion_mask"]
        if ids.ndim != 2 or scored.shape != ids.shape:
            raise PrefoptError(f"sequence samples: input_ids {tuple(ids.shape)} and completion_mask "
                               f"{tuple(scored.shape)} must both be [N, T]")
        if bool(scored[:, 0].bool().any()):
            row = int(scored[:, 0].bool().nonzero()[0, 0])
            raise PrefoptError(f"sequence sample {row}: its first position is marked as completion, but nothing "
                               "predicts the first token; start each sequence with a BOS token or a prompt")

    def log_likelihood(self, network: nn.Module, samples: Mapping[str, Any], draw: Any = None) -> torch.Tensor:
        self._check(samples)
        ids = samples["input_ids"]
        scored = samples["completion_mask"].bool()
        attention = samples.get("attention_mask")
        if attention is not None:
            scored = scored & attention.bool()
        # logits[:, t] predicts ids[:, t + 1]: the predicting positions of the scored tokens only
        rows, cols = scored[:, 1:].nonzero(as_tuple=True)
        picked = self.scored_logits(network, samples, rows, cols)     # [K, V]
        if picked.dtype.itemsize < 4:  # half precision: the log-softmax in float32
            picked = picked.float()
        targets = ids[rows, cols + 1]
        token_logps = -F.cross_entropy(picked, targets, reduction="none")
        out = torch.zeros(ids.shape[0], dtype=token_logps.dtype, device=ids.device)
        return out.index_add(0, rows, token_logps)

    def lengths(self, samples: Mapping[str, Any]) -> torch.Tensor:
        scored = samples["completion_mask"].bool()
        attention = samples.get("attention_mask")
        if attention is not None:
            scored = scored & attention.bool()
        return scored.sum(-1).to(torch.float32)

    @torch.no_grad()
    def token_nll(self, sequences: Sequence[Sequence[int]], skip: int = 1, batch_size: int = 64,
                  network: nn.Module | None = None) -> tuple[float, int]:
        """Total negative log-likelihood and token count of whole ``sequences``, not scoring the first ``skip``."""
        network = self.network if network is None else network
        total, count = 0.0, 0
        with eval_mode(network):
            for start in range(0, len(sequences), batch_size):
                chunk = [list(s) for s in sequences[start:start + batch_size]]
                batch = pad_sequences(chunk, [min(skip, len(s)) for s in chunk], self.pad_id,
                                      device=_device_of(network))
                logps = self.log_likelihood(network, batch)
                total -= float(logps.sum())
                count += int(self.lengths(batch).sum())
        return total, count

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None,
               seed: int = 0, temperature: float = 1.0, network: nn.Module | None = None,
               banned: Sequence[int] = (), batch_size: int = 256, progress: str | None = None) -> list[list[int]]:
        """Completions of ``prompts`` (each stops after ``eos_id``, which is kept, or at ``max_new_tokens``).

        Rows are drawn from one generator seeded with ``seed`` per chunk of ``batch_size`` prompts, so two
        networks sampled with the same arguments see the same uniforms. ``banned`` tokens (padding,
        special tokens) get probability zero. ``progress``: the label of a progress bar over the finished
        completions (``None``: no bar).
        """
        if temperature <= 0:
            raise PrefoptError(f"temperature={temperature!r} must be > 0")
        network = self.network if network is None else network
        if "attention_mask" in _forward_parameters(network):
            groups = [list(range(len(prompts)))]
        else:  # a network that can not mask padding: sample prompts of equal length together
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_length.setdefault(len(p), []).append(i)
            groups = [by_length[k] for k in sorted(by_length)]
        out: list[list[int]] = [[] for _ in prompts]
        chunk = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=progress or "", unit="seq", disable=progress is None, leave=False)
        with bar, eval_mode(network):
            for group in groups:
                for start in range(0, len(group), batch_size):
                    rows = group[start:start + batch_size]
                    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + chunk)
                    chunk += 1
                    done = self._sample_chunk(network, [prompts[i] for i in rows], max_new_tokens, eos_id,
                                              generator, temperature, banned, bar)
                    for i, completion in zip(rows, done):
                        out[i] = completion
        return out

    def _sample_chunk(self, network, prompts, max_new_tokens, eos_id, generator, temperature, banned, bar=None):
        """One batch of prompts, left-padded so that every row's next token goes to the same column.

        A row that has finished (EOS) keeps its place until a quarter of the batch has finished; then the
        finished rows are dropped from the batch and, through ``batch_select_indices``, from the cache
        (where the cache has no such method, finished rows stay and their tokens are ignored). The
        uniforms are drawn for every row of the chunk at every step, running or not, so a row's draws do
        not depend on when the other rows finish.
        """
        device = _device_of(network)
        n = len(prompts)
        if any(len(p) == 0 for p in prompts):
            raise PrefoptError("sample: every prompt needs at least one token (a BOS token)")
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache_arg = _cache_argument(_forward_parameters(network))
        out = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        rows = torch.arange(n, device=device)      # the chunk rows still in the batch
        done = torch.zeros(n, dtype=torch.bool, device=device)  # per batch row
        banned = list(banned)
        cache, step_ids = None, ids
        reported = 0  # finished rows of the batch already counted on the bar
        for step in range(max_new_tokens):
            extra: dict[str, Any] = {"position_ids": position_ids(mask)[:, -step_ids.shape[1]:]}
            if cache_arg is not None:
                extra.update({cache_arg: cache, "use_cache": True})
            output = call_network(network, step_ids, mask, **extra)
            logits = _logits_of(output)[:, -1].float()
            if banned:
                logits[:, banned] = float("-inf")
            cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
            u = torch.rand(n, 1, generator=generator, dtype=cdf.dtype).to(device)[rows] * cdf[:, -1:]
            token = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).squeeze(1)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out[rows, step] = token
            if eos_id is not None:
                done = done | (token == eos_id)
            finished = int(done.sum())
            if bar is not None:
                bar.update(finished - reported)
                reported = finished
            if finished == len(rows):
                break
            if cache_arg is not None:
                cache = _cache_of(output)
                if cache is None:  # the network took the argument but gave no cache back: recompute from here on
                    cache_arg = None
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # finished rows feed padding, ignored
            if finished and 4 * finished >= len(rows) and (cache_arg is None or hasattr(cache, "batch_select_indices")):
                keep = (~done).nonzero().squeeze(1)
                rows, done, mask, token, ids = rows[keep], done[keep], mask[keep], token[keep], ids[keep]
                reported = 0
                if cache_arg is not None:
                    cache.batch_select_indices(keep)
            if cache_arg is not None:
                step_ids = token[:, None]
            else:
                step_ids = torch.cat([ids, out[rows, : step + 1]], dim=1)
        if bar is not None:
            bar.update(len(rows) - reported)
        completions = []
        for row in out.tolist():
            if eos_id is not None and eos_id in row:  # a row without EOS ran every step
                row = row[: row.index(eos_id) + 1]
            completions.append(row)
        return completions


def _device_of(network: nn.Module) -> torch.device:
    try:
        return next(network.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_sequences(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int = 0,
                  width: int | None = None, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for whole sequences.

    ``sequences[i]`` is prompt + completion; its first ``prompt_lengths[i]`` tokens are the prompt.
    """
    width = max((len(s) for s in sequences), default=1) if width is None else width
    n = len(sequences)
    ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.long)
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
        if len(seq) > width:
            raise PrefoptError(f"sequence {i} has {len(seq)} tokens, more than the width {width}")
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, int(plen): len(seq)] = 1
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def trim_pair_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the trailing columns that are padding in every sequence of a (pair) batch."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v) and v.ndim == 2]
    if not masks:
        return batch
    used = torch.stack([m.bool().any(0) for m in masks]).any(0)
    width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    seq_keys = ("input_ids", "attention_mask", "completion_mask")
    return {k: (v[:, :width] if torch.is_tensor(v) and v.ndim == 2 and k.endswith(seq_keys) else v)
            for k, v in batch.items()}


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", **kwargs: Any) -> nn.Module:
    """A Hugging Face causal LM from a local folder (``AutoModelForCausalLM.from_pretrained``); no download."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise PrefoptError(f"model_path={str(path)!r}: no config.json there; allowed: a local folder written by "
                           "save_pretrained (nothing is downloaded from a hub)")
    from transformers import AutoModelForCausalLM

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise PrefoptError(f"dtype={dtype!r} is not supported; allowed: {', '.join(dtypes)}")
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtypes[dtype], local_files_only=True,
                                                    **kwargs)
    except (OSError, ValueError) as err:
        raise PrefoptError(f"model_path={str(path)!r}: from_pretrained failed: {err}") from None


__all__ = ["DEFAULT_LORA_TARGETS", "SequencePolicy", "base_network", "call_network", "load_causal_lm",
           "pad_sequences", "position_ids", "trim_pair_batch"]

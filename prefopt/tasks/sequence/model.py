"""A small decoder-only transformer for token sequences (GPT-2 layout, a few hundred thousand parameters).

Its modules carry GPT-2's names (``c_attn``, ``c_proj``, ``c_fc``) so the sequence adapter's default LoRA
targets fit both. ``forward`` follows the Hugging Face calling convention that the adapter uses:
``forward(input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0)``
returns the logits ``[N, T, V]``, or with ``use_cache=True`` a :class:`CausalOutput` with ``.logits`` and
``.cache`` (a :class:`KVCache`) to pass back with the next tokens. ``logits_to_keep`` is Hugging Face's:
``k > 0`` computes the logits of the last ``k`` positions only (0: all), a 1-D tensor those positions.

The cache is preallocated and written in place (no copy of the past keys and values per step), which makes it
an inference cache: sampling runs under ``torch.no_grad``. Its rows can be dropped
(:meth:`KVCache.batch_select_indices`, the name Hugging Face caches use) when sequences finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.errors import PrefoptError


class KVCache:
    """Keys and values of the positions seen so far: one ``[N, heads, capacity, head_dim]`` buffer pair per layer.

    ``length`` positions are filled; :meth:`update` writes a layer's new keys and values after them and returns
    the filled part, and the model advances ``length`` once all layers have written.
    """

    def __init__(self, n_layers: int, rows: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, heads, capacity, head_dim)
        # empty, not zeros: only the pages that are written become resident
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise PrefoptError(f"KVCache: {end} positions do not fit its capacity {self.capacity}")
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (in that order); copies the filled positions only."""
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = torch.empty((len(indices), *old.shape[1:]), dtype=old.dtype, device=old.device)
                new[:, :, :self.length] = old[indices, :, :self.length]
                buffers[i] = new


@dataclass
class CausalOutput:
    logits: torch.Tensor
    cache: KVCache


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x, allowed, cache, layer):
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if allowed is None:  # causal attention within the rows, no padding to hide
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d_model, d_ff))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, allowed, cache, layer):
        x = x + self.drop(self.attn(self.ln_1(x), allowed, cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class MelodyTransformer(nn.Module):
    """GPT-style causal transformer with learned positions and tied input/output embeddings.

    ``dropout`` applies to the embeddings and the residual branches (not to the attention weights,
    which is slow on a CPU and not needed at this size).
    """

    def __init__(self, vocab_size: int, max_len: int = 256, d_model: int = 96, n_layers: int = 3,
                 n_heads: int = 4, d_ff: int | None = None, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads:
            raise PrefoptError(f"model d_model={d_model} must be divisible by n_heads={n_heads}")
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(_Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int | torch.Tensor = 0):
        n, t = input_ids.shape
        past = 0 if cache is None else cache.length
        total = past + t
        if attention_mask is not None and attention_mask.shape != (n, total):
            raise PrefoptError(f"MelodyTransformer: attention_mask {tuple(attention_mask.shape)} must be "
                               f"[N, cached + new] = {(n, total)}")
        if position_ids is None:
            position_ids = torch.arange(past, total, device=input_ids.device).expand(n, t)
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        if int(position_ids.max()) >= self.max_len:
            raise PrefoptError(f"MelodyTransformer: position {int(position_ids.max())} >= max_len {self.max_len}; "
                               "raise model.max_len or shorten the sequences")
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        if use_cache and cache is None:
            cache = KVCache(len(self.h), n, self.h[0].attn.n_heads, x.shape[-1] // self.h[0].attn.n_heads,
                            self.max_len, x.dtype, x.device)
        allowed = self._attention_mask(attention_mask, past, total, input_ids.device)
        for i, block in enumerate(self.h):
            x = block(x, allowed, cache, i)
        if cache is not None:
            cache.length = total
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.ln_f(x[:, keep]) @ self.wte.weight.T
        return CausalOutput(logits, cache) if use_cache else logits

    @staticmethod
    def _attention_mask(attention_mask, past, total, device):
        """``None`` where plain causal attention is exact, else the ``[N, 1, t, total]`` boolean mask.

        Without a cache and with every row's real tokens at its start (right padding, or none), causal
        attention never lets a real token see padding, so no mask is built (padded positions get outputs
        that nothing reads). Otherwise (left padding, or a cache) a query sees the earlier real keys and itself.
        """
        if past == 0:
            real = None if attention_mask is None else attention_mask.bool()
            if real is None or not bool((real[:, 1:] & ~real[:, :-1]).any()):
                return None
        else:
            real = attention_mask.bool() if attention_mask is not None else None
        query = torch.arange(past, total, device=device)
        key = torch.arange(total, device=device)
        allowed = (key[None, :] <= query[:, None])[None]                              # [1, t, total]
        if real is not None:
            allowed = allowed & real[:, None, :]                                      # [n, t, total]
        allowed = allowed | (key[None, None, :] == query[None, :, None])              # a row sees itself: no NaN
        return allowed[:, None]                                                       # [n, 1, t, total]


__all__ = ["CausalOutput", "KVCache", "MelodyTransformer"]

"""A small decoder-only transformer for token sequences (GPT-2 layout, a few hundred thousand parameters).

Its modules carry GPT-2's names (``c_attn``, ``c_proj``, ``c_fc``) so the sequence adapter's default LoRA
targets fit both. ``forward`` follows the Hugging Face calling convention that the adapter uses:
``forward(input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False)`` returns the
logits ``[N, T, V]``, or with ``use_cache=True`` a :class:`CausalOutput` with ``.logits`` and ``.cache``
(one ``(keys, values)`` pair per layer) to pass back with the next token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.errors import PrefoptError


@dataclass
class CausalOutput:
    logits: torch.Tensor
    cache: list[tuple[torch.Tensor, torch.Tensor]]


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x, allowed, past):
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, d)), (k, v)


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

    def forward(self, x, allowed, past):
        a, kv = self.attn(self.ln_1(x), allowed, past)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln_2(x))), kv


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
                position_ids: torch.Tensor | None = None, cache: list | None = None, use_cache: bool = False):
        n, t = input_ids.shape
        past = 0 if not cache else cache[0][0].shape[2]
        total = past + t
        if attention_mask is None:
            attention_mask = torch.ones(n, total, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (n, total):
            raise PrefoptError(f"MelodyTransformer: attention_mask {tuple(attention_mask.shape)} must be "
                               f"[N, cached + new] = {(n, total)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        if int(position_ids.max()) >= self.max_len:
            raise PrefoptError(f"MelodyTransformer: position {int(position_ids.max())} >= max_len {self.max_len}; "
                               "raise model.max_len or shorten the sequences")
        query = torch.arange(past, total, device=input_ids.device)
        key = torch.arange(total, device=input_ids.device)
        causal = key[None, :] <= query[:, None]                                      # [t, total]
        allowed = causal[None] & attention_mask.bool()[:, None, :]                   # [n, t, total]
        allowed = allowed | (key[None, None, :] == query[None, :, None])             # a row sees itself: no NaN
        allowed = allowed[:, None]                                                   # [n, 1, t, total]
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        new_cache = []
        for i, block in enumerate(self.h):
            x, kv = block(x, allowed, cache[i] if cache else None)
            new_cache.append(kv)
        logits = self.ln_f(x) @ self.wte.weight.T
        return CausalOutput(logits, new_cache) if use_cache else logits


__all__ = ["CausalOutput", "MelodyTransformer"]

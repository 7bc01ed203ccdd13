"""Multi-head attention with fewer heads than its embedding has room for.

``nn.MultiheadAttention`` ties ``num_heads * head_dim`` to ``embed_dim`` (the width of the model),
so it cannot lose a head. ``HeadPrunedAttention`` is the same computation with an inner width of
its own: ``fastprox.compact`` puts it in place of an ``nn.MultiheadAttention`` whose dead heads
it removes. Same call signature and outputs; ``need_weights`` returns the attention weights
averaged over heads (or per head), as ``nn.MultiheadAttention`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadPrunedAttention(nn.Module):
    """Self/cross attention: ``in_proj_weight`` ``(3 * num_heads * head_dim, embed_dim)`` (q, k, v
    stacked), ``in_proj_bias``, ``out_proj`` ``Linear(num_heads * head_dim, embed_dim)``.

    ``_qkv_same_embed_dim`` is False so that ``nn.TransformerEncoderLayer`` takes its standard
    (non-fused) path, which calls this module."""

    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)

    @classmethod
    def from_attention(cls, mha, heads: torch.Tensor):
        """The heads ``heads`` (indices) of ``mha`` (an ``nn.MultiheadAttention`` with packed
        q, k, v, or a ``HeadPrunedAttention``), weights copied."""
        hd, e = mha.head_dim, mha.embed_dim
        inner = mha.num_heads * hd
        rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        packed = torch.cat([rows, rows + inner, rows + 2 * inner])
        w = mha.in_proj_weight.detach()
        new = cls(e, len(heads), hd, bias=mha.in_proj_bias is not None, dropout=mha.dropout,
                  batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(w[packed.to(w.device)])
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias.detach()[packed.to(w.device)])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach()[:, rows.to(w.device)])
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        new.train(mha.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, tgt, _ = query.shape
        src = key.shape[1]
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        wq, wk, wv = w.split(inner)

        def heads(x, weight, bias, length):
            return F.linear(x, weight, bias).view(batch, length, self.num_heads,
                                                  self.head_dim).transpose(1, 2)

        q, k, v = heads(query, wq, bq, tgt), heads(key, wk, bk, src), heads(value, wv, bv, src)
        mask = _merged_mask(attn_mask, key_padding_mask, batch, self.num_heads, tgt, src,
                            q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt, inner))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _merged_mask(attn_mask, key_padding_mask, batch, num_heads, tgt, src, dtype):
    """``nn.MultiheadAttention``'s masks as one additive float mask (batch, heads, tgt, src):
    True in a bool mask means "not allowed"."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.view(batch, num_heads, tgt, src) if m.dim() == 3 else m.view(1, 1, tgt, src)
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf"))
        k = k.to(dtype).view(batch, 1, 1, src)
        mask = k if mask is None else mask + k
    return mask

"""nn.MultiheadAttention with a prefix: torch's module reads its projection weights itself and
takes no cache, so the PrefixLayer runs its projections, [P_k ; K], [P_v ; V], scaled
dot-product attention and its output projection (moved from prefix_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mha_forward(layer, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention with a prefix: its own projections, [P_k ; K], [P_v ; V], then
    scaled dot-product attention and its output projection. Returns (output, None): attention
    weights are not computed on this path. Unbatched inputs ((T, E), as torch takes them) and
    add_zero_attn (a zero key and value after the sequence's, as torch appends them) as in torch."""
    mha: nn.MultiheadAttention = layer.base
    check_mha(mha, "this nn.MultiheadAttention")
    unbatched = query.dim() == 2
    if unbatched:  # (T, E) -> one batch; masks (S,) -> (1, S); a (H, T, S) attn_mask is already (B * H, T, S)
        query, key, value = (x.unsqueeze(0 if mha.batch_first else 1) for x in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if not mha.batch_first:  # (T, B, E) -> (B, T, E)
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    B, T, E = query.shape
    S, H, hd = key.shape[1], mha.num_heads, mha.head_dim
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = F.linear(key, w_k, b_k).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
    v = F.linear(value, w_v, b_v).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
    pk, pv = layer.prefixes(B, q.dtype)  # (B, H, P, hd)
    P = pk.shape[2]
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P + S, hd)
    mask = torch.zeros(B, 1, T, S, dtype=q.dtype, device=q.device)  # additive, (B, 1, T, S)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:  # (T, S) or (B * H, T, S); bool: True = blocked (torch's convention)
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(B, H, T, S)
        mask = mask + (torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m)
    if key_padding_mask is not None:  # (B, S); bool: True = padding
        m = key_padding_mask
        m = torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m
        mask = mask + m[:, None, None, :]
    mask = torch.cat([torch.zeros(*mask.shape[:-1], P, dtype=q.dtype, device=q.device), mask], dim=-1)  # (.., T, P+S)
    if mha.add_zero_attn:  # torch appends a zero key and value, which every query may attend to
        k, v = (torch.cat([t, t.new_zeros(B, H, 1, hd)], dim=2) for t in (k, v))
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 1)], dim=-1)
    dropout = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, hd)
    out = mha.out_proj(out.transpose(1, 2).reshape(B, T, E))  # (B, T, E)
    if unbatched:
        return out[0], None
    return (out if mha.batch_first else out.transpose(0, 1)), None


def check_mha(mha: nn.MultiheadAttention, where: str) -> None:
    """What mha_forward computes: one embed_dim for queries, keys and values, and no add_bias_kv."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None:
        raise NotImplementedError(f"prefix tuning on nn.MultiheadAttention ({where}) needs kdim == vdim == embed_dim "
                                  f"and add_bias_kv=False; got embed_dim={mha.embed_dim}, kdim={mha.kdim}, "
                                  f"vdim={mha.vdim}, add_bias_kv={mha.bias_k is not None}")

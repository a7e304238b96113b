"""Attention for the runner: torch SDPA (flash / memory-efficient kernels), never a full
attention matrix in Python."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

_flash_lse_ok = True  # set False once the flash op refuses our shapes (e.g. an old torch)

# Not cuDNN attention (torch's first choice on Hopper): it builds an execution plan for every new
# shape, ~10-30 ms of CPU per call, and here every decode step and every compressed layer has a
# new length. Flash (no mask) and memory-efficient (masks) kernels take any length.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                     want_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Causal self-attention of left-aligned ragged rows q [B, Hq, n, D], k/v [B, Hkv, n, D].

    Padding follows every sequence, so the causal mask alone keeps valid rows from seeing it.
    With want_lse on CUDA (fp16/bf16), also returns the natural log-sum-exp of every row
    [B, Hq, n] from torch's flash attention, which the ensemble scores then reuse.
    """
    global _flash_lse_ok
    if want_lse and _flash_lse_ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True, False, scale=scale)[:2]
            return out, lse[..., : q.shape[2]].float()
        except RuntimeError:
            _flash_lse_ok = False
    return _sdpa(q, k, v, is_causal=True, scale=scale), None


def shared_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, q_lens: Tensor, k_pos: Tensor,
                     k_lens: Tensor, scale: float) -> Tensor:
    """Attention of a cross-layer reader's queries q [B, Hq, n, D] over its slot's keys/values
    [B, Hkv, N, D] when the reader holds a subset of the slot's tokens (PyramidInfer dropped some
    in between): a query at original position p sees the valid keys at positions <= p.

    Padding query rows (past q_lens) see only key 0: a fully masked row would give NaN, which
    would poison later layers through masked-out (0 * NaN) products. Valid rows always see at
    least their own token, which the slot holds.
    """
    n, N = q.shape[2], k.shape[2]
    see = (k_pos[:, None, :] <= q_pos[:, :, None]) & (torch.arange(N, device=k.device) < k_lens[:, None])[:, None]
    pad_row = torch.arange(n, device=q.device)[None, :, None] >= q_lens[:, None, None]
    see = see | (pad_row & (torch.arange(N, device=k.device) == 0))
    return _sdpa(q, k, v, attn_mask=see[:, None], scale=scale)


_varlen_ok = True  # set False once the flash varlen op refuses our arguments


def decode_attention(q: Tensor, c, scale: float, width: int) -> Tensor:
    """One new query per sequence [B, Hq, 1, D] over a layer cache `c` (a LayerCache).

    On CUDA in fp16/bf16: flash attention in varlen mode over the token-major storage, reading
    only each sequence's lengths[b] rows (no mask, fixed shapes: CUDA-graph friendly). Elsewhere:
    SDPA over the first `width` rows with a length mask (none when every length is `width`).
    """
    global _varlen_ok
    B, Hq, _, D = q.shape
    if _varlen_ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256:
        cap, Hkv = c.k_store.shape[1], c.k_store.shape[2]
        starts = torch.arange(B + 1, device=q.device, dtype=torch.int32)
        try:
            out = torch.ops.aten._flash_attention_forward(
                q.transpose(1, 2).reshape(B, Hq, D), c.k_store.view(B * cap, Hkv, D),
                c.v_store.view(B * cap, Hkv, D), starts, starts * cap, 1, cap, 0.0, False, False,
                scale=scale, seqused_k=c.lengths.int())[0]
            return out.view(B, 1, Hq, D).transpose(1, 2)
        except RuntimeError:
            _varlen_ok = False
    k, v = c.keys(width), c.values(width)
    mask = None
    if not (c.exact and width == c.bound):
        mask = (torch.arange(width, device=k.device) < c.lengths[:, None])[:, None, None, :]
    return _sdpa(q, k, v, attn_mask=mask, scale=scale)

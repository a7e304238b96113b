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


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float,
                     exact: bool) -> Tensor:
    """One new query per sequence [B, Hq, 1, D] over cached rows [B, Hkv, N, D], of which
    sequence b holds lengths[b] (every one of them N when `exact`)."""
    mask = None
    if not exact:
        mask = (torch.arange(k.shape[2], device=k.device) < lengths[:, None])[:, None, None, :]
    return _sdpa(q, k, v, attn_mask=mask, scale=scale)

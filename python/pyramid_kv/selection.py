"""Selection steps shared by prefill, decode and the evaluation baselines, composed from the ops.

Everything here runs on the device with fixed shapes: per-sequence values (lengths, windows,
budgets) stay tensors, and only host-side upper bounds decide buffer widths.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops


def recent_lengths(lengths: Tensor, ratio: float) -> Tensor:
    """Recent window of each sequence: ceil(ratio * length), at least 1 token when non-empty."""
    r = torch.ceil(lengths.double() * ratio).long()
    return torch.minimum(r.clamp(min=1), lengths)


def recent_bound(width: int, ratio: float) -> int:
    """Host upper bound of recent_lengths for lengths <= width."""
    return min(width, max(1, math.ceil(width * ratio))) if width else 0


def gather_rows(x: Tensor, lengths: Tensor, rows: int) -> Tensor:
    """The last `rows` rows before each sequence's end: x [B, H, N, ...] -> [B, H, rows, ...].

    Row w of sequence b is x[b, :, lengths[b] - rows + w]; rows before position 0 repeat row 0
    (the ops ignore rows at negative positions).
    """
    B, H, N = x.shape[:3]
    pos = (lengths[:, None] - rows + torch.arange(rows, device=x.device)).clamp(min=0, max=max(N - 1, 0))
    index = pos.view(B, 1, rows, *([1] * (x.dim() - 3))).expand(B, H, rows, *x.shape[3:])
    return torch.gather(x, 2, index)


def row_weights(recent: Tensor, rows: int, weighting: str, newest: float) -> Tensor:
    """[B, rows] float32 weights of end-aligned recent rows: 0 outside each sequence's window,
    uniform 1 or rising linearly from 1 (oldest) to `newest` (the newest row)."""
    w = torch.arange(rows, device=recent.device)[None, :]
    own = w - (rows - recent[:, None])  # index within the sequence's own window
    inside = own >= 0
    if weighting == "uniform":
        vals = torch.ones_like(own, dtype=torch.float32)
    else:
        span = (recent[:, None] - 1).clamp(min=1).float()
        vals = 1.0 + (newest - 1.0) * own.float() / span
    return torch.where(inside, vals, 0.0).float()


def select_context(scores: Tensor, lengths: Tensor, recent: Tensor, budget, *, by_mass: bool,
                   sinks: int, min_keep: int, context_bound: int, keep_bound: Optional[int],
                   recent_bound_: int) -> Tuple[Tensor, Tensor]:
    """Select among each segment's context (the tokens before its recent window), then append
    the window. Returns ascending indices [S, capacity + recent_bound_] and counts [S].

    scores [S, >= context_bound]; lengths, recent [S]; budget: top-p (float or [S] tensor) or
    top-k (int or [S] tensor). Host bounds: every context length <= context_bound, every
    window <= recent_bound_, and (top-k) every budget <= keep_bound.
    """
    context = (lengths - recent).clamp(min=0)
    recent = lengths - context
    floor = max(sinks, min_keep)
    capacity = context_bound if keep_bound is None else min(context_bound, keep_bound + floor)
    fn = ops.select_top_p if by_mass else ops.select_top_k
    sel = fn(scores[:, :context_bound], context, budget, sink=sinks, recent=0, min_keep=min_keep,
             capacity=capacity, validate=False)
    width = capacity + recent_bound_
    i = torch.arange(width, device=scores.device)[None, :]
    cnt = sel.counts.long()[:, None]
    picked = torch.nn.functional.pad(sel.indices, (0, recent_bound_), value=-1).long()
    idx = torch.where(i < cnt, picked, context[:, None] + (i - cnt))
    counts = sel.counts.long() + recent
    idx = torch.where(i < counts[:, None], idx, -1)
    return idx, counts


def splice_chunk(lengths: Tensor, start: Tensor, chunk: int, kept: Tensor, kept_count: int,
                 width: int) -> Tuple[Tensor, Tensor]:
    """Index lists that drop a chunk's unkept tokens and close the gap.

    Rows before `start` stay, then the chunk's kept offsets `kept` [S, >= kept_count] (ascending),
    then the rows after the chunk move down. lengths/start [S]; returns ([S, width], counts [S]).
    """
    i = torch.arange(width, device=lengths.device)[None, :]
    s = start[:, None]
    rel = (i - s).clamp(min=0, max=max(kept_count - 1, 0))
    in_chunk = s + kept.long().gather(1, rel) if kept_count else s
    idx = torch.where(i < s, i, torch.where(i < s + kept_count, in_chunk, i + (chunk - kept_count)))
    counts = lengths - (chunk - kept_count)
    return torch.where(i < counts[:, None], idx, -1), counts


def compact_inplace(tensors, indices: Tensor, counts: Tensor) -> None:
    """Move the kept rows of each [B, H, N, D] tensor to its front (indices ascending); rows
    past the counts keep stale (finite) cache rows, which attention masks out."""
    ops.compact_(tensors, indices, counts, validate=False)

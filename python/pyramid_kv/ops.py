"""Typed wrappers over the ``torch.ops.pyramid_kv`` ops (contracts in docs/ops.md).

Shape, dtype and device rules are enforced by the ops themselves (CPU and CUDA alike). Value
rules (lengths within [0, N], indices within range, per-segment budgets) are checked inline by
the CPU kernels; a CUDA kernel cannot raise without a host synchronisation, so it clamps
instead, and these wrappers check the values first unless ``validate=False`` (hot paths) or
the environment sets ``PYRAMID_KV_VALIDATE=0``.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

_ops = torch.ops.pyramid_kv


def _validate_default() -> bool:
    return os.environ.get("PYRAMID_KV_VALIDATE", "1") != "0"


def _needs_value_checks(t: Tensor, validate: Optional[bool]) -> bool:
    if validate is None:
        validate = _validate_default()
    return validate and t.device.type != "cpu"


def _first_bad(bad: Tensor) -> Optional[int]:
    """Flat index of the first True in bad, or None (one host sync, only when validating)."""
    flat = bad.flatten()
    return int(flat.nonzero()[0]) if bool(flat.any()) else None


def _check_lengths(lengths: Tensor, n: int) -> None:
    i = _first_bad((lengths < 0) | (lengths > n))
    if i is not None:
        raise ValueError(f"lengths[{i}] = {int(lengths.flatten()[i])} is outside [0, N={n}]")


def _check_top_p(top_p: Tensor) -> None:
    i = _first_bad(~((top_p > 0) & (top_p <= 1)))  # NaN fails too
    if i is not None:
        raise ValueError(f"maybe_top_p[{i}] = {top_p.flatten()[i].item():g} is outside (0, 1]")


def _check_top_k(top_k: Tensor) -> None:
    i = _first_bad(top_k < 0)
    if i is not None:
        raise ValueError(f"maybe_top_k[{i}] = {int(top_k.flatten()[i])} is negative")


def _check_compact_values(indices: Tensor, counts: Tensor, n: int) -> None:
    c = indices.shape[-1]
    cnt = counts.flatten()
    i = _first_bad((cnt < 0) | (cnt > c))
    if i is not None:
        raise ValueError(f"counts[{i}] = {int(cnt[i])} is outside [0, C={c}]")
    if c == 0:
        return
    rows = indices.reshape(-1, c)
    live = torch.arange(c, device=indices.device) < cnt[:, None]
    i = _first_bad(live & ((rows < 0) | (rows >= n)))
    if i is not None:
        r, e = divmod(i, c)
        raise ValueError(f"indices row {r} entry {e} = {int(rows[r, e])} is outside [0, N={n})")


def _check_ascending(indices: Tensor, counts: Tensor) -> None:
    c = indices.shape[-1]
    if c < 2:
        return
    rows = indices.reshape(-1, c)
    live = torch.arange(1, c, device=indices.device) < counts.flatten()[:, None]
    i = _first_bad(live & (rows[:, 1:] <= rows[:, :-1]))
    if i is not None:
        r, e = divmod(i, c - 1)
        raise ValueError(f"indices row {r} must be strictly ascending for in-place compaction: "
                         f"entry {e + 1} = {int(rows[r, e + 1])} follows {int(rows[r, e])}")


def _select_shapes_agree(scores: Tensor, lengths: Tensor) -> bool:
    """As _compact_shapes_agree, for the selection ops."""
    return (scores.dim() == 2 and (scores.shape[1] <= 1 or scores.stride(1) == 1)
            and lengths.shape == scores.shape[:1])


def _compact_shapes_agree(src: List[Tensor], indices: Tensor, counts: Tensor) -> bool:
    """Value checks only once the shapes are sane; otherwise the op reports the shape error."""
    return (bool(src) and src[0].dim() == 4 and indices.dim() in (2, 3)
            and counts.shape == indices.shape[:-1])


class Selection(NamedTuple):
    """Kept positions of each segment, ascending, -1 past ``counts`` (both int32)."""

    indices: Tensor
    counts: Tensor


def ensemble_scores(q: Tensor, k: Tensor, lengths: Tensor, *, row_weights: Optional[Tensor] = None,
                    lse: Optional[Tensor] = None, scale: Optional[float] = None,
                    validate: Optional[bool] = None) -> Tensor:
    """Per-key ensemble of the recent queries' causal softmax attention.

    Parameters
    ----------
    q : Tensor [B, Hq, W, D]
        The last W queries of each sequence (row w of sequence b is the query at position
        ``lengths[b] - W + w``; rows at negative positions are ignored), after RoPE.
    k : Tensor [B, Hkv, N, D]
        Keys after RoPE, same dtype as q (float32, float16 or bfloat16); Hq % Hkv == 0.
    lengths : Tensor [B], int32 or int64
        Valid keys of each sequence (0 <= lengths[b] <= N).
    row_weights : Tensor [B, W], float32, optional
        Weight of each recent row (default 1); zero weights disable rows.
    lse : Tensor [B, Hq, W], float32, optional
        Natural log-sum-exp of ``scale * q . k`` over the keys each row sees, if the caller's
        attention already produced it (saves the normaliser pass).
    scale : float, optional
        Softmax scale, default ``D ** -0.5``.

    Returns
    -------
    Tensor [B, Hkv, N], float32
        ``sum_{g in group, w} row_weights[b, w] * softmax_w(q . k * scale)[j]``; 0 at j >= lengths[b].
    """
    if scale is None:
        scale = max(_tokens(q, -1), 1) ** -0.5
    if _needs_value_checks(lengths, validate):
        _check_lengths(lengths, _tokens(k, 2))
    return _ops.ensemble_scores.default(q, k, lengths, row_weights, lse, float(scale))


def _tokens(t: Tensor, dim: int) -> int:
    """Size of dim, or 0 when t has too few dims (the op then reports the bad shape)."""
    return t.shape[dim] if -t.dim() <= dim < t.dim() else 0


def _capacity(scores: Tensor, capacity: Optional[int]) -> int:
    return _tokens(scores, -1) if capacity is None else int(capacity)


def select_top_p(scores: Tensor, lengths: Tensor, top_p: Union[float, Tensor], *, sink: int = 0,
                 recent: int = 0, min_keep: int = 0, capacity: Optional[int] = None,
                 validate: Optional[bool] = None) -> Selection:
    """Keep, per segment, the smallest set of highest scores holding ``top_p`` of the mass.

    Parameters
    ----------
    scores : Tensor [S, N], float32, float16 or bfloat16
        Non-negative scores (attention mass); negative and NaN entries count as zero mass.
    lengths : Tensor [S], int32 or int64
        Valid entries of each segment.
    top_p : float in (0, 1] or Tensor [S] float32
        Fraction of the candidates' mass to keep (per segment when a tensor).
    sink, recent : int
        The first ``sink`` and last ``recent`` valid positions are always kept and are not
        candidates (their mass is not counted).
    min_keep : int
        Keep at least ``min(min_keep, length)`` positions in all.
    capacity : int, optional
        Output width and hard cap on the kept count (default N); must hold the forced positions.

    Returns
    -------
    Selection(indices [S, capacity] int32 ascending, -1 padded; counts [S] int32)
    """
    maybe = top_p if isinstance(top_p, Tensor) else None
    if _select_shapes_agree(scores, lengths) and _needs_value_checks(lengths, validate):
        if maybe is not None:
            _check_top_p(maybe)
        _check_lengths(lengths, _tokens(scores, -1))
    p = 1.0 if maybe is not None else float(top_p)
    return Selection(*_ops.select_top_p.default(scores, lengths, maybe, p, sink, recent, min_keep,
                                                _capacity(scores, capacity)))


def select_top_k(scores: Tensor, lengths: Tensor, top_k: Union[int, Tensor], *, sink: int = 0,
                 recent: int = 0, min_keep: int = 0, capacity: Optional[int] = None,
                 validate: Optional[bool] = None) -> Selection:
    """Keep, per segment, the ``top_k`` highest-scoring candidates plus the forced positions.

    Same arguments as :func:`select_top_p`, with ``top_k`` an int >= 0 or an int32/int64
    Tensor [S]. Ties keep the lower position.
    """
    maybe = top_k if isinstance(top_k, Tensor) else None
    if _select_shapes_agree(scores, lengths) and _needs_value_checks(lengths, validate):
        if maybe is not None:
            _check_top_k(maybe)
        _check_lengths(lengths, _tokens(scores, -1))
    k = 0 if maybe is not None else int(top_k)
    return Selection(*_ops.select_top_k.default(scores, lengths, maybe, k, sink, recent, min_keep,
                                                _capacity(scores, capacity)))


def compact(src: Sequence[Tensor], indices: Tensor, counts: Tensor, *,
            out: Optional[Sequence[Tensor]] = None, validate: Optional[bool] = None) -> List[Tensor]:
    """Gather the kept token rows of several [B, H, N, D] tensors in one launch.

    Parameters
    ----------
    src : sequence of Tensor [B, H_t, N, D_t]
        Any dtype, any strides with a contiguous last dim ([B, N, H, D] storage: pass
        ``x.transpose(1, 2)``; hidden states [B, N, C]: ``h.unsqueeze(1)``; position ids
        [B, N]: ``p[:, None, :, None]``).
    indices : Tensor [B, C] or [B, H, C], int32 or int64
        Kept source rows per sequence (applied to every head) or per head.
    counts : Tensor [B] or [B, H], int32 or int64
        Number of valid entries of each index row (<= C).
    out : sequence of Tensor [B, H_t, >= C, D_t], optional
        Caller's buffers (must not overlap src); rows past the counts are left untouched.

    Returns
    -------
    list of Tensor [B, H_t, C, D_t] (``out`` itself when given); with no ``out``, rows past
    the counts are zero.
    """
    src = list(src)
    if _compact_shapes_agree(src, indices, counts) and _needs_value_checks(indices, validate):
        _check_compact_values(indices, counts, src[0].shape[2])
    if out is None:
        return list(_ops.compact.default(src, indices, counts))
    out = list(out)
    _ops.compact_out.default(src, indices, counts, out)
    return out


def compact_(src: Sequence[Tensor], indices: Tensor, counts: Tensor, *,
             validate: Optional[bool] = None) -> List[Tensor]:
    """Move the kept token rows of several [B, H, N, D] tensors to their front, in place.

    Row ``i < counts[b, (h)]`` of ``src[t][b, h]`` becomes its row ``indices[b, (h,) i]``, all
    tensors in one launch, without a second buffer.

    Parameters
    ----------
    src : sequence of Tensor [B, H_t, N, D_t]
        As for :func:`compact`; each tensor is modified in place. No tensor may share memory with
        itself (zero strides) or with another tensor of the call.
    indices : Tensor [B, C] or [B, H, C], int32 or int64
        Kept rows, STRICTLY ASCENDING within each row's count (so ``indices[i] >= i``: rows
        only move towards the front). Entries past the count are ignored.
    counts : Tensor [B] or [B, H], int32 or int64
        Number of valid entries of each index row (<= C).
    validate : bool, optional
        Check the index values and their ascent first (CUDA; synchronises with the host). The
        CPU kernel always checks. Unchecked bad indices on CUDA give unspecified rows but never
        out-of-bounds accesses.

    Returns
    -------
    The list of ``src`` tensors. Rows at or past the counts hold unspecified data afterwards.
    """
    src = list(src)
    if _compact_shapes_agree(src, indices, counts) and _needs_value_checks(indices, validate):
        _check_compact_values(indices, counts, src[0].shape[2])
        _check_ascending(indices, counts)
    _ops.compact_.default(src, indices, counts)
    return src


class Merged(NamedTuple):
    """A merged pair of layers (see :func:`slerp_merge`)."""

    direction: Tensor
    norm_a: Tensor
    norm_b: Tensor
    distance: Tensor


def slerp_merge(a: Tensor, b: Tensor, t: float = 0.5, eps: float = 1e-6) -> Merged:
    """MiniCache merge of two layers' K (or V): per-vector norms and the SLERP of the directions.

    Parameters
    ----------
    a, b : Tensor [B, X, Y, D]
        The two layers' vectors (e.g. a token-major cache view [B, N, H, D] or [B, H, N, D]),
        same shape, dtype (float32, float16 or bfloat16) and device; any strides with a
        contiguous last dim (views such as ``cache[:, :n]`` are read in place).
    t : float
        Interpolation weight in [0, 1]: 0 gives a's direction, 1 gives b's, 0.5 the midpoint.
    eps : float
        Where sin(angle) < eps (nearly parallel or antiparallel directions) the direction is the
        normalised lerp ``normalize((1-t) a_hat + t b_hat)`` (0 if that is 0).

    Returns
    -------
    Merged(direction [B, X, Y, D] in the input dtype (unit norm, or 0), norm_a, norm_b,
    distance: float32 [B, X, Y]), all contiguous; distance = angle / pi in [0, 1]. A zero vector
    takes the other's direction; two zero vectors give direction 0 and distance 0. Restore a
    layer with :func:`slerp_restore` ``(direction, norm_a)``; keep the most divergent tokens
    unmerged with ``select_top_k`` / ``compact`` on ``distance``.
    """
    t, eps = float(t), float(eps)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return Merged(*_ops.slerp_merge.default(a, b, t, eps))


def slerp_restore(direction: Tensor, norm: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Restore one merged layer: ``norm[..., None] * direction`` (float32 math).

    Parameters
    ----------
    direction : Tensor [B, X, Y, D]
        float32, float16 or bfloat16, any strides with a contiguous last dim.
    norm : Tensor [B, X, Y], float32
        Any strides (e.g. ``norm_a`` of :func:`slerp_merge`).
    out : Tensor [B, X, Y, D], optional
        Destination (e.g. a view of a cache workspace), direction's dtype and shape, contiguous
        last dim, any other strides.

    Returns
    -------
    Tensor [B, X, Y, D] in direction's dtype (``out`` itself when given).
    """
    if out is None:
        return _ops.slerp_restore.default(direction, norm)
    _ops.slerp_restore_out.default(direction, norm, out)
    return out


def merged_attention(q: Tensor, dir_k: Tensor, dir_v: Tensor, norm_k: Tensor, norm_v: Tensor,
                     lengths: Tensor, retained_k: Tensor, retained_v: Tensor,
                     retained_counts: Tensor, tail_k: Tensor, tail_v: Tensor,
                     tail_lengths: Tensor, scale: Optional[float] = None) -> Tensor:
    """Decode attention over a MiniCache merged layer without restoring its K/V.

    The key set of (sequence b, KV head h) is the union of: the prompt tokens t < lengths[b]
    with ``norm_k[b, t, h] >= 0`` (key ``norm_k * dir_k``, value ``norm_v * dir_v``, products in
    float32; a negative key norm flags a retained token, whose original row is given in the
    retained rows instead), the retained rows c < retained_counts[b, h], and the tail rows
    u < tail_lengths[b]. Query head ``hq`` reads KV head ``hq // (Hq // Hkv)``.

    Parameters
    ----------
    q : Tensor [B, Hq, D]
        One decode query per sequence and query head; float32, float16 or bfloat16; contiguous
        last dim.
    dir_k, dir_v : Tensor [B, P, Hkv, D]
        The merged pair's shared unit directions (token-major, as ``slerp_merge`` returns them
        for a ``[B, N, H, D]`` cache), q's dtype, any strides with a contiguous last dim.
    norm_k, norm_v : Tensor [B, P, Hkv], float32
        This layer's norms (any strides).
    lengths : Tensor [B], int64
        Prompt rows of each sequence (clamped into [0, P]).
    retained_k, retained_v : Tensor [B, Hkv, C, D]
        This layer's original rows of the retained tokens (any strides, contiguous last dim).
    retained_counts : Tensor [B, Hkv], int64
        Valid retained rows per (sequence, KV head) (clamped into [0, C]).
    tail_k, tail_v : Tensor [B, T, Hkv, D]
        Raw decode tokens, token-major (a ``LayerCache``'s ``k_store`` / ``v_store``).
    tail_lengths : Tensor [B], int64
        Valid tail rows of each sequence (clamped into [0, T]).
    scale : float, optional
        Softmax scale, finite and > 0; default ``D ** -0.5``.

    Returns
    -------
    Tensor [B, Hq, D] in q's dtype: ``softmax(scale * q . k) @ v`` over the key set, computed in
    float32; zeros for a head with no keys. No host synchronisation (CUDA-graph safe).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ops.merged_attention.default(q, dir_k, dir_v, norm_k, norm_v, lengths, retained_k,
                                         retained_v, retained_counts, tail_k, tail_v,
                                         tail_lengths, scale)

"""Plain-PyTorch versions of every op: the definitions that tests and benchmarks compare with.

They follow docs/ops.md exactly (same tie rule, same padding) and are vectorised, so the
benchmarks time them as the eager baseline. Pass float64 inputs for a float64 evaluation.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def ensemble_scores(q: Tensor, k: Tensor, lengths: Tensor, row_weights: Optional[Tensor] = None,
                    lse: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Eager ensemble scores: materialises the [W, N] attention of every head (see ops)."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhgwd,bhnd->bhgwn", q.to(ct).reshape(B, Hkv, G, W, D), k.to(ct)) * scale
    pos = lengths.long()[:, None] - W + torch.arange(W, device=q.device)  # [B, W]
    visible = (torch.arange(N, device=q.device) <= pos[:, :, None])[:, None, None]  # [B,1,1,W,N]
    s = s.masked_fill(~visible, float("-inf"))
    if lse is None:
        norm = torch.logsumexp(s, -1, keepdim=True)
    else:
        norm = lse.to(ct).reshape(B, Hkv, G, W, 1)
    p = torch.where(visible, torch.exp(s - norm), 0.0)
    if row_weights is not None:
        p = p * row_weights.to(ct)[:, None, None, :, None]
    return p.sum((2, 3))


def order_keys(scores: Tensor) -> Tensor:
    """Monotone int64 keys in [0, 2^32) of float scores: NaN ranks as -inf and -0 equals +0."""
    x = scores.float()
    x = torch.where(torch.isnan(x), float("-inf"), x)
    x = torch.where(x == 0, 0.0, x)
    u = x.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >= 0x80000000, 0xFFFFFFFF - u, u + 0x80000000)


def masses(scores: Tensor) -> Tensor:
    """The mass of each score for top-p, in float64: max(score, 0), NaN as 0."""
    x = scores.float().double()
    return torch.where(torch.isnan(x), 0.0, x).clamp(min=0.0)


def segment_masks(lengths: Tensor, n: int, sink: int, recent: int) -> Tuple[Tensor, Tensor]:
    """(forced, candidate) boolean masks [S, n] of a selection."""
    pos = torch.arange(n, device=lengths.device)[None]
    length = lengths.long()[:, None]
    n_sink = length.clamp(max=sink)
    recent_start = torch.maximum(length - recent, n_sink)
    valid = pos < length
    forced = valid & ((pos < n_sink) | (pos >= recent_start))
    return forced, valid & ~forced


def _select(scores: Tensor, lengths: Tensor, budget, by_mass: bool, sink: int, recent: int,
            min_keep: int, capacity: Optional[int]) -> Tuple[Tensor, Tensor]:
    S, N = scores.shape
    dev = scores.device
    capacity = N if capacity is None else capacity
    forced, cand = segment_masks(lengths, N, sink, recent)
    # One stable sort: candidates first, then score descending, then position ascending.
    composite = torch.where(cand, order_keys(scores), -1)
    order = torch.sort(composite, dim=1, descending=True, stable=True).indices
    n_cand, n_forced = cand.sum(1), forced.sum(1)
    if by_mass:
        p = budget.double() if isinstance(budget, Tensor) else torch.full((S,), float(budget), device=dev,
                                                                          dtype=torch.float64)
        csum = torch.where(cand, masses(scores), 0.0).gather(1, order).cumsum(1)
        total = csum[:, -1] if N else torch.zeros(S, dtype=torch.float64, device=dev)
        target = p * total
        r = torch.where(target > 0, (csum < target[:, None]).sum(1) + 1, 0)
    else:
        r = budget.long() if isinstance(budget, Tensor) else torch.full((S,), int(budget), device=dev)
    r = torch.maximum(r, min_keep - n_forced)
    r = torch.minimum(r.clamp(min=0), torch.minimum(n_cand, capacity - n_forced))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=dev).expand(S, N))
    kept = forced | (cand & (rank < r[:, None]))
    counts = kept.sum(1)
    ascending = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices
    indices = torch.full((S, capacity), -1, dtype=torch.int32, device=dev)
    w = min(N, capacity)
    live = torch.arange(w, device=dev) < counts[:, None]
    indices[:, :w] = torch.where(live, ascending[:, :w], -1).int()
    return indices, counts.int()


def select_top_p(scores: Tensor, lengths: Tensor, top_p, *, sink: int = 0, recent: int = 0,
                 min_keep: int = 0, capacity: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Sort-based top-p (sort, cumsum, mask, re-sort of the kept positions)."""
    return _select(scores, lengths, top_p, True, sink, recent, min_keep, capacity)


def select_top_k(scores: Tensor, lengths: Tensor, top_k, *, sink: int = 0, recent: int = 0,
                 min_keep: int = 0, capacity: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Sort-based top-k with the same forced positions and tie rule."""
    return _select(scores, lengths, top_k, False, sink, recent, min_keep, capacity)


def compact(src: Sequence[Tensor], indices: Tensor, counts: Tensor) -> List[Tensor]:
    """torch.gather of the kept rows; rows past the counts are zero."""
    C = indices.shape[-1]
    out = []
    for s in src:
        B, H, N, D = s.shape
        idx = indices.long()
        cnt = counts.long()
        if idx.dim() == 2:
            idx, cnt = idx[:, None, :].expand(B, H, C), cnt[:, None].expand(B, H)
        live = torch.arange(C, device=s.device) < cnt[..., None]
        if N == 0:
            out.append(s.new_zeros((B, H, C, D)))
            continue
        rows = torch.where(live, idx, 0)[..., None].expand(B, H, C, D)
        g = torch.gather(s, 2, rows)
        out.append(torch.where(live[..., None], g, torch.zeros((), dtype=s.dtype, device=s.device)))
    return out


def compact_(src: Sequence[Tensor], indices: Tensor, counts: Tensor) -> List[Tensor]:
    """In-place compaction through a gathered copy: rows below the count take their kept rows;
    the others stay as they were (the op leaves them unspecified)."""
    gathered = compact(src, indices, counts)
    C = indices.shape[-1]
    for s, g in zip(src, gathered):
        B, H, N, D = s.shape
        w = min(C, N)
        cnt = counts.long()
        if indices.dim() == 2:
            cnt = cnt[:, None].expand(B, H)
        live = (torch.arange(w, device=s.device) < cnt[..., None])[..., None]
        s[:, :, :w] = torch.where(live, g[:, :, :w], s[:, :, :w])
    return list(src)


def slerp_merge(a: Tensor, b: Tensor, t: float = 0.5, eps: float = 1e-6, *,
                compute_dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """MiniCache merge of a and b [..., D] as in docs/ops.md: acos of the clamped dot product of
    the unit directions, SLERP where sin(angle) >= eps, normalised lerp otherwise.

    Returns (direction in a's dtype, norm_a, norm_b, distance in float32). ``compute_dtype``
    float64 is the definition; the benchmarks pass float32 for an eager baseline.
    """
    x, y = a.to(compute_dtype), b.to(compute_dtype)
    na, nb = x.norm(dim=-1), y.norm(dim=-1)
    zero = torch.zeros((), dtype=compute_dtype, device=a.device)
    ah = torch.where(na[..., None] > 0, x / na[..., None].clamp(min=torch.finfo(compute_dtype).tiny), zero)
    bh = torch.where(nb[..., None] > 0, y / nb[..., None].clamp(min=torch.finfo(compute_dtype).tiny), zero)
    ah, bh = torch.where(na[..., None] > 0, ah, bh), torch.where(nb[..., None] > 0, bh, ah)
    both_zero = (na == 0) & (nb == 0)
    omega = (ah * bh).sum(-1).clamp(-1, 1).acos()
    s = omega.sin()
    use_slerp = (s >= eps) & (s > 0)
    safe = torch.where(use_slerp, s, torch.ones((), dtype=compute_dtype, device=a.device))
    slerp = ((((1 - t) * omega).sin() / safe)[..., None] * ah
             + ((t * omega).sin() / safe)[..., None] * bh)
    lerp = (1 - t) * ah + t * bh
    ln = lerp.norm(dim=-1, keepdim=True)
    lerp = torch.where(ln > 0, lerp / ln.clamp(min=torch.finfo(compute_dtype).tiny), zero)
    direction = torch.where(use_slerp[..., None], slerp, lerp)
    distance = torch.where(both_zero, zero, omega / torch.pi)
    return (direction.to(a.dtype), na.float(), nb.float(), distance.float())


def slerp_restore(direction: Tensor, norm: Tensor) -> Tensor:
    """norm[..., None] * direction in float64, rounded to direction's dtype."""
    return (norm.double()[..., None] * direction.double()).to(direction.dtype)


def merged_attention(q: Tensor, dir_k: Tensor, dir_v: Tensor, norm_k: Tensor, norm_v: Tensor,
                     lengths: Tensor, retained_k: Tensor, retained_v: Tensor,
                     retained_counts: Tensor, tail_k: Tensor, tail_v: Tensor,
                     tail_lengths: Tensor, scale: Optional[float] = None, *,
                     compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Decode attention over a merged layer as in docs/ops.md: the key set built explicitly
    ([prompt | retained | tail] rows, token-major), a masked softmax, zeros for an empty set.

    ``compute_dtype`` float64 is the definition; the benchmarks pass float32 for an eager
    baseline. Returns [B, Hq, D] in q's dtype.
    """
    B, Hq, D = q.shape
    P, Hkv = dir_k.shape[1], dir_k.shape[2]
    C, T = retained_k.shape[2], tail_k.shape[1]
    G = Hq // Hkv if Hkv else 1
    scale = D ** -0.5 if scale is None else scale
    dev, ct = q.device, compute_dtype
    keys = torch.cat([norm_k.to(ct)[..., None] * dir_k.to(ct), retained_k.to(ct).transpose(1, 2),
                      tail_k.to(ct)], dim=1)  # [B, P + C + T, Hkv, D]
    values = torch.cat([norm_v.to(ct)[..., None] * dir_v.to(ct), retained_v.to(ct).transpose(1, 2),
                        tail_v.to(ct)], dim=1)
    ar = lambda n: torch.arange(n, device=dev)  # noqa: E731
    prompt = (ar(P) < lengths.clamp(0, P)[:, None])[:, :, None] & (norm_k >= 0)     # [B, P, Hkv]
    kept = (ar(C) < retained_counts.clamp(0, C)[..., None]).transpose(1, 2)         # [B, C, Hkv]
    tail = (ar(T) < tail_lengths.clamp(0, T)[:, None])[:, :, None].expand(B, T, Hkv)
    valid = torch.cat([prompt, kept, tail], dim=1)                                  # [B, N, Hkv]
    values = values.masked_fill(~valid[..., None], 0.0)  # padding rows never reach the output
    qg = q.to(ct).reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, keys) * scale
    mask = valid.transpose(1, 2)[:, :, None, :]                                     # [B, Hkv, 1, N]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an empty key set: all -inf -> NaN -> 0
    p = torch.where(mask, p, 0.0)
    out = torch.einsum("bhgn,bnhd->bhgd", p, values)
    return out.reshape(B, Hq, D).to(q.dtype)

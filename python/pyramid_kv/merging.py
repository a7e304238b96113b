"""MiniCache cross-layer merging of two adjacent layers' prompt K/V (docs/integration.md).

After prefill, a merged pair (l, l + 1) keeps, for the prompt tokens both layers hold:

- one SLERP direction per (token, KV head) for K and one for V (cache dtype, token-major
  [B, P, Hkv, D] like ``LayerCache``), shared by the two layers;
- each layer's float32 norms per (token, KV head), for K and V;
- the ``retain`` fraction of each (sequence, KV head)'s tokens whose directions disagree most
  (summed K and V angular distance of ``ops.slerp_merge``, chosen with ``ops.select_top_k``),
  unmerged: each layer's ORIGINAL K/V rows, plus one index list for the pair.

Decode tokens are never merged: each layer of a pair appends them raw to its own small tail
(a ``LayerCache`` without prompt rows), and decode compression leaves merged layers alone.
The K norm of a retained (sequence, head, token) is stored as -1 in both layers: it marks the
token so that attention skips its merged row (its original row is among the retained ones).

To attend, a layer of a pair either runs ``ops.merged_attention`` directly over directions,
norms, retained rows and its tail (``attend``, merge["attention"] = "direct"), or restores into
ONE workspace shared by every merged layer (``restore``, "restore"): norm * direction for the
prompt rows (``ops.slerp_restore`` out=), the retained rows written over them, and the layer's
tail rows right after each sequence's prompt rows, so the workspace has the layout of an
unmerged cache of the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor

from . import ops
from .cache import LayerCache


@dataclass
class MergedPair:
    layers: Tuple[int, int]
    direction: List[Tensor]    # [K, V], each [B, P, Hkv, D] token-major, cache dtype
    norms: Tensor              # [2 layers, 2 (K, V), B, P, Hkv] float32
    retained: List[List[Tensor]]  # per layer [K, V] original rows [B, Hkv, C, D]
    indices: Tensor            # [B, Hkv, C] int64; entries past counts repeat a valid one
    counts: Tensor             # [B, Hkv] int64 retained tokens of each (sequence, KV head)
    lengths: Tensor            # [B] int64 prompt tokens each sequence holds in both layers
    bound: int                 # P: host upper bound of lengths
    exact: bool                # every length equals bound

    @classmethod
    def merge(cls, layers: Tuple[int, int], a: List[Tensor], b: List[Tensor], lengths: Tensor,
              bound: int, exact: bool, t: float, retain: float) -> "MergedPair":
        """Merge layer a's and layer b's [K, V] ([B, Hkv, N >= bound, D] each, the same tokens)."""
        B, H, _, D = a[0].shape
        tm = lambda x: x[:, :, :bound].transpose(1, 2)  # noqa: E731  token-major view [B, P, H, D]
        mk, mv = ops.slerp_merge(tm(a[0]), tm(b[0]), t), ops.slerp_merge(tm(a[1]), tm(b[1]), t)
        norms = torch.stack([torch.stack([mk.norm_a, mv.norm_a]), torch.stack([mk.norm_b, mv.norm_b])])
        C = math.ceil(retain * bound)
        score = (mk.distance + mv.distance).transpose(1, 2).reshape(B * H, bound).contiguous()
        top = torch.ceil(lengths.double() * retain).long().clamp(max=C)
        sel = ops.select_top_k(score, lengths.repeat_interleave(H), top.repeat_interleave(H),
                               capacity=C, validate=False)
        idx, cnt = sel.indices.view(B, H, C).long(), sel.counts.view(B, H).long()
        if C:  # padding entries repeat entry 0: restoring writes that row twice, same value
            live = torch.arange(C, device=idx.device) < cnt[..., None]
            idx = torch.where(live, idx, idx[..., :1]).clamp(min=0)
        rows = ops.compact([a[0], a[1], b[0], b[1]], idx, torch.full_like(cnt, C), validate=False)
        if C:  # flag the retained tokens by a negative K norm in both layers (live entries only)
            hits = torch.zeros(B, H, bound, dtype=torch.int32, device=idx.device)
            hits.scatter_add_(2, idx, live.int())  # add, not assign: padding repeats an index
            norms[:, 0].masked_fill_((hits > 0).transpose(1, 2)[None], -1.0)
        return cls(layers, [mk.direction, mv.direction], norms, [rows[:2], rows[2:]], idx, cnt,
                   lengths.clone(), bound, exact)

    def attend(self, which: int, q: Tensor, tail: LayerCache, scale: float) -> Tensor:
        """Decode attention of layer `which` (0 or 1) of the pair, q [B, Hq, 1, D] -> [B, Hq, 1, D],
        over its merged prompt rows, its retained rows and its raw tail, without restoring them
        (ops.merged_attention; fixed shapes: the tail's whole capacity, lengths select the rows)."""
        n = self.norms[which]
        out = ops.merged_attention(q[:, :, 0], self.direction[0], self.direction[1], n[0], n[1],
                                   self.lengths, self.retained[which][0], self.retained[which][1],
                                   self.counts, tail.k_store, tail.v_store, tail.lengths, scale)
        return out.unsqueeze(2)

    def restore(self, which: int, ws: LayerCache, tail: LayerCache, graph: bool) -> LayerCache:
        """Fill the shared workspace with layer `which` (0 or 1) of the pair: restored prompt
        rows, its retained rows, then its raw tail; returns ws, ready for decode_attention.
        graph=True: fixed shapes (the tail's whole capacity), for CUDA-graph capture. A
        retained token's prompt row restores to -direction (its flag), then its retained row
        overwrites it, so the workspace holds exactly the unmerged rows."""
        P, (B, H, C, D) = self.bound, self.indices.shape + (self.direction[0].shape[3],)
        T = tail.capacity if graph else tail.bound
        at = (self.lengths[:, None] + torch.arange(T, device=self.lengths.device))[:, :, None, None]
        for kv, (store, raw) in enumerate([(ws.k_store, tail.k_store), (ws.v_store, tail.v_store)]):
            ops.slerp_restore(self.direction[kv], self.norms[which, kv], out=store[:, :P])
            if C:
                store.transpose(1, 2).scatter_(2, self.indices[..., None].expand(B, H, C, D),
                                               self.retained[which][kv])
            if T:  # after the prompt rows of each sequence (over its padding rows, if any)
                store.scatter_(1, at.expand(B, T, H, D), raw[:, :T])
        ws.lengths.copy_(self.lengths + tail.lengths)
        ws.bound, ws.exact = P + tail.bound, self.exact
        return ws

    # ------------------------------------------------------------------ accounting
    def layer_bytes(self, which: int) -> Tensor:
        """[B] bytes held per sequence for layer `which`: its norms and retained rows (K and V,
        with their indices), plus for layer 0 the shared directions (counted once per pair)."""
        e = self.direction[0].element_size()
        H, D = self.direction[0].shape[2:]
        retained = self.counts.sum(1)
        out = self.lengths * (2 * H * 4) + retained * (2 * D * e)  # norms; retained K and V rows
        if which == 0:
            out = out + self.lengths * (2 * H * D * e) + retained * self.indices.element_size()
        return out

    def layer_allocated(self, which: int) -> int:
        """Bytes of the buffers attributed to layer `which` (as in layer_bytes)."""
        nbytes = lambda x: x.numel() * x.element_size()  # noqa: E731
        out = nbytes(self.norms[which]) + sum(nbytes(r) for r in self.retained[which])
        if which == 0:
            out += sum(nbytes(d) for d in self.direction) + nbytes(self.indices) + nbytes(self.counts)
        return out

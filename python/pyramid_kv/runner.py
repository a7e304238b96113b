"""PyramidInfer prefill and decode passes over a Hugging Face Llama-family model.

Prefill (per layer l): the layer attends over the tokens it was given and caches their K/V;
then, at a compressing layer, its recent queries vote (ensemble attention scores) for the pivotal
context, and only the selected context plus the recent window go on to layer l + 1, so deeper
layers compute on fewer tokens and cache fewer. Tokens keep their original positions (RoPE).

Decode: each layer appends the new token; once a layer has `decode_recent + decode_chunk`
tokens since its last compression, its recent queries score the oldest `decode_chunk` of them
and the layer keeps its scheduled share (per KV head by default). The prompt's pivotal context
is never re-selected. In budget mode every layer is also kept under a fixed size.

Batches are ragged and left-aligned: sequence b holds rows [0, lengths[b]) of every buffer.
Per-sequence values stay on the device; only upper bounds (buffer widths) live on the host, so
decode steps never synchronise. The one exception is mass (top-p) selection in prefill, whose
kept counts are data dependent: one synchronisation per compressing layer sizes the next layer.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import ops
from .attention import causal_attention, decode_attention
from .cache import CacheStats, LayerCache, cache_stats
from .config import PRESETS, PyramidConfig
from .model import ModelAdapter
from .selection import (compact_inplace, gather_rows, recent_bound, recent_lengths, row_weights,
                        select_context, splice_chunk)


class Runner:
    """Holds the model adapter, the configuration and the per-layer caches of one batch."""

    def __init__(self, model: nn.Module, config: Optional[PyramidConfig] = None, *,
                 track_positions: bool = False):
        """track_positions: also keep each cached token's original position (for analysis and
        tests; costs an int32 per cached row and KV head)."""
        self.adapter = ModelAdapter(model)
        self.track_positions = track_positions
        self.config = (config if config is not None else PRESETS["full"]).validate()
        L = self.adapter.shape.num_layers
        cfg = self.config
        self.keep = cfg.layer_keep(L)
        self.decode_keep = cfg.decode_keep_ratios(L)
        self.budgets = cfg.budgets(L)
        least = cfg.decode_recent + cfg.decode_chunk + cfg.sinks + 1
        for i, b in enumerate(self.budgets):
            if b is not None and b < least:
                raise ValueError(f"kv_budget for layer {i} ({b}) must be at least decode_recent + "
                                 f"decode_chunk + sinks + 1 = {least}")
        self.layers: List[LayerCache] = []
        self._prefill_lengths: List[Tensor] = []

    # ------------------------------------------------------------------ helpers
    @property
    def compress_decode(self) -> bool:
        return self.config.enabled and self.config.decode

    def _scores(self, q: Tensor, k: Tensor, lengths: Tensor, recent: Tensor, rows: int,
                lse: Optional[Tensor], scale: float) -> Tensor:
        """Ensemble scores [B, Hkv, N] of the last `rows` queries (weights zero past each
        sequence's own window)."""
        cfg = self.config
        w = row_weights(recent, rows, cfg.recent_weighting, cfg.recent_weight_max)
        lse_r = gather_rows(lse, lengths, rows) if lse is not None else None
        return ops.ensemble_scores(gather_rows(q, lengths, rows), k, lengths, row_weights=w,
                                   lse=lse_r, scale=scale, validate=False)

    def _decode_room(self, layer: int, max_new: int) -> int:
        """Rows a layer can grow by while generating max_new tokens."""
        if not self.compress_decode:
            return max_new
        cfg = self.config
        kept = round(self.decode_keep[layer] * cfg.decode_chunk)
        return min(max_new, (max_new // cfg.decode_chunk) * kept + cfg.decode_recent + cfg.decode_chunk)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, ids: Tensor, lengths: Tensor, max_new_tokens: int = 0) -> Tensor:
        """Run the prompt ids [B, n] (sequence b valid in [0, lengths[b])) through every layer
        with compression, build the caches, and return next-token logits [B, V] (float32)."""
        a, cfg = self.adapter, self.config
        L = a.shape.num_layers
        B, n = ids.shape
        dev = a.device
        ids = ids.to(dev)
        lens = lengths.to(dev, torch.int64)
        a.check_length(n + max_new_tokens)
        exact = bool((lengths == n).all())  # host tensor in generate(); every row valid
        h = a.embed(ids)
        pos = torch.arange(n, device=dev).expand(B, n)
        width = n
        self.layers, self._prefill_lengths = [], []
        self.prompt_lengths = lens.clone()
        self.next_pos = lens.clone()
        self.generated = 0
        for li, layer in enumerate(a.layers):
            self._prefill_lengths.append(lens)
            scale = a.scale(layer)
            cos, sin = a.rope(h, pos)
            q, k, v = a.qkv(layer, layer.input_layernorm(h), cos, sin)
            compress = cfg.compresses(li, L)
            budget = self.budgets[li]
            trim = budget is not None and width > budget
            o, lse = causal_attention(q, k, v, scale, want_lse=compress or trim)
            h = a.mlp_block(layer, h + a.attn_out(layer, o))
            if compress or trim:
                recent = recent_lengths(lens, cfg.recent_ratio)
                rows = recent_bound(width, cfg.recent_ratio)
                scores = self._scores(q, k, lens, recent, rows, lse, scale).sum(1)  # [B, width]

            # This layer caches the K/V of every token it processed (trimmed in budget mode).
            kept = [k, v, pos[:, None, :, None].expand(B, k.shape[1], width, 1)]
            clens, cbound, cexact = lens, width, exact
            if trim:
                kept, clens = self._trim(kept, scores, lens, recent, rows, budget)
                cbound, cexact = budget, False
            self.layers.append(self._layer_cache(li, kept, clens, cbound, cexact, q, lens, max_new_tokens))

            if compress:
                h, pos, lens, width = self._drop_tokens(li, h, pos, scores, lens, recent, rows, width)
                exact = False
        last = h[torch.arange(B, device=dev), lens - 1]
        return a.logits(last)

    def _trim(self, kept, scores, lens, recent, rows, budget):
        """Budget mode: keep at most `budget` of a layer's own prefill K/V (and positions):
        sinks, the best context, the recent window."""
        cfg = self.config
        recent = torch.minimum(recent, torch.full_like(recent, budget - cfg.sinks))
        context = lens - recent
        k_budget = (budget - recent - context.clamp(max=cfg.sinks)).clamp(min=0)
        width = scores.shape[1]
        idx, cnt = select_context(scores, lens, recent, k_budget, by_mass=False, sinks=cfg.sinks,
                                  min_keep=0, context_bound=width - 1 if width > 1 else width,
                                  keep_bound=budget, recent_bound_=rows)
        return ops.compact(kept, idx[:, :budget], cnt, validate=False), cnt

    def _drop_tokens(self, li, h, pos, scores, lens, recent, rows, width):
        """Select the context for the next layer and gather its hidden states and positions."""
        cfg = self.config
        keep = self.keep[li]
        context_bound = width - rows
        if cfg.selection == "count":
            context = lens - recent
            budget = torch.ceil(context.double() * keep).long()
            keep_bound = math.ceil(context_bound * keep)
        else:
            budget, keep_bound = keep, None
        idx, cnt = select_context(scores, lens, recent, budget, by_mass=cfg.selection == "mass",
                                  sinks=cfg.sinks, min_keep=cfg.min_context,
                                  context_bound=context_bound, keep_bound=keep_bound,
                                  recent_bound_=rows)
        if cfg.selection == "mass":  # data-dependent counts: size the next layer exactly
            idx = idx[:, : int(cnt.max())] if cnt.numel() else idx
        h4, pos4 = ops.compact([h.unsqueeze(1), pos[:, None, :, None]], idx, cnt, validate=False)
        return h4[:, 0], pos4[:, 0, :, 0], cnt, idx.shape[1]

    def _layer_cache(self, li, kept, lens, bound, exact, q, q_lens, max_new) -> LayerCache:
        """A decode-ready cache: the prefill K/V (and positions) copied into buffers with room
        to grow."""
        k, v, pos = kept
        B, H, n, D = k.shape
        cap = bound + self._decode_room(li, max_new)
        if self.budgets[li] is not None:
            cap = min(cap, max(self.budgets[li], bound))

        def buffer(x, dtype=None):
            # Zeroed: appends expose rows past a sequence's length, which attention masks out,
            # but a masked NaN would still poison the probabilities-times-values product.
            b = x.new_zeros((B, H, cap, x.shape[3]), dtype=dtype)
            b[:, :, :bound].copy_(x[:, :, :bound])
            return b

        recent_q = None
        if self.compress_decode or self.budgets[li] is not None:
            recent_q = gather_rows(q, q_lens, self.config.decode_recent)
        positions = buffer(pos, torch.int32) if self.track_positions else None
        return LayerCache(buffer(k), buffer(v), lens, bound, exact, recent_q, positions=positions)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_step(self, tokens: Tensor) -> Tensor:
        """Append one token per sequence [B] and return the next logits [B, V] (float32)."""
        a, cfg = self.adapter, self.config
        h = a.embed(tokens.view(-1, 1).to(a.device))
        cos, sin = a.rope(h, self.next_pos[:, None])
        for li, layer in enumerate(a.layers):
            c = self.layers[li]
            scale = a.scale(layer)
            q, k, v = a.qkv(layer, layer.input_layernorm(h), cos, sin)
            budget = self.budgets[li]
            if budget is not None and c.bound + 1 > budget:
                self._enforce_budget(c, budget, scale)
            c.append(k, v, q, self.next_pos)
            o = decode_attention(q, c.keys(), c.values(), c.lengths, scale, c.exact)
            h = a.mlp_block(layer, h + a.attn_out(layer, o))
            if self.compress_decode and c.unprocessed >= cfg.decode_recent + cfg.decode_chunk:
                self._compress_chunk(li, c, scale)
        self.next_pos = self.next_pos + 1
        self.generated += 1
        return a.logits(h[:, 0])

    def _decode_scores(self, c: LayerCache, scale: float) -> Tensor:
        """Ensemble scores [B, Hkv, bound] of the layer's last decode_recent queries."""
        cfg = self.config
        rows = c.recent_q.shape[2]
        full = torch.full_like(c.lengths, rows)
        w = row_weights(full, rows, cfg.recent_weighting, cfg.recent_weight_max)
        return ops.ensemble_scores(c.recent_q, c.keys(), c.lengths, row_weights=w, scale=scale,
                                   validate=False)

    def _segments(self, scores: Tensor, *per_sequence: Tensor):
        """Rows to select on: per KV head [B*Hkv, N] or summed per sequence [B, N], with the
        per-sequence tensors repeated to match; H = heads per sequence (0 when summed)."""
        if self.config.decode_per_head:
            H = scores.shape[1]
            return scores.flatten(0, 1), [t.repeat_interleave(H) for t in per_sequence], H
        return scores.sum(1), list(per_sequence), 0

    def _compress_chunk(self, li: int, c: LayerCache, scale: float) -> None:
        """Keep the layer's share of the oldest unprocessed chunk of decode tokens."""
        cfg = self.config
        chunk = cfg.decode_chunk
        B = c.lengths.shape[0]
        start = c.lengths - c.unprocessed
        scores = self._decode_scores(c, scale)
        where = (start[:, None] + torch.arange(chunk, device=start.device))[:, None, :]
        chunk_scores = scores.gather(2, where.expand(B, scores.shape[1], chunk))
        kept = round(self.decode_keep[li] * chunk)
        rows, (starts, lengths), H = self._segments(chunk_scores, start, c.lengths)
        full = torch.full((rows.shape[0],), chunk, device=rows.device, dtype=torch.int64)
        sel = ops.select_top_k(rows, full, kept, capacity=chunk, validate=False)
        idx, cnt = splice_chunk(lengths, starts, chunk, sel.indices, kept, c.bound)
        if H:
            idx, cnt = idx.view(B, H, -1), cnt.view(B, H)
        compact_inplace(c.rows(), idx, cnt)
        c.lengths = c.lengths - (chunk - kept)
        c.bound -= chunk - kept
        c.unprocessed -= chunk

    def _enforce_budget(self, c: LayerCache, budget: int, scale: float) -> None:
        """Budget mode, before an append would exceed the budget: shrink to budget - chunk."""
        cfg = self.config
        target = budget - cfg.decode_chunk
        recent = torch.minimum(c.lengths, torch.full_like(c.lengths, cfg.decode_recent))
        context = c.lengths - recent
        k_budget = (target - recent - context.clamp(max=cfg.sinks)).clamp(min=0)
        scores = self._decode_scores(c, scale)
        rows, (lengths, recent_s, k_s), H = self._segments(scores, c.lengths, recent, k_budget)
        context_bound = c.bound - min(cfg.decode_recent, c.bound)
        idx, cnt = select_context(rows, lengths, recent_s, k_s, by_mass=False, sinks=cfg.sinks,
                                  min_keep=0, context_bound=context_bound, keep_bound=target,
                                  recent_bound_=cfg.decode_recent)
        idx = idx[:, : c.bound]
        B = c.lengths.shape[0]
        if H:
            idx, cnt = idx.view(B, H, -1), cnt.view(B, H)
        compact_inplace(c.rows(), idx, cnt)
        c.shrink((cnt[:, 0] if H else cnt).clone(), target)
        c.unprocessed = min(c.unprocessed, cfg.decode_recent)

    # ------------------------------------------------------------------ accounting
    def stats(self) -> CacheStats:
        """Memory of the current caches against a full cache (one host synchronisation)."""
        full = self.prompt_lengths + self.generated
        prefill = torch.stack(self._prefill_lengths).sum(1).tolist()
        return cache_stats(self.layers, full, [int(x) for x in prefill])

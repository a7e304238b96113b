"""PyramidInfer prefill and decode passes over a Hugging Face Llama-family model.

Prefill (per layer l): the layer attends over the tokens it was given and caches their K/V;
then, at a compressing layer, its recent queries vote (ensemble attention scores) for the pivotal
context, and only the selected context plus the recent window go on to layer l + 1, so deeper
layers compute on fewer tokens and cache fewer. Tokens keep their original positions (RoPE).

Decode: each layer appends the new token; once a layer has `decode_recent + decode_chunk`
tokens since its last compression, its recent queries score the oldest `decode_chunk` of them
and the layer keeps its scheduled share (per KV head by default). The prompt's pivotal context
is never re-selected.

Budget mode keeps every layer under a fixed number of tokens with an eviction policy:
PyramidInfer's recent-query ensemble ("pyramid"), H2O's accumulated attention ("h2o"),
StreamingLLM's sinks + recent window ("streaming") or SnapKV's pooled prompt-window scores
("snapkv", prefill only). All of them use the same selection and compaction ops.

Cross-layer sharing (config.sharing, pyramid_kv.sharing): reader layers compute queries only
and attend to their source slot's K/V; only slots are cached, compressed and counted. A slot is
compressed by its owner's own schedule: the owner is the lowest layer of its group, and the
pyramid keeps more in shallower layers, so a slot keeps at least what its deepest reader's level
would keep. With token dropping between a slot and its reader, the reader's tokens are a subset
of the slot's, and its prefill attention masks on original positions (key <= query).

MiniCache merging (config.merge, pyramid_kv.merging): prefill runs unmerged; then each merged
pair (l, l + 1) stores its prompt K/V as shared SLERP directions, per-layer norms and retained
rows, and its decode tokens raw in per-layer tails; decode attends over them directly
(ops.merged_attention) or over a restored workspace (merge["attention"] = "restore"). No token
dropping happens between the two layers of a pair (they hold the same tokens), and decode
compression skips merged layers.

Batches are ragged and left-aligned: sequence b holds rows [0, lengths[b]) of every buffer.
Per-sequence values stay on the device; only upper bounds (buffer widths) live on the host, so
decode steps never synchronise. The one exception is mass (top-p) selection in prefill, whose
kept counts are data dependent: one synchronisation per compressing layer sizes the next layer.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .attention import causal_attention, decode_attention, shared_attention
from .cache import CacheStats, LayerCache, cache_stats
from .config import PRESETS, PyramidConfig
from .merging import MergedPair
from .model import ModelAdapter
from .selection import (compact_inplace, gather_rows, recent_bound, recent_lengths, row_weights,
                        select_context, splice_chunk)


class Runner:
    """Holds the model adapter, the configuration and the per-layer caches of one batch."""

    def __init__(self, model: nn.Module, config: Optional[PyramidConfig] = None, *,
                 track_positions: bool = False, cuda_graphs: bool = True):
        """track_positions: also keep each cached token's original position (for analysis and
        tests; costs an int32 per cached row and KV head). cuda_graphs: replay decode steps as a
        CUDA graph (on CUDA devices), which removes the per-kernel launch cost."""
        self.adapter = ModelAdapter(model)
        self.track_positions = track_positions
        self.cuda_graphs = cuda_graphs
        self._graph = None
        self.config = (config if config is not None else PRESETS["full"]).validate()
        L = self.adapter.shape.num_layers
        cfg = self.config
        self.sharing = cfg.sharing_plan(L)
        self.keep = cfg.layer_keep(L)
        self.decode_keep = cfg.decode_keep_ratios(L)
        self.budgets = cfg.budgets(L)
        least = cfg.decode_recent + cfg.decode_chunk + cfg.sinks + 1
        for i, b in enumerate(self.budgets):
            if b is not None and b < least:
                raise ValueError(f"kv_budget for layer {i} ({b}) must be at least decode_recent + "
                                 f"decode_chunk + sinks + 1 = {least}")
        # One entry per layer; a reader's entry IS its source slot's LayerCache (an alias).
        self.layers: List[LayerCache] = []  # a merged layer's entry is its raw decode tail
        self.pair_of = {li: pair for pair in cfg.merged_pairs(L) for li in pair}
        self.merged: Dict[int, MergedPair] = {}  # by the pair's first layer
        self.workspace: Optional[LayerCache] = None  # restored K/V of one merged layer at a time
        self._prefill_lengths: List[Tensor] = []
        self.hidden: Optional[Tensor] = None  # last prefill's final hidden states [B, width, C]

    @property
    def compress_decode(self) -> bool:
        return self.config.enabled and self.config.decode

    @property
    def policy(self) -> str:
        return self.config.budget_policy

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, ids: Tensor, lengths: Tensor, max_new_tokens: int = 0) -> Tensor:
        """Run prompt ids [B, n] (sequence b valid in [0, lengths[b]); lengths on the host) through
        every layer with compression, build the caches, and return next-token logits [B, V]."""
        a, cfg = self.adapter, self.config
        L = a.shape.num_layers
        B, n = ids.shape
        dev = a.device
        lens = lengths.to(dev, torch.int64)
        a.check_length(n + max_new_tokens)
        exact = bool((lengths == n).all())
        h = a.embed(ids.to(dev))
        pos = torch.arange(n, device=dev).expand(B, n)
        width = n
        self.layers, self._prefill_lengths = [], []
        self.merged, self.workspace, merging = {}, None, None
        self._graph = None  # a new batch: new buffers
        self.prompt_lengths = lens.clone()
        self.next_pos = lens.clone()
        self.generated = 0
        sources = self.sharing.sources
        shared = {}  # slot -> its prefill (k, v, positions, lengths), while readers need them
        for li, layer in enumerate(a.layers):
            self._prefill_lengths.append(lens)
            scale = a.scale(layer)
            cos, sin = a.rope(h, pos)
            compress = cfg.compresses(li, L)
            src = sources[li]
            if src != li:  # a reader: queries only, over its slot's K/V
                q = a.q_only(layer, layer.input_layernorm(h), cos, sin)
                k, v, kpos, klens = shared[src]
                if not any(cfg.compresses(j, L) for j in range(src, li)):  # the slot's very tokens
                    o, lse = causal_attention(q, k, v, scale, want_lse=compress)
                else:
                    o, lse = shared_attention(q, k, v, pos, lens, kpos, klens, scale), None
                    if compress:  # score the reader's own tokens: the slot's keys at them
                        k = _rows_at(k, kpos, klens, pos)
                h = a.mlp_block(layer, h + a.attn_out(layer, o))
                if compress:
                    recent = recent_lengths(lens, cfg.recent_ratio)
                    rows = recent_bound(width, cfg.recent_ratio)
                    scores = self._recent_scores(q, k, lens, recent, rows, lse, scale)
                    h, pos, lens, width = self._drop_tokens(li, h, pos, scores.sum(1), lens, recent, rows, width)
                    exact = False
                self.layers.append(self.layers[src])  # stores nothing
                if src not in sources[li + 1:]:  # the slot's last reader: free its prefill K/V
                    del shared[src]
                continue
            q, k, v = a.qkv(layer, layer.input_layernorm(h), cos, sin)
            if li in sources[li + 1:]:
                shared[li] = (k, v, pos, lens)
            budget = self.budgets[li]
            trim = budget is not None and width > budget
            o, lse = causal_attention(q, k, v, scale, want_lse=compress or (trim and self.policy == "pyramid"))
            h = a.mlp_block(layer, h + a.attn_out(layer, o))
            if compress:
                recent = recent_lengths(lens, cfg.recent_ratio)
                rows = recent_bound(width, cfg.recent_ratio)
                scores = self._recent_scores(q, k, lens, recent, rows, lse, scale)  # [B, Hkv, width]

            # This layer caches the K/V of every token it processed (trimmed in budget mode).
            kept = [k, v, pos[:, None, :, None].expand(B, k.shape[1], width, 1)]
            acc = self._accumulated(q, k, lens, scale) if self.policy == "h2o" and budget else None
            if acc is not None:
                kept.append(acc)
            clens, cbound, cexact = lens, width, exact
            if trim:
                pscores = scores if compress and self.policy == "pyramid" else None
                kept, clens = self._trim(kept, q, k, lens, lse, scale, width, budget, pscores)
                cbound, cexact = budget, False
            if li in self.pair_of:  # merged: the prompt rows go to the pair, decode tokens to a tail
                self.layers.append(self._tail(k, max_new_tokens))
                if merging is None:
                    merging = kept[:2]
                else:
                    self._merge(merging, kept[:2], clens, cbound, cexact)
                    merging = None
            else:
                self.layers.append(self._layer_cache(li, kept, clens, cbound, cexact, q, lens, max_new_tokens))

            if compress:
                h, pos, lens, width = self._drop_tokens(li, h, pos, scores.sum(1), lens, recent, rows, width)
                exact = False
        self.hidden = h
        if self.merged and cfg.merge_option("attention") == "restore":  # direct: no workspace
            P = max(p.bound for p in self.merged.values())
            self.workspace = self._tail(self.layers[min(self.merged)].k, P + max_new_tokens)
        last = h[torch.arange(B, device=dev), lens - 1]
        return a.logits(last)

    def _recent_scores(self, q: Tensor, k: Tensor, lengths: Tensor, recent: Tensor, rows: int,
                       lse: Optional[Tensor], scale: float) -> Tensor:
        """PyramidInfer's ensemble scores [B, Hkv, N] of each sequence's recent queries (the last
        `rows` rows, weighted, zero past each sequence's own window)."""
        cfg = self.config
        w = row_weights(recent, rows, cfg.recent_weighting, cfg.recent_weight_max)
        lse_r = gather_rows(lse, lengths, rows) if lse is not None else None
        return ops.ensemble_scores(gather_rows(q, lengths, rows), k, lengths, row_weights=w,
                                   lse=lse_r, scale=scale, validate=False)

    def _accumulated(self, q: Tensor, k: Tensor, lengths: Tensor, scale: float) -> Tensor:
        """H2O: every prompt query's attention summed per key, [B, Hkv, N, 1] float32."""
        return ops.ensemble_scores(q, k, lengths, scale=scale, validate=False).unsqueeze(-1)

    def _drop_tokens(self, li, h, pos, scores, lens, recent, rows, width):
        """Select the context for the next layer and gather its hidden states and positions."""
        cfg = self.config
        keep = self.keep[li]
        context_bound = width - rows
        if cfg.selection == "count":
            budget = torch.ceil((lens - recent).double() * keep).long()
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

    def _trim(self, kept, q, k, lens, lse, scale, width, budget, pyramid_scores):
        """Budget mode: keep at most `budget` of a layer's own prefill rows (K, V, positions,
        accumulated scores) under the eviction policy."""
        cfg, policy = self.config, self.policy
        if policy == "pyramid":
            recent = recent_lengths(lens, cfg.recent_ratio)
            scores = pyramid_scores
            if scores is None:
                scores = self._recent_scores(q, k, lens, recent, recent_bound(width, cfg.recent_ratio), lse, scale)
        elif policy == "snapkv":
            recent = lens.clamp(max=cfg.decode_recent)
            scores = self._snapkv_scores(q, k, lens, scale)
        elif policy == "h2o":
            recent, scores = None, kept[3][..., 0]
        else:  # streaming
            recent, scores = None, None
        idx, cnt = self._evict(scores, lens, budget, width, recent)
        return ops.compact(kept, idx, cnt, validate=False), self._sequence_counts(cnt)

    def _snapkv_scores(self, q: Tensor, k: Tensor, lengths: Tensor, scale: float) -> Tensor:
        """SnapKV: the observation window's attention, max-pooled over neighbouring positions."""
        w = self.config.decode_recent
        s = ops.ensemble_scores(gather_rows(q, lengths, w), k, lengths, scale=scale, validate=False)
        B, H, N = s.shape
        return F.max_pool1d(s.view(B * H, 1, N), 7, stride=1, padding=3).view(B, H, N)

    def _layer_cache(self, li, kept, lens, bound, exact, q, q_lens, max_new) -> LayerCache:
        """A decode-ready cache: the prefill rows copied into zeroed buffers with room to grow
        (K and V token-major, see LayerCache)."""
        k = kept[0]
        B, H = k.shape[:2]
        cap = bound + self._decode_room(li, max_new)
        if self.budgets[li] is not None and self.policy != "snapkv":
            cap = min(cap, max(self.budgets[li], bound))

        # Zeroed: appends expose rows past a sequence's length, which attention masks out, but a
        # masked NaN would still poison the probabilities-times-values product.
        def store(x):  # [B, H, n, D] -> token-major [B, cap, H, D]
            b = x.new_zeros((B, cap, H, x.shape[3]))
            b.transpose(1, 2)[:, :, :bound].copy_(x[:, :, :bound])
            return b

        def buffer(x, dtype=None):
            b = x.new_zeros((B, H, cap, x.shape[3]), dtype=dtype)
            b[:, :, :bound].copy_(x[:, :, :bound])
            return b

        recent_q = None
        if self.compress_decode or self.budgets[li] is not None:
            recent_q = gather_rows(q, q_lens, self.config.decode_recent).contiguous()
        return LayerCache(store(kept[0]), store(kept[1]), lens.clone(), bound, exact, recent_q,
                          positions=buffer(kept[2], torch.int32) if self.track_positions else None,
                          accumulated=buffer(kept[3]) if len(kept) > 3 else None)

    def _tail(self, k: Tensor, rows: int) -> LayerCache:
        """An empty zeroed token-major cache of `rows` rows shaped like k [B, Hkv, n, D]."""
        B, H, _, D = k.shape
        store = k.new_zeros((B, rows, H, D))
        return LayerCache(store, torch.zeros_like(store), torch.zeros(B, dtype=torch.int64, device=k.device),
                          0, exact=True)

    def _merge(self, a, b, lens, bound, exact) -> None:
        cfg = self.config
        li = len(self.layers) - 1
        self.merged[li - 1] = MergedPair.merge((li - 1, li), a, b, lens, bound, exact,
                                               cfg.merge_option("t"), cfg.merge_option("retain"))

    def _decode_room(self, layer: int, max_new: int) -> int:
        """Rows a layer can grow by while generating max_new tokens."""
        if not self.compress_decode:
            return max_new
        cfg = self.config
        kept = round(self.decode_keep[layer] * cfg.decode_chunk)
        return min(max_new, (max_new // cfg.decode_chunk) * kept + cfg.decode_recent + cfg.decode_chunk)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_step(self, tokens: Tensor) -> Tensor:
        """Append one token per sequence [B] and return the next logits [B, V] (float32).

        Host-side maintenance (budget eviction before the step, chunk compression after it)
        runs eagerly; the step itself has fixed shapes and, on CUDA, is captured once as a CUDA
        graph and replayed (see `cuda_graphs`)."""
        cfg = self.config
        for li in self.sharing.slots:  # readers alias their slot: maintain each slot once
            c = self.layers[li]
            budget = self.budgets[li]
            if budget is not None and self.policy != "snapkv" and c.bound + 1 > budget:
                self._enforce_budget(c, budget, self.adapter.scale(self.adapter.layers[li]))
            c.advance()
        logits = self._replay(tokens) if self._graphable() else self._step(tokens.to(self.adapter.device), graph=False)
        if self.compress_decode:
            for li in self.sharing.slots:
                c = self.layers[li]
                if c.unprocessed >= cfg.decode_recent + cfg.decode_chunk and li not in self.pair_of:
                    self._compress_chunk(li, c, self.adapter.scale(self.adapter.layers[li]))
        self.generated += 1
        return logits

    def _step(self, tokens: Tensor, graph: bool) -> Tensor:
        """The device work of one decode step. graph=True: attend over each buffer's full
        capacity (lengths select the rows) so shapes never change."""
        a = self.adapter
        h = a.embed(tokens.view(-1, 1))
        cos, sin = a.rope(h, self.next_pos[:, None])
        for li, layer in enumerate(a.layers):
            c = self.layers[li]
            scale = a.scale(layer)
            width = c.capacity if graph else c.bound
            owner = self.sharing.sources[li] == li
            if owner:
                q, k, v = a.qkv(layer, layer.input_layernorm(h), cos, sin)
                c.write(k, v, q, self.next_pos)
            else:  # a reader: the slot, written by its lower owner this step, already holds the token
                q = a.q_only(layer, layer.input_layernorm(h), cos, sin)
            pair = self.merged.get(self.pair_of[li][0]) if li in self.pair_of else None
            if pair is not None and self.workspace is None:  # c is the tail: attend over the merged slot
                o = pair.attend(li - pair.layers[0], q, c, scale)
            else:
                if pair is not None:  # "restore": attend over the restored workspace
                    c = pair.restore(li - pair.layers[0], self.workspace, c, graph)
                    width = c.capacity if graph else c.bound
                o = decode_attention(q, c, scale, width)
            if c.accumulated is not None and owner:  # H2O: add this query's attention to every key
                c.accumulated[:, :, :width, 0] += ops.ensemble_scores(
                    q, c.keys(width), c.lengths, scale=scale, validate=False)
            h = a.mlp_block(layer, h + a.attn_out(layer, o))
        self.next_pos.add_(1)
        return a.logits(h[:, 0])

    def _graphable(self) -> bool:
        """CUDA graphs from the third decode step (the first ones run eagerly: they create the
        cuBLAS handles and pick the attention path that capture then records)."""
        return self.cuda_graphs and self.adapter.device.type == "cuda" and self.generated >= 2

    def _replay(self, tokens: Tensor) -> Tensor:
        if self._graph is None:
            self._graph_tokens = tokens.to(self.adapter.device, torch.long).clone()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._step(self._graph_tokens, graph=True)
        self._graph_tokens.copy_(tokens)
        self._graph.replay()
        return self._graph_logits.clone()

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
        if self.config.per_head:
            H = scores.shape[1]
            return scores.flatten(0, 1), [t.repeat_interleave(H) for t in per_sequence], H
        return scores.sum(1), list(per_sequence), 0

    def _sequence_counts(self, counts: Tensor) -> Tensor:
        """[B] lengths from per-head counts [B, H] (equal across heads by construction)."""
        return counts[:, 0].clone() if counts.dim() == 2 else counts

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
        c.lengths.sub_(chunk - kept)
        c.bound -= chunk - kept
        c.unprocessed -= chunk

    def _enforce_budget(self, c: LayerCache, budget: int, scale: float) -> None:
        """Budget mode, before an append would exceed the budget: shrink to budget - chunk."""
        cfg, policy = self.config, self.policy
        target = budget - cfg.decode_chunk
        recent, scores = None, None
        if policy == "pyramid":
            recent = c.lengths.clamp(max=cfg.decode_recent)
            scores = self._decode_scores(c, scale)
        elif policy == "h2o":
            scores = c.accumulated[:, :, : c.bound, 0]
        idx, cnt = self._evict(scores, c.lengths, target, c.bound, recent)
        compact_inplace(c.rows(), idx, cnt)
        c.shrink(self._sequence_counts(cnt), target)
        c.unprocessed = min(c.unprocessed, cfg.decode_recent)

    def _evict(self, scores: Optional[Tensor], lengths: Tensor, target: int, bound: int,
               recent: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Index lists keeping at most `target` rows of each sequence: the policy's sinks and
        recent window, then the highest scores (per KV head with config.per_head)."""
        cfg, policy = self.config, self.policy
        sinks = cfg.sinks if policy in ("pyramid", "streaming") else 0
        if recent is None:  # streaming: sinks + the most recent; h2o: half heavy hitters, half recent
            window = target - sinks if policy == "streaming" else target // 2
            recent = lengths.clamp(max=window)
        if scores is None:  # nothing to choose among: the window already fills the budget
            scores = torch.zeros((lengths.shape[0], 1, bound), device=lengths.device)
        recent = torch.minimum(recent, torch.full_like(recent, target - sinks))
        context = lengths - recent
        top = (target - recent - context.clamp(max=sinks)).clamp(min=0)
        rows, (lens, rec, k), H = self._segments(scores, lengths, recent, top)
        if H and scores.shape[1] == 1:  # a per-sequence score broadcast to every KV head
            H = 0
        idx, cnt = select_context(rows, lens, rec, k, by_mass=False, sinks=sinks, min_keep=0,
                                  context_bound=bound, keep_bound=target, recent_bound_=min(bound, target))
        idx = idx[:, : min(bound, target)]
        if H:
            B = lengths.shape[0]
            idx, cnt = idx.view(B, H, -1), cnt.view(B, H)
        return idx, cnt

    # ------------------------------------------------------------------ accounting
    def stats(self) -> CacheStats:
        """Memory of the current caches against a full cache. Synchronises with the host a few
        times (more with merged pairs): not for the decode loop, which has held_bytes()."""
        full = self.prompt_lengths + self.generated
        prefill = torch.stack(self._prefill_lengths).sum(1).tolist()
        st = cache_stats(self.layers, full, [int(x) for x in prefill], self.sharing.sources)
        for first, pair in self.merged.items():  # a merged layer's entry counted its tail only
            for which, li in enumerate(pair.layers):
                st.layer_tokens[li] += pair.lengths.double().mean().item()
                st.layer_bytes[li] += int(pair.layer_bytes(which).sum())
                st.layer_allocated[li] += pair.layer_allocated(which)
        if self.workspace is not None:
            st.workspace_bytes = 2 * self.workspace.k.numel() * self.workspace.k.element_size()
        return st

    def held_bytes(self) -> Tensor:
        """[B] bytes of K/V held per sequence over all slots and merged pairs (directions once,
        norms, retained rows and indices, raw tails); the shared workspace is not per sequence
        (see stats()). No synchronisation."""
        held = torch.stack([self.layers[i].lengths for i in self.sharing.slots]).sum(0) * self.layers[0].row_bytes
        return held + sum(p.layer_bytes(w) for p in self.merged.values() for w in (0, 1))


def _rows_at(x: Tensor, x_pos: Tensor, x_lens: Tensor, pos: Tensor) -> Tensor:
    """Rows of x [B, H, N, D] (original positions x_pos [B, N], valid below x_lens) at the
    positions pos [B, n], which every valid row of pos holds (dropping keeps a subset, in order)."""
    valid = torch.arange(x_pos.shape[1], device=x_pos.device)[None] < x_lens[:, None]
    sorted_pos = torch.where(valid, x_pos, torch.iinfo(x_pos.dtype).max)  # padding sorts last
    idx = torch.searchsorted(sorted_pos.contiguous(), pos.contiguous()).clamp(max=x_pos.shape[1] - 1)
    B, H, _, D = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))

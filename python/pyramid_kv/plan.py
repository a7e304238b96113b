"""Cache sizes a configuration produces, computed without a model (count selection only).

In count mode every kept count is a function of the lengths alone, so the per-layer cache of a
sequence of n prompt tokens after t generated tokens is known in advance: for capacity planning
(how large a batch fits) and for tuning presets. Mass (top-p) counts depend on the scores.
"""

from __future__ import annotations

import math
from typing import List

from .config import PyramidConfig


def prefill_lengths(config: PyramidConfig, num_layers: int, n: int) -> List[int]:
    """Tokens each layer processes (and caches, before budget trimming) for an n-token prompt."""
    if config.selection != "count":
        raise ValueError("prefill_lengths needs selection='count' (mass counts depend on the scores)")
    keep = config.layer_keep(num_layers)
    out = [n]
    for layer in range(num_layers - 1):
        if config.compresses(layer, num_layers):
            recent = min(n, max(1, math.ceil(config.recent_ratio * n)))
            context = n - recent
            forced = min(config.sinks, context)
            candidates = context - forced
            r = min(math.ceil(keep[layer] * context), candidates)
            r = min(max(r, config.min_context - forced, 0), candidates)
            n = forced + r + recent
        out.append(n)
    return out


def cache_lengths(config: PyramidConfig, num_layers: int, n: int, new_tokens: int) -> List[int]:
    """Tokens each layer holds after generating `new_tokens` (the cache then has the prompt and
    new_tokens - 1 generated tokens, as in transformers), step by step as the runner does."""
    return cache_history(config, num_layers, n, new_tokens)[-1]


def cache_history(config: PyramidConfig, num_layers: int, n: int, new_tokens: int) -> List[List[int]]:
    """Per-layer cache lengths after the prefill and after each of the new_tokens - 1 appends."""
    on = config.enabled
    lengths = prefill_lengths(config, num_layers, n) if on else [n] * num_layers
    budgets = config.budgets(num_layers)
    chunk, recent = config.decode_chunk, config.decode_recent
    keep = config.decode_keep_ratios(num_layers)
    decode_budget = config.budget_policy != "snapkv"  # SnapKV trims the prompt only
    history = []
    for layer, length in enumerate(lengths):
        budget = budgets[layer]
        if budget is not None:
            length = min(length, budget)
        unprocessed = 0
        row = [length]
        for _ in range(max(new_tokens - 1, 0)):
            if budget is not None and decode_budget and length + 1 > budget:  # shrink, then append
                length = min(length, budget - chunk)
                unprocessed = min(unprocessed, recent)
            length += 1
            unprocessed += 1
            if on and config.decode and unprocessed >= recent + chunk:
                length -= chunk - round(keep[layer] * chunk)
                unprocessed -= chunk
            row.append(length)
        history.append(row)
    return [list(step) for step in zip(*history)]


def held(config: PyramidConfig, num_layers: int, lengths: List[int]) -> int:
    """Tokens held over the layers' lengths: with cross-layer sharing only slots hold K/V (a
    sharing plan changes no count: each slot follows its owner's schedule, readers store none)."""
    if config.merge is not None:
        raise ValueError("the planner counts tokens; merged pairs hold data-dependent bytes "
                         "(retained rows): measure them with Runner.stats() / held_bytes()")
    slots = config.sharing_plan(num_layers).slots
    return sum(lengths[i] for i in slots)


def kv_fraction(config: PyramidConfig, num_layers: int, n: int, new_tokens: int) -> float:
    """Cache held after generation over a full cache's, for one sequence."""
    full = num_layers * (n + max(new_tokens - 1, 0))
    return held(config, num_layers, cache_lengths(config, num_layers, n, new_tokens)) / full


def mean_fraction(config: PyramidConfig, num_layers: int, n: int, new_tokens: int) -> float:
    """The held fraction averaged over the steps that predict each of new_tokens tokens."""
    steps = cache_history(config, num_layers, n, new_tokens)
    return sum(held(config, num_layers, s) / (num_layers * (n + t)) for t, s in enumerate(steps)) / len(steps)

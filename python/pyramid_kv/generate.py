"""Generation with a compressed KV cache: ``pyramid_kv.generate(model, prompts, config)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .cache import CacheStats
from .config import PRESETS, PyramidConfig, preset
from .runner import Runner

Prompts = Union[str, Sequence[str], Sequence[Sequence[int]], Tensor]


@dataclass
class GenerationOutput:
    tokens: List[List[int]]          # generated tokens per sequence (up to and including a stop token)
    texts: Optional[List[str]]       # decoded tokens, when a tokenizer was given
    prompt_lengths: List[int]
    stats: CacheStats                # KV memory at the end of generation


def batch_prompts(prompts: Prompts, tokenizer=None, attention_mask: Optional[Tensor] = None,
                  pad_id: int = 0):
    """Left-aligned ids [B, n] (padding after each sequence) and host lengths [B]."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        if attention_mask is None:
            rows = [r.tolist() for r in ids]
        else:  # any padding side: keep the attended tokens of each row, in order
            rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), attention_mask.cpu())]
    elif len(prompts) and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        rows = [tokenizer(p).input_ids for p in prompts]
    else:
        rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def sample(logits: Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
           generator: Optional[torch.Generator]) -> Tensor:
    """Next tokens [B] from float32 logits [B, V]: greedy, or temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Prompts, config: Union[PyramidConfig, str, None] = None, *,
             tokenizer=None, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop_tokens: Optional[Sequence[int]] = None,
             callback: Optional[Callable[[int, Tensor], None]] = None,
             generator: Optional[torch.Generator] = None, check_every: int = 8) -> GenerationOutput:
    """Generate with PyramidInfer compression.

    Parameters
    ----------
    model : a transformers Llama / Mistral / Qwen2 / Qwen3 ``...ForCausalLM`` (any device/dtype)
    prompts : a string or strings (with ``tokenizer``), token-id lists, or an id tensor [B, n]
        (with ``attention_mask`` when it is padded, on either side)
    config : a PyramidConfig or a preset name (default "full": no compression)
    max_new_tokens, do_sample, temperature, top_p, top_k : decoding controls
    stop_tokens : ids that end a sequence (default: the model's generation-config eos, else the
        tokenizer's); the stop
        token is included in the output. Finished sequences are checked every ``check_every``
        steps (one host synchronisation) to stop early.
    callback : called as ``callback(step, tokens)`` with each step's tokens [B] (CPU); it costs a
        host synchronisation per step.
    """
    if isinstance(config, str):
        config = preset(config)
    runner = Runner(model, config if config is not None else PRESETS["full"])
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids, lengths = batch_prompts(prompts, tokenizer, attention_mask, pad)
    if stop_tokens is None:  # as transformers: the generation config's eos, else the tokenizer's
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=runner.adapter.device)

    logits = runner.prefill(ids, lengths, max_new_tokens)
    B = ids.shape[0]
    out = torch.empty((B, max_new_tokens), dtype=torch.long, device=logits.device)
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    steps = 0
    for t in range(max_new_tokens):
        tok = sample(logits, do_sample, temperature, top_p, top_k, generator)
        out[:, t] = tok
        steps = t + 1
        if stop.numel():
            finished |= torch.isin(tok, stop)
        if callback is not None:
            callback(t, tok.cpu())
        last = t + 1 == max_new_tokens
        if stop.numel() and ((t + 1) % check_every == 0 or last) and bool(finished.all()):
            break
        if not last:
            logits = runner.decode_step(tok)
    tokens = []
    for row in out[:, :steps].cpu().tolist():
        for i, x in enumerate(row):
            if x in stop_tokens:
                row = row[: i + 1]
                break
        tokens.append(row)
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    return GenerationOutput(tokens, texts, lengths.tolist(), runner.stats())

"""Models for the runner tests: the real stories260K from ../shared and small random Llama and
Qwen3 models with head_dim 64 and 4:1 GQA (built offline from configs)."""

import functools
import os
from pathlib import Path

import torch

SHARED = Path(os.environ.get("PYRAMID_KV_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_val_head.txt"

MODEL_NAMES = ["stories260K", "random-llama", "random-qwen3"]


def _random(kind: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls_cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    cfg = cls_cfg(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    return cls(cfg).to(device=device, dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def load(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, prompts as token-id lists of several lengths)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(1)
    if name == "stories260K":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(STORIES)
        model = AutoModelForCausalLM.from_pretrained(STORIES).to(device=device, dtype=dtype).eval()
        stories = TINYSTORIES.read_text().split("<|endoftext|>")
        prompts = [tok(stories[i].strip()[:n]).input_ids for i, n in [(1, 1200), (2, 500), (3, 90)]]
        return model, [p[:400] for p in prompts]
    model = _random(name.split("-")[1], device, dtype)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (300, 150, 37)]
    return model, prompts


def small(**changes):
    """A config that compresses even short prompts: a low floor, short decode chunks."""
    import pyramid_kv as pk

    base = dict(min_context=8, decay=0.5, decode_chunk=8, decode_recent=8, sinks=2)
    base.update(changes)
    return pk.preset("paper-7b", **base)


def logits_trace(model, cfg, prompts, steps=12, *, graph_shaped=False, feed=None, **runner_options):
    """Prefill + greedy decode logits [steps + 1, B, V] of a ragged batch, and the runner.
    graph_shaped: run every decode step with the CUDA-graph step's fixed shapes (attention over
    each cache's whole capacity, masked by lengths), which lets CPU tests check that path.
    feed: logits [steps + 1, B, V] of another trace whose greedy tokens are fed instead of this
    run's own (two runs that round differently then stay on the same tokens)."""
    import pyramid_kv as pk
    from pyramid_kv.generate import batch_prompts

    ids, lengths = batch_prompts(prompts)
    runner = pk.Runner(model, cfg, **runner_options)
    if graph_shaped:
        runner._step = lambda tokens, graph: pk.Runner._step(runner, tokens, True)
    logits = [runner.prefill(ids, lengths, steps)]
    for i in range(steps):
        tokens = (logits[-1] if feed is None else feed[i]).argmax(-1)
        logits.append(runner.decode_step(tokens.to(logits[-1].device)))
    return torch.stack(logits), runner

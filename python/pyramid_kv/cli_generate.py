"""``pyramid-kv generate``: generate with compression and show the pyramid and memory saved."""

from __future__ import annotations

import argparse
import json
import os
import time

DEFAULT_MODEL = "../shared/models/stories260K"
DEFAULT_PROMPT = (
    "Once upon a time, there was a little girl named Lily. She lived in a small house near a big "
    "forest with her mom, her dad and her dog Max. Every morning Lily and Max walked to the old oak "
    "tree at the edge of the forest. The tree had a hole in it, and Lily liked to hide little gifts "
    "there for the birds: a few seeds, a shiny stone, a piece of red ribbon. One day, when Lily "
    "looked into the hole, she found something new. It was a small blue key! Lily did not know what "
    "the key could open. She showed it to Max, but Max only wagged his tail. Then she ran home to "
    "ask her mom. Her mom smiled and said, \"Maybe it opens the old box in the attic.\" Lily and "
    "her mom climbed up to the attic. It was dark and dusty, and there were many boxes. At last "
    "they found a little wooden box with a blue lock. Lily put the key in the lock and turned it. "
    "The box opened, and inside"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("PYRAMID_KV_MODEL", DEFAULT_MODEL),
                   help="local path or hub id of a Llama/Mistral/Qwen2/Qwen3 causal LM "
                        f"(default: {DEFAULT_MODEL}, or $PYRAMID_KV_MODEL)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: an embedded story)")
    p.add_argument("--preset", default="kv45", help="compression preset (full, paper-7b, paper-13b, "
                                                    "kv45, aggressive)")
    p.add_argument("--config", help="JSON file with a PyramidConfig (overrides --preset)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compare", action="store_true", help="also generate with a full cache")
    p.add_argument("--json", help="write the outputs and per-layer memory to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pyramid_kv as pk

    if os.path.sep in args.model and not os.path.exists(args.model):
        raise SystemExit(f"model path {args.model!r} not found: pass --model <path or hub id> "
                         "(the default expects ../shared/models next to this checkout)")
    if os.path.exists(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model needs no hub
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
    if args.config:
        with open(args.config) as f:
            config = pk.PyramidConfig.from_json(f.read())
    else:
        config = pk.preset(args.preset)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(tokenizer=tok, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
              temperature=args.temperature, top_p=args.top_p, generator=gen)
    t0 = time.perf_counter()
    out = pk.generate(model, args.prompt, config, **kw)
    seconds = time.perf_counter() - t0
    print(f"model {args.model} on {device} ({model.dtype}), preset {config.name}, "
          f"prompt {out.prompt_lengths[0]} tokens, {len(out.tokens[0])} generated in {seconds:.2f}s\n")
    print("KV tokens held per layer after generation (the pyramid):")
    print(out.stats.summary())
    print(f"\n--- compressed ({100 * out.stats.fraction:.1f}% KV) ---\n{args.prompt}{out.texts[0]}")
    result = {"model": args.model, "config": config.to_dict(), "text": out.texts[0],
              "stats": out.stats.as_dict()}
    if args.compare:
        full = pk.generate(model, args.prompt, "full", **kw)
        print(f"\n--- full cache ---\n{args.prompt}{full.texts[0]}")
        result["full_text"] = full.texts[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

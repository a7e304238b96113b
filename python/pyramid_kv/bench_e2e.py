"""End-to-end throughput and memory: transformers' generate() with a full cache, our runner with a
full cache, and our runner with PyramidInfer, side by side (the paper's Tables 1 and 2).

Models are Llama-2-7B / 13B shaped with RANDOM bf16 weights (nothing is downloaded). Random weights
give near-uniform attention, so PyramidInfer runs in count mode: its kept counts, hence its KV
fraction, are the configured ones (pyramid_kv.plan), whatever the scores.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,  # a smoke test
                 num_attention_heads=4, num_key_value_heads=4),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
}
METHODS = ("hf-full", "ours-full", "ours-pyramid")


def build_model(shape: str, device: str = "cuda"):
    """A Llama-2-shaped LlamaForCausalLM with random bf16 weights, built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None  # random weights: always generate every token
    return model.eval()


def full_kv_bytes(model, batch: int, tokens: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return batch * tokens * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2


@dataclass
class Run:
    method: str
    batch: int
    prefill_s: float
    total_s: float
    kv_bytes: int          # K/V held at the end (occupied; a full cache for transformers)
    kv_allocated: int      # K/V buffers allocated
    peak_bytes: int        # peak GPU memory of the whole generation (weights included)
    new_tokens: int

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.new_tokens - 1) / max(self.total_s - self.prefill_s, 1e-9)

    @property
    def total_tok_s(self) -> float:
        return self.batch * self.new_tokens / self.total_s

    def as_dict(self) -> Dict:
        return {**self.__dict__, "decode_tok_s": self.decode_tok_s, "total_tok_s": self.total_tok_s}


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def run_method(model, method: str, batch: int, prompt: int, new: int, config=None) -> Run:
    """One generation of `new` tokens for `batch` random prompts of `prompt` tokens."""
    import pyramid_kv as pk

    g = torch.Generator(device="cuda").manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda", generator=g)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if method == "hf-full":
        t0 = _sync_time()
        out = model(ids, use_cache=True, logits_to_keep=1)  # the prefill alone, timed
        t1 = _sync_time()
        del out
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t2 = _sync_time()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False)
        t3 = _sync_time()
        kv = full_kv_bytes(model, batch, prompt + new - 1)
        return Run(method, batch, t1 - t0, t3 - t2, kv, kv, torch.cuda.max_memory_allocated(), new)
    cfg = pk.preset("full") if method == "ours-full" else config
    runner = pk.Runner(model, cfg)
    lengths = torch.full((batch,), prompt)
    t0 = _sync_time()
    logits = runner.prefill(ids, lengths, new)
    t1 = _sync_time()
    for _ in range(new - 1):
        logits = runner.decode_step(logits.argmax(-1))
    logits.argmax(-1)
    t2 = _sync_time()
    stats = runner.stats()
    return Run(method, batch, t1 - t0, t2 - t0, stats.occupied_bytes, stats.allocated_bytes,
               torch.cuda.max_memory_allocated(), new)


def max_batch(model, method: str, prompt: int, new: int, cap_bytes: int, config, probes=(4, 8),
              log=print) -> Optional[Run]:
    """The largest batch whose generation stays under cap_bytes: a linear memory model fitted on
    two small batches, then confirmed (stepping down on out-of-memory)."""
    runs = [run_method(model, method, b, prompt, new, config) for b in probes]
    (b1, p1), (b2, p2) = [(r.batch, r.peak_bytes) for r in runs]
    per_seq = (p2 - p1) / (b2 - b1)
    fixed = p1 - per_seq * b1
    guess = int((cap_bytes - fixed) / per_seq)
    log(f"  {method}: {per_seq / 2**20:.0f} MiB per sequence, predicted max batch {guess}")
    while guess > 0:
        try:
            r = run_method(model, method, guess, prompt, new, config)
            if r.peak_bytes <= cap_bytes:
                return r
        except torch.cuda.OutOfMemoryError:
            pass
        gc.collect()
        torch.cuda.empty_cache()
        guess = int(guess * 0.95)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    import pyramid_kv as pk
    from pyramid_kv import plan

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="llama2-7b,llama2-13b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--preset", default="kv45")
    p.add_argument("--max-batch", action="store_true", help="also find each method's largest batch")
    p.add_argument("--cap-gib", type=float, help="memory cap for --max-batch (default: the GPU's memory)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    cap = int((args.cap_gib or torch.cuda.get_device_properties(0).total_memory / 2**30) * 2**30)
    config = pk.preset(args.preset)
    results = {"device": device, "torch": torch.__version__, "weights": "random bf16 (Llama-2 shapes)",
               "prompt": args.prompt, "new": args.new, "config": config.to_dict(), "shapes": {}}
    print(f"{device}: random-weight Llama-2 shapes, batch {args.batch}, {args.prompt} prompt + "
          f"{args.new} generated tokens; PyramidInfer preset {config.name} (count mode)")
    for shape in args.shapes.split(","):
        t = time.perf_counter()
        model = build_model(shape)
        L = model.config.num_hidden_layers
        planned = plan.kv_fraction(config, L, args.prompt, args.new)
        print(f"\n== {shape} (built in {time.perf_counter() - t:.0f}s); planned KV {planned:.1%} of full")
        run_method(model, "ours-pyramid", 2, 64, 8, config)  # warm-up: kernels, allocator
        run_method(model, "hf-full", 2, 64, 8)
        rows = {}
        for method in METHODS:
            r = run_method(model, method, args.batch, args.prompt, args.new, config)
            rows[method] = r
            print(f"  {method:13s} prefill {r.prefill_s * 1e3:8.1f} ms  decode {r.decode_tok_s:8.0f} tok/s  "
                  f"total {r.total_tok_s:7.0f} tok/s  KV {r.kv_bytes / 2**30:6.2f} GiB  "
                  f"peak {r.peak_bytes / 2**30:6.2f} GiB", flush=True)
        base = rows["hf-full"]
        table = [{"method": m, **r.as_dict(), "kv_fraction": r.kv_bytes / base.kv_bytes,
                  "throughput_vs_hf": r.total_tok_s / base.total_tok_s,
                  "prefill_vs_hf": r.prefill_s / base.prefill_s} for m, r in rows.items()]
        entry = {"batch": table, "planned_kv_fraction": planned}
        if args.max_batch:
            print(f"  max batch under {cap / 2**30:.1f} GiB:")
            mb = {}
            for method in METHODS:
                r = max_batch(model, method, args.prompt, args.new, cap, config, log=lambda s: print(s, flush=True))
                mb[method] = r
                if r:
                    print(f"    {method:13s} batch {r.batch:4d}  total {r.total_tok_s:7.0f} tok/s  "
                          f"peak {r.peak_bytes / 2**30:6.2f} GiB", flush=True)
            hf = mb.get("hf-full")
            entry["max_batch"] = [{"method": m, **r.as_dict(),
                                   "batch_vs_hf": r.batch / hf.batch if hf else None,
                                   "throughput_vs_hf": r.total_tok_s / hf.total_tok_s if hf else None}
                                  for m, r in mb.items() if r]
        results["shapes"][shape] = entry
        print_summary(shape, entry)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in device).strip("_").lower()
    path = args.out / f"e2e_{slug}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    plot(results, args.out / f"e2e_{slug}.png")
    return 0


def print_summary(shape: str, entry: Dict) -> None:
    print(f"\n{shape}: vs transformers generate() (full cache)")
    print(f"{'method':14s}{'KV GiB':>8s}{'KV %':>7s}{'peak GiB':>9s}{'prefill ms':>11s}{'decode tok/s':>13s}"
          f"{'total tok/s':>12s}{'x hf':>6s}")
    for r in entry["batch"]:
        print(f"{r['method']:14s}{r['kv_bytes'] / 2**30:8.2f}{100 * r['kv_fraction']:7.1f}"
              f"{r['peak_bytes'] / 2**30:9.2f}{1e3 * r['prefill_s']:11.1f}{r['decode_tok_s']:13.0f}"
              f"{r['total_tok_s']:12.0f}{r['throughput_vs_hf']:6.2f}")
    for r in entry.get("max_batch", []):
        print(f"max batch {r['method']:14s} {r['batch']:4d} ({r['batch_vs_hf'] or 0:.2f}x)  "
              f"{r['total_tok_s']:7.0f} tok/s ({r['throughput_vs_hf'] or 0:.2f}x)")


def plot(results: Dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = list(results["shapes"])
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        entry = results["shapes"][shape]
        for method in METHODS:
            pts = sorted({(r["batch"], r["total_tok_s"], r["kv_bytes"]) for r in entry["batch"] + entry.get("max_batch", [])
                          if r["method"] == method})
            if not pts:
                continue
            axes[0][col].plot([b for b, _, _ in pts], [t for _, t, _ in pts], marker="o", label=method)
            axes[1][col].plot([b for b, _, _ in pts], [k / 2**30 for _, _, k in pts], marker="o", label=method)
        axes[0][col].set_title(f"{shape} ({results['prompt']}+{results['new']}, {results['device']})")
        axes[0][col].set_ylabel("generated tokens / s")
        axes[1][col].set_ylabel("KV cache GiB")
        for ax in axes[:, col]:
            ax.set_xlabel("batch size")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())

"""select_top_p / select_top_k: the CUDA radix-select kernel against the sort-based reference.

Realistic inputs: softmax-like skewed scores (a few heavy tokens, a long light tail), p = 0.9 or
k = N / 4, sink 4, recent N / 10, capacity N; full lengths and a ragged variant (lengths uniform
in [N/2, N]); float32 scores plus a bfloat16 row per shape. Reports microseconds, the effective
bandwidth of one read of the scores, the kernel's time over that one-read floor (at the measured
copy bandwidth) and the speed-ups over three baselines: `reference` (pyramid_kv.reference, the
exact definition: stable int64 sort, float64 cumsum, tie rule), `torch` (the lean pipeline an
engineer would write: one float32 sort + cumsum, or torch.topk, then a cumsum compaction) and
`torch_graph` (the same lean pipeline replayed from a CUDA graph: GPU time only, no per-op host
launch overhead). Run from the repo root:
    python3 benchmarks/bench_select.py
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, print_table, time_cuda, time_graph, write_results  # noqa: E402

import pyramid_kv as pk  # noqa: E402
from pyramid_kv import reference as ref  # noqa: E402


@dataclass(frozen=True)
class Config:
    S: int
    N: int
    op: str  # "top_p" or "top_k"
    dtype: str = "float32"
    ragged: bool = False


SHAPES = [(1280, 768), (1280, 4096), (256, 32768), (32, 131072)]
CONFIGS = [Config(S, N, op, dtype, ragged)
           for S, N in SHAPES
           for op, dtype, ragged in [("top_p", "float32", False), ("top_p", "float32", True),
                                     ("top_p", "bfloat16", False), ("top_k", "float32", False),
                                     ("top_k", "float32", True)]]


def make_inputs(c: Config, g: torch.Generator):
    dtype = getattr(torch, c.dtype)
    scores = torch.softmax(torch.randn(c.S, c.N, device="cuda", generator=g) * 2.5, -1).to(dtype)
    if c.ragged:
        lengths = torch.randint(c.N // 2, c.N + 1, (c.S,), device="cuda", generator=g)
    else:
        lengths = torch.full((c.S,), c.N, device="cuda")
    kw = dict(sink=4, recent=c.N // 10)
    budget = 0.9 if c.op == "top_p" else c.N // 4
    return scores, lengths, budget, kw


def torch_top_p(scores, lengths, p: float, sink: int, recent: int):
    """The lean torch pipeline an engineer would write: one sort, cumsum, threshold, scatter of
    the kept mask, ascending positions by a cumsum compaction. float32 sums (no exact tie or
    order guarantees): a speed baseline like the one the issue quotes, not a definition."""
    N = scores.shape[1]
    forced, x = _candidates(scores, lengths, sink, recent)
    vals, order = torch.sort(x, dim=1, descending=True)
    csum = vals.clamp(min=0).cumsum(1)
    r = (csum < p * csum[:, -1:]).sum(1, keepdim=True) + 1
    keep = (torch.arange(N, device=scores.device) < r) & (vals >= 0)
    return _ascending(torch.zeros_like(forced).scatter_(1, order, keep) | forced)


def torch_top_k(scores, lengths, k: int, sink: int, recent: int):
    """Lean torch top-k: torch.topk over the candidates, then the same compaction."""
    forced, x = _candidates(scores, lengths, sink, recent)
    vals, order = torch.topk(x, k, dim=1)
    return _ascending(torch.zeros_like(forced).scatter_(1, order, vals >= 0) | forced)


def _candidates(scores, lengths, sink: int, recent: int):
    """The forced mask, and the scores as float32 with -1 (below any mass) off the candidates."""
    forced, cand = ref.segment_masks(lengths, scores.shape[1], sink, recent)
    return forced, torch.where(cand, scores.float(), -1.0)


def _ascending(kept):
    S, N = kept.shape
    pos = torch.arange(N, device=kept.device).expand(S, N)
    slot = torch.where(kept, kept.cumsum(1) - 1, N)
    out = torch.full((S, N + 1), -1, dtype=torch.int64, device=kept.device).scatter_(1, slot, pos)
    return out[:, :N].int(), kept.sum(1).int()


def agreement(c: Config, got, expect, strict: bool = True) -> str:
    """'exact', or the fraction of rows equal to the other result (top-p: float summation;
    the lean torch baseline: no tie rule). Top-k must equal the reference exactly."""
    same = (got.indices == expect[0]).all(1) & (got.counts == expect[1])
    if bool(same.all()):
        return "exact"
    if c.op == "top_k" and strict:
        raise AssertionError(f"{c}: top-k differs from the reference")
    return f"{float(same.float().mean()):.4f}"


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    bw = copy_bandwidth_gbs()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for c in CONFIGS:
        scores, lengths, budget, kw = make_inputs(c, g)
        if c.op == "top_p":
            kern = lambda: pk.select_top_p(scores, lengths, budget, validate=False, **kw)  # noqa: E731
            eager = lambda: ref.select_top_p(scores, lengths, budget, **kw)  # noqa: E731
            lean = lambda: torch_top_p(scores, lengths, budget, **kw)  # noqa: E731
        else:
            kern = lambda: pk.select_top_k(scores, lengths, budget, validate=False, **kw)  # noqa: E731
            eager = lambda: ref.select_top_k(scores, lengths, budget, **kw)  # noqa: E731
            lean = lambda: torch_top_k(scores, lengths, budget, **kw)  # noqa: E731
        match = agreement(c, kern(), eager())
        t_kern = time_cuda(kern, warmup=10, rep=50)
        t_ref = time_cuda(eager, warmup=3, rep=10)
        t_torch = time_cuda(lean, warmup=3, rep=20)
        t_graph = time_graph(lean, warmup=3, rep=20)
        lean_match = agreement(c, kern(), lean(), strict=False)
        nbytes = scores.numel() * scores.element_size()
        floor_us = nbytes / (bw * 1e3)
        rows.append({**asdict(c), "kernel_us": t_kern, "reference_us": t_ref,
                     "speedup": t_ref / t_kern,
                     "torch_us": t_torch, "x_torch": t_torch / t_kern,
                     "torch_graph_us": t_graph, "x_torch_graph": t_graph / t_kern,
                     "torch_match": lean_match, "GB/s": nbytes / t_kern / 1e3,
                     "floor_us": floor_us, "x_floor": t_kern / floor_us, "match": match})
        del scores, lengths
    cols = ["S", "N", "op", "dtype", "ragged", "kernel_us", "reference_us", "speedup", "torch_us",
            "x_torch", "torch_graph_us", "x_torch_graph", "GB/s", "floor_us", "x_floor", "match",
            "torch_match"]
    print_table(rows, cols, title=f"select (copy bandwidth {bw:.0f} GB/s; floor = one read of the scores)")
    write_results("select", rows, meta={"copy_bandwidth_gbs": bw})


if __name__ == "__main__":
    main()

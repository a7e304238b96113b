"""ensemble_scores: the fused tensor-core kernel (with and without a given LSE) against the eager
float32 reference and the layer's own causal SDPA prefill attention, on Llama-shaped layers.

    python3 benchmarks/bench_ensemble.py [--quick]

TFLOP/s count the causal QK^T work once: 2 * D * B * Hq * (visible (row, key) pairs). Without a
given LSE the kernel computes QK^T twice (normaliser pass + score pass), so its executed rate is
twice the reported one. The eager reference (pyramid_kv.reference.ensemble_scores, float32)
materialises [W, N] per head several times; where that would exceed EAGER_CHUNK_BYTES it runs in
chunks over (batch, query head) and the timed call covers all chunks (marked `chunked`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, print_table, time_cuda, write_results  # noqa: E402

import pyramid_kv as pk  # noqa: E402
from pyramid_kv import reference as ref  # noqa: E402

EAGER_CHUNK_BYTES = 2 << 30  # float32 [W, N] scores per eager chunk (it keeps ~4 such live)
BF16_PEAK_TFLOPS = 800.0


@dataclass(frozen=True)
class Config:
    B: int
    Hq: int
    Hkv: int
    N: int
    D: int
    W: int

    @property
    def qk_flops(self) -> float:
        """2 D per visible (row, key) pair; row w of a full sequence sees N - W + w + 1 keys."""
        pairs = self.W * (self.N - self.W) + self.W * (self.W + 1) // 2
        return 2.0 * self.D * self.B * self.Hq * pairs


def configs(quick: bool):
    shapes = [(32, 40, 40, 768, 128), (8, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
    if quick:
        shapes = shapes[:2]
    for B, Hq, Hkv, N, D in shapes:
        for frac in (0.2, 0.4):
            yield Config(B, Hq, Hkv, N, D, int(round(frac * N)))


def eager_chunks(c: Config):
    """(b slice, query-head slice) chunks whose float32 [W, N] scores fit EAGER_CHUNK_BYTES."""
    per_head = c.W * c.N * 4
    G = c.Hq // c.Hkv
    if c.B * c.Hq * per_head <= EAGER_CHUNK_BYTES:
        return [(slice(0, c.B), slice(0, c.Hq))]
    heads = max(1, min(G, EAGER_CHUNK_BYTES // per_head))
    while G % heads:
        heads -= 1
    b_step = max(1, EAGER_CHUNK_BYTES // (heads * per_head)) if heads == G else 1
    return [(slice(b, min(b + b_step, c.B)), slice(h, h + heads))
            for b in range(0, c.B, b_step) for h in range(0, c.Hq, heads)]


def eager(q, k, lengths, c: Config, chunks):
    if len(chunks) == 1:
        return ref.ensemble_scores(q, k, lengths)
    G = c.Hq // c.Hkv
    out = torch.zeros(c.B, c.Hkv, c.N, device=q.device)
    for bs, hs in chunks:
        kv = hs.start // G  # a chunk's query heads lie in one group
        out[bs, kv:kv + 1] += ref.ensemble_scores(q[bs, hs], k[bs, kv:kv + 1], lengths[bs])
    return out


def recent_lse(q, k, lengths, c: Config):
    """Natural log-sum-exp of the recent rows (what the layer's flash attention returns), chunked."""
    G = c.Hq // c.Hkv
    lse = torch.empty(c.B, c.Hq, c.W, device=q.device)
    pos = lengths.long()[:, None] - c.W + torch.arange(c.W, device=q.device)
    keys = torch.arange(c.N, device=q.device)
    for b in range(c.B):
        hidden = keys[None, :] > pos[b][:, None]
        for h in range(c.Hq):
            s = (q[b, h].float() @ k[b, h // G].float().T) * c.D ** -0.5
            lse[b, h] = s.masked_fill_(hidden, float("-inf")).logsumexp(-1)
    return lse


FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def causal_sdpa(q_full, k, v):
    """The layer's causal prefill attention on a fused backend (never MATH, which would need
    O(N^2) memory at 32k): GQA through enable_gqa, else (if refused) on pre-expanded K/V."""
    G = q_full.shape[1] // k.shape[1]

    def gqa():
        with sdpa_kernel(FUSED_SDPA):
            return F.scaled_dot_product_attention(q_full, k, v, is_causal=True, enable_gqa=True)

    try:
        gqa()
        return gqa, "enable_gqa"
    except RuntimeError:
        k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

        def mha():
            with sdpa_kernel(FUSED_SDPA):
                return F.scaled_dot_product_attention(q_full, k_rep, v_rep, is_causal=True)
        mha()
        return mha, "repeat_kv"


def reps_for(us: float, budget_us: float = 2.5e6) -> int:
    return int(max(3, min(30, budget_us // max(us, 1.0))))


def bench(c: Config):
    g = torch.Generator(device="cuda").manual_seed(0)
    q_full = torch.randn(c.B, c.Hq, c.N, c.D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(c.B, c.Hkv, c.N, c.D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = q_full[:, :, c.N - c.W:]  # the recent rows, a strided view as a runner would pass
    lengths = torch.full((c.B,), c.N, device="cuda", dtype=torch.int32)
    lse = recent_lse(q, k, lengths, c)

    fused = lambda: pk.ensemble_scores(q, k, lengths, validate=False)  # noqa: E731
    fused_lse = lambda: pk.ensemble_scores(q, k, lengths, lse=lse, validate=False)  # noqa: E731
    sdpa, sdpa_path = causal_sdpa(q_full, k, v)
    chunks = eager_chunks(c)
    eag = lambda: eager(q, k, lengths, c, chunks)  # noqa: E731

    got, got_lse = fused(), fused_lse()
    expect = eag()
    err = ((got - expect).norm() / expect.norm()).item()
    err_lse = ((got_lse - expect).norm() / expect.norm()).item()
    torch.cuda.synchronize()

    t = {}
    for name, fn in [("fused", fused), ("fused_lse", fused_lse), ("sdpa", sdpa), ("eager", eag)]:
        first = time_cuda(fn, warmup=1, rep=1)
        t[name] = time_cuda(fn, warmup=1, rep=reps_for(first))
    flops = c.qk_flops
    row = {**asdict(c), "G": c.Hq // c.Hkv, "eager_chunks": len(chunks), "sdpa_path": sdpa_path,
           "eager_ms": t["eager"] / 1e3, "fused_ms": t["fused"] / 1e3,
           "fused_lse_ms": t["fused_lse"] / 1e3, "sdpa_ms": t["sdpa"] / 1e3,
           "qk_tflop": flops / 1e12,
           "fused_tflops": flops / t["fused"] / 1e6,
           "fused_exec_tflops": 2 * flops / t["fused"] / 1e6,
           "fused_lse_tflops": flops / t["fused_lse"] / 1e6,
           "x_eager": t["eager"] / t["fused"], "x_eager_lse": t["eager"] / t["fused_lse"],
           "vs_sdpa": t["fused"] / t["sdpa"], "vs_sdpa_lse": t["fused_lse"] / t["sdpa"],
           "rel_err": err, "rel_err_lse": err_lse}
    row["pct_peak_exec"] = 100 * row["fused_exec_tflops"] / BF16_PEAK_TFLOPS
    row["pct_peak_lse"] = 100 * row["fused_lse_tflops"] / BF16_PEAK_TFLOPS
    del q_full, k, v, lse, got, got_lse, expect, sdpa
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 32k shape")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the eager reference is float32 as written
    rows = []
    for c in configs(args.quick):
        rows.append(bench(c))
        r = rows[-1]
        print(f"B={c.B} Hq={c.Hq} Hkv={c.Hkv} N={c.N} W={c.W}: fused {r['fused_ms']:.3f} ms, "
              f"with lse {r['fused_lse_ms']:.3f} ms, sdpa {r['sdpa_ms']:.3f} ms, "
              f"eager {r['eager_ms']:.1f} ms ({r['eager_chunks']} chunks), err {r['rel_err']:.1e}",
              flush=True)
    cols = ["B", "Hq", "Hkv", "N", "W", "eager_ms", "fused_ms", "fused_lse_ms", "sdpa_ms",
            "fused_tflops", "fused_lse_tflops", "x_eager", "x_eager_lse", "vs_sdpa", "vs_sdpa_lse",
            "rel_err"]
    print_table(rows, cols, title="ensemble_scores, bf16, full lengths (ms; TFLOP/s of one causal "
                                  "QK^T; x_eager = eager / fused; vs_sdpa = fused / causal SDPA)")
    print(f"bf16 ceiling ~{BF16_PEAK_TFLOPS:.0f} TFLOP/s: fused without lse executes 2x the "
          f"QK^T work (fused_exec_tflops in the JSON); eager chunked where eager_chunks > 1")
    write_results("ensemble", rows, {"copy_gbs": copy_bandwidth_gbs(),
                                     "bf16_peak_tflops": BF16_PEAK_TFLOPS,
                                     "eager_chunk_bytes": EAGER_CHUNK_BYTES})


if __name__ == "__main__":
    main()

"""Run one benchmark case a few times, for Nsight Compute (no timing here). Example:
    ncu --clock-control none --set full -k regex:select --launch-skip 2 --launch-count 1 \
        python3 benchmarks/ncu_cases.py select_p_f32_32x131072
Cases mirror bench_select.py / bench_compact.py inputs.
"""

from __future__ import annotations

import os
import sys

import torch

import pyramid_kv as pk


def select_case(op: str, dtype: str, S: int, N: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.softmax(torch.randn(S, N, device="cuda", generator=g) * 2.5, -1).to(getattr(torch, dtype))
    lengths = torch.full((S,), N, device="cuda")
    if op == "p":
        return lambda: pk.select_top_p(scores, lengths, 0.9, sink=4, recent=N // 10, validate=False)
    return lambda: pk.select_top_k(scores, lengths, N // 4, sink=4, recent=N // 10, validate=False)


def compact_case(mode: str, B: int, H: int, N: int, keep: float, D: int = 128):
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    C = int(round(keep * N))
    idx = torch.rand(B, N, device="cuda", generator=g).argsort(dim=1)[:, :C].sort(dim=1).values
    counts = torch.full((B,), C, device="cuda", dtype=torch.int64)
    if mode == "inplace":
        return lambda: pk.compact_([k, v], idx, counts, validate=False)
    out = [torch.empty(B, H, C, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    return lambda: pk.compact([k, v], idx, counts, out=out, validate=False)


CASES = {
    "select_p_f32_1280x768": lambda: select_case("p", "float32", 1280, 768),
    "select_k_f32_1280x768": lambda: select_case("k", "float32", 1280, 768),
    "select_p_f32_32x131072": lambda: select_case("p", "float32", 32, 131072),
    "select_p_bf16_32x131072": lambda: select_case("p", "bfloat16", 32, 131072),
    "select_k_f32_32x131072": lambda: select_case("k", "float32", 32, 131072),
    "select_p_f32_256x32768": lambda: select_case("p", "float32", 256, 32768),
    "compact_inplace_50_8x8x16384": lambda: compact_case("inplace", 8, 8, 16384, 0.5),
    "compact_out_50_8x8x16384": lambda: compact_case("out", 8, 8, 16384, 0.5),
    "compact_inplace_50_1x8x131072": lambda: compact_case("inplace", 1, 8, 131072, 0.5),
}


if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        fn = CASES[name]()
        for _ in range(int(os.environ.get("NCU_REPS", 4))):
            fn()
        torch.cuda.synchronize()

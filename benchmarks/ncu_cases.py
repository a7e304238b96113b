"""Run one benchmark case a few times, for Nsight Compute (no timing here). Example:
    ncu --clock-control none --set full -k regex:select --launch-skip 2 --launch-count 1 \
        python3 benchmarks/ncu_cases.py select_p_f32_32x131072
Cases use bench_select.py / bench_compact.py inputs (their make_inputs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import pyramid_kv as pk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compact  # noqa: E402
import bench_select  # noqa: E402


def select_case(op: str, dtype: str, S: int, N: int):
    c = bench_select.Config(S, N, "top_p" if op == "p" else "top_k", dtype)
    scores, lengths, budget, kw = bench_select.make_inputs(c, torch.Generator(device="cuda").manual_seed(0))
    if op == "p":
        return lambda: pk.select_top_p(scores, lengths, budget, validate=False, **kw)
    return lambda: pk.select_top_k(scores, lengths, budget, validate=False, **kw)


def compact_case(mode: str, B: int, H: int, N: int, keep: float, D: int = 128):
    c = bench_compact.Config(B, H, N, D, keep)
    k, v, idx, counts = bench_compact.make_inputs(c, torch.Generator(device="cuda").manual_seed(0))
    if mode == "inplace":
        return lambda: pk.compact_([k, v], idx, counts, validate=False)
    out = [k.new_empty(B, H, c.C, D) for _ in range(2)]
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

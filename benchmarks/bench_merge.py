"""slerp_merge / slerp_restore: the CUDA MiniCache merge of two layers' K (or V) against the eager
PyTorch reference (float32 math) and a device copy of the same bytes (the ceiling).

    python3 benchmarks/bench_merge.py

bf16 a, b [B, N, H, D] (token-major caches of two adjacent layers). GB/s count the bytes that
must move: merge reads a and b and writes direction plus three float32 per vector; restore reads
direction and one float32 per vector and writes the restored vectors into a cache-like view.
`copy` is one `dst.copy_(src)` moving the same total (half read, half written); `pct_copy` is a
method's bandwidth as a percentage of it; `x_eager` the eager time over the kernel's.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, print_table, time_cuda, write_results  # noqa: E402

from pyramid_kv import ops  # noqa: E402
from pyramid_kv import reference as ref  # noqa: E402


@dataclass(frozen=True)
class Config:
    B: int
    N: int
    H: int
    D: int


CONFIGS = [Config(32, 768, 40, 128), Config(8, 16384, 8, 128)]


def eager_restore(direction, norm, out):
    out.copy_(norm[..., None] * direction.float())


def bench(c: Config):
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    shape = (c.B, c.N, c.H, c.D)
    a = torch.randn(shape, device="cuda", dtype=dt, generator=g)
    b = a + 0.5 * torch.randn(shape, device="cuda", dtype=dt, generator=g)
    V, es = c.B * c.N * c.H, a.element_size()
    merge_bytes = 3 * V * c.D * es + 3 * 4 * V
    restore_bytes = 2 * V * c.D * es + 4 * V
    m = ops.slerp_merge(a, b)
    out = torch.empty_like(a)

    # Correctness before timing: the kernel against the float32 eager reference.
    e = ref.slerp_merge(a, b, 0.5, 1e-6, compute_dtype=torch.float32)
    match = (torch.allclose(m.direction.float(), e[0].float(), rtol=0, atol=1.6e-2)
             and torch.allclose(m.norm_a, e[1], rtol=1e-4) and torch.allclose(m.norm_b, e[2], rtol=1e-4)
             and torch.allclose(m.distance, e[3], rtol=0, atol=1e-4))
    ops.slerp_restore(m.direction, m.norm_a, out=out)
    expect = torch.empty_like(out)
    eager_restore(m.direction, m.norm_a, expect)
    match = match and torch.allclose(out.float(), expect.float(), rtol=1e-2, atol=0)
    del e, expect

    rows = []
    for op, nbytes, eager, kernel in [
        ("merge", merge_bytes, lambda: ref.slerp_merge(a, b, 0.5, 1e-6, compute_dtype=torch.float32),
         lambda: ops.slerp_merge(a, b)),
        ("restore", restore_bytes, lambda: eager_restore(m.direction, m.norm_a, out),
         lambda: ops.slerp_restore(m.direction, m.norm_a, out=out)),
    ]:
        csrc = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        cdst = torch.empty_like(csrc)
        t = {"eager": time_cuda(eager, rep=10), "kernel": time_cuda(kernel),
             "copy": time_cuda(lambda: cdst.copy_(csrc))}
        del csrc, cdst
        row = {"op": op, **asdict(c), "mbytes": nbytes / 1e6, "match": match}
        for name, us in t.items():
            row[f"{name}_us"] = us
            row[f"{name}_gbs"] = nbytes / us / 1e3
        for name in ("eager", "kernel"):
            row[f"{name}_pct_copy"] = 100 * t["copy"] / t[name]
        row["kernel_x_eager"] = t["eager"] / t["kernel"]
        rows.append(row)
    del a, b, m, out
    torch.cuda.empty_cache()
    return rows


def main():
    rows = []
    for c in CONFIGS:
        for r in bench(c):
            rows.append(r)
            print(f"{r['op']} B={c.B} N={c.N} H={c.H}: eager {r['eager_us']:.1f} us, kernel "
                  f"{r['kernel_us']:.1f} us, copy {r['copy_us']:.1f} us"
                  f"{'' if r['match'] else '  MISMATCH'}", flush=True)
    cols = ["op", "B", "N", "H", "mbytes", "eager_us", "kernel_us", "copy_us", "eager_gbs",
            "kernel_gbs", "copy_gbs", "eager_pct_copy", "kernel_pct_copy", "kernel_x_eager", "match"]
    print_table(rows, cols, title="slerp_merge / slerp_restore, bf16 [B, N, H, 128] (us; GB/s = "
                                  "bytes read + written; pct_copy = % of the same-bytes copy)")
    write_results("merge", rows, {"copy_gbs_1gib": copy_bandwidth_gbs()})
    if not all(r["match"] for r in rows):
        sys.exit("MISMATCH between the kernel and the eager reference")


if __name__ == "__main__":
    main()

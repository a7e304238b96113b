"""compact: the CUDA gather of kept K and V rows (out of place into caller buffers, and in place)
against torch.gather and a plain device-to-device copy of the same bytes (the ceiling).

    python3 benchmarks/bench_compact.py

bf16 K and V [B, H, N, 128], per-sequence random ascending index sets keeping 25%, 50% or 90% of
the N tokens (counts = C for every sequence). GB/s count the bytes read plus the bytes written:
2 * (kept bytes of K and V). `copy` is one `dst.copy_(src)` of that many bytes; `pct_copy` is a
method's bandwidth as a percentage of it; `x_gather` is torch.gather's time over the method's.
The in-place time includes zeroing its small workspace (one memset per call).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, print_table, time_cuda, write_results  # noqa: E402

import pyramid_kv as pk  # noqa: E402


@dataclass(frozen=True)
class Config:
    B: int
    H: int
    N: int
    D: int
    keep: float

    @property
    def C(self) -> int:
        return int(round(self.keep * self.N))


SHAPES = [(32, 40, 768, 128), (8, 8, 16384, 128), (1, 8, 131072, 128)]
KEEPS = (0.25, 0.5, 0.9)


def configs():
    for B, H, N, D in SHAPES:
        for keep in KEEPS:
            yield Config(B, H, N, D, keep)


def bench(c: Config):
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    k = torch.randn(c.B, c.H, c.N, c.D, device="cuda", dtype=dt, generator=g)
    v = torch.randn(c.B, c.H, c.N, c.D, device="cuda", dtype=dt, generator=g)
    C = c.C
    idx = torch.rand(c.B, c.N, device="cuda", generator=g).argsort(dim=1)[:, :C].sort(dim=1).values
    counts = torch.full((c.B,), C, device="cuda", dtype=torch.int64)
    ix = idx[:, None, :, None].expand(c.B, c.H, C, c.D)
    ko, vo = torch.empty(c.B, c.H, C, c.D, device="cuda", dtype=dt), torch.empty(c.B, c.H, C, c.D, device="cuda", dtype=dt)
    k2, v2 = k.clone(), v.clone()
    kept_bytes = 2 * c.B * c.H * C * c.D * k.element_size()
    csrc = torch.empty(kept_bytes, dtype=torch.uint8, device="cuda")
    cdst = torch.empty_like(csrc)

    gather = lambda: (torch.gather(k, 2, ix), torch.gather(v, 2, ix))  # noqa: E731
    kernel = lambda: pk.compact([k, v], idx, counts, out=[ko, vo], validate=False)  # noqa: E731
    inplace = lambda: pk.compact_([k2, v2], idx, counts, validate=False)  # noqa: E731
    copy = lambda: cdst.copy_(csrc)  # noqa: E731

    # Correctness (bit-exact: a copy) before timing; the in-place check runs on fresh clones.
    gk, gv = gather()
    kernel()
    inplace()
    match = (torch.equal(ko, gk) and torch.equal(vo, gv)
             and torch.equal(k2[:, :, :C], gk) and torch.equal(v2[:, :, :C], gv))
    del gk, gv

    t = {name: time_cuda(fn) for name, fn in
         [("gather", gather), ("kernel", kernel), ("inplace", inplace), ("copy", copy)]}
    moved = 2 * kept_bytes  # read + write
    row = {**asdict(c), "C": C, "mbytes": moved / 1e6, "match": match}
    for name, us in t.items():
        row[f"{name}_us"] = us
        row[f"{name}_gbs"] = moved / us / 1e3
    for name in ("gather", "kernel", "inplace"):
        row[f"{name}_pct_copy"] = 100 * t["copy"] / t[name]
    row["kernel_x_gather"] = t["gather"] / t["kernel"]
    row["inplace_x_gather"] = t["gather"] / t["inplace"]
    row["floor_us"] = t["copy"]
    del k, v, k2, v2, ko, vo, csrc, cdst
    torch.cuda.empty_cache()
    return row


def main():
    rows = []
    for c in configs():
        rows.append(bench(c))
        r = rows[-1]
        print(f"B={c.B} H={c.H} N={c.N} keep={c.keep}: gather {r['gather_us']:.1f} us, kernel "
              f"{r['kernel_us']:.1f} us, in place {r['inplace_us']:.1f} us, copy {r['copy_us']:.1f} us"
              f"{'' if r['match'] else '  MISMATCH'}", flush=True)
    cols = ["B", "H", "N", "keep", "mbytes", "gather_us", "kernel_us", "inplace_us", "copy_us",
            "gather_gbs", "kernel_gbs", "inplace_gbs", "copy_gbs", "gather_pct_copy",
            "kernel_pct_copy", "inplace_pct_copy", "kernel_x_gather", "inplace_x_gather", "match"]
    print_table(rows, cols, title="compact, bf16 K and V, D=128 (us; GB/s = read + write; "
                                  "pct_copy = % of the same-bytes copy bandwidth)")
    write_results("compact", rows, {"copy_gbs_1gib": copy_bandwidth_gbs()})
    if not all(r["match"] for r in rows):
        sys.exit("MISMATCH between the kernel and torch.gather")


if __name__ == "__main__":
    main()

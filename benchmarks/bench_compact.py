"""compact: the CUDA gather of kept K and V rows (out of place into caller buffers, and in place)
against torch.gather and a plain device-to-device copy of the same bytes (the ceiling).

    python3 benchmarks/bench_compact.py

bf16 K and V [B, H, N, 128], per-sequence random ascending index sets keeping 25%, 50% or 90% of
the N tokens (counts = C for every sequence). GB/s count the bytes read plus the bytes written:
2 * (kept bytes of K and V). `copy` is one `dst.copy_(src)` of that many bytes; `pct_copy` is a
method's bandwidth as a percentage of it; `x_gather` is torch.gather's time over the method's.
The in-place time includes its pre-pass (identity prefixes, workspace set-up: one more launch).
The in-place rate depends on where K and V lie in memory, by up to 4 points of copy (measured in
docs/perf/compact.md, round 12, where the copy moved by under 1% and the out-of-place kernel by
up to 1.4 points), so in place is also timed on PLACEMENTS - 1 more copies of K and V (the
earlier ones kept alive, so that each lies elsewhere): `inplace_pct_min` / `inplace_pct_max`
span all placements; `inplace_us` is the first, like every other column.

A second table times the runner's decode eviction pattern in place: per sequence, the identity
up to a start offset (90% of N), a 16-row chunk keeping 4 rows, then a 16-row tail shifted
down by 12 (the rest of the cache, to N, is free room). Only the rows with indices[i] != i move;
its GB/s and `copy` count those bytes. `kernel` and `gather` (out of place) copy all C rows, the
alternative without an in-place op; x_kernel / x_gather are their times over the in-place time.
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


@dataclass(frozen=True)
class DecodeConfig:
    B: int = 32
    H: int = 40
    N: int = 800
    D: int = 128
    prefix: int = 720  # identity rows
    chunk: int = 16
    kept: int = 4
    tail: int = 16

    @property
    def C(self) -> int:
        return self.prefix + self.kept + self.tail


SHAPES = [(32, 40, 768, 128), (8, 8, 16384, 128), (1, 8, 131072, 128)]
KEEPS = (0.25, 0.5, 0.9)
PLACEMENTS = 3


def configs():
    for B, H, N, D in SHAPES:
        for keep in KEEPS:
            yield Config(B, H, N, D, keep)


def time_variants(k, v, idx, counts, copy_bytes: int, timer=time_cuda):
    """torch.gather, the kernel out of place, in place (on clones of k and v) and a copy of
    `copy_bytes`: (whether all three compactions agree bit for bit, {name: microseconds}); the
    in-place time of every placement in "inplace_placements" (the first is "inplace")."""
    B, H, _, D = k.shape
    C = idx.shape[1]
    ix = idx[:, None, :, None].expand(B, H, C, D)
    ko, vo = k.new_empty(B, H, C, D), v.new_empty(B, H, C, D)
    k2, v2 = k.clone(), v.clone()
    csrc = torch.empty(copy_bytes, dtype=torch.uint8, device=k.device)
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
    t = {name: timer(fn) for name, fn in
         [("gather", gather), ("kernel", kernel), ("inplace", inplace), ("copy", copy)]}
    placements, alive = [t["inplace"]], []
    for _ in range(PLACEMENTS - 1):
        alive += [k.clone(), v.clone()]
        kp, vp = alive[-2:]
        placements.append(timer(lambda: pk.compact_([kp, vp], idx, counts, validate=False)))
    t["inplace_placements"] = placements
    return match, t


def random_kv(c, g: torch.Generator):
    """bf16 K and V [B, H, N, D] of a Config or DecodeConfig."""
    return [torch.randn(c.B, c.H, c.N, c.D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2)]


def make_inputs(c: Config, g: torch.Generator):
    """K, V, a random ascending index set of C rows per sequence, and its counts."""
    k, v = random_kv(c, g)
    idx = torch.rand(c.B, c.N, device="cuda", generator=g).argsort(dim=1)[:, :c.C].sort(dim=1).values
    return k, v, idx, torch.full((c.B,), c.C, device="cuda", dtype=torch.int64)


def bench(c: Config):
    k, v, idx, counts = make_inputs(c, torch.Generator(device="cuda").manual_seed(0))
    C = c.C
    kept_bytes = 2 * c.B * c.H * C * c.D * k.element_size()
    match, t = time_variants(k, v, idx, counts, kept_bytes)
    moved = 2 * kept_bytes  # read + write
    row = {**asdict(c), "C": C, "mbytes": moved / 1e6, "match": match}
    placements = t.pop("inplace_placements")
    for name, us in t.items():
        row[f"{name}_us"] = us
        row[f"{name}_gbs"] = moved / us / 1e3
    for name in ("gather", "kernel", "inplace"):
        row[f"{name}_pct_copy"] = 100 * t["copy"] / t[name]
    row["inplace_placements_us"] = placements
    row["inplace_pct_min"] = 100 * t["copy"] / max(placements)
    row["inplace_pct_max"] = 100 * t["copy"] / min(placements)
    row["kernel_x_gather"] = t["gather"] / t["kernel"]
    row["inplace_x_gather"] = t["gather"] / t["inplace"]
    row["floor_us"] = t["copy"]
    del k, v
    torch.cuda.empty_cache()
    return row


def bench_decode(c: DecodeConfig):
    g = torch.Generator(device="cuda").manual_seed(1)
    k, v = random_kv(c, g)
    C = c.C
    offs = torch.rand(c.B, c.chunk, device="cuda", generator=g).argsort(dim=1)[:, :c.kept].sort(dim=1).values
    ar = lambda n, at: torch.arange(at, at + n, device="cuda").expand(c.B, n)  # noqa: E731
    idx = torch.cat([ar(c.prefix, 0), c.prefix + offs, ar(c.tail, c.prefix + c.chunk)], dim=1)
    counts = torch.full((c.B,), C, device="cuda", dtype=torch.int64)
    moving_rows = int((idx != torch.arange(C, device="cuda")).sum())  # over the batch
    moved = 2 * 2 * moving_rows * c.H * c.D * k.element_size()  # read + write, K and V
    # Repeated calls move the same rows again: the same work every time.
    match, t = time_variants(k, v, idx, counts, moved // 2)
    row = {**asdict(c), "C": C, "moving_rows_per_seq": moving_rows / c.B, "mbytes": moved / 1e6,
           "match": match}
    row["inplace_placements_us"] = t.pop("inplace_placements")
    for name, us in t.items():
        row[f"{name}_us"] = us
    row["inplace_gbs"] = moved / t["inplace"] / 1e3
    row["copy_gbs"] = moved / t["copy"] / 1e3
    row["inplace_pct_copy"] = 100 * t["copy"] / t["inplace"]
    row["inplace_x_kernel"] = t["kernel"] / t["inplace"]
    row["inplace_x_gather"] = t["gather"] / t["inplace"]
    del k, v
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
            "kernel_pct_copy", "inplace_pct_copy", "inplace_pct_min", "inplace_pct_max",
            "kernel_x_gather", "inplace_x_gather", "match"]
    print_table(rows, cols, title="compact, bf16 K and V, D=128 (us; GB/s = read + write; "
                                  "pct_copy = % of the same-bytes copy bandwidth)")
    decode = [bench_decode(DecodeConfig())]
    print_table(decode, ["B", "H", "N", "C", "moving_rows_per_seq", "mbytes", "inplace_us", "copy_us",
                         "inplace_gbs", "copy_gbs", "inplace_pct_copy", "kernel_us", "gather_us",
                         "inplace_x_kernel", "inplace_x_gather", "match"],
                title="compact_ in place, decode eviction pattern (GB/s and copy: the moving rows only; "
                      "kernel and gather: all C rows, out of place)")
    write_results("compact", rows, {"copy_gbs_1gib": copy_bandwidth_gbs(), "decode": decode})
    rows = rows + decode
    if not all(r["match"] for r in rows):
        sys.exit("MISMATCH between the kernel and torch.gather")


if __name__ == "__main__":
    main()

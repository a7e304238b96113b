"""merged_attention: decode attention over a MiniCache merged layer, against the eager PyTorch
reference (float32 math) and the runner's restore path.

    python3 benchmarks/bench_merged_attention.py

bf16, D = 128, one decode query per sequence and query head. A merged layer holds, per sequence,
P prompt tokens as shared directions (K and V, [B, P, Hkv, D]) with float32 norms, C retained
original rows per KV head ([B, Hkv, C, D]; their prompt rows flagged by a negative K norm) and
T raw tail tokens ([B, T, Hkv, D]). Methods:

- eager: reference.merged_attention with compute_dtype=float32 (key set built explicitly);
- restore: the runner's "restore" mode, MergedPair.restore (slerp_restore of K and V into a
  workspace, the retained rows scattered over their positions, the tail copied after the prompt
  rows) then attention.decode_attention (flash attention, varlen decode over the workspace);
- kernel: ops.merged_attention (MergedPair.attend), which reads directions, norms, retained rows
  and tail once and writes only the output.

GB/s count the bytes the kernel must move: directions, norms, retained rows, tail and q read, the
output written. `pct_copy` is that rate over a 1 GiB device copy's (read + write) rate.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, print_table, time_cuda, write_results  # noqa: E402

from pyramid_kv import reference as ref  # noqa: E402
from pyramid_kv.attention import decode_attention  # noqa: E402
from pyramid_kv.cache import LayerCache  # noqa: E402
from pyramid_kv.merging import MergedPair  # noqa: E402


@dataclass(frozen=True)
class Config:
    B: int
    Hq: int
    Hkv: int
    P: int
    C: int
    T: int
    D: int = 128


CONFIGS = [Config(32, 32, 8, 4096, 205, 64), Config(8, 40, 40, 768, 39, 256),
           Config(1, 32, 8, 32768, 1639, 128)]


def make_pair(c: Config, g: torch.Generator):
    """A MergedPair (both layers sharing one set of norms and retained rows), its tail, a query."""
    dt, dev = torch.bfloat16, "cuda"
    B, H, P, C, T, D = c.B, c.Hkv, c.P, c.C, c.T, c.D
    direction = []
    for _ in range(2):
        d = torch.randn(B, P, H, D, device=dev, generator=g)
        direction.append((d / d.norm(dim=-1, keepdim=True)).to(dt))
    norms = (torch.rand(2, B, P, H, device=dev, generator=g) + 0.5) * D ** 0.5
    idx = torch.rand(B, H, P, device=dev, generator=g).topk(C, dim=-1).indices.sort(-1).values
    flag = torch.zeros(B, H, P, dtype=torch.bool, device=dev).scatter_(2, idx, True)
    norms[0].masked_fill_(flag.transpose(1, 2), -1.0)
    retained = [torch.randn(B, H, C, D, device=dev, generator=g).to(dt) for _ in range(2)]
    counts = torch.full((B, H), C, dtype=torch.int64, device=dev)
    lengths = torch.full((B,), P, dtype=torch.int64, device=dev)
    pair = MergedPair((0, 1), direction, torch.stack([norms, norms]), [retained, retained], idx, counts,
                      lengths, P, True)
    tail = LayerCache(torch.randn(B, T, H, D, device=dev, generator=g).to(dt),
                      torch.randn(B, T, H, D, device=dev, generator=g).to(dt),
                      torch.full((B,), T, dtype=torch.int64, device=dev), T, exact=True)
    ws = LayerCache(torch.zeros(B, P + T, H, D, device=dev, dtype=dt), torch.zeros(B, P + T, H, D, device=dev, dtype=dt),
                    torch.zeros(B, dtype=torch.int64, device=dev), 0, exact=True)
    q = torch.randn(B, c.Hq, 1, D, device=dev, generator=g).to(dt)
    return pair, tail, ws, q


def bench(c: Config, copy_gbs: float):
    g = torch.Generator(device="cuda").manual_seed(0)
    pair, tail, ws, q = make_pair(c, g)
    scale = c.D ** -0.5
    n = pair.norms[0]
    args = (q[:, :, 0], pair.direction[0], pair.direction[1], n[0], n[1], pair.lengths, pair.retained[0][0],
            pair.retained[0][1], pair.counts, tail.k_store, tail.v_store, tail.lengths, scale)

    def eager():
        return ref.merged_attention(*args, compute_dtype=torch.float32)

    def restore():
        w = pair.restore(0, ws, tail, graph=False)
        return decode_attention(q, w, scale, w.bound)[:, :, 0]

    def kernel():
        return pair.attend(0, q, tail, scale)[:, :, 0]

    got, via_restore, expect = kernel().float(), restore().float(), eager().float()
    match = (torch.allclose(got, expect, atol=3e-2, rtol=1.6e-2)
             and torch.allclose(via_restore, expect, atol=3e-2, rtol=1.6e-2))
    del got, via_restore, expect

    e, B, H, P, C, T, D = 2, c.B, c.Hkv, c.P, c.C, c.T, c.D
    nbytes = (2 * B * P * H * D * e + 2 * B * P * H * 4 + 2 * B * H * C * D * e + 2 * B * T * H * D * e
              + 2 * B * c.Hq * D * e + B * (8 + 8) + B * H * 8)
    t = {"eager": time_cuda(eager, warmup=2, rep=10), "restore": time_cuda(restore), "kernel": time_cuda(kernel)}
    row = {**asdict(c), "mbytes": nbytes / 1e6, "match": match}
    for name, us in t.items():
        row[f"{name}_us"] = us
    row["kernel_gbs"] = nbytes / t["kernel"] / 1e3
    row["floor_us"] = nbytes / copy_gbs / 1e3
    row["kernel_pct_copy"] = 100 * row["kernel_gbs"] / copy_gbs
    row["x_eager"] = t["eager"] / t["kernel"]
    row["x_restore"] = t["restore"] / t["kernel"]
    del pair, tail, ws, q, args
    torch.cuda.empty_cache()
    return row


def main():
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for c in CONFIGS:
        r = bench(c, copy_gbs)
        rows.append(r)
        print(f"B={c.B} Hq={c.Hq} Hkv={c.Hkv} P={c.P} C={c.C} T={c.T}: eager {r['eager_us']:.1f} us, restore "
              f"{r['restore_us']:.1f} us, kernel {r['kernel_us']:.1f} us"
              f"{'' if r['match'] else '  MISMATCH'}", flush=True)
    cols = ["B", "Hq", "Hkv", "P", "C", "T", "mbytes", "floor_us", "eager_us", "restore_us", "kernel_us",
            "kernel_gbs", "kernel_pct_copy", "x_eager", "x_restore", "match"]
    print_table(rows, cols, title=f"merged_attention, bf16 D=128 (us; GB/s = bytes the kernel must move; "
                                  f"floor and pct_copy against the {copy_gbs:.0f} GB/s device copy)")
    write_results("merged_attention", rows, {"copy_gbs_1gib": copy_gbs})
    if not all(r["match"] for r in rows):
        sys.exit("MISMATCH between the kernel, the restore path and the eager reference")


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: CUDA-event timing with a cold L2, tables, JSON results.

Every benchmark times the eager reference beside the kernel in the same run, reports the median
of many timed calls, and writes benchmarks/results/<name>_<device>.json.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


_flush_buf: Optional[torch.Tensor] = None


def flush_l2() -> None:
    """Overwrite a buffer larger than the L2 (50-60 MB on Hopper) so timed reads come from HBM."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _flush_buf.zero_()


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, rep: int = 30, cold_l2: bool = True) -> float:
    """Median microseconds of fn() over `rep` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        if cold_l2:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph(fn: Callable[[], object], **kw) -> float:
    """time_cuda of fn captured in a CUDA graph: the GPU time of an eager pipeline without the
    host's per-op launch overhead (the fairest figure for a multi-op torch baseline)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture (allocator, lazy init)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, **kw)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cuda(lambda: dst.copy_(src), warmup=3, rep=10)
    return 2 * nbytes / us / 1e3


def print_table(rows: Sequence[Dict], columns: Sequence[str], title: str = "") -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def write_results(name: str, rows: List[Dict], meta: Optional[Dict] = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = device_name()
    path = RESULTS / f"{name}_{_slug(dev)}.json"
    payload = {"benchmark": name, "device": dev, "torch": torch.__version__,
               "cuda": torch.version.cuda, **(meta or {}), "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path

"""Command line: ``pyramid-kv info | generate | eval | bench-e2e`` (or ``python -m pyramid_kv ...``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def info() -> str:
    import torch

    import pyramid_kv
    from pyramid_kv import _build_info as b

    lines = [f"pyramid_kv {pyramid_kv.__version__}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); "
             f"extension built against torch {b.TORCH_VERSION}"]
    if b.CUDA_KERNELS:
        lines.append(f"CUDA kernels: built with nvcc {b.NVCC_VERSION} for architectures {b.CUDA_ARCHS}")
    else:
        lines.append("CUDA kernels: not built (CPU kernels only)")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"CUDA device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("CUDA device: none")
    ops = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyramid_kv::")})
    lines.append("ops (kernels):")
    for name in ops:
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        lines.append(f"  torch.ops.{name.replace('::', '.')}: {', '.join(keys)}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyramid-kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, and which kernels were built")
    from . import cli_eval, cli_generate

    cli_generate.add_arguments(sub.add_parser("generate", help="generate with a compressed KV cache"))
    cli_eval.add_arguments(sub.add_parser("eval", help="quality vs KV budget against a full cache and rivals"))
    sub.add_parser("bench-e2e", add_help=False,
                   help="end-to-end throughput/memory vs transformers (GPU; --help for options)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench-e2e"]:
        from . import bench_e2e

        return bench_e2e.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    return {"generate": cli_generate.run, "eval": cli_eval.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

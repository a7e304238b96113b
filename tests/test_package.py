"""The installed package: CLI, build facts, registrations."""

import subprocess
import sys

import torch

import pyramid_kv
from pyramid_kv import _build_info

OPS = ["compact", "compact_", "compact_out", "ensemble_scores", "select_top_k", "select_top_p",
       "slerp_merge", "slerp_restore", "slerp_restore_out", "merged_attention"]


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyramid_kv", "info"], check=True,
                         capture_output=True, text=True).stdout
    assert f"pyramid_kv {pyramid_kv.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert ("CUDA kernels: built" in out) == bool(_build_info.CUDA_KERNELS)
    for op in OPS:
        assert f"torch.ops.pyramid_kv.{op}:" in out


def test_registrations_follow_build():
    for op in OPS:
        name = f"pyramid_kv::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == bool(_build_info.CUDA_KERNELS)
    if _build_info.CUDA_KERNELS:
        assert _build_info.CUDA_ARCHS and _build_info.NVCC_VERSION

import os

import pytest
import torch

import pyramid_kv  # noqa: F401  (registers the ops)
from pyramid_kv import _build_info

HAS_CUDA = torch.cuda.is_available() and _build_info.CUDA_KERNELS

def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and pyramid_kv built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def pytest_configure(config):
    from hypothesis import settings

    settings.register_profile("ci", max_examples=int(os.environ.get("PYRAMID_KV_EXAMPLES", "40")),
                              deadline=None, derandomize=False)
    settings.register_profile("thorough", max_examples=400, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

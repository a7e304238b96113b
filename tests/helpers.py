"""Shared test helpers: devices, poisoning, random generators."""

import pytest
import torch

from conftest import HAS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def devices():
    """Parametrize values for a `device` argument: cpu always, cuda marked (skipped without GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def poison_allocator(device: str) -> None:
    """Fill free blocks of the CUDA caching allocator with NaN so unwritten outputs show."""
    if device == "cuda" and HAS_CUDA:
        junk = torch.full((1 << 24,), float("nan"), device=device)
        del junk


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_lengths(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Ragged lengths in [0, n] that include the edge cases 0, 1 and n when there is room."""
    lengths = torch.randint(0, n + 1, (batch,), generator=g)
    edges = [n, 0, 1]
    for i in range(min(batch, len(edges))):
        if torch.rand((), generator=g) < 0.5:
            lengths[i] = min(edges[i], n)
    return lengths

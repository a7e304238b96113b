"""Fake (meta) kernels: output shapes and dtypes of every op, for torch.compile and tracing.

torch imports this module on demand (the C++ library names it with set_python_module), and
pyramid_kv imports it eagerly.
"""

from typing import List, Optional

import torch
from torch import Tensor


@torch.library.register_fake("pyramid_kv::ensemble_scores")
def _ensemble_scores(q: Tensor, k: Tensor, lengths: Tensor, row_weights: Optional[Tensor],
                     lse: Optional[Tensor], scale: float) -> Tensor:
    return q.new_empty((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


def _selection(scores: Tensor, capacity: int):
    return (scores.new_empty((scores.shape[0], capacity), dtype=torch.int32),
            scores.new_empty((scores.shape[0],), dtype=torch.int32))


@torch.library.register_fake("pyramid_kv::select_top_p")
def _select_top_p(scores, lengths, maybe_top_p, top_p, sink, recent, min_keep, capacity):
    return _selection(scores, capacity)


@torch.library.register_fake("pyramid_kv::select_top_k")
def _select_top_k(scores, lengths, maybe_top_k, top_k, sink, recent, min_keep, capacity):
    return _selection(scores, capacity)


@torch.library.register_fake("pyramid_kv::compact")
def _compact(src: List[Tensor], indices: Tensor, counts: Tensor) -> List[Tensor]:
    c = indices.shape[-1]
    return [s.new_empty((s.shape[0], s.shape[1], c, s.shape[3])) for s in src]


@torch.library.register_fake("pyramid_kv::compact_out")
def _compact_out(src: List[Tensor], indices: Tensor, counts: Tensor, out: List[Tensor]) -> None:
    return None


@torch.library.register_fake("pyramid_kv::compact_")
def _compact_inplace(src: List[Tensor], indices: Tensor, counts: Tensor) -> None:
    return None


@torch.library.register_fake("pyramid_kv::slerp_merge")
def _slerp_merge(a: Tensor, b: Tensor, t: float, eps: float):
    vec = a.shape[:3]
    return (a.new_empty(a.shape), a.new_empty(vec, dtype=torch.float32),
            a.new_empty(vec, dtype=torch.float32), a.new_empty(vec, dtype=torch.float32))


@torch.library.register_fake("pyramid_kv::slerp_restore")
def _slerp_restore(direction: Tensor, norm: Tensor) -> Tensor:
    return direction.new_empty(direction.shape)


@torch.library.register_fake("pyramid_kv::slerp_restore_out")
def _slerp_restore_out(direction: Tensor, norm: Tensor, out: Tensor) -> None:
    return None


@torch.library.register_fake("pyramid_kv::merged_attention")
def _merged_attention(q, dir_k, dir_v, norm_k, norm_v, lengths, retained_k, retained_v,
                      retained_counts, tail_k, tail_v, tail_lengths, scale) -> Tensor:
    return q.new_empty(q.shape)

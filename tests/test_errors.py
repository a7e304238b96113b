"""Bad inputs raise clear errors that name the argument, on every device."""

import re

import pytest
import torch

import pyramid_kv as pk
from helpers import devices


def raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=re.escape(pattern) if not pattern.startswith("re:") else pattern[3:]):
        fn(*args, **kwargs)


@pytest.mark.parametrize("device", devices())
def test_ensemble_scores_errors(device):
    q = torch.randn(2, 8, 4, 64, device=device)
    k = torch.randn(2, 2, 30, 64, device=device)
    L = torch.tensor([30, 10], device=device)
    raises(ValueError, "q must be 4-D", pk.ensemble_scores, q[0], k, L)
    raises(ValueError, "k must be 4-D", pk.ensemble_scores, q, k[0], L)
    raises(TypeError, "q must be float32, float16 or bfloat16", pk.ensemble_scores, q.double(), k.double(), L)
    raises(TypeError, "k must have the dtype of q", pk.ensemble_scores, q, k.half(), L)
    raises(ValueError, "k must have the head dim of q", pk.ensemble_scores, q, k[..., :32], L)
    raises(ValueError, "k must have the batch size of q", pk.ensemble_scores, q, k[:1], L)
    raises(ValueError, "q heads (8) must be a multiple of k heads (3)", pk.ensemble_scores, q,
           torch.randn(2, 3, 30, 64, device=device), L)
    raises(ValueError, "q must be contiguous in its last dimension", pk.ensemble_scores,
           q.transpose(2, 3)[:, :, :, :4], k[..., :4], L)
    raises(TypeError, "lengths must be int32 or int64", pk.ensemble_scores, q, k, L.float())
    raises(ValueError, "lengths must have shape [2]", pk.ensemble_scores, q, k, L[:1])
    raises(ValueError, "lengths[0] = 31 is outside [0", pk.ensemble_scores, q, k, L + 1)
    raises(ValueError, "lengths[1] = -1 is outside [0", pk.ensemble_scores, q, k, torch.tensor([3, -1], device=device))
    raises(ValueError, "row_weights must have shape [B, W]", pk.ensemble_scores, q, k, L,
           row_weights=torch.ones(2, 5, device=device))
    raises(TypeError, "row_weights must be float32", pk.ensemble_scores, q, k, L,
           row_weights=torch.ones(2, 4, device=device, dtype=torch.float64))
    raises(ValueError, "lse must have shape [B, Hq, W]", pk.ensemble_scores, q, k, L,
           lse=torch.zeros(2, 2, 4, device=device))
    raises(ValueError, "scale must be finite and > 0", pk.ensemble_scores, q, k, L, scale=-1.0)
    if device == "cuda":
        raises(ValueError, "k must be on the same device as q", pk.ensemble_scores, q, k.cpu(), L)


@pytest.mark.parametrize("device", devices())
def test_select_errors(device):
    s = torch.rand(3, 20, device=device)
    L = torch.tensor([20, 5, 0], device=device)
    for fn, good in [(pk.select_top_p, 0.5), (pk.select_top_k, 3)]:
        raises(ValueError, "scores must be 2-D [S, N]", fn, s[0], L, good)
        raises(TypeError, "scores must be float32, float16 or bfloat16", fn, s.double(), L, good)
        raises(ValueError, "lengths must have shape [3]", fn, s, L[:2], good)
        raises(ValueError, "lengths[0] = 21 is outside [0, N=20]", fn, s, L + 1, good)
        raises(ValueError, "sink must be >= 0", fn, s, L, good, sink=-1)
        raises(ValueError, "recent must be >= 0", fn, s, L, good, recent=-2)
        raises(ValueError, "min_keep must be >= 0", fn, s, L, good, min_keep=-2)
        raises(ValueError, "capacity (5) must hold the forced positions", fn, s, L, good, sink=4,
               recent=4, capacity=5)
        raises(ValueError, "capacity (5) must be at least min(N, min_keep)", fn, s, L, good,
               min_keep=8, capacity=5)
        raises(ValueError, "scores must be contiguous in its last dimension", fn, s.t(), L, good)
    for bad in [0.0, -0.1, 1.5, float("nan")]:
        raises(ValueError, "top_p must be in (0, 1]", pk.select_top_p, s, L, bad)
    raises(ValueError, "re:top_p\\[1\\] = .* is outside", pk.select_top_p, s, L,
           torch.tensor([0.5, 0.0, 0.3], device=device))
    raises(TypeError, "maybe_top_p must be float32", pk.select_top_p, s, L,
           torch.tensor([0.5, 0.2, 0.3], device=device, dtype=torch.float64))
    raises(ValueError, "maybe_top_p must have shape [S] = [3]", pk.select_top_p, s, L,
           torch.tensor([0.5, 0.2], device=device))
    raises(ValueError, "top_k must be >= 0", pk.select_top_k, s, L, -1)
    raises(ValueError, "re:top_k\\[2\\] = -4 is (outside|negative)", pk.select_top_k, s, L,
           torch.tensor([1, 2, -4], device=device))
    raises(TypeError, "maybe_top_k must be int32 or int64", pk.select_top_k, s, L,
           torch.tensor([1.0, 2.0, 3.0], device=device))


@pytest.mark.parametrize("device", devices())
def test_compact_errors(device):
    k = torch.randn(2, 4, 10, 8, device=device)
    idx = torch.tensor([[0, 3, 9], [1, 2, -1]], device=device)
    cnt = torch.tensor([3, 2], device=device)
    raises(ValueError, "src must hold at least one tensor", pk.compact, [], idx, cnt)
    raises(ValueError, "src[0] must be 4-D", pk.compact, [k[0]], idx, cnt)
    raises(TypeError, "indices must be int32 or int64", pk.compact, [k], idx.float(), cnt)
    raises(TypeError, "counts must be int32 or int64", pk.compact, [k], idx, cnt.float())
    raises(ValueError, "counts must have shape [2]", pk.compact, [k], idx, cnt[:1])
    raises(ValueError, "src[0] must have the batch size of indices", pk.compact, [k[:1]], idx, cnt)
    raises(ValueError, "src[1] must have the token count of src[0]", pk.compact, [k, k[:, :, :5]], idx, cnt)
    raises(ValueError, "must have as many heads as the per-head indices", pk.compact, [k],
           idx[:, None].expand(2, 3, 3), cnt[:, None].expand(2, 3))
    raises(ValueError, "re:counts\\[1\\] = 4 is outside", pk.compact, [k], idx, torch.tensor([3, 4], device=device))
    raises(ValueError, "re:indices.* = 10 is outside", pk.compact, [k], torch.tensor([[0, 10, 1], [0, 0, 0]], device=device), cnt)
    raises(ValueError, "re:indices.* = -1 is outside", pk.compact, [k], idx, torch.tensor([3, 3], device=device))
    raises(ValueError, "out must hold one tensor per src tensor", pk.compact, [k], idx, cnt, out=[])
    raises(TypeError, "out[0] must have the dtype of src[0]", pk.compact, [k], idx, cnt,
           out=[torch.empty(2, 4, 3, 8, device=device, dtype=torch.half)])
    raises(ValueError, "out[0] must have shape [B, H, >= C, D]", pk.compact, [k], idx, cnt,
           out=[torch.empty(2, 4, 2, 8, device=device)])
    raises(ValueError, "out[0] must not share memory with src[0]", pk.compact, [k], idx, cnt, out=[k])


@pytest.mark.parametrize("device", devices())
def test_compact_inplace_errors(device):
    k = torch.randn(2, 4, 10, 8, device=device)
    idx = torch.tensor([[0, 3, 9], [1, 2, -1]], device=device)
    cnt = torch.tensor([3, 2], device=device)
    raises(ValueError, "src must hold at least one tensor", pk.compact_, [], idx, cnt)
    raises(ValueError, "src[0] must be 4-D", pk.compact_, [k[0]], idx, cnt)
    raises(TypeError, "indices must be int32 or int64", pk.compact_, [k], idx.float(), cnt)
    raises(ValueError, "src[1] must not share memory with src[0]", pk.compact_, [k, k], idx, cnt)
    raises(ValueError, "src[0] has elements that share memory", pk.compact_,
           [k[:, :1].expand(2, 4, 10, 8)], idx, cnt)
    raises(ValueError, "re:counts\\[1\\] = 4 is outside", pk.compact_, [k], idx, torch.tensor([3, 4], device=device))
    raises(ValueError, "re:indices.* = 10 is outside", pk.compact_, [k], torch.tensor([[0, 10, 1], [0, 0, 0]], device=device), cnt)
    # Strictly ascending within the count (the CPU kernel and the CUDA wrapper both check).
    raises(ValueError, "indices row 0 must be strictly ascending for in-place compaction: entry 2 = 3 follows 3",
           pk.compact_, [k], torch.tensor([[0, 3, 3], [1, 2, -1]], device=device), cnt)
    raises(ValueError, "indices row 1 must be strictly ascending for in-place compaction: entry 1 = 1 follows 2",
           pk.compact_, [k], torch.tensor([[0, 3, 9], [2, 1, -1]], device=device), cnt)
    per_head = torch.tensor([[[0, 3, 9]] * 4, [[1, 2, -1]] * 3 + [[5, 4, -1]]], device=device)
    raises(ValueError, "indices row 7 must be strictly ascending", pk.compact_, [k], per_head,
           torch.tensor([[3] * 4, [2] * 4], device=device))
    pk.compact_([k], torch.tensor([[0, 3, 3], [1, 2, -1]], device=device), torch.tensor([2, 2], device=device))
    # Interleaved views of one buffer (K and V of a [B, H, N, 2, D] cache) are distinct elements.
    kv = torch.randn(2, 4, 10, 2, 8, device=device)
    pk.compact_([kv[:, :, :, 0], kv[:, :, :, 1]], idx, cnt)


def test_wrapper_value_checks_match_cpu_kernel_messages():
    """The wrappers' pre-checks (used for CUDA tensors) say what the CPU kernels say."""
    from pyramid_kv import ops

    def message(fn, *args):
        with pytest.raises(ValueError) as e:
            fn(*args)
        return str(e.value).splitlines()[0]

    s = torch.rand(3, 20)
    L = torch.tensor([20, 21, 0])
    assert message(ops._check_lengths, L, 20) == message(pk.select_top_k, s, L, 3)
    p = torch.tensor([0.5, 0.0, 0.3])
    assert message(ops._check_top_p, p) == message(pk.select_top_p, s, L.clamp(max=20), p)
    k = torch.tensor([1, 2, -4])
    assert message(ops._check_top_k, k) == message(pk.select_top_k, s, L.clamp(max=20), k)
    src = torch.randn(2, 4, 10, 8)
    idx = torch.tensor([[0, 3, 9], [1, 12, -1]])
    for cnt in (torch.tensor([3, 4]), torch.tensor([3, 2])):
        assert message(ops._check_compact_values, idx, cnt, 10) == message(pk.compact, [src], idx, cnt)

    def inplace_checks(idx, cnt):
        ops._check_compact_values(idx, cnt, 10)
        ops._check_ascending(idx, cnt)

    idx = torch.tensor([[0, 3, 9], [1, 7, 7]])
    for cnt in (torch.tensor([3, 3]), torch.tensor([3, 4])):
        assert message(inplace_checks, idx, cnt) == message(pk.compact_, [src], idx, cnt)


@pytest.mark.parametrize("device", devices())
def test_slerp_merge_errors(device):
    from pyramid_kv import ops

    a = torch.randn(2, 10, 4, 8, device=device)
    b = torch.randn(2, 10, 4, 8, device=device)
    op = torch.ops.pyramid_kv.slerp_merge
    raises(ValueError, "a must be 4-D [B, X, Y, D]", ops.slerp_merge, a[0], b[0])
    raises(ValueError, "b must be 4-D [B, X, Y, D]", ops.slerp_merge, a, b[0])
    raises(TypeError, "a must be float32, float16 or bfloat16", ops.slerp_merge, a.double(), b.double())
    raises(TypeError, "b must have the dtype of a", ops.slerp_merge, a, b.half())
    raises(ValueError, "b must have the shape of a", ops.slerp_merge, a, b[:, :5])
    raises(ValueError, "a must be contiguous in its last dimension", ops.slerp_merge,
           a.transpose(2, 3), b.transpose(2, 3))
    raises(ValueError, "b must be contiguous in its last dimension", ops.slerp_merge, a,
           torch.randn(2, 10, 8, 4, device=device).transpose(2, 3))
    for bad in (-0.1, 1.5, float("nan")):
        raises(ValueError, "t must be in [0, 1]", ops.slerp_merge, a, b, bad)
        raises(ValueError, "t must be in [0, 1]", op, a, b, bad, 1e-6)
    raises(ValueError, "eps must be finite and >= 0", ops.slerp_merge, a, b, 0.5, -1.0)
    if device == "cuda":
        raises(ValueError, "b must be on the same device as a", ops.slerp_merge, a, b.cpu())


@pytest.mark.parametrize("device", devices())
def test_slerp_restore_errors(device):
    from pyramid_kv import ops

    d = torch.randn(2, 10, 4, 8, device=device)
    n = torch.rand(2, 10, 4, device=device)
    raises(ValueError, "direction must be 4-D [B, X, Y, D]", ops.slerp_restore, d[0], n)
    raises(TypeError, "direction must be float32, float16 or bfloat16", ops.slerp_restore, d.double(), n)
    raises(ValueError, "direction must be contiguous in its last dimension", ops.slerp_restore,
           d.transpose(2, 3), n[:, :, :1].expand(2, 10, 8))
    raises(TypeError, "norm must be float32", ops.slerp_restore, d, n.half())
    raises(ValueError, "norm must have shape [B, X, Y] = [2, 10, 4]", ops.slerp_restore, d, n[:, :3])
    raises(TypeError, "out must have the dtype of direction", ops.slerp_restore, d, n,
           out=torch.empty(2, 10, 4, 8, device=device, dtype=torch.half))
    raises(ValueError, "out must have the shape of direction", ops.slerp_restore, d, n,
           out=torch.empty(2, 10, 4, 7, device=device))
    raises(ValueError, "out must be contiguous in its last dimension", ops.slerp_restore, d, n,
           out=torch.empty(2, 10, 8, 4, device=device).transpose(2, 3))
    if device == "cuda":
        raises(ValueError, "norm must be on the same device as direction", ops.slerp_restore, d, n.cpu())
        raises(ValueError, "out must be on the same device as direction", ops.slerp_restore, d, n,
               out=torch.empty(2, 10, 4, 8))


@pytest.mark.parametrize("device", devices())
def test_merged_attention_errors(device):
    B, Hq, Hkv, D, P, C, T = 2, 8, 2, 16, 10, 3, 4
    good = dict(q=torch.randn(B, Hq, D), dir_k=torch.randn(B, P, Hkv, D), dir_v=torch.randn(B, P, Hkv, D),
                norm_k=torch.rand(B, P, Hkv), norm_v=torch.rand(B, P, Hkv), lengths=torch.tensor([10, 4]),
                retained_k=torch.randn(B, Hkv, C, D), retained_v=torch.randn(B, Hkv, C, D),
                retained_counts=torch.tensor([[3, 1], [0, 2]]), tail_k=torch.randn(B, T, Hkv, D),
                tail_v=torch.randn(B, T, Hkv, D), tail_lengths=torch.tensor([4, 0]))
    good = {k: v.to(device) for k, v in good.items()}

    def call(**bad):
        pk.merged_attention(**{**good, **bad})

    call()
    raises(ValueError, "q must be 3-D [B, Hq, D]", call, q=good["q"][None])
    raises(TypeError, "q must be float32, float16 or bfloat16", call, q=good["q"].double())
    raises(ValueError, "q must be contiguous in its last dimension", call,
           q=torch.randn(B, D, Hq, device=device).transpose(1, 2))
    for name in ("dir_k", "dir_v", "retained_k", "retained_v", "tail_k", "tail_v"):
        t = good[name]
        raises(ValueError, f"{name} must be 4-D", call, **{name: t[0]})
        raises(TypeError, f"{name} must have the dtype of q", call, **{name: t.half()})
        raises(ValueError, f"re:{name} must (have the head dim of q|have shape)", call, **{name: t[..., :8]})
        raises(ValueError, f"re:{name} must have shape", call, **{name: t[:1]})
        raises(ValueError, f"{name} must be contiguous in its last dimension", call,
               **{name: t.transpose(-1, -2).contiguous().transpose(-1, -2)})
    raises(ValueError, "dir_v must have shape", call, dir_v=good["dir_v"][:, :5])
    raises(ValueError, "retained_v must have shape", call, retained_v=good["retained_v"][:, :, :2])
    raises(ValueError, "tail_v must have shape", call, tail_v=good["tail_v"][:, :2])
    raises(ValueError, "q heads (8) must be a multiple of the KV heads of dir_k (3)", call,
           dir_k=torch.randn(B, P, 3, D, device=device), dir_v=torch.randn(B, P, 3, D, device=device))
    for name in ("norm_k", "norm_v"):
        raises(TypeError, f"{name} must be float32", call, **{name: good[name].double()})
        raises(ValueError, f"{name} must have shape [B, P, Hkv] = [2, 10, 2]", call, **{name: good[name][:, :3]})
    for name in ("lengths", "tail_lengths", "retained_counts"):
        raises(TypeError, f"{name} must be int64", call, **{name: good[name].int()})
        raises(ValueError, f"{name} must have shape", call, **{name: good[name][:1]})
    raises(ValueError, "scale must be finite and > 0", pk.merged_attention, *good.values(), -1.0)
    if device == "cuda":
        raises(ValueError, "dir_k must be on the same device as q", call, dir_k=good["dir_k"].cpu())
        raises(ValueError, "tail_lengths must be on the same device as q", call, tail_lengths=good["tail_lengths"].cpu())

"""torch.library.opcheck on every op (schema, fake kernel, dispatch), plus torch.compile."""

import pytest
import torch

from helpers import devices
from samples import sample_inputs


def _cases(device):
    return list(sample_inputs(device))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    n = 0
    for name, op, args, _ in _cases(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n > 40


@pytest.mark.parametrize("device", devices())
def test_samples_match_reference(device):
    for name, op, args, reference in _cases(device):
        if reference is None:
            continue
        got, expect = op(*args), reference(*[a.cpu() if isinstance(a, torch.Tensor) else
                                              [x.cpu() for x in a] if isinstance(a, list) else a
                                              for a in args])
        got = [got] if isinstance(got, torch.Tensor) else got
        expect = [expect] if isinstance(expect, torch.Tensor) else expect
        for x, y in zip(got, expect):
            if x.dtype.is_floating_point and name == "ensemble_scores":
                torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(x.cpu(), y), name


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    """The ops trace through their fake kernels and run inside a compiled graph."""
    import pyramid_kv as pk

    def step(q, k, v, lengths):
        scores = torch.ops.pyramid_kv.ensemble_scores(q, k, lengths, None, None, 0.125).sum(1)
        idx, counts = torch.ops.pyramid_kv.select_top_k(scores, lengths, None, 8, 2, 4, 0, 16)
        k2, v2 = torch.ops.pyramid_kv.compact([k, v], idx, counts)
        return k2 * 2, v2, counts

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 4, 64, generator=g).to(device)
    k = torch.randn(2, 2, 40, 64, generator=g).to(device)
    v = torch.randn(2, 2, 40, 64, generator=g).to(device)
    lengths = torch.tensor([40, 23], device=device)
    eager = step(q, k, v, lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lengths)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    del pk


@pytest.mark.cuda
def test_kernels_run_on_current_stream():
    """Inputs produced late on a side stream are seen: the ops launch on torch's current stream."""
    import pyramid_kv as pk
    from pyramid_kv import reference as ref

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 64, generator=g).cuda()
    k_old, k_new = torch.randn(2, 1, 4, 50, 64, generator=g).cuda()
    lengths = torch.tensor([50], device="cuda")
    k = k_old.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keep the side stream busy before the write lands
        k.copy_(k_new)
        scores = pk.ensemble_scores(q, k, lengths)
        sel = pk.select_top_k(scores[:, 0], lengths, 5, validate=False)
        (kept,) = pk.compact([k], sel.indices, sel.counts, validate=False)
    side.synchronize()
    expect = ref.ensemble_scores(q.double(), k_new.double(), lengths).float()
    torch.testing.assert_close(scores, expect, rtol=1e-4, atol=1e-5)
    idx, cnt = ref.select_top_k(expect[:, 0], lengths, 5)
    assert torch.equal(sel.indices, idx) and torch.equal(kept, ref.compact([k_new], idx, cnt)[0])


def _merge_cases(device):
    """(op, args) of slerp_merge / slerp_restore(_out): every dtype, strided views, empty batches."""
    g = torch.Generator().manual_seed(77)
    ops = torch.ops.pyramid_kv
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, N, H, D in [(2, 9, 3, 64), (1, 1, 1, 8), (2, 0, 2, 16), (1, 5, 2, 3)]:
            base = torch.randn(2, B, N + 1, H, D, generator=g).to(dtype).to(device)
            a, b = base[0, :, :N], base[1, :, 1:].transpose(1, 2).contiguous().transpose(1, 2)
            yield ops.slerp_merge.default, (a, b, 0.5, 1e-6)
            yield ops.slerp_merge.default, (a.transpose(1, 2), b.transpose(1, 2), 0.0, 1e-6)
            norm = torch.rand(B, N, H, generator=g).to(device)
            yield ops.slerp_restore.default, (a, norm)
            out = torch.empty(B, N + 2, H, D, dtype=dtype, device=device)[:, 1:N + 1]
            yield ops.slerp_restore_out.default, (b, norm, out)


@pytest.mark.parametrize("device", devices())
def test_opcheck_merge(device):
    n = 0
    for op, args in _merge_cases(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n == 48


@pytest.mark.parametrize("device", devices())
def test_torch_compile_merge(device):
    """MiniCache merge, divergence ranking and restore inside one compiled graph."""

    def step(a, b, lengths):
        direction, na, nb, dist = torch.ops.pyramid_kv.slerp_merge(a, b, 0.5, 1e-6)
        idx, counts = torch.ops.pyramid_kv.select_top_k(dist.mean(-1), lengths, None, 4, 0, 0, 0, 4)
        ra = torch.ops.pyramid_kv.slerp_restore(direction, na)
        rb = torch.empty_like(b)
        torch.ops.pyramid_kv.slerp_restore_out(direction, nb, rb)
        return ra + 1, rb, idx, counts

    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 30, 2, 64, generator=g).to(device)
    b = torch.randn(2, 30, 2, 64, generator=g).to(device)
    lengths = torch.tensor([30, 17], device=device)
    eager = step(a, b, lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, lengths)
    for x, y in zip(eager, compiled):
        assert torch.equal(x, y)


def _merged_attention_cases(device):
    """Argument tuples of merged_attention: every dtype, strided views, empty segments and batches."""
    from test_merged_attention import make_inputs

    g = torch.Generator().manual_seed(78)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, Hq, Hkv, D, P, C, T, strided in [(2, 8, 2, 64, 9, 3, 4, True), (1, 1, 1, 8, 1, 1, 1, False),
                                                (2, 4, 4, 16, 0, 0, 3, True), (0, 2, 1, 8, 3, 2, 2, False),
                                                (1, 3, 1, 100, 5, 0, 0, True)]:
            args = make_inputs(g, B, Hq, Hkv, D, P, C, T, dtype, strided, pad=1 if D == 100 else 0)
            yield tuple(a.to(device) for a in args) + (0.2,)


@pytest.mark.parametrize("device", devices())
def test_opcheck_merged_attention(device):
    n = 0
    for args in _merged_attention_cases(device):
        torch.library.opcheck(torch.ops.pyramid_kv.merged_attention.default, args)
        n += 1
    assert n == 15


@pytest.mark.parametrize("device", devices())
def test_torch_compile_merged_attention(device):
    """Merge, flag the most divergent tokens and attend over the merged slot in one compiled graph."""

    def step(q, k, v, lengths, tail_k, tail_v, tail_lengths):
        dk, nk, _, dist_k = torch.ops.pyramid_kv.slerp_merge(k, k.flip(1), 0.5, 1e-6)
        dv, nv, _, _ = torch.ops.pyramid_kv.slerp_merge(v, v.flip(1), 0.5, 1e-6)
        B, P, H, D = k.shape
        idx, counts = torch.ops.pyramid_kv.select_top_k(dist_k.transpose(1, 2).reshape(B * H, P),
                                                        lengths.repeat_interleave(H), None, 2, 0, 0, 0, 2)
        idx, counts = idx.view(B, H, 2).long().clamp(min=0), counts.view(B, H).long()
        rk, rv = torch.ops.pyramid_kv.compact([k.transpose(1, 2), v.transpose(1, 2)], idx, counts)
        flag = torch.zeros(B, H, P, device=k.device).scatter(2, idx, 1.0).transpose(1, 2) > 0
        nk = torch.where(flag, -1.0, nk)
        out = torch.ops.pyramid_kv.merged_attention(q, dk, dv, nk, nv, lengths, rk, rv, counts,
                                                    tail_k, tail_v, tail_lengths, 0.125)
        return out * 2, counts

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 64, generator=g).to(device)
    k, v = torch.randn(2, 2, 30, 2, 64, generator=g).to(device)
    tk, tv = torch.randn(2, 2, 5, 2, 64, generator=g).to(device)
    lengths, tail_lengths = torch.tensor([30, 17], device=device), torch.tensor([5, 0], device=device)
    eager = step(q, k, v, lengths, tk, tv, tail_lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lengths, tk, tv, tail_lengths)
    for x, y in zip(eager, compiled):
        assert torch.equal(x, y)

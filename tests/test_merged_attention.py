"""merged_attention: decode attention over a merged layer against the float64 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyramid_kv as pk
from pyramid_kv import reference as ref
from helpers import DTYPES, devices, generator, poison_allocator, rand_lengths

# Outputs are averages of values of magnitude ~1-3: one rounding of the output dtype (the
# reference rounds too), plus float32 accumulation.
TOL = {torch.float32: dict(atol=5e-5, rtol=5e-5), torch.float16: dict(atol=4e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2)}
HEADS = [(1, 1), (4, 1), (8, 2), (5, 5), (12, 4), (2, 1), (8, 1), (12, 1)]  # G = 1, 4, 4, 1, 3, 2, 8, 12
HEAD_DIMS = [8, 64, 100, 128, 256]


def make_inputs(g, B, Hq, Hkv, D, P, C, T, dtype, strided=True, pad=0, flag=0.15):
    """Arguments of merged_attention (on the CPU); with strided, every tensor is a view with
    non-trivial strides (pad > 0 also shifts rows off 16-byte boundaries)."""
    def view(x):  # x as a view [..., D] of a wider buffer (one more row in dim 1, pad columns)
        if not strided:
            return x.contiguous()
        buf = torch.zeros(x.shape[0], x.shape[1] + 1, *x.shape[2:-1], D + pad, dtype=dtype)
        buf[:, 1:, ..., pad:] = x
        return buf[:, 1:, ..., pad:]

    def rows(*shape):
        return view(torch.randn(*shape, D, generator=g).to(dtype))

    q = rows(B, Hq)
    dirs = [torch.randn(B, P, Hkv, D, generator=g) for _ in range(2)]
    dirs = [view((d / d.norm(dim=-1, keepdim=True).clamp(min=1e-6)).to(dtype)) for d in dirs]
    scale_n = D ** 0.5  # norms ~ sqrt(D): merged keys as large as the raw (randn) rows
    norms = [(torch.rand(B, Hkv, P, generator=g) + 0.5).transpose(1, 2) * scale_n for _ in range(2)]
    norms[0] = torch.where(torch.rand(B, P, Hkv, generator=g) < flag, -1.0, norms[0])
    lengths = rand_lengths(B, P, g)
    rk, rv = rows(B, Hkv, C), rows(B, Hkv, C)
    if strided and C:  # token-major storage seen as [B, Hkv, C, D]
        rv = rv.transpose(1, 2).contiguous().transpose(1, 2)
    counts = torch.randint(0, C + 1, (B, Hkv), generator=g)
    if B and Hkv and C:
        counts[0, 0] = C
    tk, tv = rows(B, T, Hkv), rows(B, T, Hkv)
    tail_lengths = rand_lengths(B, T, g)
    return [q, dirs[0], dirs[1], norms[0], norms[1], lengths, rk, rv, counts, tk, tv, tail_lengths]


def run_and_check(args, device, scale=None):
    dtype = args[0].dtype
    expect = ref.merged_attention(*args, scale)
    poison_allocator(device)
    got = pk.merged_attention(*[a.to(device) for a in args], scale)
    assert got.shape == args[0].shape and got.dtype == dtype and got.device.type == device
    torch.testing.assert_close(got.cpu().float(), expect.float(), **TOL[dtype])
    return got


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=[f"{a}_{b}" for a, b in HEADS])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_matches_reference(device, dtype, heads, D):
    Hq, Hkv = heads
    g = generator(Hq * 1000 + D)
    for B, P, C, T, strided, pad in [(3, 70, 5, 9, True, 0), (1, 1, 1, 1, False, 0), (3, 0, 3, 2, True, 0),
                                     (2, 33, 0, 0, True, 3), (0, 4, 2, 2, False, 0)]:
        run_and_check(make_inputs(g, B, Hq, Hkv, D, P, C, T, dtype, strided, pad), device)


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(0, 3), heads=st.sampled_from(HEADS),
       D=st.sampled_from([1, 8, 24, 64, 100, 128, 200, 256, 512]), P=st.sampled_from([0, 1, 2, 17, 300]),
       C=st.sampled_from([0, 1, 6]), T=st.sampled_from([0, 1, 5, 40]), dtype=st.sampled_from(DTYPES),
       strided=st.booleans(), pad=st.sampled_from([0, 1, 8]), flag=st.sampled_from([0.0, 0.2, 1.0]),
       scale=st.sampled_from([None, 0.01, 0.3]))
def test_hypothesis(device, seed, B, heads, D, P, C, T, dtype, strided, pad, flag, scale):
    g = generator(seed)
    run_and_check(make_inputs(g, B, *heads, D, P, C, T, dtype, strided, pad, flag), device, scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_long_ragged_splits(device, dtype):
    """Many splits (long prompts) with ragged and tiny lengths: some splits see no keys."""
    g = generator(5)
    args = make_inputs(g, 3, 8, 2, 128, 3000, 40, 300, dtype)
    args[5] = torch.tensor([3000, 2, 0])           # prompt lengths
    args[11] = torch.tensor([0, 300, 1])           # tail lengths
    args[8][2] = 0                                 # sequence 2, no retained rows: one key left
    run_and_check(args, device)


@pytest.mark.parametrize("device", devices())
def test_empty_key_sets_give_zeros(device):
    g = generator(6)
    args = make_inputs(g, 2, 4, 2, 64, 10, 3, 4, torch.float32)
    args[3] = -torch.ones_like(args[3])            # every prompt token flagged
    args[8] = torch.zeros_like(args[8])
    args[11] = torch.tensor([0, 2])
    got = run_and_check(args, device).cpu()
    assert torch.equal(got[0], torch.zeros_like(got[0])) and (got[1] != 0).any()


@pytest.mark.parametrize("device", devices())
def test_out_of_range_lengths_are_clamped(device):
    g = generator(7)
    args = make_inputs(g, 2, 4, 2, 64, 10, 3, 4, torch.float32)
    args[5], args[8], args[11] = torch.tensor([99, 10]), args[8].clamp(max=3) + 5, torch.tensor([-3, 4])
    clamped = [args[5].clamp(0, 10), args[8].clamp(0, 3), args[11].clamp(0, 4)]
    expect = ref.merged_attention(*args[:5], clamped[0], *args[6:8], clamped[1], *args[9:11], clamped[2])
    got = pk.merged_attention(*[a.to(device) for a in args])
    torch.testing.assert_close(got.cpu(), expect, **TOL[torch.float32])


@pytest.mark.parametrize("device", devices())
def test_equals_attention_over_the_restored_rows(device):
    """The runner's two paths: attending directly equals SDPA over restored K/V (norm * direction,
    retained rows over their flagged positions, tail after the prompt rows)."""
    g = generator(8)
    B, Hq, Hkv, P, C, T, D = 2, 8, 2, 40, 4, 6, 64
    k = torch.randn(B, P, Hkv, D, generator=g)
    v = torch.randn(B, P, Hkv, D, generator=g)
    nk, nv = k.norm(dim=-1), v.norm(dim=-1)
    idx = torch.stack([torch.randperm(P, generator=g)[:C] for _ in range(B * Hkv)]).view(B, Hkv, C)
    flagged = nk.clone()
    for b in range(B):
        for h in range(Hkv):
            flagged[b, idx[b, h], h] = -1.0
    rk = k.transpose(1, 2).gather(2, idx[..., None].expand(B, Hkv, C, D))
    rv = v.transpose(1, 2).gather(2, idx[..., None].expand(B, Hkv, C, D))
    tk, tv = torch.randn(2, B, T, Hkv, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    full = torch.full((B,), P)
    args = [q, k / nk[..., None], v / nv[..., None], flagged, nv, full, rk, rv, torch.full((B, Hkv), C),
            tk, tv, torch.full((B,), T)]
    got = pk.merged_attention(*[a.to(device) for a in args], 0.125).cpu()
    keys, values = torch.cat([k, tk], 1).transpose(1, 2), torch.cat([v, tv], 1).transpose(1, 2)
    expect = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys, values, scale=0.125, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_merged_race_paths(dtype):
    """One small case per CUDA path (16-byte packets of 8/16/32 lanes, 2 packets per lane, the
    generic path; 1-8 heads per CTA, several head chunks): the racecheck selection."""
    g = generator(9)
    for Hq, Hkv, D, pad in [(8, 1, 64, 0), (4, 2, 128, 0), (2, 1, 256, 0), (12, 1, 100, 1), (3, 3, 32, 0)]:
        run_and_check(make_inputs(g, 2, Hq, Hkv, D, 300, 7, 20, dtype, True, pad), "cuda")


@pytest.mark.cuda
def test_cuda_graph_replay_follows_lengths():
    """Captured once, replayed with new lengths, counts, flags and rows: no host sync, shapes only."""
    g = generator(10)
    args = [a.cuda() for a in make_inputs(g, 3, 8, 2, 128, 500, 20, 64, torch.bfloat16, strided=False)]
    pk.merged_attention(*args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pk.merged_attention(*args)
    for step in range(3):
        args[5].copy_(torch.tensor([500 - 100 * step, 7 * step, 1]))
        args[8].copy_(torch.randint(0, 21, args[8].shape, generator=g))
        args[11].copy_(torch.tensor([step, 64, 30 + step]))
        args[3].copy_(torch.where(torch.rand(args[3].shape, generator=g) < 0.1, -1.0, args[3].abs().cpu()))
        args[9].copy_(torch.randn(args[9].shape, generator=g).to(args[9]))
        graph.replay()
        expect = ref.merged_attention(*[a.cpu() for a in args])
        torch.testing.assert_close(out.cpu().float(), expect.float(), **TOL[torch.bfloat16])

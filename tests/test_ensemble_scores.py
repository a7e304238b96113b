"""ensemble_scores against the float64 reference on random shapes, ragged lengths and GQA."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyramid_kv as pk
from pyramid_kv import reference as ref
from helpers import DTYPES, devices, generator, poison_allocator, rand_lengths


def make_inputs(seed, device, dtype, B, Hkv, G, W, N, D, weights, given_lse):
    g = generator(seed)
    q = torch.randn(B, Hkv * G, W, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    lengths = rand_lengths(B, N, g)
    rw = torch.rand(B, W, generator=g) + 0.5 if weights else None
    lse = None
    if given_lse:
        scale = D ** -0.5
        s = torch.einsum("bhwd,bhnd->bhwn", q.double(), k.double().repeat_interleave(G, 1)) * scale
        pos = lengths[:, None] - W + torch.arange(W)
        vis = torch.arange(N) <= pos[:, :, None]
        lse = s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1).float()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(lengths), to(rw), to(lse)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), Hkv=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 4, 8]), N=st.integers(0, 70), W=st.integers(0, 40),
       D=st.sampled_from([8, 16, 64, 128]), dtype=st.sampled_from(DTYPES), weights=st.booleans(),
       given_lse=st.booleans())
def test_matches_float64_reference(device, seed, B, Hkv, G, N, W, D, dtype, weights, given_lse):
    q, k, lengths, rw, lse = make_inputs(seed, device, dtype, B, Hkv, G, W, N, D, weights, given_lse)
    poison_allocator(device)
    out = pk.ensemble_scores(q, k, lengths, row_weights=rw, lse=lse)
    expect = ref.ensemble_scores(q.double(), k.double(), lengths, rw, lse)
    assert out.shape == (B, Hkv, N) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, expect) <= 2e-5
    # Past each sequence's length every score is exactly zero.
    mask = torch.arange(N, device=device) >= lengths[:, None]
    assert (out.masked_select(mask[:, None, :].expand_as(out)) == 0).all()


@pytest.mark.parametrize("device", devices())
def test_window_edges_and_mass(device):
    """W = 1, W = N and N = 1; with unit weights every row's probabilities sum to 1."""
    g = generator(7)
    for B, N, W in [(2, 1, 1), (3, 33, 1), (2, 33, 33), (2, 20, 25)]:
        q = torch.randn(B, 8, W, 16, generator=g).to(device)
        k = torch.randn(B, 2, N, 16, generator=g).to(device)
        lengths = torch.tensor([N] + [max(N - 3, 0)] * (B - 1)).to(device)
        out = pk.ensemble_scores(q, k, lengths)
        # Rows at non-negative positions each contribute total mass 1 per query head.
        rows = (lengths[:, None] - W + torch.arange(W, device=device) >= 0).sum(1)
        torch.testing.assert_close(out.sum((1, 2)), (rows * 8).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    """[B, N, H, D] storage passed as transposed views; expanded row weights (stride 0)."""
    g = generator(3)
    B, Hq, Hkv, W, N, D = 2, 8, 2, 6, 40, 64
    q = torch.randn(B, W, Hq, D, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, N, Hkv, D, generator=g).to(device).transpose(1, 2)
    lengths = torch.tensor([40, 17], device=device)
    rw = torch.linspace(1.0, 1.2, W, device=device).expand(B, W)
    out = pk.ensemble_scores(q, k, lengths, row_weights=rw)
    expect = ref.ensemble_scores(q.double(), k.double(), lengths, rw)
    assert rel_err(out, expect) <= 1e-5


@pytest.mark.cuda
def test_cuda_matches_cpu_large():
    g = generator(11)
    B, Hq, Hkv, W, N, D = 2, 32, 8, 300, 1500, 128
    q = torch.randn(B, Hq, W, D, generator=g).bfloat16()
    k = torch.randn(B, Hkv, N, D, generator=g).bfloat16()
    lengths = torch.tensor([1500, 977])
    expect = ref.ensemble_scores(q.double(), k.double(), lengths)
    out = pk.ensemble_scores(q.cuda(), k.cuda(), lengths.cuda()).cpu()
    assert rel_err(out, expect) <= 2e-3


# ---- CUDA tensor-core path (bf16/fp16, D in {64, 128, 256}) and its fallbacks --------------

def reference_lse(q, k, lengths, scale):
    """Float64 natural log-sum-exp of every recent row ([B, Hq, W]; -inf at negative positions)."""
    B, Hq, W, D = q.shape
    N, G = k.shape[2], Hq // k.shape[1]
    s = torch.einsum("bhwd,bhnd->bhwn", q.double(), k.double().repeat_interleave(G, 1)) * scale
    pos = lengths.long()[:, None].to(q.device) - W + torch.arange(W, device=q.device)
    vis = torch.arange(N, device=q.device) <= pos[:, :, None]
    return s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1)


# (B, Hkv, W, N, lengths): N = 1 and W = 1; W = 1 over several key tiles; W = N with an empty
# sequence; W > N (rows at negative positions); ragged, N not a multiple of any tile, several
# key tiles and (for G > 1) several row tiles of the normaliser pass; N >= 2048 with few CTAs,
# where the normaliser pass splits its key range in 4 (a length-5 sequence leaves 3 empty).
TC_SHAPES = [
    (1, 1, 1, 1, [1]),
    (2, 2, 1, 300, [300, 17]),
    (2, 1, 70, 70, [70, 0]),
    (3, 1, 150, 40, [40, 1, 23]),
    (2, 1, 200, 555, [555, 301]),
    (2, 1, 40, 2100, [2100, 5]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("given_lse", [False, True])
def test_cuda_tensor_core_path(dtype, D, G, given_lse):
    g = generator(1000 * D + 10 * G + given_lse)
    for n, (B, Hkv, W, N, lens) in enumerate(TC_SHAPES):
        q = (2 * torch.randn(B, Hkv * G, W, D, generator=g)).to(dtype)  # peakier than unit scale
        k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
        lengths = torch.tensor(lens, dtype=torch.int32 if n % 2 else torch.int64)
        rw = torch.rand(B, W, generator=g) + 0.25 if n % 2 == 0 else None
        scale = D ** -0.5
        lse = reference_lse(q, k, lengths, scale).float() if given_lse else None
        if lse is not None:  # the op must ignore rows at negative positions whatever they hold
            lse = torch.where(torch.isfinite(lse), lse, float("nan"))
        expect = ref.ensemble_scores(q.double(), k.double(), lengths, rw, lse, scale)
        poison_allocator("cuda")
        to = lambda t: None if t is None else t.cuda()  # noqa: E731
        out = pk.ensemble_scores(q.cuda(), k.cuda(), lengths.cuda(), row_weights=to(rw),
                                 lse=to(lse), scale=scale).cpu()
        assert torch.isfinite(out).all(), (n, B, W, N)
        # The issue asks for <= 2e-3; bf16 inputs are exact in the float64 reference, so fp32
        # accumulation lands near 1e-6 and a tighter bound catches off-by-one masks.
        assert rel_err(out, expect) <= 1e-4, (n, B, W, N, rel_err(out, expect))
        pad = torch.arange(N) >= lengths[:, None]
        assert (out.masked_select(pad[:, None, :].expand_as(out)) == 0).all()


@pytest.mark.cuda
def test_cuda_tensor_core_strided_and_deterministic():
    """[B, N, H, D] caches as transposed views, lse as a strided view, expanded weights; two
    calls agree bitwise (no atomics)."""
    g = generator(21)
    B, Hq, Hkv, W, N, D = 2, 16, 4, 97, 700, 128
    q = torch.randn(B, W, Hq, D, generator=g).bfloat16().cuda().transpose(1, 2)
    k = torch.randn(B, N, Hkv, D, generator=g).bfloat16().cuda().transpose(1, 2)
    lengths = torch.tensor([700, 433], device="cuda")
    rw = torch.linspace(0.5, 1.5, W, device="cuda").expand(B, W)
    lse = reference_lse(q, k, lengths, D ** -0.5).float().transpose(1, 2).contiguous().transpose(1, 2)
    expect = ref.ensemble_scores(q.double(), k.double(), lengths, rw, None)
    for l in (None, lse):
        out = pk.ensemble_scores(q, k, lengths, row_weights=rw, lse=l)
        assert rel_err(out, expect) <= 1e-4
        assert torch.equal(out, pk.ensemble_scores(q, k, lengths, row_weights=rw, lse=l))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["fp32", "head_dim_96", "misaligned_rows"])
def test_cuda_generic_fallback(case):
    """Inputs the tensor-core path does not take run the generic kernel and still match."""
    g = generator(5)
    B, Hq, Hkv, W, N, D = 2, 8, 2, 33, 150, 64
    dtype = torch.float32 if case == "fp32" else torch.float16
    if case == "head_dim_96":
        D = 96
    q = torch.randn(B, Hq, W, D, generator=g).to(dtype).cuda()
    k = torch.randn(B, Hkv, N, D + 1, generator=g).to(dtype).cuda()
    # Row stride D + 1 is not a multiple of 16 bytes: the cp.async path must not take it.
    k = k[..., 1:] if case == "misaligned_rows" else k[..., :D]
    lengths = torch.tensor([150, 77], device="cuda")
    out = pk.ensemble_scores(q, k, lengths)
    expect = ref.ensemble_scores(q.double(), k.double(), lengths)
    assert rel_err(out, expect) <= 1e-4

"""slerp_merge / slerp_restore: MiniCache merge of two layers against the float64 reference."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyramid_kv import ops
from pyramid_kv import reference as ref
from helpers import DTYPES, devices, generator, poison_allocator

# Direction components are <= 1: one rounding of the output dtype, plus float32 noise.
DIR_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Relative L2 error of a restored vector: the direction's rounding and the output's.
REL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Head dims of every CUDA path: 16-byte groups of 4/8/16/32 lanes, 2 chunks per lane (fp32
# D=256, 16-bit D=512), generic (D % 8 != 0, D * size > 1 KB).
HEAD_DIMS = [1, 3, 8, 16, 24, 64, 100, 128, 200, 256, 512, 520]


def make_pair(g, shape, dtype, layout, pad):
    """a, b [B, X, Y, D] as views of larger token-major buffers (strided, maybe unaligned)."""
    B, X, Y, D = shape
    if layout == "BNHD":
        base = torch.randn(2, B, X + 2, Y, D + pad, generator=g)
        a, b = base[0, :, 1:X + 1, :, :D], base[1, :, :X, :, pad:pad + D]
    else:  # [B, N, H, D] storage seen as [B, H, N, D]
        base = torch.randn(2, B, Y + 1, X, D + pad, generator=g).transpose(2, 3)
        a, b = base[0, :, :, :Y, :D], base[1, :, :, 1:, pad:]
    return a.to(dtype), b.to(dtype)


def well_conditioned(a, b, t, eps):
    """Vectors whose merged direction is a stable function of the inputs: not the normalised lerp
    of (nearly) opposite directions at t ~ 1/2, where rounding decides between 0 and a unit vector."""
    x, y = a.double(), b.double()
    ah = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    bh = y / y.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    omega = (ah * bh).sum(-1).clamp(-1, 1).acos()
    lerp = ((1 - t) * ah + t * bh).norm(dim=-1)
    return ~((omega.sin() < max(eps, 1e-3)) & (lerp < 1e-2))


def check_merge(got, a, b, t, eps, dtype):
    direction, na, nb, dist = [x.cpu() for x in got]
    e_dir, e_na, e_nb, e_dist = ref.slerp_merge(a.cpu(), b.cpu(), t, eps)
    B, X, Y, D = a.shape
    assert direction.shape == (B, X, Y, D) and direction.dtype == dtype and direction.is_contiguous()
    for x in (na, nb, dist):
        assert x.shape == (B, X, Y) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(na, e_na, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nb, e_nb, rtol=1e-5, atol=1e-6)
    ok = well_conditioned(a.cpu(), b.cpu(), t, eps)
    assert ((dist >= 0) & (dist <= 1)).all()
    torch.testing.assert_close(dist[ok], e_dist[ok], rtol=0, atol=2e-5)
    torch.testing.assert_close(direction.float()[ok], e_dir.float()[ok], rtol=0, atol=DIR_ATOL[dtype])


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), X=st.sampled_from([0, 1, 2, 5, 33]),
       Y=st.sampled_from([1, 2, 8]), D=st.sampled_from(HEAD_DIMS), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["BNHD", "BHND"]), pad=st.sampled_from([0, 1, 8]),
       t=st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0]))
def test_merge_matches_reference(device, seed, B, X, Y, D, dtype, layout, pad, t):
    g = generator(seed)
    a, b = make_pair(g, (B, X, Y, D), dtype, layout, pad)
    if X > 1:  # some near-duplicate and opposite rows among the random ones
        b[:, 0] = a[:, 0] * 0.5
        b[:, 1] = -a[:, 1]
    poison_allocator(device)
    got = ops.slerp_merge(a.to(device), b.to(device), t)
    check_merge(got, a, b, t, 1e-6, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 64, 128, 256, 100, 3])
def test_endpoints_and_restore(device, dtype, D):
    """t = 0 gives a-hat, t = 1 gives b-hat, and restoring them with the norms gives back a and b."""
    g = generator(D)
    a, b = make_pair(g, (2, 37, 4, D), dtype, "BNHD", 0)
    a, b = a.to(device), b.to(device)
    for t, x in [(0.0, a), (1.0, b)]:
        m = ops.slerp_merge(a, b, t)
        xf = x.float()
        unit = xf / xf.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(m.direction.float(), unit, rtol=0, atol=DIR_ATOL[dtype])
        norm = m.norm_a if t == 0 else m.norm_b
        back = ops.slerp_restore(m.direction, norm).float()
        err = (back - xf).norm(dim=-1) / xf.norm(dim=-1)
        assert err.max() <= REL[dtype], float(err.max())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_midpoint_is_unit_and_symmetric(device, dtype):
    g = generator(3)
    a, b = make_pair(g, (3, 20, 2, 128), dtype, "BHND", 0)
    a, b = a.to(device), b.to(device)
    m = ops.slerp_merge(a, b)
    n = m.direction.float().norm(dim=-1)
    torch.testing.assert_close(n, torch.ones_like(n), rtol=0, atol=30 * DIR_ATOL[dtype] / 8)
    m2 = ops.slerp_merge(b, a)
    torch.testing.assert_close(m.distance, m2.distance, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.direction.float(), m2.direction.float(), rtol=0, atol=DIR_ATOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 128, 256, 3])
def test_zero_parallel_antiparallel(device, dtype, D):
    g = generator(11)
    a = torch.randn(1, 6, 1, D, generator=g).to(dtype)
    b = torch.randn(1, 6, 1, D, generator=g).to(dtype)
    a[0, 0] = 0            # a zero: direction b-hat, distance 0
    b[0, 1] = 0            # b zero: direction a-hat
    a[0, 2] = 0
    b[0, 2] = 0            # both zero: direction 0, distance 0
    b[0, 3] = 2 * a[0, 3]  # parallel: a-hat, distance 0
    b[0, 4] = -2 * a[0, 4]  # antiparallel: lerp; 0 at t = 1/2, distance 1
    b[0, 5] = a[0, 5]      # identical
    ah = a.float() / a.float().norm(dim=-1, keepdim=True)
    bh = b.float() / b.float().norm(dim=-1, keepdim=True)
    tol = DIR_ATOL[dtype]
    for t in (0.5, 0.3):
        m = ops.slerp_merge(a.to(device), b.to(device), t)
        d, dist = m.direction.float().cpu(), m.distance.cpu()
        torch.testing.assert_close(d[0, 0], bh[0, 0], rtol=0, atol=tol)
        torch.testing.assert_close(d[0, 1], ah[0, 1], rtol=0, atol=tol)
        assert torch.equal(d[0, 2], torch.zeros_like(d[0, 2])) and dist[0, 2] == 0
        torch.testing.assert_close(d[0, 3], ah[0, 3], rtol=0, atol=tol)
        if t == 0.5:
            assert torch.equal(d[0, 4], torch.zeros_like(d[0, 4]))
        else:  # 0.7 a-hat + 0.3 (-a-hat), normalised
            torch.testing.assert_close(d[0, 4], ah[0, 4], rtol=0, atol=tol)
        torch.testing.assert_close(d[0, 5], ah[0, 5], rtol=0, atol=tol)
        torch.testing.assert_close(dist[0, [0, 1, 2, 3, 5], 0], torch.zeros(5), rtol=0, atol=1e-6)
        torch.testing.assert_close(dist[0, 4, 0], torch.tensor(1.0), rtol=0, atol=1e-6)
        assert m.norm_a[0, 0] == 0 and m.norm_b[0, 1] == 0
        check_merge(m, a, b, t, 1e-6, dtype)


@pytest.mark.parametrize("device", devices())
def test_distance_of_known_angles(device):
    """Unit vectors at known angles: distance = angle / pi; the midpoint bisects the angle."""
    angles = torch.tensor([0.1, 0.5, 1.0, math.pi / 2, 2.5, 3.0], dtype=torch.float64)
    D = 16
    a = torch.zeros(1, 1, len(angles), D, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[..., 0] = 3.0
    b[..., 0], b[..., 1] = 0.5 * angles.cos(), 0.5 * angles.sin()
    m = ops.slerp_merge(a.float().to(device), b.float().to(device), 0.5)
    torch.testing.assert_close(m.distance.cpu()[0, 0].double(), angles / math.pi, rtol=0, atol=1e-6)
    half = angles / 2
    torch.testing.assert_close(m.direction.cpu()[0, 0, :, :2].double(), torch.stack([half.cos(), half.sin()], -1),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), X=st.sampled_from([0, 1, 7, 40]),
       Y=st.sampled_from([1, 4]), D=st.sampled_from(HEAD_DIMS), dtype=st.sampled_from(DTYPES),
       pad=st.sampled_from([0, 3, 8]), use_out=st.booleans())
def test_restore_matches_reference(device, seed, B, X, Y, D, dtype, pad, use_out):
    g = generator(seed)
    direction = torch.randn(B, X + 1, Y, D + pad, generator=g).to(dtype)[:, 1:, :, pad:]
    norm = (torch.rand(B, Y, X, generator=g) * 10).transpose(1, 2)  # strided norms
    expect = ref.slerp_restore(direction, norm)
    direction, norm = direction.to(device), norm.to(device)
    poison_allocator(device)
    if use_out:  # a view of a cache workspace: [B, N, H, D + 2] with room around it
        ws = torch.full((B, X + 3, Y, D + 2), 7.0, dtype=dtype, device=device)
        out = ws[:, 2:X + 2, :, 1:D + 1]
        res = ops.slerp_restore(direction, norm, out=out)
        assert res is out
        outside = torch.ones(ws.shape, dtype=torch.bool)
        outside[:, 2:X + 2, :, 1:D + 1] = False
        assert (ws.cpu()[outside] == 7.0).all(), "restore wrote outside out"
    else:
        res = ops.slerp_restore(direction, norm)
        assert res.is_contiguous()
    assert res.shape == expect.shape and res.dtype == dtype
    torch.testing.assert_close(res.cpu().float(), expect.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("device", devices())
def test_restore_in_place(device):
    """out may be direction itself (each element is read before it is written, by one thread)."""
    g = generator(4)
    d = torch.randn(2, 9, 3, 128, generator=g).bfloat16().to(device)
    n = torch.rand(2, 9, 3, generator=g).to(device)
    expect = ref.slerp_restore(d.cpu(), n.cpu())
    ops.slerp_restore(d, n, out=d)
    torch.testing.assert_close(d.cpu().float(), expect.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0)


@pytest.mark.parametrize("device", devices())
def test_merge_then_keep_divergent_tokens(device):
    """The MiniCache flow: merge, pick the most divergent tokens with select_top_k, restore."""
    g = generator(8)
    B, N, H, D = 2, 50, 4, 64
    a = torch.randn(B, N, H, D, generator=g).to(device)
    b = (a + 0.3 * torch.randn(B, N, H, D, generator=g).to(device))
    b[:, 7] = torch.randn(B, H, D, generator=g).to(device)  # one very different token
    m = ops.slerp_merge(a, b)
    score = m.distance.mean(-1)  # per token
    lengths = torch.full((B,), N, device=device)
    sel = ops.select_top_k(score, lengths, 3, capacity=3)
    assert (sel.indices == 7).any(dim=1).all()
    ra = ops.slerp_restore(m.direction, m.norm_a)
    cos = torch.nn.functional.cosine_similarity(ra, a, dim=-1)
    assert cos[:, [i for i in range(N) if i != 7]].min() > 0.9

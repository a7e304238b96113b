"""compact / compact_out: bit-exact gathers for every dtype, layout and index mode."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyramid_kv as pk
from pyramid_kv import reference as ref
from helpers import devices, generator, poison_allocator

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]


def random_indices(g, rows, N, C, ascending):
    counts = torch.randint(0, min(N, C) + 1, (rows,), generator=g) if N else torch.zeros(rows, dtype=torch.long)
    idx = torch.full((rows, C), -1, dtype=torch.long)
    for r in range(rows):
        c = int(counts[r])
        if c == 0:
            continue
        pick = torch.randperm(N, generator=g)[:c] if ascending else torch.randint(0, N, (c,), generator=g)
        idx[r, :c] = pick.sort().values if ascending else pick
    return idx, counts


def random_tensor(g, shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.sampled_from([1, 2, 8]),
       N=st.integers(0, 90), C=st.integers(0, 100), D=st.sampled_from([1, 3, 8, 64, 128, 256]),
       dtype=st.sampled_from(ALL_DTYPES), per_head=st.booleans(), layout=st.sampled_from(["BHND", "BNHD"]),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]), ascending=st.booleans())
def test_matches_reference(device, seed, B, H, N, C, D, dtype, per_head, layout, idx_dtype, ascending):
    g = generator(seed)
    k = random_tensor(g, (B, H, N, D), dtype)
    v = random_tensor(g, (B, H, N, D), dtype)
    if layout == "BNHD":  # storage [B, N, H, D], viewed as [B, H, N, D]
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    idx, counts = random_indices(g, B * H if per_head else B, N, C, ascending)
    if per_head:
        idx, counts = idx.view(B, H, C), counts.view(B, H)
    idx, counts = idx.to(idx_dtype), counts.to(idx_dtype)
    srcs = [k.to(device), v.to(device)]
    poison_allocator(device)
    out = pk.compact(srcs, idx.to(device), counts.to(device))
    expect = ref.compact([k, v], idx, counts)
    for o, e in zip(out, expect):
        assert o.shape == (B, H, C, D) and o.dtype == dtype
        assert torch.equal(o.cpu(), e)  # a copy: bit-exact; rows past the count are zero


@pytest.mark.parametrize("device", devices())
def test_hidden_states_and_positions_in_one_call(device):
    """Prefill token dropping: K, V, hidden states [B, N, C] and position ids [B, N] together."""
    g = generator(5)
    B, H, N, D, Cm = 3, 4, 50, 64, 96
    k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    hidden = torch.randn(B, N, Cm, generator=g).bfloat16()
    pos = torch.arange(N).expand(B, N).contiguous()
    idx, counts = random_indices(g, B, N, 30, True)
    srcs = [k, v, hidden.unsqueeze(1), pos[:, None, :, None]]
    out = pk.compact([s.to(device) for s in srcs], idx.to(device), counts.to(device))
    expect = ref.compact(srcs, idx, counts)
    for o, e in zip(out, expect):
        assert torch.equal(o.cpu(), e)
    assert torch.equal(out[3][:, 0, :, 0].cpu(), torch.where(torch.arange(30) < counts[:, None], idx, 0))


@pytest.mark.parametrize("device", devices())
def test_out_buffers_keep_rows_past_count(device):
    g = generator(9)
    B, H, N, D, C = 2, 2, 40, 16, 20
    k = torch.randn(B, H, N, D, generator=g).to(device)
    idx, counts = random_indices(g, B * H, N, C, True)
    idx, counts = idx.view(B, H, C).to(device), counts.view(B, H).to(device)
    out = torch.full((B, H, C + 7, D), 12345.0, device=device)
    res = pk.compact([k], idx, counts, out=[out])
    assert res[0] is out
    expect = ref.compact([k.cpu()], idx.cpu(), counts.cpu())[0]
    live = (torch.arange(C + 7) < counts.cpu()[..., None])[..., None].expand(B, H, C + 7, D)
    got = out.cpu()
    assert torch.equal(got[:, :, :C][live[:, :, :C]], expect[live[:, :, :C]])
    assert (got[~live] == 12345.0).all(), "rows past the count must stay untouched"


@pytest.mark.parametrize("device", devices())
def test_unaligned_rows(device):
    """Row sizes and offsets that rule out 16-byte vectors still copy exactly."""
    g = generator(2)
    base = torch.randn(2, 3, 41, 7, generator=g).half()
    src = base[..., 1:6]  # 10-byte rows at 2-byte offsets
    idx = torch.tensor([[0, 5, 40, 3], [1, 1, 2, -1]])
    counts = torch.tensor([4, 3])
    out = pk.compact([src.to(device)], idx.to(device), counts.to(device))[0]
    assert torch.equal(out.cpu(), ref.compact([src], idx, counts)[0])

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
    moved = pk.compact_([s.to(device, copy=True) for s in srcs], idx.to(device), counts.to(device))
    check_inplace(moved, idx, counts, expect)


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


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,D", [(torch.float32, 8192), (torch.bfloat16, 12000), (torch.float16, 96),
                                     (torch.float32, 2), (torch.int64, 1), (torch.uint8, 5)])
def test_row_sizes(device, dtype, D):
    """Rows wider than one tile (split into column stripes), rows of a few bytes, 8/4/1-byte accesses."""
    g = generator(D)
    B, H, N, C = 2, 2, 37, 29
    src = random_tensor(g, (B, H, N, D), dtype)
    idx, counts = random_indices(g, B * H, N, C, False)
    idx, counts = idx.view(B, H, C), counts.view(B, H)
    out = pk.compact([src.to(device)], idx.to(device), counts.to(device))[0]
    assert torch.equal(out.cpu(), ref.compact([src], idx, counts)[0])
    idx, counts = ascending_selection(g, B * H, N, C, 0.6)
    idx, counts = idx.view(B, H, C), counts.view(B, H)
    expect = ref.compact([src], idx, counts)
    moved = pk.compact_([src.to(device, copy=True)], idx.to(device), counts.to(device))
    check_inplace(moved, idx, counts, expect)


def test_tile_row_multiply_is_exact():
    """compact.cuh finds a chunk's tile row as (l * ceil(2^22 / width)) >> 22 instead of
    l / width: exact for every chunk index l < 2048 and width <= 2048 (its tile limits)."""
    l = torch.arange(2048, dtype=torch.int64)
    for width in range(1, 2049):
        magic = ((1 << 22) + width - 1) // width
        assert torch.equal((l * magic) >> 22, l // width), width


# ---- in place ---------------------------------------------------------------------------------

def ascending_selection(g, rows, N, C, keep, prefix=0):
    """Random strictly ascending kept positions (each kept with probability `keep`, the first
    `prefix` always), C >= the counts; -1 past each count."""
    mask = torch.rand(rows, N, generator=g) < keep
    mask[:, :prefix] = True
    counts = mask.sum(1).clamp(max=C)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # kept positions first
    idx = torch.full((rows, C), -1, dtype=torch.long)
    w = min(N, C)
    idx[:, :w] = torch.where(torch.arange(w) < counts[:, None], order[:, :w], -1)
    return idx, counts


def check_inplace(tensors, idx, counts, expect):
    """Rows below the count equal the reference; the rest are unspecified."""
    C = idx.shape[-1]
    for t, e in zip(tensors, expect):
        B, H, N, D = t.shape
        cnt = counts.long().cpu()
        if idx.dim() == 2:
            cnt = cnt[:, None].expand(B, H)
        w = min(C, N)
        live = (torch.arange(w) < cnt[..., None])[..., None].expand(B, H, w, D)
        got = t[:, :, :w].cpu()
        assert torch.equal(got[live], e[:, :, :w][live])


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.sampled_from([1, 2, 8]),
       N=st.integers(0, 300), C=st.integers(0, 320), D=st.sampled_from([1, 3, 8, 64, 128, 256]),
       dtype=st.sampled_from(ALL_DTYPES), per_head=st.booleans(), layout=st.sampled_from(["BHND", "BNHD"]),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]), keep=st.floats(0.0, 1.0),
       prefix=st.integers(0, 300))
def test_inplace_matches_reference(device, seed, B, H, N, C, D, dtype, per_head, layout, idx_dtype, keep,
                                   prefix):
    g = generator(seed)
    k = random_tensor(g, (B, H, N, D), dtype)
    v = random_tensor(g, (B, H, N, D), dtype)
    if layout == "BNHD":
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    idx, counts = ascending_selection(g, B * H if per_head else B, N, C, keep, prefix)
    if per_head:
        idx, counts = idx.view(B, H, C), counts.view(B, H)
    idx, counts = idx.to(idx_dtype), counts.to(idx_dtype)
    expect = ref.compact([k, v], idx, counts)
    tensors = [k.to(device), v.to(device)]
    res = pk.compact_(tensors, idx.to(device), counts.to(device))
    assert res[0] is tensors[0] and res[1] is tensors[1]
    check_inplace(tensors, idx, counts, expect)


@pytest.mark.parametrize("device", devices())
def test_inplace_reference_and_untouched_rows(device):
    """The reference agrees with the op; identity rows and rows of other heads stay as they were."""
    g = generator(11)
    B, H, N, D, C = 2, 3, 64, 16, 40
    k = torch.randn(B, H, N, D, generator=g)
    idx, counts = ascending_selection(g, B, N, C, 0.5, prefix=10)
    expect = ref.compact_([k.clone()], idx, counts)[0]
    got = pk.compact_([k.to(device, copy=True)], idx.to(device), counts.to(device))[0].cpu()
    check_inplace([got], idx, counts, [expect])
    assert torch.equal(got[:, :, :10], k[:, :, :10])  # the identity prefix never moved


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (256, torch.float32)])
def test_inplace_identity_prefix_edges(device, D, dtype):
    """Identity prefixes at the pre-pass's branch points: under and over the 32 rows its first
    round tests, under and over one tile (C = 720 rows make 9 in-place tiles of 80 rows for
    bf16 D=128 and 36 of 20 for f32 D=256: the tiles then start at the prefix instead of row 0),
    the whole count, and counts under 32."""
    g = generator(31)
    N, C = 1000, 720
    prefixes = [0, 1, 19, 20, 21, 31, 32, 33, 79, 80, 81, 500, 720]
    rows = len(prefixes) + 2
    idx = torch.full((rows, C), -1, dtype=torch.long)
    counts = torch.zeros(rows, dtype=torch.long)
    for r, prefix in enumerate(prefixes):
        sel, cnt = ascending_selection(g, 1, N - prefix, C - prefix, 0.3)
        c = prefix + int(cnt[0])
        idx[r, :prefix] = torch.arange(prefix)
        idx[r, prefix:c] = sel[0, :int(cnt[0])] + prefix
        counts[r] = c
    idx[-2, :20] = torch.arange(20)  # a count under 32, all identity
    counts[-2] = 20
    idx[-1, :5] = torch.tensor([0, 1, 7, 8, 900])  # a count under 32, some rows moving
    counts[-1] = 5
    k = random_tensor(g, (rows, 2, N, D), dtype)
    v = random_tensor(g, (rows, 2, N, D), dtype)
    expect = ref.compact([k, v], idx, counts)
    tensors = [k.to(device), v.to(device)]
    pk.compact_(tensors, idx.to(device), counts.to(device))
    check_inplace(tensors, idx, counts, expect)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("per_head", [False, True])
def test_inplace_decode_splice(device, per_head):
    """The runner's decode eviction (selection.splice_chunk): identity up to a start offset, a
    chunk's kept rows, a shifted tail; ragged starts and lengths, so segments move different
    numbers of rows (tiles past a segment's move and rounds past the longest move)."""
    from pyramid_kv.selection import splice_chunk

    g = generator(21 + per_head)
    B, H, N, D, chunk, kept = 3, 4, 300, 64, 16, 4
    S = B * H if per_head else B
    lengths = torch.randint(chunk, N + 1, (S,), generator=g)
    lengths[0] = N
    start = (torch.rand(S, generator=g) * (lengths - chunk + 1)).long()
    start[-1] = 0  # a segment whose whole cache moves
    offs = torch.rand(S, chunk, generator=g).argsort(1)[:, :kept].sort(1).values
    idx, counts = splice_chunk(lengths, start, chunk, offs, kept, N)
    if per_head:
        idx, counts = idx.view(B, H, N), counts.view(B, H)
    k = torch.randn(B, H, N, D, generator=g).bfloat16()
    v = torch.randn(B, H, N, D, generator=g).bfloat16()
    pos = torch.arange(N).expand(B, H if per_head else 1, N)[..., None].contiguous()
    expect = ref.compact([k, v, pos], idx, counts)
    moved = pk.compact_([t.to(device, copy=True) for t in (k, v, pos)], idx.to(device), counts.to(device))
    check_inplace(moved, idx, counts, expect)
    # Every row kept: nothing moves (no tile is handed out).
    same = pk.compact_([t.to(device, copy=True) for t in (k, v)], torch.arange(N).expand(B, N).to(device),
                       torch.full((B,), N).to(device))
    assert torch.equal(same[0].cpu(), k) and torch.equal(same[1].cpu(), v)


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,N,D,dtype,per_head,layout", [
    (2, 8, 8192, 128, torch.bfloat16, False, "BHND"),
    (1, 2, 65536, 128, torch.float16, True, "BHND"),  # many tiles per segment: long wait chains
    (4, 8, 4096, 64, torch.bfloat16, True, "BNHD"),
    (2, 4, 6000, 256, torch.float32, False, "BHND"),  # 1 KB rows: 16 rows per tile
    (1, 1, 20000, 8200, torch.float32, False, "BHND"),  # 32.8 KB rows: three column stripes
])
def test_inplace_large_stress(B, H, N, D, dtype, per_head, layout):
    """Many repetitions on large caches with fresh index sets (keep 5%..100%, identity prefixes,
    all rows kept): a tile that overwrote rows before an earlier tile read them would show."""
    g = generator(N + D)
    torch.manual_seed(N)
    rows = B * H if per_head else B
    shape = (B, N, H, D) if layout == "BNHD" else (B, H, N, D)
    k = torch.randn(shape, device="cuda").to(dtype)
    v = torch.randn(shape, device="cuda").to(dtype)
    if layout == "BNHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    reps = 24 if k.numel() < (1 << 28) else 6
    for rep in range(reps):
        # High keep ratios shift rows by a few positions: the awaited tile is the one just
        # before, running at the same time (the hardest case for the protocol).
        keep = [0.05, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0][rep % 7]
        prefix = [0, 0, 17, N // 3, N][rep % 5]
        idx, counts = ascending_selection(g, rows, N, N, keep, prefix)
        if per_head:
            idx, counts = idx.view(B, H, N), counts.view(B, H)
        idx, counts = idx.cuda(), counts.cuda()
        expect = ref.compact([k, v], idx, counts)  # on the GPU: torch.gather
        pk.compact_([k, v], idx, counts, validate=rep == 0)
        cnt = counts if per_head else counts[:, None].expand(B, H)
        live = (torch.arange(N, device="cuda") < cnt[..., None])[..., None]
        for t, e in zip((k, v), expect):
            bad = (live & (t != e)).sum().item()
            assert bad == 0, f"rep {rep} keep {keep} prefix {prefix}: {bad} wrong elements"
        # Refill so that every repetition moves fresh data.
        k.copy_(torch.randn(k.shape, device="cuda").to(dtype))
        v.copy_(torch.randn(v.shape, device="cuda").to(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("per_head", [False, True])
def test_inplace_many_tiles(per_head):
    """Long segments (many tiles awaiting each other), small enough for compute-sanitizer."""
    g = generator(7)
    B, H, N, D = 1, 2, 4096, 128
    rows = B * H if per_head else B
    for keep, prefix in [(0.05, 0), (0.5, 100), (0.97, 0), (1.0, 0)]:
        k = torch.randn(B, H, N, D, generator=g).bfloat16()
        idx, counts = ascending_selection(g, rows, N, N, keep, prefix)
        if per_head:
            idx, counts = idx.view(B, H, N), counts.view(B, H)
        expect = ref.compact([k], idx, counts)
        got = pk.compact_([k.cuda()], idx.cuda(), counts.cuda())
        check_inplace(got, idx, counts, expect)


@pytest.mark.cuda
def test_inplace_bad_indices_stay_in_bounds():
    """Without validation, non-ascending, out-of-range indices and counts above C or N must not
    fault or hang (the rows are then unspecified). Run under compute-sanitizer memcheck."""
    g = generator(3)
    B, H, N, D, C = 2, 2, 300, 64, 400
    guard = torch.zeros(B, H, N + 64, D, device="cuda")
    k = guard[:, :, 32:32 + N]  # neighbours on both sides must stay zero
    k.copy_(torch.randn(B, H, N, D, generator=g))
    idx = torch.randint(-1000, 1000, (B, H, C), generator=g).cuda()
    for counts in (torch.full((B, H), C), torch.tensor([[-5, 3], [10**6, N + 1]])):
        pk.compact_([k], idx, counts.cuda(), validate=False)
        idx = idx.sort(-1, descending=True).values
    pk.compact_([k], idx.sort(-1).values, torch.full((B, H), N, device="cuda"), validate=False)
    torch.cuda.synchronize()
    assert (guard[:, :, :32] == 0).all() and (guard[:, :, 32 + N:] == 0).all()


@pytest.mark.cuda
def test_large_over_2g_elements():
    """Byte offsets are 64-bit: gathers and moves of rows past 2^31 elements."""
    N, D = (1 << 21) + 1000, 1024  # uint8 [1, 1, N, D]: 2^31 + ~1M elements
    try:
        x = torch.randint(0, 256, (1, 1, N, D), dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    lo = (1 << 21) - 3  # rows straddling element 2^31
    picks = torch.tensor(sorted({0, 5, lo, lo + 1, lo + 2, lo + 3, lo + 4, N - 2, N - 1}), device="cuda")
    C = picks.numel() + 3
    idx = torch.full((1, C), -1, device="cuda", dtype=torch.long)
    idx[0, :picks.numel()] = picks
    counts = torch.tensor([picks.numel()], device="cuda")
    expect = x[0, 0, picks].clone()
    (out,) = pk.compact([x], idx, counts)
    assert torch.equal(out[0, 0, :picks.numel()], expect) and (out[0, 0, picks.numel():] == 0).all()
    pk.compact_([x], idx, counts)
    assert torch.equal(x[0, 0, :picks.numel()], expect)
    # A full-length identity-plus-tail move: most rows skip, the tail crosses 2^31 elements.
    keep = torch.cat([torch.arange(lo, device="cuda"), torch.arange(lo + 7, N, device="cuda")])
    tail = x[0, 0, lo + 7:].clone()
    pk.compact_([x], keep[None], torch.tensor([keep.numel()], device="cuda"))
    assert torch.equal(x[0, 0, lo:lo + tail.shape[0]], tail)

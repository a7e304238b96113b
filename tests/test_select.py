"""select_top_p / select_top_k against the sort-based reference and the float64 definition."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyramid_kv as pk
from pyramid_kv import reference as ref
from helpers import DTYPES, devices, generator, poison_allocator, rand_lengths


def random_scores(g, S, N, dtype, ties, kind="skewed"):
    x = torch.rand(S, N, generator=g) ** 3  # skewed like attention mass
    if kind == "softmax":  # attention-like: a few heavy tokens, a long light tail
        x = torch.softmax(torch.randn(S, N, generator=g) * 2.5, -1) if N else x
    elif kind == "equal":  # one key: no radix pass at all
        x = torch.full((S, N), 0.375)
    elif kind == "narrow":  # distinct keys sharing their top bits: every pass of the search runs
        x = 1.0 + torch.rand(S, N, generator=g) * 2.0**-12
    elif kind == "tiny":  # every score below 2^-97, many denormal: the small-exponent mass paths
        x = x * 2.0**-110
    elif kind == "special":  # NaN, -inf, negatives, signed zeros, denormals, large values
        pool = torch.tensor([float("nan"), float("-inf"), -1.0, -0.0, 0.0, 6e-8, 1e-40, 6e4, 0.25, 2.0])
        pick = pool[torch.randint(0, len(pool), (S, N), generator=g)]
        x = torch.where(torch.rand(S, N, generator=g) < 0.3, pick, x)
    if ties:  # few distinct values: many exact ties
        x = torch.floor(x * 4) / 4
    return x.to(dtype)


def check_definition(scores, lengths, budget, by_mass, sink, recent, min_keep, capacity, sel):
    """The top-p / top-k definition of docs/ops.md, evaluated in float64 per segment."""
    S, N = scores.shape
    forced, cand = ref.segment_masks(lengths, N, sink, recent)
    key = ref.order_keys(scores)
    mass = ref.masses(scores)
    idx, counts = sel.indices.cpu().long(), sel.counts.cpu().long()
    for s in range(S):
        c = int(counts[s])
        kept = idx[s, :c]
        assert (idx[s, c:] == -1).all(), "padding past the count must be -1"
        assert (kept[1:] > kept[:-1]).all(), "kept positions must be strictly ascending"
        assert c == 0 or (0 <= int(kept[0]) and int(kept[-1]) < int(lengths[s]))
        keep = torch.zeros(N, dtype=torch.bool)
        keep[kept] = True
        assert (keep | ~forced[s]).all(), "forced positions must be kept"
        ck, cd = keep & cand[s], ~keep & cand[s]
        r, n_forced, n_cand = int(ck.sum()), int(forced[s].sum()), int(cand[s].sum())
        # Every kept candidate precedes every dropped one in (score desc, position asc) order:
        # one int64 rank key < 2^63 (order keys < 2^32, positions < 2^31).
        if ck.any() and cd.any():
            rank_key = key[s] * 2**31 + (2**31 - 1 - torch.arange(N))
            assert int(rank_key[ck].min()) > int(rank_key[cd].max())
        hi = min(n_cand, capacity - n_forced)
        lo = min(max(min_keep - n_forced, 0), hi)
        b = budget[s].item() if isinstance(budget, torch.Tensor) else budget
        if not by_mass:
            assert r == min(max(min(b, n_cand), lo), hi)
            continue
        total = float(mass[s][cand[s]].sum())
        target = b * total
        kept_mass = float(mass[s][ck].sum())
        tol = 1e-5 * total + 1e-30
        if r < hi:  # not capped: the kept candidates reach the target
            assert kept_mass >= target - tol
        if r > lo:  # minimal: without the smallest kept candidate the target is missed
            smallest = float(mass[s][ck].min())
            assert kept_mass - smallest < target + tol


def run_case(device, seed, S, N, dtype, ties, by_mass, budget_kind, sink, recent, min_keep, cap_kind,
             kind="skewed", layout="contiguous", full=False):
    g = generator(seed)
    scores = random_scores(g, S, N, dtype, ties, kind)
    lengths = torch.full((S,), N) if full else rand_lengths(S, N, g)
    if by_mass:
        budget = {"scalar": float(torch.rand((), generator=g) * 0.98 + 0.02),
                  "near0": 1e-6, "near1": 1.0 - 1e-6, "one": 1.0,
                  "tensor": torch.rand(S, generator=g).clamp(min=1e-3)}[budget_kind]
    else:
        budget = {"scalar": int(torch.randint(0, N + 2, (), generator=g)), "near0": 0, "one": N,
                  "near1": max(N - 1, 0),
                  "tensor": torch.randint(0, N + 2, (S,), generator=g, dtype=torch.int32)}[budget_kind]
    forced_max = min(N, sink + recent)
    capacity = {"full": N, "wide": N + 5,
                "tight": max(forced_max, min(N, min_keep), N // 2)}[cap_kind]
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    fn, ref_fn = (pk.select_top_p, ref.select_top_p) if by_mass else (pk.select_top_k, ref.select_top_k)
    kw = dict(sink=sink, recent=recent, min_keep=min_keep, capacity=capacity)
    poison_allocator(device)
    dev_scores = to(scores)
    if layout == "strided":  # rows 4 elements apart and the first one off 16-byte alignment
        wide = torch.empty(S, N + 7, dtype=dtype, device=device)
        wide[:, 1:N + 1] = dev_scores
        dev_scores = wide[:, 1:N + 1]
    sel = fn(dev_scores, to(lengths), to(budget), **kw)
    assert sel.indices.shape == (S, capacity) and sel.indices.dtype == torch.int32
    assert sel.counts.shape == (S,) and sel.counts.dtype == torch.int32
    exp_idx, exp_cnt = ref_fn(scores, lengths, budget, **kw)
    same = torch.equal(sel.indices.cpu(), exp_idx) and torch.equal(sel.counts.cpu(), exp_cnt)
    if not same:
        # Only top-p may differ, and only where float summation order flips a borderline element.
        assert by_mass, "top-k must match the reference exactly"
    check_definition(scores, lengths, budget, by_mass, sink, recent, min_keep, capacity, sel)
    return sel


@pytest.mark.parametrize("device", devices())
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 12), N=st.integers(0, 300),
       dtype=st.sampled_from(DTYPES), ties=st.booleans(), by_mass=st.booleans(),
       budget_kind=st.sampled_from(["scalar", "near0", "one", "tensor"]),
       sink=st.sampled_from([0, 1, 4]), recent=st.sampled_from([0, 1, 8, 64]),
       min_keep=st.sampled_from([0, 1, 16, 64]), cap_kind=st.sampled_from(["full", "wide", "tight"]))
def test_matches_reference(device, seed, S, N, dtype, ties, by_mass, budget_kind, sink, recent,
                           min_keep, cap_kind):
    run_case(device, seed, S, N, dtype, ties, by_mass, budget_kind, sink, recent, min_keep, cap_kind)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("S,N", [(1280, 768), (64, 4096), (4, 40000)])
@pytest.mark.parametrize("by_mass", [True, False])
def test_large_segments(device, S, N, by_mass):
    if device == "cpu" and S * N > 1_000_000:
        pytest.skip("large CPU case is slow; covered on CUDA")
    run_case(device, S + N, S, N, torch.float32, False, by_mass, "scalar", 4, 32, 64, "full")


@pytest.mark.parametrize("device", devices())
def test_ties_keep_lower_positions(device):
    scores = torch.ones(1, 10, device=device)
    lengths = torch.tensor([10], device=device)
    sel = pk.select_top_k(scores, lengths, 3)
    assert sel.indices[0, :3].tolist() == [0, 1, 2] and int(sel.counts[0]) == 3
    sel = pk.select_top_p(scores, lengths, 0.5, sink=1)  # 9 candidates of mass 1: keep 5
    assert sel.indices[0, :6].tolist() == [0, 1, 2, 3, 4, 5] and int(sel.counts[0]) == 6


@pytest.mark.parametrize("device", devices())
def test_nan_and_negative_scores(device):
    scores = torch.tensor([[float("nan"), -1.0, 0.5, -0.0, 0.25, float("inf") * 0]], device=device)
    lengths = torch.tensor([6], device=device)
    sel = pk.select_top_p(scores, lengths, 1.0)
    assert sel.indices[0, : int(sel.counts[0])].tolist() == [2, 4]
    sel = pk.select_top_k(scores, lengths, 4)  # order: 0.5, 0.25, 0 (pos 3), -1; NaN last
    assert sel.indices[0, :4].tolist() == [1, 2, 3, 4]


# ---- CUDA strategies ------------------------------------------------------------------------
# The CUDA kernel picks its strategy from N: one 64-thread CTA per segment (N <= 1024), one
# 128-thread CTA (N <= 4096), one 256-thread CTA (N <= 8192), one large CTA (1024 threads for
# float32, 512 for 16-bit) holding up to 32768 keys in shared memory (N <= 32768), clusters of up
# to 8 large CTAs (N <= 262144), and beyond 8 slices the slices are re-read from global memory.
# These widths hit every class and its boundaries.
STRATEGY_N = [1, 33, 768, 1024, 1025, 2048, 2049, 4096, 4097, 8192, 8193, 16384, 32768, 32769,
              40000, 70001]


@pytest.mark.cuda
@pytest.mark.parametrize("N", STRATEGY_N)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("by_mass", [True, False])
def test_cuda_strategies(N, dtype, by_mass):
    cases = [  # kind, ties, budget, sink, recent, min_keep, capacity, layout, full lengths
        ("softmax", False, "scalar", 4, N // 10, 0, "full", "contiguous", True),
        ("skewed", False, "tensor", 4, N // 10, 16, "tight", "contiguous", False),
        ("skewed", True, "near0", 1, 8, 64, "wide", "strided", False),
        ("softmax", False, "near1", 0, 0, 0, "full", "strided", False),
        ("special", False, "scalar", 0, 3, 1, "full", "contiguous", False),
        ("equal", False, "tensor", 2, 5, 0, "tight", "contiguous", True),
        ("narrow", False, "scalar", 4, N // 10, 0, "full", "contiguous", True),
        ("tiny", False, "scalar", 2, N // 10, 0, "full", "contiguous", False),
    ]
    for i, (kind, ties, bk, sink, recent, mk, cap, layout, full) in enumerate(cases):
        run_case("cuda", N * 31 + i, 5, N, dtype, ties, by_mass, bk, sink, recent, mk, cap,
                 kind=kind, layout=layout, full=full)


@pytest.mark.cuda
@pytest.mark.parametrize("S,N,dtype", [(32, 131072, torch.float32), (8, 131072, torch.bfloat16),
                                       (3, 140000, torch.float32), (2, 262144, torch.float32),
                                       (2, 300000, torch.bfloat16), (2, 270000, torch.float16),
                                       (40, 16384, torch.float32), (64, 98304, torch.float32)])
@pytest.mark.parametrize("by_mass", [True, False])
def test_large_cuda(S, N, dtype, by_mass):
    """Full-length segments of the clustered and the global-memory (unstaged) strategies. On an
    H100, 32 x 131072 float32 takes clusters of 3 (not 4) and 64 x 98304 float32 clusters of 2
    with the largest slices (49152 keys): the planner's fewer-waves choice."""
    run_case("cuda", S + N, S, N, dtype, False, by_mass, "scalar", 4, N // 10, 0, "full",
             kind="softmax", full=True)
    run_case("cuda", S + N + 1, S, N, dtype, True, by_mass, "tensor", 4, 64, 128, "tight")


@pytest.mark.cuda
def test_cuda_unstaged_small_batch():
    """The global-memory strategy (N > 8 slices of 32768) with ragged lengths, under the
    sanitizers too."""
    for by_mass in (True, False):
        run_case("cuda", 7, 2, 262145, torch.float32, False, by_mass, "tensor", 4, 100, 16, "tight")


@pytest.mark.cuda
@pytest.mark.parametrize("N", [768, 8193, 40000])
def test_cuda_deterministic(N):
    """Exact integer masses: the same input gives the same selection on every run."""
    g = generator(N)
    scores = torch.softmax(torch.randn(16, N, generator=g) * 3, -1).cuda()
    lengths = torch.randint(N // 2, N + 1, (16,), generator=g).cuda()
    first = pk.select_top_p(scores, lengths, 0.9, sink=4, recent=32)
    for _ in range(3):
        again = pk.select_top_p(scores, lengths, 0.9, sink=4, recent=32)
        assert torch.equal(first.indices, again.indices) and torch.equal(first.counts, again.counts)


@pytest.mark.parametrize("device", devices())
def test_top_p_infinite_and_zero_mass(device):
    """An inf candidate holds all the mass (r = 1); an all-zero segment keeps only the floor."""
    scores = torch.tensor([[0.5, float("inf"), 2.0, float("inf"), 1.0],
                           [0.0, -0.0, 0.0, -1.0, 0.0]], device=device)
    lengths = torch.tensor([5, 5], device=device)
    sel = pk.select_top_p(scores, lengths, 0.5, min_keep=2)
    exp_idx, exp_cnt = ref.select_top_p(scores.cpu(), lengths.cpu(), 0.5, min_keep=2)
    assert torch.equal(sel.indices.cpu(), exp_idx) and torch.equal(sel.counts.cpu(), exp_cnt)
    assert sel.indices[0, :2].tolist() == [1, 3] and sel.indices[1, :2].tolist() == [0, 1]


@pytest.mark.cuda
def test_cuda_out_of_range_values_are_clamped():
    """Device-side clamping (validate=False): lengths outside [0, N], p outside (0, 1] or NaN,
    negative or huge k. (The CPU kernel raises on these values instead.)"""
    g = generator(5)
    scores = (torch.rand(4, 300, generator=g) ** 2).cuda()
    lengths = torch.tensor([300, 400, -3, 7]).cuda()
    clamped = lengths.cpu().clamp(0, 300)
    p = torch.tensor([1.5, -0.5, float("nan"), 2.0]).cuda()
    sel = pk.select_top_p(scores, lengths, p, sink=2, min_keep=3, validate=False)
    exp = ref.select_top_p(scores.cpu(), clamped, p.cpu().nan_to_num(0.0).clamp(0, 1), sink=2, min_keep=3)
    assert torch.equal(sel.indices.cpu(), exp[0]) and torch.equal(sel.counts.cpu(), exp[1])
    k = torch.tensor([-5, 10**12, 3, 1]).cuda()
    sel = pk.select_top_k(scores, lengths, k, recent=4, validate=False)
    exp = ref.select_top_k(scores.cpu(), clamped, k.cpu().clamp(min=0), recent=4)
    assert torch.equal(sel.indices.cpu(), exp[0]) and torch.equal(sel.counts.cpu(), exp[1])

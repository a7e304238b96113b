"""select_top_p / select_top_k against the sort-based reference and the float64 definition."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyramid_kv as pk
from pyramid_kv import reference as ref
from helpers import DTYPES, devices, generator, poison_allocator, rand_lengths


def random_scores(g, S, N, dtype, ties):
    x = torch.rand(S, N, generator=g) ** 3  # skewed like attention mass
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
        # Every kept candidate precedes every dropped one in (score desc, position asc) order.
        if ck.any() and cd.any():
            pos = torch.arange(N)
            worst_kept = min(zip(key[s][ck].tolist(), (-pos[ck]).tolist()))
            best_dropped = max(zip(key[s][cd].tolist(), (-pos[cd]).tolist()))
            assert worst_kept > best_dropped
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


def run_case(device, seed, S, N, dtype, ties, by_mass, budget_kind, sink, recent, min_keep, cap_kind):
    g = generator(seed)
    scores = random_scores(g, S, N, dtype, ties)
    lengths = rand_lengths(S, N, g)
    if by_mass:
        budget = {"scalar": float(torch.rand((), generator=g) * 0.98 + 0.02),
                  "near0": 1e-6, "one": 1.0,
                  "tensor": torch.rand(S, generator=g).clamp(min=1e-3)}[budget_kind]
    else:
        budget = {"scalar": int(torch.randint(0, N + 2, (), generator=g)), "near0": 0, "one": N,
                  "tensor": torch.randint(0, N + 2, (S,), generator=g, dtype=torch.int32)}[budget_kind]
    forced_max = min(N, sink + recent)
    capacity = {"full": N, "wide": N + 5,
                "tight": max(forced_max, min(N, min_keep), N // 2)}[cap_kind]
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    fn, ref_fn = (pk.select_top_p, ref.select_top_p) if by_mass else (pk.select_top_k, ref.select_top_k)
    kw = dict(sink=sink, recent=recent, min_keep=min_keep, capacity=capacity)
    poison_allocator(device)
    sel = fn(to(scores), to(lengths), to(budget), **kw)
    assert sel.indices.shape == (S, capacity) and sel.indices.dtype == torch.int32
    assert sel.counts.shape == (S,) and sel.counts.dtype == torch.int32
    exp_idx, exp_cnt = ref_fn(scores, lengths, budget, **kw)
    same = torch.equal(sel.indices.cpu(), exp_idx) and torch.equal(sel.counts.cpu(), exp_cnt)
    if not same:
        # Only top-p may differ, and only where float summation order flips a borderline element.
        assert by_mass, "top-k must match the reference exactly"
    check_definition(scores, lengths, budget, by_mass, sink, recent, min_keep, capacity, sel)


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

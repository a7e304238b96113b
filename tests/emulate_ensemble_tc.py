"""CPU emulation of csrc/kernels/ensemble_scores_tc.cuh's tile logic (not of the PTX fragment
layouts): stationary/streamed row mapping, w_lo, tile skip/mask decisions, zero-fill, per-thread
lazy max, quad merges, key-range splits of the normaliser pass. Compared with the float64
reference on random shapes. Not collected by pytest (slow); run `python tests/emulate_ensemble_tc.py`.
"""
import sys
from pathlib import Path

import numpy as np
import torch

np.seterr(invalid="ignore", over="ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from pyramid_kv import reference as ref  # noqa: E402

LOG2E = 1.4426950408889634
TILE = 64


def cfg(D):
    MT = 4 if D <= 128 else 2
    return MT, 4 * MT * 16  # MT, kRows


def lse_pass(q, k, lengths, scale, splits=1):
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    GW = G * W
    MT, kRows = cfg(D)
    sl2e = np.float32(scale * LOG2E)
    out = np.full((B, Hq, W), np.nan, np.float32)
    part = np.full((splits, B, Hq, W, 2), np.nan, np.float32)
    gx = -(-GW // kRows) * splits
    for b in range(B):
        L = int(min(max(lengths[b], 0), N))
        first = L - W
        for h in range(Hkv):
            for bx in range(gx):
                split = bx % splits
                r0 = (gx // splits - 1 - bx // splits) * kRows
                i = r0 + np.arange(kRows)
                valid = i < GW
                A = np.zeros((kRows, D), np.float32)
                A[valid] = q[b, h * G + i[valid] % G, i[valid] // G]
                pos = np.where(valid, first + i // G, -1)
                pmax_cta = first + (min(r0 + kRows, GW) - 1) // G
                all_tiles = pmax_cta // TILE + 1 if pmax_cta >= 0 else 0
                per = -(-all_tiles // splits)
                t_begin = min(split * per, all_tiles)
                t_end = min(t_begin + per, all_tiles)
                m = np.full((kRows, 4), -1e30, np.float32)  # per (row, lane&3)
                l = np.zeros((kRows, 4), np.float32)
                for t in range(t_begin, t_end):
                    j = t * TILE + np.arange(TILE)
                    Kt = np.zeros((TILE, D), np.float32)
                    jv = j < L
                    Kt[jv] = k[b, h, j[jv]]
                    for warp in range(4):
                        rs = slice(warp * 16 * MT, (warp + 1) * 16 * MT)
                        wi0 = r0 + warp * 16 * MT
                        wi1 = min(wi0 + 16 * MT, GW) - 1
                        pmin_w = first + wi0 // G
                        pmax_w = first + wi1 // G if wi1 >= wi0 else -1
                        key0 = t * TILE
                        if key0 > pmax_w:
                            continue
                        masked = not (key0 + TILE - 1 <= pmin_w)
                        S = (A[rs].astype(np.float64) @ Kt.T.astype(np.float64)).astype(np.float32)
                        for pair in range(4):
                            for tig in range(4):
                                cols = pair * 16 + 2 * tig + np.array([0, 1, 8, 9])
                                v = S[:, cols].copy()
                                if masked:
                                    v[(key0 + cols)[None, :] > pos[rs][:, None]] = -np.inf
                                bm = v.max(1) * sl2e
                                mm, ll = m[rs, tig], l[rs, tig]
                                up = bm > mm
                                ll = np.where(up, ll * np.exp2(mm - bm), ll)
                                mm = np.where(up, bm, mm)
                                ll = ll + np.exp2(v * sl2e - mm[:, None]).sum(1, dtype=np.float32)
                                m[rs, tig], l[rs, tig] = mm, ll
                # quad merge
                mm, ll = m.copy(), l.copy()
                for off in (1, 2):
                    mo, lo = mm[:, np.arange(4) ^ off], ll[:, np.arange(4) ^ off]
                    mx = np.maximum(mm, mo)
                    ll = ll * np.exp2(mm - mx) + lo * np.exp2(mo - mx)
                    mm = mx
                with np.errstate(divide="ignore"):
                    res = np.where(pos >= 0, (mm[:, 0] + np.log2(ll[:, 0])) / LOG2E, -np.inf)
                for r in range(kRows):
                    if i[r] < GW:
                        if splits == 1:
                            out[b, h * G + i[r] % G, i[r] // G] = res[r]
                        else:
                            part[split, b, h * G + i[r] % G, i[r] // G] = (mm[r, 0], ll[r, 0])
    if splits > 1:
        assert not np.isnan(part).any()
        mx = np.maximum(part[..., 0].max(0), np.float32(-1e30))
        sm = (part[..., 1] * np.exp2(part[..., 0] - mx)).sum(0)
        with np.errstate(divide="ignore"):
            out = np.where(sm > 0, (mx + np.log2(sm)) / LOG2E, -np.inf).astype(np.float32)
    return out


def score_pass(q, k, lengths, rw, lse, scale):
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    MT, kRows = cfg(D)
    sl2e = np.float32(scale * LOG2E)
    out = np.full((B, Hkv, N), np.nan, np.float32)
    for b in range(B):
        L = int(min(max(lengths[b], 0), N))
        first = L - W
        for h in range(Hkv):
            for bx in range(-(-N // kRows)):
                j0 = bx * kRows
                if j0 >= L:
                    out[b, h, j0:min(j0 + kRows, N)] = 0
                    continue
                w_lo = max(0, j0 - first)
                assert w_lo <= W - 1
                R = G * (W - w_lo)
                num_tiles = -(-R // TILE)
                j = j0 + np.arange(kRows)
                A = np.zeros((kRows, D), np.float32)
                jv = j < L
                A[jv] = k[b, h, j[jv]]
                ksum = np.zeros(kRows, np.float32)
                for t in range(num_tiles):
                    i = t * TILE + np.arange(TILE)
                    valid = i < R
                    w = np.where(valid, w_lo + i // G, 0)
                    g = np.where(valid, i % G, 0)
                    Bt = np.zeros((TILE, D), np.float32)
                    Bt[valid] = q[b, h * G + g[valid], w[valid]]
                    pos_s = np.where(valid, first + w, -1)
                    lse_s = np.where(valid, lse[b, h * G + g, w], 0).astype(np.float32)
                    wt_s = np.where(valid, rw[b, w] if rw is not None else 1.0, 0).astype(np.float32)
                    i0 = t * TILE
                    pmin = first + w_lo + i0 // G
                    pmax = first + w_lo + (min(i0 + TILE, R) - 1) // G
                    # positions within the tile never decrease and match pos_s's range
                    assert pos_s[valid].min() == pmin and pos_s[valid].max() == pmax
                    for warp in range(4):
                        kw0 = j0 + warp * 16 * MT
                        kw1 = kw0 + 16 * MT - 1
                        if kw0 >= L or pmax < kw0:
                            continue
                        masked = not (pmin >= kw1)
                        rs = slice(warp * 16 * MT, (warp + 1) * 16 * MT)
                        S = (A[rs].astype(np.float64) @ Bt.T.astype(np.float64)).astype(np.float32)
                        x = S * sl2e + (-lse_s * np.float32(LOG2E))[None, :]
                        if masked:
                            x[j[rs][:, None] > pos_s[None, :]] = -np.inf
                        elif True:
                            # unmasked tiles must not contain a visible-masked pair with weight
                            vis = j[rs][:, None] <= pos_s[None, :]
                            assert (vis | (wt_s[None, :] == 0)).all()
                        ksum[rs] += (np.exp2(x) * wt_s[None, :]).sum(1, dtype=np.float32)
                for r in range(kRows):
                    if j[r] < N:
                        out[b, h, j[r]] = ksum[r] if j[r] < L else 0
    return out


def run(seed, B, Hkv, G, W, N, D, weights, given_lse, splits=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, W, D, generator=g).bfloat16().double()
    k = torch.randn(B, Hkv, N, D, generator=g).bfloat16().double()
    lengths = torch.randint(0, N + 1, (B,), generator=g)
    if B > 1 and seed % 2:
        lengths[0] = N
        lengths[-1] = min(N, 1 + seed % 3)
    rw = torch.rand(B, W, generator=g).double() + 0.5 if weights else None
    expect = ref.ensemble_scores(q, k, lengths, rw)
    scale = D ** -0.5
    qn, kn = q.float().numpy(), k.float().numpy()
    if given_lse:
        s = torch.einsum("bhwd,bhnd->bhwn", q, k.repeat_interleave(G, 1)) * scale
        pos = lengths[:, None] - W + torch.arange(W)
        vis = torch.arange(N) <= pos[:, :, None]
        lse = s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1).float().numpy()
        # rows at negative positions: the op must ignore whatever is there
        lse = np.where(np.isfinite(lse), lse, np.nan).astype(np.float32)
    else:
        lse = lse_pass(qn, kn, lengths.numpy(), scale, splits)
        s = torch.einsum("bhwd,bhnd->bhwn", q, k.repeat_interleave(G, 1)) * scale
        pos = lengths[:, None] - W + torch.arange(W)
        vis = torch.arange(N) <= pos[:, :, None]
        lse_ref = s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1).numpy()
        fin = np.isfinite(lse_ref)
        assert np.array_equal(np.isfinite(lse), fin), "lse finiteness"
        assert (lse[~fin] == -np.inf).all()
        assert np.abs(lse[fin] - lse_ref[fin]).max(initial=0) < 1e-4, np.abs(lse[fin] - lse_ref[fin]).max()
    out = score_pass(qn, kn, lengths.numpy(), None if rw is None else rw.float().numpy(), lse, scale)
    assert np.isfinite(out).all()
    e = expect.numpy()
    err = np.linalg.norm(out - e) / max(np.linalg.norm(e), 1e-30)
    assert err < 1e-4, err
    pad = np.broadcast_to(np.arange(N)[None, None, :] >= lengths.numpy()[:, None, None], out.shape)
    assert (out[pad] == 0).all()
    return err


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    cases = [
        (1, 1, 1, 1, 1, 64, False, False),      # N = 1, W = 1
        (2, 1, 4, 70, 70, 64, True, False),     # W = N
        (2, 2, 8, 1, 300, 128, False, True),    # W = 1
        (3, 1, 4, 90, 40, 64, True, True),      # W > N: rows at negative positions
        (2, 1, 1, 300, 600, 128, False, False),
        (1, 1, 16, 33, 257, 256, True, False),
        (2, 1, 3, 130, 513, 64, False, False),  # odd G
    ]
    for n in range(40):
        D = int(rng.choice([64, 128, 256]))
        N = int(rng.integers(1, 700))
        W = int(rng.integers(1, N + 40))
        cases.append((int(rng.integers(1, 3)), 1, int(rng.choice([1, 2, 4, 8, 5])), W, N, D,
                      bool(rng.integers(2)), bool(rng.integers(2))))
    cases = [c + (s,) for c in cases for s in ((1, 2, 3, 4) if not c[-1] else (1,))]
    cases += [(2, 1, 2, 40, 2100, 128, False, False, 4), (1, 1, 8, 7, 1100, 64, False, False, 3)]
    for n, c in enumerate(cases):
        err = run(n, *c)
        print(n, c, f"{err:.2e}", flush=True)
    print("all ok")

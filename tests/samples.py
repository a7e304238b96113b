"""Fixed sample inputs of every op (edge cases included), shared by the reference comparison
and torch.library.opcheck."""

import torch

from helpers import generator


def sample_inputs(device):
    """Yields (name, op, args, reference_fn) with reference_fn(*args) -> expected outputs."""
    from pyramid_kv import reference as ref

    g = generator(1234)
    ops = torch.ops.pyramid_kv
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, Hq, Hkv, W, N, D in [(2, 8, 2, 5, 33, 64), (1, 4, 4, 1, 1, 16), (2, 8, 1, 0, 9, 8),
                                    (3, 8, 2, 12, 12, 128), (2, 2, 1, 3, 0, 8)]:
            q = torch.randn(B, Hq, W, D, generator=g).to(dtype).to(device)
            k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(device)
            lengths = torch.tensor([N, max(N // 2, 0), 1][:B], device=device).clamp(max=N)
            rw = torch.rand(B, W, generator=g).to(device)
            lse = None
            if W and N:  # a valid lse from the reference's own normaliser
                s = torch.einsum("bhwd,bhnd->bhwn", q.double(), k.double().repeat_interleave(Hq // Hkv, 1)) * D ** -0.5
                pos = lengths[:, None] - W + torch.arange(W, device=device)
                vis = torch.arange(N, device=device) <= pos[:, :, None]
                lse = s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1).float()
            for weights, l in [(None, None), (rw, lse)]:
                args = (q, k, lengths, weights, l, D ** -0.5)
                yield ("ensemble_scores", ops.ensemble_scores.default, args,
                       lambda q, k, L, w, l, sc: ref.ensemble_scores(q.double(), k.double(), L, w, l, sc).float())
    for dtype in (torch.float32, torch.bfloat16):
        for S, N in [(4, 50), (3, 1), (2, 0), (5, 700)]:
            scores = (torch.rand(S, N, generator=g) ** 2).to(dtype).to(device)
            lengths = torch.tensor([N, 0, 1, N // 2, N][:S], device=device).clamp(max=N)
            cap = max(N, 1)
            per_p = torch.rand(S, generator=g).clamp(min=0.05).to(device)
            per_k = torch.randint(0, N + 1, (S,), generator=g).to(device)
            for maybe_p, p in [(None, 0.7), (per_p, 1.0)]:
                args = (scores, lengths, maybe_p, p, 1, 2, 4, cap)
                yield ("select_top_p", ops.select_top_p.default, args,
                       lambda s, L, mp, p, a, b, c, d: ref.select_top_p(s, L, mp if mp is not None else p,
                                                                        sink=a, recent=b, min_keep=c, capacity=d))
            for maybe_k, k in [(None, 3), (per_k, 0)]:
                args = (scores, lengths, maybe_k, k, 2, 1, 0, cap)
                yield ("select_top_k", ops.select_top_k.default, args,
                       lambda s, L, mk, k, a, b, c, d: ref.select_top_k(s, L, mk if mk is not None else k,
                                                                        sink=a, recent=b, min_keep=c, capacity=d))
    for B, H, N, D, C, per_head in [(2, 4, 30, 64, 12, False), (2, 2, 17, 8, 17, True), (1, 1, 0, 4, 3, False)]:
        k = torch.randn(B, H, N, D, generator=g).to(device)
        v = torch.randn(B, H, N, D, generator=g).bfloat16().to(device)
        rows = B * H if per_head else B
        counts = torch.randint(0, min(N, C) + 1, (rows,), generator=g)
        idx = torch.stack([torch.cat([torch.randperm(N, generator=g)[:C].sort().values,
                                      torch.full((max(C - N, 0),), -1)])[:C] for _ in range(rows)])
        idx = torch.where(torch.arange(C) < counts[:, None], idx, -1)
        if per_head:
            idx, counts = idx.view(B, H, C), counts.view(B, H)
        idx, counts = idx.to(device), counts.to(device)
        yield ("compact", ops.compact.default, ([k, v], idx, counts), lambda s, i, c: ref.compact(s, i, c))
        out = [torch.zeros(B, H, C + 2, D, device=device), torch.zeros(B, H, C + 2, D, device=device).bfloat16()]
        yield ("compact_out", ops.compact_out.default, ([k, v], idx, counts, out), None)
        # In place: the indices above are strictly ascending within each count.
        yield ("compact_", ops.compact_.default, ([k.clone(), v.clone()], idx, counts), None)

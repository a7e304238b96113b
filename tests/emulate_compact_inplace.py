"""CPU emulation of the in-place compaction protocol of csrc/kernels/compact.cuh (compact_prepare
and compact_move): identity prefixes, group/round-major tile ids, ticket skipping of empty rounds,
the 32-way searches, and the two-stage block pipeline with its publish / check / spin steps.

Blocks are coroutines interleaved at random (also one block far ahead of the others, as under
compute-sanitizer). Every tile's reads happen as late as the hardware allows (when its loads are
waited for), its writes as early (at the store). Checks: every read sees the row's original
value (no write-after-read), the result equals the reference, every flag is eventually set and
no run deadlocks, also for bad (non-ascending, out-of-range) indices. Not collected by pytest
(slow); run `python tests/emulate_compact_inplace.py`.
"""
import random
import sys
from collections import Counter

STATS = Counter()

TILE_CHUNKS = 64  # the kernel's 1024 (256 threads x 4), smaller here: more tiles per segment


def warp_count_below(n, x, key):
    """The kernel's 32-way search: the number of k in [0, n) with key(k) < x (key nondecreasing)."""
    lo, hi = 0, n
    while True:
        length = hi - lo
        if length <= 32:
            return lo + sum(1 for lane in range(32) if lane < length and key(lo + lane) < x)
        step = (length + 31) // 32
        m = sum(1 for lane in range(32) if lo + (lane + 1) * step - 1 < hi and key(lo + (lane + 1) * step - 1) < x)
        hi = min(lo + (m + 1) * step - 1, hi)
        lo += m * step


class Plan:
    """plan_compact_tiles + plan_compact_inplace for tensors given as (H, row_chunks)."""

    def __init__(self, B, tensors, rows):
        self.B, self.rows, self.t = B, rows, []
        nxt = 0
        for i, (H, row_chunks) in enumerate(tensors):
            stripes = -(-row_chunks // TILE_CHUNKS)
            width = -(-row_chunks // stripes)
            R = TILE_CHUNKS // width
            x = dict(H=H, row_chunks=row_chunks, stripes=stripes, width=width, R=R, row_tiles=-(-rows // R))
            lead = self.t[i - 1]["group"] if i else None
            g = self.t[lead] if lead is not None else None
            if g and all(x[k] == g[k] for k in ("H", "width", "R", "stripes", "row_tiles")):
                x.update(group=lead, group_size=1, first=g["first"])
                g["group_size"] += 1
            else:
                x.update(group=i, group_size=1, first=nxt)
            nxt += B * H * x["row_tiles"] * stripes
            self.t.append(x)
        self.total = nxt
        STATS["grouped tensors"] += sum(x["group"] != i for i, x in enumerate(self.t))

    def decode(self, tid):
        g = 0
        for i, x in enumerate(self.t):
            if x["group"] == i and tid >= x["first"]:
                g = i
        x = self.t[g]
        cols = self.B * x["H"] * x["stripes"]
        stride = cols * x["group_size"]
        local = tid - x["first"]
        rt, rest = divmod(local, stride)
        member, rest = divmod(rest, cols)
        seg, stripe = divmod(rest, x["stripes"])
        b, h = divmod(seg, x["H"])
        return dict(t=g + member, b=b, h=h, rt=rt, stripe=stripe, stride=stride)


def emulate(seed, B, tensors, N, C, per_head, idx_rows_fn, blocks, mode, bad=False):
    rnd = random.Random(seed)
    rows = min(C, N)
    plan = Plan(B, tensors, rows)
    H0 = tensors[0][0]
    idx_H = H0 if per_head else 1
    # index rows: (indices list of length C, count)
    index = [idx_rows_fn(rnd, r) for r in range(B * idx_H)]
    # data[t][b][h][row][col] = original (t, b, h, row, col) marker
    data = [[[[[(t, b, h, n, c) for c in range(x["row_chunks"])] for n in range(N)] for h in range(x["H"])]
             for b in range(B)] for t, x in enumerate(plan.t)]
    orig = [[[[list(r) for r in hh] for hh in bb] for bb in tt] for tt in data]
    written = set()

    # compact_prepare
    segs = []
    most = 0
    for r, (idx, cnt) in enumerate(index):
        count = max(0, min(cnt, rows))
        start = warp_count_below(count, 1, lambda k: 1 if idx[k] != k else 0)
        assert 0 <= start <= count
        segs.append((start, count))
        most = max(most, count - start)
    flags = [0] * plan.total
    useful = []
    for g, x in enumerate(plan.t):
        rounds = min(x["row_tiles"], -(-most // x["R"]))
        useful.append(rounds * B * x["H"] * x["stripes"] * x["group_size"] if x["group"] == g else 0)
    ticket = [0]
    handed = []

    def take():
        v = ticket[0]
        ticket[0] += 1
        for g, x in enumerate(plan.t):
            if x["group"] != g:
                continue
            if v < useful[g]:
                handed.append(x["first"] + v)
                return x["first"] + v
            v -= useful[g]
        return None

    def load(tid):
        d = plan.decode(tid)
        x = plan.t[d["t"]]
        r_idx = d["b"] * idx_H + (d["h"] if per_head else 0)
        start, count = segs[r_idx]
        idx = index[r_idx][0]
        R = x["R"]
        row0 = start + d["rt"] * R
        col0 = d["stripe"] * x["width"]
        cols = min(x["width"], x["row_chunks"] - col0)
        moves = []  # (dst row, src row, col)
        for l in range(TILE_CHUNKS):
            r, c = divmod(l, x["width"])
            if r >= R or c >= cols or row0 + r >= count:
                continue
            s = max(0, min(idx[row0 + r], N - 1))
            if s != row0 + r:
                moves.append((row0 + r, s, col0 + c))
        wait = None
        if d["rt"] > 0 and row0 < count:
            end = min(row0 + R, count)
            a = warp_count_below(d["rt"], row0, lambda k: idx[start + k * R + R - 1])
            b = warp_count_below(d["rt"], end, lambda k: idx[start + k * R]) - 1
            assert 0 <= a <= d["rt"] and -1 <= b < d["rt"]
            wait = (a, b)
            if not bad:  # the range holds every earlier tile of the column that reads [row0, end)
                for k in range(d["rt"]):
                    lo, hi = start + k * R, min(start + k * R + R, count)
                    if any(row0 <= idx[i] < end for i in range(lo, hi)):
                        assert a <= k <= b, (k, a, b)
        first = tid - d["rt"] * d["stride"]
        awaited = [first + k * d["stride"] for k in range(wait[0], wait[1] + 1)] if wait else []
        assert all(0 <= f < tid for f in awaited)
        return dict(id=tid, d=d, moves=moves, awaited=awaited, buf=None)

    def land(tile):  # the loads return (at the latest point: when the block waits for them)
        if tile["buf"] is not None:
            return  # already waited for
        d = tile["d"]
        t, b, h = d["t"], d["b"], d["h"]
        buf = []
        for dst, s, c in tile["moves"]:
            if not bad:
                assert (t, b, h, s, c) not in written, f"write-after-read hazard on {(t, b, h, s, c)}"
            buf.append(data[t][b][h][s][c])
        tile["buf"] = buf

    def store(tile):
        d = tile["d"]
        t, b, h = d["t"], d["b"], d["h"]
        for (dst, s, c), v in zip(tile["moves"], tile["buf"]):
            data[t][b][h][dst][c] = v
            written.add((t, b, h, dst, c))

    def ready(tile):
        return all(flags[f] for f in tile["awaited"])

    def block():
        tid = take()
        yield
        if tid is None:
            return
        cur = load(tid)
        yield
        published = False
        while True:
            nid = take()
            yield
            nxt = load(nid) if nid is not None else None
            yield
            land(cur)
            yield
            if not published:
                flags[cur["id"]] = 1
                yield
            published = False
            if cur["moves"]:  # __syncthreads_or(cur != 0)
                ok = ready(cur)
                yield
                STATS["checks"] += 1
                if not ok:
                    STATS["not ready"] += 1
                    if nxt is not None:
                        land(nxt)
                        yield
                        flags[nxt["id"]] = 1
                    published = True
                    while not ready(cur):
                        yield "spin"
                store(cur)
                yield
            if nxt is None:
                return
            cur = nxt

    live = [block() for _ in range(blocks)]
    speed = [rnd.choice([1.0, 1.0, 0.1, 0.01]) for _ in live]  # some blocks lag far behind
    spins = 0
    ahead = mode == "serial"
    while live:
        i = 0 if ahead else rnd.choices(range(len(live)), weights=speed)[0]
        try:
            r = next(live[i])
        except StopIteration:
            live.pop(i)
            speed.pop(i)
            spins = 0
            continue
        if r == "spin":
            STATS["spin steps"] += 1
            spins += 1
            # Alone, the front block only awaits its own, published, tiles: it never spins.
            assert not ahead, "the front block spins"
            assert spins < 10 ** 6, "deadlock"
        else:
            spins = 0
    assert all(flags[t] for t in handed), "a handed-out tile never published"
    if bad:
        return
    for t, x in enumerate(plan.t):
        for b in range(B):
            for h in range(x["H"]):
                r_idx = b * idx_H + (h if per_head else 0)
                idx, cnt = index[r_idx]
                count = max(0, min(cnt, rows))
                for i in range(count):
                    assert data[t][b][h][i] == orig[t][b][h][idx[i]], (t, b, h, i)


def ascending(N, C, keep, prefix):
    def make(rnd, r):
        kept = [n for n in range(N) if n < prefix or rnd.random() < keep][:C]
        return kept + [-1] * (C - len(kept)), len(kept)
    return make


def decode_style(N, C, chunk, kept):
    def make(rnd, r):
        start = rnd.randrange(0, max(1, N - 2 * chunk))
        length = rnd.randrange(start + chunk, N + 1)
        ks = sorted(rnd.sample(range(chunk), kept))
        idx = list(range(start)) + [start + k for k in ks] + list(range(start + chunk, length))
        idx = idx[:C]
        return idx + [-1] * (C - len(idx)), len(idx)
    return make


def bad_rows(N, C):
    def make(rnd, r):
        return [rnd.randrange(-50, N + 50) for _ in range(C)], rnd.randrange(-3, C + 5)
    return make


def main():
    rnd = random.Random(0)
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for run in range(runs):
        B = rnd.choice([1, 2, 3])
        H = rnd.choice([1, 2, 3])
        per_head = rnd.random() < 0.5
        # tensors as (H, row_chunks): rows of 16 chunks (R = 64), narrow rows, wide rows in stripes
        kinds = [(H, 16), (H, 16), (H, 1), (H, 16 * 3), (H, TILE_CHUNKS + 5), (1 if not per_head else H, 2)]
        tensors = rnd.sample(kinds, rnd.randrange(1, 4))
        if rnd.random() < 0.4:  # K and V (one group), then maybe positions
            tensors = kinds[:2] + tensors[:rnd.randrange(0, 2)]
        if per_head:
            tensors = [(H, c) for _, c in tensors]
        N = rnd.choice([0, 1, 5, 70, 200, 700])
        C = rnd.choice([N, N + 3, max(N // 2, 0)])
        kind = rnd.random()
        if kind < 0.6:
            fn = ascending(N, C, rnd.choice([0.05, 0.3, 0.5, 0.9, 0.99, 1.0]), rnd.choice([0, 0, 17, N // 2, N]))
        elif kind < 0.85:
            fn = decode_style(N, C, 16, 4) if N > 40 else ascending(N, C, 0.5, 0)
        else:
            fn = None
        mode = rnd.choice(["random", "random", "serial"])
        blocks = rnd.choice([1, 2, 5, 16])
        if fn is None:
            emulate(run, B, tensors, N, max(C, 1), per_head, bad_rows(N, max(C, 1)), blocks, mode, bad=True)
        else:
            emulate(run, B, tensors, N, C, per_head, fn, blocks, mode)
        if run % 100 == 0:
            print(f"run {run}: B={B} H={H} N={N} C={C} tensors={tensors} blocks={blocks} {mode}", flush=True)
    print(f"{runs} runs: all reads saw original rows, results equal the reference, no deadlock")
    print(dict(STATS))


if __name__ == "__main__":
    main()

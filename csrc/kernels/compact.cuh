// Compaction (gather of kept token rows) on CUDA: out-of-place (compact, compact_out) and in
// place (compact_), all tensors of a call in one launch. docs/perf/compact.md has the design.
//
// Tiling. A row of tensor t is `row_chunks` chunks of `vec` bytes, vec the widest access
// (16, 8, 4, 2 or 1 bytes) that the row size and every row address allow: 16 for any
// aligned f32/f16/bf16 cache with D % 8 == 0. Each (tensor, b, h) segment is cut into tiles
// of `tile_rows` destination rows by one stripe of `width` chunk columns (a whole row unless a
// row exceeds the tile's chunks), at most kTileChunks chunks per tile (kMoveTileChunks in place).
// A block of kThreads threads takes one tile at a time; thread x owns chunks x + u * kThreads
// (u < kUnroll) and issues all of its index loads, then all of its data loads, then all of its
// stores, so each thread has kUnroll independent 16-byte loads in flight. Out of place, tile
// ids run tensor-major, then segment, then row tile, then stripe; offsets and row numbers are
// 64-bit.
//
// In place (compact_move). Row i of a segment takes row src(i) = indices[i] with indices
// strictly ascending, so src(i) >= i, and the rows with src(i) == i form a prefix [0, P) (once
// src(i) > i, src(i + 1) > i + 1). A pre-pass (compact_prepare) finds P and the clamped count
// of every index row; the move then tiles the rows [start, count) of each segment, start = P
// when P is a tile or more (decode moves a short tail behind a long identity prefix: a few
// tiles in all), else 0 (the tiles' edges then need no search; the rows of [0, P) stay). A
// tile with destination rows [S, E) reads only rows >= S of its stripe, so a later tile of the
// stripe never reads a row that an earlier one writes; the only hazard is an EARLIER tile k
// reading a row of [S, E) that this tile overwrites (write-after-read). Protocol per tile:
// (1) load all source chunks (cp.async into shared memory) and wait for them, (2) pass a block
// barrier and publish a "read done" flag (one thread's release store after the barrier; the
// awaiting side reads flags with acquire loads, then a barrier: CUTLASS's grid-barrier
// pattern), (3) wait for the flags of the earlier tiles of its stripe whose sources can lie in
// [S, E) (a range [a, b] of row tiles that the pre-pass tabulates per index row and row tile:
// one lookup instead of searches in the tile's chain of dependent loads), (4) pass a barrier
// and store.
// Blocks are software-pipelined: a block issues the loads of its next tile before it
// publishes, waits for and stores its current one, so the protocol's latency overlaps a tile
// of loads in flight. The move is a programmatic dependent launch of the pre-pass, and
// prefetches the sources of its first tiles into L2 while it waits for it.
//
// In-place tile ids run round-major: row tile (round) r of every segment of every tensor of a
// group (consecutive tensors tiled alike, such as K and V) before round r + 1, so the tiles a
// tile may await are usually finished long before. Blocks take tiles in id order from an
// atomic ticket, skipping the rounds beyond the longest move of the call. Every tile publishes
// without waiting for anything, and waits only for lower ids, which have all been handed out:
// no deadlock, for any index values and any scheduling of blocks (docs/perf/compact.md).
#pragma once

#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace pyramid_kv::kernels {

constexpr int kMaxCompactTensors = 8;

namespace compact_detail {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                       // out of place: chunks in flight per thread
constexpr int kTileChunks = kThreads * kUnroll;  // 16 KB tiles at 16-byte chunks
// In place, larger tiles (20 KB) amortise the per-tile protocol (measured: 8 / 12 / 16 / 20 KB
// tiles gave 62-68 / 75-83 / 81-89 / 83-91% of copy at the large shapes; 24 KB spills).
constexpr int kMoveUnroll = 5;
constexpr int kMoveTileChunks = kThreads * kMoveUnroll;
// l / width by a multiply (a 32-bit division is ~20 instructions, and every chunk needs one):
// with magic = ceil(2^22 / width) the error l * (magic - 2^22 / width) / 2^22 < l / 2^22 stays
// below 1 / width whenever l * width < 2^22, so the quotient is exact for l, width <= 2^11.
constexpr int kMagicShift = 22;
static_assert(kTileChunks <= 2048 && kMoveTileChunks <= 2048, "tile_row's multiply is exact for l, width <= 2^11 only");
__host__ __device__ inline uint32_t width_magic(int width) {
  return ((1u << kMagicShift) + static_cast<uint32_t>(width) - 1) / static_cast<uint32_t>(width);
}
__device__ __forceinline__ int tile_row(int l, uint32_t magic) {
  return static_cast<int>((static_cast<uint64_t>(l) * magic) >> kMagicShift);
}
}  // namespace compact_detail

struct CompactTensor {
  const char* src;  // [B, H, N, row bytes]; equals out in place
  char* out;        // [B, H, >= rows, row bytes]
  int64_t H;
  int64_t s_sb, s_sh, s_sn;  // byte strides
  int64_t o_sb, o_sh, o_sn;
  int64_t rows;        // destination rows per segment that the tiles cover
  int vec;             // access width in bytes
  // Set by plan_compact_tiles:
  int width;           // chunks per tile row (stripe width)
  uint32_t width_magic;  // chunk l of a tile lies in its row l / width == (l * width_magic) >> 22
  int tile_rows;       // rows per tile
  int64_t row_chunks;  // chunks per row
  int64_t stripes;     // ceil(row_chunks / width)
  int64_t row_tiles;   // ceil(rows / tile_rows)
  int64_t first_tile;  // id of the tensor's first tile (in place: of its group's first tile)
};

struct CompactParams {
  CompactTensor t[kMaxCompactTensors];
  int num_tensors;
  bool per_head;           // indices [B, H, C] (else [B, C])
  bool zero_tail;          // out-of-place: write zeros to rows [count, rows)
  IndexArray indices;      // last dim contiguous
  int64_t idx_sb, idx_sh;  // element strides
  IndexArray counts;
  int64_t cnt_sb, cnt_sh;
  int64_t N;          // source rows
  int64_t max_count;  // counts are clamped into [0, max_count]
  int64_t total_tiles;
  int64_t B;
  int64_t idx_H;      // heads of per-head indices, else 1: index row r = b * idx_H + h
  // In place (plan_compact_inplace): tensor i's group starts at tensor group[i]; group_size
  // (on a group's first tensor): its tensors.
  int group[kMaxCompactTensors];
  int group_size[kMaxCompactTensors];
  // On a group's first tensor: where its awaited-range table starts (entries, one per index
  // row and row tile) and its first pre-pass warp; prep_warps: the pre-pass warps in all.
  int64_t table_first[kMaxCompactTensors];
  int64_t prep_first[kMaxCompactTensors];
  int64_t table_entries;
  int64_t prep_warps;
};

// Cuts each tensor (row bytes in row_bytes[t], B * H segments of `rows` rows) into tiles,
// numbering them consecutively; sets total_tiles. In place, tiles are larger, and the rows
// are spread evenly over the row tiles (192 rows: 3 x 64 rather than 80 + 80 + 32).
inline void plan_compact_tiles(CompactParams& p, const int64_t* row_bytes, bool in_place) {
  using namespace compact_detail;
  const int chunks = in_place ? kMoveTileChunks : kTileChunks;
  int64_t next = 0;
  for (int i = 0; i < p.num_tensors; ++i) {
    CompactTensor& t = p.t[i];
    t.first_tile = next;
    t.row_chunks = row_bytes[i] / t.vec;
    t.stripes = t.row_chunks > 0 ? (t.row_chunks + chunks - 1) / chunks : 1;
    t.width = static_cast<int>(t.row_chunks > 0 ? (t.row_chunks + t.stripes - 1) / t.stripes : 1);
    t.tile_rows = chunks / t.width;
    if (in_place && t.rows > 0) {
      const int64_t n = (t.rows + t.tile_rows - 1) / t.tile_rows;
      t.tile_rows = static_cast<int>((t.rows + n - 1) / n);
    }
    t.width_magic = width_magic(t.width);
    t.row_tiles = t.row_chunks > 0 ? (t.rows + t.tile_rows - 1) / t.tile_rows : 0;
    p.group[i] = i;
    p.group_size[i] = 1;
    next += p.B * t.H * t.row_tiles * t.stripes;
  }
  p.total_tiles = next;
}

// Index rows: B * H per head, else B.
__host__ __device__ inline int64_t compact_index_rows(const CompactParams& p) { return p.B * p.idx_H; }

// In place: after plan_compact_tiles, groups consecutive tensors tiled alike (same heads, tile
// shape and tile counts) so that their tiles interleave round by round; every member of a
// group gets the group's first tile id. total_tiles is unchanged.
inline void plan_compact_inplace(CompactParams& p) {
  int64_t next = 0;
  for (int i = 0; i < p.num_tensors; ++i) {
    CompactTensor& t = p.t[i];
    const int lead = i > 0 ? p.group[i - 1] : 0;
    const CompactTensor& g = p.t[lead];
    if (i > 0 && t.H == g.H && t.width == g.width && t.tile_rows == g.tile_rows &&
        t.stripes == g.stripes && t.row_tiles == g.row_tiles) {
      p.group[i] = lead;
      p.group_size[i] = 1;
      p.group_size[lead] += 1;
      t.first_tile = g.first_tile;
    } else {
      p.group[i] = i;
      p.group_size[i] = 1;
      t.first_tile = next;
    }
    next += p.B * t.H * t.row_tiles * t.stripes;
  }
  // Awaited-range tables (compact_prepare): one per group, an entry per index row and row tile,
  // filled by warps of 32 row tiles (at least one warp per index row: it also finds P).
  const int64_t index_rows = compact_index_rows(p);
  p.table_entries = 0;
  p.prep_warps = 0;
  for (int i = 0; i < p.num_tensors; ++i) {
    if (p.group[i] != i) continue;
    p.table_first[i] = p.table_entries;
    p.prep_first[i] = p.prep_warps;
    p.table_entries += index_rows * p.t[i].row_tiles;
    p.prep_warps += index_rows * std::max<int64_t>((p.t[i].row_tiles + 31) / 32, 1);
  }
}

// In-place workspace: int64 words, all initialised by compact_prepare (allocate uninitialised).
struct CompactWorkspace {
  unsigned* ticket;     // next tile ticket
  int64_t* segments;    // [index rows][2]: first tiled row (start), clamped count
  int64_t* block_max;   // [prep_blocks]: most rows a segment of the prep block moves
  int2* table;          // [table_entries]: the earlier row tiles [x, y] that a row tile awaits
  unsigned* flags;      // [total_tiles]: the tile's reads are done
  int64_t prep_blocks;
};

// Blocks of compact_prepare: its warps, and enough threads to zero the flags fast.
inline int64_t compact_prep_blocks(const CompactParams& p) {
  using namespace compact_detail;
  const int64_t for_rows = (p.prep_warps + kWarps - 1) / kWarps;
  const int64_t for_flags = std::min<int64_t>((p.total_tiles + kThreads - 1) / kThreads, 512);
  return std::max<int64_t>(std::max(for_rows, for_flags), 1);
}

inline int64_t compact_inplace_workspace_words(const CompactParams& p) {
  return 1 + 2 * compact_index_rows(p) + compact_prep_blocks(p) + p.table_entries + (p.total_tiles + 1) / 2;
}

inline CompactWorkspace compact_inplace_workspace(const CompactParams& p, int64_t* words) {
  CompactWorkspace w;
  w.prep_blocks = compact_prep_blocks(p);
  w.ticket = reinterpret_cast<unsigned*>(words);
  w.segments = words + 1;
  w.block_max = w.segments + 2 * compact_index_rows(p);
  w.table = reinterpret_cast<int2*>(w.block_max + w.prep_blocks);
  w.flags = reinterpret_cast<unsigned*>(w.table + p.table_entries);
  return w;
}

namespace compact_detail {

struct Tile {
  int t;                 // tensor
  int64_t b, h;
  int64_t row_tile, stripe;
  int64_t round_stride;  // in place: ids between row tiles k and k + 1 of this (t, b, h, stripe)
};

// a / b, in 32 bits when both fit (the common case; 64-bit division is a long subroutine).
__device__ __forceinline__ int64_t div64(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// Out of place: tensor-major, segment, row tile, stripe.
__device__ __forceinline__ Tile decode_tile(const CompactParams& p, int64_t id) {
  Tile d;
  d.t = 0;
#pragma unroll
  for (int i = 1; i < kMaxCompactTensors; ++i) {
    if (i < p.num_tensors && id >= p.t[i].first_tile) d.t = i;  // empty tensors are skipped
  }
  const CompactTensor& x = p.t[d.t];
  const int64_t per_seg = x.row_tiles * x.stripes;
  const int64_t local = id - x.first_tile;
  const int64_t seg = div64(local, per_seg);
  const int64_t in_seg = local - seg * per_seg;
  d.row_tile = div64(in_seg, x.stripes);
  d.stripe = in_seg - d.row_tile * x.stripes;
  d.b = div64(seg, x.H);
  d.h = seg - d.b * x.H;
  d.round_stride = 0;
  return d;
}

// In place: the group whose range of first(i) (a per-group start: tile ids, pre-pass warps)
// holds v, as the index of its first tensor.
template <typename First>
__device__ __forceinline__ int group_holding(const CompactParams& p, int64_t v, First first) {
  int g = 0;
#pragma unroll
  for (int i = 1; i < kMaxCompactTensors; ++i) {
    if (i < p.num_tensors && p.group[i] == i && v >= first(i)) g = i;
  }
  return g;
}

// In place: group-major, then round (row tile), tensor of the group, segment, stripe.
__device__ __forceinline__ Tile decode_move_tile(const CompactParams& p, int64_t id) {
  const int g = group_holding(p, id, [&](int i) { return p.t[i].first_tile; });
  const CompactTensor& x = p.t[g];
  const int64_t cols = p.B * x.H * x.stripes;  // tiles of one tensor per round
  Tile d;
  d.round_stride = cols * p.group_size[g];
  const int64_t local = id - x.first_tile;
  d.row_tile = div64(local, d.round_stride);
  int64_t rest = local - d.row_tile * d.round_stride;
  const int64_t member = div64(rest, cols);
  rest -= member * cols;
  const int64_t seg = div64(rest, x.stripes);
  d.stripe = rest - seg * x.stripes;
  d.b = div64(seg, x.H);
  d.h = seg - d.b * x.H;
  d.t = g + static_cast<int>(member);
  return d;
}

__device__ __forceinline__ int64_t index_offset(const CompactParams& p, int64_t b, int64_t h) {
  return b * p.idx_sb + (p.per_head ? h * p.idx_sh : 0);
}

__device__ __forceinline__ int64_t segment_count(const CompactParams& p, int64_t b, int64_t h) {
  return clamp64(p.counts[b * p.cnt_sb + (p.per_head ? h * p.cnt_sh : 0)], 0, p.max_count);
}

// Loads that may see rows written by other blocks of the same launch (in place) must not use
// the read-only (non-coherent) path; out-of-place sources are read-only for the launch.
template <typename V, bool kReadOnly>
__device__ __forceinline__ V load(const char* ptr) {
  if constexpr (kReadOnly) {
    return __ldg(reinterpret_cast<const V*>(ptr));
  } else {
    return *reinterpret_cast<const V*>(ptr);
  }
}

__device__ __forceinline__ void release_flag(unsigned* flag) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(1u) : "memory");
}

__device__ __forceinline__ unsigned acquire_flag(const unsigned* flag) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
  return v;
}

// The number of k in [lo, hi) with key(k) < x, plus lo, found by one warp in 32-way steps, when
// key is nondecreasing in k. For any key the result lies in [lo, max(lo, hi)] and the loop ends
// (the interval shrinks every step), so bad input cannot make it read outside [lo, hi).
template <typename Key>
__device__ __forceinline__ int64_t warp_count_below(int64_t lo, int64_t hi, int64_t x, Key key, int lane) {
  while (true) {  // the answer lies in [lo, hi]
    const int64_t len = hi - lo;
    if (len <= 32) {
      const bool below = lane < len && key(lo + lane) < x;
      return lo + __popc(__ballot_sync(0xffffffffu, below));
    }
    const int64_t step = (len + 31) / 32;  // lane l tests the last position of bucket l
    const int64_t q = lo + (lane + 1) * step - 1;
    const bool below = q < hi && key(q) < x;
    const int m = __popc(__ballot_sync(0xffffffffu, below));  // buckets wholly below x
    hi = min(lo + (m + 1) * step - 1, hi);  // key(q_m) >= x (or q_m >= hi): answer <= q_m
    lo += m * step;
  }
}

// The identity prefix P of the index row at `off` (the leading rows k < count with idx[k] == k,
// which stay) for one warp, whose first round of loads does not depend on the count (the
// caller's load of it stays in flight beside them): the search runs over the row's capacity,
// rows >= count counting as moving, and that round also tests rows 0-31 directly, so that
// P < 32 (every keep pattern but a long identity prefix) costs one round trip. Any result lies
// in [0, count] (safe for bad indices).
__device__ __forceinline__ int64_t identity_prefix(const CompactParams& p, int64_t off, int64_t count, int lane) {
  const IndexArray idx = p.indices;
  const int64_t cap = p.max_count;  // idx[off + k] is in bounds for k < cap, whatever the count
  const int64_t step = (cap + 31) / 32;
  const int64_t q = (lane + 1) * step - 1;
  const int64_t near = lane < cap ? idx[off + lane] : -1;
  const int64_t far = q < cap ? idx[off + q] : -1;
  const unsigned moves = __ballot_sync(0xffffffffu, !(lane < count && near == lane));
  if (moves != 0u) return min(static_cast<int64_t>(__ffs(moves) - 1), count);
  // Rows 0-31 stay (so count > 31): go on from the 32-way round over [0, cap).
  const int m = __popc(__ballot_sync(0xffffffffu, q < count && far == q));
  const int64_t lo = max(m * step, int64_t{32});
  const int64_t hi = min((m + 1) * step - 1, count);
  auto moving = [&](int64_t k) { return idx[off + k] != k ? 1 : 0; };
  return min(warp_count_below(lo, max(lo, hi), 1, moving, lane), count);
}

__device__ __forceinline__ int64_t warp_max(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = max(v, static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, v, o)));
  return v;
}

// Calls f(std::integral_constant<int, vec>) for a tensor's access width.
template <typename F>
__device__ __forceinline__ void with_vec(int vec, F&& f) {
  switch (vec) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// ---- out of place -------------------------------------------------------------------------

// One tile: copy, zero-filling rows [count, rows) when asked. Every thread of the block calls
// it for the same tile.
template <int kVec>
__device__ __forceinline__ void copy_tile(const CompactParams& p, const CompactTensor& x, const Tile& d) {
  using V = typename Bytes<kVec>::type;
  const int64_t row0 = d.row_tile * x.tile_rows;
  const int64_t col0 = d.stripe * x.width;
  const int64_t cols = min(static_cast<int64_t>(x.width), x.row_chunks - col0);
  const int64_t idx_off = index_offset(p, d.b, d.h);
  const char* src = x.src + d.b * x.s_sb + d.h * x.s_sh + col0 * kVec;
  char* out = x.out + d.b * x.o_sb + d.h * x.o_sh + col0 * kVec;

  // Passes over the thread's kUnroll chunks, so that the count and index loads, then the data
  // loads, are in flight together (a consumer next to each load would serialise latencies).
  // Index entries below x.rows <= C are in bounds whatever the count, so they are loaded
  // before the count is known.
  int64_t row[kUnroll], src_row[kUnroll];
  int col[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int l = threadIdx.x + u * kThreads;
    const int r = tile_row(l, x.width_magic);
    col[u] = l - r * x.width;
    row[u] = r < x.tile_rows && col[u] < cols ? min(row0 + r, x.rows) : x.rows;  // x.rows: none
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    src_row[u] = row[u] < x.rows ? p.indices[idx_off + row[u]] : -1;
  }
  const int64_t count = segment_count(p, d.b, d.h);
  const int64_t end = p.zero_tail ? x.rows : count;
  const char* from[kUnroll];
  char* to[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = row[u];
    const int64_t c = static_cast<int64_t>(col[u]) * kVec;
    const int64_t s = clamp64(src_row[u], 0, p.N - 1);
    const bool copy = i < end && i < count;
    from[u] = copy ? src + s * x.s_sn + c : nullptr;
    to[u] = copy || i < end ? out + i * x.o_sn + c : nullptr;  // else zero fill
  }
  V v[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) v[u] = from[u] ? load<V, true>(from[u]) : V{};
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (to[u]) *reinterpret_cast<V*>(to[u]) = v[u];
  }
}

// Out of place: a grid-stride loop over the tiles (no dependencies between tiles).
__global__ void __launch_bounds__(kThreads) compact_gather(const CompactParams p) {
  for (int64_t id = blockIdx.x; id < p.total_tiles; id += gridDim.x) {
    const Tile d = decode_tile(p, id);
    const CompactTensor& x = p.t[d.t];
    switch (x.vec) {
      case 16: copy_tile<16>(p, x, d); break;
      case 8: copy_tile<8>(p, x, d); break;
      case 4: copy_tile<4>(p, x, d); break;
      case 2: copy_tile<2>(p, x, d); break;
      default: copy_tile<1>(p, x, d); break;
    }
  }
}

// ---- in place -----------------------------------------------------------------------------

// Pre-pass: zeroes the ticket and the flags. Each warp takes one index row r and 32 row tiles
// j of one group: it finds the row's identity prefix P (identity_prefix; any result in
// [0, count] is safe for bad indices), its start (P, or 0 below a tile) and clamped count, and
// fills the group's awaited-range entries from those row tiles' sources. Row tile j (rows
// [start + jR, ...), j < J) reads rows whose row tiles are [lo_j, hi_j], both nondecreasing in
// j for ascending indices, so row tile k awaits the j < k with hi_j >= k and lo_j <= k: the
// range [min{j : hi_j >= k}, max{j : lo_j <= k}], written by the j whose (hi_{j-1}, hi_j] and
// [lo_j, lo_{j+1}) hold k. Bad indices may leave entries stale: the move clamps them into
// [0, k - 1], so they can only order wrongly what is wrong anyway, never hang or read out of
// bounds. The first group's warp of row tiles 0-31 also stores (start, count) of its row; per
// block, the most rows a segment moves.
__global__ void __launch_bounds__(kThreads) compact_prepare(const CompactParams p, const CompactWorkspace w) {
  __shared__ int64_t s_max[kWarps];
  pdl_launch_dependents();  // compact_move may get resident now; it waits for this grid's writes
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.total_tiles; i += stride) {
    w.flags[i] = 0u;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *w.ticket = 0u;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  int64_t moves = 0;
  if (item < p.prep_warps) {  // warp-uniform
    const int g = group_holding(p, item, [&](int i) { return p.prep_first[i]; });
    const CompactTensor& x = p.t[g];
    const int64_t chunks = max((x.row_tiles + 31) / 32, int64_t{1});
    const int64_t local = item - p.prep_first[g];
    const int64_t r = div64(local, chunks);
    const int64_t c = local - r * chunks;
    const int64_t b = r / p.idx_H, h = r - b * p.idx_H;
    const int64_t off = index_offset(p, b, h);
    const int64_t count = segment_count(p, b, h);
    const IndexArray idx = p.indices;
    const int64_t R = x.tile_rows;
    const int64_t j = c * 32 + lane;
    // The sources at row tile j's edges, for tiles from row 0: loaded beside identity_prefix's
    // first round, so that a row with P < R (tiles then start at row 0) needs one round trip.
    int64_t edge[4];  // rows first - 1, first, first + R - 1, first + R
    auto load_edges = [&](int64_t first) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = first + (e < 2 ? e - 1 : R + e - 3);
        edge[e] = i >= 0 && i < p.max_count ? idx[off + i] : 0;  // in bounds whatever the count
      }
    };
    load_edges(j * R);
    const int64_t prefix = identity_prefix(p, off, count, lane);
    // Tiles start at P only past a prefix of a tile or more (decode: a short tail behind a long
    // prefix stays one round); the identity rows [start, P) of tile 0 are skipped by the move.
    const int64_t start = prefix < R ? 0 : prefix;
    if (start != 0) load_edges(start + j * R);  // warp-uniform
    if (g == 0 && c == 0) {
      if (lane == 0) {
        w.segments[2 * r] = start;
        w.segments[2 * r + 1] = count;
      }
      moves = count - start;
    }
    const int64_t J = (count - start + R - 1) / R;  // row tiles with rows to move (<= row_tiles)
    if (j < J) {
      auto tile_of = [&](int64_t src) { return min(div64(clamp64(src, start, p.N - 1) - start, R), J - 1); };
      const int64_t lo = tile_of(edge[1]);
      // The last row tile reads at or past itself (src(i) >= i): hi = J - 1, without the
      // source of row count - 1 (which would wait for the count).
      const int64_t hi = j + 1 < J ? tile_of(edge[2]) : J - 1;
      const int64_t hi_prev = j > 0 ? tile_of(edge[0]) : -1;  // row tile j - 1 is full
      const int64_t lo_next = j + 1 < J ? tile_of(edge[3]) : J;
      int2* e = w.table + p.table_first[g] + r * x.row_tiles;
      for (int64_t k = hi_prev + 1; k <= hi; ++k) e[k].x = static_cast<int>(j);
      for (int64_t k = lo; k < lo_next; ++k) e[k].y = static_cast<int>(j);
      if (j == 0) {
        for (int64_t k = 0; k < lo; ++k) e[k].y = -1;  // no reader
      }
    }
  }
  moves = warp_max(moves);
  if (lane == 0) s_max[warp] = moves;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i) moves = max(moves, s_max[i]);
    w.block_max[blockIdx.x] = moves;
  }
}

// A tile whose loads are in flight, block-uniform part (in shared memory, written by thread 0;
// each thread keeps only a mask of its chunks that move): enough to store it later.
struct TileMeta {
  char* out;       // row 0, first column of the tile's stripe
  int64_t row0;    // first destination row
  int64_t o_sn;    // row stride in bytes
  int64_t id, row_tile, round_stride;
  int width, vec;
  uint32_t width_magic;
};

// Issues the loads of tile d (id) into buf (chunk l of the tile at byte l * vec, a slot of the
// thread that stores it) and returns the mask of this thread's chunks that move; thread 0
// fills `meta` and s_wait, the row tiles [a, b] to await from the pre-pass's table (read only
// when some chunk moves and row_tile > 0).
template <int kVec>
__device__ __forceinline__ unsigned load_tile(const CompactParams& p, const CompactWorkspace& w, const Tile& d,
                                              int64_t id, char* buf, int64_t* s_wait, TileMeta* meta) {
  using V = typename Bytes<kVec>::type;
  const CompactTensor& x = p.t[d.t];
  const int64_t seg_row = d.b * p.idx_H + (p.per_head ? d.h : 0);
  const int64_t start = __ldg(w.segments + 2 * seg_row);  // written by compact_prepare
  const int64_t count = __ldg(w.segments + 2 * seg_row + 1);
  // Row tile 0 awaits nothing; written by compact_prepare, as are the segments.
  int2 await = make_int2(0, -1);
  if (threadIdx.x == 0 && d.row_tile > 0) {
    await = __ldg(w.table + p.table_first[p.group[d.t]] + seg_row * x.row_tiles + d.row_tile);
  }
  const int64_t R = x.tile_rows;
  const int64_t row0 = start + d.row_tile * R;
  const int64_t col0 = d.stripe * x.width;
  const int64_t cols = min(static_cast<int64_t>(x.width), x.row_chunks - col0);
  const int64_t idx_off = index_offset(p, d.b, d.h);
  const IndexArray idx = p.indices;
  const char* src = x.src + d.b * x.s_sb + d.h * x.s_sh + col0 * kVec;
  char* out = x.out + d.b * x.o_sb + d.h * x.o_sh + col0 * kVec;

  // Tile-local row and column of each chunk (-1: none); all index loads, then all data loads.
  int r[kMoveUnroll], col[kMoveUnroll];
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) {
    const int l = threadIdx.x + u * kThreads;
    r[u] = tile_row(l, x.width_magic);
    col[u] = l - r[u] * x.width;
    if (r[u] >= R || col[u] >= cols || row0 + r[u] >= count) r[u] = -1;
  }
  int64_t src_row[kMoveUnroll];
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) src_row[u] = r[u] >= 0 ? idx[idx_off + row0 + r[u]] : -1;
  unsigned mask = 0;
  V v[kMoveUnroll];  // narrow rows only: plain loads (all in flight together), then shared stores
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) {
    const int64_t s = clamp64(src_row[u], 0, p.N - 1);
    const bool move = r[u] >= 0 && s != row0 + r[u];  // rows with src(i) == i stay
    const char* from = src + s * x.s_sn + static_cast<int64_t>(col[u]) * kVec;
    mask |= move ? 1u << u : 0u;
    if constexpr (kVec == 16) {
      if (move) cp_async16(buf + (threadIdx.x + u * kThreads) * kVec, from);
    } else {
      v[u] = move ? load<V, false>(from) : V{};
    }
  }
  if constexpr (kVec != 16) {
#pragma unroll
    for (int u = 0; u < kMoveUnroll; ++u) {
      if (mask & (1u << u)) *reinterpret_cast<V*>(buf + (threadIdx.x + u * kThreads) * kVec) = v[u];
    }
  }
  if (threadIdx.x == 0) {
    *meta = TileMeta{out, row0, x.o_sn, id, d.row_tile, d.round_stride, x.width, kVec, x.width_magic};
    s_wait[0] = max(await.x, 0);  // clamped: stale entries (bad indices) stay below this tile
    s_wait[1] = min(static_cast<int64_t>(await.y), d.row_tile - 1);
  }
  return mask;
}

// Stores this thread's moving chunks (mask) of a tile from buf.
template <int kVec>
__device__ __forceinline__ void store_tile(const TileMeta& m, unsigned mask, const char* buf) {
  using V = typename Bytes<kVec>::type;
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) {
    if (mask & (1u << u)) {
      const int l = threadIdx.x + u * kThreads;
      const int r = tile_row(l, m.width_magic);
      const int64_t c = static_cast<int64_t>(l - r * m.width) * kVec;
      *reinterpret_cast<V*>(m.out + (m.row0 + r) * m.o_sn + c) = *reinterpret_cast<const V*>(buf + l * kVec);
    }
  }
}

// The L2 prefetch of the source of row i of tile d's segment, if the row moves.
__device__ __forceinline__ void prefetch_row(const CompactParams& p, const Tile& d, int64_t i) {
  const CompactTensor& x = p.t[d.t];
  const int64_t off = index_offset(p, d.b, d.h);
  const int64_t s = i < p.max_count ? p.indices[off + i] : -1;  // in bounds before the count is known
  const int64_t count = segment_count(p, d.b, d.h);
  if (i < count && s != i && s >= 0 && s < p.N) {
    const int64_t col0 = d.stripe * x.width;
    const int64_t bytes = min(static_cast<int64_t>(x.width), x.row_chunks - col0) * x.vec;
    const char* src = x.src + d.b * x.s_sb + d.h * x.s_sh + s * x.s_sn + col0 * x.vec;
    // Per 128-byte line through the LSU (bulk prefetches of every row issued slowly).
    for (int64_t o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(src + o));
  }
}

// While the pre-pass runs (the move is its programmatic dependent), warms L2 with the sources
// of the block's likely first tiles: tickets 2 * blockIdx.x and + 1, read as tiles of the first
// group that start at row 0 (as they do unless a segment's identity prefix is a tile or more).
// A hint only, whatever the guess: the first wave's DRAM reads overlap the pre-pass (measured:
// +1-4 points of copy at keep 25%; prefetching a second wave too lost 2-3 points). Only rows
// that move are fetched, so a decode-style identity prefix costs nothing.
__device__ __forceinline__ void prefetch_first_tiles(const CompactParams& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int64_t id0 = 2 * static_cast<int64_t>(blockIdx.x);
  if (id0 >= p.total_tiles) return;
  const Tile d0 = decode_move_tile(p, id0);
  const bool two = id0 + 1 < p.total_tiles;
  const Tile d1 = decode_move_tile(p, two ? id0 + 1 : id0);
  const int rows0 = p.t[d0.t].tile_rows, rows1 = two ? p.t[d1.t].tile_rows : 0;
  // One row per thread over both tiles, so that all index loads are in flight together.
  for (int e = threadIdx.x; e < rows0 + rows1; e += kThreads) {
    if (e < rows0) {
      prefetch_row(p, d0, d0.row_tile * rows0 + e);
    } else {
      prefetch_row(p, d1, d1.row_tile * rows1 + e - rows0);
    }
  }
#endif
}

// In place: tiles in ticket order, two in flight per block (module comment). The tickets count
// only the tiles of rounds that some segment needs: the rounds of a group beyond the longest
// move (block_max) are skipped.
__global__ void __launch_bounds__(kThreads, 4) compact_move(const CompactParams p, const CompactWorkspace w) {
  __shared__ alignas(16) char s_buf[2][kMoveTileChunks * 16];
  __shared__ int64_t s_id[2];
  __shared__ unsigned s_ticket;  // the block's second ticket, for kTicketThread
  __shared__ int64_t s_wait[2][2];
  __shared__ TileMeta s_meta[2];
  __shared__ int64_t s_tiles[kMaxCompactTensors];  // tiles handed out per group
  __shared__ int64_t s_max[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  prefetch_first_tiles(p);
  pdl_wait();  // launched as a dependent of compact_prepare: its workspace is ready
  // Thread 0 takes the block's first two tickets before the round count is known (a ticket v
  // maps to the v-th tile of the rounds with work), so that the atomic's round trip overlaps
  // the block_max loads. From then on kTicketThread takes the ticket of the tile after next
  // one iteration early, so that the atomic's round trip overlaps the current tile instead of
  // adding to its chain; not in warp 0, which awaits flags. A block then holds three tiles
  // (current, next, ticket), all above the ones it awaits, so it still waits only for ids below
  // its current one: no deadlock (module comment).
  constexpr int kTicketThread = 32;
  const unsigned first = threadIdx.x == 0 ? atomicAdd(w.ticket, 2u) : 0u;
  int64_t most = 0;
  for (int64_t i = threadIdx.x; i < w.prep_blocks; i += kThreads) most = max(most, __ldg(w.block_max + i));
  most = warp_max(most);
  if (lane == 0) s_max[warp] = most;
  __syncthreads();
  auto tile_of_ticket = [&](int64_t v) -> int64_t {
    for (int g = 0; g < p.num_tensors; ++g) {
      if (p.group[g] != g) continue;
      if (v < s_tiles[g]) return p.t[g].first_tile + v;
      v -= s_tiles[g];
    }
    return -1;  // none left
  };
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i) most = max(most, s_max[i]);
    for (int g = 0; g < p.num_tensors; ++g) {
      const CompactTensor& x = p.t[g];
      const int64_t rounds = min(x.row_tiles, (most + x.tile_rows - 1) / x.tile_rows);
      s_tiles[g] = p.group[g] == g ? rounds * p.B * x.H * x.stripes * p.group_size[g] : 0;
    }
    s_id[0] = tile_of_ticket(first);
    s_ticket = first + 1;
  }
  __syncthreads();
  unsigned pending = threadIdx.x == kTicketThread ? s_ticket : 0u;

  auto load = [&](int64_t id, int s) {
    const Tile d = decode_move_tile(p, id);
    unsigned mask = 0;
    with_vec(p.t[d.t].vec, [&](auto vec) {
      mask = load_tile<decltype(vec)::value>(p, w, d, id, s_buf[s], s_wait[s], &s_meta[s]);
    });
    return mask;
  };
  // Warp 0: whether every awaited flag of the tile in stage st is set (spin: until it is).
  auto awaited = [&](int st, bool spin) {
    const TileMeta& m = s_meta[st];
    bool done = true;
    if (m.row_tile > 0) {
      const int64_t first = m.id - m.row_tile * m.round_stride;  // row tile 0 of the column
      for (int64_t k = s_wait[st][0] + lane; k <= s_wait[st][1]; k += 32) {
        const unsigned* f = w.flags + first + k * m.round_stride;
        if (spin) {
          while (acquire_flag(f) == 0u) __nanosleep(64);
        } else if (acquire_flag(f) == 0u) {
          done = false;
        }
      }
    }
    return __all_sync(0xffffffffu, done);
  };
  // Thread 0, after a barrier that follows all loads of the tile: the barrier orders every
  // thread's reads before the release (CUTLASS's grid-barrier pattern). A fence.sc before it,
  // and another after the awaited acquires, cost 7-10 points of copy bandwidth (measured).
  auto publish = [&](int st) {
    release_flag(w.flags + s_meta[st].id);
  };

  int s = 0;
  if (s_id[0] < 0) return;  // uniform
  unsigned cur = load(s_id[0], 0);  // this thread's moving chunks of the current tile
  cp_async_commit();
  bool published = false;  // the current tile's flag is already set (uniform)
  while (true) {
    // s_id[s ^ 1] was last read before the previous iteration's barriers.
    if (threadIdx.x == kTicketThread) s_id[s ^ 1] = tile_of_ticket(pending);
    __syncthreads();
    if (threadIdx.x == kTicketThread && s_id[s ^ 1] >= 0) pending = atomicAdd(w.ticket, 1u);
    const int64_t next_id = s_id[s ^ 1];
    const unsigned next = next_id >= 0 ? load(next_id, s ^ 1) : 0u;
    cp_async_commit();  // possibly empty: the group of `cur` is then never the newest
    cp_async_wait<1>();  // this thread's loads of `cur` have landed
    const bool any = __syncthreads_or(cur != 0u);  // every load of `cur` has returned
    if (threadIdx.x == 0 && !published) publish(s);  // this tile's reads are done
    published = false;
    if (any) {  // uniform
      const bool ready = __syncthreads_and(warp != 0 || awaited(s, false));
      if (!ready) {
        // Some awaited tile is still reading. Finish and publish the next tile's loads first,
        // so that no tile's flag ever waits for another flag, then spin.
        cp_async_wait<0>();  // every group is committed
        __syncthreads();
        if (threadIdx.x == 0 && next_id >= 0) publish(s ^ 1);
        published = true;
        if (warp == 0) awaited(s, true);
        __syncthreads();  // the awaited readers are done before any store below
      }
      const TileMeta& m = s_meta[s];
      with_vec(m.vec, [&](auto vec) { store_tile<decltype(vec)::value>(m, cur, s_buf[s]); });
    }
    if (next_id < 0) return;  // uniform
    cur = next;
    s ^= 1;
  }
}

// Blocks that fit on the current device at once: the grid of the persistent loops.
template <bool kInPlace>
inline cudaError_t resident_blocks(int& blocks) {
  if constexpr (kInPlace) {
    static ResidentBlocks resident;
    // 4 blocks x 42 KB of shared memory per SM: ask for the largest carveout (a hint; the
    // kernel reads around L1 anyway), so that the driver does not pick a smaller one.
    auto hint = [] {
      if (cudaFuncSetAttribute(compact_move, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared) != cudaSuccess) {
        cudaGetLastError();  // only a hint: clear its error, so that no launch check reports it
      }
      return cudaSuccess;
    };
    return resident.get(reinterpret_cast<const void*>(compact_move), kThreads, 0, hint, blocks);
  } else {
    static ResidentBlocks resident;
    return resident.get(reinterpret_cast<const void*>(compact_gather), kThreads, 0, [] { return cudaSuccess; },
                        blocks);
  }
}

}  // namespace compact_detail

// Out of place (p.t[i].src and .out distinct, not overlapping).
inline cudaError_t launch_compact(const CompactParams& p, cudaStream_t stream) {
  using namespace compact_detail;
  if (p.total_tiles == 0) return cudaSuccess;
  int resident = 0;
  if (cudaError_t err = resident_blocks<false>(resident); err != cudaSuccess) return err;
  const int64_t grid = min(p.total_tiles, static_cast<int64_t>(resident));
  compact_gather<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// In place (p.t[i].src == .out, same strides; plan_compact_inplace applied); `words`: an
// uninitialised buffer of compact_inplace_workspace_words(p) int64 words.
inline cudaError_t launch_compact_inplace(const CompactParams& p, int64_t* words, cudaStream_t stream) {
  using namespace compact_detail;
  if (p.total_tiles == 0) return cudaSuccess;
  const CompactWorkspace w = compact_inplace_workspace(p, words);
  compact_prepare<<<static_cast<unsigned>(w.prep_blocks), kThreads, 0, stream>>>(p, w);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  int resident = 0;
  err = resident_blocks<true>(resident);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(min(p.total_tiles, static_cast<int64_t>(resident))));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  // Programmatic dependent launch (compute capability 9.0+): the move's blocks get resident
  // while the pre-pass runs, and wait for its writes in pdl_wait.
  const int major = current_device_attribute(cudaDevAttrComputeCapabilityMajor);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = major >= 9 ? 1 : 0;
  err = cudaLaunchKernelEx(&cfg, compact_move, p, w);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

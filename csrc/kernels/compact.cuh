// Compaction (gather of kept token rows) on CUDA: out-of-place (compact, compact_out) and in
// place (compact_), all tensors of a call in one launch. docs/perf/compact.md has the design.
//
// Tiling. A row of tensor t is `row_chunks` chunks of `vec` bytes, vec the widest access
// (16, 8, 4, 2 or 1 bytes) that the row size and every row address allow: 16 for any
// aligned f32/f16/bf16 cache with D % 8 == 0. Each (tensor, b, h) segment is cut into tiles
// of `tile_rows` destination rows by one stripe of `width` chunk columns (a whole row unless a
// row exceeds kTileChunks chunks), at most kTileChunks chunks per tile. A block of kThreads
// threads takes one tile at a time; thread x owns chunks x + u * kThreads (u < kUnroll) and
// issues all of its index loads, then all of its data loads, then all of its stores, so each
// thread has kUnroll independent 16-byte loads in flight. Tile ids run tensor-major, then
// segment, then row tile, then stripe; offsets and row numbers are 64-bit throughout.
//
// In place (kInPlace). Row i of a segment takes row src(i) = indices[i] with indices strictly
// ascending, so src(i) >= i: a tile with destination rows [S, E) reads only rows >= S of its
// stripe, and a later tile of the stripe never reads a row that an earlier one writes. The
// only hazard is an EARLIER tile k reading a row of [S, E) that this tile overwrites
// (write-after-read). So every tile (1) loads all its source chunks into registers and
// consumes them (every load has returned), (2) passes a block barrier and publishes a "read
// done" flag (fence + release store, the pattern of a cooperative grid barrier), (3) waits for
// the flags of the earlier tiles of its stripe whose source rows can lie in [S, E), (4) passes
// a barrier and stores. Rows with src(i) == i are neither read nor written (decode moves only
// the tail). Tiles take ids from an atomic ticket in the order they start and publish before
// they wait, so every awaited tile is running or done: no deadlock, even with bad indices (a
// tile only ever waits for lower ids of its own stripe). The earlier tiles that can read
// [S, E) form a range [a, b] of row tiles that two warps find by 32-way searches of the
// ascending index row while the loads are in flight (typically one or two tiles).
#pragma once

#include "common.cuh"

namespace pyramid_kv::kernels {

constexpr int kMaxCompactTensors = 8;

namespace compact_detail {
constexpr int kThreads = 256;
constexpr int kUnroll = 4;                       // chunks in flight per thread
constexpr int kTileChunks = kThreads * kUnroll;  // 16 KB tiles at 16-byte chunks
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
  int tile_rows;       // rows per tile
  int64_t row_chunks;  // chunks per row
  int64_t stripes;     // ceil(row_chunks / width)
  int64_t row_tiles;   // ceil(rows / tile_rows)
  int64_t first_tile;  // id of the tensor's first tile
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
};

// Cuts each tensor (row bytes in row_bytes[t], B * H segments of `rows` rows) into tiles,
// numbering them consecutively; sets total_tiles.
inline void plan_compact_tiles(CompactParams& p, int64_t B, const int64_t* row_bytes) {
  using namespace compact_detail;
  int64_t next = 0;
  for (int i = 0; i < p.num_tensors; ++i) {
    CompactTensor& t = p.t[i];
    t.first_tile = next;
    t.row_chunks = row_bytes[i] / t.vec;
    t.stripes = t.row_chunks > 0 ? (t.row_chunks + kTileChunks - 1) / kTileChunks : 1;
    t.width = static_cast<int>(t.row_chunks > 0 ? (t.row_chunks + t.stripes - 1) / t.stripes : 1);
    t.tile_rows = kTileChunks / t.width;
    t.row_tiles = t.row_chunks > 0 ? (t.rows + t.tile_rows - 1) / t.tile_rows : 0;
    next += B * t.H * t.row_tiles * t.stripes;
  }
  p.total_tiles = next;
}

namespace compact_detail {

struct Tile {
  int t;                 // tensor
  int64_t b, h;
  int64_t row_tile, stripe;
  int64_t seg_first;     // id of the segment's first tile
};

// a / b, in 32 bits when both fit (the common case; 64-bit division is a long subroutine).
__device__ __forceinline__ int64_t div64(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

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
  d.seg_first = x.first_tile + seg * per_seg;
  return d;
}

__device__ __forceinline__ int64_t index_offset(const CompactParams& p, const Tile& d) {
  return d.b * p.idx_sb + (p.per_head ? d.h * p.idx_sh : 0);
}

__device__ __forceinline__ int64_t segment_count(const CompactParams& p, const Tile& d) {
  return clamp64(p.counts[d.b * p.cnt_sb + (p.per_head ? d.h * p.cnt_sh : 0)], 0, p.max_count);
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

// The number of k in [0, n) with key(k) < x, found by one warp in 32-way steps, when key is
// nondecreasing in k. For any key the result lies in [0, n] and the loop ends (the interval
// shrinks every step), so bad input cannot make it read outside [0, n).
template <typename Key>
__device__ __forceinline__ int64_t warp_count_below(int64_t n, int64_t x, Key key, int lane) {
  int64_t lo = 0, hi = n;  // the answer lies in [lo, hi]
  while (true) {
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

// XOR of a loaded value's words: consuming it makes the thread wait for the load's data.
template <typename V>
__device__ __forceinline__ unsigned fold(V v) {
  if constexpr (sizeof(V) == 16) {
    return v.x ^ v.y ^ v.z ^ v.w;
  } else if constexpr (sizeof(V) == 8) {
    return v.x ^ v.y;
  } else {
    return static_cast<unsigned>(v);
  }
}

// One tile: copy (out of place, zero-filling rows [count, rows) when asked) or move (in place,
// with the read-done protocol above). Every thread of the block calls it for the same tile.
// s_sink and s_wait (in place only): shared scratch.
template <int kVec, bool kInPlace>
__device__ __forceinline__ void copy_tile(const CompactParams& p, const CompactTensor& x,
                                          const Tile& d, int64_t id, unsigned* flags,
                                          volatile unsigned* s_sink, int64_t* s_wait) {
  using V = typename Bytes<kVec>::type;
  const int64_t row0 = d.row_tile * x.tile_rows;
  const int64_t col0 = d.stripe * x.width;
  const int64_t cols = min(static_cast<int64_t>(x.width), x.row_chunks - col0);
  const int64_t idx_off = index_offset(p, d);
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
    const int r = l / x.width;
    col[u] = l - r * x.width;
    row[u] = r < x.tile_rows && col[u] < cols ? min(row0 + r, x.rows) : x.rows;  // x.rows: none
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    src_row[u] = row[u] < x.rows ? p.indices[idx_off + row[u]] : -1;
  }
  const int64_t count = segment_count(p, d);
  // In place, a tile past the count has nothing to move. It is never awaited with consistent
  // inputs, but publishes anyway so that no input can leave a waiter spinning. (The barrier
  // makes the decision uniform even if the count could change under us; it costs no latency,
  // the data loads need the index loads anyway.)
  if (kInPlace && __syncthreads_and(row0 >= count)) {
    if (threadIdx.x == 0) release_flag(flags + id);
    return;
  }
  const int64_t end = kInPlace ? min(row0 + x.tile_rows, count) : (p.zero_tail ? x.rows : count);
  const char* from[kUnroll];
  char* to[kUnroll];
  bool moving = false;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = row[u];
    const int64_t c = static_cast<int64_t>(col[u]) * kVec;
    const int64_t s = clamp64(src_row[u], 0, p.N - 1);
    const bool copy = i < end && i < count && !(kInPlace && s == i);  // in place: s == i stays
    from[u] = copy ? src + s * x.s_sn + c : nullptr;
    to[u] = copy || (!kInPlace && i < end) ? out + i * x.o_sn + c : nullptr;  // else zero fill
    moving |= copy;
  }
  V v[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) v[u] = from[u] ? load<V, !kInPlace>(from[u]) : V{};

  if constexpr (kInPlace) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t rt = d.row_tile;
    if (warp < 2 && rt > 0) {
      // Earlier row tiles k < rt (rows [k R, k R + R), all < row0 < count) that may read
      // [row0, end): those whose last source reaches row0 and whose first source is below end.
      const IndexArray idx = p.indices;
      const int64_t R = x.tile_rows;
      int64_t bound;
      if (warp == 0) {
        bound = warp_count_below(rt, row0, [&](int64_t k) { return idx[idx_off + k * R + R - 1]; }, lane);
      } else {
        bound = warp_count_below(rt, end, [&](int64_t k) { return idx[idx_off + k * R]; }, lane) - 1;
      }
      if (lane == 0) s_wait[warp] = bound;  // the awaited row tiles are [s_wait[0], s_wait[1]]
    }
    // Consume the loaded data, so that every load of the tile has returned before barrier 1
    // (the flag then orders nothing still in flight; the memory model asks only for the
    // barrier and the release, as in a cooperative grid barrier).
    unsigned folded = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) folded ^= fold(v[u]);
    s_sink[threadIdx.x] = folded;
    const bool any_moving = __syncthreads_or(moving);  // barrier 1
    if (threadIdx.x == 0) {
      __threadfence();
      release_flag(flags + id);  // this tile's reads are done
    }
    if (!any_moving) return;  // nothing to write (uniform), so nothing to wait for
    if (warp == 0 && rt > 0) {
      for (int64_t k = s_wait[0] + lane; k <= s_wait[1]; k += 32) {
        const unsigned* f = flags + d.seg_first + k * x.stripes + d.stripe;
        while (acquire_flag(f) == 0u) __nanosleep(64);
      }
      __threadfence();
    }
    __syncthreads();  // barrier 2: the awaited readers are done before any store below
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (to[u]) *reinterpret_cast<V*>(to[u]) = v[u];
  }
}

template <bool kInPlace>
__device__ __forceinline__ void dispatch_tile(const CompactParams& p, const Tile& d, int64_t id,
                                              unsigned* flags, volatile unsigned* s_sink,
                                              int64_t* s_wait) {
  const CompactTensor& x = p.t[d.t];
  switch (x.vec) {
    case 16: copy_tile<16, kInPlace>(p, x, d, id, flags, s_sink, s_wait); break;
    case 8: copy_tile<8, kInPlace>(p, x, d, id, flags, s_sink, s_wait); break;
    case 4: copy_tile<4, kInPlace>(p, x, d, id, flags, s_sink, s_wait); break;
    case 2: copy_tile<2, kInPlace>(p, x, d, id, flags, s_sink, s_wait); break;
    default: copy_tile<1, kInPlace>(p, x, d, id, flags, s_sink, s_wait); break;
  }
}

// Out of place: a grid-stride loop over the tiles (no dependencies between tiles).
__global__ void __launch_bounds__(kThreads) compact_gather(const CompactParams p) {
  for (int64_t id = blockIdx.x; id < p.total_tiles; id += gridDim.x) {
    dispatch_tile<false>(p, decode_tile(p, id), id, nullptr, nullptr, nullptr);
  }
}

// In place: tiles in ticket order. workspace: [ticket, one flag per tile], zeroed per launch.
// Thread 0 takes the block's next ticket while the current tile runs, hiding the atomic's
// latency. Progress: the lowest unfinished ticket is held by a block that is running it (a
// prefetched ticket is always higher than its block's current one), and it waits only for
// lower, hence finished, tiles.
__global__ void __launch_bounds__(kThreads, 4) compact_move(const CompactParams p, unsigned* workspace) {
  __shared__ int64_t s_id;
  __shared__ int64_t s_wait[2];
  __shared__ unsigned s_sink[kThreads];
  unsigned* flags = workspace + 1;
  unsigned next = threadIdx.x == 0 ? atomicAdd(workspace, 1u) : 0u;
  while (true) {
    __syncthreads();  // the previous tile is done with s_id and s_wait
    if (threadIdx.x == 0) {
      s_id = next;
      next = atomicAdd(workspace, 1u);
    }
    __syncthreads();
    const int64_t id = s_id;
    if (id >= p.total_tiles) return;
    dispatch_tile<true>(p, decode_tile(p, id), id, flags, s_sink, s_wait);
  }
}

// Blocks that fit on the current device at once: the grid of the persistent loops.
template <bool kInPlace>
inline int64_t resident_blocks() {
  static const int per_sm = [] {
    int n = 0;
    if (kInPlace) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, compact_move, kThreads, 0);
    } else {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, compact_gather, kThreads, 0);
    }
    return n > 0 ? n : 1;
  }();
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return static_cast<int64_t>(sms > 0 ? sms : 1) * per_sm;
}

}  // namespace compact_detail

// Out of place (p.t[i].src and .out distinct, not overlapping).
inline cudaError_t launch_compact(const CompactParams& p, cudaStream_t stream) {
  using namespace compact_detail;
  if (p.total_tiles == 0) return cudaSuccess;
  const int64_t grid = min(p.total_tiles, resident_blocks<false>());
  compact_gather<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Words of zeroed workspace that launch_compact_inplace needs.
inline int64_t compact_inplace_workspace_words(const CompactParams& p) { return 1 + p.total_tiles; }

// In place (p.t[i].src == .out, same strides); workspace zeroed, compact_inplace_workspace_words.
inline cudaError_t launch_compact_inplace(const CompactParams& p, unsigned* workspace,
                                          cudaStream_t stream) {
  using namespace compact_detail;
  if (p.total_tiles == 0) return cudaSuccess;
  const int64_t grid = min(p.total_tiles, resident_blocks<true>());
  compact_move<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, workspace);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

// Segmented top-p / top-k selection (docs/ops.md): a sort-free radix select on order keys, then
// an order-preserving compaction of the kept positions. Costs and measurements: docs/perf/select.md.
//
// Segments of up to 1024 positions take one warp each (select_warp.cuh); longer ones one CTA,
// or a thread-block cluster of up to 8 CTAs for long segments (each CTA
// owns a slice of positions; histograms merge through distributed shared memory). Each CTA turns
// its slice into order keys once, in the same sweep that builds the first histogram, and keeps
// them in shared memory (forced positions as key 0, which no score maps to); slices too long for
// that re-read global memory in every pass instead.
//
// Radix passes use 256-bin histograms. A pass sweeps the keys, merges the histograms (one
// cluster barrier; each rank's bins are read once, coalesced), scans the bins from the top and
// picks the bin where the running weight crosses the target.
//  - top-p: exact integer masses. The first digit is the float exponent, so all elements of a
//    bin share it and a bin's mass is an exact integer sum of mantissas. To find the crossing bin
//    the bins are quantized to one fixed point, ceil(S * 2^k) with k relative to the top bin
//    (error < 2^-30 of the total); the target left inside the chosen bin becomes a mantissa sum,
//    and the passes below it (mantissa digits) work on exact sums. Exact and order-free: every
//    CTA of a cluster reaches the same cut, and the same input gives the same output every run.
//  - top-k (and the floor / cap of top-p): counts over 8-bit digits from the top of the key.
//  The last pass also counts, per rank, the candidates above the cut and at it: the tally that r
//  and the output offsets need, without another sweep.
//  One CTA: once a pass's chosen bin holds <= kFewKeys keys (usually after the second pass), a
//  sweep lists them and a warp finds the cut among them (finish_few) instead of the remaining
//  passes.
// Output, one CTA: each thread owns a run of <= 32 positions as bit masks; one block scan gives
// the slots, which are filled in shared memory, and the row leaves in 16-byte stores. Clusters
// (and long 16-bit slices): every warp owns a contiguous chunk, counts its kept positions, then
// writes them in order 32 positions a step with ballots; -1 padding with 16-byte stores.
#pragma once

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "select_warp.cuh"

namespace pyramid_kv::kernels {

// How a launch splits segments: `cluster` CTAs per segment, `slice` positions per CTA.
struct SelectLaunch {
  int cluster;  // 1..kSelectMaxCluster; > 1 launches thread-block clusters
  int slice;    // multiple of 16, cluster * slice >= N
};

constexpr int kSelectMaxCluster = 8;       // portable cluster size
constexpr int kSelectSliceElems = 32768;   // staged slice of the large configuration
constexpr int kSelectMaxSliceBytes = 192 * 1024;  // largest staged slice (keys) of a clustered CTA

namespace select_detail {

using u64 = unsigned long long;

// Order keys (unsigned comparison = score order; NaN as -inf, -0 as +0) and the float layout
// the top-p masses are read from. 16-bit scores get 16-bit keys (half the shared memory).
__device__ __forceinline__ uint32_t key16(uint32_t b, uint32_t inf) {
  if ((b & 0x7fffu) > inf) b = inf | 0x8000u;  // NaN -> -inf
  if (b == 0x8000u) b = 0;                      // -0 -> +0
  return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}
template <typename T> struct Keys;
template <> struct Keys<float> {
  using Stored = uint32_t;
  static constexpr int kBits = 32, kMant = 23, kExp = 8;
  __device__ static uint32_t key(float x) { return order_key(x); }
};
template <> struct Keys<__half> {
  using Stored = uint16_t;
  static constexpr int kBits = 16, kMant = 10, kExp = 5;
  __device__ static uint32_t key(__half x) { return key16(__half_as_ushort(x), 0x7c00u); }
};
template <> struct Keys<__nv_bfloat16> {
  using Stored = uint16_t;
  static constexpr int kBits = 16, kMant = 7, kExp = 8;
  __device__ static uint32_t key(__nv_bfloat16 x) { return key16(__bfloat16_as_ushort(x), 0x7f80u); }
};

// Distributed shared memory through 32-bit shared::cluster addresses (smem_addr: common.cuh).
__device__ __forceinline__ uint32_t map_rank(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
__device__ __forceinline__ uint32_t ld_cluster(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
// Release / acquire at cluster scope: the histograms written before are visible after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}
// Shared-memory atomics on 32-bit addresses, predicated instead of branched around.
__device__ __forceinline__ uint32_t atom_add_if(bool pred, uint32_t addr, uint32_t v) {
  uint32_t old = 0;  // stays 0 when skipped: no carry follows
  asm volatile(
      "{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %2, 0;\n\t@q atom.shared.add.u32 %0, [%1], %3;\n\t}"
      : "+r"(old)
      : "r"(addr), "r"(static_cast<uint32_t>(pred)), "r"(v)
      : "memory");
  return old;
}
__device__ __forceinline__ void red_add_if(bool pred, uint32_t addr, uint32_t v) {
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %1, 0;\n\t@q red.shared.add.u32 [%0], %2;\n\t}"
               :
               : "r"(addr), "r"(static_cast<uint32_t>(pred)), "r"(v)
               : "memory");
}

// ceil(x * 2^s) for x < 2^63 (callers keep x << s in range; empty bins may pass any s).
__device__ __forceinline__ u64 shift_ceil(u64 x, int s) {
  if (x == 0) return 0;
  if (s >= 0) return x << s;
  if (s <= -64) return 1;
  return (x >> -s) + ((x & ((1ull << -s) - 1)) != 0 ? 1 : 0);
}

// One radix pass: a key takes part when (key & mhi) == pval; its digit is (key >> low) & dmask.
// `above` bounds every key with the prefix: the last pass counts the keys beyond it.
struct Pass {
  uint32_t mhi, pval, above, dmask;
  int low;
  bool last;
};

// The chosen bin of a pass: its index, the weight of the bins above it, its weight (quantized
// in the first top-p pass), its raw weight and its count of keys (~0u where not counted).
struct Pick {
  u64 above, h, raw;
  uint32_t d, cnt;
};

// A single CTA finishes the search in one step once the chosen bin holds at most this many keys
// (module comment).
constexpr int kFewKeys = 32;

// What the output needs: cut key t, ties at t to keep, and candidates above / at t in the ranks
// before this one.
struct Final {
  uint32_t t;
  int need_eq, gt_before, eq_before, gt_total;
};

template <typename T, int kThreads, bool kMulti, bool kStaged>
struct RadixSelect {
  using K = Keys<T>;
  using Stored = typename K::Stored;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kBins = 256;
  static constexpr int kBpt = kBins >= kThreads ? kBins / kThreads : 1;  // bins per scan thread
  static constexpr int kScanThreads = kBins / kBpt;
  static constexpr int kScanWarps = kScanThreads / 32;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(Stored));  // keys per 16-byte vector
  static constexpr int kUnroll = 4;  // 16-byte global loads in flight per thread while loading
  static constexpr uint32_t kSign = 1u << (K::kBits - 1);
  static constexpr uint32_t kFrac = (1u << K::kMant) - 1;
  static constexpr uint32_t kExpField = ((1u << K::kExp) - 1) << K::kMant;
  static constexpr uint32_t kExpTop = (1u << K::kExp) - 1;  // inf (NaN became -inf)
  static constexpr uint32_t kImp = 1u << K::kMant;
  // Histogram buffer (u32 words): mass low words, mass high words, counts, the above-count.
  static constexpr int kLo = 0, kHi = kBins, kCnt = 2 * kBins, kAbove = 3 * kBins;
  static constexpr int kHistWords = 3 * kBins + 4;
  // Clustered: double-buffered (the next pass may start while other ranks still read this one).
  // Single CTA: one buffer, cleared by the threads that read it.
  static constexpr int kBuffers = kMulti ? 2 : 1;
  static constexpr size_t kHistBytes = static_cast<size_t>(kBuffers) * kHistWords * 4;
  static_assert(kThreads % 32 == 0 && kScanThreads <= kThreads && kScanWarps >= 1, "bad config");

  // The keys of a chosen bin with at most kFewKeys keys, and the keys above its prefix; one per
  // search (a top-p search may be followed by a top-k one), zeroed by load().
  struct Few {
    uint32_t n, above;
    uint32_t keys[kFewKeys];
  };
  struct Shared {
    u64 wsum[kScanWarps];
    uint32_t kmax;  // single CTA, top-p: the largest key (its exponent bounds the masses)
    uint32_t red[kWarps][2];
    uint32_t wcnt[kWarps][2];
    uint32_t eq_before;
    Pick pick;
    Few few[2];
  };

  static size_t smem_bytes(const SelectLaunch& L) {
    return kHistBytes + (kStaged ? static_cast<size_t>(L.slice) * sizeof(Stored) : 0);
  }

  const SelectParams& p;
  Shared& sh;
  int seg, rank, ranks, tid, lane, warp;
  int len, n_sink, rstart, forced, n_cand;  // segment geometry (uniform over the cluster)
  int lo, hi;                               // this CTA's positions [lo, hi)
  int c_lo, c_hi;                           // its candidates [c_lo, c_hi) (may be empty)
  int slice;                                // positions per CTA
  int64_t len_raw;                          // lengths[seg], read in the constructor
  double top_p_raw;                         // the segment's p (top-p) or k (top-k), likewise
  int64_t top_k_raw;
  int pass = 0;                             // sweeps so far: picks the histogram buffer
  int few_used = 0;                         // entries of sh.few used

  __device__ static unsigned char* dyn() {
    extern __shared__ __align__(16) unsigned char select_dyn_smem[];
    return select_dyn_smem;
  }
  __device__ static uint32_t* hist(int b) { return reinterpret_cast<uint32_t*>(dyn()) + b * kHistWords; }
  __device__ static Stored* stage() { return reinterpret_cast<Stored*>(dyn() + kHistBytes); }
  __device__ const T* row() const {
    return static_cast<const T*>(p.scores) + static_cast<int64_t>(seg) * p.row_stride;
  }

  __device__ RadixSelect(const SelectParams& p_, const SelectLaunch& L, Shared& sh_) : p(p_), sh(sh_) {
    tid = threadIdx.x;
    lane = tid & 31;
    warp = tid >> 5;
    ranks = kMulti ? L.cluster : 1;
    seg = blockIdx.x / ranks;   // S * cluster < 2^31 (checked by the launcher)
    rank = blockIdx.x % ranks;  // == cluster block rank for 1-D clusters
    lo = rank * L.slice;  // < N + slice < 2^31 (checked by the launcher)
    slice = L.slice;
    // Issued here, consumed after the first scores are in flight (geometry()): the loads of the
    // scores do not wait for the length.
    len_raw = p.lengths[seg];
    load_budget(p, seg, top_p_raw, top_k_raw);
  }

  __device__ void geometry() {
    const SegmentGeometry g = segment_geometry(p, len_raw);
    len = g.len;
    n_sink = g.n_sink;
    rstart = g.rstart;
    forced = g.forced;
    n_cand = g.n_cand;
    hi = min(max(len - lo, 0), slice) + lo;
    c_lo = max(lo, n_sink);
    c_hi = min(hi, rstart);
  }

  // Forced positions / candidates before position x.
  __device__ int forced_before(int x) const { return min(x, n_sink) + max(min(x, len) - rstart, 0); }
  __device__ int cand_before(int x) const { return max(min(x, rstart) - n_sink, 0); }

  // Key of position i in [lo, hi): 0 for forced positions.
  __device__ __forceinline__ uint32_t key_at(int i) const {
    if constexpr (kStaged) {
      return stage()[i - lo];
    } else {
      return (i < n_sink || i >= rstart) ? 0u : K::key(row()[i]);
    }
  }
  __device__ static __forceinline__ void unpack(const uint4& raw, uint32_t (&k)[kVec]) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kVec == 4) {
        k[j] = w[j];
      } else {
        k[2 * j] = w[j] & 0xffffu;
        k[2 * j + 1] = w[j] >> 16;
      }
    }
  }
  __device__ static __forceinline__ uint4 pack(const uint32_t (&k)[kVec]) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = kVec == 4 ? k[j] : (k[2 * j] | (k[2 * j + 1] << 16));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }

  // ---- sweeps ----------------------------------------------------------------------------

  // Adds keys to histogram h: mass (64-bit mantissa sums in two words: the add that wraps the
  // low word carries into the high one; native 32-bit atomics) and / or counts; the last pass
  // also counts keys above the prefix. Dense (the first pass: nearly every key takes part):
  // predicated atomics, no branches. Sparse (later passes: few keys match): the work happens
  // only for matching keys, and a warp with none skips it.
  template <bool kMass, bool kCount, bool kLast, bool kDense, int kN>
  __device__ __forceinline__ void add(const uint32_t (&k)[kN], const Pass& s, uint32_t h,
                                      uint32_t& above) const {
    bool m[kN];
    bool any = false;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      m[j] = k[j] != 0 && (k[j] & s.mhi) == s.pval;
      any |= m[j];
      if constexpr (kLast) above += k[j] > s.above ? 1u : 0u;
    }
    auto one = [&](int j, bool pred) {
      const uint32_t d = (k[j] >> s.low) & s.dmask;
      if constexpr (kMass) {
        const uint32_t w = weight<true>(k[j]);
        const uint32_t old = atom_add_if(pred, h + 4 * (kLo + d), w);
        red_add_if(pred && old + w < old, h + 4 * (kHi + d), 1u);
      }
      if constexpr (kCount) red_add_if(pred, h + 4 * (kCnt + d), 1u);
    };
    if constexpr (kDense) {
#pragma unroll
      for (int j = 0; j < kN; ++j) one(j, m[j]);
    } else if (any) {
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        if (m[j]) one(j, true);
      }
    }
  }

  // The last pass also publishes how many keys lie above the prefix.
  template <bool kLast>
  __device__ void finish_sweep(uint32_t h, uint32_t above) {
    if constexpr (kLast) {
      above = __reduce_add_sync(0xffffffffu, above);
      red_add_if(lane == 0 && above != 0, h + 4 * kAbove, above);
    }
    ++pass;
  }

  // A later pass over the staged keys (or the row, unstaged).
  template <bool kMass, bool kLast>
  __device__ void sweep(const Pass& s) {
    constexpr bool kCount = kLast || !kMass || !kMulti;  // single CTA: counts for finish_few
    const uint32_t h = smem_addr(hist(kMulti ? (pass & 1) : 0));
    uint32_t above = 0;
    if constexpr (kStaged) {
      const uint4* st = reinterpret_cast<const uint4*>(stage());
      const int nv = (max(hi - lo, 0) + kVec - 1) / kVec;
#pragma unroll 2
      for (int v = tid; v < nv; v += kThreads) {
        uint32_t k[kVec];
        unpack(st[v], k);
        add<kMass, kCount, kLast, false>(k, s, h, above);
      }
    } else {
      const T* r = row();
      for (int i = c_lo + tid; i < c_hi; i += kThreads) {
        const uint32_t k[1] = {K::key(r[i])};
        add<kMass, kCount, kLast, false>(k, s, h, above);
      }
    }
    finish_sweep<kLast>(h, above);
  }

  // The first pass: top-p bins by the float exponent (positive keys; +0 adds nothing), top-k by
  // the top 8 bits of the key. Neither is a last pass.
  __device__ static Pass mass_first_pass() {
    return {kSign, kSign, 0xffffffffu, kExpTop, K::kMant, false};
  }
  // Pass below `prefix` (the bits of the key above `shift`), nb-bit digit.
  __device__ static Pass digit_pass(uint32_t prefix, int shift, int nb) {
    const uint32_t mhi = shift >= 32 ? 0u : (0xffffffffu << shift);
    const uint32_t pval = shift >= 32 ? 0u : (prefix << shift);
    return {mhi, pval, pval | ~mhi, (1u << nb) - 1, shift - nb, shift == nb};
  }

  // Zero the histograms, convert the slice to keys (staged: into shared memory) and sweep the
  // first pass over them in the same loop: the loads of a batch are all in flight before use.
  template <bool kMass>
  __device__ void load() {
    const T* r = row();
    const bool aligned = (reinterpret_cast<uintptr_t>(r + lo) & 15) == 0;
    const uint4* src = reinterpret_cast<const uint4*>(r + lo);
    // The first batch of vectors is requested before the length is known (any position below
    // N is in the row; those past the length are dropped below) and before the barrier.
    uint4 raw[kUnroll];
    if constexpr (kStaged) {
      const int nrow = aligned ? static_cast<int>(min(p.N - lo, static_cast<int64_t>(slice))) / kVec : 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = tid + u * kThreads;
        raw[u] = v < nrow ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
      }
    }
    geometry();
    for (int i = tid; i < kBuffers * kHistWords; i += kThreads) hist(0)[i] = 0;
    if (tid < 2) sh.few[tid].n = sh.few[tid].above = 0;
    if (tid == 0) sh.kmax = 0;
    __syncthreads();
    const uint32_t h = smem_addr(hist(0));
    const Pass s = kMass ? mass_first_pass() : digit_pass(0, K::kBits, 8);
    uint32_t above = 0, kmax = 0;
    auto note = [&](const uint32_t (&k)[kVec]) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) kmax = max(kmax, k[j]);
    };
    if constexpr (kStaged) {
      uint4* st4 = reinterpret_cast<uint4*>(stage());
      const int n = max(hi - lo, 0);
      const int nv = (n + kVec - 1) / kVec;
      const int nfull = aligned ? n / kVec : 0;
      auto convert = [&](const uint4& raw, int v, uint32_t (&k)[kVec]) {
        T x[kVec];
        memcpy(x, &raw, 16);
        const int i0 = lo + v * kVec;
#pragma unroll
        for (int j = 0; j < kVec; ++j) k[j] = K::key(x[j]);
        if (i0 < c_lo || i0 + kVec > c_hi) {  // a vector with forced positions (rare)
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (i0 + j < c_lo || i0 + j >= c_hi) k[j] = 0;
          }
        }
      };
      for (int v0 = tid; v0 < nfull; v0 += kUnroll * kThreads) {
        if (v0 != tid) {  // the first batch is in flight already
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int v = v0 + u * kThreads;
            raw[u] = v < nfull ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int v = v0 + u * kThreads;
          if (v < nfull) {
            uint32_t k[kVec];
            convert(raw[u], v, k);
            st4[v] = pack(k);
            add<kMass, !kMass, false, true>(k, s, h, above);
            note(k);
          }
        }
      }
      // Unaligned rows and the last partial vector, element by element (zero keys past hi).
      for (int v = nfull + tid; v < nv; v += kThreads) {
        uint32_t k[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int i = lo + v * kVec + j;
          k[j] = (i >= c_lo && i < c_hi) ? K::key(r[i]) : 0u;
        }
        st4[v] = pack(k);
        add<kMass, !kMass, false, true>(k, s, h, above);
        note(k);
      }
    } else {
      for (int i = c_lo + tid; i < c_hi; i += kThreads) {
        const uint32_t k[1] = {K::key(r[i])};
        add<kMass, !kMass, false, true>(k, s, h, above);
      }
    }
    if constexpr (kMass && !kMulti) {
      kmax = __reduce_max_sync(0xffffffffu, kmax);
      if (lane == 0 && kmax != 0) atomicMax(&sh.kmax, kmax);
    }
    finish_sweep<false>(h, above);
  }

  // A swept pass that no search will merge (single CTA: its buffer must be clean again).
  __device__ void discard() {
    if constexpr (!kMulti) {
      __syncthreads();
      for (int i = tid; i < kHistWords; i += kThreads) hist(0)[i] = 0;
      __syncthreads();
    }
  }

  // ---- merging and picking ---------------------------------------------------------------

  // After the sweep: every rank's histogram of the pass is complete. Clustered, the buffer of
  // the next pass is zeroed here (its last readers, the ranks merging the previous pass, have
  // passed this barrier).
  __device__ const uint32_t* sync_pass() {
    if constexpr (kMulti) {
      cluster_sync();
      uint32_t* next = hist(pass & 1);
      for (int i = tid; i < kHistWords; i += kThreads) next[i] = 0;
      return hist((pass - 1) & 1);
    } else {
      __syncthreads();
      return hist(0);
    }
  }

  // This thread's bins [d0, d0 + kBpt) (thread 0 holds the top ones), summed over the ranks:
  // mass (kMass) or counts into v; with kCounts also the counts of the ranks before this one
  // (cb) and of all (ct), and (thread 0) the above-counts.
  template <bool kMass, bool kCounts>
  __device__ void gather(const uint32_t* h, u64 (&v)[kBpt], uint32_t (&ct)[kBpt],
                         uint32_t (&cb)[kBpt], uint32_t& ab_all, uint32_t& ab_before) {
#pragma unroll
    for (int j = 0; j < kBpt; ++j) v[j] = 0, ct[j] = 0, cb[j] = 0;
    ab_all = ab_before = 0;
    if (tid >= kScanThreads) return;
    const int d0 = kBins - (tid + 1) * kBpt;
    if constexpr (kMulti) {
      const uint32_t base = smem_addr(h);
      for (int r = 0; r < ranks; ++r) {
        const uint32_t rb = map_rank(base, static_cast<uint32_t>(r));
#pragma unroll
        for (int j = 0; j < kBpt; ++j) {
          const uint32_t d = static_cast<uint32_t>(d0 + j);
          if constexpr (kMass) {
            const uint32_t l = ld_cluster(rb + 4 * (kLo + d));
            const uint32_t hw = ld_cluster(rb + 4 * (kHi + d));
            v[j] += (static_cast<u64>(hw) << 32) + l;
          }
          if constexpr (kCounts || !kMass) {
            const uint32_t c = ld_cluster(rb + 4 * (kCnt + d));
            ct[j] += c;
            if (r < rank) cb[j] += c;
            if constexpr (!kMass) v[j] += c;
          }
        }
        if (kCounts && tid == 0) {
          const uint32_t a = ld_cluster(rb + 4 * kAbove);
          ab_all += a;
          if (r < rank) ab_before += a;
        }
      }
    } else {
      uint32_t* hw = const_cast<uint32_t*>(h);  // read and clear: the buffer is clean again
#pragma unroll
      for (int j = 0; j < kBpt; ++j) {
        const int d = d0 + j;
        if constexpr (kMass) {
          v[j] = (static_cast<u64>(hw[kHi + d]) << 32) + hw[kLo + d];
          hw[kLo + d] = 0;
          hw[kHi + d] = 0;
        }
        if constexpr (kCounts || !kMass) {
          ct[j] = hw[kCnt + d];
          hw[kCnt + d] = 0;
          if constexpr (!kMass) v[j] = ct[j];
        }
      }
      if (kCounts && tid == 0) {
        ab_all = hw[kAbove];
        hw[kAbove] = 0;
      }
    }
  }

  // Exclusive scan over the scan threads in thread order (= descending bins) and the total.
  __device__ void block_scan(u64 x, u64& excl, u64& total) {
    const u64 inc = warp_inclusive_sum(x, lane);
    if (lane == 31 && warp < kScanWarps) sh.wsum[warp] = inc;
    __syncthreads();
    excl = inc - x;
    total = 0;
#pragma unroll
    for (int w = 0; w < kScanWarps; ++w) {
      const u64 s = sh.wsum[w];
      total += s;
      if (w < warp) excl += s;
    }
  }

  // The bin where the running weight from the top first reaches `need` (0 < need <= total):
  // exactly one bin of the CTA satisfies the test. Every thread gets it.
  __device__ Pick pick(const u64 (&v)[kBpt], const u64 (&raw)[kBpt], const uint32_t (&cnt)[kBpt],
                       u64 excl, u64 need) {
    if (tid < kScanThreads) {
      const int d0 = kBins - (tid + 1) * kBpt;
      u64 run = excl;
#pragma unroll
      for (int j = kBpt - 1; j >= 0; --j) {
        if (run < need && need - run <= v[j]) {
          sh.pick = {run, v[j], raw[j], static_cast<uint32_t>(d0 + j), cnt[j]};
        }
        run += v[j];
      }
    }
    __syncthreads();
    return sh.pick;  // rewritten only after the next pass's first barrier
  }

  // Last pass: candidates above the cut digit dm and at it, in all ranks and in those before.
  __device__ void tally(uint32_t dm, const uint32_t (&ct)[kBpt], const uint32_t (&cb)[kBpt],
                        uint32_t ab_all, uint32_t ab_before, Final& f) {
    uint32_t g_all = ab_all, g_before = ab_before;
    if (tid < kScanThreads) {
      const int d0 = kBins - (tid + 1) * kBpt;
#pragma unroll
      for (int j = 0; j < kBpt; ++j) {
        const uint32_t d = static_cast<uint32_t>(d0 + j);
        if (d > dm) g_all += ct[j], g_before += cb[j];
        if (d == dm) sh.eq_before = cb[j];
      }
    }
    g_all = __reduce_add_sync(0xffffffffu, g_all);
    g_before = __reduce_add_sync(0xffffffffu, g_before);
    if (lane == 0) sh.red[warp][0] = g_all, sh.red[warp][1] = g_before;
    __syncthreads();
    g_all = g_before = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) g_all += sh.red[w][0], g_before += sh.red[w][1];
    f.gt_total = static_cast<int>(g_all);
    f.gt_before = static_cast<int>(g_before);
    f.eq_before = static_cast<int>(sh.eq_before);
  }

  // Radix passes below `prefix` (its bits above `shift`): the key t where the running weight
  // from the top reaches `target`, given `base` above the prefix. Mass: mantissa sums of one
  // exponent (implicit bit imp). The first pass may already be swept (fused with the load).
  template <bool kMass>
  __device__ Final descend(uint32_t prefix, int shift, u64 base, u64 target, uint32_t imp,
                           bool swept) {
    while (true) {
      const int nb = min(8, shift);
      const Pass s = digit_pass(prefix, shift, nb);
      if (!swept) {
        if (s.last) sweep<kMass, true>(s);
        else sweep<kMass, false>(s);
      }
      swept = false;
      const uint32_t* h = sync_pass();
      u64 v[kBpt];
      uint32_t ct[kBpt], cb[kBpt], ab_all, ab_before;
      if (s.last || !kMulti) gather<kMass, true>(h, v, ct, cb, ab_all, ab_before);
      else gather<kMass, false>(h, v, ct, cb, ab_all, ab_before);
      u64 chunk = 0;
#pragma unroll
      for (int j = 0; j < kBpt; ++j) chunk += v[j];
      u64 excl, total;
      block_scan(chunk, excl, total);
      const Pick pk = pick(v, v, ct, excl, target - base);
      if (s.last) {
        Final f{};
        f.t = (prefix << nb) | pk.d;
        const u64 rem = target - base - pk.above;  // >= 1
        if constexpr (kMass) {
          const u64 q = (f.t & kFrac) | imp;  // > 0: the bin holds mass
          f.need_eq = static_cast<int>((rem + q - 1) / q);
        } else {
          f.need_eq = static_cast<int>(rem);
        }
        tally(pk.d, ct, cb, ab_all, ab_before, f);
        return f;
      }
      base += pk.above;
      prefix = (prefix << nb) | pk.d;
      shift -= nb;
      if constexpr (!kMulti) {
        if (pk.cnt <= static_cast<uint32_t>(kFewKeys)) return finish_few<kMass>(digit_pass(prefix, shift, 0), target - base);
      }
    }
  }

  // The weight of a key in a search: its mantissa with the implicit bit (mass; denormals have
  // none) or 1.
  template <bool kMass>
  __device__ static uint32_t weight(uint32_t k) {
    return kMass ? (k & kFrac) | ((k & kExpField) ? kImp : 0u) : 1u;
  }

  // Single CTA, the chosen bin holds <= kFewKeys keys (those with s's prefix): one sweep lists
  // them and counts the keys above the prefix, then every warp finds the cut among them (lane l
  // weighs the keys above and at list[l]) instead of running the remaining passes.
  template <bool kMass>
  __device__ Final finish_few(const Pass& s, u64 need) {
    Few& fw = sh.few[few_used++];
    uint32_t above = 0;
    const uint4* st = reinterpret_cast<const uint4*>(stage());
    const int nv = (max(hi - lo, 0) + kVec - 1) / kVec;
    for (int v = tid; v < nv; v += kThreads) {
      uint32_t k[kVec];
      unpack(st[v], k);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        above += k[j] > s.above ? 1u : 0u;
        if (k[j] != 0 && (k[j] & s.mhi) == s.pval) {
          const uint32_t slot = atomicAdd(&fw.n, 1u);
          if (slot < static_cast<uint32_t>(kFewKeys)) fw.keys[slot] = k[j];  // always: same keys as the count
        }
      }
    }
    above = __reduce_add_sync(0xffffffffu, above);
    if (lane == 0 && above != 0) atomicAdd(&fw.above, above);
    __syncthreads();
    const int m = min(static_cast<int>(fw.n), kFewKeys);
    const uint32_t mine = lane < m ? fw.keys[lane] : 0u;
    u64 gt = 0, ge = 0;
    uint32_t n_gt = 0;
    for (int i = 0; i < m; ++i) {
      const uint32_t k = fw.keys[i], w = weight<kMass>(k);
      gt += k > mine ? w : 0u;
      ge += k >= mine ? w : 0u;
      n_gt += k > mine ? 1u : 0u;
    }
    // Lanes holding the cut key all pass (equal keys: equal sums); need <= the bin's weight.
    const uint32_t hit = __ballot_sync(0xffffffffu, lane < m && gt < need && need <= ge);
    const int src = hit ? __ffs(hit) - 1 : 0;
    Final f{};
    f.t = __shfl_sync(0xffffffffu, mine, src);
    gt = __shfl_sync(0xffffffffu, gt, src);
    n_gt = __shfl_sync(0xffffffffu, n_gt, src);
    const u64 rem = need - gt, q = weight<kMass>(f.t);
    f.need_eq = static_cast<int>(kMass ? (rem + q - 1) / q : rem);
    f.gt_total = static_cast<int>(fw.above + n_gt);
    return f;  // gt_before = eq_before = 0: one CTA
  }

  // top-p over the first pass (swept): 0 = cut found (f, r), 1 = no mass, 2 = infinite mass.
  __device__ int mass_search(double top_p, Final& f) {
    const uint32_t* h = sync_pass();
    u64 s_raw[kBpt];
    uint32_t ct[kBpt], cb[kBpt], ab_all, ab_before;
    gather<true, false>(h, s_raw, ct, cb, ab_all, ab_before);
    // The top exponent with mass (+1; 0: none). One CTA: that of the largest key, if it weighs.
    uint32_t top = 0;
    if constexpr (kMulti) {
      if (tid < kScanThreads) {
        const int d0 = kBins - (tid + 1) * kBpt;
#pragma unroll
        for (int j = 0; j < kBpt; ++j) {
          if (s_raw[j]) top = max(top, static_cast<uint32_t>(d0 + j + 1));
        }
      }
      top = __reduce_max_sync(0xffffffffu, top);
      if (lane == 0) sh.red[warp][0] = top;
      __syncthreads();
      top = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) top = max(top, sh.red[w][0]);
    } else {
      const uint32_t km = sh.kmax;  // written before sync_pass's barrier
      top = (km & kSign) && weight<true>(km) ? ((km & kExpField) >> K::kMant) + 1 : 0;
    }
    if (top == 0) return 1;
    const int e_top = static_cast<int>(top) - 1;
    if (e_top == static_cast<int>(kExpTop)) return 2;
    // Masses in units of 2^(e_top' - Bq), e_top' bounding every mass: every element's scaled
    // mass is < 2^Bq and n_cand * 2^Bq <= 2^63, so no sum overflows. Bin d (exponent field d,
    // denormals as 1) holds S * 2^(max(d,1) - kBias - kMant): k below is its scale.
    const int log_n = n_cand > 1 ? 32 - __clz(static_cast<uint32_t>(n_cand - 1)) : 0;
    const int bq = min(max(63 - log_n, 32), 40);
    const int k_top = bq - K::kMant - 1;
    auto scale = [&](int d) { return max(d, 1) - max(e_top, 1) + k_top; };
    u64 q[kBpt];
    u64 chunk = 0;
#pragma unroll
    for (int j = 0; j < kBpt; ++j) {
      const int d = kBins - (tid + 1) * kBpt + j;
      q[j] = tid < kScanThreads ? shift_ceil(s_raw[j], scale(d)) : 0;
      chunk += q[j];
    }
    u64 excl, total;
    block_scan(chunk, excl, total);
    const double x = ceil(top_p * static_cast<double>(total));
    u64 W = x >= static_cast<double>(total) ? total : static_cast<u64>(x);
    W = W > 0 ? W : 1;
    uint32_t uncounted[kBpt];
#pragma unroll
    for (int j = 0; j < kBpt; ++j) uncounted[j] = ~0u;  // the dense first pass counts nothing
    const Pick pk = pick(q, s_raw, uncounted, excl, W);
    // The mass still needed inside the chosen bin, as an exact mantissa sum in [1, S].
    const u64 need = W - pk.above;  // in [1, q]
    const int s = -scale(static_cast<int>(pk.d));
    u64 R;
    if (s >= 64) R = pk.raw;  // need >= 1 unit is more than the whole bin
    else if (s >= 0) R = need > (pk.raw >> s) ? pk.raw : need << s;
    else R = min(shift_ceil(need, s), pk.raw);
    R = R > 0 ? R : 1;
    const uint32_t imp = pk.d ? kImp : 0u;
    f = descend<true>((1u << K::kExp) | pk.d, K::kMant, 0, R, imp, false);
    return 0;
  }

  // ---- output ----------------------------------------------------------------------------

  // Single CTA, at most 32 staged keys per thread: thread x owns the x-th run of `vpt` vectors,
  // holds its kept keys as bit masks, and one block scan of (sure, tie) counts gives every
  // thread its slots (cheaper than the warps' 32-position steps below). The positions go to
  // their slots in shared memory (the keys and histograms are read by then), and the row
  // leaves in 16-byte stores: scattered global stores would cost a transaction per position.
  __device__ void output_runs(const Final& f, int count, int nvec, int vpt) {
    const int cap_i = static_cast<int>(p.capacity < INT32_MAX ? p.capacity : INT32_MAX);
    const uint4* st = reinterpret_cast<const uint4*>(stage());
    const int v0 = tid * vpt, n = max(hi - lo, 0);
    // Rotated reads: with a power-of-two run, 8 consecutive threads (one 16-byte access phase)
    // hit 8 different bank groups.
    const int rot = (vpt <= 1 || (vpt & (vpt - 1))) ? 0 : (tid * vpt / 8) % vpt;
    uint32_t sure = 0, tie = 0;  // bit b: position lo + v0 * kVec + b
    for (int j = 0; j < vpt; ++j) {
      const int jj = j + rot < vpt ? j + rot : j + rot - vpt;
      if (v0 + jj >= nvec) continue;
      uint32_t k[kVec], vs = 0, ve = 0;
      unpack(st[v0 + jj], k);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        vs |= (k[e] - 1u >= f.t ? 1u : 0u) << e;  // k > t, or k == 0: forced
        ve |= (k[e] == f.t ? 1u : 0u) << e;
      }
      sure |= vs << (jj * kVec);
      tie |= ve << (jj * kVec);
    }
    // Keys past hi are 0 like forced ones; a tie needs a candidate key (t != 0).
    const int valid = n - v0 * kVec;
    const uint32_t in = valid >= 32 ? ~0u : valid <= 0 ? 0u : (1u << valid) - 1u;
    sure &= in;
    tie &= f.t != 0 ? in : 0u;
    // Exclusive scan of (sure, tie) counts, packed in 16 bits each (a slice has <= 32768 keys).
    const uint32_t own = __popc(sure) | (static_cast<uint32_t>(__popc(tie)) << 16);
    const uint32_t inc = warp_inclusive_sum(own, lane);
    if (lane == 31) sh.wcnt[warp][0] = inc;
    __syncthreads();
    uint32_t excl = inc - own;
    for (int w = 0; w < warp; ++w) excl += sh.wcnt[w][0];
    const int sb = forced_before(lo) + f.gt_before + static_cast<int>(excl & 0xffffu);
    const int eb = f.eq_before + static_cast<int>(excl >> 16);
    const int base = lo + v0 * kVec;
    // Slot i at index sh0 + i: 16-byte aligned where the output row is.
    const int sh0 = static_cast<int>((static_cast<int64_t>(seg) * p.capacity) & 3);
    int32_t* slots = reinterpret_cast<int32_t*>(dyn()) + sh0;
    // Ties are kept while fewer than need_eq came before: this run keeps its first
    // need_eq - eb ties (clamped). The kept positions then take consecutive slots from
    // sb + min(eb, need_eq) (a sure position's slot counts the kept ties before it, a kept
    // tie's the sure ones).
    uint32_t keep = sure, t = tie;
    for (int q = min(max(f.need_eq - eb, 0), __popc(tie)); q > 0; --q, t &= t - 1u) keep |= t & (0u - t);
    int slot = sb + min(eb, f.need_eq);
    for (uint32_t m = keep; m != 0 && slot < cap_i; m &= m - 1) slots[slot++] = base + __ffs(m) - 1;  // < count
    __syncthreads();
    int32_t* out = p.indices + static_cast<int64_t>(seg) * p.capacity;
    const int cap = cap_i;  // the caller checked that it fits
    auto val = [&](int i) { return i < count ? slots[i] : -1; };
    const int a = min(cap, (4 - sh0) & 3);  // up to the first 16-byte aligned element
    for (int i = tid; i < a; i += kThreads) out[i] = val(i);
    const int nv4 = (cap - a) / 4;
    const int4* s4 = reinterpret_cast<const int4*>(slots + a);
    int4* o4 = reinterpret_cast<int4*>(out + a);
    const int last4 = max((count - a - 1) / 4, 0);  // the last vector that holds a slot (or 0)
    for (int v = tid; v < nv4; v += kThreads) {
      const int i = a + 4 * v;
      const int4 x = s4[min(v, last4)];  // in bounds: slots below count + 3 <= n + 3
      o4[v] = make_int4(i < count ? x.x : -1, i + 1 < count ? x.y : -1, i + 2 < count ? x.z : -1,
                        i + 3 < count ? x.w : -1);
    }
    for (int i = a + 4 * nv4 + tid; i < cap; i += kThreads) out[i] = val(i);
    if (tid == 0) p.counts[seg] = count;
  }

  __device__ void output(const Final& f, int count) {
    int32_t* out = p.indices + static_cast<int64_t>(seg) * p.capacity;
    const int64_t cap = p.capacity;
    const int n = max(hi - lo, 0);
    const int nvec = (n + kVec - 1) / kVec, vpt = (nvec + kThreads - 1) / kThreads;
    // output_runs's slots (3 ints of alignment) fit the histograms and keys: always for
    // float32 keys, up to 1541 positions for 16-bit ones.
    const bool fits = 4 * (n + 3) <= static_cast<int>(kHistBytes) + n * static_cast<int>(sizeof(Stored));
    if (!kMulti && kStaged && vpt * kVec <= 32 && fits && cap < INT32_MAX - 4) {
      output_runs(f, count, nvec, vpt);
      return;
    }
    const int cw = (n + 32 * kWarps - 1) / (32 * kWarps) * 32;  // warp chunk, multiple of 32
    const int start = min(lo + warp * cw, lo + n), end = min(start + cw, lo + n);
    // 1. Kept candidates above t and ties at t in this warp's chunk (forced ones by geometry).
    uint32_t ns = 0, ne = 0;
    if constexpr (kStaged) {
      const uint4* st = reinterpret_cast<const uint4*>(stage());
      for (int i = start + kVec * lane; i < end; i += 32 * kVec) {
        uint32_t k[kVec];
        unpack(st[(i - lo) / kVec], k);  // keys past hi are 0: not counted
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          ns += k[j] > f.t ? 1u : 0u;
          ne += (k[j] == f.t && k[j] != 0) ? 1u : 0u;
        }
      }
    } else {
      for (int i = start + lane; i < end; i += 32) {
        const uint32_t k = key_at(i);
        ns += k > f.t ? 1u : 0u;
        ne += (k == f.t && k != 0) ? 1u : 0u;
      }
    }
    ns = __reduce_add_sync(0xffffffffu, ns) + (forced_before(end) - forced_before(start));
    ne = __reduce_add_sync(0xffffffffu, ne);
    if (lane == 0) sh.wcnt[warp][0] = ns, sh.wcnt[warp][1] = ne;
    __syncthreads();
    int sb = forced_before(lo) + f.gt_before, eb = f.eq_before;
    for (int w = 0; w < warp; ++w) sb += static_cast<int>(sh.wcnt[w][0]), eb += static_cast<int>(sh.wcnt[w][1]);
    // 2. Slots in position order: sure ones after all kept before them; ties at t only while
    //    fewer than need_eq came before (lowest positions first).
    const int cap_i = static_cast<int>(cap < INT32_MAX ? cap : INT32_MAX);
    const uint32_t lt = lanemask_lt();
    for (int b = start; b < end; b += 32) {
      const int i = b + lane;
      const bool act = i < end;
      const uint32_t k = act ? key_at(i) : 1u;
      const bool sure = act && (k == 0 || k > f.t);
      const bool eq = act && !sure && k == f.t;
      const uint32_t bs = __ballot_sync(0xffffffffu, sure), be = __ballot_sync(0xffffffffu, eq);
      const int ps = sb + __popc(bs & lt);
      if (be == 0) {  // no tie at t in this step (the usual case)
        const int slot = ps + min(eb, f.need_eq);
        if (sure && slot < cap_i) out[slot] = i;
      } else {
        const int pe = eb + __popc(be & lt);
        const int slot = ps + min(pe, f.need_eq);  // for a kept tie: ps + pe
        if ((sure || (eq && pe < f.need_eq)) && slot < cap_i) out[slot] = i;
      }
      sb += __popc(bs);
      eb += __popc(be);
    }
    pad(count);
  }

  // -1 padding up to capacity, spread over the cluster, and the count.
  __device__ void pad(int count) {
    int32_t* out = p.indices + static_cast<int64_t>(seg) * p.capacity;
    fill_minus_one(out, count, p.capacity, rank * kThreads + tid, ranks * kThreads);
    if (rank == 0 && tid == 0) p.counts[seg] = count;
  }

  // ---- the whole selection ---------------------------------------------------------------

  __device__ void run() {
    const bool by_mass = p.by_mass;
    if (by_mass) load<true>();
    else load<false>();
    int64_t r = 0;  // int64 until clamped: k and min_keep are arbitrary
    int r_mass = -1;
    Final f{};
    bool used = false;  // the first pass was merged
    if (by_mass) {
      const double top_p = fmin(fmax(top_p_raw, 0.0), 1.0);  // NaN -> 0
      if (n_cand > 0 && top_p > 0.0) {
        used = true;
        const int kind = mass_search(top_p, f);
        if (kind == 0) r = r_mass = f.gt_total + f.need_eq;
        else r = kind == 2 ? 1 : 0;  // infinite mass: the first candidate reaches p * T
      }
    } else {
      r = top_k_candidates(top_k_raw, n_cand);
    }
    r = floor_and_cap(p, r, forced, n_cand);
    if (r != r_mass) {
      if (r == 0) {
        f = {0xffffffffu, 0, 0, 0, 0};  // no key is above it, none equals it
      } else if (r == n_cand) {
        f = {0u, 0, cand_before(lo), 0, n_cand};  // every candidate key is above it
      } else {
        const bool fused = !by_mass;  // top-k's first pass was swept by load()
        if (!fused && !used) discard();
        f = descend<false>(0, K::kBits, 0, static_cast<u64>(r), 0, fused);
      }
    }
    // The output reads keys other threads staged: without a search in between (r = 0 or all
    // candidates) nothing else orders those reads after the writes.
    __syncthreads();
    // Clustered: no rank may exit while another still reads its histograms (the reads are
    // done here); the wait comes after the output.
    if constexpr (kMulti) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    output(f, forced + static_cast<int>(r));
    if constexpr (kMulti) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  }
};

template <int kThreads>
constexpr int select_min_blocks() {
  return kThreads <= 64 ? 12 : kThreads <= 128 ? 10 : kThreads <= 256 ? 5 : kThreads <= 512 ? 2 : 1;
}

template <typename T, int kThreads, bool kMulti, bool kStaged>
__global__ void __launch_bounds__(kThreads, select_min_blocks<kThreads>())
    select_radix(const SelectParams p, const SelectLaunch L) {
  using Sel = RadixSelect<T, kThreads, kMulti, kStaged>;
  __shared__ typename Sel::Shared sh;
  Sel sel(p, L, sh);
  sel.run();
}

// The launch configuration of one strategy; sets the kernel's shared-memory limit first.
template <typename T, int kThreads, bool kMulti, bool kStaged>
cudaError_t configure(const SelectParams& p, const SelectLaunch& L, cudaStream_t stream,
                      cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr) {
  using Sel = RadixSelect<T, kThreads, kMulti, kStaged>;
  const size_t smem = Sel::smem_bytes(L);
  const cudaError_t err = cudaFuncSetAttribute(select_radix<T, kThreads, kMulti, kStaged>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
  cfg = cudaLaunchConfig_t{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.S * L.cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(L.cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = kMulti ? 1 : 0;
  return err;
}

template <typename T, int kThreads, bool kMulti, bool kStaged>
cudaError_t launch(const SelectParams& p, const SelectLaunch& L, cudaStream_t stream) {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cudaError_t err = configure<T, kThreads, kMulti, kStaged>(p, L, stream, cfg, attr);
  if (err != cudaSuccess) return err;
  err = cudaLaunchKernelEx(&cfg, select_radix<T, kThreads, kMulti, kStaged>, p, L);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// Clusters of this configuration that fit on the device at once: a host query (no sync),
// remembered per device, cluster size and shared memory.
template <typename T, int kThreads>
cudaError_t active_clusters(const SelectParams& p, const SelectLaunch& L, int& n) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, size_t>, int> known;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const auto key = std::make_tuple(dev, L.cluster, RadixSelect<T, kThreads, true, true>::smem_bytes(L));
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return n = it->second, cudaSuccess;
  }
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  err = configure<T, kThreads, true, true>(p, L, nullptr, cfg, attr);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveClusters(&n, select_radix<T, kThreads, true, true>, &cfg);
  if (err == cudaSuccess) {
    const std::lock_guard<std::mutex> lock(mu);
    known[key] = n;
  }
  return err;
}

inline int round_up16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }

}  // namespace select_detail

// Strategy by segment width N (every segment of a launch has length <= N), one CTA per segment
// with the slice staged in shared memory unless noted:
//   N <= 1024:   one warp per segment, scores in registers (select_warp.cuh)
//   N <= 4096:   128 threads (1280 segments of 4096 fit one wave: ~20 KB per CTA)
//   N <= 8192:   256 threads
//   N <= 32768:  the large CTA: 1024 threads for float32 (128 KB of keys, one per SM), 512 for
//                16-bit scores (64 KB, two per SM); 32 or 64 keys per thread
//   larger:      clusters of c <= 8 large CTAs, c from ceil(N / 32768) down to slices of up to
//                192 KB of keys when fewer clusters then fit the device in fewer waves; beyond 8
//                slices of 32768 the slices are re-read from global memory in every pass.
constexpr int64_t kSelectSmallN = 4096, kSelectMediumN = 8192;

// CTAs that work on one segment of width N (the grid has S times as many).
inline int select_ctas_per_segment(int64_t N, int64_t /*elem_size*/) {
  if (N <= kSelectSliceElems) return 1;
  const int64_t ctas = (N + kSelectSliceElems - 1) / kSelectSliceElems;
  return static_cast<int>(ctas < kSelectMaxCluster ? ctas : kSelectMaxCluster);
}

template <typename T>
cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  using namespace select_detail;
  if (p.S == 0) return cudaSuccess;
  const int64_t N = p.N;
  if (N <= kSelectWarpMaxN) return launch_select_warp<T>(p, stream);
  if (N <= kSelectSmallN) return launch<T, 128, false, true>(p, {1, round_up16(N)}, stream);
  if (N <= kSelectMediumN) return launch<T, 256, false, true>(p, {1, round_up16(N)}, stream);
  constexpr int kBig = sizeof(T) == 4 ? 1024 : 512;
  if (N <= kSelectSliceElems) return launch<T, kBig, false, true>(p, {1, round_up16(N)}, stream);
  const int most = select_ctas_per_segment(N, sizeof(T));
  if (p.S * most > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (N > static_cast<int64_t>(most) * kSelectSliceElems) {  // beyond 8 slices: unstaged
    return launch<T, kBig, true, false>(p, {most, round_up16((N + most - 1) / most)}, stream);
  }
  // Fewer, larger slices (up to kSelectMaxSliceBytes of keys) when the clusters of 32768-key
  // slices do not fit the device at once: an H100 holds 30 clusters of 4 one-per-SM CTAs (its
  // GPC sizes), so 32 x 131072 float32 would run in two waves; clusters of 3 run in one. The
  // cost of a plan is its waves times the keys per CTA (the sweeps are per-key work).
  constexpr int64_t kMaxSlice = kSelectMaxSliceBytes / sizeof(typename Keys<T>::Stored);
  SelectLaunch best{most, round_up16((N + most - 1) / most)};
  int64_t best_cost = -1;
  for (int c = static_cast<int>((N + kMaxSlice - 1) / kMaxSlice); c <= most; ++c) {
    if (c < 2) continue;
    const SelectLaunch L{c, round_up16((N + c - 1) / c)};
    int fit = 0;
    if (active_clusters<T, kBig>(p, L, fit) != cudaSuccess || fit < 1) {
      (void)cudaGetLastError();  // a refused query: keep the default plan
      best_cost = -1;
      best = {most, round_up16((N + most - 1) / most)};
      break;
    }
    const int64_t cost = (p.S + fit - 1) / fit * static_cast<int64_t>(L.slice);
    if (best_cost < 0 || cost <= best_cost) best = L, best_cost = cost;  // ties: smaller slices
  }
  return launch<T, kBig, true, true>(p, best, stream);
}

}  // namespace pyramid_kv::kernels

// Segmented top-p / top-k selection (docs/ops.md): a sort-free radix select on the 32-bit order
// keys, then an order-preserving compaction of the kept positions.
//
// One segment per CTA, or per thread-block cluster of up to 8 CTAs for long segments (each CTA
// owns a slice of positions; histograms are merged through distributed shared memory). Each CTA
// copies its slice of the scores to shared memory once (as order keys for float32, raw 16-bit
// values otherwise), so the later passes cost no global traffic; slices too long for that are
// re-read from global memory in every pass instead.
//
// Per segment:
//  1. min and max candidate key. Their common leading bits are shared by every candidate, so
//     the radix passes start below them (fewer passes, fewer histogram collisions).
//  2. top-p: masses become exact 64-bit fixed-point integers (ceil(m * 2^(Bq - e_max))), so the
//     histogram sums are exact and order-independent: the result is deterministic and the
//     search is consistent (each pass's bins sum exactly to the bin chosen before). Radix
//     passes of kBits digits (a histogram of the mass, a scan from the top bin) find the key t
//     where the descending cumulative mass first reaches W = ceil(p * T); the number of ties at
//     t needed follows by one integer division. A tally gives r.
//  3. floor and cap on r; if they change r (or for top-k) the same radix passes over counts
//     find the key t of the r-th candidate and how many ties at t to keep.
//  4. output: a tile-wise block scan of (sure, tie) counts gives every kept position its slot:
//     slot(x) = sure_before(x) + min(ties_before(x), ties_needed), ties kept lowest position
//     first; then -1 padding and the count.
#pragma once

#include <cooperative_groups.h>

#include <cub/block/block_scan.cuh>

#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace pyramid_kv::kernels {

struct SelectParams {
  const void* scores;  // [S, N], row stride `row_stride` elements
  int64_t row_stride;
  IndexArray lengths;
  const float* top_p;  // [S] or null
  IndexArray top_k;    // [S] or {null}
  double top_p_default;
  int64_t top_k_default;
  bool by_mass;
  int64_t S, N, sink, recent, min_keep, capacity;
  int32_t* indices;  // [S, capacity]
  int32_t* counts;   // [S]
};

// How a launch splits segments: `cluster` CTAs per segment, `slice` positions per CTA.
struct SelectLaunch {
  int cluster;  // 1..kSelectMaxCluster; > 1 launches thread-block clusters
  int slice;    // multiple of 16, cluster * slice >= N
  bool staged;  // the slice is copied to shared memory once (else re-read in every pass)
};

constexpr int kSelectMaxCluster = 8;           // portable cluster size
constexpr int kSelectStageBytes = 64 * 1024;   // staged slice of the large configuration

namespace select_detail {

namespace cg = cooperative_groups;
using u64 = unsigned long long;

// What the shared-memory copy of a score holds: the order key for float32 (computed once),
// the raw bits for 16-bit types (half the space; the key is recomputed per pass).
template <typename T> struct Stored;
template <> struct Stored<float> {
  using type = uint32_t;
  __device__ static type from(float x) { return order_key(x); }
  __device__ static uint32_t key(type v) { return v; }
};
template <> struct Stored<__half> {
  using type = uint16_t;
  __device__ static type from(__half x) { return __half_as_ushort(x); }
  __device__ static uint32_t key(type v) { return order_key(__half2float(__ushort_as_half(v))); }
};
template <> struct Stored<__nv_bfloat16> {
  using type = uint16_t;
  __device__ static type from(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  __device__ static uint32_t key(type v) {
    return order_key(__bfloat162float(__ushort_as_bfloat16(v)));
  }
};

// Weights of the two searches. Mass: ceil(max(score, 0) * 2^(Bq - e_max)) as an integer
// (sb = Bq - e_max - 150 folds in the float exponent bias and mantissa width). Every positive
// mass maps to >= 1, so p = 1 keeps every positive candidate as the definition does.
struct MassWeight {
  static constexpr bool kUnit = false;
  int sb;
  __device__ __forceinline__ u64 operator()(uint32_t key) const {
    if (key <= 0x80000000u) return 0;  // negative, NaN (as -inf) and zero: no mass
    const uint32_t bits = key & 0x7fffffffu;
    int e = static_cast<int>(bits >> 23);
    uint32_t mant = bits & 0x7fffffu;
    if (e) mant |= 0x800000u; else e = 1;  // denormals
    const int sh = e + sb;
    if (sh >= 0) return static_cast<u64>(mant) << sh;
    if (sh <= -32) return 1;
    return (static_cast<u64>(mant) + ((1ull << -sh) - 1)) >> -sh;
  }
};
struct CountWeight {
  static constexpr bool kUnit = true;
  __device__ __forceinline__ u64 operator()(uint32_t) const { return 1; }
};

// Result of a search: the cut-off key t, the weight of candidates above it (`base`), at it
// (`at`), and the target weight W (base < W <= base + at).
struct Cut {
  uint32_t t;
  u64 base, at, target;
};

struct Tally {  // counts of positions: < N < 2^31
  int gt_total;     // candidates with key > t in the segment
  int sure_before;  // forced or key > t, at positions before this CTA's slice
  int eq_before;    // candidates with key == t before this CTA's slice
};

template <typename T, int kThreads, int kBits>
struct RadixSelect {
  static constexpr int kBins = 1 << kBits;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kBinsPerThread = kBins >= kThreads ? kBins / kThreads : 1;
  static constexpr int kChunks = kBins / kBinsPerThread;  // threads that scan bins
  static_assert(kThreads % 32 == 0 && kChunks <= kThreads, "bad configuration");
  using St = Stored<T>;
  using S = typename St::type;
  // Warp scans plus one barrier: cheaper than raking for these small scans.
  using ScanU64 = cub::BlockScan<u64, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  using ScanU32 = cub::BlockScan<uint32_t, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;

  struct Shared {
    union {
      typename ScanU64::TempStorage s64;
      typename ScanU32::TempStorage s32;
    } scan;
    ulonglong2 red[kWarps];
    Cut cut;
  };

  // Dynamic shared memory: histograms [2 buffers][lo, hi words][kBins] u32, exchange slots
  // [3][kSelectMaxCluster] ulonglong2, then the staged slice.
  static constexpr size_t kHistBytes = 2 * 2 * kBins * sizeof(uint32_t);
  static constexpr size_t kXchgBytes = 3 * kSelectMaxCluster * sizeof(ulonglong2);
  static size_t smem_bytes(const SelectLaunch& L) {
    return kHistBytes + kXchgBytes + (L.staged ? static_cast<size_t>(L.slice) * sizeof(S) : 0);
  }

  const SelectParams& p;
  const SelectLaunch& L;
  Shared& sh;
  int seg, rank, tid;
  int len, n_sink, rstart, forced, n_cand;  // segment geometry (uniform over the cluster)
  int lo, hi;                               // this CTA's positions [lo, hi)
  int c_lo, c_hi;                           // its candidates [c_lo, c_hi) (may be empty)
  int pass = 0;                             // histogram passes so far: picks the buffer
  uint32_t kmin = 0, kmax = 0;              // candidate key range of the segment

  // The dynamic shared memory, addressed through its symbol (32-bit shared addressing, no
  // pointer registers).
  __device__ static unsigned char* dyn() {
    extern __shared__ __align__(16) unsigned char select_dyn_smem[];
    return select_dyn_smem;
  }
  __device__ static uint32_t* hist() { return reinterpret_cast<uint32_t*>(dyn()); }
  __device__ static ulonglong2* xchg() { return reinterpret_cast<ulonglong2*>(dyn() + kHistBytes); }
  __device__ static S* stage() { return reinterpret_cast<S*>(dyn() + kHistBytes + kXchgBytes); }
  __device__ const T* row() const {
    return static_cast<const T*>(p.scores) + static_cast<int64_t>(seg) * p.row_stride;
  }

  __device__ RadixSelect(const SelectParams& p_, const SelectLaunch& L_, Shared& sh_)
      : p(p_), L(L_), sh(sh_) {
    tid = threadIdx.x;
    seg = blockIdx.x / L.cluster;   // S * cluster < 2^31 (checked by the launcher)
    rank = blockIdx.x % L.cluster;  // == cluster block rank for 1-D clusters
    const int64_t l = clamp64(p.lengths[seg], 0, p.N);
    const int64_t ns = p.sink < l ? p.sink : l;
    const int64_t rs = l - p.recent > ns ? l - p.recent : ns;
    len = static_cast<int>(l);
    n_sink = static_cast<int>(ns);
    rstart = static_cast<int>(rs);
    forced = n_sink + (len - rstart);
    n_cand = rstart - n_sink;
    lo = rank * L.slice;  // < N + slice < 2^31 (checked by the launcher)
    hi = min(max(len - lo, 0), L.slice) + lo;
    c_lo = max(lo, n_sink);
    c_hi = min(hi, rstart);
  }

  __device__ __forceinline__ bool multi() const { return L.cluster > 1; }

  __device__ __forceinline__ void sync_cluster() const {
    if (multi()) cg::this_cluster().sync();
    else __syncthreads();
  }

  __device__ __forceinline__ uint32_t key_at(int i) const {
    return L.staged ? St::key(stage()[i - lo]) : order_key(to_float(row()[i]));
  }

  // Both components reduced with `op` over the CTA; every thread gets the result.
  template <class Op>
  __device__ ulonglong2 block_allreduce(ulonglong2 v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      v.x = op(v.x, __shfl_xor_sync(0xffffffffu, v.x, o));
      v.y = op(v.y, __shfl_xor_sync(0xffffffffu, v.y, o));
    }
    if ((tid & 31) == 0) sh.red[tid >> 5] = v;
    __syncthreads();
    v = sh.red[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      v.x = op(v.x, sh.red[w].x);
      v.y = op(v.y, sh.red[w].y);
    }
    __syncthreads();  // sh.red is reused
    return v;
  }

  // Every CTA of the segment contributes a CTA-uniform v; afterwards slot `which` holds the
  // contribution of every rank (read it locally). Each `which` is used at most once.
  __device__ const ulonglong2* gather(ulonglong2 v, int which) {
    ulonglong2* slots = xchg() + which * kSelectMaxCluster;
    if (!multi()) {
      if (tid == 0) slots[0] = v;
      __syncthreads();
    } else {
      cg::cluster_group cl = cg::this_cluster();
      if (tid < L.cluster) *cl.map_shared_rank(slots + rank, tid) = v;
      cl.sync();
    }
    return slots;
  }

  // 1. Zero the first histogram, stage the slice and reduce the candidate key range.
  __device__ void load() {
    for (int i = tid; i < 2 * kBins; i += kThreads) hist()[i] = 0;
    uint32_t mx = 0, mn = 0xffffffffu;
    auto note = [&](int i, uint32_t key) {
      if (i >= c_lo && i < c_hi) {
        mx = max(mx, key);
        mn = min(mn, key);
      }
    };
    if (L.staged) {
      constexpr int kVec = 16 / sizeof(T);
      const T* row = this->row();
      S* stage = this->stage();
      const int n_here = hi - lo;
      const bool vec = reinterpret_cast<uintptr_t>(row + lo) % 16 == 0;
      const int n_vec = vec ? n_here / kVec : 0;
      for (int v = tid; v < n_vec; v += kThreads) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + lo + v * kVec);
        T x[kVec];
        S s[kVec];
        memcpy(x, &raw, 16);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          s[j] = St::from(x[j]);
          note(lo + v * kVec + j, St::key(s[j]));
        }
        uint4 packed;
        static_assert(sizeof(S) == sizeof(T), "a staged element keeps the score's width");
        memcpy(&packed, s, 16);  // f32: 4 keys; 16-bit: 8 raw values
        reinterpret_cast<uint4*>(stage)[v] = packed;
      }
      for (int i = lo + n_vec * kVec + tid; i < hi; i += kThreads) {
        const S s = St::from(row[i]);
        stage[i - lo] = s;
        note(i, St::key(s));
      }
    } else {
      for (int i = c_lo + tid; i < c_hi; i += kThreads) note(i, key_at(i));
    }
    // The cluster's CTAs must all be running before any DSMEM access: the first one follows.
    if (multi()) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const ulonglong2 m = block_allreduce(make_ulonglong2(mx, ~mn & 0xffffffffu),
                                         [](u64 a, u64 b) { return a > b ? a : b; });
    if (multi()) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    const ulonglong2* all = gather(m, 0);
    u64 gmx = 0, gmn_inv = 0;
    for (int r = 0; r < L.cluster; ++r) {
      gmx = max(gmx, all[r].x);
      gmn_inv = max(gmn_inv, all[r].y);
    }
    kmax = static_cast<uint32_t>(gmx);
    kmin = ~static_cast<uint32_t>(gmn_inv);
  }

  // Radix search over the candidates: the largest key t with weight(keys >= t) >= W, where
  // W = target(total weight). Exact integer sums, so every CTA of a cluster finds the same t.
  template <class Weight, class Target>
  __device__ Cut search(Weight weight, Target target) {
    int shift = kmin == kmax ? 0 : 32 - __clz(kmin ^ kmax);  // bits below the common prefix
    if (shift == 0) {
      const u64 total = static_cast<u64>(n_cand) * weight(kmax);
      return {kmax, 0, total, target(total)};
    }
    u64 prefix = static_cast<u64>(kmax) >> shift;
    u64 base = 0, at = 0, W = 0;
    bool first = true;
    while (shift > 0) {
      const int nb = min(kBits, shift), low = shift - nb;
      uint32_t* lo_w = hist() + (pass & 1) * 2 * kBins;  // zeroed, read by nobody
      uint32_t* hi_w = lo_w + kBins;
      const uint32_t prefix32 = static_cast<uint32_t>(prefix);  // shift < 32 after the first pass
#pragma unroll 1
      for (int i = c_lo + tid; i < c_hi; i += kThreads) {
        const uint32_t key = key_at(i);
        if (!first && (key >> shift) != prefix32) continue;  // first pass: all share the prefix
        const uint32_t d = (key >> low) & ((1u << nb) - 1);
        if constexpr (Weight::kUnit) {
          atomicAdd(lo_w + d, 1u);
        } else {
          // 64-bit exact sum from native 32-bit atomics: the add that wraps the low word
          // carries into the high word.
          const u64 w = weight(key);
          if (w == 0) continue;
          const uint32_t wl = static_cast<uint32_t>(w);
          const uint32_t old = atomicAdd(lo_w + d, wl);
          const uint32_t wh = static_cast<uint32_t>(w >> 32) + (old + wl < old ? 1u : 0u);
          if (wh) atomicAdd(hi_w + d, wh);
        }
      }
      sync_cluster();  // histograms complete; every CTA has finished reading the other buffer
      uint32_t* next = hist() + ((pass + 1) & 1) * 2 * kBins;
      for (int i = tid; i < 2 * kBins; i += kThreads) next[i] = 0;

      // This thread's bins, merged over the cluster; thread 0 holds the highest bins.
      const int c = kChunks - 1 - tid;
      u64 h[kBinsPerThread];
      u64 chunk = 0;
#pragma unroll
      for (int j = 0; j < kBinsPerThread; ++j) {
        h[j] = 0;
        if (tid < kChunks) {
          const int d = c * kBinsPerThread + j;
          if (multi()) {
            cg::cluster_group cl = cg::this_cluster();
            for (int r = 0; r < L.cluster; ++r) {
              const uint32_t* rl = cl.map_shared_rank(lo_w, r);
              const uint32_t* rh = cl.map_shared_rank(hi_w, r);
              h[j] += (static_cast<u64>(rh[d]) << 32) + rl[d];
            }
          } else {
            h[j] = (static_cast<u64>(hi_w[d]) << 32) + lo_w[d];
          }
        }
        chunk += h[j];
      }
      u64 above, total;
      ScanU64(sh.scan.s64).ExclusiveSum(chunk, above, total);
      if (first) W = target(total);  // the first pass sees every candidate
      u64 run = base + above;        // weight of all higher bins
      if (tid < kChunks) {
#pragma unroll
        for (int j = kBinsPerThread - 1; j >= 0; --j) {
          if (run < W && W - run <= h[j]) {  // exactly one bin in the CTA crosses W
            sh.cut = {static_cast<uint32_t>(c * kBinsPerThread + j), run, h[j], W};
          }
          run += h[j];
        }
      }
      __syncthreads();
      const Cut got = sh.cut;  // rewritten only after the next pass's sync_cluster
      prefix = (prefix << nb) | got.t;
      base = got.base;
      at = got.at;
      shift = low;
      first = false;
      ++pass;
    }
    return {static_cast<uint32_t>(prefix), base, at, W};
  }

  // Counts of candidates above / at t, segment totals and what precedes this CTA's slice.
  __device__ Tally tally(uint32_t t, int which) {
    uint32_t gt = 0, eq = 0;
    for (int i = c_lo + tid; i < c_hi; i += kThreads) {
      const uint32_t key = key_at(i);
      gt += key > t;
      eq += key == t;
    }
    const ulonglong2 v = block_allreduce(make_ulonglong2(gt, eq), [](u64 a, u64 b) { return a + b; });
    const int f_here = max(min(hi, n_sink) - lo, 0) + max(hi - max(lo, rstart), 0);
    const ulonglong2* all = gather(make_ulonglong2(v.x + f_here, v.y), which);
    Tally out{0, 0, 0};
    int sure_total = 0;
    for (int r = 0; r < L.cluster; ++r) {
      sure_total += static_cast<int>(all[r].x);
      if (r < rank) {
        out.sure_before += static_cast<int>(all[r].x);
        out.eq_before += static_cast<int>(all[r].y);
      }
    }
    out.gt_total = sure_total - forced;
    return out;
  }

  // Keys of the 4 positions i0..i0+3 (i0 - lo a multiple of 4, i0 < hi); only candidates'
  // keys are meaningful.
  __device__ __forceinline__ void keys4(int i0, uint32_t (&k)[4]) const {
    if (L.staged) {
      S s[4];
      if constexpr (sizeof(S) == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(stage() + (i0 - lo));
        memcpy(s, &v, 16);
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(stage() + (i0 - lo));
        memcpy(s, &v, 8);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) k[j] = St::key(s[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = i0 + j;
        k[j] = (i >= c_lo && i < c_hi) ? order_key(to_float(row()[i])) : 0u;
      }
    }
  }

  // 4. Kept positions ascending into the fixed-capacity row, then -1 padding and the count.
  __device__ void output(uint32_t t, int need_eq, const Tally& tl, int count) {
    int32_t* out = p.indices + static_cast<int64_t>(seg) * p.capacity;
    int carry_sure = tl.sure_before, carry_eq = tl.eq_before;
    for (int base = lo; base < hi; base += 4 * kThreads) {
      const int i0 = base + 4 * tid;
      uint32_t sure = 0, eq = 0;  // bit j: position i0 + j
      if (i0 < hi) {
        uint32_t k[4];
        keys4(i0, k);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int i = i0 + j;
          if (i >= hi) break;
          if (i < n_sink || i >= rstart) sure |= 1u << j;
          else if (k[j] > t) sure |= 1u << j;
          else if (k[j] == t) eq |= 1u << j;
        }
      }
      // Per-tile counts fit 16 bits (<= 4 * kThreads).
      uint32_t excl, agg;
      ScanU32(sh.scan.s32).ExclusiveSum((__popc(sure) << 16) | __popc(eq), excl, agg);
      int sb = carry_sure + static_cast<int>(excl >> 16);
      int eb = carry_eq + static_cast<int>(excl & 0xffffu);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (sure >> j & 1) {
          const int slot = sb + min(eb, need_eq);
          if (slot < p.capacity) out[slot] = i0 + j;
          ++sb;
        } else if (eq >> j & 1) {
          if (eb < need_eq && sb + eb < p.capacity) out[sb + eb] = i0 + j;
          ++eb;
        }
      }
      carry_sure += static_cast<int>(agg >> 16);
      carry_eq += static_cast<int>(agg & 0xffffu);
      __syncthreads();  // the scan storage is reused
    }
    for (int64_t i = count + rank * kThreads + tid; i < p.capacity; i += L.cluster * kThreads) {
      out[i] = -1;
    }
    if (rank == 0 && tid == 0) p.counts[seg] = count;
  }

  __device__ void run() {
    load();
    int64_t r = 0;  // int64 until clamped: k and min_keep are arbitrary
    int r_mass = -1, need_eq = 0;
    uint32_t t = 0;
    Tally tl{};
    if (p.by_mass) {
      double top_p = p.top_p ? static_cast<double>(p.top_p[seg]) : p.top_p_default;
      top_p = fmin(fmax(top_p, 0.0), 1.0);  // NaN -> 0
      const float m_max = key_mass(kmax);
      if (n_cand > 0 && top_p > 0.0 && m_max > 0.0f) {
        if (isinf(m_max)) {
          r = 1;  // T = inf: the first candidate (an inf) already reaches p * T
        } else {
          // q(m) < 2^Bq for every candidate and n_cand * 2^Bq <= 2^63: sums cannot overflow.
          const int log_n = n_cand > 1 ? 32 - __clz(static_cast<uint32_t>(n_cand - 1)) : 0;
          const int bq = min(max(63 - log_n, 32), 40);
          int e_max;
          frexpf(m_max, &e_max);  // m_max < 2^e_max
          const MassWeight w{bq - e_max - 150};
          const Cut c = search(w, [top_p](u64 total) {
            const double x = ceil(top_p * static_cast<double>(total));
            const u64 W = x >= static_cast<double>(total) ? total : static_cast<u64>(x);
            return W > 0 ? W : u64{1};
          });
          const u64 q = w(c.t);  // > 0: the crossing bin holds mass
          need_eq = static_cast<int>((c.target - c.base + q - 1) / q);
          t = c.t;
          tl = tally(t, 1);
          r = r_mass = tl.gt_total + need_eq;
        }
      }
    } else {
      const int64_t k = p.top_k.ptr ? p.top_k[seg] : p.top_k_default;
      r = k < 0 ? 0 : (k < n_cand ? k : n_cand);
    }
    r = r > p.min_keep - forced ? r : p.min_keep - forced;
    r = clamp64(r, 0, n_cand < p.capacity - forced ? n_cand : p.capacity - forced);
    if (r != r_mass) {
      if (r == 0) {
        t = 0xffffffffu, need_eq = 0;  // no key is above it, none equals it
      } else if (r == n_cand) {
        t = 0, need_eq = 0;  // every key is above it (order_key never returns 0)
      } else {
        const Cut c = search(CountWeight{}, [r](u64) { return static_cast<u64>(r); });
        t = c.t;
        need_eq = static_cast<int>(r - static_cast<int64_t>(c.base));
      }
      tl = tally(t, 2);
    }
    output(t, need_eq, tl, forced + static_cast<int>(r));
  }
};

// Occupancy targets: 1280 short segments in one wave (132 SMs), 2 large CTAs per SM.
template <typename T, int kThreads, int kBits>
__global__ void __launch_bounds__(kThreads, kThreads <= 128 ? 10 : (kThreads == 256 ? 5 : 2))
    select_radix(const SelectParams p, const SelectLaunch L) {
  using Sel = RadixSelect<T, kThreads, kBits>;
  __shared__ typename Sel::Shared sh;
  Sel sel(p, L, sh);
  sel.run();
}

template <typename T, int kThreads, int kBits>
cudaError_t launch(const SelectParams& p, const SelectLaunch& L, cudaStream_t stream) {
  using Sel = RadixSelect<T, kThreads, kBits>;
  const auto kernel = select_radix<T, kThreads, kBits>;
  const size_t smem = Sel::smem_bytes(L);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.S * L.cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(L.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = L.cluster > 1 ? 1 : 0;
  err = cudaLaunchKernelEx(&cfg, kernel, p, L);
  return err != cudaSuccess ? err : cudaGetLastError();
}

inline int round_up16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }

}  // namespace select_detail

// Strategy by segment width N (every segment of a launch has length <= N):
//   N <= 1024:  one 64-thread CTA per segment, 8-bit digits (many short segments: little
//               per-pass overhead, up to 32 CTAs per SM)
//   N <= 2048:  one 128-thread CTA per segment, 8-bit digits
//   N <= 8192:  one 256-thread CTA per segment, 8-bit digits
//   larger:     512-thread CTAs with 11-bit digits, one per 64 KB slice, clusters of up to 8
//               CTAs per segment; beyond 8 slices the slices are re-read from global memory.
constexpr int64_t kSelectTinyN = 1024, kSelectSmallN = 2048, kSelectMediumN = 8192;

// CTAs that work on one segment of width N (the grid has S times as many).
inline int select_ctas_per_segment(int64_t N, int64_t elem_size) {
  if (N <= kSelectMediumN) return 1;
  const int64_t per_cta = kSelectStageBytes / elem_size;
  const int64_t ctas = (N + per_cta - 1) / per_cta;
  return static_cast<int>(ctas < kSelectMaxCluster ? ctas : kSelectMaxCluster);
}

template <typename T>
cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  using namespace select_detail;
  if (p.S == 0) return cudaSuccess;
  const int64_t N = p.N;
  if (N <= kSelectTinyN) return launch<T, 64, 8>(p, {1, round_up16(N > 0 ? N : 1), true}, stream);
  if (N <= kSelectSmallN) return launch<T, 128, 8>(p, {1, round_up16(N), true}, stream);
  if (N <= kSelectMediumN) return launch<T, 256, 8>(p, {1, round_up16(N), true}, stream);
  const int cluster = select_ctas_per_segment(N, sizeof(T));
  const bool staged = N <= static_cast<int64_t>(cluster) * (kSelectStageBytes / sizeof(T));
  if (p.S * cluster > INT32_MAX) return cudaErrorInvalidConfiguration;
  return launch<T, 512, 11>(p, {cluster, round_up16((N + cluster - 1) / cluster), staged}, stream);
}

}  // namespace pyramid_kv::kernels

// Segmented top-p / top-k for short segments (N <= 1024, docs/ops.md): one warp per segment,
// its scores in registers, no block barrier. docs/perf/select.md has the costs.
//
// Lane l holds positions 128 j + 4 l + e (j < kVecs, e < 4) as order keys, 0 for forced
// positions and those past the length (no score maps to 0). The cut is the largest key t whose
// weight W(keys >= t) reaches the target, W a count (top-k, floor, cap) or a mass (top-p); the
// warp finds t bit by bit from the top, tracking the open interval [t, hi) of keys still in
// question: a round weighs W(>= c) for c splitting the open keys at their highest differing bit
// (the bits above it are taken without a round), and once at most 32 keys remain open it lists
// them and picks t among them in one step.
//
// Top-p masses are integers: a mass m becomes ceil(m * 2^(kMassBits + 150 - e_top)), e_top the
// exponent field of the largest candidate, so every unit mass is < 2^37 and a segment's sum
// < 2^47, with the count of keys packed above bit 48 (one 64-bit add per key and round; three
// 24-bit warp reductions). Sums are exact and order-free (the same input gives the same cut
// every run); the rounding (< 2^-36 of the largest mass per key; a positive mass never rounds
// to 0) keeps the cut the definition's one up to 2^-26 of the total.
#pragma once

#include "common.cuh"
#include "select_params.cuh"

namespace pyramid_kv::kernels {

namespace select_warp_detail {

using u64 = unsigned long long;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;                      // segments per block
constexpr uint32_t kKeyZero = 0x80000000u;     // key of +0: no mass at or below it
constexpr uint32_t kKeyInf = 0xff800000u;      // key of +inf
constexpr int kMassBits = 13;                  // unit masses <= 2^(kMassBits + 24)
constexpr int kCountShift = 48;                // packed weight: count << 48 | unit mass
constexpr u64 kMassMask = (1ull << kCountShift) - 1;

// The unit of the integer masses: 2^(kMassBits + 150 - e_top), e_top = max(exponent field of
// the largest candidate, 1).
__device__ __forceinline__ double mass_scale(int e_top) {
  return __longlong_as_double(static_cast<long long>(1023 + 150 + kMassBits - e_top) << 52);
}

// Integer mass of a key: the score times a power of two is exact in double, and rounds up
// (never to 0).
__device__ __forceinline__ u64 mass_units(uint32_t key, double scale) {
  // Negative scores, NaN, -inf, zeros and forced positions (key 0) weigh nothing.
  return __double2ull_ru(static_cast<double>(key_mass(key)) * scale);
}

// Warp sum of values < 2^59 whose sum is < 2^64, by three 24-bit reductions (one instruction
// each; five shuffle steps of two halves measured 2-3% slower at 1280 x 768).
__device__ __forceinline__ u64 warp_sum64(u64 v) {
  const u64 a = __reduce_add_sync(kFull, static_cast<unsigned>(v) & 0xffffffu);
  const u64 b = __reduce_add_sync(kFull, static_cast<unsigned>(v >> 24) & 0xffffffu);
  const u64 c = __reduce_add_sync(kFull, static_cast<unsigned>(v >> 48));
  return a + (b << 24) + (c << 48);
}

// A predicated store (the compiler would branch around a conditional one).
__device__ __forceinline__ void store_if(bool pred, int32_t* ptr, int32_t v) {
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %0, 0;\n\t@q st.global.b32 [%1], %2;\n\t}" ::"r"(
                   static_cast<int>(pred)), "l"(ptr), "r"(v)
               : "memory");
}

// Exclusive prefix sum over the lanes.
__device__ __forceinline__ int warp_exclusive(int v, int lane) {
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  return x - v;
}

// Four consecutive scores as floats; positions past n (the row length) are not read.
template <typename T>
__device__ __forceinline__ void load4(const T* row, int i, int n, bool vec_ok, float (&x)[4]) {
  if (vec_ok && i + 3 < n) {
    if constexpr (sizeof(T) == 4) {
      const float4 v = *reinterpret_cast<const float4*>(row + i);
      x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(row + i);
      T h[4];
      memcpy(h, &v, sizeof(v));
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e] = to_float(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = i + e < n ? to_float(row[i + e]) : 0.0f;
  }
}

// The cut: keep the keys above t, and the first need_eq keys equal to t in position order.
struct Cut {
  uint32_t t;
  int need_eq, n_eq;  // n_eq: keys equal to t
  int64_t r;          // kept candidates: keys above t + need_eq
};

// A predicated shared store of one list entry (the compiler would branch around a conditional
// one).
__device__ __forceinline__ void list_if(bool pred, uint4* entry, uint4 v) {
  const uint32_t a = smem_addr(entry);
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %0, 0;\n\t@q st.shared.v4.u32 [%1], {%2, %3, %4, %5};\n\t}" ::"r"(
                   static_cast<int>(pred)), "r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// min(ceil(left / unit), cap) for unit * cap < 2^63 (unit 0 gives cap): a float estimate made
// exact in a step or two (the quotient is < cap <= 1024 there), instead of a 64-bit division
// subroutine.
__device__ __forceinline__ int ceil_div_capped(u64 left, u64 unit, int cap) {
  if (left >= unit * static_cast<u64>(cap)) return cap;
  int q = static_cast<int>(__fdividef(static_cast<float>(left), static_cast<float>(unit)));
  while (static_cast<u64>(q) * unit < left) ++q;
  while (q > 0 && static_cast<u64>(q - 1) * unit >= left) --q;
  return q;
}

// The largest key t with W(>= t) >= target (1 <= target <= W(>= 1)); weights: unit masses
// (kMass; q packs count << 48 | mass) or 1. `n` candidates have keys in [kmin, kmax]; s_list:
// the warp's list of 32 entries {key, -, weight} (n_open counts the candidate keys in [t, hi)
// exactly, so at most 32 are listed).
template <bool kMass, int kPer>
__device__ Cut find_cut(const uint32_t (&key)[kPer], const u64 (&q)[kPer], u64 target, uint32_t kmin,
                        uint32_t kmax, int n, double scale, uint4* s_list, int lane) {
  uint32_t t = 0, hi = kmax + 1;  // W(>= t) >= target > W(>= hi); kmax < 2^32 - 1
  u64 w_hi = 0;                   // W(>= hi)
  int n_hi = 0, n_open = n;       // keys >= hi; keys in [t, hi)
  while (n_open > 32) {
    // The open keys lie in [lo, hi - 1], lo = max(t, kmin): the bits above their highest
    // differing bit d are common, so t takes them without a round (a candidate c above hi - 1
    // weighs W(>= hi) < target, one at or below kmin weighs W(>= t)), and c splits at bit d.
    const uint32_t lo = max(t, kmin);
    if (lo == hi - 1) {  // one key value left: every bit decided
      t = lo;
      break;
    }
    const int d = 31 - __clz(lo ^ (hi - 1));
    t = lo & ~((2u << d) - 1u);  // d == 31: 2u << 31 wraps to 0, so t = 0
    const uint32_t c = t | (1u << d);
    // W(>= c) directly (one compare per key; keys >= hi count too), in four chains of adds.
    u64 w[4] = {0, 0, 0, 0};
    int ge = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const bool x = key[i] >= c;
      if constexpr (kMass) w[i & 3] += x ? q[i] : 0;
      else ge += x ? 1 : 0;
    }
    u64 wc;
    if constexpr (kMass) {
      const u64 sum = warp_sum64((w[0] + w[1]) + (w[2] + w[3]));
      ge = static_cast<int>(sum >> kCountShift);
      wc = sum & kMassMask;
    } else {
      ge = static_cast<int>(__reduce_add_sync(kFull, ge));
      wc = ge;
    }
    const int in = ge - n_hi;  // keys in [c, hi)
    if (wc >= target) {
      t = c;
      n_open = in;
    } else {
      hi = c;
      w_hi = wc;
      n_hi = ge;
      n_open -= in;
    }
  }
  Cut cut;
  u64 w_gt = w_hi;
  int n_gt = n_hi;
  if (n_open <= 32) {
    // List the keys of [t, hi) with their weights in consecutive slots (a lane's from a scan of
    // the lanes' counts; predicated stores) and pick t among them. (t may still be 0 here: key
    // 0, forced or past the length, is never listed.)
    int mine = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) mine += key[i] != 0u && key[i] - t < hi - t ? 1 : 0;
    int slot = warp_exclusive(mine, lane);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const bool listed = key[i] != 0u && key[i] - t < hi - t;
      const u64 wi = kMass ? q[i] & kMassMask : 1u;
      list_if(listed, s_list + slot, make_uint4(key[i], 0u, static_cast<unsigned>(wi), static_cast<unsigned>(wi >> 32)));
      slot += listed ? 1 : 0;
    }
    __syncwarp();
    const bool has = lane < n_open;
    const uint4 mine_e = has ? s_list[lane] : make_uint4(0u, 0u, 0u, 0u);
    const uint32_t kj = has ? mine_e.x : 0u;
    const u64 wj = has ? (static_cast<u64>(mine_e.w) << 32 | mine_e.z) : 0u;
    u64 ge = w_hi;
#pragma unroll 4
    for (int i = 0; i < n_open; ++i) {
      const uint4 e = s_list[i];
      if (e.x >= kj) ge += static_cast<u64>(e.w) << 32 | e.z;
    }
    __syncwarp();  // the list is read before it is written again
    cut.t = __reduce_max_sync(kFull, has && ge >= target ? kj : 0u);
    const bool gt = has && kj > cut.t;
    w_gt += kMass ? warp_sum64(gt ? wj : 0u) : 0u;
    n_gt += __popc(__ballot_sync(kFull, gt));
    if constexpr (!kMass) w_gt = static_cast<u64>(n_gt);
    cut.n_eq = __popc(__ballot_sync(kFull, has && kj == cut.t));
  } else {  // every bit decided: [t, hi) holds the single key t
    cut.t = t;
    cut.n_eq = n_open;
  }
  // target - W(> t) > 0 is met by the first need_eq keys equal to t, each of weight w(t).
  const u64 left = target - w_gt;
  if constexpr (kMass) {
    cut.need_eq = ceil_div_capped(left, mass_units(cut.t, scale), cut.n_eq);
  } else {
    cut.need_eq = static_cast<int>(left < static_cast<u64>(cut.n_eq) ? left : static_cast<u64>(cut.n_eq));
  }
  cut.r = n_gt + cut.need_eq;
  return cut;
}

template <typename T, int kVecs>
__global__ void __launch_bounds__(kWarps * 32) select_warp(const SelectParams p) {
  constexpr int kPer = 4 * kVecs;
  __shared__ uint4 s_list[kWarps][32];  // find_cut's lists
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (seg >= p.S) return;  // warp-uniform; no block barrier below

  // The length and the budget load beside the scores.
  const int64_t len_raw = p.lengths[seg];
  double top_p = 0.0;
  int64_t top_k = 0;
  if (p.by_mass) top_p = p.top_p ? static_cast<double>(p.top_p[seg]) : p.top_p_default;
  else top_k = p.top_k.ptr ? p.top_k[seg] : p.top_k_default;
  const int N = static_cast<int>(p.N);
  const T* row = static_cast<const T*>(p.scores) + seg * p.row_stride;
  const bool vec_ok = reinterpret_cast<uintptr_t>(p.scores) % (4 * sizeof(T)) == 0 && p.row_stride % 4 == 0;
  float x[kPer];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    float v[4];
    load4(row, 128 * j + 4 * lane, N, vec_ok, v);
#pragma unroll
    for (int e = 0; e < 4; ++e) x[4 * j + e] = v[e];
  }

  // Geometry: forced [0, ns) and [rs, len), candidates [ns, rs).
  const int len = static_cast<int>(clamp64(len_raw, 0, p.N));
  const int ns = static_cast<int>(p.sink < len ? p.sink : len);
  const int rs = static_cast<int>(len - p.recent > ns ? len - p.recent : ns);
  const int forced = ns + (len - rs), n_cand = rs - ns;
  uint32_t key[kPer];
  uint32_t kmax = 0, kmin = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int pos = 128 * (i / 4) + 4 * lane + i % 4;
    key[i] = static_cast<unsigned>(pos - ns) < static_cast<unsigned>(n_cand) ? order_key(x[i]) : 0u;
    kmax = max(kmax, key[i]);
    kmin = min(kmin, key[i] - 1u);  // key 0 wraps to the top
  }
  kmax = __reduce_max_sync(kFull, kmax);
  kmin = __reduce_min_sync(kFull, kmin) + 1u;

  // Budget r (docs/ops.md): top-p by mass or top-k, then the floor and the cap.
  u64 q[kPer];
  int64_t r = 0, r_mass = -1;
  Cut cut{0xffffffffu, 0, 0, 0};  // keeps none
  if (p.by_mass) {
    top_p = fmin(fmax(top_p, 0.0), 1.0);  // NaN -> 0
    if (n_cand > 0 && top_p > 0.0 && kmax > kKeyZero) {  // else no candidate has mass: r = 0
      if (kmax >= kKeyInf) {
        r = 1;  // an infinite mass: the first candidate reaches p * T
      } else {
        const double scale = mass_scale(max(static_cast<int>((kmax & 0x7fffffffu) >> 23), 1));
        u64 total = 0;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          q[i] = mass_units(key[i], scale) | (key[i] != 0u ? 1ull << kCountShift : 0u);
          total += q[i];
        }
        total = warp_sum64(total) & kMassMask;
        const double x_target = ceil(top_p * static_cast<double>(total));  // >= 1
        const u64 target = x_target >= static_cast<double>(total) ? total : static_cast<u64>(x_target);
        cut = find_cut<true>(key, q, target, kmin, kmax, n_cand, scale, s_list[warp], lane);
        r = r_mass = cut.r;
      }
    }
  } else {
    r = top_k < 0 ? 0 : (top_k < n_cand ? top_k : n_cand);
  }
  r = r > p.min_keep - forced ? r : p.min_keep - forced;
  r = clamp64(r, 0, n_cand < p.capacity - forced ? n_cand : p.capacity - forced);
  if (r != r_mass) {
    if (r == 0) {
      cut = {0xffffffffu, 0, 0, 0};
    } else if (r == n_cand) {
      cut = {0u, 0, 0, r};  // every candidate key is above 0
    } else {
      cut = find_cut<false>(key, q, static_cast<u64>(r), kmin, kmax, n_cand, 1.0, s_list[warp], lane);
    }
  }

  // Output: forced positions, keys above t, and the first need_eq keys equal to t (position
  // order: ranks by ballots only when some tie at t is dropped), ascending, then -1.
  unsigned keep[kVecs];
  int eq_before = 0;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    unsigned eq = 0;
    keep[j] = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t k = key[4 * j + e];
      const bool is_forced = k == 0u && 128 * j + 4 * lane + e < len;  // candidates have keys > 0
      keep[j] |= (is_forced || (k > cut.t) ? 1u : 0u) << e;
      eq |= (k == cut.t && k != 0u ? 1u : 0u) << e;
    }
    if (cut.need_eq < cut.n_eq) {  // warp-uniform
      int rank = eq_before;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const unsigned b = __ballot_sync(kFull, (eq >> e) & 1u);
        rank += __popc(b & lanemask_lt());
        eq_before += __popc(b);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (((eq >> e) & 1u) && rank + __popc(eq & ((1u << e) - 1u)) < cut.need_eq) keep[j] |= 1u << e;
      }
    } else if (cut.need_eq > 0) {
      keep[j] |= eq;
    }
  }
  // Slots: the lane's counts of 4 vectors, a byte each (a vector keeps <= 128 positions), go
  // through one shuffle scan.
  int32_t* out = p.indices + seg * p.capacity;
  int base = 0;
#pragma unroll
  for (int g = 0; g < kVecs; g += 4) {
    unsigned mine = 0;
#pragma unroll
    for (int jj = 0; jj < 4 && g + jj < kVecs; ++jj) mine |= static_cast<unsigned>(__popc(keep[g + jj])) << (8 * jj);
    unsigned incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const unsigned y = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned excl = incl - mine, total = __shfl_sync(kFull, incl, 31);
#pragma unroll
    for (int jj = 0; jj < 4 && g + jj < kVecs; ++jj) {
      const int j = g + jj;
      const int slot = base + static_cast<int>((excl >> (8 * jj)) & 0xffu);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        store_if((keep[j] >> e) & 1u, out + slot + __popc(keep[j] & ((1u << e) - 1u)), 128 * j + 4 * lane + e);
      }
      base += static_cast<int>((total >> (8 * jj)) & 0xffu);
    }
  }
  // -1 padding of [base, capacity), in 16-byte stores where the row is aligned.
  int64_t pad = base;
  const int64_t v0 = (base + 3) / 4, v1 = p.capacity / 4;
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0 && v0 < v1) {
    if (lane < 4 * v0 - base) out[base + lane] = -1;
    for (int64_t v = v0 + lane; v < v1; v += 32) reinterpret_cast<int4*>(out)[v] = make_int4(-1, -1, -1, -1);
    pad = 4 * v1;
  }
  for (int64_t i = pad + lane; i < p.capacity; i += 32) out[i] = -1;
  if (lane == 0) p.counts[seg] = base;
}

}  // namespace select_warp_detail

// One warp per segment, for N <= kSelectWarpMaxN.
constexpr int64_t kSelectWarpMaxN = 1024;

template <typename T>
cudaError_t launch_select_warp(const SelectParams& p, cudaStream_t stream) {
  using namespace select_warp_detail;
  const unsigned grid = static_cast<unsigned>((p.S + kWarps - 1) / kWarps);
  const int64_t vecs = (p.N + 127) / 128;
  if (vecs <= 1) select_warp<T, 1><<<grid, kWarps * 32, 0, stream>>>(p);
  else if (vecs <= 2) select_warp<T, 2><<<grid, kWarps * 32, 0, stream>>>(p);
  else if (vecs <= 4) select_warp<T, 4><<<grid, kWarps * 32, 0, stream>>>(p);
  else if (vecs <= 6) select_warp<T, 6><<<grid, kWarps * 32, 0, stream>>>(p);
  else select_warp<T, 8><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

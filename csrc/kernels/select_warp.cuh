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
// exponent field of the largest candidate, so every unit mass is <= 2^30. A key weighs its unit
// mass and a count of 1, held as two floats of integers (lo = (m mod 2^12) << 6 | 1, hi =
// m >> 12): a lane's sums over its <= 32 keys stay <= 2^23, so a round is one compare and two
// predicated float adds per key, then three warp reductions (count, low and high mass), exact
// and order-free (the same input gives the same cut every run). The rounding (< 2^-29 of the
// largest mass per key; a positive mass never rounds to 0) keeps the cut the definition's one
// up to 2^-19 of the total.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "select_params.cuh"

namespace pyramid_kv::kernels {

namespace select_warp_detail {

using u64 = unsigned long long;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;                      // segments per block
constexpr uint32_t kKeyZero = 0x80000000u;     // key of +0: no mass at or below it
constexpr uint32_t kKeyInf = 0xff800000u;      // key of +inf
constexpr int kMassBits = 6;                   // unit masses <= 2^(kMassBits + 24)
constexpr float kMagic = 8388608.0f;           // 2^23: x + 2^23 holds an integer x <= 2^23 exactly

// The unit of the integer masses: 2^(kMassBits + 150 - e_top), e_top = max(exponent field of
// the largest candidate, 1).
__device__ __forceinline__ double mass_scale(int e_top) {
  return __longlong_as_double(static_cast<long long>(1023 + 150 + kMassBits - e_top) << 52);
}

// Integer mass of a key: the score times a power of two is exact in double, and rounds up
// (never to 0).
__device__ __forceinline__ uint32_t mass_units(uint32_t key, double scale) {
  // Negative scores, NaN, -inf, zeros and forced positions (key 0) weigh nothing.
  return static_cast<uint32_t>(__double2ull_ru(static_cast<double>(key_mass(key)) * scale));
}

// An integer 0 <= v < 2^23 as a float: the bits of 2^23, or'ed with v, are the float 2^23 + v.
__device__ __forceinline__ float int_float(uint32_t v) { return __uint_as_float(v | 0x4b000000u) - kMagic; }
// The inverse for a sum held as 2^23 + v (0 <= v < 2^23): its bits less those of 2^23, exactly.
__device__ __forceinline__ uint32_t float_int(float x) { return __float_as_uint(x) - 0x4b000000u; }

// A key's weight as two floats (see the top): lo = (m mod 2^12) << 6 | 1, hi = m >> 12 (key 0
// too: no search counts it).
struct Weight {
  float lo, hi;
};
__device__ __forceinline__ Weight make_weight(uint32_t m) {
  return {int_float((m & 0xfffu) << 6 | 1u), int_float(m >> 12)};
}

// mass_units(key) for e_top >= 30 without the conversions (a quarter of the issue rate): the
// score times 2^(kMassBits + 150 - e_top) is built from its bits (`bias` = (796 - e_top) << 20
// adds that to the exponent field) and rounded up to an integer by an add to 2^52. A denormal
// score gets the wrong double, but one in (0, 1] like its true value, so the same unit; a key
// without mass becomes -0 or a negative denormal, which the add rounds to 0.
__device__ __forceinline__ uint32_t mass_units_fast(uint32_t key, uint32_t bias) {
  const uint32_t hi = key > kKeyZero ? (key >> 3) + bias : 0x80000000u;
  const double r = __dadd_ru(__hiloint2double(static_cast<int>(hi), static_cast<int>(key << 29)), 0x1p52);
  return static_cast<uint32_t>(__double2loint(r));
}

// A segment's unit of mass: mass_units_fast's bias when e_top >= 30 (else 0), and the scale.
struct MassUnit {
  uint32_t bias;
  double scale;
  __device__ explicit MassUnit(int e_top)
      : bias(e_top >= 30 ? static_cast<uint32_t>(796 - e_top) << 20 : 0u), scale(mass_scale(e_top)) {}
  __device__ uint32_t of(uint32_t key) const { return bias ? mass_units_fast(key, bias) : mass_units(key, scale); }
};

// A key's weight: top-p (kMass) or top-k (1, no mass).
template <bool kMass>
__device__ __forceinline__ Weight weigh(uint32_t key, const MassUnit& unit) {
  if constexpr (!kMass) return {1.0f, 0.0f};
  return make_weight(unit.of(key));
}

// A weight sum W: unit mass (top-k: the count) and keys.
struct Sum {
  u64 mass;
  int count;
};

// A lane's weight sum, given as 2^23 + the sum of its lo floats and 2^23 + the sum of its hi
// floats (top-k: 2^23 + its count).
template <bool kMass>
__device__ __forceinline__ Sum lane_sum(float lo, float hi) {
  const uint32_t l = float_int(lo);
  if constexpr (!kMass) return {l, static_cast<int>(l)};
  return {(static_cast<u64>(float_int(hi)) << 12) + (l >> 6), static_cast<int>(l & 63u)};
}

// The warp's sum of the lanes' weight sums (given as lane_sum's): each part reduced on its own
// in 32 bits (count, low and high mass), then put together as lane_sum does.
template <bool kMass>
__device__ __forceinline__ Sum warp_sum(float lo, float hi) {
  const uint32_t l = float_int(lo);
  if constexpr (!kMass) {
    const uint32_t n = __reduce_add_sync(kFull, l);
    return {n, static_cast<int>(n)};
  }
  const uint32_t h = __reduce_add_sync(kFull, float_int(hi));
  return {(static_cast<u64>(h) << 12) + __reduce_add_sync(kFull, l >> 6),
          static_cast<int>(__reduce_add_sync(kFull, l & 63u))};
}

// Where key >= c: a += va (and b += vb). One compare and predicated float adds: ptxas keeps
// these predicated, where it turns a predicated 64-bit add into an add and two selects.
__device__ __forceinline__ void add_if_ge(uint32_t key, uint32_t c, float& a, float va) {
  asm("{\n\t.reg .pred q;\n\tsetp.ge.u32 q, %1, %2;\n\t@q add.f32 %0, %0, %3;\n\t}"
      : "+f"(a)
      : "r"(key), "r"(c), "f"(va));
}
__device__ __forceinline__ void add_if_ge(uint32_t key, uint32_t c, float& a, float va, float& b, float vb) {
  asm("{\n\t.reg .pred q;\n\tsetp.ge.u32 q, %2, %3;\n\t@q add.f32 %0, %0, %4;\n\t@q add.f32 %1, %1, %5;\n\t}"
      : "+f"(a), "+f"(b)
      : "r"(key), "r"(c), "f"(va), "f"(vb));
}

// A predicated store (the compiler would branch around a conditional one).
__device__ __forceinline__ void store_if(bool pred, int32_t* ptr, int32_t v) {
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %0, 0;\n\t@q st.global.b32 [%1], %2;\n\t}" ::"r"(
                   static_cast<int>(pred)), "l"(ptr), "r"(v)
               : "memory");
}

// Four consecutive scores, raw (positions past n, the row length, are not read and hold 0), and
// as floats. The raw loads of a row all go out before any conversion: a 16-bit conversion next
// to its load would wait for it before the next load is issued.
template <typename T>
using Raw4 = std::conditional_t<sizeof(T) == 4, uint4, uint2>;

template <typename T>
__device__ __forceinline__ Raw4<T> load4(const T* row, int i, int n, bool vec_ok) {
  if (vec_ok && i + 3 < n) return *reinterpret_cast<const Raw4<T>*>(row + i);
  T h[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = i + e < n ? row[i + e] : T(0.0f);
  Raw4<T> v;
  memcpy(&v, h, sizeof(v));
  return v;
}

template <typename T>
__device__ __forceinline__ void to_floats(const Raw4<T>& v, float* x) {
  T h[4];
  memcpy(h, &v, sizeof(v));
#pragma unroll
  for (int e = 0; e < 4; ++e) x[e] = to_float(h[e]);
}

// The cut: keep the keys above t, and the first need_eq keys equal to t in position order.
struct Cut {
  uint32_t t;
  int need_eq, n_eq;  // n_eq: keys equal to t
  int64_t r;          // kept candidates: keys above t + need_eq
};

// A warp's list of up to 32 keys and their weights.
struct alignas(16) List {
  uint32_t key[32];
  float lo[32], hi[32];
};

// A predicated shared store of a listed key (the compiler would branch around a conditional
// one).
__device__ __forceinline__ void list_if(bool pred, uint32_t* entry, uint32_t key) {
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %0, 0;\n\t@q st.shared.u32 [%1], %2;\n\t}" ::"r"(
                   static_cast<int>(pred)), "r"(smem_addr(entry)), "r"(key)
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

// The largest key t with W(>= t) >= target (1 <= target <= W(>= 1)); weights: top-p (kMass)
// the keys' w in `unit`, top-k 1. `n` candidates have keys in [kmin,
// kmax], `mine` of them in this lane; `list` is the warp's (n_open counts the candidate keys in
// [t, hi) exactly, so at most 32 are listed).
template <bool kMass, int kPer>
__device__ Cut find_cut(const uint32_t (&key)[kPer], const Weight (&w)[kPer], u64 target, uint32_t kmin,
                        uint32_t kmax, int n, int mine, const MassUnit& unit, List& list, int lane) {
  uint32_t t = 0, hi = kmax + 1;  // W(>= t) >= target > W(>= hi); kmax < 2^32 - 1
  Sum w_hi{0, 0};                 // W(>= hi)
  int n_open = n;                 // keys in [t, hi)
  int mine_t = mine, mine_hi = 0;  // this lane's keys >= max(t, 1) and >= hi
  while (n_open > 32) {
    // The open keys lie in [lo, hi - 1], lo = max(t, kmin): the bits above their highest
    // differing bit d are common, so t takes them without a round (a candidate c above hi - 1
    // weighs W(>= hi) < target, one at or below kmin weighs W(>= t); no key lies in between, so
    // the counts hold), and c splits at bit d.
    const uint32_t lo = max(t, kmin);
    if (lo == hi - 1) {  // one key value left: every bit decided
      t = lo;
      break;
    }
    const int d = 31 - __clz(lo ^ (hi - 1));
    t = lo & ~((2u << d) - 1u);  // d == 31: 2u << 31 wraps to 0, so t = 0
    const uint32_t c = t | (1u << d);
    // W(>= c) directly (one compare per key; keys >= hi count too; key 0 never: c >= 1), in
    // four chains of adds.
    float a[4] = {kMagic, 0.0f, 0.0f, 0.0f}, b[4] = {kMagic, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if constexpr (kMass) add_if_ge(key[i], c, a[i & 3], w[i].lo, b[i & 3], w[i].hi);
      else add_if_ge(key[i], c, a[i & 3], 1.0f);
    }
    const float sa = (a[0] + a[1]) + (a[2] + a[3]), sb = (b[0] + b[1]) + (b[2] + b[3]);
    const Sum wc = warp_sum<kMass>(sa, sb);
    const int lane_ge = lane_sum<kMass>(sa, sb).count;  // this lane's keys >= c
    const int in = wc.count - w_hi.count;  // keys in [c, hi)
    if (wc.mass >= target) {
      t = c;
      n_open = in;
      mine_t = lane_ge;
    } else {
      hi = c;
      w_hi = wc;
      n_open -= in;
      mine_hi = lane_ge;
    }
  }
  Cut cut;
  Sum w_gt = w_hi;
  if (n_open <= 32) {
    // List the keys of [max(t, 1), hi) in consecutive slots (a lane's from a scan of the
    // lanes' counts; predicated stores); lane j weighs entry j, and every lane sums the weights
    // of the entries at or above its own to pick t.
    const uint32_t lo = max(t, 1u);
    int slot = warp_inclusive_sum(mine_t - mine_hi, lane) - (mine_t - mine_hi);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const bool listed = key[i] - lo < hi - lo;
      list_if(listed, list.key + slot, key[i]);
      slot += listed ? 1 : 0;
    }
    __syncwarp();
    const bool has = lane < n_open;
    const uint32_t kj = has ? list.key[lane] : 0u;
    const Weight wj = has ? weigh<kMass>(kj, unit) : Weight{0.0f, 0.0f};
    if (has) {
      list.lo[lane] = wj.lo;
      list.hi[lane] = wj.hi;
    } else {
      list.key[lane] = 0u;  // below every listed key: the vector reads past n_open add nothing
    }
    __syncwarp();
    float a[2] = {kMagic, 0.0f}, b[2] = {kMagic, 0.0f};
    for (int i = 0; i < n_open; i += 4) {
      const uint4 k4 = *reinterpret_cast<const uint4*>(list.key + i);
      const float4 l4 = *reinterpret_cast<const float4*>(list.lo + i);
      const float4 h4 = *reinterpret_cast<const float4*>(list.hi + i);
      add_if_ge(k4.x, kj, a[0], l4.x, b[0], h4.x);
      add_if_ge(k4.y, kj, a[1], l4.y, b[1], h4.y);
      add_if_ge(k4.z, kj, a[0], l4.z, b[0], h4.z);
      add_if_ge(k4.w, kj, a[1], l4.w, b[1], h4.w);
    }
    __syncwarp();  // the list is read before it is written again
    // W(>= kj): this lane's sums, without a reduction.
    const u64 ge = w_hi.mass + lane_sum<kMass>(a[0] + a[1], b[0] + b[1]).mass;
    cut.t = __reduce_max_sync(kFull, has && ge >= target ? kj : 0u);
    const bool gt = has && kj > cut.t;
    const Sum s_gt = warp_sum<kMass>(gt ? wj.lo + kMagic : kMagic, gt ? wj.hi + kMagic : kMagic);
    w_gt.mass += s_gt.mass;
    w_gt.count += s_gt.count;
    cut.n_eq = __popc(__ballot_sync(kFull, has && kj == cut.t));
  } else {  // every bit decided: [t, hi) holds the single key t
    cut.t = t;
    cut.n_eq = n_open;
  }
  // target - W(> t) > 0 is met by the first need_eq keys equal to t, each of weight w(t).
  const u64 left = target - w_gt.mass;
  if constexpr (kMass) {
    cut.need_eq = cut.n_eq == 1 ? 1 : ceil_div_capped(left, unit.of(cut.t), cut.n_eq);
  } else {
    cut.need_eq = static_cast<int>(left < static_cast<u64>(cut.n_eq) ? left : static_cast<u64>(cut.n_eq));
  }
  cut.r = w_gt.count + cut.need_eq;
  return cut;
}

template <typename T, int kVecs>
__global__ void __launch_bounds__(kWarps * 32) select_warp(const SelectParams p) {
  constexpr int kPer = 4 * kVecs;
  __shared__ List s_list[kWarps];  // find_cut's lists
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (seg >= p.S) return;  // warp-uniform; no block barrier below

  // The length and the budget load beside the scores.
  const int64_t len_raw = p.lengths[seg];
  double top_p = 0.0;
  int64_t top_k = 0;
  load_budget(p, seg, top_p, top_k);
  const int N = static_cast<int>(p.N);
  const T* row = static_cast<const T*>(p.scores) + seg * p.row_stride;
  const bool vec_ok = reinterpret_cast<uintptr_t>(p.scores) % (4 * sizeof(T)) == 0 && p.row_stride % 4 == 0;
  Raw4<T> raw[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) raw[j] = load4(row, 128 * j + 4 * lane, N, vec_ok);
  float x[kPer];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) to_floats<T>(raw[j], x + 4 * j);

  const SegmentGeometry geo = segment_geometry(p, len_raw);
  const int len = geo.len, ns = geo.n_sink, n_cand = geo.n_cand;
  uint32_t key[kPer];
  uint32_t kmax = 0, kmin = 0xffffffffu;
  int mine = 0;  // candidates in this lane
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int pos = 128 * (i / 4) + 4 * lane + i % 4;
    key[i] = static_cast<unsigned>(pos - ns) < static_cast<unsigned>(n_cand) ? order_key(x[i]) : 0u;
    mine += key[i] != 0u ? 1 : 0;
    kmax = max(kmax, key[i]);
    kmin = min(kmin, key[i] - 1u);  // key 0 wraps to the top
  }
  kmax = __reduce_max_sync(kFull, kmax);
  kmin = __reduce_min_sync(kFull, kmin) + 1u;

  // The row is -1 first, its stores draining while the cut is searched; the kept positions
  // overwrite the front after a __syncwarp (which orders the lanes' stores).
  int32_t* out = p.indices + seg * p.capacity;
  fill_minus_one(out, 0, p.capacity, lane, 32);

  // Budget r (docs/ops.md): top-p by mass or top-k, then the floor and the cap.
  Weight w[kPer];
  MassUnit unit(1);  // top-k searches weigh no mass
  int64_t r = 0, r_mass = -1;
  Cut cut{0xffffffffu, 0, 0, 0};  // keeps none
  if (p.by_mass) {
    top_p = fmin(fmax(top_p, 0.0), 1.0);  // NaN -> 0
    if (n_cand > 0 && top_p > 0.0 && kmax > kKeyZero) {  // else no candidate has mass: r = 0
      if (kmax >= kKeyInf) {
        r = 1;  // an infinite mass: the first candidate reaches p * T
      } else {
        const int e_top = max(static_cast<int>((kmax & 0x7fffffffu) >> 23), 1);
        unit = MassUnit(e_top);
        if (unit.bias) {  // warp-uniform: one path per loop
#pragma unroll
          for (int i = 0; i < kPer; ++i) w[i] = make_weight(mass_units_fast(key[i], unit.bias));
        } else {  // largest candidate below 2^-97
#pragma unroll
          for (int i = 0; i < kPer; ++i) w[i] = make_weight(mass_units(key[i], unit.scale));
        }
        float a[2] = {kMagic, 0.0f}, b[2] = {kMagic, 0.0f};
#pragma unroll
        for (int i = 0; i < kPer; ++i) a[i & 1] += w[i].lo, b[i & 1] += w[i].hi;
        const u64 total = warp_sum<true>(a[0] + a[1], b[0] + b[1]).mass;
        const double x_target = ceil(top_p * static_cast<double>(total));  // >= 1
        const u64 target = x_target >= static_cast<double>(total) ? total : static_cast<u64>(x_target);
        cut = find_cut<true>(key, w, target, kmin, kmax, n_cand, mine, unit, s_list[warp], lane);
        r = r_mass = cut.r;
      }
    }
  } else {
    r = top_k_candidates(top_k, n_cand);
  }
  r = floor_and_cap(p, r, geo.forced, n_cand);
  if (r != r_mass) {
    if (r == 0) {
      cut = {0xffffffffu, 0, 0, 0};
    } else if (r == n_cand) {
      cut = {0u, 0, 0, r};  // every candidate key is above 0
    } else {
      cut = find_cut<false>(key, w, static_cast<u64>(r), kmin, kmax, n_cand, mine, unit, s_list[warp], lane);
    }
  }

  // Output: forced positions, keys above t, and the first need_eq keys equal to t (position
  // order), ascending, then -1. When every tie at t is kept (or none is), that is the keys above
  // t_keep; dropped ties take ranks by ballots.
  const bool some_ties = cut.need_eq > 0 && cut.need_eq < cut.n_eq;  // warp-uniform
  const uint32_t t_keep = cut.need_eq > 0 && !some_ties ? cut.t - 1u : cut.t;  // t > 0 there
  unsigned keep[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    keep[j] = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t k = key[4 * j + e];
      const bool is_forced = k == 0u && 128 * j + 4 * lane + e < len;  // candidates have keys > 0
      keep[j] |= (is_forced || k > t_keep ? 1u : 0u) << e;
    }
  }
  if (some_ties) {
    int eq_before = 0;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      unsigned eq = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) eq |= (key[4 * j + e] == cut.t ? 1u : 0u) << e;
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
    }
  }
  // Slots: the lane's counts of 4 vectors, a byte each (a vector keeps <= 128 positions), go
  // through one shuffle scan.
  __syncwarp();
  int base = 0;
#pragma unroll
  for (int g = 0; g < kVecs; g += 4) {
    unsigned kept = 0;
#pragma unroll
    for (int jj = 0; jj < 4 && g + jj < kVecs; ++jj) kept |= static_cast<unsigned>(__popc(keep[g + jj])) << (8 * jj);
    const unsigned incl = warp_inclusive_sum(kept, lane);
    const unsigned excl = incl - kept, total = __shfl_sync(kFull, incl, 31);
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

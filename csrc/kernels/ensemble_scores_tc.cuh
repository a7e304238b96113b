// Ensemble scores on tensor cores (bf16/fp16, head dims 64, 128, 256): two fused passes that
// never write the [W x N] probabilities.
//
//   pass 1 (skipped when the caller gives lse): flash-attention's forward without V. A CTA owns
//     kRows recent query rows of one (b, kv-head) group, holds them as mma A fragments in
//     registers and streams the group's key tiles through shared memory; online max/sum per row
//     in registers; writes the natural log-sum-exp to a float32 workspace [B, Hq, W]. Its CTAs
//     all weigh about the same, so when they would fill the last wave poorly the key range is
//     split in lse_splits parts that write (max, sum) partials, merged by a tiny kernel.
//   pass 2: a CTA owns kRows keys of one (b, kv-head), holds them as A fragments and streams the
//     query rows of all G heads of the group. S^T = K Q^T puts each key's probabilities in the
//     accumulators of the threads owning that key, so p = exp2(s*scale*log2e - lse*log2e) times
//     the row weight is summed in registers, then over the 4 lanes of a quad, and each key is
//     written once: deterministic, no atomics.
//
// Both passes share one main loop: `stationary` rows (A, 16*kMT per warp) against 64-row
// `streamed` tiles (B) in a kStages-deep cp.async ring with one barrier per tile. Streamed query
// rows are ordered w-major (row i = w*G + g), so positions never decrease along the stream: a
// tile's position range is [pos(first row), pos(last row)], which decides per warp whether the
// tile is skipped (wholly in the causal future), unmasked, or masked elementwise.
//
// Shared memory rows are D*2 bytes with the 16-byte chunks XOR-swizzled by (row & 7), so the
// 8 row addresses of every ldmatrix phase fall in 8 distinct bank groups.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ensemble_scores.cuh"

namespace pyramid_kv::kernels {

template <int D>
struct TcConfig {
  static constexpr int kMT = D <= 128 ? 4 : 2;             // m16 tiles per warp
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * kMT * 16;          // stationary rows per CTA
  static constexpr int kTile = 64;                         // streamed rows per stage
  static constexpr int kStages = D <= 128 ? 4 : 3;
  static constexpr int kKSteps = D / 16;
  static constexpr int kRowBytes = D * 2;
  static constexpr int kStageBytes = kTile * kRowBytes;
  static constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  static constexpr int kTPR = kThreads / kTile;            // threads per streamed row
  static constexpr int kCPT = kChunks / kTPR;              // chunks per thread per row
  // Pass 2 keeps each stage's per-row lse, weight and position after the stages.
  static constexpr int kRowInfoBytes = 3 * kStages * kTile * 4;
  static constexpr int kSmemLse = kStages * kStageBytes;
  static constexpr int kSmemScores = kStages * kStageBytes + kRowInfoBytes;
  static_assert(D % 64 == 0, "swizzle needs >= 8 chunks per row");
  static_assert(kRows * kRowBytes <= kStages * kStageBytes, "stationary tile must fit the ring");
  static_assert(kThreads % kTile == 0 && kChunks % kTPR == 0, "loader mapping");
  static_assert(kStages >= 2, "ring depth");
};

// ---- PTX wrappers (smem_addr: common.cuh) --------------------------------------------------
// 16-byte async copy; with valid == false nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// d += a (16x16, row-major) * b (16x8, col-major), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 2^x on the MUFU; ex2(-inf) = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- tiles ---------------------------------------------------------------------------------
// Async copy of one D-wide row into swizzled shared memory; this thread copies the chunks
// part, part + kTPR, ...  A row that does not exist (valid == false) becomes zeros; src must
// still be a mapped address (a row that exists), though nothing is read from it.
template <typename T, int D>
__device__ __forceinline__ void load_row(uint32_t dst_row, int row, const T* src, bool valid,
                                         int part) {
  using C = TcConfig<D>;
#pragma unroll
  for (int c = 0; c < C::kCPT; ++c) {
    const int chunk = part + c * C::kTPR;
    cp_async16(dst_row + ((chunk ^ (row & 7)) << 4), src + chunk * 8, valid);
  }
}

// The warp's stationary rows [warp * 16 kMT, +16 kMT) of a swizzled tile as A fragments:
// per (m-tile, k-step) the four 8x8 matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15).
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[TcConfig<D>::kMT][D / 16][4],
                                             uint32_t tile, int warp, int lane) {
  using C = TcConfig<D>;
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt) {
    const int row = warp * 16 * C::kMT + mt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int ks = 0; ks < C::kKSteps; ++ks) {
      const int chunk = 2 * ks + (lane >> 4);
      ldmatrix_x4(a[mt][ks], tile + row * C::kRowBytes + ((chunk ^ (row & 7)) << 4));
    }
  }
}

// Per-lane ldmatrix addressing of B fragments (two n8 tiles of a streamed 16-row pair): lanes
// 0-7 / 8-15 / 16-23 / 24-31 address rows 0-7 k-lo / rows 0-7 k-hi / rows 8-15 k-lo / 8-15 k-hi.
struct BAddr {
  uint32_t row_off;  // (lane & 7 + 8 * (lane >> 4)) * row bytes
  uint32_t off[4];   // swizzled chunk offset of k-step ks (mod 4); + 128 bytes per 4 k-steps
  template <int D>
  __device__ __forceinline__ void init(int lane) {
    row_off = ((lane & 7) + ((lane >> 4) << 3)) * TcConfig<D>::kRowBytes;
#pragma unroll
    for (int q = 0; q < 4; ++q) off[q] = ((2 * q + ((lane >> 3) & 1)) ^ (lane & 7)) << 4;
  }
};

// acc[mt][nt] (+)= A[mt] * B^T for streamed rows pair*16 + nt*8 + [0, 8).
template <typename T, int D>
__device__ __forceinline__ void mma_pair(float (&acc)[TcConfig<D>::kMT][2][4],
                                         const uint32_t (&a)[TcConfig<D>::kMT][D / 16][4],
                                         uint32_t stage, int pair, const BAddr& ba) {
  using C = TcConfig<D>;
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.0f;
  const uint32_t row_base = stage + pair * 16 * C::kRowBytes + ba.row_off;
#pragma unroll
  for (int ks = 0; ks < C::kKSteps; ++ks) {
    uint32_t b[4];
    ldmatrix_x4(b, row_base + (ks >> 2) * 128 + ba.off[ks & 3]);
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) {
      mma_16816<T>(acc[mt][0], a[mt][ks], b[0], b[1]);
      mma_16816<T>(acc[mt][1], a[mt][ks], b[2], b[3]);
    }
  }
}

// ---- pass 1: log-sum-exp of the recent rows ------------------------------------------------
// Grid (ceil(G*W / kRows) * lse_splits, Hkv, B). CTA rows i in [r0, r0 + kRows) of the group,
// w-major (w = i / G, g = i % G); later rows see more keys, so blockIdx.x 0 takes the last rows.
// Split s of lse_splits takes the s-th run of the CTA's key tiles.
template <typename T, int D>
__global__ void __launch_bounds__(TcConfig<D>::kThreads, 2) ensemble_lse_tc(EnsembleParams p) {
  using C = TcConfig<D>;
  constexpr int MT = C::kMT;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sbase = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int G = static_cast<int>(p.Hq / p.Hkv);
  const int W = static_cast<int>(p.W);
  const int GW = G * W;
  const int splits = p.lse_splits, split = static_cast<int>(blockIdx.x) % splits;
  const int r0 = static_cast<int>(gridDim.x / splits - 1 - blockIdx.x / splits) * C::kRows;
  const int len = static_cast<int>(clamp64(p.lengths[b], 0, p.N));
  const int first = len - W;  // position of row w = 0
  const float sl2e = p.scale * kLog2e;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * G * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;

  // Stationary query rows (rows past G*W are zeros and never written).
  for (int r = tid / C::kTPR; r < C::kRows; r += C::kTile) {
    const int i = r0 + r;
    const bool valid = i < GW;
    const T* src = valid ? qb + (i % G) * p.q_sh + (i / G) * p.q_sw : qb;
    load_row<T, D>(sbase + r * C::kRowBytes, r, src, valid, tid % C::kTPR);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[MT][D / 16][4];
  load_a_frags<D>(a, sbase, warp, lane);
  __syncthreads();  // the ring below reuses the stationary tile's memory

  // Positions of this thread's 8 rows (-1: no such row, every key masked) and the warp's and
  // CTA's position ranges (rows are w-major, so positions never decrease with i).
  int pos[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = r0 + warp * 16 * MT + mt * 16 + hf * 8 + (lane >> 2);
      pos[mt][hf] = i < GW ? first + i / G : -1;
    }
  const int wi0 = r0 + warp * 16 * MT;
  const int wi1 = min(wi0 + 16 * MT, GW) - 1;
  const int pmin_w = first + wi0 / G;
  const int pmax_w = wi1 >= wi0 ? first + wi1 / G : -1;
  const int pmax_cta = first + (min(r0 + C::kRows, GW) - 1) / G;
  const int all_tiles = pmax_cta >= 0 ? pmax_cta / C::kTile + 1 : 0;
  const int per_split = (all_tiles + splits - 1) / splits;
  const int t_begin = min(split * per_split, all_tiles);
  const int t_end = min(t_begin + per_split, all_tiles);

  auto issue = [&](int t) {  // key tile t -> stage t % kStages; keys >= len are zeros
    const int r = tid / C::kTPR;
    const int j = t * C::kTile + r;
    const uint32_t dst = sbase + (t % C::kStages) * C::kStageBytes + r * C::kRowBytes;
    load_row<T, D>(dst, r, j < len ? kb + j * p.k_sn : kb, j < len, tid % C::kTPR);
  };
#pragma unroll
  for (int t = 0; t < C::kStages - 1; ++t) {
    if (t_begin + t < t_end) issue(t_begin + t);
    cp_async_commit();
  }

  BAddr ba;
  ba.init<D>(lane);
  float m[MT][2], l[MT][2];  // running max (log2 units, per thread) and sum of 2^(x - m)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) m[mt][hf] = -1e30f, l[mt][hf] = 0.0f;

  auto tile = [&](auto masked, uint32_t stage, int key0) {
#pragma unroll 1  // one pair's accumulators live at a time (unrolling spills at D = 128)
    for (int pair = 0; pair < C::kTile / 16; ++pair) {
      float acc[MT][2][4];
      mma_pair<T, D>(acc, a, stage, pair, ba);
      const int kq = key0 + pair * 16 + 2 * (lane & 3);  // key of acc[.][0][0] / [2]
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float v[4] = {acc[mt][0][2 * hf], acc[mt][0][2 * hf + 1], acc[mt][1][2 * hf],
                        acc[mt][1][2 * hf + 1]};
          if constexpr (decltype(masked)::value) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (kq + (e & 1) + (e >> 1) * 8 > pos[mt][hf]) v[e] = -INFINITY;
          }
          // Rescale only when this thread's max grows (rare after the first tiles).
          const float bm = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])) * sl2e;
          if (bm > m[mt][hf]) {
            l[mt][hf] *= ex2(m[mt][hf] - bm);
            m[mt][hf] = bm;
          }
          const float nm = -m[mt][hf];
#pragma unroll
          for (int e = 0; e < 4; ++e) l[mt][hf] += ex2(fmaf(v[e], sl2e, nm));
        }
    }
  };

  for (int t = t_begin; t < t_end; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile t landed for all; everyone is done with tile t - 1
    if (t + C::kStages - 1 < t_end) issue(t + C::kStages - 1);
    cp_async_commit();
    const int key0 = t * C::kTile;
    const uint32_t stage = sbase + (t % C::kStages) * C::kStageBytes;
    if (key0 > pmax_w) continue;  // wholly in the future of every row of this warp
    if (key0 + C::kTile - 1 <= pmin_w)
      tile(std::false_type{}, stage, key0);
    else
      tile(std::true_type{}, stage, key0);
  }

  // Merge the 4 lanes of each quad (same rows, different keys); write the natural-log lse, or
  // this key range's (max, sum) partial.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mm = m[mt][hf], ll = l[mt][hf];
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, mm, off);
        const float lo = __shfl_xor_sync(0xffffffffu, ll, off);
        const float mx = fmaxf(mm, mo);
        ll = ll * ex2(mm - mx) + lo * ex2(mo - mx);
        mm = mx;
      }
      const int i = r0 + warp * 16 * MT + mt * 16 + hf * 8 + (lane >> 2);
      if ((lane & 3) == 0 && i < GW) {
        const int w = i / G, g = i % G;
        const int64_t at = (b * p.Hq + h * G + g) * p.W + w;
        if (splits == 1)
          p.lse_out[at] = pos[mt][hf] >= 0 ? (mm + log2f(ll)) * kLn2 : -INFINITY;
        else
          p.lse_partial[split * p.B * p.Hq * p.W + at] = make_float2(mm, ll);
      }
    }
}

// lse of each row from its key ranges' (max, sum) partials, in a fixed order. A row at a negative
// position has only empty partials (sum 0) and gets -inf.
static __global__ void ensemble_lse_merge(EnsembleParams p) {
  const int64_t rows = p.B * p.Hq * p.W;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  float mx = -1e30f;
  for (int s = 0; s < p.lse_splits; ++s) mx = fmaxf(mx, p.lse_partial[s * rows + i].x);
  float sum = 0.0f;
  for (int s = 0; s < p.lse_splits; ++s) {
    const float2 part = p.lse_partial[s * rows + i];
    sum += part.y * ex2(part.x - mx);
  }
  p.lse_out[i] = sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
}

// ---- pass 2: per-key sums -----------------------------------------------------------------
// Grid (ceil(N / kRows), Hkv, B); p.lse points at the lse to use (given or the workspace) with
// its strides. The CTA streams the group's rows whose position is >= its first key j0, i.e.
// w >= w_lo, as stream index i = (w - w_lo) * G + g.
template <typename T, int D>
__global__ void __launch_bounds__(TcConfig<D>::kThreads, 2) ensemble_scores_tc(EnsembleParams p) {
  using C = TcConfig<D>;
  constexpr int MT = C::kMT;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sbase = smem_addr(smem);
  float* const lse_s = reinterpret_cast<float*>(smem + C::kSmemLse);  // [kStages][kTile]
  float* const wt_s = lse_s + C::kStages * C::kTile;
  int* const pos_s = reinterpret_cast<int*>(wt_s + C::kStages * C::kTile);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int len = static_cast<int>(clamp64(p.lengths[b], 0, p.N));
  const int N = static_cast<int>(p.N);
  const int j0 = static_cast<int>(blockIdx.x) * C::kRows;
  float* const out = p.out + (b * p.Hkv + h) * p.N;
  if (j0 >= len) {  // padding only (uniform over the CTA: no barrier is skipped by some)
    for (int j = j0 + tid; j < min(j0 + C::kRows, N); j += C::kThreads) out[j] = 0.0f;
    return;
  }
  const int G = static_cast<int>(p.Hq / p.Hkv);
  const int W = static_cast<int>(p.W);
  const int first = len - W;
  const int w_lo = max(0, j0 - first);    // <= W - 1 since j0 <= len - 1
  const int R = G * (W - w_lo);           // streamed rows
  const int num_tiles = (R + C::kTile - 1) / C::kTile;
  const float sl2e = p.scale * kLog2e;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * G * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;

  // Stationary keys j0 + r (keys >= len are zeros; their sums are discarded).
  for (int r = tid / C::kTPR; r < C::kRows; r += C::kTile) {
    const int j = j0 + r;
    load_row<T, D>(sbase + r * C::kRowBytes, r, j < len ? kb + j * p.k_sn : kb, j < len,
                   tid % C::kTPR);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[MT][D / 16][4];
  load_a_frags<D>(a, sbase, warp, lane);
  __syncthreads();

  // Streamed row i -> stage; a row past R has zero q, lse 0, weight 0 and position -1.
  auto issue = [&](int t) {
    const int s = t % C::kStages;
    const int r = tid / C::kTPR;
    const int i = t * C::kTile + r;
    const bool valid = i < R;
    const int w = valid ? w_lo + i / G : 0, g = valid ? i % G : 0;
    load_row<T, D>(sbase + s * C::kStageBytes + r * C::kRowBytes, r,
                   valid ? qb + g * p.q_sh + w * p.q_sw : qb, valid, tid % C::kTPR);
    if (tid % C::kTPR == 0) {
      const int at = s * C::kTile + r;
      pos_s[at] = valid ? first + w : -1;
      const float* lse = p.lse + b * p.lse_sb + (h * G + g) * p.lse_sh + w * p.lse_sw;
      cp_async4(smem_addr(lse_s + at), valid ? lse : p.lse, valid);
      if (p.row_weights) {
        const float* wt = p.row_weights + b * p.rw_sb + w * p.rw_sw;
        cp_async4(smem_addr(wt_s + at), valid ? wt : p.row_weights, valid);
      } else {
        wt_s[at] = valid ? 1.0f : 0.0f;
      }
    }
  };
#pragma unroll
  for (int t = 0; t < C::kStages - 1; ++t) {
    if (t < num_tiles) issue(t);
    cp_async_commit();
  }

  BAddr ba;
  ba.init<D>(lane);
  const int kw0 = j0 + warp * 16 * MT;      // the warp's keys [kw0, kw0 + 16 MT)
  const int kw1 = kw0 + 16 * MT - 1;
  const int key_thread = kw0 + (lane >> 2);  // key of acc[mt][.][0..1] is key_thread + mt*16
  float ksum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) ksum[mt][0] = ksum[mt][1] = 0.0f;

  auto tile = [&](auto masked, int s) {
    const uint32_t stage = sbase + s * C::kStageBytes;
#pragma unroll 1  // one pair's accumulators live at a time (unrolling spills at D = 128)
    for (int pair = 0; pair < C::kTile / 16; ++pair) {
      float acc[MT][2][4];
      mma_pair<T, D>(acc, a, stage, pair, ba);
      float nb[2][2], wt[2][2];
      int pp[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = s * C::kTile + pair * 16 + nt * 8 + 2 * (lane & 3);
        const float2 lv = *reinterpret_cast<const float2*>(lse_s + col);
        const float2 wv = *reinterpret_cast<const float2*>(wt_s + col);
        nb[nt][0] = -lv.x * kLog2e, nb[nt][1] = -lv.y * kLog2e;
        wt[nt][0] = wv.x, wt[nt][1] = wv.y;
        if constexpr (decltype(masked)::value) {
          const int2 pv = *reinterpret_cast<const int2*>(pos_s + col);
          pp[nt][0] = pv.x, pp[nt][1] = pv.y;
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float x = fmaf(acc[mt][nt][c], sl2e, nb[nt][c & 1]);
            if constexpr (decltype(masked)::value) {
              if (key_thread + mt * 16 + (c >> 1) * 8 > pp[nt][c & 1]) x = -INFINITY;
            }
            ksum[mt][c >> 1] = fmaf(ex2(x), wt[nt][c & 1], ksum[mt][c >> 1]);
          }
    }
  };

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile t landed for all; everyone is done with tile t - 1
    if (t + C::kStages - 1 < num_tiles) issue(t + C::kStages - 1);
    cp_async_commit();
    const int i0 = t * C::kTile;
    const int pmin = first + w_lo + i0 / G;
    const int pmax = first + w_lo + (min(i0 + C::kTile, R) - 1) / G;
    if (kw0 >= len || pmax < kw0) continue;  // padding keys, or rows wholly before the keys
    if (pmin >= kw1)
      tile(std::false_type{}, t % C::kStages);
    else
      tile(std::true_type{}, t % C::kStages);
  }

  // Sum the quad's columns; lane 0 of each quad writes its two keys per m-tile.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float v = ksum[mt][hf];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      const int j = key_thread + mt * 16 + hf * 8;
      if ((lane & 3) == 0 && j < N) out[j] = j < len ? v : 0.0f;
    }
}

// Whether the tensor-core path takes these inputs (the launcher also checks 16-byte alignment).
inline bool ensemble_tc_head_dim(int64_t D) { return D == 64 || D == 128 || D == 256; }

// Key ranges of the normaliser pass: the fewest (up to 4, each >= 8 key tiles) whose CTAs fill
// >= 90% of the waves they occupy, else the best fill. Equal-weight CTAs make waves the cost.
template <typename T, int D>
cudaError_t ensemble_lse_splits_d(const EnsembleParams& p, int* splits) {
  using C = TcConfig<D>;
  *splits = 1;
  // Resident CTAs of the pass on this device (cached: a per-launch occupancy query costs time).
  static ResidentBlocks resident;
  auto* kernel = ensemble_lse_tc<T, D>;
  int slots = 0;
  if (cudaError_t e = resident.get(reinterpret_cast<const void*>(kernel), C::kThreads, C::kSmemLse,
                                   [&] {
                                     return cudaFuncSetAttribute(
                                         kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemLse);
                                   },
                                   slots);
      e != cudaSuccess) {
    return e;
  }
  const double ctas = static_cast<double>(ceil_div(p.Hq / p.Hkv * p.W, C::kRows)) * p.Hkv * p.B;
  const int max_splits = static_cast<int>(std::min<int64_t>(4, std::max<int64_t>(1, p.N / (8 * C::kTile))));
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = ctas * s / static_cast<double>(slots);
    const double fill = waves / std::ceil(waves);
    if (fill > best + 1e-9) best = fill, *splits = s;
    if (fill >= 0.9) break;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t ensemble_lse_splits(const EnsembleParams& p, int* splits) {
  switch (p.D) {
    case 64: return ensemble_lse_splits_d<T, 64>(p, splits);
    case 128: return ensemble_lse_splits_d<T, 128>(p, splits);
    case 256: return ensemble_lse_splits_d<T, 256>(p, splits);
    default: *splits = 1; return cudaSuccess;
  }
}

// Float2 partials the normaliser pass needs for `splits` key ranges (0 when it needs none).
inline int64_t ensemble_lse_partials(const EnsembleParams& p, int splits) {
  return splits > 1 ? splits * p.B * p.Hq * p.W : 0;
}

// p.lse given, or p.lse_out (and p.lse_partial when p.lse_splits > 1) as workspaces.
template <typename T, int D>
cudaError_t launch_ensemble_scores_tc_d(const EnsembleParams& params, cudaStream_t stream) {
  using C = TcConfig<D>;
  EnsembleParams p = params;
  const int64_t G = p.Hq / p.Hkv;
  if (!p.lse) {
    if (p.lse_splits < 1 || (p.lse_splits > 1 && !p.lse_partial)) return cudaErrorInvalidValue;
    auto* kernel = ensemble_lse_tc<T, D>;
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             C::kSmemLse);
        e != cudaSuccess)
      return e;
    const dim3 grid(ceil_div(G * p.W, C::kRows) * p.lse_splits, static_cast<unsigned>(p.Hkv),
                    static_cast<unsigned>(p.B));
    kernel<<<grid, C::kThreads, C::kSmemLse, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    if (p.lse_splits > 1) {
      ensemble_lse_merge<<<ceil_div(p.B * p.Hq * p.W, 256), 256, 0, stream>>>(p);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    p.lse = p.lse_out;
    p.lse_sb = p.Hq * p.W, p.lse_sh = p.W, p.lse_sw = 1;
  }
  auto* kernel = ensemble_scores_tc<T, D>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           C::kSmemScores);
      e != cudaSuccess)
    return e;
  const dim3 grid(ceil_div(p.N, C::kRows), static_cast<unsigned>(p.Hkv),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, C::kThreads, C::kSmemScores, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ensemble_scores_tc(const EnsembleParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch_ensemble_scores_tc_d<T, 64>(p, stream);
    case 128: return launch_ensemble_scores_tc_d<T, 128>(p, stream);
    case 256: return launch_ensemble_scores_tc_d<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pyramid_kv::kernels

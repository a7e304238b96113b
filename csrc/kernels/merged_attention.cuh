// Decode attention over a MiniCache merged layer without restoring it (docs/ops.md,
// `merged_attention`; docs/perf/merged_attention.md has the design and the numbers).
//
// Keys of (sequence b, KV head h), in this order: the valid prompt rows t < lengths[b] whose key
// norm is >= 0 (key norm_k * dir_k, value norm_v * dir_v; a negative key norm flags a retained
// token, whose original row comes in the retained segment instead), the retained rows
// c < counts[b, h], the raw tail rows u < tail_lengths[b]. The three VALID ranges are laid end to
// end ("virtual rows" v in [0, total)) and split evenly over a fixed number of CTAs: the split
// count comes from the shapes only (no host sync, CUDA-graph safe), the per-split range from the
// lengths on the device, so ragged batches stay balanced.
//
// Split kernel: CTA (split, head chunk, h, b), 4 warps. A group of LANES lanes takes a row: lane
// `sub` holds 16-byte packets sub + k * LANES (k < CPL) of the key and of the value row; a warp
// takes 32 / LANES rows at a time, R times over (all loads issued before any math: 2 * R * CPL
// 16-byte loads in flight per lane). The chunk's GT query heads (q pre-scaled by scale * log2 e,
// float32 registers) dot the key packet, a group xor-shuffle sums the dot, the norm scales it,
// and a per-(group, head) online softmax (exp2f) accumulates norm_v * p * dir_v in float32.
// At the end the groups of a warp merge by xor-shuffles, the warps through shared memory, and
// the CTA writes its partial (max, sum, acc[D]) per head to the float32 workspace; an empty split
// writes (-inf, 0, 0). Combine kernel: one CTA per (b, query head) rescales and sums the splits.
// Race-free by construction: every shared and workspace element has exactly one writer, read
// after a __syncthreads (shared) or by the next kernel (workspace); there are no atomics.
//
// Generic path (a row not 16-byte aligned, D * sizeof(T) % 16 != 0, or D > 256): the same
// kernel with scalar packets, LANES = 32, up to 16 elements per lane (D <= 512) and one query
// head per CTA (more head chunks in the grid).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace pyramid_kv::kernels {

// One key/value segment: row i of (b, h) at ptr + b * sb + h * sh + i * si (elements).
struct KVRows {
  const void* k;
  const void* v;
  int64_t k_sb, k_sh, k_si;
  int64_t v_sb, v_sh, v_si;
};

struct MergedAttentionParams {
  const void* q;            // [B, Hq, D], last dim contiguous
  int64_t q_sb, q_sh;
  KVRows prompt;            // directions [B, P, Hkv, D]
  KVRows retained;          // [B, Hkv, C, D]
  KVRows tail;              // [B, T, Hkv, D]
  const float* norm_k;      // [B, P, Hkv], any strides
  const float* norm_v;
  int64_t nk_sb, nk_sh, nk_si;
  int64_t nv_sb, nv_sh, nv_si;
  const int64_t* lengths;   // [B]
  int64_t lengths_s;
  const int64_t* counts;    // [B, Hkv]
  int64_t counts_sb, counts_sh;
  const int64_t* tail_lengths;  // [B]
  int64_t tail_lengths_s;
  int64_t B, Hq, Hkv, G, D, P, C, T;
  float scale_log2;         // softmax scale * log2(e)
  int splits, head_chunks;  // from plan_merged_attention
  float* ws_acc;            // [B * Hq, splits, D]
  float* ws_ml;             // [B * Hq, splits, 2]: (max, sum), log2 domain
  void* out;                // contiguous [B, Hq, D], q's dtype
};

struct MergedAttentionPlan {
  bool vec;                 // 16-byte packets
  int lanes, cpl, gt;       // lanes per row, packets per lane, query heads per CTA
  int head_chunks, splits;
};

namespace mattn_detail {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeads = 8;            // query heads per CTA (registers: q and acc per head)
constexpr int64_t kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 1024;
constexpr int kGenericCpl = 16;         // generic path: D <= 32 * 16
constexpr float kNegInf = -__builtin_huge_valf();

template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A packet of E elements kept as raw bits until used (half the registers of floats for 16-bit T).
template <typename T, bool kVec>
struct Packet {
  static constexpr int E = kVec ? 16 / int(sizeof(T)) : 1;
  using Raw = typename Bytes<kVec ? 16 : int(sizeof(T))>::type;
  Raw raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void zero() { raw = Raw{}; }
  __device__ __forceinline__ float get(int e) const { return to_float(reinterpret_cast<const T*>(&raw)[e]); }
};

template <int LANES>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;  // lane ^ o stays inside the LANES-aligned group
}

// exp2(x - m) with the max m = -inf (nothing seen yet) read as 0, so -inf - -inf never occurs.
__device__ __forceinline__ float safe_max(float m) { return m == kNegInf ? 0.0f : m; }

// Rows a group loads per iteration: enough 16-byte loads in flight, registers permitting.
constexpr int rows_per_group(int gt, int cpl) {
  return std::max(1, (gt >= 8 ? 2 : 4) / cpl);
}

template <typename T, bool kVec, int LANES, int CPL, int GT>
__global__ void __launch_bounds__(kThreads) merged_attention_split_kernel(const MergedAttentionParams p) {
  using Pk = Packet<T, kVec>;
  constexpr int E = Pk::E;
  constexpr int NG = 32 / LANES;             // row groups per warp
  constexpr int R = rows_per_group(GT, CPL);
  constexpr int RB = kWarps * NG * R;        // rows per CTA iteration
  constexpr int DMAX = LANES * CPL * E;
  __shared__ float s_acc[kWarps][GT][DMAX];
  __shared__ float s_m[kWarps][GT];
  __shared__ float s_l[kWarps][GT];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int grp = lane / LANES, sub = lane % LANES;
  int64_t rest = blockIdx.x;
  const int64_t split = rest % p.splits;
  rest /= p.splits;
  const int j0 = static_cast<int>(rest % p.head_chunks) * GT;  // first head of the chunk in the group
  rest /= p.head_chunks;
  const int64_t h = rest % p.Hkv, b = rest / p.Hkv;
  const int nh = static_cast<int>(std::min<int64_t>(GT, p.G - j0));  // live heads of the chunk
  const int64_t chunks = p.D / E;            // packets per row (E divides D on the vector path)

  float q[GT][CPL][E];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    const T* qr = static_cast<const T*>(p.q) + b * p.q_sb + (h * p.G + j0 + j) * p.q_sh;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = sub + k * LANES;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        q[j][k][e] = (j < nh && c < chunks) ? to_float(qr[c * E + e]) * p.scale_log2 : 0.0f;
      }
    }
  }

  const int64_t len = clamp64(p.lengths[b * p.lengths_s], 0, p.P);
  const int64_t cnt = clamp64(p.counts[b * p.counts_sb + h * p.counts_sh], 0, p.C);
  const int64_t tl = clamp64(p.tail_lengths[b * p.tail_lengths_s], 0, p.T);
  const int64_t total = len + cnt + tl;
  const int64_t per = (total + p.splits - 1) / p.splits;
  const int64_t begin = std::min(total, split * per), end = std::min(total, begin + per);

  const T* pk = static_cast<const T*>(p.prompt.k) + b * p.prompt.k_sb + h * p.prompt.k_sh;
  const T* pv = static_cast<const T*>(p.prompt.v) + b * p.prompt.v_sb + h * p.prompt.v_sh;
  const float* pnk = p.norm_k + b * p.nk_sb + h * p.nk_sh;
  const float* pnv = p.norm_v + b * p.nv_sb + h * p.nv_sh;
  const T* rk = static_cast<const T*>(p.retained.k) + b * p.retained.k_sb + h * p.retained.k_sh;
  const T* rv = static_cast<const T*>(p.retained.v) + b * p.retained.v_sb + h * p.retained.v_sh;
  const T* tk = static_cast<const T*>(p.tail.k) + b * p.tail.k_sb + h * p.tail.k_sh;
  const T* tv = static_cast<const T*>(p.tail.v) + b * p.tail.v_sb + h * p.tail.v_sh;

  float m[GT], l[GT], acc[GT][CPL][E];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    m[j] = kNegInf, l[j] = 0.0f;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
#pragma unroll
      for (int e = 0; e < E; ++e) acc[j][k][e] = 0.0f;
    }
  }

  // The loop test is CTA-uniform: every lane runs every iteration (full-mask shuffles).
  for (int64_t base = begin; base < end; base += RB) {
    const T* kr[R];
    const T* vr[R];
    float nk[R], nv[R];
    bool live[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t v = base + (warp * R + r) * NG + grp;
      live[r] = v < end;
      nk[r] = 1.0f, nv[r] = 1.0f, kr[r] = nullptr, vr[r] = nullptr;
      if (!live[r]) continue;
      if (v < len) {
        kr[r] = pk + v * p.prompt.k_si, vr[r] = pv + v * p.prompt.v_si;
        nk[r] = pnk[v * p.nk_si], nv[r] = pnv[v * p.nv_si];
      } else if (v < len + cnt) {
        const int64_t c = v - len;
        kr[r] = rk + c * p.retained.k_si, vr[r] = rv + c * p.retained.v_si;
      } else {
        const int64_t u = v - len - cnt;
        kr[r] = tk + u * p.tail.k_si, vr[r] = tv + u * p.tail.v_si;
      }
    }
    Pk kx[R][CPL], vx[R][CPL];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // every load of the iteration before any use
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t c = sub + k * LANES;
        if (live[r] && c < chunks) {
          kx[r][k].load(kr[r] + c * E), vx[r][k].load(vr[r] + c * E);
        } else {
          kx[r][k].zero(), vx[r][k].zero();
        }
      }
    }
    float s[R][GT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool valid = live[r] && nk[r] >= 0.0f;  // a negative key norm: retained token
#pragma unroll
      for (int j = 0; j < GT; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
#pragma unroll
          for (int e = 0; e < E; ++e) dot = fmaf(q[j][k][e], kx[r][k].get(e), dot);
        }
        dot = group_sum<LANES>(dot);
        s[r][j] = valid ? dot * nk[r] : kNegInf;
      }
    }
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      float mx = m[j];
#pragma unroll
      for (int r = 0; r < R; ++r) mx = fmaxf(mx, s[r][j]);
      const float ms = safe_max(mx);
      const float alpha = exp2f(m[j] - ms);
      l[j] *= alpha;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[j][k][e] *= alpha;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pr = exp2f(s[r][j] - ms);  // 0 for an invalid row
        l[j] += pr;
        const float w = s[r][j] == kNegInf ? 0.0f : pr * nv[r];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
#pragma unroll
          for (int e = 0; e < E; ++e) acc[j][k][e] = fmaf(w, vx[r][k].get(e), acc[j][k][e]);
        }
      }
      m[j] = mx;
    }
  }

  // Merge the groups of the warp: lane ^ o (o >= LANES) holds the same packets of another group.
#pragma unroll
  for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[j], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[j], o);
      const float mx = fmaxf(m[j], mo), ms = safe_max(mx);
      const float fa = exp2f(m[j] - ms), fb = exp2f(mo - ms);
      l[j] = l[j] * fa + lo * fb;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float other = __shfl_xor_sync(0xffffffffu, acc[j][k][e], o);
          acc[j][k][e] = acc[j][k][e] * fa + other * fb;
        }
      }
      m[j] = mx;
    }
  }
  if (grp == 0) {
#pragma unroll
    for (int j = 0; j < GT; ++j) {
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t c = sub + k * LANES;
        if (c >= chunks) continue;
#pragma unroll
        for (int e = 0; e < E; ++e) s_acc[warp][j][c * E + e] = acc[j][k][e];
      }
      if (sub == 0) s_m[warp][j] = m[j], s_l[warp][j] = l[j];
    }
  }
  __syncthreads();
  // Merge the warps; one thread per (head, element) of the chunk writes the split's partial.
  const int D = static_cast<int>(p.D);
  const int64_t row0 = b * p.Hq + h * p.G + j0;  // output row (b, query head) of head j0
  for (int i = threadIdx.x; i < nh * D; i += kThreads) {
    const int j = i / D, d = i % D;
    float M = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][j]);
    const float ms = safe_max(M);
    float a = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(s_m[w][j] - ms);
      a = fmaf(s_acc[w][j][d], f, a), L = fmaf(s_l[w][j], f, L);
    }
    const int64_t row = (row0 + j) * p.splits + split;
    p.ws_acc[row * p.D + d] = a;
    if (d == 0) p.ws_ml[2 * row] = M, p.ws_ml[2 * row + 1] = L;
  }
}

// Reduce over the CTA; `red` is reused by consecutive calls (the first barrier orders them).
template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  x = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) x = kMax ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

// One CTA per (b, query head): out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), 0 when no
// split saw a key.
template <typename T>
__global__ void __launch_bounds__(kThreads) merged_attention_combine_kernel(const MergedAttentionParams p) {
  __shared__ float red[kWarps];
  const int64_t row = blockIdx.x;
  const int S = p.splits;
  const float* ml = p.ws_ml + row * S * 2;
  float M = kNegInf;
  for (int s = threadIdx.x; s < S; s += kThreads) M = fmaxf(M, ml[2 * s]);
  M = block_reduce<true>(M, red);
  const float ms = safe_max(M);
  float L = 0.0f;
  for (int s = threadIdx.x; s < S; s += kThreads) L = fmaf(ml[2 * s + 1], exp2f(ml[2 * s] - ms), L);
  L = block_reduce<false>(L, red);
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  const float* acc = p.ws_acc + row * S * p.D;
  T* out = static_cast<T*>(p.out) + row * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    float a = 0.0f;
    for (int s = 0; s < S; ++s) a = fmaf(acc[s * p.D + d], exp2f(ml[2 * s] - ms), a);
    out[d] = from_float<T>(a * inv);
  }
}

template <typename Fn>
void dispatch_heads(int gt, Fn&& fn) {
  switch (gt) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace mattn_detail

// Largest head dim of the CUDA op (generic path: 16 elements per lane).
constexpr int64_t kMergedAttentionMaxD = 32 * mattn_detail::kGenericCpl;

// The launch shape, from the sizes only. vec16: every K/V row of the six tensors is 16-byte
// aligned and D * elem_size % 16 == 0. sms: the device's multiprocessor count.
inline MergedAttentionPlan plan_merged_attention(const MergedAttentionParams& p, int elem_size,
                                                 bool vec16, int sms) {
  using namespace mattn_detail;
  MergedAttentionPlan plan{};
  const int64_t chunks = p.D * elem_size / 16;
  plan.vec = vec16 && p.D <= 256 && chunks <= 64;
  if (plan.vec) {
    plan.lanes = chunks <= 8 ? 8 : (chunks <= 16 ? 16 : 32);
    plan.cpl = chunks > 32 ? 2 : 1;
    const int64_t g = std::min<int64_t>(p.G, kMaxHeads);
    plan.gt = g <= 1 ? 1 : (g <= 2 ? 2 : (g <= 4 ? 4 : 8));
  } else {
    plan.lanes = 32, plan.cpl = kGenericCpl, plan.gt = 1;
  }
  plan.head_chunks = static_cast<int>(std::max<int64_t>(1, (p.G + plan.gt - 1) / plan.gt));
  // Splits: ~8 CTAs per SM over the grid, but at least kMinKeysPerSplit keys (of the largest
  // possible key count) per split, so the partials stay small next to the rows read.
  const int64_t ctas = std::max<int64_t>(1, p.B * p.Hkv * plan.head_chunks);
  const int64_t keys = p.P + p.C + p.T;
  const int64_t by_keys = std::max<int64_t>(1, (keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  const int64_t by_fill = std::max<int64_t>(1, (int64_t{8} * sms + ctas - 1) / ctas);
  plan.splits = static_cast<int>(std::min<int64_t>({by_keys, by_fill, kMaxSplits}));
  return plan;
}

// p.splits / p.head_chunks must come from `plan`, p.ws_acc / p.ws_ml hold B * Hq * splits * D
// and B * Hq * splits * 2 floats, and both grids (splits * head_chunks * Hkv * B CTAs, B * Hq
// CTAs) must fit in 2^31 - 1 (the launcher checks).
template <typename T>
cudaError_t launch_merged_attention(const MergedAttentionParams& p, const MergedAttentionPlan& plan,
                                    cudaStream_t stream) {
  using namespace mattn_detail;
  if (p.B * p.Hq == 0 || p.D == 0) return cudaSuccess;
  const auto grid = static_cast<unsigned>(int64_t{plan.splits} * plan.head_chunks * p.Hkv * p.B);
  if (plan.vec) {
    dispatch_heads(plan.gt, [&](auto G) {
      constexpr int kGT = decltype(G)::value;
      switch (plan.lanes * 4 + plan.cpl) {
        case 8 * 4 + 1:
          merged_attention_split_kernel<T, true, 8, 1, kGT><<<grid, kThreads, 0, stream>>>(p);
          break;
        case 16 * 4 + 1:
          merged_attention_split_kernel<T, true, 16, 1, kGT><<<grid, kThreads, 0, stream>>>(p);
          break;
        case 32 * 4 + 1:
          merged_attention_split_kernel<T, true, 32, 1, kGT><<<grid, kThreads, 0, stream>>>(p);
          break;
        default:  // 2 packets per lane: float32 only (16-bit rows of D <= 256 fit in one)
          if constexpr (sizeof(T) == 4) {
            merged_attention_split_kernel<T, true, 32, 2, kGT><<<grid, kThreads, 0, stream>>>(p);
          }
          break;
      }
    });
  } else {
    merged_attention_split_kernel<T, false, 32, kGenericCpl, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  merged_attention_combine_kernel<T><<<static_cast<unsigned>(p.B * p.Hq), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

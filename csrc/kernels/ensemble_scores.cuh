// Ensemble scores, generic CUDA path (any head dim): a warp-per-row log-sum-exp pass, then
// one thread per key summing exp(s - lse) * weight over the group's rows staged in shared
// memory. Correct for every shape; the tensor-core kernel covers the common head dims.
#pragma once

#include <cfloat>

#include "common.cuh"

namespace pyramid_kv::kernels {

struct EnsembleParams {
  const void* q;  // [B, Hq, W, D]
  const void* k;  // [B, Hkv, N, D]
  IndexArray lengths;
  const float* row_weights;  // [B, W] or null
  const float* lse;          // [B, Hq, W] or null (then lse_out is filled first)
  float* lse_out;            // workspace [B, Hq, W] (contiguous)
  float2* lse_partial;       // tensor-core path: [lse_splits, B, Hq, W] (max, sum) per key range
  int lse_splits;            // tensor-core path: key ranges of the normaliser pass (1: no partials)
  float* out;                // [B, Hkv, N] contiguous
  int64_t B, Hq, Hkv, W, N, D;
  int64_t q_sb, q_sh, q_sw;  // element strides
  int64_t k_sb, k_sh, k_sn;
  int64_t rw_sb, rw_sw;
  int64_t lse_sb, lse_sh, lse_sw;
  float scale;
};

__device__ __forceinline__ int64_t row_position(const EnsembleParams& p, int64_t b, int64_t w) {
  return clamp64(p.lengths[b], 0, p.N) - p.W + w;
}

// One warp per (b, hq, w) row: online log-sum-exp of scale * q.k over keys j <= position.
template <typename T>
__global__ void ensemble_lse_generic(EnsembleParams p) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Hq * p.W) return;
  const int64_t w = row % p.W, hq = (row / p.W) % p.Hq, b = row / (p.W * p.Hq);
  const int64_t pos = row_position(p, b, w);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + w * p.q_sw;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + (hq / (p.Hq / p.Hkv)) * p.k_sh;
  float m = -FLT_MAX, s = 0.0f;
  for (int64_t j = lane; j <= pos; j += 32) {
    float dot = 0.0f;
    for (int64_t d = 0; d < p.D; ++d) dot += to_float(q[d]) * to_float(k[j * p.k_sn + d]);
    dot *= p.scale;
    const float m2 = fmaxf(m, dot);
    s = s * __expf(m - m2) + __expf(dot - m2);
    m = m2;
  }
  for (int off = 16; off > 0; off /= 2) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off);
    const float so = __shfl_xor_sync(0xffffffffu, s, off);
    const float m2 = fmaxf(m, mo);
    s = s * __expf(m - m2) + so * __expf(mo - m2);
    m = m2;
  }
  if (lane == 0) p.lse_out[row] = pos >= 0 ? m + logf(s) : -INFINITY;
}

// Grid (ceil(N / blockDim), Hkv, B); dynamic shared memory holds kRows query rows as float.
template <typename T>
__global__ void ensemble_scores_generic(EnsembleParams p, int rows_per_stage) {
  extern __shared__ float q_stage[];
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t len = clamp64(p.lengths[b], 0, p.N);
  const int64_t G = p.Hq / p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + j * p.k_sn;
  float acc = 0.0f;
  const int64_t rows = G * p.W;
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_stage) {
    const int64_t nr = rows - r0 < rows_per_stage ? rows - r0 : rows_per_stage;
    __syncthreads();
    for (int64_t e = threadIdx.x; e < nr * p.D; e += blockDim.x) {
      const int64_t r = r0 + e / p.D, g = r / p.W, w = r % p.W;
      const T* q = static_cast<const T*>(p.q) + b * p.q_sb + (h * G + g) * p.q_sh + w * p.q_sw;
      q_stage[e] = to_float(q[e % p.D]);
    }
    __syncthreads();
    if (j >= len) continue;
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i, g = r / p.W, w = r % p.W;
      const int64_t pos = row_position(p, b, w);
      if (j > pos) continue;  // causal (also skips rows at negative positions)
      float dot = 0.0f;
      for (int64_t d = 0; d < p.D; ++d) dot += q_stage[i * p.D + d] * to_float(k[d]);
      const int64_t hq = h * G + g;
      const float lse = p.lse ? p.lse[b * p.lse_sb + hq * p.lse_sh + w * p.lse_sw]
                              : p.lse_out[(b * p.Hq + hq) * p.W + w];
      const float weight = p.row_weights ? p.row_weights[b * p.rw_sb + w * p.rw_sw] : 1.0f;
      acc += weight * __expf(dot * p.scale - lse);
    }
  }
  if (j < p.N) p.out[(b * p.Hkv + h) * p.N + j] = j < len ? acc : 0.0f;
}

template <typename T>
cudaError_t launch_ensemble_scores_generic(const EnsembleParams& p, cudaStream_t stream) {
  if (!p.lse) {
    const int warps = 8;
    const int64_t rows = p.B * p.Hq * p.W;
    ensemble_lse_generic<T><<<ceil_div(rows, warps), warps * 32, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int threads = 128;
  const int rows_per_stage = static_cast<int>(8192 / p.D > 0 ? 8192 / p.D : 1);
  const size_t smem = sizeof(float) * rows_per_stage * p.D;
  const dim3 grid(ceil_div(p.N, threads), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  ensemble_scores_generic<T><<<grid, threads, smem, stream>>>(p, rows_per_stage);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

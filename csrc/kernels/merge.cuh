// MiniCache-style merge of two layers' K or V on CUDA: slerp_merge (per-vector norms, SLERP of
// the unit directions, angular distance) and slerp_restore (norm * direction).
// docs/perf/merge.md has the design; slerp_math.h the per-vector math, shared with the CPU.
//
// Layout. A "vector" is one [D] row of a [B, X, Y, D] tensor whose last dim is contiguous and
// whose other dims have any element strides; vector v = (b * X + x) * Y + y. Offsets are 64-bit.
//
// Fast path (every row 16-byte aligned, D * sizeof(T) a multiple of 16, at most 64 chunks of 16
// bytes): a group of LANES lanes of one warp takes a vector; lane l holds chunks l + k * LANES
// (k < CPL) of a and of b in registers (one 16-byte load of each per chunk), so a vector is read
// once. Group sums are xor-shuffles inside the group. Every lane of a warp runs the same number
// of loop iterations (the loop test is on the warp's first vector) because the shuffles use the
// full-warp mask; lanes past the last vector compute on zeros and store nothing.
// Generic path (any D, any alignment): one warp per vector, scalar loads, three passes over the
// vector (the re-reads hit L1/L2).
#pragma once

#include <algorithm>
#include <type_traits>

#include "common.cuh"

#define PYRAMID_KV_HD __host__ __device__
#include "slerp_math.h"

namespace pyramid_kv::kernels {

struct Strides3 {
  int64_t b, x, y;  // element strides of dims 0, 1, 2
};

struct SlerpMergeParams {
  const void* a;
  const void* b;
  Strides3 sa, sb;
  void* direction;    // contiguous [V, D], the input dtype
  float* norm_a;      // contiguous [V]
  float* norm_b;
  float* distance;
  int64_t X, Y, V, D;
  float t, eps;
};

struct SlerpRestoreParams {
  const void* direction;
  Strides3 sd;
  const float* norm;  // [B, X, Y], any strides
  Strides3 sn;
  void* out;
  Strides3 so;
  int64_t X, Y, V, D;
};

namespace merge_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // grid-stride loops cover the rest

template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int64_t offset(int64_t v, int64_t X, int64_t Y, const Strides3& s) {
  const int64_t y = v % Y, bx = v / Y;
  return (bx / X) * s.b + (bx % X) * s.x + y * s.y;
}

template <int LANES>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;  // lane ^ o stays inside the LANES-aligned group
}

// 16 bytes <-> E = 16 / sizeof(T) floats.
template <typename T>
struct Chunk {
  static constexpr int E = 16 / sizeof(T);
  float f[E];

  __device__ __forceinline__ void load(const T* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = to_float(e[j]);
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = 0.0f;
  }
  __device__ __forceinline__ static void store(T* p, const float* x) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < E; ++j) e[j] = from_float<T>(x[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

template <typename T, int LANES, int CPL>
__global__ void __launch_bounds__(kThreads) slerp_merge_vec_kernel(const SlerpMergeParams p) {
  using C = Chunk<T>;
  constexpr int E = C::E;
  constexpr int kGroups = 32 / LANES;  // vectors per warp
  const int lane = threadIdx.x % 32, sub = lane % LANES;
  const int64_t chunks = p.D / E;
  const int64_t step = int64_t{gridDim.x} * kWarps * kGroups;
  const int64_t first = (int64_t{blockIdx.x} * kWarps + threadIdx.x / 32) * kGroups;
  for (int64_t base = first; base < p.V; base += step) {  // warp-uniform test
    const int64_t v = base + lane / LANES;
    const bool live = v < p.V;
    const T* pa = static_cast<const T*>(p.a);
    const T* pb = static_cast<const T*>(p.b);
    if (live) pa += offset(v, p.X, p.Y, p.sa), pb += offset(v, p.X, p.Y, p.sb);
    C ca[CPL], cb[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {  // all loads first: 2 * CPL in flight
      const int64_t c = sub + k * LANES;
      if (live && c < chunks) {
        ca[k].load(pa + c * E), cb[k].load(pb + c * E);
      } else {
        ca[k].zero(), cb[k].zero();
      }
    }
    float saa = 0.0f, sbb = 0.0f;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        saa = fmaf(ca[k].f[j], ca[k].f[j], saa), sbb = fmaf(cb[k].f[j], cb[k].f[j], sbb);
      }
    }
    saa = group_sum<LANES>(saa), sbb = group_sum<LANES>(sbb);
    const SlerpBasis basis = slerp_basis(saa, sbb);
    SlerpSums sums;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
#pragma unroll
      for (int j = 0; j < E; ++j) sums.add(basis, p.t, ca[k].f[j], cb[k].f[j]);
    }
    sums.plus = group_sum<LANES>(sums.plus);
    sums.minus = group_sum<LANES>(sums.minus);
    sums.lerp = group_sum<LANES>(sums.lerp);
    const SlerpResult r = slerp_result(basis, sums, p.t, p.eps);
    if (!live) continue;
    T* out = static_cast<T*>(p.direction) + v * p.D;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = sub + k * LANES;
      if (c >= chunks) continue;
      float d[E];
#pragma unroll
      for (int j = 0; j < E; ++j) d[j] = fmaf(r.ca, ca[k].f[j], r.cb * cb[k].f[j]);
      C::store(out + c * E, d);
    }
    if (sub == 0) {
      p.norm_a[v] = sqrtf(saa), p.norm_b[v] = sqrtf(sbb), p.distance[v] = r.distance;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) slerp_merge_generic_kernel(const SlerpMergeParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t step = int64_t{gridDim.x} * kWarps;
  for (int64_t v = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; v < p.V; v += step) {
    const T* pa = static_cast<const T*>(p.a) + offset(v, p.X, p.Y, p.sa);
    const T* pb = static_cast<const T*>(p.b) + offset(v, p.X, p.Y, p.sb);
    float saa = 0.0f, sbb = 0.0f;
    for (int64_t i = lane; i < p.D; i += 32) {
      const float a = to_float(pa[i]), b = to_float(pb[i]);
      saa = fmaf(a, a, saa), sbb = fmaf(b, b, sbb);
    }
    saa = group_sum<32>(saa), sbb = group_sum<32>(sbb);
    const SlerpBasis basis = slerp_basis(saa, sbb);
    SlerpSums sums;
    for (int64_t i = lane; i < p.D; i += 32) sums.add(basis, p.t, to_float(pa[i]), to_float(pb[i]));
    sums.plus = group_sum<32>(sums.plus);
    sums.minus = group_sum<32>(sums.minus);
    sums.lerp = group_sum<32>(sums.lerp);
    const SlerpResult r = slerp_result(basis, sums, p.t, p.eps);
    T* out = static_cast<T*>(p.direction) + v * p.D;
    for (int64_t i = lane; i < p.D; i += 32) {
      out[i] = from_float<T>(fmaf(r.ca, to_float(pa[i]), r.cb * to_float(pb[i])));
    }
    if (lane == 0) {
      p.norm_a[v] = sqrtf(saa), p.norm_b[v] = sqrtf(sbb), p.distance[v] = r.distance;
    }
  }
}

// Restore: a group of LANES lanes per vector, ELEMS elements (16 bytes, or 1) per access. No
// shuffles, so lanes past the end simply skip.
template <typename T, int LANES, bool kVec>
__global__ void __launch_bounds__(kThreads) slerp_restore_kernel(const SlerpRestoreParams p) {
  using C = Chunk<T>;
  constexpr int E = kVec ? C::E : 1;
  constexpr int kGroups = kThreads / LANES;  // vectors per block
  const int sub = threadIdx.x % LANES;
  const int64_t chunks = p.D / E;
  const int64_t step = int64_t{gridDim.x} * kGroups;
  for (int64_t v = int64_t{blockIdx.x} * kGroups + threadIdx.x / LANES; v < p.V; v += step) {
    const float n = p.norm[offset(v, p.X, p.Y, p.sn)];
    const T* d = static_cast<const T*>(p.direction) + offset(v, p.X, p.Y, p.sd);
    T* o = static_cast<T*>(p.out) + offset(v, p.X, p.Y, p.so);
    for (int64_t c = sub; c < chunks; c += LANES) {
      if constexpr (kVec) {
        C x;
        x.load(d + c * E);
#pragma unroll
        for (int j = 0; j < E; ++j) x.f[j] *= n;
        C::store(o + c * E, x.f);
      } else {
        o[c] = from_float<T>(n * to_float(d[c]));
      }
    }
  }
}

inline unsigned grid_for(int64_t V, int64_t vectors_per_block) {
  return static_cast<unsigned>(std::min<int64_t>((V + vectors_per_block - 1) / vectors_per_block, kMaxBlocks));
}

// Lanes per vector for `chunks` 16-byte chunks: the next power of two, in [4, 32].
inline int lanes_for(int64_t chunks) {
  int lanes = 4;
  while (lanes < 32 && lanes < chunks) lanes *= 2;
  return lanes;
}

template <typename Fn>
void dispatch_lanes(int lanes, Fn&& fn) {
  switch (lanes) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    default: fn(std::integral_constant<int, 32>{}); break;
  }
}

}  // namespace merge_detail

// Largest D * sizeof(T) of the fast merge path: 64 chunks of 16 bytes (2 per lane of a warp).
constexpr int64_t kMergeMaxVecBytes = 64 * 16;

// vec16: every row of a, b and direction is 16-byte aligned and D * sizeof(T) % 16 == 0.
template <typename T>
cudaError_t launch_slerp_merge(const SlerpMergeParams& p, bool vec16, cudaStream_t stream) {
  using namespace merge_detail;
  if (p.V == 0) return cudaSuccess;
  const int64_t chunks = p.D * int64_t{sizeof(T)} / 16;
  if (vec16 && p.D * int64_t{sizeof(T)} <= kMergeMaxVecBytes) {
    const int lanes = lanes_for(chunks);
    dispatch_lanes(lanes, [&](auto L) {
      constexpr int kLanes = decltype(L)::value;
      const unsigned grid = grid_for(p.V, kThreads / kLanes);
      if (chunks > kLanes) {
        slerp_merge_vec_kernel<T, kLanes, 2><<<grid, kThreads, 0, stream>>>(p);
      } else {
        slerp_merge_vec_kernel<T, kLanes, 1><<<grid, kThreads, 0, stream>>>(p);
      }
    });
  } else {
    slerp_merge_generic_kernel<T><<<grid_for(p.V, kWarps), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// vec16: every row of direction and out is 16-byte aligned and D * sizeof(T) % 16 == 0.
template <typename T>
cudaError_t launch_slerp_restore(const SlerpRestoreParams& p, bool vec16, cudaStream_t stream) {
  using namespace merge_detail;
  if (p.V == 0 || p.D == 0) return cudaSuccess;
  if (vec16) {
    dispatch_lanes(lanes_for(p.D * int64_t{sizeof(T)} / 16), [&](auto L) {
      constexpr int kLanes = decltype(L)::value;
      slerp_restore_kernel<T, kLanes, true>
          <<<grid_for(p.V, kThreads / kLanes), kThreads, 0, stream>>>(p);
    });
  } else {
    slerp_restore_kernel<T, 32, false><<<grid_for(p.V, kWarps), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

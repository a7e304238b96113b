// Small torch-free helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>

namespace pyramid_kv::kernels {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Lengths, counts and indices arrive as int32 or int64 tensors; one pointer type reads both.
struct IndexArray {
  const void* ptr;
  bool is64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Order-preserving map of a float score to an unsigned key (docs/ops.md): NaN ranks as -inf
// and -0 equals +0, so unsigned comparison of keys is the score order.
__device__ __forceinline__ uint32_t order_key(float s) {
  const float y = fmaxf(s, -__int_as_float(0x7f800000)) + 0.0f;  // NaN -> -inf, -0 -> +0
  const uint32_t u = __float_as_uint(y);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// Inverse of order_key, as mass for top-p: max(score, 0).
__device__ __forceinline__ float key_mass(uint32_t key) {
  if (!(key & 0x80000000u)) return 0.0f;  // negative scores carry no mass
  return __uint_as_float(key & 0x7fffffffu);
}

// The 32-bit shared-state-space address of a shared-memory pointer (for inline PTX).
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// The lanes below this one, as a mask.
__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Inclusive prefix sum over the lanes of a full warp (any integer type).
template <typename V>
__device__ __forceinline__ V warp_inclusive_sum(V x, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// out[from, to) = -1, by thread g of G: 16-byte stores from the first 16-byte aligned element.
__device__ __forceinline__ void fill_minus_one(int32_t* out, int64_t from, int64_t to, int g, int G) {
  const int64_t skew = static_cast<int64_t>((reinterpret_cast<uintptr_t>(out + from) >> 2) & 3u);
  const int64_t head = min(to, from + ((4 - skew) & 3));
  for (int64_t i = from + g; i < head; i += G) out[i] = -1;
  const int64_t nvec = (to - head) / 4;
  int4* out4 = reinterpret_cast<int4*>(out + head);
  for (int64_t v = g; v < nvec; v += G) out4[v] = make_int4(-1, -1, -1, -1);
  for (int64_t i = head + nvec * 4 + g; i < to; i += G) out[i] = -1;
}

// A register type of exactly N bytes, for vector loads and stores.
template <int N> struct Bytes;
template <> struct Bytes<16> { using type = uint4; };
template <> struct Bytes<8> { using type = uint2; };
template <> struct Bytes<4> { using type = uint32_t; };
template <> struct Bytes<2> { using type = uint16_t; };
template <> struct Bytes<1> { using type = uint8_t; };

// 16 bytes global -> shared without holding registers; .cg reads through L2 (coherent with
// other blocks' stores). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(global) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N committed groups (the most recent ones) are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Programmatic dependent launch (sm_90+; no-ops below): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the previous kernel of
// its stream runs, once every block of that one has called pdl_launch_dependents (or exited);
// pdl_wait returns when the previous kernel has completed and its writes are visible.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// An attribute of the current device (0 if it cannot be read).
inline int current_device_attribute(cudaDeviceAttr attr) {
  int device = 0, v = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess) {
    cudaGetLastError();  // clear it, so that no launch check reports it
    return 0;
  }
  return v;
}

// A positive int per device, found by `query(v)` on first use and remembered (devices 0-63).
class PerDevice {
 public:
  template <typename Query>
  cudaError_t get(int device, int& v, Query&& query) {
    const bool cached = device >= 0 && device < kDevices;
    if (cached && (v = value_[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
    if (cudaError_t e = query(v); e != cudaSuccess) return e;
    if (cached && v > 0) value_[device].store(v, std::memory_order_relaxed);
    return cudaSuccess;
  }

 private:
  static constexpr int kDevices = 64;
  std::array<std::atomic<int>, kDevices> value_{};
};

// The multiprocessor count of a device (a host query, not a stream operation, so it may run
// during CUDA-graph capture).
inline cudaError_t sm_count(int device, int& sms) {
  static PerDevice cache;
  return cache.get(device, sms, [device](int& v) {
    return cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device);
  });
}

// Blocks of one kernel launch shape that fit on the current device at once (multiprocessors x
// resident blocks per multiprocessor): the grid of a persistent loop, or the size of a wave.
// Host queries, no sync; one static instance per kernel and shape remembers them per device.
// `prepare` (kernel attributes that change occupancy) runs before the first query on a device.
class ResidentBlocks {
 public:
  template <typename Prepare>
  cudaError_t get(const void* kernel, int threads, size_t smem, Prepare&& prepare, int& blocks) {
    int device = 0;
    if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
    return cache_.get(device, blocks, [&](int& v) {
      int sms = 0, per_sm = 0;
      if (cudaError_t e = prepare(); e != cudaSuccess) return e;
      if (cudaError_t e = sm_count(device, sms); e != cudaSuccess) return e;
      if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
          e != cudaSuccess) {
        return e;
      }
      v = sms * per_sm > 0 ? sms * per_sm : 1;
      return cudaSuccess;
    });
  }

 private:
  PerDevice cache_;
};

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace pyramid_kv::kernels

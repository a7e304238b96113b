// What every CUDA launcher needs: the device guard, torch's current stream, a dtype switch
// to the torch-free kernel types, and a readable error for a failed launch.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "checks.h"

namespace pyramid_kv {

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Calls fn(T{}) with T the CUDA element type of a float32 / float16 / bfloat16 tensor.
template <typename Fn>
void dispatch_float(at::ScalarType t, const char* op, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  }
}

inline kernels::IndexArray index_array(const Tensor& t) {
  return {t.const_data_ptr(), t.scalar_type() == at::kLong};
}

// Every [D] row of a 4-d tensor t starts on a 16-byte boundary and holds whole 16-byte chunks.
// Strides of size-1 dims never move a row, so they do not count.
inline bool rows_aligned16(const Tensor& t) {
  const int64_t es = t.element_size();
  if ((t.size(3) * es) % 16 != 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) {
    return false;
  }
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && (t.stride(i) * es) % 16 != 0) return false;
  }
  return true;
}

}  // namespace pyramid_kv

// The parameters of a select launch (docs/ops.md), shared by its kernels.
#pragma once

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

}  // namespace pyramid_kv::kernels

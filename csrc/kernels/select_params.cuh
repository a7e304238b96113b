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

// A segment's geometry (docs/ops.md): forced positions [0, n_sink) and [rstart, len),
// candidates [n_sink, rstart). Every select kernel derives it here.
struct SegmentGeometry {
  int len, n_sink, rstart, forced, n_cand;
};

__device__ __forceinline__ SegmentGeometry segment_geometry(const SelectParams& p, int64_t len_raw) {
  const int64_t l = clamp64(len_raw, 0, p.N);
  const int64_t ns = p.sink < l ? p.sink : l;
  const int64_t rs = l - p.recent > ns ? l - p.recent : ns;
  const int len = static_cast<int>(l), n_sink = static_cast<int>(ns), rstart = static_cast<int>(rs);
  return {len, n_sink, rstart, n_sink + (len - rstart), rstart - n_sink};
}

// The segment's budget (p for top-p, k for top-k), loaded as early as the caller likes.
__device__ __forceinline__ void load_budget(const SelectParams& p, int64_t seg, double& top_p, int64_t& top_k) {
  if (p.by_mass) top_p = p.top_p ? static_cast<double>(p.top_p[seg]) : p.top_p_default;
  else top_k = p.top_k.ptr ? p.top_k[seg] : p.top_k_default;
}

// Candidates kept by top-k before the floor and the cap.
__device__ __forceinline__ int64_t top_k_candidates(int64_t k, int n_cand) { return k < 0 ? 0 : (k < n_cand ? k : n_cand); }

// The floor (min_keep counts forced positions too) and the cap (capacity) on r candidates.
__device__ __forceinline__ int64_t floor_and_cap(const SelectParams& p, int64_t r, int forced, int n_cand) {
  r = r > p.min_keep - forced ? r : p.min_keep - forced;
  return clamp64(r, 0, n_cand < p.capacity - forced ? n_cand : p.capacity - forced);
}

}  // namespace pyramid_kv::kernels

// Declarations of the op implementations bound in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace pyramid_kv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define PYRAMID_KV_DECLARE_OPS(DEV)                                                        \
  Tensor ensemble_scores_##DEV(const Tensor& q, const Tensor& k, const Tensor& lengths,     \
                               const OptTensor& row_weights, const OptTensor& lse,          \
                               double scale);                                               \
  std::tuple<Tensor, Tensor> select_top_p_##DEV(                                            \
      const Tensor& scores, const Tensor& lengths, const OptTensor& maybe_top_p,             \
      double top_p, int64_t sink, int64_t recent, int64_t min_keep, int64_t capacity);       \
  std::tuple<Tensor, Tensor> select_top_k_##DEV(                                            \
      const Tensor& scores, const Tensor& lengths, const OptTensor& maybe_top_k,             \
      int64_t top_k, int64_t sink, int64_t recent, int64_t min_keep, int64_t capacity);      \
  std::vector<Tensor> compact_##DEV(at::TensorList src, const Tensor& indices,             \
                                    const Tensor& counts);                                  \
  void compact_out_##DEV(at::TensorList src, const Tensor& indices, const Tensor& counts,   \
                         at::TensorList out);                                               \
  void compact_inplace_##DEV(at::TensorList src, const Tensor& indices, const Tensor& counts); \
  std::tuple<Tensor, Tensor, Tensor, Tensor> slerp_merge_##DEV(const Tensor& a, const Tensor& b, \
                                                             double t, double eps);         \
  Tensor slerp_restore_##DEV(const Tensor& direction, const Tensor& norm);                 \
  void slerp_restore_out_##DEV(const Tensor& direction, const Tensor& norm, const Tensor& out); \
  Tensor merged_attention_##DEV(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v,    \
                                const Tensor& norm_k, const Tensor& norm_v,                 \
                                const Tensor& lengths, const Tensor& retained_k,            \
                                const Tensor& retained_v, const Tensor& retained_counts,    \
                                const Tensor& tail_k, const Tensor& tail_v,                 \
                                const Tensor& tail_lengths, double scale);

PYRAMID_KV_DECLARE_OPS(cpu)
PYRAMID_KV_DECLARE_OPS(cuda)

#undef PYRAMID_KV_DECLARE_OPS

}  // namespace pyramid_kv

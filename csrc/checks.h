// Argument checks shared by the CPU and CUDA implementations of every op: one place for the
// shape, dtype and device rules of docs/ops.md. Errors name the offending argument.
#pragma once

#include "ops.h"

namespace pyramid_kv {

struct EnsembleDims {
  int64_t B, Hq, Hkv, W, N, D;
};
EnsembleDims check_ensemble_scores(const Tensor& q, const Tensor& k, const Tensor& lengths,
                                   const OptTensor& row_weights, const OptTensor& lse,
                                   double scale);

struct SelectDims {
  int64_t S, N;
};
// `budget` is maybe_top_p (float32) or maybe_top_k (int32/int64).
SelectDims check_select(const Tensor& scores, const Tensor& lengths, const OptTensor& budget,
                        bool by_mass, int64_t sink, int64_t recent, int64_t min_keep,
                        int64_t capacity);
void check_top_p(double top_p);
void check_top_k(int64_t top_k);

struct CompactDims {
  int64_t B, N, C;     // batch, source tokens, index capacity
  int64_t heads;       // heads of per-head indices, 0 for per-sequence indices
};
CompactDims check_compact(at::TensorList src, const Tensor& indices, const Tensor& counts);
void check_compact_out(at::TensorList src, const CompactDims& dims, at::TensorList out);
// In place: no tensor may overlap itself (zero strides) or another tensor of the call.
void check_compact_inplace(at::TensorList src);

struct MergeDims {
  int64_t B, X, Y, D;
};
// slerp_merge: a and b [B, X, Y, D], same dtype/device/shape; t in [0, 1]; eps finite >= 0.
MergeDims check_slerp_merge(const Tensor& a, const Tensor& b, double t, double eps);
// slerp_restore: direction [B, X, Y, D] (float), norm float32 [B, X, Y].
MergeDims check_slerp_restore(const Tensor& direction, const Tensor& norm);
void check_slerp_restore_out(const Tensor& direction, const Tensor& out);

struct MergedAttentionDims {
  int64_t B, Hq, Hkv, D, P, C, T;
};
// merged_attention: q [B, Hq, D]; dir_k, dir_v [B, P, Hkv, D] and norm_k, norm_v float32
// [B, P, Hkv]; retained_k, retained_v [B, Hkv, C, D]; tail_k, tail_v [B, T, Hkv, D]; int64
// lengths [B], retained_counts [B, Hkv], tail_lengths [B]; one dtype and device; scale > 0.
MergedAttentionDims check_merged_attention(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v,
                                           const Tensor& norm_k, const Tensor& norm_v,
                                           const Tensor& lengths, const Tensor& retained_k,
                                           const Tensor& retained_v, const Tensor& retained_counts,
                                           const Tensor& tail_k, const Tensor& tail_v,
                                           const Tensor& tail_lengths, double scale);

// Value checks: CPU kernels run them inline (no cost); CUDA kernels cannot without a host
// sync, so they clamp instead and the Python wrappers validate on request.
void check_lengths_values(const Tensor& lengths_cpu, int64_t N, const char* name);

bool is_index_dtype(at::ScalarType t);

}  // namespace pyramid_kv

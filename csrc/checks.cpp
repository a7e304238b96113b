#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <utility>

namespace pyramid_kv {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension (stride(-1) == 1), got strides ",
                    t.strides());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

void check_lengths(const Tensor& lengths, const Tensor& ref, int64_t n, const char* name) {
  check_same_device(lengths, ref, name, "the data");
  TORCH_CHECK_TYPE(is_index_dtype(lengths.scalar_type()), name,
                   " must be int32 or int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == n, name, " must have shape [", n,
                    "], got ", lengths.sizes());
}

}  // namespace

bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

EnsembleDims check_ensemble_scores(const Tensor& q, const Tensor& k, const Tensor& lengths,
                                   const OptTensor& row_weights, const OptTensor& lse,
                                   double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, Hq, W, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be 4-D [B, Hkv, N, D], got shape ", k.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(q.scalar_type()),
                   "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  check_same_device(k, q, "k", "q");
  const EnsembleDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == d.B, "k must have the batch size of q (", d.B, "), got ",
                    k.size(0));
  TORCH_CHECK_VALUE(k.size(3) == d.D, "k must have the head dim of q (", d.D, "), got ",
                    k.size(3));
  TORCH_CHECK_VALUE(d.Hkv > 0 || d.Hq == 0, "k must have at least one KV head");
  TORCH_CHECK_VALUE(d.Hkv == 0 || d.Hq % d.Hkv == 0, "q heads (", d.Hq,
                    ") must be a multiple of k heads (", d.Hkv, ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_lengths(lengths, q, d.B, "lengths");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be finite and > 0, got ",
                    scale);
  if (row_weights) {
    const Tensor& w = *row_weights;
    check_same_device(w, q, "row_weights", "q");
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "row_weights must be float32, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == d.B && w.size(1) == d.W,
                      "row_weights must have shape [B, W] = [", d.B, ", ", d.W, "], got ",
                      w.sizes());
  }
  if (lse) {
    const Tensor& l = *lse;
    check_same_device(l, q, "lse", "q");
    TORCH_CHECK_TYPE(l.scalar_type() == at::kFloat, "lse must be float32, got ",
                     l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 3 && l.size(0) == d.B && l.size(1) == d.Hq && l.size(2) == d.W,
                      "lse must have shape [B, Hq, W] = [", d.B, ", ", d.Hq, ", ", d.W,
                      "], got ", l.sizes());
  }
  return d;
}

SelectDims check_select(const Tensor& scores, const Tensor& lengths, const OptTensor& budget,
                        bool by_mass, int64_t sink, int64_t recent, int64_t min_keep,
                        int64_t capacity) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be 2-D [S, N], got shape ", scores.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(scores.scalar_type()),
                   "scores must be float32, float16 or bfloat16, got ", scores.scalar_type());
  check_last_dim_contiguous(scores, "scores");
  const SelectDims d{scores.size(0), scores.size(1)};
  check_lengths(lengths, scores, d.S, "lengths");
  const char* name = by_mass ? "maybe_top_p" : "maybe_top_k";
  if (budget) {
    check_same_device(*budget, scores, name, "scores");
    if (by_mass) {
      TORCH_CHECK_TYPE(budget->scalar_type() == at::kFloat, name, " must be float32, got ",
                       budget->scalar_type());
    } else {
      TORCH_CHECK_TYPE(is_index_dtype(budget->scalar_type()), name,
                       " must be int32 or int64, got ", budget->scalar_type());
    }
    TORCH_CHECK_VALUE(budget->dim() == 1 && budget->size(0) == d.S, name,
                      " must have shape [S] = [", d.S, "], got ", budget->sizes());
  }
  TORCH_CHECK_VALUE(sink >= 0, "sink must be >= 0, got ", sink);
  TORCH_CHECK_VALUE(recent >= 0, "recent must be >= 0, got ", recent);
  TORCH_CHECK_VALUE(min_keep >= 0, "min_keep must be >= 0, got ", min_keep);
  TORCH_CHECK_VALUE(capacity >= 0, "capacity must be >= 0, got ", capacity);
  TORCH_CHECK_VALUE(capacity >= std::min(d.N, sink + recent),
                    "capacity (", capacity, ") must hold the forced positions: at least min(N, ",
                    "sink + recent) = ", std::min(d.N, sink + recent));
  TORCH_CHECK_VALUE(capacity >= std::min(d.N, min_keep), "capacity (", capacity,
                    ") must be at least min(N, min_keep) = ", std::min(d.N, min_keep));
  return d;
}

void check_top_p(double top_p) {
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
}

void check_top_k(int64_t top_k) {
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
}

CompactDims check_compact(at::TensorList src, const Tensor& indices, const Tensor& counts) {
  TORCH_CHECK_VALUE(!src.empty(), "src must hold at least one tensor");
  const Tensor& s0 = src[0];
  TORCH_CHECK_TYPE(is_index_dtype(indices.scalar_type()), "indices must be int32 or int64, got ",
                   indices.scalar_type());
  TORCH_CHECK_TYPE(is_index_dtype(counts.scalar_type()), "counts must be int32 or int64, got ",
                   counts.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2 || indices.dim() == 3,
                    "indices must be [B, C] (per sequence) or [B, H, C] (per head), got shape ",
                    indices.sizes());
  check_same_device(indices, s0, "indices", "src[0]");
  check_same_device(counts, s0, "counts", "src[0]");
  check_last_dim_contiguous(indices, "indices");
  CompactDims d{};
  d.B = indices.size(0);
  d.C = indices.size(-1);
  d.heads = indices.dim() == 3 ? indices.size(1) : 0;
  const auto expected_counts = indices.sizes().slice(0, indices.dim() - 1);
  TORCH_CHECK_VALUE(counts.sizes() == expected_counts, "counts must have shape ",
                    expected_counts, " (indices without its last dim), got ", counts.sizes());
  for (size_t t = 0; t < src.size(); ++t) {
    const Tensor& s = src[t];
    TORCH_CHECK_VALUE(s.dim() == 4, "src[", t, "] must be 4-D [B, H, N, D], got shape ",
                      s.sizes());
    check_same_device(s, s0, "src tensors", "src[0]");
    TORCH_CHECK_VALUE(s.size(0) == d.B, "src[", t, "] must have the batch size of indices (",
                      d.B, "), got ", s.size(0));
    TORCH_CHECK_VALUE(s.size(2) == s0.size(2), "src[", t, "] must have the token count of src[0] (",
                      s0.size(2), "), got ", s.size(2));
    TORCH_CHECK_VALUE(d.heads == 0 || s.size(1) == d.heads, "src[", t,
                      "] must have as many heads as the per-head indices (", d.heads, "), got ",
                      s.size(1));
    check_last_dim_contiguous(s, "src tensors");
  }
  d.N = s0.size(2);
  return d;
}

void check_compact_out(at::TensorList src, const CompactDims& dims, at::TensorList out) {
  TORCH_CHECK_VALUE(out.size() == src.size(), "out must hold one tensor per src tensor (",
                    src.size(), "), got ", out.size());
  for (size_t t = 0; t < out.size(); ++t) {
    const Tensor& o = out[t];
    const Tensor& s = src[t];
    TORCH_CHECK_TYPE(o.scalar_type() == s.scalar_type(), "out[", t, "] must have the dtype of src[",
                     t, "] (", s.scalar_type(), "), got ", o.scalar_type());
    check_same_device(o, s, "out tensors", "src");
    TORCH_CHECK_VALUE(o.dim() == 4 && o.size(0) == s.size(0) && o.size(1) == s.size(1) &&
                          o.size(3) == s.size(3) && o.size(2) >= dims.C,
                      "out[", t, "] must have shape [B, H, >= C, D] = [", s.size(0), ", ",
                      s.size(1), ", >=", dims.C, ", ", s.size(3), "], got ", o.sizes());
    check_last_dim_contiguous(o, "out tensors");
    for (size_t u = 0; u < src.size(); ++u) {
      // Overlap of storages is a conservative proxy for aliasing; in-place compaction is
      // a separate, ordered kernel.
      const bool overlap = o.numel() > 0 && src[u].numel() > 0 &&
                           o.storage().is_alias_of(src[u].storage());
      TORCH_CHECK_VALUE(!overlap, "out[", t, "] must not share memory with src[", u, "]");
    }
  }
}

void check_compact_inplace(at::TensorList src) {
  for (size_t t = 0; t < src.size(); ++t) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(src[t]) != at::MemOverlap::Yes, "src[", t,
                      "] has elements that share memory (e.g. a zero stride); in-place ",
                      "compaction needs distinct elements");
    for (size_t u = 0; u < t; ++u) {
      const at::MemOverlapStatus s = at::get_overlap_status(src[u], src[t]);
      TORCH_CHECK_VALUE(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
                        "src[", t, "] must not share memory with src[", u, "]");
    }
  }
}

namespace {

MergeDims check_merge_operand(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [B, X, Y, D], got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
  check_last_dim_contiguous(t, name);
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

}  // namespace

MergeDims check_slerp_merge(const Tensor& a, const Tensor& b, double t, double eps) {
  const MergeDims d = check_merge_operand(a, "a");
  TORCH_CHECK_VALUE(b.dim() == 4, "b must be 4-D [B, X, Y, D], got shape ", b.sizes());
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "b must have the dtype of a (",
                   a.scalar_type(), "), got ", b.scalar_type());
  check_same_device(b, a, "b", "a");
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), "b must have the shape of a (", a.sizes(), "), got ",
                    b.sizes());
  check_last_dim_contiguous(b, "b");
  TORCH_CHECK_VALUE(t >= 0.0 && t <= 1.0, "t must be in [0, 1], got ", t);  // NaN fails too
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ", eps);
  return d;
}

MergeDims check_slerp_restore(const Tensor& direction, const Tensor& norm) {
  const MergeDims d = check_merge_operand(direction, "direction");
  check_same_device(norm, direction, "norm", "direction");
  TORCH_CHECK_TYPE(norm.scalar_type() == at::kFloat, "norm must be float32, got ",
                   norm.scalar_type());
  TORCH_CHECK_VALUE(norm.dim() == 3 && norm.size(0) == d.B && norm.size(1) == d.X &&
                        norm.size(2) == d.Y,
                    "norm must have shape [B, X, Y] = [", d.B, ", ", d.X, ", ", d.Y, "], got ",
                    norm.sizes());
  return d;
}

void check_slerp_restore_out(const Tensor& direction, const Tensor& out) {
  TORCH_CHECK_TYPE(out.scalar_type() == direction.scalar_type(),
                   "out must have the dtype of direction (", direction.scalar_type(), "), got ",
                   out.scalar_type());
  check_same_device(out, direction, "out", "direction");
  TORCH_CHECK_VALUE(out.sizes() == direction.sizes(), "out must have the shape of direction (",
                    direction.sizes(), "), got ", out.sizes());
  check_last_dim_contiguous(out, "out");
}

namespace {

// A K/V operand of merged_attention: 4-D, q's dtype and device, last dim contiguous, and the
// shape `want` (-1: any size, whose value is returned through `free_dim`).
void check_kv_operand(const Tensor& t, const Tensor& q, const char* name, const char* layout,
                      std::array<int64_t, 4> want) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D ", layout, ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (",
                   q.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, q, name, "q");
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(want[i] < 0 || t.size(i) == want[i], name, " must have shape ", layout,
                      " = [", want[0], ", ", want[1], ", ", want[2], ", ", want[3],
                      "] (-1: any), got ", t.sizes());
  }
  check_last_dim_contiguous(t, name);
}

void check_int64(const Tensor& t, const Tensor& q, const char* name, at::IntArrayRef shape) {
  check_same_device(t, q, name, "q");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

MergedAttentionDims check_merged_attention(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v,
                                           const Tensor& norm_k, const Tensor& norm_v,
                                           const Tensor& lengths, const Tensor& retained_k,
                                           const Tensor& retained_v, const Tensor& retained_counts,
                                           const Tensor& tail_k, const Tensor& tail_v,
                                           const Tensor& tail_lengths, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D [B, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(q.scalar_type()), "q must be float32, float16 or bfloat16, got ",
                   q.scalar_type());
  check_last_dim_contiguous(q, "q");
  MergedAttentionDims d{};
  d.B = q.size(0), d.Hq = q.size(1), d.D = q.size(2);
  TORCH_CHECK_VALUE(dir_k.dim() == 4, "dir_k must be 4-D [B, P, Hkv, D], got shape ", dir_k.sizes());
  d.P = dir_k.size(1), d.Hkv = dir_k.size(2);
  TORCH_CHECK_VALUE(dir_k.size(3) == d.D, "dir_k must have the head dim of q (", d.D, "), got ",
                    dir_k.size(3));
  check_kv_operand(dir_k, q, "dir_k", "[B, P, Hkv, D]", {d.B, -1, -1, d.D});
  check_kv_operand(dir_v, q, "dir_v", "[B, P, Hkv, D]", {d.B, d.P, d.Hkv, d.D});
  TORCH_CHECK_VALUE(d.Hkv > 0 || d.Hq == 0, "dir_k must have at least one KV head");
  TORCH_CHECK_VALUE(d.Hkv == 0 || d.Hq % d.Hkv == 0, "q heads (", d.Hq,
                    ") must be a multiple of the KV heads of dir_k (", d.Hkv, ")");
  for (const auto& [t, name] : {std::pair{&norm_k, "norm_k"}, std::pair{&norm_v, "norm_v"}}) {
    check_same_device(*t, q, name, "q");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.P && t->size(2) == d.Hkv,
                      name, " must have shape [B, P, Hkv] = [", d.B, ", ", d.P, ", ", d.Hkv,
                      "], got ", t->sizes());
  }
  check_int64(lengths, q, "lengths", {d.B});
  TORCH_CHECK_VALUE(retained_k.dim() == 4, "retained_k must be 4-D [B, Hkv, C, D], got shape ",
                    retained_k.sizes());
  d.C = retained_k.size(2);
  check_kv_operand(retained_k, q, "retained_k", "[B, Hkv, C, D]", {d.B, d.Hkv, -1, d.D});
  check_kv_operand(retained_v, q, "retained_v", "[B, Hkv, C, D]", {d.B, d.Hkv, d.C, d.D});
  check_int64(retained_counts, q, "retained_counts", {d.B, d.Hkv});
  TORCH_CHECK_VALUE(tail_k.dim() == 4, "tail_k must be 4-D [B, T, Hkv, D], got shape ",
                    tail_k.sizes());
  d.T = tail_k.size(1);
  check_kv_operand(tail_k, q, "tail_k", "[B, T, Hkv, D]", {d.B, -1, d.Hkv, d.D});
  check_kv_operand(tail_v, q, "tail_v", "[B, T, Hkv, D]", {d.B, d.T, d.Hkv, d.D});
  check_int64(tail_lengths, q, "tail_lengths", {d.B});
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be finite and > 0, got ", scale);
  return d;
}

void check_lengths_values(const Tensor& lengths_cpu, int64_t N, const char* name) {
  const Tensor l = lengths_cpu.to(at::kLong);
  const int64_t* p = l.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < l.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= N, name, "[", i, "] = ", p[i],
                      " is outside [0, N=", N, "]");
  }
}

}  // namespace pyramid_kv

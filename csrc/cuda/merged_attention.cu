#include "kernels/merged_attention.cuh"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

#include <cmath>

namespace pyramid_kv {
namespace {

// Rows of a [B, X, Y, D] tensor whose row index is dim `row` and KV-head index dim `head`.
kernels::KVRows kv_rows(const Tensor& k, const Tensor& v, int head, int row) {
  return {k.const_data_ptr(), v.const_data_ptr(), k.stride(0), k.stride(head), k.stride(row),
          v.stride(0), v.stride(head), v.stride(row)};
}

}  // namespace

Tensor merged_attention_cuda(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v,
                             const Tensor& norm_k, const Tensor& norm_v, const Tensor& lengths,
                             const Tensor& retained_k, const Tensor& retained_v,
                             const Tensor& retained_counts, const Tensor& tail_k,
                             const Tensor& tail_v, const Tensor& tail_lengths, double scale) {
  const MergedAttentionDims d =
      check_merged_attention(q, dir_k, dir_v, norm_k, norm_v, lengths, retained_k, retained_v,
                             retained_counts, tail_k, tail_v, tail_lengths, scale);
  TORCH_CHECK_VALUE(d.D <= kernels::kMergedAttentionMaxD, "q: merged_attention supports head dims "
                    "up to ", kernels::kMergedAttentionMaxD, " on CUDA, got ", d.D);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({d.B, d.Hq, d.D}, q.options());
  if (d.B * d.Hq == 0 || d.D == 0) return out;

  kernels::MergedAttentionParams p{};
  p.q = q.const_data_ptr(), p.q_sb = q.stride(0), p.q_sh = q.stride(1);
  p.prompt = kv_rows(dir_k, dir_v, 2, 1);
  p.retained = kv_rows(retained_k, retained_v, 1, 2);
  p.tail = kv_rows(tail_k, tail_v, 2, 1);
  p.norm_k = norm_k.const_data_ptr<float>();
  p.nk_sb = norm_k.stride(0), p.nk_sh = norm_k.stride(2), p.nk_si = norm_k.stride(1);
  p.norm_v = norm_v.const_data_ptr<float>();
  p.nv_sb = norm_v.stride(0), p.nv_sh = norm_v.stride(2), p.nv_si = norm_v.stride(1);
  p.lengths = lengths.const_data_ptr<int64_t>(), p.lengths_s = lengths.stride(0);
  p.counts = retained_counts.const_data_ptr<int64_t>();
  p.counts_sb = retained_counts.stride(0), p.counts_sh = retained_counts.stride(1);
  p.tail_lengths = tail_lengths.const_data_ptr<int64_t>(), p.tail_lengths_s = tail_lengths.stride(0);
  p.B = d.B, p.Hq = d.Hq, p.Hkv = d.Hkv, p.G = d.Hq / d.Hkv, p.D = d.D;
  p.P = d.P, p.C = d.C, p.T = d.T;
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.out = out.mutable_data_ptr();

  int sms = 0;  // cached per device; the first call runs eagerly before any graph capture
  C10_CUDA_CHECK(kernels::sm_count(q.device().index(), sms));
  const bool vec16 = rows_aligned16(dir_k) && rows_aligned16(dir_v) && rows_aligned16(retained_k) &&
                     rows_aligned16(retained_v) && rows_aligned16(tail_k) && rows_aligned16(tail_v);
  const kernels::MergedAttentionPlan plan =
      kernels::plan_merged_attention(p, static_cast<int>(q.element_size()), vec16, sms);
  TORCH_CHECK_VALUE(d.B * d.Hkv * plan.head_chunks <= INT32_MAX / plan.splits && d.B * d.Hq <= INT32_MAX,
                    "merged_attention: batch too large for one CUDA launch (B = ", d.B, ")");
  p.splits = plan.splits, p.head_chunks = plan.head_chunks;
  // Partials of every split: no host sync, so the op can be captured in a CUDA graph.
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor ws_acc = at::empty({d.B * d.Hq * plan.splits * d.D}, f32);
  Tensor ws_ml = at::empty({d.B * d.Hq * plan.splits * 2}, f32);
  p.ws_acc = ws_acc.mutable_data_ptr<float>(), p.ws_ml = ws_ml.mutable_data_ptr<float>();
  dispatch_float(q.scalar_type(), "merged_attention", [&](auto tag) {
    using T = decltype(tag);
    check_launch(kernels::launch_merged_attention<T>(p, plan, c10::cuda::getCurrentCUDAStream()),
                 "merged_attention");
  });
  return out;
}

}  // namespace pyramid_kv

#include "kernels/ensemble_scores_tc.cuh"
#include "launch.h"

namespace pyramid_kv {
namespace {

// The tensor-core path copies rows with 16-byte cp.async: base and every stride that is used
// (dims of size > 1) must be 16-byte aligned. Its index arithmetic is 32-bit.
bool tc_path_fits(const Tensor& q, const Tensor& k, const EnsembleDims& d) {
  if (q.scalar_type() == at::kFloat || !kernels::ensemble_tc_head_dim(d.D)) return false;
  for (const Tensor* t : {&q, &k}) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    for (int64_t i = 0; i < 3; ++i)
      if (t->size(i) > 1 && t->stride(i) % 8 != 0) return false;
  }
  constexpr int64_t kMax = (int64_t{1} << 31) - 1024;
  return d.Hq / d.Hkv * d.W <= kMax && d.N <= kMax;
}

}  // namespace

Tensor ensemble_scores_cuda(const Tensor& q, const Tensor& k, const Tensor& lengths,
                            const OptTensor& row_weights, const OptTensor& lse, double scale) {
  const EnsembleDims d = check_ensemble_scores(q, k, lengths, row_weights, lse, scale);
  TORCH_CHECK_VALUE(d.D <= 8192, "ensemble_scores: head dim ", d.D, " exceeds the CUDA limit 8192");
  TORCH_CHECK_VALUE(d.B <= 65535 && d.Hkv <= 65535, "ensemble_scores: B and Hkv must be <= 65535");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({d.B, d.Hkv, d.N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (d.W == 0 || d.Hq == 0) return out.zero_();

  kernels::EnsembleParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.lengths = index_array(lengths);
  Tensor lse_ws;
  if (lse) {
    p.lse = lse->const_data_ptr<float>();
    p.lse_sb = lse->stride(0), p.lse_sh = lse->stride(1), p.lse_sw = lse->stride(2);
  } else {
    lse_ws = at::empty({d.B, d.Hq, d.W}, q.options().dtype(at::kFloat));
    p.lse_out = lse_ws.mutable_data_ptr<float>();
  }
  if (row_weights) {
    p.row_weights = row_weights->const_data_ptr<float>();
    p.rw_sb = row_weights->stride(0), p.rw_sw = row_weights->stride(1);
  }
  p.out = out.mutable_data_ptr<float>();
  p.B = d.B, p.Hq = d.Hq, p.Hkv = d.Hkv, p.W = d.W, p.N = d.N, p.D = d.D;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sw = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.scale = static_cast<float>(scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  p.lse_splits = 1;
  const bool tc = tc_path_fits(q, k, d);
  Tensor partial_ws;
  dispatch_float(q.scalar_type(), "ensemble_scores", [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      check_launch(kernels::launch_ensemble_scores_generic<T>(p, stream), "ensemble_scores");
    } else if (!tc) {
      check_launch(kernels::launch_ensemble_scores_generic<T>(p, stream), "ensemble_scores");
    } else {
      if (!lse) {
        check_launch(kernels::ensemble_lse_splits<T>(p, &p.lse_splits), "ensemble_scores");
        if (const int64_t n = kernels::ensemble_lse_partials(p, p.lse_splits); n > 0) {
          partial_ws = at::empty({n, 2}, q.options().dtype(at::kFloat));
          p.lse_partial = reinterpret_cast<float2*>(partial_ws.mutable_data_ptr<float>());
        }
      }
      check_launch(kernels::launch_ensemble_scores_tc<T>(p, stream), "ensemble_scores");
    }
  });
  return out;
}

}  // namespace pyramid_kv

// CPU ensemble scores: the QK^T blocks go through ATen's matmul (BLAS); rows are processed in
// chunks so the [rows x N] probability block stays bounded in memory.
#include <ATen/ATen.h>

#include <limits>

#include "checks.h"

namespace pyramid_kv {

Tensor ensemble_scores_cpu(const Tensor& q, const Tensor& k, const Tensor& lengths,
                           const OptTensor& row_weights, const OptTensor& lse, double scale) {
  const EnsembleDims d = check_ensemble_scores(q, k, lengths, row_weights, lse, scale);
  check_lengths_values(lengths, d.N, "lengths");
  Tensor out = at::zeros({d.B, d.Hkv, d.N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || d.W == 0) return out;

  const int64_t G = d.Hq / d.Hkv;
  const Tensor qf = q.to(at::kFloat).reshape({d.B, d.Hkv, G, d.W, d.D});
  const Tensor kt = k.to(at::kFloat).transpose(-1, -2).unsqueeze(2);  // [B, Hkv, 1, D, N]
  const auto idx = at::TensorOptions().dtype(at::kLong);
  // Row w of sequence b sits at position lengths[b] - W + w and sees keys j <= position.
  const Tensor pos = lengths.to(at::kLong).unsqueeze(1) - d.W + at::arange(d.W, idx);  // [B, W]
  const Tensor keys = at::arange(d.N, idx);
  const Tensor weights =
      row_weights ? row_weights->reshape({d.B, 1, 1, d.W, 1})
                  : at::ones({d.B, 1, 1, d.W, 1}, q.options().dtype(at::kFloat));
  const Tensor lse_g = lse ? lse->reshape({d.B, d.Hkv, G, d.W}) : Tensor();

  // Bound the probability block to ~64 MiB of float32.
  const int64_t per_row = std::max<int64_t>(1, d.B * d.Hkv * G * d.N);
  const int64_t chunk = std::clamp<int64_t>((int64_t{16} << 20) / per_row, 1, d.W);
  for (int64_t w0 = 0; w0 < d.W; w0 += chunk) {
    const int64_t w1 = std::min(d.W, w0 + chunk);
    Tensor s = at::matmul(qf.slice(3, w0, w1), kt).mul_(scale);  // [B, Hkv, G, w, N]
    const Tensor hidden = (keys.view({1, 1, d.N}) > pos.slice(1, w0, w1).unsqueeze(2))
                              .view({d.B, 1, 1, w1 - w0, d.N});
    s.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
    const Tensor l = lse ? lse_g.slice(3, w0, w1) : at::logsumexp(s, -1);
    Tensor p = s.sub_(l.unsqueeze(-1)).exp_().masked_fill_(hidden, 0.0);
    p.mul_(weights.slice(3, w0, w1));
    out.add_(p.sum({2, 3}));
  }
  return out;
}

}  // namespace pyramid_kv

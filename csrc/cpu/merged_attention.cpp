// CPU merged_attention: one (sequence, KV head) per iteration of at::parallel_for; every query
// head of the group runs an online softmax (float32) over the keys in the order of the CUDA
// kernel: prompt rows (skipping negative key norms), retained rows, tail rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace pyramid_kv {
namespace {

template <typename T>
void attend(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v, const Tensor& norm_k,
            const Tensor& norm_v, const Tensor& lengths, const Tensor& retained_k,
            const Tensor& retained_v, const Tensor& retained_counts, const Tensor& tail_k,
            const Tensor& tail_v, const Tensor& tail_lengths, float scale,
            const MergedAttentionDims& d, const Tensor& out) {
  const int64_t G = d.Hq / d.Hkv, D = d.D;
  const T* pq = q.const_data_ptr<T>();
  const float* pnk = norm_k.const_data_ptr<float>();
  const float* pnv = norm_v.const_data_ptr<float>();
  const int64_t* plen = lengths.const_data_ptr<int64_t>();
  const int64_t* pcnt = retained_counts.const_data_ptr<int64_t>();
  const int64_t* ptl = tail_lengths.const_data_ptr<int64_t>();
  T* po = out.mutable_data_ptr<T>();
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), m(G), l(G);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.Hkv, h = bh % d.Hkv;
      for (int64_t j = 0; j < G; ++j) {
        const T* row = pq + b * q.stride(0) + (h * G + j) * q.stride(1);
        for (int64_t i = 0; i < D; ++i) qf[j * D + i] = static_cast<float>(row[i]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      // One key: logit nk * (q . k_row), value nv * v_row (float32 products).
      auto visit = [&](const T* kr, const T* vr, float nk, float nv) {
        for (int64_t j = 0; j < G; ++j) {
          float dot = 0.0f;
          const float* qj = qf.data() + j * D;
          for (int64_t i = 0; i < D; ++i) dot += qj[i] * static_cast<float>(kr[i]);
          const float s = nk * dot;
          float* aj = acc.data() + j * D;
          if (s > m[j]) {
            const float alpha = std::exp(m[j] - s);  // 0 when m was -inf
            l[j] *= alpha;
            for (int64_t i = 0; i < D; ++i) aj[i] *= alpha;
            m[j] = s;
          }
          const float p = std::exp(s - m[j]);
          l[j] += p;
          const float w = p * nv;
          for (int64_t i = 0; i < D; ++i) aj[i] += w * static_cast<float>(vr[i]);
        }
      };
      const int64_t len = std::clamp<int64_t>(plen[b * lengths.stride(0)], 0, d.P);
      for (int64_t t = 0; t < len; ++t) {
        const float nk = pnk[b * norm_k.stride(0) + t * norm_k.stride(1) + h * norm_k.stride(2)];
        if (!(nk >= 0.0f)) continue;  // a retained token: its original row comes below
        const float nv = pnv[b * norm_v.stride(0) + t * norm_v.stride(1) + h * norm_v.stride(2)];
        visit(dir_k.const_data_ptr<T>() + b * dir_k.stride(0) + t * dir_k.stride(1) + h * dir_k.stride(2),
              dir_v.const_data_ptr<T>() + b * dir_v.stride(0) + t * dir_v.stride(1) + h * dir_v.stride(2),
              nk, nv);
      }
      const int64_t cnt = std::clamp<int64_t>(
          pcnt[b * retained_counts.stride(0) + h * retained_counts.stride(1)], 0, d.C);
      for (int64_t c = 0; c < cnt; ++c) {
        visit(retained_k.const_data_ptr<T>() + b * retained_k.stride(0) + h * retained_k.stride(1) +
                  c * retained_k.stride(2),
              retained_v.const_data_ptr<T>() + b * retained_v.stride(0) + h * retained_v.stride(1) +
                  c * retained_v.stride(2),
              1.0f, 1.0f);
      }
      const int64_t tl = std::clamp<int64_t>(ptl[b * tail_lengths.stride(0)], 0, d.T);
      for (int64_t u = 0; u < tl; ++u) {
        visit(tail_k.const_data_ptr<T>() + b * tail_k.stride(0) + u * tail_k.stride(1) + h * tail_k.stride(2),
              tail_v.const_data_ptr<T>() + b * tail_v.stride(0) + u * tail_v.stride(1) + h * tail_v.stride(2),
              1.0f, 1.0f);
      }
      for (int64_t j = 0; j < G; ++j) {
        const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;  // no keys: zeros
        T* o = po + (b * d.Hq + h * G + j) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[j * D + i] * inv);
      }
    }
  });
}

}  // namespace

Tensor merged_attention_cpu(const Tensor& q, const Tensor& dir_k, const Tensor& dir_v,
                            const Tensor& norm_k, const Tensor& norm_v, const Tensor& lengths,
                            const Tensor& retained_k, const Tensor& retained_v,
                            const Tensor& retained_counts, const Tensor& tail_k,
                            const Tensor& tail_v, const Tensor& tail_lengths, double scale) {
  const MergedAttentionDims d =
      check_merged_attention(q, dir_k, dir_v, norm_k, norm_v, lengths, retained_k, retained_v,
                             retained_counts, tail_k, tail_v, tail_lengths, scale);
  Tensor out = at::empty({d.B, d.Hq, d.D}, q.options());
  if (d.B * d.Hq == 0 || d.D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "merged_attention", [&] {
    attend<scalar_t>(q, dir_k, dir_v, norm_k, norm_v, lengths, retained_k, retained_v,
                     retained_counts, tail_k, tail_v, tail_lengths, static_cast<float>(scale), d, out);
  });
  return out;
}

}  // namespace pyramid_kv

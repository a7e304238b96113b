// CPU slerp_merge / slerp_restore: one vector ([D] row) per iteration of at::parallel_for, with
// the float32 math of kernels/slerp_math.h (the same code the CUDA kernels run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "kernels/slerp_math.h"

namespace pyramid_kv {
namespace {

constexpr int64_t kGrain = 256;  // vectors per task

// Element offset of vector v = (b * X + x) * Y + y of a 4-D tensor (or 3-D norm tensor).
int64_t offset(const Tensor& t, int64_t v, int64_t X, int64_t Y) {
  const int64_t y = v % Y, bx = v / Y;
  return (bx / X) * t.stride(0) + (bx % X) * t.stride(1) + y * t.stride(2);
}

template <typename T>
void merge_rows(const Tensor& a, const Tensor& b, float t, float eps, const MergeDims& d,
                const Tensor& direction, const Tensor& norm_a, const Tensor& norm_b,
                const Tensor& distance) {
  const T* pa = a.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  T* pd = direction.mutable_data_ptr<T>();
  float* na = norm_a.mutable_data_ptr<float>();
  float* nb = norm_b.mutable_data_ptr<float>();
  float* dist = distance.mutable_data_ptr<float>();
  const int64_t V = d.B * d.X * d.Y, D = d.D;
  at::parallel_for(0, V, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const T* ra = pa + offset(a, v, d.X, d.Y);
      const T* rb = pb + offset(b, v, d.X, d.Y);
      float saa = 0.0f, sbb = 0.0f;
      for (int64_t i = 0; i < D; ++i) {
        const float x = static_cast<float>(ra[i]), y = static_cast<float>(rb[i]);
        saa = std::fma(x, x, saa), sbb = std::fma(y, y, sbb);
      }
      const kernels::SlerpBasis basis = kernels::slerp_basis(saa, sbb);
      kernels::SlerpSums sums;
      for (int64_t i = 0; i < D; ++i) {
        sums.add(basis, t, static_cast<float>(ra[i]), static_cast<float>(rb[i]));
      }
      const kernels::SlerpResult r = kernels::slerp_result(basis, sums, t, eps);
      T* out = pd + v * D;
      for (int64_t i = 0; i < D; ++i) {
        out[i] = static_cast<T>(std::fma(r.ca, static_cast<float>(ra[i]),
                                         r.cb * static_cast<float>(rb[i])));
      }
      na[v] = std::sqrt(saa), nb[v] = std::sqrt(sbb), dist[v] = r.distance;
    }
  });
}

template <typename T>
void restore_rows(const Tensor& direction, const Tensor& norm, const MergeDims& d,
                  const Tensor& out) {
  const T* pd = direction.const_data_ptr<T>();
  const float* pn = norm.const_data_ptr<float>();
  T* po = out.mutable_data_ptr<T>();
  at::parallel_for(0, d.B * d.X * d.Y, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const float n = pn[offset(norm, v, d.X, d.Y)];
      const T* src = pd + offset(direction, v, d.X, d.Y);
      T* dst = po + offset(out, v, d.X, d.Y);
      for (int64_t i = 0; i < d.D; ++i) dst[i] = static_cast<T>(n * static_cast<float>(src[i]));
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> slerp_merge_cpu(const Tensor& a, const Tensor& b,
                                                           double t, double eps) {
  const MergeDims d = check_slerp_merge(a, b, t, eps);
  Tensor direction = at::empty({d.B, d.X, d.Y, d.D}, a.options());
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor norm_a = at::empty({d.B, d.X, d.Y}, f32);
  Tensor norm_b = at::empty({d.B, d.X, d.Y}, f32);
  Tensor distance = at::empty({d.B, d.X, d.Y}, f32);
  if (d.B * d.X * d.Y > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "slerp_merge", [&] {
      merge_rows<scalar_t>(a, b, static_cast<float>(t), static_cast<float>(eps), d, direction,
                           norm_a, norm_b, distance);
    });
  }
  return {direction, norm_a, norm_b, distance};
}

void slerp_restore_out_cpu(const Tensor& direction, const Tensor& norm, const Tensor& out) {
  const MergeDims d = check_slerp_restore(direction, norm);
  check_slerp_restore_out(direction, out);
  if (d.B * d.X * d.Y == 0 || d.D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, direction.scalar_type(),
                                  "slerp_restore", [&] {
                                    restore_rows<scalar_t>(direction, norm, d, out);
                                  });
}

Tensor slerp_restore_cpu(const Tensor& direction, const Tensor& norm) {
  const MergeDims d = check_slerp_restore(direction, norm);
  Tensor out = at::empty({d.B, d.X, d.Y, d.D}, direction.options());
  slerp_restore_out_cpu(direction, norm, out);
  return out;
}

}  // namespace pyramid_kv

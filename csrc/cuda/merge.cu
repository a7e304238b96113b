#include "kernels/merge.cuh"
#include "launch.h"

namespace pyramid_kv {
namespace {

kernels::Strides3 strides3(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> slerp_merge_cuda(const Tensor& a, const Tensor& b,
                                                            double t, double eps) {
  const MergeDims d = check_slerp_merge(a, b, t, eps);
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor direction = at::empty({d.B, d.X, d.Y, d.D}, a.options());
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor norm_a = at::empty({d.B, d.X, d.Y}, f32);
  Tensor norm_b = at::empty({d.B, d.X, d.Y}, f32);
  Tensor distance = at::empty({d.B, d.X, d.Y}, f32);
  kernels::SlerpMergeParams p{};
  p.a = a.const_data_ptr(), p.b = b.const_data_ptr();
  p.sa = strides3(a), p.sb = strides3(b);
  p.direction = direction.mutable_data_ptr();
  p.norm_a = norm_a.mutable_data_ptr<float>();
  p.norm_b = norm_b.mutable_data_ptr<float>();
  p.distance = distance.mutable_data_ptr<float>();
  p.X = d.X, p.Y = d.Y, p.V = d.B * d.X * d.Y, p.D = d.D;
  p.t = static_cast<float>(t), p.eps = static_cast<float>(eps);
  const bool vec16 = rows_aligned16(a) && rows_aligned16(b) && rows_aligned16(direction);
  dispatch_float(a.scalar_type(), "slerp_merge", [&](auto tag) {
    using T = decltype(tag);
    check_launch(kernels::launch_slerp_merge<T>(p, vec16, c10::cuda::getCurrentCUDAStream()),
                 "slerp_merge");
  });
  return {direction, norm_a, norm_b, distance};
}

void slerp_restore_out_cuda(const Tensor& direction, const Tensor& norm, const Tensor& out) {
  const MergeDims d = check_slerp_restore(direction, norm);
  check_slerp_restore_out(direction, out);
  const c10::cuda::CUDAGuard guard(direction.device());
  kernels::SlerpRestoreParams p{};
  p.direction = direction.const_data_ptr(), p.sd = strides3(direction);
  p.norm = norm.const_data_ptr<float>(), p.sn = strides3(norm);
  p.out = out.mutable_data_ptr(), p.so = strides3(out);
  p.X = d.X, p.Y = d.Y, p.V = d.B * d.X * d.Y, p.D = d.D;
  const bool vec16 = rows_aligned16(direction) && rows_aligned16(out);
  dispatch_float(direction.scalar_type(), "slerp_restore", [&](auto tag) {
    using T = decltype(tag);
    check_launch(kernels::launch_slerp_restore<T>(p, vec16, c10::cuda::getCurrentCUDAStream()),
                 "slerp_restore");
  });
}

Tensor slerp_restore_cuda(const Tensor& direction, const Tensor& norm) {
  const MergeDims d = check_slerp_restore(direction, norm);
  Tensor out = at::empty({d.B, d.X, d.Y, d.D}, direction.options());
  slerp_restore_out_cuda(direction, norm, out);
  return out;
}

}  // namespace pyramid_kv

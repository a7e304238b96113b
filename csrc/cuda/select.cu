#include "kernels/select.cuh"
#include "launch.h"

namespace pyramid_kv {
namespace {

std::tuple<Tensor, Tensor> select_cuda(const Tensor& scores, const Tensor& lengths,
                                       const OptTensor& per_segment, bool by_mass, double top_p,
                                       int64_t top_k, int64_t sink, int64_t recent,
                                       int64_t min_keep, int64_t capacity) {
  const SelectDims d = check_select(scores, lengths, per_segment, by_mass, sink, recent, min_keep,
                                    capacity);
  // Positions and grid indices are 32-bit in the kernel (with a margin for its tiles).
  TORCH_CHECK_VALUE(d.N <= INT32_MAX - 65536, "select: at most 2^31 - 65537 positions per segment "
                    "on CUDA, got ", d.N);
  const int64_t ctas = kernels::select_ctas_per_segment(d.N, scores.element_size());
  TORCH_CHECK_VALUE(d.S <= INT32_MAX / ctas, "select: at most ", INT32_MAX / ctas,
                    " segments of this length on CUDA, got ", d.S);
  const c10::cuda::CUDAGuard guard(scores.device());
  Tensor indices = at::empty({d.S, capacity}, scores.options().dtype(at::kInt));
  Tensor counts = at::empty({d.S}, scores.options().dtype(at::kInt));
  if (d.S == 0) return {indices, counts};

  kernels::SelectParams p{};
  p.scores = scores.const_data_ptr();
  p.row_stride = scores.stride(0);
  p.lengths = index_array(lengths);
  p.by_mass = by_mass;
  if (per_segment && by_mass) p.top_p = per_segment->const_data_ptr<float>();
  if (per_segment && !by_mass) p.top_k = index_array(*per_segment);
  p.top_p_default = top_p;
  p.top_k_default = top_k;
  p.S = d.S, p.N = d.N, p.sink = sink, p.recent = recent, p.min_keep = min_keep;
  p.capacity = capacity;
  p.indices = indices.mutable_data_ptr<int32_t>();
  p.counts = counts.mutable_data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(scores.scalar_type(), "select", [&](auto t) {
    check_launch(kernels::launch_select<decltype(t)>(p, stream), "select");
  });
  return {indices, counts};
}

}  // namespace

std::tuple<Tensor, Tensor> select_top_p_cuda(const Tensor& scores, const Tensor& lengths,
                                             const OptTensor& maybe_top_p, double top_p,
                                             int64_t sink, int64_t recent, int64_t min_keep,
                                             int64_t capacity) {
  if (!maybe_top_p) check_top_p(top_p);
  return select_cuda(scores, lengths, maybe_top_p, true, top_p, 0, sink, recent, min_keep, capacity);
}

std::tuple<Tensor, Tensor> select_top_k_cuda(const Tensor& scores, const Tensor& lengths,
                                             const OptTensor& maybe_top_k, int64_t top_k,
                                             int64_t sink, int64_t recent, int64_t min_keep,
                                             int64_t capacity) {
  if (!maybe_top_k) check_top_k(top_k);
  return select_cuda(scores, lengths, maybe_top_k, false, 1.0, top_k, sink, recent, min_keep,
                     capacity);
}

}  // namespace pyramid_kv

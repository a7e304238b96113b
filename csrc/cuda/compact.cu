#include "kernels/compact.cuh"
#include "launch.h"

namespace pyramid_kv {
namespace {

// The widest access width that divides the row size and every row's byte address.
int vector_width(const Tensor& s, const Tensor& o) {
  const int64_t es = s.element_size();
  auto ok = [&](int64_t v) {
    auto aligned = [&](const Tensor& t) {
      return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % v == 0 &&
             (t.stride(0) * es) % v == 0 && (t.stride(1) * es) % v == 0 && (t.stride(2) * es) % v == 0;
    };
    return (s.size(3) * es) % v == 0 && aligned(s) && aligned(o);
  };
  for (int v : {16, 8, 4, 2}) {
    if (ok(v)) return v;
  }
  return 1;
}

void compact_launch(at::TensorList src, const Tensor& indices, const Tensor& counts,
                    const CompactDims& d, at::TensorList out, bool zero_tail) {
  TORCH_CHECK_VALUE(src.size() <= kernels::kMaxCompactTensors, "compact: at most ",
                    kernels::kMaxCompactTensors, " tensors per call, got ", src.size());
  const c10::cuda::CUDAGuard guard(src[0].device());
  kernels::CompactParams p{};
  int64_t h_max = 0, rows = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    const Tensor& s = src[i];
    const Tensor& o = out[i];
    const int64_t es = s.element_size();
    p.t[i] = kernels::CompactTensor{
        static_cast<const char*>(s.const_data_ptr()), static_cast<char*>(o.mutable_data_ptr()),
        s.size(1), s.size(3) * es,
        s.stride(0) * es, s.stride(1) * es, s.stride(2) * es,
        o.stride(0) * es, o.stride(1) * es, o.stride(2) * es, o.size(2), vector_width(s, o)};
    h_max = std::max(h_max, s.size(1));
    rows = std::max(rows, zero_tail ? o.size(2) : d.C);
  }
  p.num_tensors = static_cast<int>(src.size());
  p.indices = index_array(indices);
  p.idx_sb = indices.stride(0);
  p.idx_sh = d.heads ? indices.stride(1) : 0;
  p.counts = index_array(counts);
  p.cnt_sb = counts.stride(0);
  p.cnt_sh = d.heads ? counts.stride(1) : 0;
  p.B = d.B, p.N = d.N, p.C = d.C, p.heads = d.heads;
  p.zero_tail = zero_tail;
  if (d.B * h_max == 0 || rows == 0 || (d.N == 0 && !zero_tail)) return;
  if (d.N == 0) p.C = 0;  // nothing to gather: counts read as zero
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(kernels::launch_compact_generic(p, h_max, rows, stream), "compact");
}

}  // namespace

void compact_out_cuda(at::TensorList src, const Tensor& indices, const Tensor& counts,
                      at::TensorList out) {
  const CompactDims d = check_compact(src, indices, counts);
  check_compact_out(src, d, out);
  compact_launch(src, indices, counts, d, out, false);
}

std::vector<Tensor> compact_cuda(at::TensorList src, const Tensor& indices, const Tensor& counts) {
  const CompactDims d = check_compact(src, indices, counts);
  std::vector<Tensor> out;
  out.reserve(src.size());
  for (const Tensor& s : src) {
    out.push_back(at::empty({s.size(0), s.size(1), d.C, s.size(3)}, s.options()));
  }
  compact_launch(src, indices, counts, d, out, true);
  return out;
}

}  // namespace pyramid_kv

#include <ATen/ops/empty.h>

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

// Parameters of one launch over src -> out (out == src in place), tiles covering `rows`
// destination rows per segment.
kernels::CompactParams make_params(at::TensorList src, const Tensor& indices, const Tensor& counts,
                                   const CompactDims& d, at::TensorList out, int64_t rows, bool in_place) {
  TORCH_CHECK_VALUE(src.size() <= kernels::kMaxCompactTensors, "compact: at most ",
                    kernels::kMaxCompactTensors, " tensors per call, got ", src.size());
  kernels::CompactParams p{};
  int64_t row_bytes[kernels::kMaxCompactTensors] = {};
  for (size_t i = 0; i < src.size(); ++i) {
    const Tensor& s = src[i];
    const Tensor& o = out[i];
    const int64_t es = s.element_size();
    kernels::CompactTensor& t = p.t[i];
    t.src = static_cast<const char*>(s.const_data_ptr());
    t.out = static_cast<char*>(o.mutable_data_ptr());
    t.H = s.size(1);
    t.s_sb = s.stride(0) * es, t.s_sh = s.stride(1) * es, t.s_sn = s.stride(2) * es;
    t.o_sb = o.stride(0) * es, t.o_sh = o.stride(1) * es, t.o_sn = o.stride(2) * es;
    t.rows = rows;
    t.vec = vector_width(s, o);
    row_bytes[i] = s.size(3) * es;
  }
  p.num_tensors = static_cast<int>(src.size());
  p.per_head = d.heads > 0;
  p.indices = index_array(indices);
  p.idx_sb = indices.stride(0);
  p.idx_sh = p.per_head ? indices.stride(1) : 0;
  p.counts = index_array(counts);
  p.cnt_sb = counts.stride(0);
  p.cnt_sh = p.per_head ? counts.stride(1) : 0;
  p.B = d.B;
  p.idx_H = p.per_head ? d.heads : 1;
  p.N = d.N;
  p.max_count = d.N > 0 ? d.C : 0;  // nothing to gather from an empty source
  kernels::plan_compact_tiles(p, row_bytes, in_place);
  return p;
}

void compact_launch(at::TensorList src, const Tensor& indices, const Tensor& counts,
                    const CompactDims& d, at::TensorList out, bool zero_tail) {
  const c10::cuda::CUDAGuard guard(src[0].device());
  kernels::CompactParams p = make_params(src, indices, counts, d, out, d.C, false);
  p.zero_tail = zero_tail;
  check_launch(kernels::launch_compact(p, c10::cuda::getCurrentCUDAStream()), "compact");
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

void compact_inplace_cuda(at::TensorList src, const Tensor& indices, const Tensor& counts) {
  const CompactDims d = check_compact(src, indices, counts);
  check_compact_inplace(src);
  const c10::cuda::CUDAGuard guard(src[0].device());
  // Destination rows lie below min(C, N): a count above N cannot be valid, and is clamped.
  const int64_t rows = std::min(d.C, d.N);
  kernels::CompactParams p = make_params(src, indices, counts, d, src, rows, true);
  p.max_count = rows;
  if (p.total_tiles == 0) return;
  TORCH_CHECK_VALUE(p.total_tiles < (int64_t{1} << 31), "compact_: too many tiles (",
                    p.total_tiles, ") for one call");
  kernels::plan_compact_inplace(p);
  // Ticket, flags and per-segment moves: initialised by the launch's pre-pass (no memset, no
  // host synchronisation).
  const Tensor workspace = at::empty({kernels::compact_inplace_workspace_words(p)},
                                     src[0].options().dtype(at::kLong));
  check_launch(kernels::launch_compact_inplace(p, workspace.mutable_data_ptr<int64_t>(),
                                               c10::cuda::getCurrentCUDAStream()),
               "compact_");
}

}  // namespace pyramid_kv

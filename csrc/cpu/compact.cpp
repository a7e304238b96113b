// CPU compaction: validate every index and count first (so a bad one raises before anything is
// written), then copy whole rows with memcpy, one (tensor, batch, head) run per task. The
// functional variant zero-fills the rows past each count so its output is deterministic. In
// place, a sequential ascending pass per (tensor, batch, head) is safe: with strictly
// ascending indices, row i's source indices[i] >= i has not been overwritten yet.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"

namespace pyramid_kv {
namespace {

void check_index_values(const Tensor& idx, const Tensor& cnt, const CompactDims& d) {
  const int64_t rows = cnt.numel();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = cnt.const_data_ptr<int64_t>()[r];
    TORCH_CHECK_VALUE(c >= 0 && c <= d.C, "counts[", r, "] = ", c, " is outside [0, C=", d.C, "]");
    const int64_t* row = idx.const_data_ptr<int64_t>() + r * d.C;
    for (int64_t i = 0; i < c; ++i) {
      TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < d.N, "indices row ", r, " entry ", i, " = ",
                        row[i], " is outside [0, N=", d.N, ")");
    }
  }
}

void check_ascending(const Tensor& idx, const Tensor& cnt, const CompactDims& d) {
  for (int64_t r = 0; r < cnt.numel(); ++r) {
    const int64_t c = cnt.const_data_ptr<int64_t>()[r];
    const int64_t* row = idx.const_data_ptr<int64_t>() + r * d.C;
    for (int64_t i = 1; i < c; ++i) {
      TORCH_CHECK_VALUE(row[i] > row[i - 1], "indices row ", r,
                        " must be strictly ascending for in-place compaction: entry ", i, " = ",
                        row[i], " follows ", row[i - 1]);
    }
  }
}

void copy_rows(at::TensorList src, const Tensor& idx, const Tensor& cnt, const CompactDims& d,
               at::TensorList out, bool zero_tail) {
  for (size_t t = 0; t < src.size(); ++t) {
    const Tensor& s = src[t];
    const Tensor& o = out[t];
    const int64_t H = s.size(1);
    const int64_t es = s.element_size();
    const int64_t row_bytes = s.size(3) * es;
    const char* sp = static_cast<const char*>(s.const_data_ptr());
    char* op = static_cast<char*>(o.mutable_data_ptr());
    at::parallel_for(0, d.B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t r = d.heads ? bh : b;  // row of indices / counts
        const int64_t c = cnt.const_data_ptr<int64_t>()[r];
        const int64_t* rows = idx.const_data_ptr<int64_t>() + r * d.C;
        const char* sbase = sp + (b * s.stride(0) + h * s.stride(1)) * es;
        char* obase = op + (b * o.stride(0) + h * o.stride(1)) * es;
        for (int64_t i = 0; i < c; ++i) {
          char* dst = obase + i * o.stride(2) * es;
          const char* from = sbase + rows[i] * s.stride(2) * es;
          if (dst != from) std::memmove(dst, from, row_bytes);  // in place: rows[i] >= i
        }
        for (int64_t i = c; zero_tail && i < o.size(2); ++i) {
          std::memset(obase + i * o.stride(2) * es, 0, row_bytes);
        }
      }
    });
  }
}

Tensor as_long(const Tensor& t) { return t.to(at::kLong).contiguous(); }

void compact_into(at::TensorList src, const Tensor& indices, const Tensor& counts,
                  const CompactDims& d, at::TensorList out, bool zero_tail) {
  check_compact_out(src, d, out);
  const Tensor idx = as_long(indices), cnt = as_long(counts);
  check_index_values(idx, cnt, d);
  copy_rows(src, idx, cnt, d, out, zero_tail);
}

}  // namespace

void compact_out_cpu(at::TensorList src, const Tensor& indices, const Tensor& counts,
                     at::TensorList out) {
  compact_into(src, indices, counts, check_compact(src, indices, counts), out, false);
}

std::vector<Tensor> compact_cpu(at::TensorList src, const Tensor& indices, const Tensor& counts) {
  const CompactDims d = check_compact(src, indices, counts);
  std::vector<Tensor> out;
  out.reserve(src.size());
  for (const Tensor& s : src) {
    out.push_back(at::empty({s.size(0), s.size(1), d.C, s.size(3)}, s.options()));
  }
  compact_into(src, indices, counts, d, out, true);
  return out;
}

void compact_inplace_cpu(at::TensorList src, const Tensor& indices, const Tensor& counts) {
  const CompactDims d = check_compact(src, indices, counts);
  check_compact_inplace(src);
  const Tensor idx = as_long(indices), cnt = as_long(counts);
  check_index_values(idx, cnt, d);
  check_ascending(idx, cnt, d);
  copy_rows(src, idx, cnt, d, src, false);
}

}  // namespace pyramid_kv

// Compaction (gather of kept token rows), generic CUDA path: several tensors in one launch,
// one warp per output row, the widest access (16/8/4/2/1 bytes) that every row's address
// and size allow. Offsets are 64-bit throughout.
#pragma once

#include "common.cuh"

namespace pyramid_kv::kernels {

constexpr int kMaxCompactTensors = 8;

struct CompactTensor {
  const char* src;  // [B, H, N, row_bytes]
  char* out;        // [B, H, C_out, row_bytes]
  int64_t H, row_bytes;
  int64_t s_sb, s_sh, s_sn;  // byte strides
  int64_t o_sb, o_sh, o_sn, out_rows;
  int vec;  // access width in bytes
};

struct CompactParams {
  CompactTensor t[kMaxCompactTensors];
  int num_tensors;
  IndexArray indices;  // [B, C] or [B, heads, C], last dim contiguous
  int64_t idx_sb, idx_sh;  // element strides (idx_sh unused for per-sequence indices)
  IndexArray counts;       // [B] or [B, heads]
  int64_t cnt_sb, cnt_sh;
  int64_t B, N, C, heads;  // heads = 0: per-sequence indices
  bool zero_tail;          // write zeros to rows [count, out_rows)
};

template <int kVec>
__device__ __forceinline__ void copy_row(char* dst, const char* src, int64_t bytes, int lane) {
  using V = typename Bytes<kVec>::type;
  for (int64_t o = (int64_t)lane * kVec; o < bytes; o += 32 * kVec) {
    *reinterpret_cast<V*>(dst + o) = src ? *reinterpret_cast<const V*>(src + o) : V{};
  }
}

__device__ __forceinline__ void copy_row_any(char* dst, const char* src, int64_t bytes, int vec,
                                             int lane) {
  switch (vec) {
    case 16: copy_row<16>(dst, src, bytes, lane); break;
    case 8: copy_row<8>(dst, src, bytes, lane); break;
    case 4: copy_row<4>(dst, src, bytes, lane); break;
    case 2: copy_row<2>(dst, src, bytes, lane); break;
    default: copy_row<1>(dst, src, bytes, lane); break;
  }
}

// Grid: (B * h_max, row blocks, tensors); each warp copies output rows i = warp, warp + warps...
__global__ void compact_generic(CompactParams p, int64_t h_max) {
  const CompactTensor& t = p.t[blockIdx.z];
  const int64_t b = blockIdx.x / h_max, h = blockIdx.x % h_max;
  if (h >= t.H) return;
  const int64_t idx_off = b * p.idx_sb + (p.heads ? h * p.idx_sh : 0);
  const int64_t cnt = clamp64(p.counts[b * p.cnt_sb + (p.heads ? h * p.cnt_sh : 0)], 0, p.C);
  const int64_t rows = p.zero_tail ? t.out_rows : cnt;
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t)gridDim.y * (blockDim.x / 32);
  const char* sbase = t.src + b * t.s_sb + h * t.s_sh;
  char* obase = t.out + b * t.o_sb + h * t.o_sh;
  for (int64_t i = (int64_t)blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32; i < rows; i += warps) {
    const char* from = nullptr;  // null: zero fill
    if (i < cnt) from = sbase + clamp64(p.indices[idx_off + i], 0, p.N - 1) * t.s_sn;
    copy_row_any(obase + i * t.o_sn, from, t.row_bytes, t.vec, lane);
  }
}

// rows: the most output rows any tensor may write (C, or out_rows when zero-filling).
inline cudaError_t launch_compact_generic(const CompactParams& p, int64_t h_max, int64_t rows,
                                          cudaStream_t stream) {
  const int threads = 256;
  const unsigned row_blocks = ceil_div(rows > 0 ? rows : 1, threads / 32);
  const dim3 grid(static_cast<unsigned>(p.B * h_max), row_blocks < 1024 ? row_blocks : 1024,
                  static_cast<unsigned>(p.num_tensors));
  compact_generic<<<grid, threads, 0, stream>>>(p, h_max);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

// Segmented top-p / top-k selection, one thread block per segment: bisection on the 32-bit
// order keys (each round one block reduction) finds the cut-off, then an ordered block scan
// writes the kept positions ascending. Sort-free and correct for any length.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace pyramid_kv::kernels {

struct SelectParams {
  const void* scores;  // [S, N], row stride `row_stride` elements
  int64_t row_stride;
  IndexArray lengths;
  const float* top_p;  // [S] or null
  IndexArray top_k;    // [S] or {null}
  double top_p_default;
  int64_t top_k_default;
  bool by_mass;
  int64_t S, N, sink, recent, min_keep, capacity;
  int32_t* indices;  // [S, capacity]
  int32_t* counts;   // [S]
};

template <int kThreads>
struct SelectBlock {
  using ReduceD = cub::BlockReduce<double, kThreads>;
  using ReduceL = cub::BlockReduce<long long, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  union Storage {
    typename ReduceD::TempStorage rd;
    typename ReduceL::TempStorage rl;
    typename Scan::TempStorage scan;
  };
};

// Keys of candidates only; everything else reads as "absent".
template <typename T>
struct Segment {
  const T* row;
  int64_t n_sink, recent_start;
  __device__ __forceinline__ uint32_t key(int64_t i) const { return order_key(to_float(row[i])); }
};

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) select_generic(SelectParams p) {
  using Block = SelectBlock<kThreads>;
  __shared__ typename Block::Storage storage;
  __shared__ double s_double;
  __shared__ long long s_long;

  const int64_t s = blockIdx.x;
  const int64_t len = clamp64(p.lengths[s], 0, p.N);
  Segment<T> seg{static_cast<const T*>(p.scores) + s * p.row_stride, 0, 0};
  seg.n_sink = p.sink < len ? p.sink : len;
  seg.recent_start = len - p.recent > seg.n_sink ? len - p.recent : seg.n_sink;
  const int64_t forced = seg.n_sink + (len - seg.recent_start);
  const int64_t n_cand = seg.recent_start - seg.n_sink;

  // Block-wide sums over the candidates of f(key).
  auto sum_mass = [&](auto pred) -> double {
    double acc = 0.0;
    for (int64_t i = seg.n_sink + threadIdx.x; i < seg.recent_start; i += kThreads) {
      const uint32_t key = seg.key(i);
      if (pred(key)) acc += key_mass(key);
    }
    const double total = typename Block::ReduceD(storage.rd).Sum(acc);
    if (threadIdx.x == 0) s_double = total;
    __syncthreads();
    const double r = s_double;
    __syncthreads();
    return r;
  };
  auto count = [&](auto pred) -> long long {
    long long acc = 0;
    for (int64_t i = seg.n_sink + threadIdx.x; i < seg.recent_start; i += kThreads) {
      acc += pred(seg.key(i)) ? 1 : 0;
    }
    const long long total = typename Block::ReduceL(storage.rl).Sum(acc);
    if (threadIdx.x == 0) s_long = total;
    __syncthreads();
    const long long r = s_long;
    __syncthreads();
    return r;
  };
  // Largest key t with f(t) >= target, f non-increasing in t (a 32-round bisection on bits).
  auto largest_key = [&](auto reaches) -> uint32_t {
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t trial = t | (1u << bit);
      if (reaches(trial)) t = trial;
    }
    return t;
  };

  // r: candidates the budget asks for.
  int64_t r;
  if (p.by_mass) {
    const double top_p = p.top_p ? fmin(fmax((double)p.top_p[s], 0.0), 1.0) : p.top_p_default;
    const double target = top_p * sum_mass([](uint32_t) { return true; });
    r = 0;
    if (target > 0.0) {
      const uint32_t t = largest_key([&](uint32_t x) {
        return sum_mass([x](uint32_t key) { return key >= x; }) >= target;
      });
      const double mass_gt = sum_mass([t](uint32_t key) { return key > t; });
      const long long cnt_gt = count([t](uint32_t key) { return key > t; });
      const long long cnt_eq = count([t](uint32_t key) { return key == t; });
      const double m = key_mass(t);
      long long e = m > 0.0 ? (long long)ceil((target - mass_gt) / m) : 1;
      e = e < 1 ? 1 : (e > cnt_eq ? cnt_eq : e);
      while (e > 1 && mass_gt + (double)(e - 1) * m >= target) --e;
      while (e < cnt_eq && mass_gt + (double)e * m < target) ++e;
      r = cnt_gt + e;
    }
  } else {
    const int64_t k = p.top_k.ptr ? p.top_k[s] : p.top_k_default;
    r = k < 0 ? 0 : k;
  }
  r = r > p.min_keep - forced ? r : p.min_keep - forced;
  const int64_t cap = n_cand < p.capacity - forced ? n_cand : p.capacity - forced;
  r = clamp64(r, 0, cap);

  // Cut-off for exactly r candidates: keys > t all kept, keys == t kept lowest position first.
  uint32_t t = 0xffffffffu;
  long long need_eq = 0;
  if (r > 0) {
    t = largest_key([&](uint32_t x) { return count([x](uint32_t key) { return key >= x; }) >= r; });
    need_eq = r - count([t](uint32_t key) { return key > t; });
  }

  // Ordered pass: tie ranks and output slots by two block scans per tile.
  int32_t* out = p.indices + s * p.capacity;
  int written = 0, eq_seen = 0;
  for (int64_t base = 0; base < len; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    bool forced_i = false, gt = false, eq = false;
    if (i < len) {
      forced_i = i < seg.n_sink || i >= seg.recent_start;
      if (!forced_i && r > 0) {
        const uint32_t key = seg.key(i);
        gt = key > t;
        eq = key == t;
      }
    }
    int eq_rank, eq_total;
    typename Block::Scan(storage.scan).ExclusiveSum(eq ? 1 : 0, eq_rank, eq_total);
    __syncthreads();
    const bool keep = forced_i || gt || (eq && eq_seen + eq_rank < need_eq);
    int slot, kept_total;
    typename Block::Scan(storage.scan).ExclusiveSum(keep ? 1 : 0, slot, kept_total);
    __syncthreads();
    if (keep) out[written + slot] = static_cast<int32_t>(i);
    written += kept_total;
    eq_seen += eq_total;
  }
  for (int64_t i = written + threadIdx.x; i < p.capacity; i += kThreads) out[i] = -1;
  if (threadIdx.x == 0) p.counts[s] = written;
}

template <typename T>
cudaError_t launch_select_generic(const SelectParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  select_generic<T, kThreads><<<static_cast<unsigned>(p.S), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pyramid_kv::kernels

// CPU segmented top-p / top-k selection: one segment per task, a comparison sort of the
// candidates by (score desc, position asc), a sequential float64 mass prefix, then the kept
// positions written ascending.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace pyramid_kv {
namespace {

// The ordering key of docs/ops.md: NaN ranks lowest (as -inf) and -0 equals +0.
inline float order_key(float s) {
  if (std::isnan(s)) return -std::numeric_limits<float>::infinity();
  return s == 0.0f ? 0.0f : s;
}

struct Budget {
  bool by_mass;
  double top_p;
  int64_t top_k;
};

template <typename scalar_t>
int64_t select_segment(const scalar_t* row, int64_t len, const Budget& budget, int64_t sink,
                       int64_t recent, int64_t min_keep, int64_t capacity, int32_t* out,
                       std::vector<int32_t>& order, std::vector<float>& key,
                       std::vector<char>& kept) {
  const int64_t n_sink = std::min(sink, len);
  const int64_t recent_start = std::max(len - recent, n_sink);
  const int64_t forced = n_sink + (len - recent_start);
  const int64_t n_cand = recent_start - n_sink;

  key.resize(len);
  for (int64_t i = 0; i < len; ++i) key[i] = order_key(static_cast<float>(row[i]));
  order.resize(n_cand);
  for (int64_t i = 0; i < n_cand; ++i) order[i] = static_cast<int32_t>(n_sink + i);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
  });

  int64_t r;
  if (budget.by_mass) {
    double total = 0.0;
    for (int32_t i : order) total += std::max(0.0, static_cast<double>(key[i]));
    const double target = budget.top_p * total;
    r = 0;
    if (target > 0.0) {
      double mass = 0.0;
      while (r < n_cand && mass < target) mass += std::max(0.0, static_cast<double>(key[order[r++]]));
    }
  } else {
    r = std::min(budget.top_k, n_cand);
  }
  r = std::clamp(std::max(r, min_keep - forced), int64_t{0}, std::min(n_cand, capacity - forced));

  kept.assign(len, 0);
  for (int64_t i = 0; i < n_sink; ++i) kept[i] = 1;
  for (int64_t i = recent_start; i < len; ++i) kept[i] = 1;
  for (int64_t i = 0; i < r; ++i) kept[order[i]] = 1;
  int64_t count = 0;
  for (int64_t i = 0; i < len; ++i) {
    if (kept[i]) out[count++] = static_cast<int32_t>(i);
  }
  for (int64_t i = count; i < capacity; ++i) out[i] = -1;
  return count;
}

std::tuple<Tensor, Tensor> select_cpu(const Tensor& scores, const Tensor& lengths,
                                      const OptTensor& per_segment, Budget budget, int64_t sink,
                                      int64_t recent, int64_t min_keep, int64_t capacity) {
  const SelectDims d = check_select(scores, lengths, per_segment, budget.by_mass, sink, recent,
                                    min_keep, capacity);
  check_lengths_values(lengths, d.N, "lengths");
  const Tensor lens = lengths.to(at::kLong);
  Tensor budgets;
  if (per_segment) {
    budgets = budget.by_mass ? per_segment->to(at::kDouble) : per_segment->to(at::kLong);
    for (int64_t s = 0; s < d.S; ++s) {
      if (budget.by_mass) {
        const double p = budgets.const_data_ptr<double>()[s];
        TORCH_CHECK_VALUE(p > 0.0 && p <= 1.0, "maybe_top_p[", s, "] = ", p,
                          " is outside (0, 1]");
      } else {
        const int64_t k = budgets.const_data_ptr<int64_t>()[s];
        TORCH_CHECK_VALUE(k >= 0, "maybe_top_k[", s, "] = ", k, " is negative");
      }
    }
  }
  Tensor indices = at::empty({d.S, capacity}, scores.options().dtype(at::kInt));
  Tensor counts = at::empty({d.S}, scores.options().dtype(at::kInt));
  const int64_t* len_p = lens.const_data_ptr<int64_t>();
  int32_t* idx_p = indices.mutable_data_ptr<int32_t>();
  int32_t* cnt_p = counts.mutable_data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "select_cpu", [&] {
    const scalar_t* base = scores.const_data_ptr<scalar_t>();
    const int64_t row_stride = scores.stride(0);
    at::parallel_for(0, d.S, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> order;
      std::vector<float> key;
      std::vector<char> kept;
      for (int64_t s = begin; s < end; ++s) {
        Budget b = budget;
        if (per_segment) {
          if (b.by_mass) b.top_p = budgets.const_data_ptr<double>()[s];
          else b.top_k = budgets.const_data_ptr<int64_t>()[s];
        }
        cnt_p[s] = static_cast<int32_t>(select_segment(base + s * row_stride, len_p[s], b, sink,
                                                       recent, min_keep, capacity,
                                                       idx_p + s * capacity, order, key, kept));
      }
    });
  });
  return {indices, counts};
}

}  // namespace

std::tuple<Tensor, Tensor> select_top_p_cpu(const Tensor& scores, const Tensor& lengths,
                                            const OptTensor& maybe_top_p, double top_p,
                                            int64_t sink, int64_t recent, int64_t min_keep,
                                            int64_t capacity) {
  if (!maybe_top_p) check_top_p(top_p);
  return select_cpu(scores, lengths, maybe_top_p, Budget{true, top_p, 0}, sink, recent,
                    min_keep, capacity);
}

std::tuple<Tensor, Tensor> select_top_k_cpu(const Tensor& scores, const Tensor& lengths,
                                            const OptTensor& maybe_top_k, int64_t top_k,
                                            int64_t sink, int64_t recent, int64_t min_keep,
                                            int64_t capacity) {
  if (!maybe_top_k) check_top_k(top_k);
  return select_cpu(scores, lengths, maybe_top_k, Budget{false, 1.0, top_k}, sink, recent,
                    min_keep, capacity);
}

}  // namespace pyramid_kv

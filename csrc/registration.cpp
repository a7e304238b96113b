// Every pyramid_kv op schema, declared once, and the CPU / CUDA implementations bound to them.
// docs/ops.md is the contract; python/pyramid_kv/_fake.py holds the fake (meta) kernels.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(pyramid_kv, m) {
  // Torch imports this module (which registers the fake kernels) when tracing needs them.
  m.set_python_module("pyramid_kv._fake");

  // Per-key ensemble of the recent queries' causal softmax attention, summed over the rows
  // (times optional per-row weights) and over the query heads of each KV-head group:
  // q [B, Hq, W, D], k [B, Hkv, N, D], lengths [B] -> float32 [B, Hkv, N].
  // Row w of sequence b is the query at position lengths[b] - W + w and sees keys j <= that.
  // lse [B, Hq, W] (optional) is each row's natural log-sum-exp over the keys it sees.
  m.def(
      "ensemble_scores(Tensor q, Tensor k, Tensor lengths, Tensor? row_weights, Tensor? lse, "
      "float scale) -> Tensor");

  // Segmented top-p: per row s of scores [S, N] with lengths[s] valid entries, keep the
  // smallest set of highest-scoring candidates whose mass reaches p of the candidates' mass,
  // plus the first `sink` and last `recent` positions, at least min(min_keep, length) in all,
  // at most `capacity`. -> (int32 indices [S, capacity] ascending, -1 padded; int32 counts [S]).
  m.def(
      "select_top_p(Tensor scores, Tensor lengths, Tensor? maybe_top_p, float top_p, int sink, "
      "int recent, int min_keep, int capacity) -> (Tensor, Tensor)");

  // Segmented top-k: as select_top_p, keeping the k highest-scoring candidates.
  m.def(
      "select_top_k(Tensor scores, Tensor lengths, Tensor? maybe_top_k, int top_k, int sink, "
      "int recent, int min_keep, int capacity) -> (Tensor, Tensor)");

  // Gather kept token rows: for every src [B, H, N, D] (any dtype), out[b, h, i] =
  // src[b, h, indices[b, (h,) i]] for i < counts[b, (h)]; rows at or past the count are not
  // written. indices [B, C] (per sequence) or [B, H, C] (per head) -> outs [B, H, C, D].
  m.def("compact(Tensor[] src, Tensor indices, Tensor counts) -> Tensor[]");

  // As compact, into caller-provided buffers out[t] [B, H, C_out >= C, D] that do not
  // overlap src.
  m.def("compact_out(Tensor[] src, Tensor indices, Tensor counts, Tensor(a!)[] out) -> ()");

  // In-place compact: row i of every src[b, h] becomes its row indices[b, (h,) i] for
  // i < counts[b, (h)], so the kept rows move to the front of the same buffer. The first
  // counts entries of each index row must be strictly ascending (a row only moves forward);
  // rows at or past the count are unspecified afterwards.
  m.def("compact_(Tensor(a!)[] src, Tensor indices, Tensor counts) -> ()");

  // MiniCache merge of two layers' vectors a, b [B, X, Y, D] (any strides, last dim contiguous):
  // per vector the L2 norms, the SLERP at t of the unit directions (normalised lerp where
  // sin(angle) < eps) and the angle / pi -> (direction [B, X, Y, D] in the input dtype,
  // float32 norm_a, norm_b, distance [B, X, Y]), all contiguous.
  m.def("slerp_merge(Tensor a, Tensor b, float t, float eps) -> (Tensor, Tensor, Tensor, Tensor)");

  // Restore a merged layer: norm[..., None] * direction (float32 math, direction's dtype).
  m.def("slerp_restore(Tensor direction, Tensor norm) -> Tensor");

  // As slerp_restore, into out [B, X, Y, D] (any strides, last dim contiguous).
  m.def("slerp_restore_out(Tensor direction, Tensor norm, Tensor(a!) out) -> ()");

  // Decode attention of one query per sequence and head, q [B, Hq, D], over a merged layer
  // without restoring it: prompt keys norm_k * dir_k and values norm_v * dir_v (dir [B, P, Hkv, D],
  // float32 norms [B, P, Hkv]; rows t < lengths[b]; a negative key norm skips the token), the
  // retained rows [B, Hkv, C, D] c < retained_counts[b, h], and the tail [B, T, Hkv, D]
  // u < tail_lengths[b]. float32 softmax(scale q.k) over that key set -> [B, Hq, D], q's dtype.
  m.def(
      "merged_attention(Tensor q, Tensor dir_k, Tensor dir_v, Tensor norm_k, Tensor norm_v, "
      "Tensor lengths, Tensor retained_k, Tensor retained_v, Tensor retained_counts, "
      "Tensor tail_k, Tensor tail_v, Tensor tail_lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyramid_kv, CPU, m) {
  m.impl("ensemble_scores", &pyramid_kv::ensemble_scores_cpu);
  m.impl("select_top_p", &pyramid_kv::select_top_p_cpu);
  m.impl("select_top_k", &pyramid_kv::select_top_k_cpu);
  m.impl("compact", &pyramid_kv::compact_cpu);
  m.impl("compact_out", &pyramid_kv::compact_out_cpu);
  m.impl("compact_", &pyramid_kv::compact_inplace_cpu);
  m.impl("slerp_merge", &pyramid_kv::slerp_merge_cpu);
  m.impl("slerp_restore", &pyramid_kv::slerp_restore_cpu);
  m.impl("slerp_restore_out", &pyramid_kv::slerp_restore_out_cpu);
  m.impl("merged_attention", &pyramid_kv::merged_attention_cpu);
}

#ifdef PYRAMID_KV_WITH_CUDA
TORCH_LIBRARY_IMPL(pyramid_kv, CUDA, m) {
  m.impl("ensemble_scores", &pyramid_kv::ensemble_scores_cuda);
  m.impl("select_top_p", &pyramid_kv::select_top_p_cuda);
  m.impl("select_top_k", &pyramid_kv::select_top_k_cuda);
  m.impl("compact", &pyramid_kv::compact_cuda);
  m.impl("compact_out", &pyramid_kv::compact_out_cuda);
  m.impl("compact_", &pyramid_kv::compact_inplace_cuda);
  m.impl("slerp_merge", &pyramid_kv::slerp_merge_cuda);
  m.impl("slerp_restore", &pyramid_kv::slerp_restore_cuda);
  m.impl("slerp_restore_out", &pyramid_kv::slerp_restore_out_cuda);
  m.impl("merged_attention", &pyramid_kv::merged_attention_cuda);
}
#endif

// `from pyramid_kv import _C` loads this library, which runs the registrations above. The
// module itself is empty, so the extension needs only the limited (abi3) Python API.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

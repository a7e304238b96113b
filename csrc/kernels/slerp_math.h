// The per-vector SLERP merge math of docs/ops.md (slerp_merge), shared by the CPU kernel and the
// CUDA kernels so both take the same branches on the same float32 values. Torch-free and
// CUDA-free: PYRAMID_KV_HD is `__host__ __device__` when included from a .cu file.
//
// A vector pair (a, b) is reduced in two passes over its D elements:
//  1. saa = |a|^2, sbb = |b|^2 -> SlerpBasis: the unit directions as combinations of a and b,
//     u = ua*a + ub*b (a-hat) and w = wa*a + wb*b (b-hat), with a zero vector taking the other's
//     direction (both zero: u = w = 0).
//  2. Elementwise sums of |u + w|^2, |u - w|^2 and |(1-t)u + t w|^2 -> SlerpResult.
// The angle is Omega = 2 atan2(|u - w|, |u + w|) rather than acos(u . w): the same angle, but
// exact at the ends (parallel: |u - w| = 0; antiparallel: |u + w| = 0), where acos of a dot
// product rounded to float32 is off by ~sqrt(2 ulp) ~ 3e-4 and would pick the SLERP branch with
// a meaningless direction instead of the contract's normalised-lerp fallback.
#pragma once

#include <cmath>

#ifndef PYRAMID_KV_HD
#define PYRAMID_KV_HD
#endif

namespace pyramid_kv::kernels {

struct SlerpBasis {
  float ua, ub;  // a-hat = ua * a + ub * b
  float wa, wb;  // b-hat = wa * a + wb * b
};

PYRAMID_KV_HD inline SlerpBasis slerp_basis(float saa, float sbb) {
  const float na = sqrtf(saa), nb = sqrtf(sbb);
  const float ia = na > 0.0f ? 1.0f / na : 0.0f;
  const float ib = nb > 0.0f ? 1.0f / nb : 0.0f;
  SlerpBasis s;
  s.ua = ia, s.ub = na > 0.0f ? 0.0f : ib;  // |a| == 0: a-hat := b-hat
  s.wa = nb > 0.0f ? 0.0f : ia, s.wb = ib;  // |b| == 0: b-hat := a-hat
  return s;
}

struct SlerpSums {
  float plus = 0.0f, minus = 0.0f, lerp = 0.0f;  // |u + w|^2, |u - w|^2, |(1-t)u + t w|^2

  PYRAMID_KV_HD void add(const SlerpBasis& s, float t, float a, float b) {
    const float u = fmaf(s.ua, a, s.ub * b), w = fmaf(s.wa, a, s.wb * b);
    const float p = u + w, m = u - w, l = fmaf(1.0f - t, u, t * w);
    plus = fmaf(p, p, plus), minus = fmaf(m, m, minus), lerp = fmaf(l, l, lerp);
  }
};

struct SlerpResult {
  float ca, cb;      // direction = ca * a + cb * b
  float distance;    // Omega / pi in [0, 1]
};

PYRAMID_KV_HD inline SlerpResult slerp_result(const SlerpBasis& s, const SlerpSums& q, float t,
                                              float eps) {
  constexpr float kPi = 3.14159265358979323846f;
  const float omega = 2.0f * atan2f(sqrtf(q.minus), sqrtf(q.plus));  // [0, pi]
  const float sin_omega = sinf(omega);
  float ku, kw;  // direction = ku * a-hat + kw * b-hat
  if (sin_omega >= eps && sin_omega > 0.0f) {
    ku = sinf((1.0f - t) * omega) / sin_omega;
    kw = sinf(t * omega) / sin_omega;
  } else if (q.lerp > 0.0f) {  // (nearly) parallel or antiparallel: normalised lerp
    const float r = 1.0f / sqrtf(q.lerp);
    ku = (1.0f - t) * r, kw = t * r;
  } else {  // both vectors zero, or antiparallel at the midpoint
    ku = 0.0f, kw = 0.0f;
  }
  SlerpResult r;
  r.ca = fmaf(ku, s.ua, kw * s.wa);
  r.cb = fmaf(ku, s.ub, kw * s.wb);
  r.distance = fminf(omega / kPi, 1.0f);
  return r;
}

}  // namespace pyramid_kv::kernels

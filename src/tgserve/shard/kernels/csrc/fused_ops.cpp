// The small per-layer operations of a Llama-shaped block, each fused into one pass over its rows.
//
// At decode sizes each of these is microseconds of arithmetic wrapped in several torch ops (an
// RMSNorm alone is pow, mean, add, rsqrt, mul, mul): the dispatch and the parallel regions cost
// more than the work. One call per operation, one parallel region over rows, no temporaries.
// Numerics follow the reference implementations: statistics in float32, the same formulas.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "kernels.h"
#include "simd.h"

namespace {

namespace simd = tgserve_simd;

// Rows per parallel chunk: below a few rows a parallel region costs more than it saves.
constexpr int64_t kRowGrain = 4;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be [T, hidden]");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_cpu(), name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.stride(1) == 1, name, " rows must be contiguous");
}

inline void norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) sq += x[i] * x[i];
  const float r = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

}  // namespace

// The operations themselves, also called directly by decode_layer.cpp (kernels.h).
namespace tgserve_kernels {

// y = weight * x / sqrt(mean(x²) + eps), row by row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              "weight must be [hidden] float32");
  const int64_t t = x.size(0), n = x.size(1), xs = x.stride(0);
  at::Tensor y = at::empty({t, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, t, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * xs, wp, yp + r * n, n, float(eps));
  });
  return y;
}

// The residual add and the next RMSNorm in one pass: (x + residual, rms_norm(x + residual)).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual shapes differ");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              "weight must be [hidden] float32");
  const int64_t t = x.size(0), n = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  at::Tensor sum = at::empty({t, n}, x.options());
  at::Tensor y = at::empty({t, n}, x.options());
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, t, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *a = xp + r * xs, *b = rp + r * rs;
      float* s = sp + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s[i] = a[i] + b[i];
      norm_row(s, wp, yp + r * n, n, float(eps));
    }
  });
  return {y, sum};
}

// [T, 2I] gate|up halves -> [T, I] silu(gate) * up (SwiGLU).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t t = gate_up.size(0), n = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor y = at::empty({t, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, t, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *g = gp + r * gs, *u = g + n;
      float* out = yp + r * n;
      int64_t i = 0;
      for (; i + simd::kLanes <= n; i += simd::kLanes) {
        const simd::vec gv = simd::load(g + i);
        simd::store(out + i, gv / (1.f + simd::exp(-gv)) * simd::load(u + i));
      }
      for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return y;
}

// Rotate-half RoPE of one head in place: x·cos + rotate_half(x)·sin.
inline void rotate_head(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// On the fused qkv output [T, (H + 2·Hkv)·D]: RoPE on the q and k heads in place, then the rotated
// k and the v of token t stored at slot slots[t] of this layer's caches ([N, Hkv, D] each,
// float32 or float16).
void rotary_store_kv(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                     int64_t heads, int64_t kv_heads, int64_t dim) {
  check_rows(qkv, "qkv");
  const int64_t t = qkv.size(0);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv width is not (H + 2 Hkv) D");
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  for (const at::Tensor* c : {&cos, &sin}) {
    TORCH_CHECK(c->dim() == 2 && c->size(0) == t && c->size(1) == dim && c->is_contiguous() &&
                    c->scalar_type() == at::kFloat,
                "cos/sin must be contiguous [T, D] float32");
  }
  const bool half = k_cache.scalar_type() == at::kHalf;
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->dim() == 3 && c->size(1) == kv_heads && c->size(2) == dim &&
                    c->is_contiguous() && c->scalar_type() == k_cache.scalar_type() &&
                    (c->scalar_type() == at::kFloat || half),
                "caches must be contiguous [N, Hkv, D], both float32 or both float16");
  }
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == t && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "slots must be [T] int64");
  const int64_t num_slots = k_cache.size(0), row = kv_heads * dim, qs = qkv.stride(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "slot ", sp[i], " outside [0, ", num_slots, ")");
  float* base = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  void *kc = k_cache.data_ptr(), *vc = v_cache.data_ptr();
  at::parallel_for(0, t, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* x = base + r * qs;
      const float *c = cp + r * dim, *s = snp + r * dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rotate_head(x + h * dim, c, s, dim);
      const float *k = x + heads * dim, *v = k + row;
      const int64_t at = sp[r] * row;
      if (half) {  // a float16 cache: k and v rounded as they are stored
        simd::store_halves(static_cast<c10::Half*>(kc) + at, k, row);
        simd::store_halves(static_cast<c10::Half*>(vc) + at, v, row);
      } else {
        std::copy(k, k + row, static_cast<float*>(kc) + at);
        std::copy(v, v + row, static_cast<float*>(vc) + at);
      }
    }
  });
}

}  // namespace tgserve_kernels

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rotary_store_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slots, int heads, int kv_heads, int dim) -> ()");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("rms_norm", &tgserve_kernels::rms_norm);
  m.impl("add_rms_norm", &tgserve_kernels::add_rms_norm);
  m.impl("silu_mul", &tgserve_kernels::silu_mul);
  m.impl("rotary_store_kv", &tgserve_kernels::rotary_store_kv);
}

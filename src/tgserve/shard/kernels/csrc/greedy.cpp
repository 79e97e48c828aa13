// Greedy choice over a batch of logits: each row's argmax and its log-probability, in two passes
// over the row and without the [B, V] log_softmax that a greedy row never reads.
//
// torch's argmax, log_softmax and gather each pass over [B, V] and write a whole log_softmax
// (docs/design/greedy-op.md). The results are torch's: the first index of the maximum (a NaN counts
// as the maximum, as in torch.argmax), and logprob = -log(sum(exp(x - max))), which is what
// log_softmax(x)[argmax] computes (x[argmax] - max is exactly 0).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

namespace simd = tgserve_simd;
using simd::kLanes;
using vec = simd::vec;

// Index of the first maximum of x[0, n); -1 when a NaN is present (the caller rescans).
int64_t first_max(const float* x, int64_t n) {
  int64_t i = 1, best = 0;
  float top = x[0];
  if (top != top) return -1;
  if (n >= kLanes) {
    // Per lane the first maximum seen (strict >), then the lowest index among lanes that tie.
    // Float indices are exact up to 2^24, far above any vocabulary.
    vec lane_top = simd::load(x), lane_idx, idx;
    for (int64_t l = 0; l < kLanes; ++l) lane_idx[l] = static_cast<float>(l);
    idx = lane_idx;
    vec nan_seen = lane_top != lane_top ? simd::splat(1.f) : vec{};
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const vec v = simd::load(x + i);
      idx += static_cast<float>(kLanes);
      const auto better = v > lane_top;
      lane_top = better ? v : lane_top;
      lane_idx = better ? idx : lane_idx;
      nan_seen = v != v ? simd::splat(1.f) : nan_seen;
    }
    if (simd::hsum(nan_seen) > 0.f) return -1;
    top = lane_top[0];
    best = static_cast<int64_t>(lane_idx[0]);
    for (int64_t l = 1; l < kLanes; ++l) {
      const int64_t at = static_cast<int64_t>(lane_idx[l]);
      if (lane_top[l] > top || (lane_top[l] == top && at < best)) top = lane_top[l], best = at;
    }
  }
  for (; i < n; ++i) {
    if (x[i] != x[i]) return -1;
    if (x[i] > top) top = x[i], best = i;
  }
  return best;
}

float sum_exp(const float* x, int64_t n, float top) {
  vec acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += simd::exp(simd::load(x + i) - top);
  float s = simd::hsum(acc);
  for (; i < n; ++i) s += std::exp(x[i] - top);
  return s;
}

std::tuple<at::Tensor, at::Tensor> greedy_choice(const at::Tensor& scores_in) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.size(1) > 0, "scores must be [B, V], V > 0");
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat && scores_in.is_cpu(),
              "scores must be a CPU float32 tensor");
  const at::Tensor scores = scores_in.stride(1) == 1 ? scores_in : scores_in.contiguous();
  const int64_t b = scores.size(0), v = scores.size(1), stride = scores.stride(0);
  at::Tensor ids = at::empty({b}, scores.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({b}, scores.options());
  const float* xp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = xp + r * stride;
      int64_t best = first_max(x, v);
      if (best < 0) {  // torch.argmax takes the first NaN; its log-probability is NaN too
        best = 0;
        while (x[best] == x[best]) ++best;
        ip[r] = best;
        lp[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      ip[r] = best;
      const float top = x[best];
      // A maximum of ±inf makes x - max NaN at the maximum, in log_softmax as here.
      lp[r] =
          std::isinf(top) ? std::numeric_limits<float>::quiet_NaN() : -std::log(sum_exp(x, v, top));
    }
  });
  return {ids, logprobs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def("greedy_choice(Tensor scores) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("greedy_choice", &greedy_choice);
}

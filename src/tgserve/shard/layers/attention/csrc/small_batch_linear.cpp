// y = x · Wᵀ (+ bias) for a few rows of x: the decode-time linear, bound by streaming W from memory.
//
// Each thread owns one contiguous range of W's rows (a static split), so its reads form a single
// linear stream. Rows are taken R at a time and every row is read once for all M inputs: the R·M
// partial sums live in registers while x (at most 8 rows of K floats) stays in L1. R shrinks as M
// grows so that R·M accumulators plus the loads still fit in the 16 AVX2 registers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace {

// 8 floats: one AVX2 register under -mavx2, two SSE registers without. may_alias + aligned(4)
// make a load from any float address legal (see paged_attention.cpp).
typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kLanes = 8;
constexpr int64_t kLine = 64 / sizeof(float);  // floats per cache line
// How far ahead in its stream a thread prefetches W, in floats: 4 KiB, about the bytes that arrive
// during one memory latency at full bandwidth; 2..16 KiB measured alike.
constexpr int64_t kAhead = 1024;
constexpr int64_t kMaxRows = 8;
// Below this many weights a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

inline vf8 load(const float* p) { return *reinterpret_cast<const vf8*>(p); }

inline float hsum(vf8 v) {
  float s = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

struct Problem {
  const float* x;     // [M, K] contiguous
  const float* w;     // [N, K] contiguous
  const float* bias;  // [N] or null
  float* y;           // [M, N] contiguous
  int64_t m, n, k;
};

// acc[r][m] += W[r][k0 : k0 + 8] * x[m][k0 : k0 + 8] for R rows starting at w.
template <int M, int R>
inline void fma_step(vf8 (&acc)[R][M], const float* x, const float* w, int64_t k, int64_t k0) {
  for (int r = 0; r < R; ++r) {
    const vf8 wv = load(w + r * k + k0);
    for (int i = 0; i < M; ++i) acc[r][i] += wv * load(x + i * k + k0);
  }
}

// Rows [row, row + R) of y for all M inputs.
template <int M, int R>
void rows_block(const Problem& p, int64_t row) {
  const int64_t k = p.k;
  const float* w = p.w + row * k;
  vf8 acc[R][M] = {};
  int64_t k0 = 0;
  // One cache line per row per iteration, so one prefetch per row covers exactly what is consumed.
  for (; k0 + kLine <= k; k0 += kLine) {
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * k + k0 + kAhead);
    fma_step<M, R>(acc, p.x, w, k, k0);
    fma_step<M, R>(acc, p.x, w, k, k0 + kLanes);
  }
  if (k0 + kLanes <= k) {
    fma_step<M, R>(acc, p.x, w, k, k0);
    k0 += kLanes;
  }
  for (int r = 0; r < R; ++r) {
    const float b = p.bias != nullptr ? p.bias[row + r] : 0.f;
    for (int i = 0; i < M; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t t = k0; t < k; ++t) s += w[r * k + t] * p.x[i * k + t];  // K % 8 tail
      p.y[i * p.n + row + r] = s + b;
    }
  }
}

// Rows [begin, end): whole blocks of R, then single rows for what is left.
template <int M, int R>
void rows_range(const Problem& p, int64_t begin, int64_t end) {
  int64_t row = begin;
  for (; row + R <= end; row += R) rows_block<M, R>(p, row);
  for (; row < end; ++row) rows_block<M, 1>(p, row);
}

// Rows per block by batch size: R·M ≤ 8 accumulators, and at least 2 rows while M ≤ 4 so that
// several independent FMA chains are in flight.
template <int M>
constexpr int rows_per_block() {
  return M == 1 ? 4 : M == 2 ? 4 : M <= 4 ? 2 : 1;
}

template <int M>
void run(const Problem& p) {
  constexpr int R = rows_per_block<M>();
  const int64_t blocks = (p.n + R - 1) / R;
  // Each thread gets one contiguous run of blocks; a block that would straddle the end of W is
  // cut by rows_range. at::parallel_for hands out contiguous chunks on torch's own OpenMP pool.
  const int64_t threads = p.n * p.k >= kMinParallelWork ? at::get_num_threads() : 1;
  const int64_t grain = (blocks + threads - 1) / threads;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows_range<M, R>(p, b0 * R, std::min(p.n, b1 * R));
  });
}

// ---- more rows: tiles of R rows of W by up to kTile rows of x -----------------------------------
//
// Past 8 rows the product turns compute-bound, and the row-at-a-time scheme above spends more
// load slots than FMA slots (M + 1 loads for M FMAs). Here R = 2 rows of W meet a tile of up to
// 6 rows of x: 2 + 6 loads feed 12 FMAs, and the 12 accumulators plus 3 operands fit in the 16
// AVX2 registers. The first tile of a row block streams W from memory (and prefetches ahead);
// the later tiles find those 2 rows in L1, so W is still read from memory once.
constexpr int64_t kTile = 6;
constexpr int kTileRows = 2;
constexpr int64_t kMaxTiledRows = 64;

template <int MT, int R>
void tile(const Problem& p, int64_t row, int64_t m0, bool first) {
  const int64_t k = p.k;
  const float* w = p.w + row * k;
  const float* x = p.x + m0 * k;
  vf8 acc[R][MT] = {};
  int64_t k0 = 0;
  for (; k0 + kLanes <= k; k0 += kLanes) {
    if (first && (k0 & (kLine - 1)) == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * k + k0 + kAhead);
    vf8 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * k + k0);
    for (int i = 0; i < MT; ++i) {
      const vf8 xv = load(x + i * k + k0);
      for (int r = 0; r < R; ++r) acc[r][i] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = p.bias != nullptr ? p.bias[row + r] : 0.f;
    for (int i = 0; i < MT; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t t = k0; t < k; ++t) s += w[r * k + t] * x[i * k + t];  // K % 8 tail
      p.y[(m0 + i) * p.n + row + r] = s + b;
    }
  }
}

template <int R>
void tile_any(const Problem& p, int64_t row, int64_t m0, int64_t mt, bool first) {
  switch (mt) {
    case 1: return tile<1, R>(p, row, m0, first);
    case 2: return tile<2, R>(p, row, m0, first);
    case 3: return tile<3, R>(p, row, m0, first);
    case 4: return tile<4, R>(p, row, m0, first);
    case 5: return tile<5, R>(p, row, m0, first);
    case 6: return tile<6, R>(p, row, m0, first);
  }
}

// Rows [begin, end) of y, all M columns: each row block meets every tile of x before moving on.
template <int R>
void tiled_block(const Problem& p, int64_t row) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kTile)
    tile_any<R>(p, row, m0, std::min(kTile, p.m - m0), m0 == 0);
}

void run_tiled(const Problem& p) {
  constexpr int R = kTileRows;
  const int64_t blocks = (p.n + R - 1) / R;
  const int64_t threads = at::get_num_threads();
  const int64_t grain = (blocks + threads - 1) / threads;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(p.n, b1 * R);
    int64_t row = b0 * R;
    for (; row + R <= end; row += R) tiled_block<R>(p, row);
    for (; row < end; ++row) tiled_block<1>(p, row);
  });
}

void dispatch(const Problem& p) {
  if (p.m > kMaxRows) return run_tiled(p);
  switch (p.m) {
    case 1: return run<1>(p);
    case 2: return run<2>(p);
    case 3: return run<3>(p);
    case 4: return run<4>(p);
    case 5: return run<5>(p);
    case 6: return run<6>(p);
    case 7: return run<7>(p);
    case 8: return run<8>(p);
  }
}

at::Tensor small_batch_linear(const at::Tensor& x_in, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2, "x must be [M, K] and weight [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "small_batch_linear supports float32 only");
  TORCH_CHECK(x_in.is_cpu() && weight.is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.size(1) == weight.size(1), "x and weight disagree on K");
  TORCH_CHECK(x_in.size(0) <= kMaxTiledRows, "x has more than ", kMaxTiledRows, " rows");
  // Copying W to make it contiguous would cost more than the product itself: refuse instead.
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const int64_t m = x_in.size(0), n = weight.size(0), k = weight.size(1);
  const at::Tensor x = x_in.contiguous();  // at most 8 rows: a cheap copy when needed
  std::optional<at::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [N]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_cpu(), "bias must be CPU float32");
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const Problem p{x.data_ptr<float>(), weight.data_ptr<float>(),
                  b.has_value() ? b->data_ptr<float>() : nullptr, y.data_ptr<float>(), m, n, k};
  dispatch(p);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) { m.impl("small_batch_linear", &small_batch_linear); }

// y = x · Wᵀ (+ bias) on a weight packed once, at load, into panels of kPanel output columns.
//
// Packed layout: panel p holds W[p·kPanel : (p+1)·kPanel, :] transposed, [K][kPanel], so the
// kPanel weights of one k are contiguous. The micro-kernel keeps an MR x kPanel block of y in
// registers and, for each k, loads the panel's kPanel weights and broadcasts MR scalars of x:
// MR FMAs per weight vector loaded and no horizontal sums, which is what lets a decode batch of
// 16-64 rows (and a prefill) run near the FMA peak, where a dot-product kernel over W's rows
// cannot. At one row the same loop is a single linear stream through W: bound by memory bandwidth.
//
// With AVX-512 a panel is one vector wide and a tile up to 28 rows tall (28 accumulators of the
// 32 registers): a decode batch of 16-28 rows then meets each weight once, as it streams in from
// memory. Two vectors by 12 rows, the shape before, split 16 rows into two passes over every
// panel, the first stalled on memory and the second on FMAs (docs/design/packed-linear.md).
// AVX2 has 16 registers: panels of two vectors by up to 6 rows.
//
// From kWideMinRows rows up (a prefill), where each weight is re-read from L2 by many tiles and
// the FMAs, not the weight stream, set the pace, AVX-512 tiles are 14 rows by two panels: per k
// one broadcast of x feeds two FMAs, 16 loads for 28 FMAs instead of 29, which left the load
// ports, not the FMA units, the bottleneck.
// A decode batch of 2-14 rows is one such tile, so it still meets each weight once, with fewer
// loads per FMA. One row keeps its single stream (measured: docs/design/packed-linear.md).
//
// From kAmxMinRows rows up, on a CPU with AMX tiles, amx_linear.cpp multiplies the same panels
// instead, to float32 accuracy.
//
// x is repacked per call into tiles laid out [K][rows], so that a tile's MR scalars of one k are
// contiguous: the kernel addresses them from one pointer, where MR row pointers would not fit in
// the general registers and were spilled to the stack.
//
// W is read from memory once per call per chunk of kChunk rows of x (which stays in L2 while
// every panel meets it); threads take runs of panels as they come free (see run()).
//
// A block of panels that several tiles share (30-192 rows) streams from memory during its first
// tile only; the others re-read it from L2 while memory idles, so each first tile then waited on a
// whole block. Every tile therefore also asks for its share of a block further on into L2: the
// memory stream runs under all the arithmetic. A single tile (up to 28 rows) streams its own
// block, where the extra stream only slowed it (docs/design/packed-linear-prefetch.md).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "amx_linear.h"
#include "kernels.h"
#include "simd.h"

namespace {

using tgserve_simd::kLanes;
using tgserve_simd::load;
using tgserve_simd::store;
using vec = tgserve_simd::vec;
#if defined(__AVX512F__)
constexpr int kVecs = 1;     // vectors per panel
constexpr int kMaxMR = 28;   // 28 accumulators + the weight vector of the 32 registers
constexpr int kWideMR = 14;  // two panels: 28 accumulators + 2 weight vectors + 1 broadcast
constexpr int64_t kWideMinRows = 29;
#else
constexpr int kVecs = 2;
constexpr int kMaxMR = 6;   // 12 accumulators + 2 weight vectors + 1 broadcast of the 16
constexpr int kWideMR = 0;  // panels are two vectors wide already
constexpr int64_t kWideMinRows = INT64_MAX;
#endif
constexpr int64_t kPanel = kVecs * kLanes;
// Rows of x per pass over the weight: x's chunk stays in L2 for every panel.
constexpr int64_t kChunk = 192;
// Prefetch distance in the panel stream, in k steps: about 6 KiB ahead.
constexpr int64_t kAhead = 6144 / (kPanel * 4);
// A single tile (one decode row up to 28) also asks for the panel 12 KiB ahead into L2: more of
// the stream in flight than L1's prefetches alone hold (docs/design/packed-linear-prefetch.md).
constexpr int64_t kFarAhead = 12288 / (kPanel * 4);
// How far ahead, in blocks of panels, the tiles that re-read a block from L2 ask for the weights
// into L2 (see run()): two blocks on measured better than one, three or four
// (docs/design/packed-linear-prefetch.md).
constexpr int64_t kPrefetchBlocks = 2;
// From this many rows up (a prefill, a mixed step) the AMX kernel takes over where the CPU has
// tiles (amx_linear.cpp): each pair of 16-column panels is converted to bfloat16 pieces once and
// met by many rows. Below it the conversion, which streams W from memory, has too few rows to
// hide behind (docs/design/amx-linear.md).
constexpr int64_t kAmxMinRows = 80;

struct Problem {
  const float* x;     // tiles of x: the tile of rows [m0, m0 + MR) is [K][MR] at x + m0 * k
  const float* w;     // [panels, K, kPanel]
  const float* bias;  // [N] or null
  float* y;           // [M, N] contiguous
  int64_t m, n, k;
};

// A share of the weights of a block of panels yet to come, asked into L2 a line at a time while
// this tile computes: `base + ((t * step) >> 16)` at k step t (16.16 fixed point); none if null.
struct Ahead {
  const char* base;
  int64_t step;
};

// Rows [m0, m0 + MR) of y, columns of panel p.
template <int MR>
void micro(const Problem& p, int64_t m0, int64_t panel, Ahead ahead) {
  const int64_t k = p.k;
  const float* w = p.w + panel * k * kPanel;
  const float* x = p.x + m0 * k;
  // Separate arrays per vector of the panel, fully unrolled: GCC keeps them in registers, which
  // it did not for a two-dimensional array.
  vec acc0[MR], acc1[kVecs > 1 ? MR : 1];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) acc0[i] = vec{};
  if constexpr (kVecs > 1) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) acc1[i] = vec{};
  }
  for (int64_t t = 0; t < k; ++t, x += MR) {
    __builtin_prefetch(w + (t + kAhead) * kPanel);
    __builtin_prefetch(w + (t + kFarAhead) * kPanel, 0, 2);
    if (ahead.base != nullptr) __builtin_prefetch(ahead.base + ((t * ahead.step) >> 16), 0, 2);
    const vec w0 = load(w + t * kPanel);
    if constexpr (kVecs > 1) {
      const vec w1 = load(w + t * kPanel + kLanes);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        acc0[i] += w0 * x[i];
        acc1[i] += w1 * x[i];
      }
    } else {
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) acc0[i] += w0 * x[i];
    }
  }
  const int64_t col = panel * kPanel, width = std::min(kPanel, p.n - col);
  float bias[kPanel] = {};
  if (p.bias != nullptr) std::copy(p.bias + col, p.bias + col + width, bias);
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float row[kPanel];
    store(row, acc0[i] + load(bias));
    if constexpr (kVecs > 1) store(row + kLanes, acc1[i] + load(bias + kLanes));
    std::copy(row, row + width, p.y + (m0 + i) * p.n + col);
  }
}

template <int MR>
void micro_tail(const Problem& p, int64_t m0, int64_t rows, int64_t panel, Ahead ahead) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_tail<MR - 1>(p, m0, rows, panel, ahead);
  }
  micro<MR>(p, m0, panel, ahead);
}

// Rows [m0, m0 + MR) of y, columns of panels p and p + 1 (both exist), one-vector panels only.
template <int MR>
void micro_wide(const Problem& p, int64_t m0, int64_t panel, Ahead ahead) {
  const int64_t k = p.k;
  const float* w0 = p.w + panel * k * kPanel;
  const float* w1 = w0 + k * kPanel;
  const float* x = p.x + m0 * k;
  vec acc0[MR], acc1[MR];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = vec{};
  for (int64_t t = 0; t < k; ++t, x += MR) {
    __builtin_prefetch(w0 + (t + kAhead) * kPanel);
    __builtin_prefetch(w1 + (t + kAhead) * kPanel);
    if (ahead.base != nullptr) __builtin_prefetch(ahead.base + ((t * ahead.step) >> 16), 0, 2);
    const vec a = load(w0 + t * kPanel), b = load(w1 + t * kPanel);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const float xi = x[i];
      acc0[i] += a * xi;
      acc1[i] += b * xi;
    }
  }
  const int64_t col = panel * kPanel, width = std::min(kPanel, p.n - col - kPanel);
  float bias[2 * kPanel] = {};
  if (p.bias != nullptr) std::copy(p.bias + col, p.bias + col + kPanel + width, bias);
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float* out = p.y + (m0 + i) * p.n + col;
    store(out, acc0[i] + load(bias));
    float row[kPanel];
    store(row, acc1[i] + load(bias + kPanel));
    std::copy(row, row + width, out + kPanel);
  }
}

template <int MR>
void micro_wide_tail(const Problem& p, int64_t m0, int64_t rows, int64_t panel, Ahead ahead) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_wide_tail<MR - 1>(p, m0, rows, panel, ahead);
  }
  if constexpr (MR > 0) micro_wide<MR>(p, m0, panel, ahead);
}

struct Tile {
  int64_t m0, rows;
};

// Chunks of equal height, each cut into tiles of equal height. Equal chunks: 195 rows (a prompt
// and a decode batch) as 98 + 97, not 192 + 3, whose second pass over W would stream all of it
// from memory for 3 rows. Equal tiles: 30 rows as 15 + 15, not 28 + 2, whose short tile would
// re-read the panel for few FMAs per weight load.
std::vector<std::vector<Tile>> tiling(int64_t m, int64_t max_rows) {
  const int64_t chunks = (m + kChunk - 1) / kChunk, chunk = (m + chunks - 1) / chunks;
  std::vector<std::vector<Tile>> out;
  for (int64_t c0 = 0; c0 < m; c0 += chunk) {
    const int64_t height = std::min(m, c0 + chunk) - c0, tiles = (height + max_rows - 1) / max_rows;
    const int64_t base = height / tiles, taller = height % tiles;
    std::vector<Tile>& row = out.emplace_back();
    for (int64_t tile = 0, m0 = c0; tile < tiles; ++tile) {
      row.push_back({m0, base + (tile < taller ? 1 : 0)});
      m0 += row.back().rows;
    }
  }
  return out;
}

// x [M, K] (row stride ldx) into the tiles' [K][rows] layout, in parallel over (tile, run of k).
void pack_x(const float* x, int64_t ldx, int64_t k, const std::vector<std::vector<Tile>>& chunks,
            float* out) {
  std::vector<Tile> tiles;
  for (const auto& chunk : chunks) tiles.insert(tiles.end(), chunk.begin(), chunk.end());
  constexpr int64_t kRun = 128;
  const int64_t runs = (k + kRun - 1) / kRun;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()) * runs, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Tile& tile = tiles[u / runs];
      const int64_t t0 = (u % runs) * kRun, t1 = std::min(k, t0 + kRun);
      float* dst = out + tile.m0 * k;
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < tile.rows; ++i) dst[t * tile.rows + i] = x[(tile.m0 + i) * ldx + t];
    }
  });
}

// `wide`: tiles of at most kWideMR rows, run over pairs of panels (a last odd panel alone).
void run(const Problem& p, const std::vector<std::vector<Tile>>& chunks, bool wide) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel, step = wide ? 2 : 1;
  const int64_t blocks = (panels + step - 1) / step;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  // Tasks of a few consecutive panels, about 8 per thread, taken first come first served: on two
  // cores the router and the clients preempt one of the threads now and then, and with a fixed
  // split the other would then wait at the end of every op. Runs of panels keep each task a
  // linear stream through W; chunk-major order keeps the threads on the same rows of x (in L2).
  const int64_t per_task = std::max<int64_t>(1, blocks / (8 * threads));
  const int64_t groups = (blocks + per_task - 1) / per_task;
  const int64_t tasks = static_cast<int64_t>(chunks.size()) * groups;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < tasks;
         task = next.fetch_add(1, std::memory_order_relaxed)) {
      const std::vector<Tile>& tiles = chunks[task / groups];
      const int64_t b0 = (task % groups) * per_task, b1 = std::min(blocks, b0 + per_task);
      for (int64_t block = b0; block < b1; ++block) {
        const int64_t panel = block * step;
        // While this block's tiles after the first re-read it from L2, memory would idle: each
        // tile asks for its share of the block kPrefetchBlocks on, so the stream never stops.
        // Only the first chunk's weights come from memory; a single tile streams its own block.
        const int64_t ahead_panel = panel + kPrefetchBlocks * step;
        const int64_t ahead_span = task < groups && tiles.size() > 1 && ahead_panel < panels
                                       ? std::min(step, panels - ahead_panel) * p.k * kPanel * 4
                                       : 0;
        const int64_t share = ahead_span / static_cast<int64_t>(tiles.size());
        const char* ahead_base =
            share > 0 ? reinterpret_cast<const char*>(p.w + ahead_panel * p.k * kPanel) : nullptr;
        for (size_t i = 0; i < tiles.size(); ++i) {
          const Tile& tile = tiles[i];
          const Ahead ahead{share > 0 ? ahead_base + i * share : nullptr, (share << 16) / p.k};
          if (wide && panel + 1 < panels)
            micro_wide_tail<kWideMR>(p, tile.m0, tile.rows, panel, ahead);
          else
            micro_tail<kMaxMR>(p, tile.m0, tile.rows, panel, ahead);
        }
      }
    }
  });
}

}  // namespace

// The operations themselves, also called directly by decode_layer.cpp (kernels.h).
namespace tgserve_kernels {

int64_t panel_width() {
  return kPanel;
}

int64_t amx_min_rows() {
  return amx_available() ? kAmxMinRows : 0;
}

// [N, K] -> [ceil(N / kPanel), K, kPanel], zero-padded past N.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be [N, K]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_cpu(), "CPU float32 weight only");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, k, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t panel = p0; panel < p1; ++panel) {
      float* out = dst + panel * k * kPanel;
      const int64_t rows = std::min(kPanel, n - panel * kPanel);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = src + (panel * kPanel + r) * k;
        for (int64_t t = 0; t < k; ++t) out[t * kPanel + r] = row[t];
      }
    }
  });
  return packed;
}

at::Tensor packed_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.is_cpu(), "x must be CPU float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "packed must come from pack_linear_weight on this machine (panel width ", kPanel,
              ")");
  TORCH_CHECK(n > 0 && (n + kPanel - 1) / kPanel == packed.size(0), "n disagrees with packed");
  TORCH_CHECK(x_in.size(1) == packed.size(1), "x and weight disagree on K");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [N]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_cpu(), "bias must be CPU float32");
    b = bias->contiguous();
  }
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  if (m >= kAmxMinRows &&
      amx_linear(x.data_ptr<float>(), x.stride(0), m, k, packed.data_ptr<float>(), n,
                 b.has_value() ? b->data_ptr<float>() : nullptr, y.data_ptr<float>()))
    return y;
  const bool wide = (m > 1 && m <= kWideMR) || m >= kWideMinRows;  // kWideMR is 0 on AVX2
  const auto chunks = tiling(m, wide ? kWideMR : kMaxMR);
  // One row is its own [K][1] tile: a decode step at batch 1 skips the copy.
  at::Tensor tiles;
  const float* xt = x.data_ptr<float>();
  if (m > 1) {
    tiles = at::empty({m, k}, x.options());
    pack_x(xt, x.stride(0), k, chunks, tiles.data_ptr<float>());
    xt = tiles.data_ptr<float>();
  }
  const Problem p{xt,
                  packed.data_ptr<float>(),
                  b.has_value() ? b->data_ptr<float>() : nullptr,
                  y.data_ptr<float>(),
                  m,
                  n,
                  k};
  run(p, chunks, wide);
  return y;
}

// Rows `ids` of the original [N, K] weight, read back from the panels (a tied embedding table
// shares the LM head's packed weight instead of keeping a second copy).
at::Tensor packed_rows(const at::Tensor& ids_in, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(ids_in.scalar_type() == at::kLong && ids_in.dim() == 1, "ids must be [T] int64");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "packed must come from pack_linear_weight");
  const at::Tensor ids = ids_in.contiguous();
  const int64_t t = ids.size(0), k = packed.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "index ", ip[i], " out of range [0, ", n, ")");
  at::Tensor out = at::empty({t, k}, packed.options());
  const float* src = packed.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* panel = src + (ip[r] / kPanel) * k * kPanel + ip[r] % kPanel;
      for (int64_t j = 0; j < k; ++j) dst[r * k + j] = panel[j * kPanel];
    }
  });
  return out;
}

}  // namespace tgserve_kernels

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def("linear_panel_width() -> int", &tgserve_kernels::panel_width);
  m.def("linear_amx_min_rows() -> int", &tgserve_kernels::amx_min_rows);
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("packed_rows(Tensor ids, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("pack_linear_weight", &tgserve_kernels::pack_linear_weight);
  m.impl("packed_linear", &tgserve_kernels::packed_linear);
  m.impl("packed_rows", &tgserve_kernels::packed_rows);
}

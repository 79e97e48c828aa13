// y = x · Wᵀ (+ bias) on Intel's AMX tiles, to float32 accuracy, for the packed linear's larger
// batches (a prefill, a decode batch of many rows): the same fp32 panels, no second copy of W.
//
// AMX multiplies bfloat16 (8 significant bits) into float32 sums, 16 times the FMA work per cycle
// of AVX-512. A float32 is exactly the sum of three bfloat16 pieces, hi + mid + lo, each cut from
// what the ones before left (truncation leaves an exact remainder), so x·w is the sum of nine
// piece products, each exact in the float32 accumulators. The six down to 2^-16 of x·w are kept
// (hi·hi, hi·mid, mid·hi, hi·lo, mid·mid, lo·hi); the three dropped are below 2^-24, float32's own
// rounding, so against float64 the result is as close as the AVX-512 float32 kernel's, at up to
// 16/6 of its speed (docs/design/amx-linear.md). Fewer pieces (bf16x3, 2^-16) are PyTorch's "high"
// float32 precision; tgserve keeps "highest", so greedy tokens and log-probabilities match
// transformers as before.
//
// Layout: x is cut into tiles of 16 rows x 32 k per piece, [row tile][k block][piece][16][32],
// once per call. W's panels ([K][16] floats, packed_linear.cpp) are cut per pair of panels into
// VNNI tiles, [k block][piece][16 pairs of k][16 columns][2], by the thread that multiplies
// every row tile of the chunk by them, from L2, and converts the next pair in between (the
// vector units and the memory stream then work while the tile unit multiplies; see
// docs/design/amx-linear.md). A 32 x 32 block of y is four accumulator
// tiles; per k block each A piece is loaded once and met by the B pieces its terms need (18 tile
// loads for 24 multiplies, not 24 for 24).

#include "amx_linear.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace {

constexpr int kPieces = 3;
constexpr int64_t kPanel = 16;      // packed_linear.cpp's AVX-512 panel width
constexpr int64_t kBlockK = 32;     // k per tile: 16 rows of 64 bytes, pairs of bfloat16
constexpr int64_t kTile = 16 * 32;  // bfloat16 per tile
// Rows of x per chunk: its pieces (rows x K x 3 x 2 bytes) stay in L2 under every panel pair.
constexpr int64_t kChunkBytes = 1 << 20;
constexpr int64_t kCutAhead = 1024;

// Tiles are loaded a 64-byte row at a time: rows that straddle two cache lines made every load
// cost three times as much (a third of the multiplies' pace, from L1).
struct FreeAligned {
  void operator()(uint16_t* p) const { std::free(p); }
};
using TileBuffer = std::unique_ptr<uint16_t[], FreeAligned>;

TileBuffer tile_buffer(int64_t count) {
  const size_t bytes = (static_cast<size_t>(count) * sizeof(uint16_t) + 63) / 64 * 64;
  return TileBuffer(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the tile registers' state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_tiles() {
  constexpr int kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.bytes_per_row[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

// The three bfloat16 pieces of 16 floats, each as the high halves of 16 words (low halves zero).
inline void split(__m512 v, __m512i (&piece)[kPieces]) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 3
  for (int i = 0; i < kPieces; ++i) {
    piece[i] = _mm512_and_si512(_mm512_castps_si512(v), high);
    v = _mm512_sub_ps(v, _mm512_castsi512_ps(piece[i]));
  }
}

inline __mmask16 lanes_below(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

// Rows [r0, r0 + 16) of x (zero past m or k) into one row tile: [block][piece][16][32].
void cut_x_tile(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t r0, int64_t blocks,
                uint16_t* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kBlockK;
    const __mmask16 lo = lanes_below(k - c0), hi = lanes_below(k - c0 - 16);
    for (int64_t r = 0; r < 16; ++r) {
      __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
      if (r0 + r < m) {
        const float* row = x + (r0 + r) * ldx + c0;
        v0 = _mm512_maskz_loadu_ps(lo, row);
        v1 = _mm512_maskz_loadu_ps(hi, row + 16);
      }
      __m512i p0[kPieces], p1[kPieces];
      split(v0, p0);
      split(v1, p1);
      for (int q = 0; q < kPieces; ++q) {
        uint16_t* dst = out + (b * kPieces + q) * kTile + r * 32;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(p0[q], 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(p1[q], 16)));
      }
    }
  }
}

// Block b (32 k) of one fp32 panel [K][16] (zero past k) into VNNI tiles [piece][16 k pairs][16
// columns x 2]: word j of pair row r holds column j's weights at k = 2r (low half), 2r + 1 (high).
// The panel is read from memory once per call: a prefetch kCutAhead bytes on keeps more of its
// lines in flight than the hardware's own stream did (1 KiB ahead into L1 measured best:
// docs/design/amx-linear.md).
void cut_panel_block(const float* panel, int64_t k, int64_t b, uint16_t* out) {
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t t = b * kBlockK + 2 * r;
    const char* ahead = reinterpret_cast<const char*>(panel + t * kPanel) + kCutAhead;
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    const __m512 v0 = t < k ? _mm512_loadu_ps(panel + t * kPanel) : _mm512_setzero_ps();
    const __m512 v1 = t + 1 < k ? _mm512_loadu_ps(panel + (t + 1) * kPanel) : _mm512_setzero_ps();
    __m512i p0[kPieces], p1[kPieces];
    split(v0, p0);
    split(v1, p1);
    for (int q = 0; q < kPieces; ++q)
      _mm512_storeu_si512(out + q * kTile + r * 32,
                          _mm512_or_si512(_mm512_srli_epi32(p0[q], 16), p1[q]));
  }
}

// Accumulators 0-3: y rows (a0, a1) x columns (b0, b1). Terms grouped by x's piece, so each x
// tile is loaded once per block: hi meets hi, mid, lo; mid meets hi, mid; lo meets hi.
inline void multiply_block(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0,
                           const uint16_t* b1) {
#pragma GCC unroll 3
  for (int pa = 0; pa < kPieces; ++pa) {
    _tile_loadd(4, a0 + pa * kTile, 64);
    _tile_loadd(5, a1 + pa * kTile, 64);
#pragma GCC unroll 3
    for (int pb = 0; pb < kPieces - pa; ++pb) {
      _tile_loadd(6, b0 + pb * kTile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, b1 + pb * kTile, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Where the accumulators go.
struct Output {
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t m, n;
};

// The 32 x 32 block of y at rows m0, columns of panels (p, p + 1), from the four accumulators:
// straight into y where it all lies inside, through a scratch block at the edges; bias added.
void store_block(const Output& target, int64_t m0, int64_t panel, float (&scratch)[32][32]) {
  const int64_t col = panel * kPanel;
  const int64_t rows = std::min<int64_t>(32, target.m - m0);
  const int64_t cols = std::min<int64_t>(32, target.n - col);
  float* out = target.y + m0 * target.n + col;
  const bool inside = rows == 32 && cols == 32;
  float* dst = inside ? out : &scratch[0][0];
  const int64_t ld = inside ? target.n : 32;
  _tile_stored(0, dst, ld * 4);
  _tile_stored(1, dst + 16, ld * 4);
  _tile_stored(2, dst + 16 * ld, ld * 4);
  _tile_stored(3, dst + 16 * ld + 16, ld * 4);
  if (inside && target.bias == nullptr) return;
  const __mmask16 lo = lanes_below(cols), hi = lanes_below(cols - 16);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 bias0 = target.bias ? _mm512_maskz_loadu_ps(lo, target.bias + col) : zero;
  const __m512 bias1 = target.bias ? _mm512_maskz_loadu_ps(hi, target.bias + col + 16) : zero;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = dst + r * ld;
    float* row = out + r * target.n;
    _mm512_mask_storeu_ps(row, lo, _mm512_add_ps(_mm512_maskz_loadu_ps(lo, src), bias0));
    _mm512_mask_storeu_ps(row + 16, hi, _mm512_add_ps(_mm512_maskz_loadu_ps(hi, src + 16), bias1));
  }
}

}  // namespace

namespace tgserve_kernels {

bool amx_available() {
  static const bool ready = request_tiles();
  return ready;
}

bool amx_linear(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n,
                const float* bias, float* y) {
  if (!amx_available()) return false;
  const int64_t blocks = (k + kBlockK - 1) / kBlockK;
  const int64_t row_tiles = (m + 31) / 32 * 2;  // whole pairs: a pair is one multiply's rows
  const int64_t tile_stride = blocks * kPieces * kTile;
  const TileBuffer xt = tile_buffer(row_tiles * tile_stride);
  at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      cut_x_tile(x, ldx, m, k, t * 16, blocks, xt.get() + t * tile_stride);
  });
  const int64_t panels = (n + kPanel - 1) / kPanel, pairs = (panels + 1) / 2;
  const Output target{bias, y, m, n};
  // Chunks of row-tile pairs whose pieces fit kChunkBytes; tasks (chunk, run of panel pairs)
  // taken first come first served, as in packed_linear.cpp.
  const int64_t pair_bytes = 2 * tile_stride * 2;
  const int64_t chunk_pairs = std::max<int64_t>(1, kChunkBytes / pair_bytes);
  const int64_t row_pairs = row_tiles / 2, chunks = (row_pairs + chunk_pairs - 1) / chunk_pairs;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs));
  const int64_t per_task = std::max<int64_t>(1, pairs / (8 * threads));
  const int64_t groups = (pairs + per_task - 1) / per_task, tasks = chunks * groups;
  std::atomic<int64_t> next{0};
  const int64_t units = 2 * blocks;  // conversion units of a pair: (panel of the pair, k block)
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    configure_tiles();
    // Two pairs' tiles: the pair being multiplied and the next, converted meanwhile.
    const TileBuffer buffer = tile_buffer(4 * tile_stride);
    uint16_t* wt[2] = {buffer.get(), buffer.get() + 2 * tile_stride};
    alignas(64) float scratch[32][32];
    auto cut = [&](int64_t pair, int64_t unit, uint16_t* out) {
      const int64_t q = unit / blocks, b = unit % blocks, panel = 2 * pair + q;
      uint16_t* dst = out + q * tile_stride + b * kPieces * kTile;
      if (panel < panels)
        cut_panel_block(packed + panel * k * kPanel, k, b, dst);
      else
        std::fill(dst, dst + kPieces * kTile, uint16_t{0});
    };
    // Work items in the order this thread meets them: the pairs of a task, then the next task's.
    struct Item {
      int64_t task, pair;
    };
    auto first_of = [&](int64_t task) {
      return Item{task, task < tasks ? (task % groups) * per_task : 0};
    };
    auto after = [&](Item item) {
      const int64_t end = std::min(pairs, (item.task % groups + 1) * per_task);
      return item.pair + 1 < end ? Item{item.task, item.pair + 1}
                                 : first_of(next.fetch_add(1, std::memory_order_relaxed));
    };
    Item item = first_of(next.fetch_add(1, std::memory_order_relaxed));
    if (item.task < tasks)
      for (int64_t u = 0; u < units; ++u) cut(item.pair, u, wt[0]);
    for (int cur = 0; item.task < tasks; cur ^= 1) {
      const Item following = after(item);
      const bool ahead = following.task < tasks;
      const int64_t c = item.task / groups;
      const int64_t rp0 = c * chunk_pairs, rp1 = std::min(row_pairs, rp0 + chunk_pairs);
      const uint16_t* w0 = wt[cur];
      // The next pair's conversion is spread over this pair's multiplies: the vector units and
      // the loads from memory then work while the tile unit multiplies (one after the other,
      // the conversion, bound by the weights' stream from memory, took as long as the multiplies
      // at 64 rows).
      const int64_t steps = (rp1 - rp0) * blocks;
      int64_t step = 0, done = 0;
      for (int64_t rp = rp0; rp < rp1; ++rp) {
        const uint16_t* a0 = xt.get() + 2 * rp * tile_stride;
        const uint16_t* a1 = a0 + tile_stride;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t b = 0; b < blocks; ++b, ++step) {
          if (ahead)
            for (const int64_t target = (step + 1) * units / steps; done < target; ++done)
              cut(following.pair, done, wt[cur ^ 1]);
          const int64_t off = b * kPieces * kTile;
          multiply_block(a0 + off, a1 + off, w0 + off, w0 + tile_stride + off);
        }
        store_block(target, rp * 32, 2 * item.pair, scratch);
      }
      if (ahead)
        for (; done < units; ++done) cut(following.pair, done, wt[cur ^ 1]);
      item = following;
    }
    _tile_release();
  });
  return true;
}

}  // namespace tgserve_kernels

#else  // no AMX in this build

namespace tgserve_kernels {

bool amx_available() {
  return false;
}

bool amx_linear(const float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                float*) {
  return false;
}

}  // namespace tgserve_kernels

#endif

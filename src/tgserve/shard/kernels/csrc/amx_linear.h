// The packed linear on AMX tiles (amx_linear.cpp); both false where the build or the CPU lacks AMX.
#pragma once

#include <cstdint>

namespace tgserve_kernels {

// Whether this process may use the tile registers (asked of Linux on the first call).
bool amx_available();

// y [m, n] = x [m, k] (row stride ldx) · Wᵀ (+ bias), W as packed_linear.cpp's 16-wide panels;
// false, with y untouched, when AMX is unavailable.
bool amx_linear(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n,
                const float* bias, float* y);

}  // namespace tgserve_kernels

// The CPU operations one translation unit calls in another (the registered torch ops, as C++).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace tgserve_kernels {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rotary_store_kv(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                     int64_t heads, int64_t kv_heads, int64_t dim);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_index, const at::Tensor& lengths,
                                  double scale, int64_t window);

}  // namespace tgserve_kernels

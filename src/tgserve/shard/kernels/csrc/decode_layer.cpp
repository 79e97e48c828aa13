// One Llama-shaped decoder layer of a decode step, as a single op.
//
// At batch 1 a layer is a dozen small ops; called one by one from Python each pays a dispatch,
// which adds up to a noticeable share of a step that is otherwise weight streaming
// (docs/design/decode-layer-op.md). Here
// the layer calls the same kernels (kernels.h) in the same order as the Python composition, so
// the results are the same bit for bit; only the trips through Python are gone.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

// (mlp output, residual stream before it is added); residual absent for the first layer.
std::tuple<at::Tensor, at::Tensor> llama_decode_layer(
    const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
    const at::Tensor& input_norm, const at::Tensor& post_norm, double eps, const at::Tensor& qkv,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o,
    const std::optional<at::Tensor>& o_bias, const at::Tensor& gate_up,
    const std::optional<at::Tensor>& gate_up_bias, const at::Tensor& down,
    const std::optional<at::Tensor>& down_bias, int64_t intermediate, const at::Tensor& cos,
    const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
    const at::Tensor& kv_index, const at::Tensor& lengths, int64_t heads, int64_t kv_heads,
    int64_t dim, int64_t window, double scale) {
  namespace k = tgserve_kernels;
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [B, hidden]");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  at::Tensor x, res;
  if (residual.has_value()) {
    std::tie(x, res) = k::add_rms_norm(hidden, *residual, input_norm, eps);
  } else {
    x = k::rms_norm(hidden, input_norm, eps);
    res = hidden;
  }
  at::Tensor fused = k::packed_linear(x, qkv, (heads + 2 * kv_heads) * dim, qkv_bias);
  k::rotary_store_kv(fused, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim);
  const at::Tensor q = fused.narrow(1, 0, heads * dim).view({rows, heads, dim});
  const at::Tensor attended =
      k::paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, scale, window);
  const at::Tensor projected =
      k::packed_linear(attended.view({rows, heads * dim}), o, width, o_bias);
  std::tie(x, res) = k::add_rms_norm(projected, res, post_norm, eps);
  const at::Tensor act = k::silu_mul(k::packed_linear(x, gate_up, 2 * intermediate, gate_up_bias));
  return {k::packed_linear(act, down, width, down_bias), res};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def(
      "llama_decode_layer(Tensor hidden, Tensor? residual, Tensor input_norm, Tensor post_norm, "
      "float eps, Tensor qkv, Tensor? qkv_bias, Tensor o, Tensor? o_bias, Tensor gate_up, "
      "Tensor? gate_up_bias, Tensor down, Tensor? down_bias, int intermediate, Tensor cos, "
      "Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor kv_index, "
      "Tensor lengths, int heads, int kv_heads, int dim, int window, float scale) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("llama_decode_layer", &llama_decode_layer);
}

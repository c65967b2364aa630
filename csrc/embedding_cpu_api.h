// Declarations of the torch-facing entry points bound in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace sfg {

torch::Tensor embedding_lookup_cpu(torch::Tensor ids, torch::Tensor weight, torch::Tensor offsets,
                                   const std::string& bounds_check);

torch::Tensor embedding_lookup_int8_cpu(torch::Tensor ids, torch::Tensor qweight, torch::Tensor scale_bias,
                                        torch::Tensor offsets, const std::string& bounds_check);

void sparse_row_update_cpu(const std::string& kind, torch::Tensor weight, c10::optional<torch::Tensor> state1,
                           c10::optional<torch::Tensor> state2, torch::Tensor ids, torch::Tensor offsets,
                           torch::Tensor grad_V, double lr, double eps, double beta1, double beta2, int64_t step,
                           const std::string& bounds_check);

torch::Tensor sfg_logits_cpu(torch::Tensor ids, torch::Tensor table, torch::Tensor offsets,
                             c10::optional<torch::Tensor> enc_weight, c10::optional<torch::Tensor> enc_bias,
                             c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                             const std::string& activation, double gamma, bool residual, const std::string& pairs,
                             const std::string& generated_side, bool symmetric, const std::string& bounds_check,
                             int64_t tile, bool bf16_gemm, c10::optional<torch::Tensor> scale_bias);

// Fused SFG interaction on V for training (sfg_interaction_cpu.cpp): {logit, H, T} and {dV, dW_enc, dbias, ddec}.
std::vector<torch::Tensor> sfg_interaction_fwd_cpu(torch::Tensor V, c10::optional<torch::Tensor> enc_weight,
                                                   c10::optional<torch::Tensor> enc_bias,
                                                   c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                                                   const std::string& activation, double gamma, bool residual,
                                                   const std::string& pairs, const std::string& generated_side,
                                                   bool symmetric, int64_t tile, bool bf16_gemm, bool save);

std::vector<torch::Tensor> sfg_interaction_bwd_cpu(torch::Tensor grad, torch::Tensor V, c10::optional<torch::Tensor> H,
                                                   torch::Tensor T, c10::optional<torch::Tensor> enc_weight,
                                                   c10::optional<torch::Tensor> enc_bias,
                                                   c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                                                   const std::string& activation, double gamma, bool residual,
                                                   const std::string& pairs, const std::string& generated_side,
                                                   bool symmetric, int64_t tile, bool bf16_gemm, bool need_v,
                                                   bool need_enc_weight, bool need_enc_bias, bool need_dec);

}  // namespace sfg

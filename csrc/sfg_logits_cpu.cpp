// Fused SFG inference on CPU, one tile of samples at a time:
//   gather V (fp32) -> Z = gamma * act(V @ W_enc^T + b) (+ V) -> logit[b] = sum_{(i,j) in P} (a_i W_ij) . b_j
// Every intermediate lives in a per-thread buffer of tile x (N*D) floats (160 KB at tile 64, N*D 624),
// so it stays in L2 between the GEMM and its epilogue. Tables are fp32, bf16, or int8 row-wise quantised
// (uint8 rows + a float32 (scale, bias) per row, dequantised in the gather: the serving format). bf16_gemm runs the GEMMs on bf16 operands
// (fp32 accumulation, bf16-rounded products, as torch's bf16 matmul) and keeps the rest in fp32. The GEMMs
// call torch's BLAS on the tile (single-threaded inside the parallel region); the decoders are the
// plan's (sfg_plan.h).
#include <cmath>
#include <type_traits>

#include "embedding_cpu_api.h"
#include "glue_common.h"
#include "sfg_plan.h"

namespace sfg {

namespace {

using namespace detail;

// The linear decoders over one tile of m samples (the per-sample loop compiled per ISA).
SFG_HOT void decode_tile(const Plan& p, const float* left, const float* right, int64_t m, float* scratch, float* out) {
  const int64_t width = p.width();
  for (int64_t b = 0; b < m; ++b) out[b] = decode_sample(p, left + b * width, right + b * width, scratch);
}

template <typename Id, typename T>
void run_tiles(const Plan& p, const torch::Tensor& ids, const torch::Tensor& table, const torch::Tensor& offsets,
               const std::vector<int64_t>& sizes, int mode, const float* scale_bias, const torch::Tensor& enc_t,
               const c10::optional<torch::Tensor>& bias, int64_t tile, float* out) {
  const int64_t batch = ids.size(0), n = p.n, dim = p.dim, width = n * dim;
  const int64_t num_tiles = (batch + tile - 1) / tile;
  const Id* id_ptr = ids.data_ptr<Id>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* w = reinterpret_cast<const T*>(table.data_ptr());
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  const bool bf16 = p.bf16_gemm;
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t chunk_cols = p.max_cols;
    std::vector<float> vbuf(tile * width), zbuf(p.encode ? tile * width : 0), tbuf(tile * chunk_cols), row(dim);
    // bf16 staging tiles of the bf16 mode (empty otherwise)
    const auto b16 = torch::TensorOptions().dtype(torch::kBFloat16);
    auto a16 = torch::empty({bf16 ? tile : 0, bf16 ? width : 0}, b16);
    auto o16 = torch::empty({bf16 ? tile : 0, bf16 ? std::max(width, chunk_cols) : 0}, b16);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, b1 = std::min(batch, b0 + tile), m = b1 - b0;
      if constexpr (std::is_same_v<T, uint8_t>)
        cpu::gather_rows_int8(id_ptr, b0, b1, n, off, sizes.data(), mode, w, scale_bias, dim, vbuf.data());
      else
        cpu::gather_rows_f32(id_ptr, b0, b1, n, off, sizes.data(), mode, w, dim, vbuf.data());
      const float* v = vbuf.data();
      const float* z = v;  // no encoder: Z = V (the base model)
      if (p.encode) {
        auto v_tile = torch::from_blob(vbuf.data(), {m, width}, f32);
        auto z_tile = torch::from_blob(zbuf.data(), {m, width}, f32);
        tile_mm(z_tile, v_tile, enc_t, a16, o16, bias);
        encoder_epilogue(p, z_tile, v, m, width);
        z = zbuf.data();
      }
      const float* left = p.symmetric ? z : (p.left_generated ? z : v);
      const float* right = p.symmetric ? z : (p.left_generated ? v : z);
      if (p.kind == kMatrix) {
        auto r_tile = torch::from_blob(const_cast<float*>(right), {m, width}, f32);
        // bf16: the right tile rounded once for all chunks (the encoder GEMM already left V's rounding
        // in a16 when V is the right operand)
        torch::Tensor r16;
        if (bf16) r16 = (p.encode && right == v) ? a16.narrow(0, 0, m).narrow(1, 0, width) : stage_bf16(r_tile, a16);
        std::fill(out + b0, out + b1, 0.f);
        for (const auto& c : p.chunks) {
          auto t_tile = torch::from_blob(tbuf.data(), {m, c.cols}, f32);
          // strided A: the BLAS takes lda
          if (bf16) mm_widened(t_tile, r16.narrow(1, c.k0, c.ks), c.weight, o16, false);
          else at::mm_out(t_tile, r_tile.narrow(1, c.k0, c.ks), c.weight);
          rowdot_rows(left + c.col0, width, tbuf.data(), c.cols, c.cols, m, out + b0, true);
        }
      } else {
        decode_tile(p, left, right, m, row.data(), out + b0);
      }
    }
  });
}

}  // namespace

torch::Tensor sfg_logits_cpu(torch::Tensor ids, torch::Tensor table, torch::Tensor offsets,
                             c10::optional<torch::Tensor> enc_weight, c10::optional<torch::Tensor> enc_bias,
                             c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                             const std::string& activation, double gamma, bool residual, const std::string& pairs,
                             const std::string& generated_side, bool symmetric, const std::string& bounds_check,
                             int64_t tile, bool bf16_gemm, c10::optional<torch::Tensor> scale_bias) {
  const int mode = parse_bounds_mode(bounds_check);
  TORCH_CHECK_VALUE(tile >= 1, sfg::msg("tile must be >= 1, got ", tile));
  // Plain tensors: the tile GEMMs write out= buffers from worker threads, which do not inherit the
  // caller's no-grad mode, and autograd refuses out= when an input requires grad.
  table = table.detach();
  for (auto* t : {&enc_weight, &enc_bias, &dec_weight})
    if (t->has_value()) *t = (*t)->detach();
  TORCH_CHECK_VALUE(table.dim() == 2 && table.device().is_cpu(),
                    sfg::msg("table must be a CPU [V, D] tensor, got ", table.sizes()));
  const bool int8 = table.scalar_type() == torch::kUInt8;
  TORCH_CHECK_TYPE(table.scalar_type() == torch::kFloat || table.scalar_type() == torch::kBFloat16 || int8,
                   sfg::msg("table must be float32, bfloat16 or uint8 (int8 row-wise quantised) for the cpu "
                            "backend, got ", table.scalar_type()));
  TORCH_CHECK_VALUE(!int8 || scale_bias.has_value(),
                    "a uint8 (int8 row-wise quantised) table needs its scale_bias [V, 2]");
  TORCH_CHECK_VALUE(int8 || !scale_bias.has_value(), "scale_bias is only for a uint8 (int8 row-wise quantised) table");
  if (int8) {
    check_scale_bias(*scale_bias, table.size(0));
    scale_bias = scale_bias->detach().contiguous();
  }
  const float* sb = int8 ? scale_bias->data_ptr<float>() : nullptr;
  check_ids_offsets(ids, offsets, table.size(0));
  const int64_t n = ids.size(1), dim = table.size(1), width = n * dim;
  tile = tile_for_batch(tile, ids.size(0));  // see sfg_plan.h: at most B, and two tiles or more for B >= 2
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  table = table.contiguous();

  const EncoderOperands enc = encoder_operands(enc_weight, enc_bias, width, bf16_gemm);
  const Plan p = make_plan(kind, activation, gamma, residual, pairs, generated_side, symmetric, n, dim,
                           enc_weight.has_value(), dec_weight, bf16_gemm);
  const auto sizes = field_sizes(offsets, table.size(0));
  check_bounds(ids, sizes, mode);
  auto out = torch::empty({ids.size(0)}, torch::kFloat);
  const bool i64 = ids.scalar_type() == torch::kInt64;
  float* o = out.data_ptr<float>();
  const auto& wt = enc.weight_t;
  const auto& eb = enc.bias;
  if (table.scalar_type() == torch::kFloat) {
    if (i64) run_tiles<int64_t, float>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
    else run_tiles<int32_t, float>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
  } else if (int8) {
    if (i64) run_tiles<int64_t, uint8_t>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
    else run_tiles<int32_t, uint8_t>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
  } else {
    if (i64) run_tiles<int64_t, uint16_t>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
    else run_tiles<int32_t, uint16_t>(p, ids, table, offsets, sizes, mode, sb, wt, eb, tile, o);
  }
  return out;
}

}  // namespace sfg

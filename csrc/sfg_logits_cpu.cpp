// Fused SFG inference on CPU, one tile of samples at a time:
//   gather V (fp32) -> Z = gamma * act(V @ W_enc^T + b) (+ V) -> logit[b] = sum_{(i,j) in P} (a_i W_ij) . b_j
// Every intermediate lives in a per-thread buffer of tile x (N*D) floats (160 KB at tile 64, N*D 624),
// so it stays in L2 between the GEMM and its epilogue. bf16_gemm runs the GEMMs on bf16 operands
// (fp32 accumulation, bf16-rounded products, as torch's bf16 matmul) and keeps the rest in fp32. The GEMMs call torch's BLAS on the tile
// (single-threaded inside the parallel region); the decoders are small per-sample loops:
//   identity:        t_i = sum_{j: (i,j) in P} b_j   (prefix/suffix sums, O(N D) per sample)
//   scalar / vector: t_i = sum_j R_ij b_j  (CSR over P; R_ij a scalar or a D-vector)
//   matrix:          T = b @ Wbig^T, one tile GEMM (Wbig the masked [(i,d),(j,e)] block matrix)
// and logit = sum_i a_i . t_i.
// The matrix decoder's block matrix is zero outside P: for the FM-family pairs i < j, column block
// i of Wbig^T has non-zero rows only for fields j > i. The decoder GEMM therefore runs as a few
// column chunks, each over only the K range its fields pair with (about 55% of the dense FLOPs
// at N = 39 with 8 chunks); pair sets without such structure keep one dense GEMM.
#include <cmath>

#include "embedding_cpu_api.h"
#include "glue_common.h"

namespace sfg {

namespace {

enum Kind { kIdentity, kScalar, kVector, kMatrix };
enum Act { kActIdentity, kActRelu, kActTanh, kActSigmoid, kActSilu, kActGelu };

bool in_pairs(int pairs, int64_t i, int64_t j) {
  if (pairs == 0) return i < j;   // upper
  if (pairs == 2) return i != j;  // offdiag
  return true;                    // all
}

struct Plan {
  int kind = kIdentity, act = kActRelu, pairs = 0;
  int64_t n = 0, dim = 0;
  float gamma = 1.f;
  bool residual = false, encode = false, symmetric = false, left_generated = true;
  bool bf16_gemm = false;  // the GEMMs on bf16 operands (fp32 accumulation), everything else in fp32
  // Matrix decoder: T[:, col0 : col0 + cols] = right[:, k0 : k0 + ks] @ weight ([ks, cols]).
  struct Chunk {
    int64_t col0, cols, k0, ks;
    torch::Tensor weight;
  };
  std::vector<Chunk> chunks;
  // CSR of P for scalar / vector decoders: row i's pairs are col[row_ptr[i] .. row_ptr[i+1]).
  std::vector<int64_t> row_ptr, col;
  std::vector<float> weights;  // one per pair (scalar) or D per pair (vector), in CSR order
};

// sum_k a[k] * b[k] over one row; the simd reduction splits the sum into vector lanes.
inline float row_dot(const float* a, const float* b, int64_t count) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < count; ++k) acc += a[k] * b[k];
  return acc;
}

// Per-sample decode of the linear kinds. `left` and `right` point at one sample's [N, D] rows.
float decode_sample(const Plan& p, const float* left, const float* right, float* t) {
  const int64_t n = p.n, dim = p.dim;
  float acc = 0.f;
  if (p.kind == kIdentity) {
    // t_i for upper = suffix sum of b_{j>i}; all = total; offdiag = total - b_i.
    if (p.pairs == 0) {
      std::fill(t, t + dim, 0.f);
      for (int64_t i = n - 1; i >= 0; --i) {
        acc += row_dot(left + i * dim, t, dim);
        const float* b = right + i * dim;
        for (int64_t d = 0; d < dim; ++d) t[d] += b[d];
      }
      return acc;
    }
    std::fill(t, t + dim, 0.f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < dim; ++d) t[d] += right[j * dim + d];
    for (int64_t i = 0; i < n; ++i) {
      const float* a = left + i * dim;
      const float* b = right + i * dim;
      if (p.pairs == 1)
        for (int64_t d = 0; d < dim; ++d) acc += a[d] * t[d];
      else
        for (int64_t d = 0; d < dim; ++d) acc += a[d] * (t[d] - b[d]);
    }
    return acc;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1];
    if (begin == end) continue;
    std::fill(t, t + dim, 0.f);
    if (p.kind == kScalar) {
      for (int64_t k = begin; k < end; ++k) {
        const float w = p.weights[k];
        const float* b = right + p.col[k] * dim;
        for (int64_t d = 0; d < dim; ++d) t[d] += w * b[d];
      }
    } else {
      for (int64_t k = begin; k < end; ++k) {
        const float* u = p.weights.data() + k * dim;
        const float* b = right + p.col[k] * dim;
        for (int64_t d = 0; d < dim; ++d) t[d] += u[d] * b[d];
      }
    }
    acc += row_dot(left + i * dim, t, dim);
  }
  return acc;
}

// gamma * act(h) (+ v), in place on one tile of m rows of `width` floats. The activations use
// ATen's vectorised in-place ops on the (cache-resident) tile: a scalar max() loop here compiles
// to a branch that mispredicts on half the elements and cost more than the tanh.
void encoder_epilogue(const Plan& p, torch::Tensor& z_tile, const float* v, int64_t m, int64_t width) {
  switch (p.act) {
    case kActRelu: z_tile.relu_(); break;
    case kActTanh: z_tile.tanh_(); break;
    case kActSigmoid: z_tile.sigmoid_(); break;
    case kActSilu: at::silu_(z_tile); break;
    case kActGelu: at::gelu_(z_tile); break;
    default: break;
  }
  const float g = p.gamma;
  float* z = z_tile.data_ptr<float>();
  const int64_t count = m * width;
  if (g != 1.f) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] *= g;
  }
  if (p.residual) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] += v[k];
  }
}

// A GEMM of the tile: out (fp32) = a (fp32 tile) @ w, where w is fp32, or bf16 for the bf16 mode.
// In bf16 mode the tile is rounded to bf16 into `a16`, the product is formed by the BLAS's bf16
// path (fp32 accumulation, bf16 result, as torch's own bf16 matmul) into `out16`, then widened.
inline void tile_mm(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& w, torch::Tensor& a16,
                    torch::Tensor& out16) {
  if (w.scalar_type() != torch::kBFloat16) {
    at::mm_out(out, a, w);
    return;
  }
  auto a_half = a16.narrow(0, 0, a.size(0)).narrow(1, 0, a.size(1));
  auto o_half = out16.narrow(0, 0, out.size(0)).narrow(1, 0, out.size(1));
  a_half.copy_(a);
  at::mm_out(o_half, a_half, w);
  out.copy_(o_half);
}

template <typename Id, typename T>
void run_tiles(const Plan& p, const torch::Tensor& ids, const torch::Tensor& table, const torch::Tensor& offsets,
               const std::vector<int64_t>& sizes, int mode, const torch::Tensor& enc_t,
               const c10::optional<torch::Tensor>& bias, int64_t tile, float* out) {
  const int64_t batch = ids.size(0), n = p.n, dim = p.dim, width = n * dim;
  const int64_t num_tiles = (batch + tile - 1) / tile;
  const Id* id_ptr = ids.data_ptr<Id>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* w = reinterpret_cast<const T*>(table.data_ptr());
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  const bool bf16 = p.bf16_gemm;
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    int64_t chunk_cols = 0;
    for (const auto& c : p.chunks) chunk_cols = std::max(chunk_cols, c.cols);
    std::vector<float> vbuf(tile * width), zbuf(p.encode ? tile * width : 0), tbuf(tile * chunk_cols), row(dim);
    // bf16 staging tiles of the bf16 mode (empty otherwise)
    const auto b16 = torch::TensorOptions().dtype(torch::kBFloat16);
    auto a16 = torch::empty({bf16 ? tile : 0, bf16 ? width : 0}, b16);
    auto o16 = torch::empty({bf16 ? tile : 0, bf16 ? std::max(width, chunk_cols) : 0}, b16);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, b1 = std::min(batch, b0 + tile), m = b1 - b0;
      cpu::gather_rows_f32(id_ptr, b0, b1, n, off, sizes.data(), mode, w, dim, vbuf.data());
      const float* v = vbuf.data();
      const float* z = v;  // no encoder: Z = V (the base model)
      if (p.encode) {
        auto v_tile = torch::from_blob(vbuf.data(), {m, width}, f32);
        auto z_tile = torch::from_blob(zbuf.data(), {m, width}, f32);
        if (bf16) {
          tile_mm(z_tile, v_tile, enc_t, a16, o16);
          if (bias.has_value()) z_tile.add_(*bias);
        } else if (bias.has_value()) {
          at::addmm_out(z_tile, *bias, v_tile, enc_t);
        } else {
          at::mm_out(z_tile, v_tile, enc_t);
        }
        encoder_epilogue(p, z_tile, v, m, width);
        z = zbuf.data();
      }
      const float* left = p.symmetric ? z : (p.left_generated ? z : v);
      const float* right = p.symmetric ? z : (p.left_generated ? v : z);
      if (p.kind == kMatrix) {
        auto r_tile = torch::from_blob(const_cast<float*>(right), {m, width}, f32);
        std::fill(out + b0, out + b1, 0.f);
        for (const auto& c : p.chunks) {
          auto t_tile = torch::from_blob(tbuf.data(), {m, c.cols}, f32);
          // strided A: the BLAS takes lda
          tile_mm(t_tile, r_tile.narrow(1, c.k0, c.ks), c.weight, a16, o16);
          for (int64_t b = 0; b < m; ++b)
            out[b0 + b] += row_dot(left + b * width + c.col0, tbuf.data() + b * c.cols, c.cols);
        }
      } else {
        for (int64_t b = 0; b < m; ++b) out[b0 + b] = decode_sample(p, left + b * width, right + b * width, row.data());
      }
    }
  });
}

int parse(const std::string& name, const std::string& value, std::initializer_list<const char*> choices) {
  int k = 0;
  std::string listed;
  for (const char* c : choices) {
    if (value == c) return k;
    listed += (k ? ", '" : "'") + std::string(c) + "'";
    ++k;
  }
  TORCH_CHECK_VALUE(false, sfg::msg(name, " must be one of (", listed, "), got '", value, "'"));
  return -1;
}

}  // namespace

torch::Tensor sfg_logits_cpu(torch::Tensor ids, torch::Tensor table, torch::Tensor offsets,
                             c10::optional<torch::Tensor> enc_weight, c10::optional<torch::Tensor> enc_bias,
                             c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                             const std::string& activation, double gamma, bool residual, const std::string& pairs,
                             const std::string& generated_side, bool symmetric, const std::string& bounds_check,
                             int64_t tile, bool bf16_gemm) {
  const int mode = parse_bounds_mode(bounds_check);
  Plan p;
  p.kind = parse("kind", kind, {"identity", "scalar", "vector", "matrix"});
  p.act = parse("activation", activation, {"identity", "relu", "tanh", "sigmoid", "silu", "gelu"});
  p.pairs = parse("pairs", pairs, {"upper", "all", "offdiag"});
  p.left_generated = parse("generated_side", generated_side, {"left", "right"}) == 0;
  p.symmetric = symmetric;
  p.residual = residual;
  p.gamma = static_cast<float>(gamma);
  p.bf16_gemm = bf16_gemm;
  TORCH_CHECK_VALUE(tile >= 1, sfg::msg("tile must be >= 1, got ", tile));
  TORCH_CHECK_VALUE(table.dim() == 2 && table.device().is_cpu(),
                    sfg::msg("table must be a CPU [V, D] tensor, got ", table.sizes()));
  TORCH_CHECK_TYPE(table.scalar_type() == torch::kFloat || table.scalar_type() == torch::kBFloat16,
                   sfg::msg("table must be float32 or bfloat16 for the cpu backend, got ", table.scalar_type()));
  check_ids_offsets(ids, offsets, table.size(0));
  p.n = ids.size(1);
  p.dim = table.size(1);
  const int64_t n = p.n, dim = p.dim, width = n * dim;
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  table = table.contiguous();

  torch::Tensor enc_t;
  c10::optional<torch::Tensor> bias;
  p.encode = enc_weight.has_value();
  if (p.encode) {
    TORCH_CHECK_VALUE(enc_weight->dim() == 2 && enc_weight->size(0) == width && enc_weight->size(1) == width,
                      sfg::msg("enc_weight must have shape [N*D, N*D]=[", width, ", ", width, "], got ",
                               enc_weight->sizes()));
    // a transposed view: the BLAS reads it as is
    enc_t = enc_weight->to(bf16_gemm ? torch::kBFloat16 : torch::kFloat).contiguous().t();
    if (enc_bias.has_value()) {
      TORCH_CHECK_VALUE(enc_bias->numel() == width,
                        sfg::msg("enc_bias must have shape [N*D]=[", width, "], got ", enc_bias->sizes()));
      bias = enc_bias->to(torch::kFloat).contiguous().view({width});
    }
  } else {
    TORCH_CHECK_VALUE(!enc_bias.has_value(), "enc_bias must be None when enc_weight is None");
  }
  if (p.kind == kIdentity) {
    TORCH_CHECK_VALUE(!dec_weight.has_value(), "dec_weight must be None for kind='identity'");
  } else {
    TORCH_CHECK_VALUE(dec_weight.has_value(), sfg::msg("dec_weight is required for kind='", kind, "'"));
    const auto dw = dec_weight->to(torch::kFloat).contiguous();
    const std::vector<int64_t> expected = p.kind == kScalar   ? std::vector<int64_t>{n, n}
                                          : p.kind == kVector ? std::vector<int64_t>{n, n, dim}
                                                              : std::vector<int64_t>{n, n, dim, dim};
    TORCH_CHECK_VALUE(dw.sizes().vec() == expected,
                      sfg::msg("dec_weight for kind='", kind, "' must have shape ", expected, ", got ", dw.sizes()));
    if (p.kind == kMatrix) {
      auto mask = torch::zeros({n, n}, torch::kFloat);
      auto acc = mask.accessor<float, 2>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) acc[i][j] = in_pairs(p.pairs, i, j) ? 1.f : 0.f;
      // big[(i,d), (j,e)] = W[i, j, d, e]; T = right @ big^T.
      const auto big_t = (dw * mask.view({n, n, 1, 1})).permute({0, 2, 1, 3}).reshape({width, width}).t();
      // Column block i of big_t pairs with row blocks {j : (i, j) in P}; a chunk of column blocks
      // needs the union of their row ranges. Chunk only when that saves at least 10% of the FLOPs.
      constexpr int64_t kChunks = 8;
      const int64_t per_chunk = (n + kChunks - 1) / kChunks;
      std::vector<Plan::Chunk> chunks;
      int64_t chunk_flops = 0;
      for (int64_t i0 = 0; i0 < n; i0 += per_chunk) {
        const int64_t i1 = std::min(n, i0 + per_chunk);
        int64_t jmin = n, jmax = -1;
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < n; ++j)
            if (in_pairs(p.pairs, i, j)) jmin = std::min(jmin, j), jmax = std::max(jmax, j);
        if (jmax < 0) continue;  // these fields pair with nothing: their T columns are zero
        Plan::Chunk c{i0 * dim, (i1 - i0) * dim, jmin * dim, (jmax - jmin + 1) * dim, torch::Tensor()};
        chunk_flops += c.cols * c.ks;
        chunks.push_back(c);
      }
      if (chunk_flops * 10 > width * width * 9) chunks.assign(1, Plan::Chunk{0, width, 0, width, torch::Tensor()});
      for (auto& c : chunks) {
        c.weight = big_t.narrow(0, c.k0, c.ks).narrow(1, c.col0, c.cols).contiguous();
        if (bf16_gemm) c.weight = c.weight.to(torch::kBFloat16);
      }
      p.chunks = std::move(chunks);
    } else {
      const float* src = dw.data_ptr<float>();
      p.row_ptr.assign(1, 0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          if (!in_pairs(p.pairs, i, j)) continue;
          p.col.push_back(j);
          if (p.kind == kScalar) p.weights.push_back(src[i * n + j]);
          else p.weights.insert(p.weights.end(), src + (i * n + j) * dim, src + (i * n + j + 1) * dim);
        }
        p.row_ptr.push_back(static_cast<int64_t>(p.col.size()));
      }
    }
  }
  const auto sizes = field_sizes(offsets, table.size(0));
  check_bounds(ids, sizes, mode);
  auto out = torch::empty({ids.size(0)}, torch::kFloat);
  const bool i64 = ids.scalar_type() == torch::kInt64;
  float* o = out.data_ptr<float>();
  if (table.scalar_type() == torch::kFloat) {
    if (i64) run_tiles<int64_t, float>(p, ids, table, offsets, sizes, mode, enc_t, bias, tile, o);
    else run_tiles<int32_t, float>(p, ids, table, offsets, sizes, mode, enc_t, bias, tile, o);
  } else {
    if (i64) run_tiles<int64_t, uint16_t>(p, ids, table, offsets, sizes, mode, enc_t, bias, tile, o);
    else run_tiles<int32_t, uint16_t>(p, ids, table, offsets, sizes, mode, enc_t, bias, tile, o);
  }
  return out;
}

}  // namespace sfg

// Fused SFG interaction on CPU for training: forward and backward of
//   logit[b] = sum_{(i,j) in P} a_i . (W_ij b_j),   (a, b) = (Z, V) | (V, Z) | (Z, Z) | (V, V),
//   Z = gamma * act(H) (+ V),   H = V @ W_enc^T (+ bias),
// on V [B, N, D] (the lookup's output, so it composes with the fused sparse embedding update).
//
// Forward, per tile of samples (parallel over tiles, single-threaded BLAS inside each):
//   H = tile GEMM (stored: the backward needs act'(H)), Z = epilogue(H) (cache only),
//   T = mix(b) (stored: plan's decoder, a tile GEMM per chunk for the matrix kind), logit = rowdot(a, T).
// Backward, with g = dL/dlogit per sample, one pass over the tiles:
//   da = g T,  db = mix^T(g a),  dDec += g a (x) b over P (scalar / vector: per-group sums),
//   dZ and the direct part of dV from (da, db) by which operand is Z,  dH = dZ * gamma * act'(H),
//   dV = direct (+ dZ when residual) + dH @ W_enc (tile GEMM),  d bias += colsum(dH);
// then the weight gradients as batch GEMMs (K = B keeps them efficient; batch_gemm_tn: per row group):
//   dW_enc = dH^T @ V,  matrix dDec = (g a)^T @ b per chunk, masked to P.
// Stored between the passes: H and T (fp32), and for the batch GEMMs dH, g a and b (fp32, or bf16
// when the GEMMs run on bf16 operands). Nothing is O(B N^2 D).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "buffer_pool.h"
#include "embedding_cpu.h"
#include "embedding_cpu_api.h"
#include "glue_common.h"
#include "sfg_plan.h"

namespace sfg {

namespace {

using namespace detail;

const torch::TensorOptions kF32 = torch::TensorOptions().dtype(torch::kFloat);

SFG_HOT void widen(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = cpu::bf16_to_float(src[k]);
}

SFG_HOT void narrow_bf16(const float* src, uint16_t* dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = cpu::float_to_bf16(src[k]);
}

// Rows [b0, b0 + m) of a [B, width] fp32 or bf16 tensor as fp32: a pointer into it, or widened into buf.
const float* rows_f32(const torch::Tensor& x, int64_t b0, int64_t m, int64_t width, float* buf) {
  if (x.scalar_type() == torch::kFloat) return x.data_ptr<float>() + b0 * width;
  widen(reinterpret_cast<const uint16_t*>(x.data_ptr()) + b0 * width, buf, m * width);
  return buf;
}

// Stores m rows of fp32 into rows [b0, b0 + m) of a [B, width] fp32 or bf16 tensor.
void store_rows(torch::Tensor& x, int64_t b0, int64_t m, int64_t width, const float* src) {
  const int64_t count = m * width;
  if (x.scalar_type() == torch::kFloat) {
    std::copy(src, src + count, x.data_ptr<float>() + b0 * width);
    return;
  }
  narrow_bf16(src, reinterpret_cast<uint16_t*>(x.data_ptr()) + b0 * width, count);
}

// t = mix(b) for one sample: t_i = sum_{j: (i,j) in P} R_ij b_j (all N*D values written).
SFG_INLINE void mix_sample(const Plan& p, const float* right, float* t) {
  const int64_t n = p.n, dim = p.dim;
  if (p.kind == kIdentity) {
    std::fill(t, t + n * dim, 0.f);
    if (p.pairs == 0) {  // t_i = sum_{j > i} b_j: suffix sums
      for (int64_t i = n - 2; i >= 0; --i)
        for (int64_t d = 0; d < dim; ++d) t[i * dim + d] = t[(i + 1) * dim + d] + right[(i + 1) * dim + d];
      return;
    }
    // all: t_i = total; offdiag: total - b_i. Row 0 holds the total until last.
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < dim; ++d) t[d] += right[j * dim + d];
    const float self = p.pairs == 2 ? 1.f : 0.f;
    for (int64_t i = n - 1; i >= 0; --i)
      for (int64_t d = 0; d < dim; ++d) t[i * dim + d] = t[d] - self * right[i * dim + d];
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = p.row_ptr[i];
    mix_row(p, right, p.col.data() + begin, begin, nullptr, p.row_ptr[i + 1] - begin, t + i * dim);
  }
}

// out = mix^T(a) for one sample: out_j = sum_{i: (i,j) in P} R_ij^T a_i (all N*D values written).
SFG_INLINE void mix_transposed_sample(const Plan& p, const float* a, float* out) {
  const int64_t n = p.n, dim = p.dim;
  if (p.kind == kIdentity) {
    if (p.pairs != 0) {  // all / offdiag are symmetric pair sets
      mix_sample(p, a, out);
      return;
    }
    if (n == 0) return;
    std::fill(out, out + dim, 0.f);  // out_j = sum_{i < j} a_i: prefix sums
    for (int64_t j = 1; j < n; ++j)
      for (int64_t d = 0; d < dim; ++d) out[j * dim + d] = out[(j - 1) * dim + d] + a[(j - 1) * dim + d];
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t begin = p.tcol_ptr[j];
    mix_row(p, a, p.trow.data() + begin, 0, p.tpair.data() + begin, p.tcol_ptr[j + 1] - begin, out + j * dim);
  }
}

// The per-sample decoder steps over one tile of m samples (rows of width N*D).
SFG_HOT void mix_tile(const Plan& p, const float* right, float* t, int64_t m) {
  const int64_t width = p.width();
  for (int64_t b = 0; b < m; ++b) mix_sample(p, right + b * width, t + b * width);
}

SFG_HOT void mix_transposed_tile(const Plan& p, const float* a, float* out, int64_t m) {
  const int64_t width = p.width();
  for (int64_t b = 0; b < m; ++b) mix_transposed_sample(p, a + b * width, out + b * width);
}

// acc[k*D + d] += sum_b ga[b, i, d] * right[b, j, d] for every pair k = (i, j) of P, over one tile
// (ga = g * a): a pair's D lanes stay in registers across the tile's samples; the scalar kind sums
// the lanes at the end.
SFG_HOT void accumulate_dec_tile(const Plan& p, const float* ga, const float* right, int64_t m, float* acc) {
  const int64_t n = p.n, dim = p.dim, width = p.width();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = p.row_ptr[i]; k < p.row_ptr[i + 1]; ++k) {
      const int64_t ia = i * dim, jb = p.col[k] * dim;
      float* out = acc + k * dim;
      // out[d0 : d0+L) += sum_b ga[b, i, d0 : d0+L) * right[b, j, d0 : d0+L) over the tile, in registers
      for_lane_blocks(dim, [&](auto lanes, int64_t d0) SFG_LAMBDA_INLINE {
        constexpr int L = decltype(lanes)::value;
        using V = typename Lanes<L>::T;
        const V sum = sum_terms<L>(m, [&](int64_t b) SFG_LAMBDA_INLINE -> V {
          return load_lanes<L>(ga + b * width + ia + d0) * load_lanes<L>(right + b * width + jb + d0);
        });
        store_lanes<L>(out + d0, load_lanes<L>(out + d0) + sum);
      });
    }
}

// ga[b] = g[b] * a[b] for m rows.
SFG_HOT void scale_rows(const float* g, const float* a, float* ga, int64_t m, int64_t width) {
  for (int64_t b = 0; b < m; ++b) {
    const float gb = g[b];
    const float* ar = a + b * width;
    float* o = ga + b * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) o[k] = gb * ar[k];
  }
}

// From da = g T and db: dZ (into dz, when there is an encoder) and the direct part of dV (into dv, when
// given): da and db go to whichever operand is Z, the rest to V, and dZ to V too under the residual.
SFG_HOT void combine_tile(const Plan& p, const float* g, const float* t, const float* db, float* dz, float* dv,
                          int64_t m) {
  const int64_t width = p.width();
  const float lz = p.left_is_z() ? 1.f : 0.f, rz = p.right_is_z() ? 1.f : 0.f, res = p.residual ? 1.f : 0.f;
  for (int64_t b = 0; b < m; ++b) {
    const float gb = g[b];
    const float* tr = t + b * width;
    const float* dbr = db + b * width;
    float* dvr = dv ? dv + b * width : nullptr;
    if (!p.encode) {
      if (dvr) {
#pragma omp simd
        for (int64_t k = 0; k < width; ++k) dvr[k] = gb * tr[k] + dbr[k];
      }
      continue;
    }
    float* dzr = dz + b * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) dzr[k] = lz * gb * tr[k] + rz * dbr[k];
    if (dvr) {
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) dvr[k] = (1.f - lz) * gb * tr[k] + (1.f - rz) * dbr[k] + res * dzr[k];
    }
  }
}

// out += x (count values); colsum: out[k] += sum_b x[b, k] over m rows.
SFG_HOT void add_into(float* out, const float* x, int64_t count) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) out[k] += x[k];
}

SFG_HOT void colsum_into(float* out, const float* x, int64_t m, int64_t width) {
  for (int64_t b = 0; b < m; ++b) add_into(out, x + b * width, width);
}

// dz *= gamma * act'(h), in place over `count` values (the derivative of gamma * act at h).
SFG_HOT void apply_act_grad(const Plan& p, const float* h, float* dz, int64_t count) {
  const float g = p.gamma;
  switch (p.act) {
    case kActRelu:
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) dz[k] *= h[k] > 0.f ? g : 0.f;
      break;
    case kActTanh:
      for (int64_t k = 0; k < count; ++k) {
        const float t = std::tanh(h[k]);
        dz[k] *= g * (1.f - t * t);
      }
      break;
    case kActSigmoid:
      for (int64_t k = 0; k < count; ++k) {
        const float s = 1.f / (1.f + std::exp(-h[k]));
        dz[k] *= g * s * (1.f - s);
      }
      break;
    case kActSilu:
      for (int64_t k = 0; k < count; ++k) {
        const float s = 1.f / (1.f + std::exp(-h[k]));
        dz[k] *= g * s * (1.f + h[k] * (1.f - s));
      }
      break;
    case kActGelu:  // exact (erf) GELU, as F.gelu's default
      for (int64_t k = 0; k < count; ++k) {
        const float x = h[k];
        const float cdf = 0.5f * (1.f + std::erf(x * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * std::exp(-0.5f * x * x);
        dz[k] *= g * (cdf + x * pdf);
      }
      break;
    default:
      if (g != 1.f) {
#pragma omp simd
        for (int64_t k = 0; k < count; ++k) dz[k] *= g;
      }
  }
}

// Checks V and returns the tile for its batch (tile_for_batch: never larger than B, whose per-thread
// buffers it sizes, and two tiles or more for B >= 2).
int64_t check_inputs(const torch::Tensor& V, int64_t tile) {
  TORCH_CHECK_VALUE(tile >= 1, sfg::msg("tile must be >= 1, got ", tile));
  TORCH_CHECK_VALUE(V.dim() == 3 && V.device().is_cpu(), sfg::msg("V must be a CPU [B, N, D] tensor, got ", V.sizes()));
  TORCH_CHECK_TYPE(V.scalar_type() == torch::kFloat || V.scalar_type() == torch::kBFloat16,
                   sfg::msg("V must be float32 or bfloat16 for the cpu backend, got ", V.scalar_type()));
  return tile_for_batch(tile, V.size(0));
}

void detach_all(torch::Tensor& V, c10::optional<torch::Tensor>& enc_weight, c10::optional<torch::Tensor>& enc_bias,
                c10::optional<torch::Tensor>& dec_weight) {
  V = V.detach();
  for (auto* t : {&enc_weight, &enc_bias, &dec_weight})
    if (t->has_value()) *t = (*t)->detach();
}

// H = V @ W_enc^T (+ bias) for one tile, into h_tile.
void encoder_gemm(const Plan& p, const EncoderOperands& enc, torch::Tensor& h_tile, const torch::Tensor& v_tile,
                  torch::Tensor& a16, torch::Tensor& o16) {
  tile_mm(h_tile, v_tile, enc.weight_t, a16, o16, enc.bias);
}

// Per-thread scratch, kept across calls (the pool's worker threads persist): tile buffers allocated
// afresh on every call cost a zero-fill and a page fault per 4 KB each time.
struct Scratch {
  std::vector<float> slots[7];
  torch::Tensor a16, o16;  // bf16 staging of the tile GEMMs' operands

  float* get(int slot, int64_t count) {
    auto& v = slots[slot];
    if (static_cast<int64_t>(v.size()) < count) v.resize(count);
    return v.data();
  }
  void staging(bool bf16, int64_t tile, int64_t width) {
    if (!bf16 || (a16.defined() && a16.size(0) >= tile && a16.size(1) >= width)) return;
    // ordinary tensors even when the first call runs under torch.inference_mode(): a cached inference
    // tensor would refuse the in-place writes of every later call outside it
    c10::InferenceMode normal(false);
    const auto b16 = torch::TensorOptions().dtype(torch::kBFloat16);
    a16 = torch::empty({tile, width}, b16);
    o16 = torch::empty({tile, width}, b16);
  }
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// The backward's batch-GEMM operands ([B, N*D], written in full before they are read), kept per
// calling thread across steps up to 64 MB each, for the same reason; larger ones are allocated per call.
torch::Tensor workspace(int slot, int64_t rows, int64_t cols, c10::ScalarType dtype) {
  constexpr int64_t kMaxCachedBytes = int64_t(64) << 20;
  static thread_local torch::Tensor cache[4];
  const int64_t count = rows * cols;
  const auto opts = torch::TensorOptions().dtype(dtype);
  if (count * static_cast<int64_t>(c10::elementSize(dtype)) > kMaxCachedBytes) return torch::empty({rows, cols}, opts);
  auto& t = cache[slot];
  if (!t.defined() || t.scalar_type() != dtype || t.numel() < count) {
    c10::InferenceMode normal(false);  // (as Scratch::staging)
    t = torch::empty({count}, opts);
  }
  return t.narrow(0, 0, count).view({rows, cols});
}

// A^T @ B over the batch (A [B, M], B [B, K] -> fp32 [M, K]): the weight gradients' batch reduction, the same
// bits for any thread count. One GEMM would run MKL's own threading, which splits the long batch reduction by
// the thread count (B = 1000 on 3 threads differed from 1 thread). Here the output's columns are cut into
// blocks and, for fp32 operands, the batch into groups of consecutive rows (>= 1024 each, at most 8), both
// fixed by the shapes alone. Each (group, block) is one GEMM into the group's partial, run inside
// at::parallel_for's OpenMP region (never fewer than two indices, so with >= 2 threads it always opens one),
// where MKL keeps each GEMM on its calling thread; the fp32 partials are then added in group order. bf16
// operands take one group: their GEMM rounds its result to bf16, once over the whole batch as torch's bf16
// matmul, where per-group rounded partials lost accuracy wherever the groups' sums cancel (a batch sorted by
// label). Column blocks are >= 128 wide (narrower ones cost ~20%); against one threaded GEMM this costs ~5%
// of the GEMM at the Criteo shape.
torch::Tensor batch_gemm_tn(const torch::Tensor& a, const torch::Tensor& b) {
  constexpr int64_t kMinGroupRows = 1024, kMaxGroups = 8, kMaxPartialBytes = int64_t(64) << 20;
  const int64_t batch = a.size(0), rows = a.size(1), cols = b.size(1);
  const int64_t partial_bytes = std::max<int64_t>(1, rows * cols * int64_t(sizeof(float)));
  const int64_t groups = a.scalar_type() != torch::kFloat ? 1 : std::max<int64_t>(
      1, std::min({(batch + kMinGroupRows - 1) / kMinGroupRows, kMaxGroups, kMaxPartialBytes / partial_bytes}));
  const int64_t blocks = std::max((cols + 1023) / 1024,
                                  std::min((4 + groups - 1) / groups, std::max<int64_t>(1, cols / 128)));
  const int64_t block = (cols + blocks - 1) / blocks, items = groups * blocks;
  const bool direct = blocks == 1 && a.scalar_type() == torch::kFloat;  // GEMM straight into the partial
  // group 0 writes the output itself, the others their partials; every group holds >= 1 row when batch >= 1
  // (groups <= batch), so every element is written
  if (batch == 0) return torch::zeros({rows, cols}, kF32);
  auto out = torch::empty({rows, cols}, kF32);
  auto partial = torch::empty({groups - 1, rows, cols}, kF32);
  at::parallel_for(0, std::max<int64_t>(items, 2), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, items); ++i) {
      const int64_t g = i / blocks, c0 = (i % blocks) * block, w = std::min(cols, c0 + block) - c0;
      const int64_t r0 = g * batch / groups, r1 = (g + 1) * batch / groups;
      if (r1 <= r0 || w <= 0) continue;
      const auto a_g = a.narrow(0, r0, r1 - r0).t();
      const auto b_g = b.narrow(0, r0, r1 - r0).narrow(1, c0, w);
      auto out_g = g == 0 ? out : partial[g - 1];
      if (direct) at::mm_out(out_g, a_g, b_g);
      else out_g.narrow(1, c0, w).copy_(at::mm(a_g, b_g));
    }
  });
  for (int64_t g = 0; g + 1 < groups; ++g) out.add_(partial[g]);  // element-wise: the same for any thread count
  return out;
}

}  // namespace

std::vector<torch::Tensor> sfg_interaction_fwd_cpu(torch::Tensor V, c10::optional<torch::Tensor> enc_weight,
                                                   c10::optional<torch::Tensor> enc_bias,
                                                   c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                                                   const std::string& activation, double gamma, bool residual,
                                                   const std::string& pairs, const std::string& generated_side,
                                                   bool symmetric, int64_t tile, bool bf16_gemm, bool save) {
  tile = check_inputs(V, tile);
  // Plain tensors from here on: the tile GEMMs write into out= buffers from worker threads, which do
  // not inherit the caller's no-grad mode, and autograd refuses out= on inputs that require grad.
  detach_all(V, enc_weight, enc_bias, dec_weight);
  V = V.contiguous();
  const int64_t batch = V.size(0), n = V.size(1), dim = V.size(2), width = n * dim;
  const EncoderOperands enc = encoder_operands(enc_weight, enc_bias, width, bf16_gemm);
  const Plan p = make_plan(kind, activation, gamma, residual, pairs, generated_side, symmetric, n, dim,
                           enc_weight.has_value(), dec_weight, bf16_gemm);
  auto logit = torch::empty({batch}, kF32);
  // H and T live until the backward, then return to the pool (buffer_pool.h: no page faults next step)
  auto H = save && p.encode ? pooled_empty({batch, width}) : torch::Tensor();
  auto T = save ? pooled_empty({batch, width}) : torch::Tensor();
  const auto flat = V.view({batch, width});
  const bool v_f32 = V.scalar_type() == torch::kFloat;
  const int64_t num_tiles = (batch + tile - 1) / tile;
  float* out = logit.data_ptr<float>();
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch& st = scratch();
    st.staging(p.bf16_gemm, tile, width);
    const int64_t cols = tile * width;
    float* vbuf = v_f32 ? nullptr : st.get(0, cols);
    float* hbuf = p.encode && !save ? st.get(1, cols) : nullptr;
    float* zbuf = p.encode ? st.get(2, cols) : nullptr;
    float* tbuf = save ? nullptr : st.get(3, cols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, m = std::min(batch, b0 + tile) - b0;
      const float* v = rows_f32(flat, b0, m, width, vbuf);
      const float* z = v;
      if (p.encode) {
        float* h = save ? H.data_ptr<float>() + b0 * width : hbuf;
        auto h_tile = torch::from_blob(h, {m, width}, kF32);
        const auto v_tile = torch::from_blob(const_cast<float*>(v), {m, width}, kF32);
        encoder_gemm(p, enc, h_tile, v_tile, st.a16, st.o16);
        std::copy(h, h + m * width, zbuf);
        auto z_tile = torch::from_blob(zbuf, {m, width}, kF32);
        encoder_epilogue(p, z_tile, v, m, width);
        z = zbuf;
      }
      const float* left = p.left_is_z() ? z : v;
      const float* right = p.right_is_z() ? z : v;
      float* tp = save ? T.data_ptr<float>() + b0 * width : tbuf;
      if (p.kind == kMatrix) {
        if (!p.chunks_cover) std::fill(tp, tp + m * width, 0.f);
        const auto r_tile = torch::from_blob(const_cast<float*>(right), {m, width}, kF32);
        // bf16: the right tile is rounded once for all chunks (the encoder GEMM already left V's
        // rounding in a16 when V is the right operand)
        torch::Tensor r16;
        if (p.bf16_gemm) {
          r16 = st.a16.narrow(0, 0, m).narrow(1, 0, width);
          if (p.right_is_z() || !p.encode) r16 = stage_bf16(r_tile, st.a16);
        }
        for (const auto& c : p.chunks) {
          auto t_cols = torch::from_blob(tp + c.col0, {m, c.cols}, {width, 1}, kF32);
          if (p.bf16_gemm) mm_widened(t_cols, r16.narrow(1, c.k0, c.ks), c.weight, st.o16, false);
          else at::mm_out(t_cols, r_tile.narrow(1, c.k0, c.ks), c.weight);
        }
      } else {
        mix_tile(p, right, tp, m);
      }
      rowdot_rows(left, width, tp, width, width, m, out + b0, false);
    }
  });
  return {logit, H, T};
}

std::vector<torch::Tensor> sfg_interaction_bwd_cpu(torch::Tensor grad, torch::Tensor V, c10::optional<torch::Tensor> H,
                                                   torch::Tensor T, c10::optional<torch::Tensor> enc_weight,
                                                   c10::optional<torch::Tensor> enc_bias,
                                                   c10::optional<torch::Tensor> dec_weight, const std::string& kind,
                                                   const std::string& activation, double gamma, bool residual,
                                                   const std::string& pairs, const std::string& generated_side,
                                                   bool symmetric, int64_t tile, bool bf16_gemm, bool need_v,
                                                   bool need_enc_weight, bool need_enc_bias, bool need_dec) {
  tile = check_inputs(V, tile);
  detach_all(V, enc_weight, enc_bias, dec_weight);
  grad = grad.detach();
  check_cpu("grad", grad);
  check_cpu("H", H);
  check_cpu("T", T);
  V = V.contiguous();
  const int64_t batch = V.size(0), n = V.size(1), dim = V.size(2), width = n * dim;
  // the backward needs no encoder GEMM operands (H is saved): the shapes are checked, nothing converted
  check_encoder(enc_weight, enc_bias, width);
  const Plan p = make_plan(kind, activation, gamma, residual, pairs, generated_side, symmetric, n, dim,
                           enc_weight.has_value(), dec_weight, bf16_gemm);
  TORCH_CHECK_VALUE(grad.numel() == batch, sfg::msg("grad must have B=", batch, " values, got ", grad.sizes()));
  TORCH_CHECK_VALUE(T.scalar_type() == torch::kFloat && T.numel() == batch * width,
                    sfg::msg("T must be the forward's float32 [B, N*D] buffer, got ", T.scalar_type(), " ", T.sizes()));
  TORCH_CHECK_VALUE(!p.encode || (H.has_value() && H->scalar_type() == torch::kFloat && H->numel() == batch * width),
                    "H must be the forward's float32 [B, N*D] buffer when enc_weight is given");
  grad = grad.to(torch::kFloat).contiguous();
  T = T.contiguous();
  torch::Tensor Hc = p.encode ? H->contiguous() : torch::Tensor();
  const auto flat = V.view({batch, width});
  const bool v_f32 = V.scalar_type() == torch::kFloat;
  const auto gemm_dtype = bf16_gemm ? torch::kBFloat16 : torch::kFloat;

  need_enc_weight = need_enc_weight && p.encode;
  need_enc_bias = need_enc_bias && p.encode && enc_bias.has_value();
  need_dec = need_dec && p.kind != kIdentity;
  const bool dv_gemm = need_v && p.encode;
  const bool matrix_dec = need_dec && p.kind == kMatrix;
  const bool csr_dec = need_dec && p.kind != kMatrix;
  // W_enc as the dV GEMM reads it: dH [m, out] @ W_enc [out, in]
  const torch::Tensor enc_w = dv_gemm ? enc_weight->to(gemm_dtype).contiguous() : torch::Tensor();

  auto dV = need_v ? pooled_empty({batch, n, dim}) : torch::Tensor();
  // Operands of the batch GEMMs, in the GEMM dtype. V is used in place when its dtype already fits.
  auto dHg = need_enc_weight ? workspace(0, batch, width, gemm_dtype) : torch::Tensor();
  const bool v_fits = V.scalar_type() == gemm_dtype;
  auto Vg = need_enc_weight || (matrix_dec && !p.right_is_z())
                ? (v_fits ? flat : workspace(1, batch, width, gemm_dtype))
                : torch::Tensor();
  const bool store_v = Vg.defined() && !v_fits;
  auto GAg = matrix_dec ? workspace(2, batch, width, gemm_dtype) : torch::Tensor();
  auto Zg = matrix_dec && p.right_is_z() ? workspace(3, batch, width, gemm_dtype) : torch::Tensor();

  const int64_t dec_size = csr_dec ? p.num_pairs() * dim : 0;
  const bool left_z = p.left_is_z(), right_z = p.right_is_z();
  const float* g_all = grad.data_ptr<float>();
  const int64_t num_tiles = (batch + tile - 1) / tile;
  // per-GROUP partial sums of the bias and decoder gradients (kMaxTileGroups: consecutive tiles, each
  // summed in tile order), then the groups in order: the grouping depends on the batch and tile only, so
  // the bits do not depend on how many threads share the groups (per-thread sums would group them by the
  // thread count), and the partials are at most kMaxTileGroups gradients, whatever the batch
  const int64_t num_groups = std::min(num_tiles, kMaxTileGroups);
  const auto group_start = [&](int64_t g) { return g * num_tiles / num_groups; };
  std::vector<float> bias_acc(need_enc_bias ? num_groups * width : 0, 0.f), dec_acc(num_groups * dec_size, 0.f);
  at::parallel_for(0, num_groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t cols = tile * width;
    Scratch& st = scratch();
    st.staging(bf16_gemm, tile, width);
    float* vbuf = v_f32 ? nullptr : st.get(0, cols);
    float* zbuf = p.encode ? st.get(1, cols) : nullptr;
    float* ga = st.get(2, cols);
    float* db = st.get(3, cols);
    float* dz = p.encode ? st.get(4, cols) : nullptr;
    int64_t group = g0;   // the g with group_start(g) <= t < group_start(g + 1)
    for (int64_t t = group_start(g0); t < group_start(g1); ++t) {
      while (t >= group_start(group + 1)) ++group;
      const int64_t b0 = t * tile, m = std::min(batch, b0 + tile) - b0, count = m * width;
      const float* g = g_all + b0;
      const float* v = rows_f32(flat, b0, m, width, vbuf);
      const float* h = p.encode ? Hc.data_ptr<float>() + b0 * width : nullptr;
      const float* z = v;
      if (p.encode) {
        std::copy(h, h + count, zbuf);
        auto z_tile = torch::from_blob(zbuf, {m, width}, kF32);
        encoder_epilogue(p, z_tile, v, m, width);
        z = zbuf;
      }
      const float* left = left_z ? z : v;
      const float* right = right_z ? z : v;
      scale_rows(g, left, ga, m, width);
      // db = mix^T(g a), and the decoder's own gradient
      if (p.kind == kMatrix) {
        std::fill(db, db + count, 0.f);
        const auto ga_tile = torch::from_blob(ga, {m, width}, kF32);
        torch::Tensor ga16;  // bf16: g a rounded once (into the rows kept for d decoder, if wanted)
        if (bf16_gemm) {
          if (matrix_dec) {
            store_rows(GAg, b0, m, width, ga);
            ga16 = GAg.narrow(0, b0, m);
          } else {
            ga16 = stage_bf16(ga_tile, st.a16);
          }
        }
        for (const auto& c : p.chunks) {
          auto c_tile = torch::from_blob(db + c.k0, {m, c.ks}, {width, 1}, kF32);
          // db[:, k0:k0+ks] += ga[:, col0:col0+cols] @ W_chunk^T (chunks overlap in K)
          if (bf16_gemm) mm_widened(c_tile, ga16.narrow(1, c.col0, c.cols), c.weight.t(), st.o16, true);
          else c_tile.addmm_(ga_tile.narrow(1, c.col0, c.cols), c.weight.t());
        }
      } else {
        mix_transposed_tile(p, ga, db, m);
        if (csr_dec) accumulate_dec_tile(p, ga, right, m, dec_acc.data() + group * dec_size);
      }
      float* dv = need_v ? dV.data_ptr<float>() + b0 * width : nullptr;
      combine_tile(p, g, T.data_ptr<float>() + b0 * width, db, p.encode ? dz : nullptr, dv, m);
      if (p.encode) {
        apply_act_grad(p, h, dz, count);  // dz is dH from here on
        if (need_enc_weight) store_rows(dHg, b0, m, width, dz);
        if (dv_gemm) {
          auto dv_tile = torch::from_blob(dv, {m, width}, kF32);
          if (bf16_gemm) {
            // dH in bf16 once: the rows just stored for dW_enc, else the staging tile
            torch::Tensor dh16;
            if (need_enc_weight) {
              dh16 = dHg.narrow(0, b0, m);
            } else {
              dh16 = st.a16.narrow(0, 0, m).narrow(1, 0, width);
              auto* dst = reinterpret_cast<uint16_t*>(dh16.data_ptr());
              narrow_rows_bf16(dz, width, dst, dh16.stride(0), m, width);
            }
            mm_widened(dv_tile, dh16, enc_w, st.o16, true);
          } else {
            dv_tile.addmm_(torch::from_blob(dz, {m, width}, kF32), enc_w);
          }
        }
        if (need_enc_bias) colsum_into(bias_acc.data() + group * width, dz, m, width);
      }
      if (store_v) store_rows(Vg, b0, m, width, v);
      if (matrix_dec) {
        if (!bf16_gemm) store_rows(GAg, b0, m, width, ga);
        if (right_z) store_rows(Zg, b0, m, width, z);
      }
    }
  });

  torch::Tensor d_enc, d_bias, d_dec;
  if (need_enc_weight) d_enc = batch_gemm_tn(dHg, Vg);
  if (need_enc_bias) {
    d_bias = torch::zeros({width}, kF32);
    float* o = d_bias.data_ptr<float>();
    for (int64_t g = 0; g < num_groups; ++g) axpy(o, 1.f, bias_acc.data() + g * width, width);
  }
  if (csr_dec) {
    std::vector<float> sum(dec_size, 0.f);
    for (int64_t g = 0; g < num_groups; ++g) axpy(sum.data(), 1.f, dec_acc.data() + g * dec_size, dec_size);
    const bool vector = p.kind == kVector;
    d_dec = vector ? torch::zeros({n, n, dim}, kF32) : torch::zeros({n, n}, kF32);
    float* o = d_dec.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = p.row_ptr[i]; k < p.row_ptr[i + 1]; ++k) {
        const float* lanes = sum.data() + k * dim;
        if (vector) std::copy(lanes, lanes + dim, o + (i * n + p.col[k]) * dim);
        else o[i * n + p.col[k]] = std::accumulate(lanes, lanes + dim, 0.f);
      }
  }
  if (matrix_dec) {
    const auto& Rg = right_z ? Zg : Vg;
    auto dbig_t = torch::zeros({width, width}, kF32);  // d(Wbig^T)[(j,e), (i,d)]
    for (const auto& c : p.chunks)
      dbig_t.narrow(0, c.k0, c.ks).narrow(1, c.col0, c.cols).copy_(
          batch_gemm_tn(Rg.narrow(1, c.k0, c.ks), GAg.narrow(1, c.col0, c.cols)));
    const auto mask = pair_mask(p.pairs, n);
    // Wbig[(i,d), (j,e)] = W[i, j, d, e]
    d_dec = (dbig_t.t().reshape({n, dim, n, dim}).permute({0, 2, 1, 3}) * mask.view({n, n, 1, 1})).contiguous();
  }
  return {dV, d_enc, d_bias, d_dec};
}

}  // namespace sfg

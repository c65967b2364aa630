// The SFG interaction plan shared by the fused CPU inference (sfg_logits_cpu.cpp) and the fused
// CPU training op (sfg_interaction_cpu.cpp): parsed options, the decoder laid out for the tile
// loops, and the per-sample / per-tile building blocks both use.
//
// With the bilinear score logit = sum_{(i,j) in P} a_i . (W_ij b_j) (a, b the left / right operand):
//   identity:        t_i = sum_{j: (i,j) in P} b_j   (prefix/suffix sums, O(N D) per sample)
//   scalar / vector: t_i = sum_j R_ij b_j  (CSR over P; R_ij a scalar or a D-vector)
//   matrix:          T = b @ Wbig^T, tile GEMMs (Wbig the masked [(i,d),(j,e)] block matrix)
// and logit = sum_i a_i . t_i. The transposed mix (sum_i R_ij^T a_i, the backward's d b) walks a
// second CSR over P by column.
// The matrix decoder's block matrix is zero outside P: for the FM-family pairs i < j, column block
// i of Wbig^T has non-zero rows only for fields j > i. The decoder GEMM therefore runs as a few
// column chunks, each over only the K range its fields pair with (about 55% of the dense FLOPs
// at N = 39 with 8 chunks); pair sets without such structure keep one dense GEMM.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "embedding_cpu.h"
#include "glue_common.h"
#include "message.h"

// Hot tile loops are compiled for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline, and
// picked at load time (GCC ifunc): the extension is built without -march, so without this every loop
// here would be SSE2. Off under the sanitizers, whose runtime must start before an ifunc resolver runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(SFG_NO_CLONES)
#define SFG_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SFG_HOT
#endif

// Small helpers the hot loops call: forced inline, so each ISA clone gets its own vectorised copy.
#if defined(__GNUC__)
#define SFG_INLINE inline __attribute__((always_inline))
#define SFG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SFG_INLINE inline
#define SFG_LAMBDA_INLINE
#endif

namespace sfg {
// Which clone of the SFG_HOT loops this CPU runs: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2 + FMA) or
// "baseline" (also when the clones are compiled out: other compilers, sanitizer builds).
inline const char* hot_loop_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(SFG_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
#endif
  return "baseline";
}
}  // namespace sfg

// The lane vectors below are only passed between always-inline helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sfg {
namespace detail {

enum Kind { kIdentity, kScalar, kVector, kMatrix };
enum Act { kActIdentity, kActRelu, kActTanh, kActSigmoid, kActSilu, kActGelu };

// The tile (samples per parallel work item) the kernels run for a batch: at most the batch (per-thread
// buffers hold tile rows of N*D values), and for a batch of two or more rows at most half of it. One tile
// would run outside OpenMP's parallel region, where the BLAS threads its GEMM itself and rounds by its own
// thread count (batches of 5-11 rows differed between 1 and 2 threads); tiles inside the region run it
// sequentially. A function of the batch and the request only, so the bits never follow the thread count.
inline int64_t tile_for_batch(int64_t tile, int64_t batch) {
  if (batch < 2) return std::min<int64_t>(tile, 1);
  return std::min(tile, (batch + 1) / 2);
}

// Tiles are summed into per-GROUP partials of the weight gradients (a group: consecutive tiles, in order),
// then the groups in order: the bits depend on the batch and tile only, not on how threads share the
// groups, and the partials stay O(groups), not O(B / tile), times the gradient's size.
constexpr int64_t kMaxTileGroups = 256;

inline bool in_pairs(int pairs, int64_t i, int64_t j) {
  if (pairs == 0) return i < j;   // upper
  if (pairs == 2) return i != j;  // offdiag
  return true;                    // all
}

// The pair set as an [N, N] fp32 0/1 matrix.
inline torch::Tensor pair_mask(int pairs, int64_t n) {
  auto mask = torch::zeros({n, n}, torch::kFloat);
  auto acc = mask.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) acc[i][j] = in_pairs(pairs, i, j) ? 1.f : 0.f;
  return mask;
}

inline int parse(const std::string& name, const std::string& value, std::initializer_list<const char*> choices) {
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
  bool chunks_cover = true;  // every column of T lies in some chunk (else the rest is zero)
  int64_t max_cols = 0, max_ks = 0;
  // CSR of P for scalar / vector decoders: row i's pairs are col[row_ptr[i] .. row_ptr[i+1]).
  std::vector<int64_t> row_ptr, col;
  std::vector<float> weights;  // one per pair (scalar) or D per pair (vector), in CSR order
  // The same pairs by column: column j's pairs are (trow[k], tpair[k]) for k in tcol_ptr[j] .. tcol_ptr[j+1),
  // tpair indexing the CSR order above (and so `weights`).
  std::vector<int64_t> tcol_ptr, trow, tpair;

  int64_t width() const { return n * dim; }
  int64_t num_pairs() const { return static_cast<int64_t>(col.size()); }
  // which operands are the generated Z (the rest are the raw V)
  bool left_is_z() const { return encode && (symmetric || left_generated); }
  bool right_is_z() const { return encode && (symmetric || !left_generated); }
};

// The decoder part of a plan from the user-facing options; checks dec_weight's presence and shape.
inline Plan make_plan(const std::string& kind, const std::string& activation, double gamma, bool residual,
                      const std::string& pairs, const std::string& generated_side, bool symmetric, int64_t n,
                      int64_t dim, bool encode, const c10::optional<torch::Tensor>& dec_weight, bool bf16_gemm) {
  Plan p;
  p.kind = parse("kind", kind, {"identity", "scalar", "vector", "matrix"});
  p.act = parse("activation", activation, {"identity", "relu", "tanh", "sigmoid", "silu", "gelu"});
  p.pairs = parse("pairs", pairs, {"upper", "all", "offdiag"});
  p.left_generated = parse("generated_side", generated_side, {"left", "right"}) == 0;
  p.symmetric = symmetric;
  p.residual = residual;
  p.gamma = static_cast<float>(gamma);
  p.bf16_gemm = bf16_gemm;
  p.encode = encode;
  p.n = n;
  p.dim = dim;
  const int64_t width = n * dim;
  if (p.kind == kIdentity) {
    TORCH_CHECK_VALUE(!dec_weight.has_value(), "dec_weight must be None for kind='identity'");
  } else {
    TORCH_CHECK_VALUE(dec_weight.has_value(), sfg::msg("dec_weight is required for kind='", kind, "'"));
    check_cpu_weight("dec_weight", dec_weight);
  }
  if (p.kind == kMatrix) {
    const auto dw = dec_weight->to(torch::kFloat).contiguous();
    const std::vector<int64_t> expected{n, n, dim, dim};
    TORCH_CHECK_VALUE(dw.sizes().vec() == expected,
                      sfg::msg("dec_weight for kind='matrix' must have shape ", expected, ", got ", dw.sizes()));
    const auto mask = pair_mask(p.pairs, n);
    // big[(i,d), (j,e)] = W[i, j, d, e]; T = right @ big^T.
    const auto big_t = (dw * mask.view({n, n, 1, 1})).permute({0, 2, 1, 3}).reshape({width, width}).t();
    // Column block i of big_t pairs with row blocks {j : (i, j) in P}; a chunk of column blocks
    // needs the union of their row ranges. Chunk only when that saves at least 10% of the FLOPs.
    constexpr int64_t kChunks = 8;
    const int64_t per_chunk = (n + kChunks - 1) / kChunks;
    std::vector<Plan::Chunk> chunks;
    int64_t chunk_flops = 0, covered = 0;
    for (int64_t i0 = 0; i0 < n; i0 += per_chunk) {
      const int64_t i1 = std::min(n, i0 + per_chunk);
      int64_t jmin = n, jmax = -1;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < n; ++j)
          if (in_pairs(p.pairs, i, j)) jmin = std::min(jmin, j), jmax = std::max(jmax, j);
      if (jmax < 0) continue;  // these fields pair with nothing: their T columns are zero
      Plan::Chunk c{i0 * dim, (i1 - i0) * dim, jmin * dim, (jmax - jmin + 1) * dim, torch::Tensor()};
      chunk_flops += c.cols * c.ks;
      covered += c.cols;
      chunks.push_back(c);
    }
    if (chunk_flops * 10 > width * width * 9) {
      chunks.assign(1, Plan::Chunk{0, width, 0, width, torch::Tensor()});
      covered = width;
    }
    p.chunks_cover = covered == width;
    for (auto& c : chunks) {
      c.weight = big_t.narrow(0, c.k0, c.ks).narrow(1, c.col0, c.cols).contiguous();
      if (bf16_gemm) c.weight = c.weight.to(torch::kBFloat16);
      p.max_cols = std::max(p.max_cols, c.cols);
      p.max_ks = std::max(p.max_ks, c.ks);
    }
    p.chunks = std::move(chunks);
    return p;
  }
  const float* src = nullptr;
  torch::Tensor dw;
  if (p.kind != kIdentity) {
    dw = dec_weight->to(torch::kFloat).contiguous();
    const std::vector<int64_t> expected = p.kind == kScalar ? std::vector<int64_t>{n, n} : std::vector<int64_t>{n, n, dim};
    TORCH_CHECK_VALUE(dw.sizes().vec() == expected,
                      sfg::msg("dec_weight for kind='", kind, "' must have shape ", expected, ", got ", dw.sizes()));
    src = dw.data_ptr<float>();
  }
  p.row_ptr.assign(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      if (!in_pairs(p.pairs, i, j)) continue;
      p.col.push_back(j);
      if (p.kind == kScalar) p.weights.push_back(src[i * n + j]);
      else if (p.kind == kVector) p.weights.insert(p.weights.end(), src + (i * n + j) * dim, src + (i * n + j + 1) * dim);
    }
    p.row_ptr.push_back(static_cast<int64_t>(p.col.size()));
  }
  p.tcol_ptr.assign(n + 1, 0);
  for (int64_t k = 0; k < p.num_pairs(); ++k) ++p.tcol_ptr[p.col[k] + 1];
  for (int64_t j = 0; j < n; ++j) p.tcol_ptr[j + 1] += p.tcol_ptr[j];
  p.trow.resize(p.num_pairs());
  p.tpair.resize(p.num_pairs());
  std::vector<int64_t> fill(p.tcol_ptr.begin(), p.tcol_ptr.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = p.row_ptr[i]; k < p.row_ptr[i + 1]; ++k) {
      const int64_t slot = fill[p.col[k]]++;
      p.trow[slot] = i;
      p.tpair[slot] = k;
    }
  return p;
}

// The encoder's operands as the tile GEMMs take them: W_enc^T as a transposed view (the BLAS reads it
// as is; bf16 in the bf16 mode) and the bias [N*D] in the same dtype. Checks shapes and that the bias needs W.
struct EncoderOperands {
  torch::Tensor weight_t;             // [in, out] view of W_enc ([out, in] as nn.Linear)
  // [N*D]: fp32, or bf16 when the GEMMs take bf16 operands: then it is added inside the bf16 GEMM and rounded
  // once with the product, as torch's bf16 addmm (rounding the product first and adding an fp32 bias after
  // could flip a relu gate where product and bias nearly cancel, and with it the gradient)
  c10::optional<torch::Tensor> bias;
};

// Checks the encoder's shapes, and that a bias comes with a weight.
inline void check_encoder(const c10::optional<torch::Tensor>& enc_weight, const c10::optional<torch::Tensor>& enc_bias,
                          int64_t width) {
  if (!enc_weight.has_value()) {
    TORCH_CHECK_VALUE(!enc_bias.has_value(), "enc_bias must be None when enc_weight is None");
    return;
  }
  // the tile loops read the weights through raw pointers: host memory only (a meta tensor has none)
  check_cpu_weight("enc_weight", enc_weight);
  check_cpu_weight("enc_bias", enc_bias);
  TORCH_CHECK_VALUE(enc_weight->dim() == 2 && enc_weight->size(0) == width && enc_weight->size(1) == width,
                    sfg::msg("enc_weight must have shape [N*D, N*D]=[", width, ", ", width, "], got ",
                             enc_weight->sizes()));
  if (enc_bias.has_value()) {
    TORCH_CHECK_VALUE(enc_bias->numel() == width,
                      sfg::msg("enc_bias must have shape [N*D]=[", width, "], got ", enc_bias->sizes()));
  }
}

inline EncoderOperands encoder_operands(const c10::optional<torch::Tensor>& enc_weight,
                                        const c10::optional<torch::Tensor>& enc_bias, int64_t width, bool bf16_gemm) {
  check_encoder(enc_weight, enc_bias, width);
  EncoderOperands e;
  if (!enc_weight.has_value()) return e;
  e.weight_t = enc_weight->to(bf16_gemm ? torch::kBFloat16 : torch::kFloat).contiguous().t();
  if (enc_bias.has_value())
    e.bias = enc_bias->to(bf16_gemm ? torch::kBFloat16 : torch::kFloat).contiguous().view({width});
  return e;
}

// sum_k a[k] * b[k] over one row; the simd reduction splits the sum into vector lanes.
SFG_INLINE float row_dot(const float* a, const float* b, int64_t count) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < count; ++k) acc += a[k] * b[k];
  return acc;
}

// out[k] += s * x[k]
SFG_INLINE void axpy(float* out, float s, const float* x, int64_t count) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) out[k] += s * x[k];
}

// L float lanes as one GCC vector (L = 4, 8, 16: one SSE/AVX/AVX-512 register in the matching clone);
// L = 1 is a plain float (the tail of a D that is not a multiple of 4).
template <int L>
struct Lanes {
  typedef float T __attribute__((vector_size(L * sizeof(float))));
};
template <>
struct Lanes<1> {
  typedef float T;
};

template <int L>
SFG_INLINE typename Lanes<L>::T load_lanes(const float* p) {
  typename Lanes<L>::T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int L>
SFG_INLINE void store_lanes(float* p, typename Lanes<L>::T v) {
  std::memcpy(p, &v, sizeof v);
}

template <int L>
SFG_INLINE float sum_of_lanes(typename Lanes<L>::T v) {
  if constexpr (L == 1) {
    return v;
  } else {
    float total = 0.f;
    for (int l = 0; l < L; ++l) total += v[l];
    return total;
  }
}

// sum_{s < count} term(s) in four independent accumulators: one would serialise every term on the
// add latency.
template <int L, typename Term>
SFG_INLINE typename Lanes<L>::T sum_terms(int64_t count, Term term) {
  using V = typename Lanes<L>::T;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t s = 0;
  for (; s + 4 <= count; s += 4) {
    a0 += term(s);
    a1 += term(s + 1);
    a2 += term(s + 2);
    a3 += term(s + 3);
  }
  for (; s < count; ++s) a0 += term(s);
  return (a0 + a1) + (a2 + a3);
}

// f(std::integral_constant<int, L>{}, d0) over the lanes [0, dim) in blocks of L = 16, 8, 4, then 1.
template <typename F>
SFG_INLINE void for_lane_blocks(int64_t dim, F f) {
  int64_t d0 = 0;
  for (; d0 + 16 <= dim; d0 += 16) f(std::integral_constant<int, 16>{}, d0);
  if (d0 + 8 <= dim) f(std::integral_constant<int, 8>{}, d0), d0 += 8;
  if (d0 + 4 <= dim) f(std::integral_constant<int, 4>{}, d0), d0 += 4;
  for (; d0 < dim; ++d0) f(std::integral_constant<int, 1>{}, d0);
}

// out[0:D) = sum_s R_s x_s over `count` pairs s, where x_s = x + idx[s] * D and R_s is the pair's weight
// (k_s = widx ? widx[s] : kbase + s indexes plan.weights): a scalar for kind scalar, a D-vector for kind
// vector. The sum runs in register accumulators of L lanes: summing into out[] in memory would chain
// every pair through a store and a reload.
template <bool kVec>
SFG_INLINE void mix_row_kind(const Plan& p, const float* x, const int64_t* idx, int64_t kbase, const int64_t* widx,
                             int64_t count, float* out) {
  const int64_t dim = p.dim;
  const float* w = p.weights.data();
  for_lane_blocks(dim, [&](auto lanes, int64_t d0) SFG_LAMBDA_INLINE {
    constexpr int L = decltype(lanes)::value;
    using V = typename Lanes<L>::T;
    store_lanes<L>(out + d0, sum_terms<L>(count, [&](int64_t s) SFG_LAMBDA_INLINE -> V {
      const V xs = load_lanes<L>(x + idx[s] * dim + d0);
      const int64_t k = widx ? widx[s] : kbase + s;
      if (kVec) return load_lanes<L>(w + k * dim + d0) * xs;
      return w[k] * xs;
    }));
  });
}

SFG_INLINE void mix_row(const Plan& p, const float* x, const int64_t* idx, int64_t kbase, const int64_t* widx,
                    int64_t count, float* out) {
  if (p.kind == kVector) mix_row_kind<true>(p, x, idx, kbase, widx, count, out);
  else mix_row_kind<false>(p, x, idx, kbase, widx, count, out);
}

// The identity decoder's score over lanes [d0, d0 + L) of one sample, in registers:
//   upper: sum_i a_i . s_i with s_i = sum_{j > i} b_j (a running suffix sum);
//   all: (sum_i a_i) . (sum_j b_j);  offdiag: that minus sum_i a_i . b_i.
template <int L>
SFG_INLINE float identity_lanes(const Plan& p, const float* left, const float* right, int64_t d0) {
  using V = typename Lanes<L>::T;
  const int64_t n = p.n, dim = p.dim;
  V acc = {}, s = {}, sa = {}, ab = {};
  for (int64_t i = n - 1; i >= 0; --i) {
    const V a = load_lanes<L>(left + i * dim + d0), b = load_lanes<L>(right + i * dim + d0);
    if (p.pairs == 0) {
      acc += a * s;
    } else {
      sa += a;
      ab += a * b;
    }
    s += b;
  }
  if (p.pairs != 0) acc = sa * s - (p.pairs == 2 ? ab : V{});
  return sum_of_lanes<L>(acc);
}

// Per-sample decode of the linear kinds: logit = sum_i left_i . t_i. `left` and `right` point at one
// sample's [N, D] rows; `t` is scratch of D floats.
SFG_INLINE float decode_sample(const Plan& p, const float* left, const float* right, float* t) {
  const int64_t n = p.n, dim = p.dim;
  float acc = 0.f;
  if (p.kind == kIdentity) {
    for_lane_blocks(dim, [&](auto lanes, int64_t d0) SFG_LAMBDA_INLINE {
      acc += identity_lanes<decltype(lanes)::value>(p, left, right, d0);
    });
    return acc;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1];
    if (begin == end) continue;
    mix_row(p, right, p.col.data() + begin, begin, nullptr, end - begin, t);
    acc += row_dot(left + i * dim, t, dim);
  }
  return acc;
}

// z = g * z (+ v when v is given), in place.
[[maybe_unused]] static SFG_HOT void scale_residual(float* z, float g, const float* v, int64_t count) {
  if (g != 1.f) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] *= g;
  }
  if (v != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] += v[k];
  }
}

// out[b] (+)= a_b . t_b for m rows (a_b = a + b * lda, t_b = t + b * ldt, `count` values each).
[[maybe_unused]] static SFG_HOT void rowdot_rows(const float* a, int64_t lda, const float* t, int64_t ldt, int64_t count,
                                                 int64_t m, float* out, bool accumulate) {
  for (int64_t b = 0; b < m; ++b) {
    const float d = row_dot(a + b * lda, t + b * ldt, count);
    out[b] = accumulate ? out[b] + d : d;
  }
}

// gamma * act(h) (+ v), in place on one tile of m rows of `width` floats. The activations use
// ATen's vectorised in-place ops on the (cache-resident) tile: a scalar max() loop here compiles
// to a branch that mispredicts on half the elements and cost more than the tanh.
inline void encoder_epilogue(const Plan& p, torch::Tensor& z_tile, const float* v, int64_t m, int64_t width) {
  switch (p.act) {
    case kActRelu: z_tile.relu_(); break;
    case kActTanh: z_tile.tanh_(); break;
    case kActSigmoid: z_tile.sigmoid_(); break;
    case kActSilu: at::silu_(z_tile); break;
    case kActGelu: at::gelu_(z_tile); break;
    default: break;
  }
  scale_residual(z_tile.data_ptr<float>(), p.gamma, p.residual ? v : nullptr, m * width);
}

// bf16 staging of the tile GEMMs. The conversions are the plan's own loops (compiled per ISA) on row-
// strided views, not at::Tensor::copy_: torch's CPU build converts through an AVX2 TensorIterator
// kernel, which profiled at 5-7% of a bf16 inference.

// m rows of n fp32 values (row stride lds) -> bf16 (round to nearest even, as torch), row stride ldd.
[[maybe_unused]] static SFG_HOT void narrow_rows_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd,
                                                      int64_t m, int64_t n) {
  for (int64_t b = 0; b < m; ++b) {
    const float* s = src + b * lds;
    uint16_t* d = dst + b * ldd;
    for (int64_t k = 0; k < n; ++k) d[k] = cpu::float_to_bf16(s[k]);
  }
}

// m rows of n bf16 values (row stride lds) widened into fp32 rows (row stride ldd): stored, or added.
[[maybe_unused]] static SFG_HOT void widen_rows_bf16(const uint16_t* src, int64_t lds, float* dst, int64_t ldd,
                                                     int64_t m, int64_t n, bool accumulate) {
  for (int64_t b = 0; b < m; ++b) {
    const uint16_t* s = src + b * lds;
    float* d = dst + b * ldd;
    if (accumulate) {
      for (int64_t k = 0; k < n; ++k) d[k] += cpu::bf16_to_float(s[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) d[k] = cpu::bf16_to_float(s[k]);
    }
  }
}

inline void check_unit_columns(const torch::Tensor& t, torch::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && (t.size(1) <= 1 || t.stride(1) == 1),
              "internal: bf16 staging needs a row-strided 2-D view with unit column stride");
}

// The fp32 tile `a` (a row-strided view) rounded to bf16 into the top-left corner of `a16`; returns that view.
inline torch::Tensor stage_bf16(const torch::Tensor& a, torch::Tensor& a16) {
  check_unit_columns(a, torch::kFloat);
  auto view = a16.narrow(0, 0, a.size(0)).narrow(1, 0, a.size(1));
  narrow_rows_bf16(a.data_ptr<float>(), a.stride(0), reinterpret_cast<uint16_t*>(view.data_ptr()), view.stride(0),
                   a.size(0), a.size(1));
  return view;
}

// out (fp32, a row-strided view) = or += a16 @ w16: the bf16 product (fp32 accumulation, bf16 result, as
// torch's bf16 matmul) formed in the staging tile o16, widened on the way out.
inline void mm_widened(torch::Tensor& out, const torch::Tensor& a16, const torch::Tensor& w16, torch::Tensor& o16,
                       bool accumulate) {
  check_unit_columns(out, torch::kFloat);
  auto o = o16.narrow(0, 0, out.size(0)).narrow(1, 0, out.size(1));
  at::mm_out(o, a16, w16);
  widen_rows_bf16(reinterpret_cast<const uint16_t*>(o.data_ptr()), o.stride(0), out.data_ptr<float>(), out.stride(0),
                  out.size(0), out.size(1), accumulate);
}

// A GEMM of the tile: out (fp32) = a (fp32 tile) @ w (+ bias), where w and bias are fp32, or bf16 for the
// bf16 mode. In bf16 mode the tile is rounded to bf16 into `a16`, the product (and bias) is formed by the
// BLAS's bf16 path (fp32 accumulation, bf16 result, as torch's own bf16 addmm) into `out16`, then widened.
// `out` may be a row-strided view (the BLAS takes ldc).
inline void tile_mm(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& w, torch::Tensor& a16,
                    torch::Tensor& out16, const c10::optional<torch::Tensor>& bias = c10::nullopt) {
  if (w.scalar_type() != torch::kBFloat16) {
    if (bias.has_value()) at::addmm_out(out, *bias, a, w);
    else at::mm_out(out, a, w);
    return;
  }
  if (!bias.has_value()) {
    mm_widened(out, stage_bf16(a, a16), w, out16, false);
    return;
  }
  check_unit_columns(out, torch::kFloat);
  auto o = out16.narrow(0, 0, out.size(0)).narrow(1, 0, out.size(1));
  at::addmm_out(o, *bias, stage_bf16(a, a16), w);
  widen_rows_bf16(reinterpret_cast<const uint16_t*>(o.data_ptr()), o.stride(0), out.data_ptr<float>(), out.stride(0),
                  out.size(0), out.size(1), false);
}

}  // namespace detail
}  // namespace sfg

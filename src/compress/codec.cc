#include "compress/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <fmt/format.h>

#include "compress/codec_math.h"
#include "core/simd.h"

namespace shardps::compress {
namespace {

// For each byte of onebit's sign bits, the float sign masks of its eight elements (a constant
// table: eight elements per 32-byte row, so the decode loop is a load, an or and a store).
struct SignMasks {
  uint32_t m[256][8];
};
constexpr SignMasks MakeSignMasks() {
  SignMasks t{};
  for (uint32_t b = 0; b < 256; ++b)
    for (uint32_t k = 0; k < 8; ++k) t.m[b][k] = ((b >> k) & 1u) << 31;
  return t;
}
constexpr SignMasks kSignMasks = MakeSignMasks();

__extension__ typedef unsigned __int128 Uint128;  // k * position needs up to 80 bits

uint64_t Blocks(uint64_t numel, uint32_t block) { return (numel + block - 1) / block; }

float LoadF(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

uint32_t LoadU(const uint8_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}

uint16_t LoadH(const uint8_t* p, uint64_t i) {
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  return h;
}

// x + residual, block by block, into a scratch array (error feedback), or x itself.
const float* WithResidual(const float* x, const float* residual, uint64_t n,
                          std::vector<float>* scratch) {
  if (!residual) return x;
  scratch->resize(n);
  for (uint64_t i = 0; i < n; ++i) (*scratch)[i] = x[i] + residual[i];
  return scratch->data();
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 <-> fp32 with the F16C instructions where the CPU has them (what the scalar functions
// compute, NaN payloads aside): 8 elements per instruction.
bool DetectF16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const unsigned osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
  if ((c & (osxsave | avx | f16c)) != (osxsave | avx | f16c)) return false;
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));  // the OS saves the YMM registers
  return (lo & 6u) == 6u;
}
// A fact of the machine, detected once (cpuid can cost a hypervisor exit).
bool HasF16c() {
  static const bool has = DetectF16c();
  return has;
}

__attribute__((target("avx,f16c"))) void HalvesToFloats(const uint16_t* h, uint64_t n, float* out,
                                                        bool add) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
    if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(out + i));
    _mm256_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) out[i] = add ? out[i] + HalfToFloat(h[i]) : HalfToFloat(h[i]);
}

__attribute__((target("avx,f16c"))) void FloatsToHalves(const float* x, uint64_t n, uint16_t* h) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) h[i] = FloatToHalf(x[i]);
}
#else
bool HasF16c() { return false; }
void HalvesToFloats(const uint16_t*, uint64_t, float*, bool) {}
void FloatsToHalves(const float*, uint64_t, uint16_t*) {}
#endif

template <typename Decoded>
void UpdateResidual(const float* y, uint64_t n, float* residual, Decoded decoded) {
  for (uint64_t i = 0; i < n; ++i) residual[i] = y[i] - decoded(i);
}

}  // namespace

ChunkCodec ForChunk(const Compression& c, uint64_t tensor_numel, uint64_t offset, uint64_t numel) {
  ChunkCodec cc{c.codec, c.block, 0};
  if (c.codec == Codec::kTopK) {
    uint64_t k = c.count;
    if (k == 0) {
      k = static_cast<uint64_t>(std::llround(c.ratio * static_cast<double>(tensor_numel)));
      k = std::max<uint64_t>(k, 1);
    }
    k = std::min(k, tensor_numel);
    // Shares by cumulative position: floor(k * end / N) - floor(k * begin / N) sums to k.
    auto share = [&](uint64_t at) {
      return static_cast<uint64_t>((static_cast<Uint128>(k) * at) / tensor_numel);
    };
    // At most (numel - 1) / 2 per chunk, so that an encoding never exceeds the chunk's fp32
    // bytes: it must fit the landing buffer it is written into before the server can check it.
    cc.k = std::min(share(offset + numel) - share(offset), (numel - 1) / 2);
  }
  return cc;
}

uint64_t EncodedBytes(const ChunkCodec& c, uint64_t n) {
  switch (c.codec) {
    case Codec::kNone:
      return 4 * n;
    case Codec::kFp16:
    case Codec::kBf16:
      return 2 * n;
    case Codec::kInt8:
      return 4 * Blocks(n, c.block) + n;
    case Codec::kOneBit:
      return 4 * Blocks(n, c.block) + (n + 7) / 8;
    case Codec::kTopK:
      return TopKBytes(c.k);
  }
  return 0;
}

uint64_t ParamBytes(Codec codec, uint64_t n) { return codec == Codec::kNone ? 4 * n : 2 * n; }

Status Check(Codec codec, uint32_t block, const void* data, uint64_t bytes, uint64_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (p == nullptr && bytes > 0) return Status::InvalidArgument("encoded gradient without data");
  if ((codec == Codec::kInt8 || codec == Codec::kOneBit) && block == 0)
    return Status::InvalidArgument("block size 0");
  auto length = [&](uint64_t want) {
    if (bytes == want) return Status::OK();
    return Status::InvalidArgument(fmt::format("{} bytes of {} for {} elements (expected {})",
                                               bytes, CodecName(codec), n, want));
  };
  auto scales = [&](uint64_t nb) {
    for (uint64_t b = 0; b < nb; ++b) {
      float s = LoadF(p + 4 * b);
      if (!ValidScale(s))
        return Status::InvalidArgument(fmt::format(
            "{} scale {} of block {} is not a finite non-negative number", CodecName(codec), s, b));
    }
    return Status::OK();
  };
  switch (codec) {
    case Codec::kNone:
      return length(4 * n);
    case Codec::kFp16:
    case Codec::kBf16:
      return length(2 * n);
    case Codec::kInt8: {
      SHARDPS_RETURN_IF_ERROR(length(4 * Blocks(n, block) + n));
      return scales(Blocks(n, block));
    }
    case Codec::kOneBit: {
      uint64_t nb = Blocks(n, block);
      SHARDPS_RETURN_IF_ERROR(length(4 * nb + (n + 7) / 8));
      SHARDPS_RETURN_IF_ERROR(scales(nb));
      if (n % 8 != 0 && (p[4 * nb + n / 8] >> (n % 8)) != 0)
        return Status::InvalidArgument("onebit padding bits past the last element are set");
      return Status::OK();
    }
    case Codec::kTopK: {
      if (bytes < 4) return length(4);
      uint64_t k = LoadU(p);
      if (k > n) return Status::InvalidArgument(fmt::format("topk of {} elements out of {}", k, n));
      SHARDPS_RETURN_IF_ERROR(length(TopKBytes(k)));
      const uint8_t* idx = p + 4;
      uint64_t prev = 0;
      for (uint64_t j = 0; j < k; ++j) {
        uint64_t i = LoadU(idx + 4 * j);
        if (i >= n)
          return Status::InvalidArgument(
              fmt::format("topk index {} out of range for {} elements", i, n));
        if (j > 0 && i <= prev)
          return Status::InvalidArgument(
              fmt::format("topk index {} {} (indices must be strictly ascending)", i,
                          i == prev ? "repeated" : "out of order"));
        prev = i;
      }
      return Status::OK();
    }
  }
  return Status::InvalidArgument(fmt::format("unknown codec {}", static_cast<int>(codec)));
}

void Encode(const ChunkCodec& c, const float* x, uint64_t n, void* out, float* residual) {
  auto* o = static_cast<uint8_t*>(out);
  std::vector<float> scratch;
  const float* y = WithResidual(x, residual, n, &scratch);
  switch (c.codec) {
    case Codec::kNone:
      std::memcpy(o, y, 4 * n);
      if (residual) std::fill(residual, residual + n, 0.0f);
      return;
    case Codec::kFp16:
    case Codec::kBf16: {
      const bool half = c.codec == Codec::kFp16;
      for (uint64_t i = 0; i < n; ++i) {
        uint16_t h = half ? FloatToHalf(y[i]) : FloatToBf16(y[i]);
        std::memcpy(o + 2 * i, &h, 2);
      }
      if (residual)
        UpdateResidual(y, n, residual, [&](uint64_t i) {
          uint16_t h = LoadH(o, i);
          return half ? HalfToFloat(h) : Bf16ToFloat(h);
        });
      return;
    }
    case Codec::kInt8: {
      const uint64_t nb = Blocks(n, c.block);
      auto* q = reinterpret_cast<int8_t*>(o + 4 * nb);
      for (uint64_t b = 0; b < nb; ++b) {
        const uint64_t lo = b * c.block, hi = std::min<uint64_t>(n, lo + c.block);
        float m = 0.0f;
        for (uint64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(y[i]));
        if (!std::isfinite(m)) m = 0.0f;  // a non-finite gradient block is sent as zeros
        const float scale = Int8Scale(m);
        const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        std::memcpy(o + 4 * b, &scale, 4);
        for (uint64_t i = lo; i < hi; ++i) q[i] = QuantizeInt8(y[i], inv);
        if (residual)
          for (uint64_t i = lo; i < hi; ++i) residual[i] = y[i] - DequantizeInt8(q[i], scale);
      }
      return;
    }
    case Codec::kOneBit: {
      const uint64_t nb = Blocks(n, c.block);
      uint8_t* bits = o + 4 * nb;
      std::memset(bits, 0, (n + 7) / 8);
      for (uint64_t b = 0; b < nb; ++b) {
        const uint64_t lo = b * c.block, hi = std::min<uint64_t>(n, lo + c.block);
        double sum = 0;
        for (uint64_t i = lo; i < hi; ++i) sum += std::fabs(y[i]);
        float scale = static_cast<float>(sum / static_cast<double>(hi - lo));
        if (!std::isfinite(scale)) scale = 0.0f;
        std::memcpy(o + 4 * b, &scale, 4);
        for (uint64_t i = lo; i < hi; ++i)
          if (std::signbit(y[i])) bits[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        if (residual)
          for (uint64_t i = lo; i < hi; ++i) residual[i] = y[i] - OneBitValue(bits, i, scale);
      }
      return;
    }
    case Codec::kTopK: {
      const uint64_t k = std::min(c.k, n);
      std::vector<uint32_t> idx(n);
      std::iota(idx.begin(), idx.end(), 0u);
      auto larger = [&](uint32_t a, uint32_t b) {
        float fa = std::fabs(y[a]), fb = std::fabs(y[b]);
        return fa > fb || (fa == fb && a < b);  // ties: the lower index, so it is repeatable
      };
      if (k < n)
        std::nth_element(idx.begin(), idx.begin() + static_cast<ptrdiff_t>(k), idx.end(), larger);
      idx.resize(k);
      std::sort(idx.begin(), idx.end());
      const uint32_t k32 = static_cast<uint32_t>(k);
      std::memcpy(o, &k32, 4);
      std::memcpy(o + 4, idx.data(), 4 * k);
      for (uint64_t j = 0; j < k; ++j) std::memcpy(o + 4 + 4 * k + 4 * j, &y[idx[j]], 4);
      if (residual) {
        if (y != residual) std::memcpy(residual, y, 4 * n);
        for (uint32_t i : idx) residual[i] = 0.0f;
      }
      return;
    }
  }
}

SHARDPS_VECTOR_CLONES
void DecodeRange(Codec codec, uint32_t block, const void* data, uint64_t n, uint64_t lo,
                 uint64_t hi, float* out, bool add) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (hi <= lo) return;  // nothing to decode (and out may be null)
  const uint64_t len = hi - lo;
  switch (codec) {
    case Codec::kNone: {
      const auto* f = reinterpret_cast<const float*>(p) + lo;
      if (add) {
        for (uint64_t i = 0; i < len; ++i) out[i] += f[i];
      } else {
        std::memcpy(out, f, 4 * len);
      }
      return;
    }
    case Codec::kFp16:
    case Codec::kBf16: {
      const auto* h = reinterpret_cast<const uint16_t*>(p) + lo;
      if (codec == Codec::kFp16 && HasF16c()) {
        HalvesToFloats(h, len, out, add);
      } else if (codec == Codec::kFp16) {
        if (add) {
          for (uint64_t i = 0; i < len; ++i) out[i] += HalfToFloat(h[i]);
        } else {
          for (uint64_t i = 0; i < len; ++i) out[i] = HalfToFloat(h[i]);
        }
      } else {
        if (add) {
          for (uint64_t i = 0; i < len; ++i) out[i] += Bf16ToFloat(h[i]);
        } else {
          for (uint64_t i = 0; i < len; ++i) out[i] = Bf16ToFloat(h[i]);
        }
      }
      return;
    }
    case Codec::kInt8: {
      const auto* q = reinterpret_cast<const int8_t*>(p + 4 * Blocks(n, block));
      for (uint64_t i = lo; i < hi;) {
        const uint64_t b = i / block, end = std::min<uint64_t>(hi, (b + 1) * block);
        const float s = LoadF(p + 4 * b);
        float* dst = out + (i - lo);
        const int8_t* src = q + i;
        const uint64_t m = end - i;
        if (add) {
          for (uint64_t j = 0; j < m; ++j) dst[j] += DequantizeInt8(src[j], s);
        } else {
          for (uint64_t j = 0; j < m; ++j) dst[j] = DequantizeInt8(src[j], s);
        }
        i = end;
      }
      return;
    }
    case Codec::kOneBit: {
      const uint8_t* bits = p + 4 * Blocks(n, block);
      for (uint64_t i = lo; i < hi;) {
        const uint64_t b = i / block, end = std::min<uint64_t>(hi, (b + 1) * block);
        const float s = LoadF(p + 4 * b);
        float* dst = out - lo;
        uint64_t j = i;
        if (j % 8 == 0) {
          // Whole bytes: eight elements each, the bit moved into the float's sign.
          const uint32_t sb = FloatBits(s);
          for (; j + 8 <= end; j += 8) {
            const uint32_t* sign = kSignMasks.m[bits[j >> 3]];
            float v[8];
            for (uint32_t t = 0; t < 8; ++t) v[t] = BitsFloat(sb | sign[t]);
            if (add) {
              for (uint32_t t = 0; t < 8; ++t) dst[j + t] += v[t];
            } else {
              for (uint32_t t = 0; t < 8; ++t) dst[j + t] = v[t];
            }
          }
        }
        if (add) {
          for (; j < end; ++j) dst[j] += OneBitValue(bits, j, s);
        } else {
          for (; j < end; ++j) dst[j] = OneBitValue(bits, j, s);
        }
        i = end;
      }
      return;
    }
    case Codec::kTopK: {
      if (!add) std::memset(out, 0, 4 * len);
      const uint64_t k = LoadU(p);
      const auto* idx = reinterpret_cast<const uint32_t*>(p + 4);
      const uint8_t* vals = p + 4 + 4 * k;
      // Indices ascend (Check): the range's first is found by bisection.
      uint64_t j = static_cast<uint64_t>(
          std::lower_bound(idx, idx + k,
                           static_cast<uint32_t>(std::min<uint64_t>(lo, UINT32_MAX))) -
          idx);
      for (; j < k && idx[j] < hi; ++j) out[idx[j] - lo] += LoadF(vals + 4 * j);
      return;
    }
  }
}

SHARDPS_VECTOR_CLONES
void EncodeParams(Codec codec, const float* x, uint64_t lo, uint64_t hi, void* out) {
  if (hi <= lo) return;
  if (codec == Codec::kNone) {
    std::memcpy(static_cast<float*>(out) + lo, x + lo, 4 * (hi - lo));
    return;
  }
  auto* h = static_cast<uint16_t*>(out);
  if (codec == Codec::kFp16 && HasF16c()) {
    FloatsToHalves(x + lo, hi - lo, h + lo);
  } else if (codec == Codec::kFp16) {
    for (uint64_t i = lo; i < hi; ++i) h[i] = FloatToHalf(x[i]);
  } else {
    for (uint64_t i = lo; i < hi; ++i) h[i] = FloatToBf16(x[i]);
  }
}

void DecodeParams(Codec codec, const void* data, uint64_t numel, float* out) {
  DecodeRange(codec, 256, data, numel, 0, numel, out, false);
}

}  // namespace shardps::compress

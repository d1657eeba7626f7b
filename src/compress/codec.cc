#include "compress/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
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

SHARDPS_VECTOR_CLONES
void Encode(const ChunkCodec& c, const float* x, uint64_t n, void* out, float* residual) {
  auto* o = static_cast<uint8_t*>(out);
  // With error feedback the input is x + residual, formed in the residual itself, which each
  // codec then overwrites (element by element, after reading it) with what it lost.
  const float* y = x;
  if (residual) {
    for (uint64_t i = 0; i < n; ++i) residual[i] += x[i];
    y = residual;
  }
  switch (c.codec) {
    case Codec::kNone:
      std::memcpy(o, y, 4 * n);
      if (residual) std::fill(residual, residual + n, 0.0f);
      return;
    case Codec::kFp16:
    case Codec::kBf16: {
      auto* h = reinterpret_cast<uint16_t*>(o);
      const bool half = c.codec == Codec::kFp16;
      if (half && HasF16c()) {
        FloatsToHalves(y, n, h);
      } else {
        for (uint64_t i = 0; i < n; ++i) h[i] = half ? FloatToHalf(y[i]) : FloatToBf16(y[i]);
      }
      if (residual) {
        if (half) {
          for (uint64_t i = 0; i < n; ++i) residual[i] = y[i] - HalfToFloat(h[i]);
        } else {
          for (uint64_t i = 0; i < n; ++i) residual[i] = y[i] - Bf16ToFloat(h[i]);
        }
      }
      return;
    }
    case Codec::kInt8: {
      const uint64_t nb = Blocks(n, c.block);
      auto* q = reinterpret_cast<int8_t*>(o + 4 * nb);
      for (uint64_t b = 0; b < nb; ++b) {
        const uint64_t lo = b * c.block, hi = std::min<uint64_t>(n, lo + c.block);
        float part[8] = {};  // partial maxima, so that the loop vectorizes
        uint64_t i = lo;
        for (; i + 8 <= hi; i += 8)
          for (uint32_t t = 0; t < 8; ++t) part[t] = std::max(part[t], std::fabs(y[i + t]));
        float m = 0.0f;
        for (; i < hi; ++i) m = std::max(m, std::fabs(y[i]));
        for (float v : part) m = std::max(m, v);
        if (!std::isfinite(m)) m = 0.0f;  // a non-finite gradient block is sent as zeros
        const float scale = Int8Scale(m);
        const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        std::memcpy(o + 4 * b, &scale, 4);
        for (i = lo; i < hi; ++i) q[i] = QuantizeInt8(y[i], inv);
        if (residual)
          for (i = lo; i < hi; ++i) residual[i] = y[i] - DequantizeInt8(q[i], scale);
      }
      return;
    }
    case Codec::kOneBit: {
      const uint64_t nb = Blocks(n, c.block);
      uint8_t* bits = o + 4 * nb;
      std::memset(bits, 0, (n + 7) / 8);
      for (uint64_t b = 0; b < nb; ++b) {
        const uint64_t lo = b * c.block, hi = std::min<uint64_t>(n, lo + c.block);
        float part[8] = {};  // partial sums, so that the loop vectorizes
        uint64_t i = lo;
        for (; i + 8 <= hi; i += 8)
          for (uint32_t t = 0; t < 8; ++t) part[t] += std::fabs(y[i + t]);
        float sum = 0.0f;
        for (; i < hi; ++i) sum += std::fabs(y[i]);
        for (float v : part) sum += v;
        float scale = sum / static_cast<float>(hi - lo);
        if (!std::isfinite(scale)) scale = 0.0f;
        std::memcpy(o + 4 * b, &scale, 4);
        for (i = lo; i < hi; ++i)
          bits[i >> 3] |= static_cast<uint8_t>((FloatBits(y[i]) >> 31) << (i & 7));
        if (residual) {
          // The decoded value is the scale with the element's sign: y - copysign(scale, y).
          const uint32_t sb = FloatBits(scale);
          for (i = lo; i < hi; ++i)
            residual[i] = y[i] - BitsFloat(sb | (FloatBits(y[i]) & 0x80000000u));
        }
      }
      return;
    }
    case Codec::kTopK: {
      const uint64_t k = std::min(c.k, n);
      const uint32_t k32 = static_cast<uint32_t>(k);
      std::memcpy(o, &k32, 4);
      if (k == 0) return;  // nothing sent: the residual keeps everything
      // The k-th largest magnitude t (NaN counts as infinite, so that it is sent and shows),
      // then, in ascending index order, every element above t and the first ones equal to it
      // until there are k: the ties go to the lower indices, so the choice is repeatable.
      // t is found by radix selection on the magnitudes' bits (for floats >= 0 their order):
      // a histogram of the top 11 bits finds the bucket that holds it, then a selection
      // among that bucket's elements only.
      std::vector<uint32_t> key(n);
      for (uint64_t i = 0; i < n; ++i)
        key[i] = std::isnan(y[i]) ? 0x7f800000u : (FloatBits(y[i]) & 0x7fffffffu);
      std::vector<uint64_t> hist(2048, 0);
      for (uint64_t i = 0; i < n; ++i) hist[key[i] >> 20]++;
      uint64_t bucket = 2048, higher = 0;  // elements in buckets above `bucket`
      while (bucket > 0 && higher + hist[bucket - 1] < k) higher += hist[--bucket];
      --bucket;  // holds the k-th largest: (k - higher)-th largest of it
      std::vector<uint32_t> in;
      in.reserve(hist[bucket]);
      for (uint64_t i = 0; i < n; ++i)
        if ((key[i] >> 20) == bucket) in.push_back(key[i]);
      const uint64_t r = k - higher;
      std::nth_element(in.begin(), in.begin() + static_cast<ptrdiff_t>(r - 1), in.end(),
                       std::greater<uint32_t>());
      const uint32_t t = in[r - 1];
      const std::vector<uint32_t>& mag = key;  // compared as bits, like the selection
      uint64_t above = 0;
      for (uint64_t i = 0; i < n; ++i) above += mag[i] > t;
      uint64_t ties = k - above;
      auto* idx = reinterpret_cast<uint32_t*>(o + 4);
      uint8_t* vals = o + 4 + 4 * k;
      uint64_t j = 0;
      for (uint64_t i = 0; i < n && j < k; ++i) {
        if (mag[i] > t || (mag[i] == t && ties > 0)) {
          if (!(mag[i] > t)) --ties;
          idx[j] = static_cast<uint32_t>(i);
          std::memcpy(vals + 4 * j, &y[i], 4);
          ++j;
          if (residual) residual[i] = 0.0f;
        }
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

// The element arithmetic of the codecs, shared by the CPU path (src/compress/codec.cc) and the
// CUDA kernels (the CUDA issue): every function is __host__ __device__ under nvcc, so the CPU
// tests cover what the GPU runs. Conversions round to nearest, ties to even, like the hardware
// instructions they stand in for.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SHARDPS_HD __host__ __device__
#else
#define SHARDPS_HD
#endif

namespace shardps::compress {

SHARDPS_HD inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

SHARDPS_HD inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16: overflow gives infinity, NaN stays a (quiet) NaN, subnormals are kept.
SHARDPS_HD inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t out;
  if (u >= 0x47800000u) {  // |f| >= 65536 (or inf, NaN): beyond what rounds to a finite half
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Adding 0.5 puts the half's subnormal bits at the bottom of the float's mantissa, rounded
    // by the addition itself (to nearest even).
    const float magic = 0.5f;
    out = FloatBits(BitsFloat(u) + magic) - FloatBits(magic);
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round to nearest even
    out = u >> 13;           // a carry out of the mantissa gives the next exponent, up to inf
  }
  return static_cast<uint16_t>(out | sign);
}

// Branch-free (selects), so that decode loops vectorize.
SHARDPS_HD inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent, mantissa in place
  const uint32_t e = em & 0x0f800000u;
  const uint32_t normal = em + 0x38000000u;   // exponent + 112
  const uint32_t special = em + 0x70000000u;  // exponent 31 -> 255: inf, NaN
  // Zero or subnormal: 2^-14 * (1 + m / 1024) - 2^-14 = m * 2^-24, exact.
  const uint32_t sub = FloatBits(BitsFloat(em + 0x38800000u) - BitsFloat(0x38800000u));
  uint32_t r = e == 0x0f800000u ? special : normal;
  r = e == 0 ? sub : r;
  return BitsFloat(r | sign);
}

// bfloat16: the upper half of a float, rounded to nearest even; NaN stays a (quiet) NaN.
SHARDPS_HD inline uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

SHARDPS_HD inline float Bf16ToFloat(uint16_t h) {
  return BitsFloat(static_cast<uint32_t>(h) << 16);
}

// int8: q = round(x / scale) in [-127, 127], with scale = max |x| of the block / 127.
SHARDPS_HD inline float Int8Scale(float max_abs) { return max_abs / 127.0f; }

SHARDPS_HD inline int8_t QuantizeInt8(float x, float inv_scale) {
  float q = rintf(x * inv_scale);
  q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
  return static_cast<int8_t>(q);
}

SHARDPS_HD inline float DequantizeInt8(int8_t q, float scale) {
  return static_cast<float>(q) * scale;
}

// onebit: a set bit is -scale, a clear bit +scale, with scale = mean |x| of the block.
SHARDPS_HD inline float OneBitValue(const uint8_t* bits, uint64_t i, float scale) {
  return ((bits[i >> 3] >> (i & 7)) & 1u) ? -scale : scale;
}

// A scale as a decoder accepts it: finite and not negative.
SHARDPS_HD inline bool ValidScale(float s) { return s >= 0.0f && s <= 3.402823466e38f; }

}  // namespace shardps::compress

// The fused update of a GPU-resident chunk (docs/gpu.md): in one pass over memory, decode the
// pushed gradient (any codec), add the step's running sum, apply the optimizer and publish the new
// parameters (encoded for compressed pulls). The arithmetic is here, in __host__ __device__
// functions: nvcc compiles them into the kernels (kernels.cu) and g++ into the host twin
// (twin.cc), which the CPU tests compare with the CPU update rule element for element.
//
// Memory: every pointer is in the memory of the device that runs the pass (GPU memory for the
// kernels, host memory for the twin); an encoded gradient starts 4-byte aligned.
#pragma once

#include <cstdint>

#include "compress/codec_math.h"
#include "server/optimizer_math.h"

namespace shardps::gpu {

// The codecs as template arguments (values of shardps::Codec).
enum CodecCode : int {
  kCodecNone = 0,
  kCodecFp16 = 1,
  kCodecBf16 = 2,
  kCodecInt8 = 3,
  kCodecOneBit = 4,
  kCodecTopK = 5
};

// A gradient as it was pushed (docs/compression.md), of `numel` elements, taken as weight * g.
struct EncodedGrad {
  const uint8_t* data = nullptr;
  uint64_t numel = 0;
  uint32_t block = 256;  // int8, onebit
  float weight = 1.0f;
};

// params = rule(params, scale * (w * grad + extra)), with the optimizer state m, v (as the rule
// needs them) advanced, and the new parameters also written encoded into `publish` (when set).
struct UpdateArgs {
  float* params = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  EncodedGrad grad;
  const float* extra = nullptr;  // numel floats, or null
  void* publish = nullptr;       // numel parameters encoded with publish_codec, or null
  int publish_codec = kCodecNone;
  uint64_t numel = 0;
  server::StepParams k{};
};

// dst = w * grad (first) or dst += w * grad.
struct FoldArgs {
  float* dst = nullptr;
  EncodedGrad grad;
  uint64_t numel = 0;
  bool first = false;
};

// Topk is decoded a tile of elements at a time (the tile's values scattered into a zeroed
// array: shared memory on the GPU, 16 KiB); the dense codecs element by element. A tile's fixed
// cost (finding its run of indices, two barriers) is paid once per 4096 elements: with 1024 the
// sgd update of a 256 MiB topk chunk on an H200 took 0.44 ms against 0.30 ms for fp32.
inline constexpr uint32_t kTopKTile = 4096;

SHARDPS_HD inline uint64_t BlocksOf(uint64_t numel, uint32_t block) {
  return (numel + block - 1) / block;
}

// Element i of a dense encoding (every codec but topk), unweighted.
template <int kCodec>
SHARDPS_HD inline float DecodeElement(const EncodedGrad& g, uint64_t i) {
  if constexpr (kCodec == kCodecNone) {
    return reinterpret_cast<const float*>(g.data)[i];
  } else if constexpr (kCodec == kCodecFp16) {
    return compress::HalfToFloat(reinterpret_cast<const uint16_t*>(g.data)[i]);
  } else if constexpr (kCodec == kCodecBf16) {
    return compress::Bf16ToFloat(reinterpret_cast<const uint16_t*>(g.data)[i]);
  } else if constexpr (kCodec == kCodecInt8) {
    const float s = reinterpret_cast<const float*>(g.data)[i / g.block];
    const uint8_t* q = g.data + 4 * BlocksOf(g.numel, g.block);
    return compress::DequantizeInt8(static_cast<int8_t>(q[i]), s);
  } else {
    static_assert(kCodec == kCodecOneBit, "topk is decoded by tile");
    const float s = reinterpret_cast<const float*>(g.data)[i / g.block];
    return compress::OneBitValue(g.data + 4 * BlocksOf(g.numel, g.block), i, s);
  }
}

// Topk: the count, then `count` ascending indices, then their values.
SHARDPS_HD inline uint32_t TopKCount(const EncodedGrad& g) {
  return reinterpret_cast<const uint32_t*>(g.data)[0];
}
SHARDPS_HD inline const uint32_t* TopKIndices(const EncodedGrad& g) {
  return reinterpret_cast<const uint32_t*>(g.data) + 1;
}
SHARDPS_HD inline const float* TopKValues(const EncodedGrad& g) {
  return reinterpret_cast<const float*>(g.data) + 1 + TopKCount(g);
}
// The first j with idx[j] >= at.
SHARDPS_HD inline uint32_t TopKLowerBound(const EncodedGrad& g, uint64_t at) {
  const uint32_t* idx = TopKIndices(g);
  uint32_t lo = 0, hi = TopKCount(g);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (idx[mid] < at) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}
// Value j's place in the tile that starts at element `lo`: as the CPU decodes it, 0 + value.
SHARDPS_HD inline float TopKTileValue(const EncodedGrad& g, uint32_t j) {
  return 0.0f + TopKValues(g)[j];
}

// The gradient element the optimizer takes: scale is applied by StepElement.
SHARDPS_HD inline float Combined(const UpdateArgs& a, float decoded, uint64_t i) {
  const float g = a.grad.weight * decoded;
  return a.extra ? g + a.extra[i] : g;
}

template <int kOpt>
SHARDPS_HD inline void UpdateElement(const UpdateArgs& a, uint64_t i, float decoded) {
  float* m = nullptr;
  float* v = nullptr;
  if constexpr (kOpt != server::kOptSgd) m = a.m + i;
  if constexpr (kOpt == server::kOptAdam) v = a.v + i;
  const float p = server::StepElement<kOpt>(a.k, a.params[i], Combined(a, decoded, i), m, v);
  a.params[i] = p;
  if (a.publish) {
    if (a.publish_codec == kCodecFp16) {
      static_cast<uint16_t*>(a.publish)[i] = compress::FloatToHalf(p);
    } else if (a.publish_codec == kCodecBf16) {
      static_cast<uint16_t*>(a.publish)[i] = compress::FloatToBf16(p);
    } else {
      static_cast<float*>(a.publish)[i] = p;
    }
  }
}

SHARDPS_HD inline void FoldElement(const FoldArgs& a, uint64_t i, float decoded) {
  const float g = a.grad.weight * decoded;
  a.dst[i] = a.first ? g : a.dst[i] + g;
}

// Host twins of the kernels: the same passes, one element after the other (twin.cc).
void UpdateOnHost(int optimizer, int codec, const UpdateArgs& a);
void FoldOnHost(int codec, const FoldArgs& a);

}  // namespace shardps::gpu

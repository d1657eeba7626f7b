// The host twins of the kernels (kernels.cu): the same element functions of fused_update.h, run
// one element after the other; topk tile by tile as the kernel decodes it.
#include <algorithm>
#include <vector>

#include "gpu/fused_update.h"

namespace shardps::gpu {
namespace {

// body(i, decoded) for every element, decoding as the kernels do.
template <int kCodec, typename Body>
void ForEachDecoded(const EncodedGrad& g, uint64_t numel, const Body& body) {
  if constexpr (kCodec == kCodecTopK) {
    std::vector<float> tile(kTopKTile);
    const uint32_t* idx = TopKIndices(g);
    for (uint64_t lo = 0; lo < numel; lo += kTopKTile) {
      const uint64_t hi = lo + kTopKTile < numel ? lo + kTopKTile : numel;
      std::fill(tile.begin(), tile.end(), 0.0f);
      for (uint32_t j = TopKLowerBound(g, lo); j < TopKCount(g) && idx[j] < hi; ++j)
        tile[idx[j] - lo] = TopKTileValue(g, j);
      for (uint64_t i = lo; i < hi; ++i) body(i, tile[i - lo]);
    }
  } else {
    for (uint64_t i = 0; i < numel; ++i) body(i, DecodeElement<kCodec>(g, i));
  }
}

template <int kCodec>
void Update(int optimizer, const UpdateArgs& a) {
  switch (optimizer) {
    case server::kOptSgd:
      return ForEachDecoded<kCodec>(
          a.grad, a.numel, [&](uint64_t i, float d) { UpdateElement<server::kOptSgd>(a, i, d); });
    case server::kOptMomentum:
      return ForEachDecoded<kCodec>(a.grad, a.numel, [&](uint64_t i, float d) {
        UpdateElement<server::kOptMomentum>(a, i, d);
      });
    case server::kOptAdam:
      return ForEachDecoded<kCodec>(
          a.grad, a.numel, [&](uint64_t i, float d) { UpdateElement<server::kOptAdam>(a, i, d); });
    default:
      return ForEachDecoded<kCodec>(a.grad, a.numel, [&](uint64_t i, float d) {
        UpdateElement<server::kOptAdagrad>(a, i, d);
      });
  }
}

template <int kCodec>
void Fold(const FoldArgs& a) {
  ForEachDecoded<kCodec>(a.grad, a.numel, [&](uint64_t i, float d) { FoldElement(a, i, d); });
}

}  // namespace

void UpdateOnHost(int optimizer, int codec, const UpdateArgs& a) {
  switch (codec) {
    case kCodecNone:
      return Update<kCodecNone>(optimizer, a);
    case kCodecFp16:
      return Update<kCodecFp16>(optimizer, a);
    case kCodecBf16:
      return Update<kCodecBf16>(optimizer, a);
    case kCodecInt8:
      return Update<kCodecInt8>(optimizer, a);
    case kCodecOneBit:
      return Update<kCodecOneBit>(optimizer, a);
    default:
      return Update<kCodecTopK>(optimizer, a);
  }
}

void FoldOnHost(int codec, const FoldArgs& a) {
  switch (codec) {
    case kCodecNone:
      return Fold<kCodecNone>(a);
    case kCodecFp16:
      return Fold<kCodecFp16>(a);
    case kCodecBf16:
      return Fold<kCodecBf16>(a);
    case kCodecInt8:
      return Fold<kCodecInt8>(a);
    case kCodecOneBit:
      return Fold<kCodecOneBit>(a);
    default:
      return Fold<kCodecTopK>(a);
  }
}

}  // namespace shardps::gpu

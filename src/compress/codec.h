// Gradient and parameter codecs on the CPU (docs/compression.md): the worker encodes a chunk's
// gradient (with error feedback) into the bytes it pushes; the server checks those bytes and
// decodes them range by range straight into its accumulation or update, never into a decoded
// copy of the whole push. The element arithmetic is in codec_math.h, shared with CUDA.
#pragma once

#include <cstdint>

#include "shardps/status.h"
#include "shardps/types.h"

namespace shardps::compress {

// One chunk's encoding: the tensor's codec, its block, and for topk the number of elements
// this chunk sends (its share of the tensor's k).
struct ChunkCodec {
  Codec codec = Codec::kNone;
  uint32_t block = 256;
  uint64_t k = 0;
};

// The encoding of the chunk of `numel` elements at `offset` in a tensor of `tensor_numel`:
// topk's k over the tensor (count, or ratio * numel rounded, at least 1) is split over its
// chunks so that their shares add up to exactly k, each share at most (numel - 1) / 2 (so
// that no encoding is larger than the chunk in fp32).
ChunkCodec ForChunk(const Compression& c, uint64_t tensor_numel, uint64_t offset, uint64_t numel);

// Bytes that `numel` elements take encoded.
uint64_t EncodedBytes(const ChunkCodec& c, uint64_t numel);
// Bytes of a topk encoding of k elements.
inline uint64_t TopKBytes(uint64_t k) { return 4 + 8 * k; }

// Checks `bytes` bytes at `data` as an encoding of `numel` elements with `codec` (and `block`):
// the length for the element count, every scale finite and not negative, onebit's padding bits
// clear, topk's count within the elements and its indices strictly ascending (so in range and
// never repeated). Non-OK names what is wrong.
Status Check(Codec codec, uint32_t block, const void* data, uint64_t bytes, uint64_t numel);

// Encodes x[0, numel) into `out` (EncodedBytes(c, numel) bytes). With `residual` (numel floats,
// error feedback) the residual is added to x first and replaced by what the encoding lost:
// decode(out) + residual' == x + residual, up to fp32 rounding.
void Encode(const ChunkCodec& c, const float* x, uint64_t numel, void* out, float* residual);

// Decodes elements [lo, hi) of a checked encoding of `numel` elements into out[0, hi - lo):
// assigned, or added when `add`.
void DecodeRange(Codec codec, uint32_t block, const void* data, uint64_t numel, uint64_t lo,
                 uint64_t hi, float* out, bool add);

// Parameters published for compressed pulls (fp16, bf16): elements [lo, hi) of `x` into the
// encoding at `out` (element lo at out's element lo).
void EncodeParams(Codec codec, const float* x, uint64_t lo, uint64_t hi, void* out);
// The whole encoding of `numel` parameters back to fp32.
void DecodeParams(Codec codec, const void* data, uint64_t numel, float* out);
// Bytes of `numel` parameters published with `codec` (kNone, kFp16, kBf16).
uint64_t ParamBytes(Codec codec, uint64_t numel);
inline bool IsPullCodec(Codec c) {
  return c == Codec::kNone || c == Codec::kFp16 || c == Codec::kBf16;
}

}  // namespace shardps::compress

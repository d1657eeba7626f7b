// Compressed gradients as they land from the network: an input is [u8 codec][u16 block][u16
// numel][u16 lo][u16 hi] then the encoded bytes, which compress::Check must accept or refuse
// and, when it accepts them, DecodeRange must decode within bounds (any range, assigned or
// added) into finite-or-not floats without reading past the bytes; also the codec text parser.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "compress/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardps;
  (void)Compression::Parse(std::string(reinterpret_cast<const char*>(data), size));
  if (size < 9) return 0;
  const Codec codec = static_cast<Codec>(data[0] % 6);
  uint16_t block, numel, lo, hi;
  std::memcpy(&block, data + 1, 2);
  std::memcpy(&numel, data + 3, 2);
  std::memcpy(&lo, data + 5, 2);
  std::memcpy(&hi, data + 7, 2);
  // The encoding in its own exactly sized (and aligned) buffer, so a read past it is caught.
  std::vector<uint32_t> aligned((size - 9 + 3) / 4);
  if (size > 9) std::memcpy(aligned.data(), data + 9, size - 9);
  std::vector<uint8_t> enc(reinterpret_cast<uint8_t*>(aligned.data()),
                           reinterpret_cast<uint8_t*>(aligned.data()) + (size - 9));
  const uint64_t n = numel;
  if (!compress::Check(codec, block, enc.data(), enc.size(), n).ok()) return 0;
  std::vector<float> out(n);
  compress::DecodeRange(codec, block, enc.data(), n, 0, n, out.data(), false);
  if (lo <= hi && hi <= n) {
    std::vector<float> part(hi - lo);
    compress::DecodeRange(codec, block, enc.data(), n, lo, hi, part.data(), true);
  }
  return 0;
}
